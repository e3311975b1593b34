"""The GPU :class:`~model_host.fp8.LinearBackend`: FP8 linears, fused MLP / MoE through kernels.

Install with :func:`model_host.kernels.install` (or ``set_backend(TritonFP8Backend())``).  Any
call it cannot serve (CPU tensors, non-FP8 weights such as the BF16 ``lm_head``) goes to the
reference :class:`~model_host.fp8.TorchBackend`, so installing it never changes CPU results.

Besides the three interface methods it offers two optional hooks that :mod:`model_host.moe`
calls when present:

* ``mlp_forward(mlp, x)``  - SwiGLU as one gated grouped launch (E=1: gate+up+SiLU-mul) and one
  W8A8 linear for ``down``;
* ``moe_forward(moe, x)``  - router in torch (fp32 logits, noaux_tc top-k, all on the device),
  then routed experts as two grouped launches (gated gate/up over expert-sorted rows; down
  fused with the routing-weighted scatter-add into an fp32 buffer) and the shared expert as two
  more launches accumulating into the same buffer.  No host synchronisation anywhere, so the
  whole MoE can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fp8 import LinearBackend, TorchBackend, block_dequantize
from . import use_triton
from .fp8_linear import act_quant, scaled_mm_linear, w8a8_linear
from .moe_grouped import grouped_config, grouped_w8a8


class TritonFP8Backend(LinearBackend):
    """FP8 kernels for CUDA tensors; :class:`TorchBackend` for everything else.

    gemm: ``"triton"`` (all shapes), ``"scaled_mm"`` (cuBLASLt blockwise where it accepts the
    shape, Triton elsewhere) or ``"auto"`` (scaled_mm for M >= ``scaled_mm_min_m``, Triton
    below).  Measured on H100 (docs/benchmarks.md): cuBLASLt rejects M=1, is 1.1-4x faster
    than our Triton tiles from M=32 up, and reaches ~1.1 PFLOP/s at M=2048.
    act: ``"fp8"`` (W8A8 everywhere) or ``"auto"`` (bf16 activations on the Triton small-M
    decode path, where the GEMMs are bound by weight bytes and activation quantization only
    adds error; W8A8 elsewhere).
    """

    def __init__(self, gemm: str = "auto", act: str = "auto", scaled_mm_min_m: int = 32) -> None:
        if gemm not in ("auto", "triton", "scaled_mm") or act not in ("auto", "fp8"):
            raise ValueError(f"gemm={gemm!r} act={act!r}")
        self.gemm, self.scaled_mm_min_m = gemm, scaled_mm_min_m
        self.act16 = act == "auto"
        self.reference = TorchBackend(cache_dequantized=False)
        self._scaled_ok: dict[tuple, bool] = {}

    # -- LinearBackend interface -------------------------------------------------------------
    def dense_weight(self, layer, dtype: torch.dtype) -> torch.Tensor:
        # Only absorbed MLA asks for a dense weight (kv_b_proj, 17 MB FP8 per layer): keep the
        # dequantized copy instead of rebuilding it every decode step.
        if layer.is_fp8 and layer.weight.is_cuda:
            cached = layer._dequant
            if cached is None or cached.dtype != dtype:
                cached = layer._dequant = block_dequantize(layer.weight, layer.weight_scale_inv, layer.block, dtype)
            return cached
        return self.reference.dense_weight(layer, dtype)

    def linear(self, x: torch.Tensor, layer) -> torch.Tensor:
        if not (layer.is_fp8 and use_triton(x)):
            return self.reference.linear(x, layer)
        y = self.fp8_mm(x.reshape(-1, layer.in_features), layer.weight, layer.weight_scale_inv)
        return y.view(*x.shape[:-1], layer.out_features)

    def grouped_linear(self, x: torch.Tensor, layer, offsets: torch.Tensor) -> torch.Tensor:
        if not (layer.is_fp8 and use_triton(x)):
            return self.reference.grouped_linear(x, layer, offsets)
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        return grouped_w8a8(x, layer.weight, layer.weight_scale_inv, counts, num_rows=x.shape[0],
                            act16=self.act16)

    # -- kernels ------------------------------------------------------------------------------
    def fp8_mm(self, x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
        """[M, K] x FP8 [N, K] -> [M, N], through scaled_mm or Triton per the policy."""
        m = x.shape[0]
        if self.gemm == "scaled_mm" or (self.gemm == "auto" and m >= self.scaled_mm_min_m):
            key = (tuple(w.shape), m)
            if self._scaled_ok.get(key, True):
                try:
                    y = scaled_mm_linear(x, w, w_s)
                    self._scaled_ok[key] = True
                    return y
                except (RuntimeError, NotImplementedError, TypeError):
                    self._scaled_ok[key] = False  # unsupported here: Triton from now on
        return w8a8_linear(x, w, w_s, act16=self.act16)

    def mlp_forward(self, mlp, x: torch.Tensor) -> torch.Tensor | None:
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        if not (g.is_fp8 and u.is_fp8 and d.is_fp8 and use_triton(x)):
            return None
        flat = x.reshape(-1, x.shape[-1])
        t = flat.shape[0]
        if t > 256:  # prefill: one expert = plain GEMMs, where cuBLASLt / 128x128 tiles win
            h = F.silu(self.fp8_mm(flat, g.weight, g.weight_scale_inv)) * self.fp8_mm(flat, u.weight, u.weight_scale_inv)
        else:
            h = self._shared_gate_up(flat, g, u, t, act16=self.act16)
        return self.fp8_mm(h, d.weight, d.weight_scale_inv).view(*x.shape[:-1], d.out_features)

    def moe_forward(self, moe, x: torch.Tensor) -> torch.Tensor | None:
        ex = moe.experts
        if not (ex.gate_proj.is_fp8 and use_triton(x)):
            return None
        flat = x.reshape(-1, x.shape[-1])
        t, dim = flat.shape
        weights, indices = moe.gate(flat)
        k = indices.shape[1]
        rows = t * k
        fl = indices.reshape(-1)
        order = torch.argsort(fl, stable=True)  # rows grouped by expert
        token = (order // k).to(torch.int32)
        counts = torch.zeros(ex.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, fl, torch.ones_like(fl, dtype=torch.int32))
        w_sorted = weights.reshape(-1)[order].float().contiguous()
        cfg = grouped_config(rows, ex.gate_proj.out_features, ex.num_experts, self.act16)
        # Many rows: quantize the tokens once; both gated launches gather rows from it.
        aq = None if cfg["a_mode"] else act_quant(flat)
        gp, up, dp = ex.gate_proj, ex.up_proj, ex.down_proj
        h = grouped_w8a8(flat, gp.weight, gp.weight_scale_inv, counts, num_rows=rows, mode="gated",
                         rows=token, w2=up.weight, w2_s=up.weight_scale_inv, config=cfg, a_quant=aq)
        if cfg["a_mode"]:  # decode: down + routing weights + combine fused (fp32 atomics)
            out = torch.zeros(t, dim, dtype=torch.float32, device=x.device)
            grouped_w8a8(h, dp.weight, dp.weight_scale_inv, counts, num_rows=rows, mode="scatter",
                         out=out, scatter=token, weight=w_sorted, act16=self.act16)
        else:  # prefill: 117M fp32 atomics per layer cost more than the GEMM; gather + bmm
            y = grouped_w8a8(h, dp.weight, dp.weight_scale_inv, counts, num_rows=rows)
            inv = torch.empty_like(order)
            inv[order] = torch.arange(rows, device=x.device)  # pair (token, slot) -> sorted row
            out = torch.bmm(weights.view(t, 1, k).to(y.dtype), y[inv].view(t, k, dim)).view(t, dim).float()
        sh = moe.shared_experts
        if sh is not None:
            if sh.gate_proj.is_fp8 and sh.down_proj.is_fp8 and t <= 256:
                hs = self._shared_gate_up(flat, sh.gate_proj, sh.up_proj, t, aq, self.act16)
                one = torch.full((1,), t, dtype=torch.int32, device=x.device)
                d = sh.down_proj
                grouped_w8a8(hs, d.weight.unsqueeze(0), d.weight_scale_inv.unsqueeze(0), one,
                             num_rows=t, mode="scatter", out=out, act16=self.act16)
            else:  # prefill (or non-FP8): the dense-MLP path, added in fp32
                out += sh(flat).float()
        return out.to(x.dtype).view(x.shape)

    @staticmethod
    def _shared_gate_up(flat, g, u, t, aq=None, act16=False) -> torch.Tensor:
        """silu(x W_g^T) * (x W_u^T) for one (dense or shared) expert as a single gated launch."""
        one = torch.full((1,), t, dtype=torch.int32, device=flat.device)
        return grouped_w8a8(flat, g.weight.unsqueeze(0), g.weight_scale_inv.unsqueeze(0), one,
                            num_rows=t, mode="gated", w2=u.weight.unsqueeze(0),
                            w2_s=u.weight_scale_inv.unsqueeze(0), a_quant=aq, act16=act16)
