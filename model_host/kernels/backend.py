"""The GPU :class:`~model_host.fp8.LinearBackend`: FP8 linears, fused MLP / MoE through kernels.

Install with :func:`model_host.kernels.install` (or ``set_backend(TritonFP8Backend())``).  Any
call it cannot serve (CPU tensors, non-FP8 weights such as the BF16 ``lm_head``) goes to the
reference :class:`~model_host.fp8.TorchBackend`, so installing it never changes CPU results.

Besides the three interface methods it offers optional hooks that the model's modules call
when present (each returns None / False where it does not apply, and the module runs its own
PyTorch code):

* ``mlp_forward(mlp, x)``  - SwiGLU as one gated grouped launch (E=1: gate+up+SiLU-mul) and one
  W8A8 linear for ``down``;
* ``route(gate, x)``       - fp32 router logits, then the noaux_tc choice as one kernel;
* ``moe_forward(moe, x)``  - routing, one launch sorting rows by expert (decode), the routed
  experts as two grouped launches (gated gate/up over expert-sorted rows; down fused with the
  routing-weighted scatter-add into an fp32 buffer) and the shared expert as two more launches
  accumulating into the same buffer.  No host synchronisation anywhere, so the whole MoE can
  be captured in a CUDA graph;
* ``rms_norm`` / ``add_rms_norm`` (:class:`~model_host.layers.RMSNorm`), ``store_latents``
  (MLA's norm + rope + paged cache write) and ``concat_heads`` (prefill's rope + [nope | pe]
  assembly of queries and keys): one launch each instead of a chain of small ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fp8 import LinearBackend, TorchBackend, block_dequantize
from . import use_triton
from .fp8_linear import BLOCK, act_quant, gemm_config, num_sms, scaled_mm_linear, w8a8_linear
from .moe_grouped import grouped_config, grouped_w8a8
from .norm_rope import concat_heads, latent_store, rms_norm, rms_norm_split_quant
from .routing import combine, route_noaux_tc, sort_by_expert


def _version(t: torch.Tensor) -> int | None:
    """In-place version counter; inference tensors have none (identity is their key)."""
    return None if t.is_inference() else t._version


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
        self._mm_out_f32: bool | None = None  # torch.mm(..., out_dtype=fp32) available here?
        self._quant_memo: tuple | None = None  # see quantized

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
        y = self.fp8_mm(x.reshape(-1, layer.in_features), layer.weight, layer.weight_scale_inv, source=x)
        return y.view(*x.shape[:-1], layer.out_features)

    def grouped_linear(self, x: torch.Tensor, layer, offsets: torch.Tensor) -> torch.Tensor:
        if not (layer.is_fp8 and use_triton(x)):
            return self.reference.grouped_linear(x, layer, offsets)
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        return grouped_w8a8(x, layer.weight, layer.weight_scale_inv, counts, num_rows=x.shape[0],
                            act16=self.act16)

    def linears(self, x: torch.Tensor, layers: tuple) -> tuple[torch.Tensor, ...] | None:
        """Several FP8 linears of the same input as one GEMM over their concatenated weights
        (MLA's q_a and kv_a: 1536 + 576 rows at V3 widths): one launch and one pass over ``x``
        instead of two, and the decode split-K gets longer K runs per program.  Exact: a row
        keeps its own 128x128 scale block as long as every layer but the last has a multiple
        of 128 rows.  The concatenated copy (15 MB per V3 layer) is kept on the first layer and
        rebuilt if any weight changes in place.  None where it does not apply."""
        if not (use_triton(x) and all(lin.is_fp8 and lin.block == (BLOCK, BLOCK) for lin in layers)
                and all(lin.out_features % BLOCK == 0 for lin in layers[:-1])):
            return None
        key = tuple((lin.weight.data_ptr(), _version(lin.weight), _version(lin.weight_scale_inv)) for lin in layers)
        cached = getattr(layers[0], "_concat", None)
        if cached is None or cached[0] != key:
            w = torch.cat([lin.weight for lin in layers])
            w_s = torch.cat([lin.weight_scale_inv for lin in layers])
            cached = layers[0]._concat = (key, w, w_s)
        y = self.fp8_mm(x.reshape(-1, x.shape[-1]), cached[1], cached[2], source=x)
        sizes = [lin.out_features for lin in layers]
        return tuple(t.view(*x.shape[:-1], n) for t, n in zip(y.split(sizes, dim=-1), sizes, strict=True))

    # -- kernels ------------------------------------------------------------------------------
    def fp8_mm(self, x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor,
               source: torch.Tensor | None = None) -> torch.Tensor:
        """[M, K] x FP8 [N, K] -> [M, N], through scaled_mm or Triton per the policy.

        ``source``: the tensor ``x`` is a view of, when the caller may feed it to several
        linears (MLA's q_a and kv_a, an MLP's gate and up): its FP8 quantization is reused.
        """
        m = x.shape[0]
        if self.gemm == "scaled_mm" or (self.gemm == "auto" and m >= self.scaled_mm_min_m):
            key = (tuple(w.shape), m)
            if self._scaled_ok.get(key, True):
                try:
                    y = scaled_mm_linear(x, w, w_s, a_quant=self.quantized(x, source))
                    self._scaled_ok[key] = True
                    return y
                except (RuntimeError, NotImplementedError, TypeError):
                    self._scaled_ok[key] = False  # unsupported here: Triton from now on
        cfg = gemm_config(m, w.shape[0], w.shape[1], num_sms(x.device.index or 0), self.act16)
        # Pre-quantized activations (large M, or the two-term decode mode) are shared by the
        # linears that read the same source.
        aq = self.quantized(x, source, split=cfg["a_mode"] == 3) if cfg["a_mode"] in (0, 3) else None
        return w8a8_linear(x, w, w_s, config=cfg, a_quant=aq)

    def quantized(self, x: torch.Tensor, source: torch.Tensor | None = None,
                  split: bool = False) -> tuple[torch.Tensor, ...]:
        """FP8 (q, s) of ``x`` (two terms with ``split``), remembered for the last ``source``
        tensor: the same activations feed two or three linears (q_a and kv_a, gate and up, the
        routed and the shared experts), and each quantization is a pass and a launch.  The memo
        holds a reference to ``source`` (its memory cannot be reused by another tensor
        meanwhile) and checks its version counter (an in-place change invalidates it).
        Inference tensors (the engine runs under ``torch.inference_mode``) have no version
        counter; there identity is the key, and the runtime never changes an activation in
        place between the linears that read it."""
        src = source if source is not None else x
        memo = self._quant_memo
        key = (_version(src), x.shape, split)
        if memo is not None and memo[0] is src and memo[1] == key:
            return memo[2]
        quant = act_quant(x, split=split)
        self._quant_memo = (src, key, quant)
        return quant

    def mlp_forward(self, mlp, x: torch.Tensor) -> torch.Tensor | None:
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        if not (g.is_fp8 and u.is_fp8 and d.is_fp8 and use_triton(x)):
            return None
        flat = x.reshape(-1, x.shape[-1])
        t = flat.shape[0]
        if t > 256:  # prefill: one expert = plain GEMMs, where cuBLASLt / 128x128 tiles win
            gate = self.fp8_mm(flat, g.weight, g.weight_scale_inv, source=x)
            h = F.silu(gate) * self.fp8_mm(flat, u.weight, u.weight_scale_inv, source=x)
        else:
            aq = self.quantized(flat, source=x, split=True) if self._split_rows(flat) else None
            h = self._shared_gate_up(flat, g, u, t, aq, act16=self.act16)
        return self.fp8_mm(h, d.weight, d.weight_scale_inv).view(*x.shape[:-1], d.out_features)

    def moe_forward(self, moe, x: torch.Tensor) -> torch.Tensor | None:
        ex = moe.experts
        if not (ex.gate_proj.is_fp8 and use_triton(x)):
            return None
        flat = x.reshape(-1, x.shape[-1])
        t, dim = flat.shape
        weights, indices = moe.gate(flat)  # through self.route
        k = indices.shape[1]
        rows = t * k
        cfg = grouped_config(rows, ex.gate_proj.out_features, ex.num_experts, self.act16)
        gp, up, dp = ex.gate_proj, ex.up_proj, ex.down_proj
        if cfg["a_mode"]:
            # Decode: one launch sorts the rows by expert; gate/up read the tokens through
            # `token`, and down is fused with the routing weights and the combine (fp32 atomics).
            offsets, tile_end, token, w_sorted = sort_by_expert(indices, weights, ex.num_experts, cfg["BLOCK_M"])
            sched = (offsets, tile_end)
            # Shared by the shared expert; usually written by the norm before (add_rms_norm).
            aq = self.quantized(flat, source=x, split=True) if cfg["a_mode"] == 3 else None
            h = grouped_w8a8(flat, gp.weight, gp.weight_scale_inv, None, num_rows=rows, mode="gated",
                             rows=token, w2=up.weight, w2_s=up.weight_scale_inv, config=cfg, schedule=sched,
                             a_quant=aq)
            out = torch.zeros(t, dim, dtype=torch.float32, device=x.device)
            down_cfg = grouped_config(rows, dp.out_features, ex.num_experts, self.act16)
            assert down_cfg["BLOCK_M"] == cfg["BLOCK_M"]  # the schedule is per BLOCK_M
            grouped_w8a8(h, dp.weight, dp.weight_scale_inv, None, num_rows=rows, mode="scatter", out=out,
                         scatter=token, weight=w_sorted, config=down_cfg, schedule=sched)
        else:
            fl = indices.reshape(-1).long()
            order = torch.argsort(fl, stable=True)  # rows grouped by expert
            token = (order // k).to(torch.int32)
            counts = torch.zeros(ex.num_experts, dtype=torch.int32, device=x.device)
            counts.scatter_add_(0, fl, torch.ones_like(fl, dtype=torch.int32))
            # Many rows: quantize the tokens once; the gated launch gathers rows from it, and
            # the shared expert's gate and up (same `flat`) reuse it through the memo.
            aq = self.quantized(flat)
            h = grouped_w8a8(flat, gp.weight, gp.weight_scale_inv, counts, num_rows=rows, mode="gated",
                             rows=token, w2=up.weight, w2_s=up.weight_scale_inv, config=cfg, a_quant=aq)
            # 117M fp32 atomics per layer would cost more than the GEMM: store, then one pass
            # un-sorts, weights and sums the k outputs per token and adds the shared expert.
            y = grouped_w8a8(h, dp.weight, dp.weight_scale_inv, counts, num_rows=rows,
                             config=grouped_config(rows, dp.out_features, ex.num_experts, self.act16, down=True))
            inv = torch.empty_like(order)
            inv[order] = torch.arange(rows, device=x.device)  # pair (token, slot) -> sorted row
            sh = moe.shared_experts
            return combine(y, inv, weights, sh(flat) if sh is not None else None).view(x.shape)
        sh = moe.shared_experts
        if sh is not None:
            if sh.gate_proj.is_fp8 and sh.down_proj.is_fp8:
                hs = self._shared_gate_up(flat, sh.gate_proj, sh.up_proj, t, aq, self.act16)
                d = sh.down_proj
                grouped_w8a8(hs, d.weight.unsqueeze(0), d.weight_scale_inv.unsqueeze(0), None,
                             num_rows=t, mode="scatter", out=out, act16=self.act16)
            else:  # non-FP8 shared expert: the dense-MLP path, added in fp32
                out += sh(flat).float()
        return out.to(x.dtype).view(x.shape)

    def route(self, gate, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Router of one MoE layer (:class:`~model_host.moe.Gate` calls it): fp32 logits (cuBLAS,
        fp32 weight copy kept), then the fused noaux_tc kernel; other configurations go through
        :func:`moe.route` on the same logits.  None on CPU tensors (the module's own path)."""
        from ..moe import route

        if not use_triton(flat):
            return None
        logits = self._router_logits(gate, flat)
        c = gate.cfg
        if c.topk_method == "noaux_tc" and c.scoring_func == "sigmoid":
            routed = route_noaux_tc(logits, gate.e_score_correction_bias, top_k=c.num_experts_per_tok,
                                    n_group=c.n_group, topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
                                    routed_scaling_factor=c.routed_scaling_factor)
            if routed is not None:
                return routed
        return route(logits, gate.e_score_correction_bias, top_k=c.num_experts_per_tok, n_group=c.n_group,
                     topk_group=c.topk_group, topk_method=c.topk_method, scoring_func=c.scoring_func,
                     norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor)

    def _router_logits(self, gate, flat: torch.Tensor) -> torch.Tensor:
        """fp32 logits of bf16 activations and weights: cuBLAS with fp32 output (exact products,
        fp32 sums, like the reference's upcast); where this torch lacks ``out_dtype``, an fp32
        GEMM on a kept fp32 copy of the weight (7 MB per V3 layer)."""
        if self._mm_out_f32 is not False and flat.dtype == gate.weight.dtype:
            try:
                logits = torch.mm(flat, gate.weight.t(), out_dtype=torch.float32)
                self._mm_out_f32 = True
                return logits
            except (TypeError, RuntimeError, NotImplementedError):
                self._mm_out_f32 = False
        w32 = getattr(gate, "_w32", None)
        if w32 is None or w32.device != flat.device:
            w32 = gate._w32 = gate.weight.float()
        return F.linear(flat.float(), w32)

    # -- fused elementwise hooks (RMSNorm, MLA latent store, prefill q/k) ---------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        return rms_norm(x, weight, eps)[0] if use_triton(x) else None

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                     quantize: bool = False):
        """(x + delta, rms_norm(x + delta)) in one launch, or None on CPU.  ``quantize``: the
        output feeds FP8 GEMMs (the MoE / MLP); where those take two-term FP8 activations
        (decode), the same launch writes them and :meth:`quantized` returns them from the memo."""
        if not use_triton(x):
            return None
        if not (quantize and self._split_rows(x)):
            y, h = rms_norm(x, weight, eps, residual=delta)
            return h, y
        y, h, terms = rms_norm_split_quant(x, weight, eps, residual=delta)
        self._quant_memo = (y, (_version(y), (y.numel() // y.shape[-1], y.shape[-1]), True), terms)
        return h, y

    def _split_rows(self, x: torch.Tensor) -> bool:
        """Whether the grouped launches take ``x``'s rows as two-term FP8 (decode, act16)."""
        rows = x.numel() // x.shape[-1]
        return self.act16 and grouped_config(rows, 1, 1, True)["a_mode"] == 3

    def store_latents(self, kv_a, weight, eps, cos, sin, slots, c_kv, k_pe) -> bool:
        if not use_triton(kv_a, c_kv):
            return False
        latent_store(kv_a, weight, eps, cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1]),
                     slots, c_kv, k_pe)
        return True

    def concat_heads(self, nope, pe, rope):
        return concat_heads(nope, pe, rope) if use_triton(nope) else None

    @staticmethod
    def _shared_gate_up(flat, g, u, t, aq=None, act16=False) -> torch.Tensor:
        """silu(x W_g^T) * (x W_u^T) for one (dense or shared) expert as a single gated launch."""
        return grouped_w8a8(flat, g.weight.unsqueeze(0), g.weight_scale_inv.unsqueeze(0), None,
                            num_rows=t, mode="gated", w2=u.weight.unsqueeze(0),
                            w2_s=u.weight_scale_inv.unsqueeze(0), a_quant=aq, act16=act16)
