"""FP8 block weights: the block math and the parameter holders of every projection.

DeepSeek-V3 ships its projection weights as ``float8_e4m3fn`` with one fp32 ``scale_inv`` per
128x128 block: ``weight = w_fp8 * scale_inv`` blockwise.  Every projection's parameters live in
:class:`Linear` (one weight) or :class:`StackedLinear` (one weight per routed expert); the
matmuls are ops of :mod:`model_host.ops` (PyTorch reference or the Triton kernels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
DEFAULT_BLOCK = (128, 128)


# --------------------------------------------------------------------------- block math
def scale_shape(shape: tuple[int, ...] | torch.Size, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, ...]:
    """Shape of ``scale_inv`` for a weight of ``shape`` (leading dims, e.g. experts, kept)."""
    *lead, out, inn = shape
    return (*lead, math.ceil(out / block[0]), math.ceil(inn / block[1]))


def _blocked(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """Zero-pad the last two dims to block multiples and view as [..., R, br, C, bc]."""
    *lead, out, inn = x.shape
    pr, pc = -out % block[0], -inn % block[1]
    if pr or pc:
        x = F.pad(x, (0, pc, 0, pr))
    r, c = (out + pr) // block[0], (inn + pc) // block[1]
    return x.reshape(*lead, r, block[0], c, block[1]), out, inn


def block_dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w.float() * scale_inv`` broadcast over 128x128 blocks, cast to ``dtype``.

    The product is taken in fp32 (exactly what the checkpoint definition says), so the result is
    bit-identical to an elementwise reference.  Works for [out, in] and stacked [E, out, in].
    """
    wb, out, inn = _blocked(w.to(torch.float32), block)  # a fresh fp32 copy: safe to scale in place
    s = scale_inv.to(device=w.device, dtype=torch.float32)
    wb.mul_(s.unsqueeze(-1).unsqueeze(-3))  # [.., R, 1, C, 1] broadcast over the block
    wb = wb.reshape(*wb.shape[:-4], wb.shape[-4] * block[0], wb.shape[-2] * block[1])
    if wb.shape[-2:] != (out, inn):
        wb = wb[..., :out, :inn].contiguous()
    return wb.to(dtype)


def block_quantize(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to (float8_e4m3fn weight, fp32 scale_inv) with one scale per block.

    ``scale_inv = amax(|block|) / 448`` so the largest magnitude of each block maps to the fp8
    maximum; all-zero blocks get scale 1 (any scale dequantizes zeros exactly).
    """
    wb, out, inn = _blocked(w.to(torch.float32), block)
    amax = wb.abs().amax(dim=(-3, -1))  # [..., R, C]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (wb / scale.unsqueeze(-1).unsqueeze(-3)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*q.shape[:-4], q.shape[-4] * block[0], q.shape[-2] * block[1])[..., :out, :inn]
    return q.contiguous(), scale.contiguous()


# ------------------------------------------------------------------------------ layers
class Linear(nn.Module):
    """The parameters of ``y = x @ W^T`` (no bias): a bf16/fp32 weight, or an FP8 weight plus
    block ``scale_inv``.  The product itself is an op (:meth:`model_host.ops.Ops.linear`).

    Parameter names match the checkpoint (``weight``, ``weight_scale_inv``) so a state dict maps
    one to one.  Whether the layer is FP8 is decided by the tensors it holds, not by flags.
    ``lead`` are leading weight dims (``(num_experts,)`` for :class:`StackedLinear`).
    """

    def __init__(self, in_features: int, out_features: int, *, fp8_block: tuple[int, int] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 lead: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = fp8_block or DEFAULT_BLOCK
        shape = (*lead, out_features, in_features)
        wdtype = FP8_DTYPE if fp8_block else dtype
        self.weight = nn.Parameter(torch.empty(shape, dtype=wdtype, device=device), requires_grad=False)
        if fp8_block:
            s = torch.empty(scale_shape(shape, self.block), dtype=torch.float32, device=device)
            self.weight_scale_inv = nn.Parameter(s, requires_grad=False)
        else:
            self.register_parameter("weight_scale_inv", None)

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == FP8_DTYPE

    def extra_repr(self) -> str:
        kind = f"fp8 block={self.block}" if self.is_fp8 else str(self.weight.dtype)
        return f"in={self.in_features}, out={self.out_features}, {kind}"


class StackedLinear(Linear):
    """``num_experts`` linears of identical shape stored as one [E, out, in] weight (the routed
    experts); :meth:`model_host.ops.Ops.moe` runs them as grouped GEMMs."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, **kw) -> None:
        super().__init__(in_features, out_features, lead=(num_experts,), **kw)
        self.num_experts = num_experts

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, " + super().extra_repr()


def _no_grouped_mm(*_args, **_kwargs):
    raise NotImplementedError("this torch build has no grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[rows of group e] = x[rows of group e] @ w[e].T`` with int32 end ``offsets`` [E].

    Uses torch's grouped GEMM: one kernel, no host sync (CPU, and CUDA in bf16/fp32 with torch
    >= 2.11).  Builds without it take a slow, memory-safe fallback: one matmul per non-empty
    group, which reads the offsets on the host.
    """
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[1])
    try:
        return _GROUPED_MM(x, w.transpose(-2, -1), offs=offsets)
    except (RuntimeError, NotImplementedError):
        out = x.new_empty(x.shape[0], w.shape[1])
        ends = offsets.tolist()
        for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
            if end > start:
                out[start:end] = x[start:end] @ w[e].T
        return out


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None) or _no_grouped_mm
