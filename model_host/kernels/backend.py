""":class:`TritonOps`: the :class:`~model_host.ops.Ops` interface on the GPU kernels.

Every op is implemented here; each falls back to the reference :class:`~model_host.ops.TorchOps`
(its base class) where its kernels do not apply: CPU tensors without the Triton interpreter,
non-FP8 weights (the BF16 ``lm_head``), shapes a kernel does not take.  So switching a model
to it (``model.ops = TritonOps()``) never changes CPU results.

* ``linear`` / ``linears`` - W8A8 / W8A16 FP8 GEMMs (:mod:`.fp8_linear`, :mod:`.fp8_gemv`) or
  cuBLASLt blockwise ``_scaled_mm`` from ``tuning.scaled_mm_min_m`` rows; ``linears`` runs MLA's
  q_a and kv_a as one GEMM over their concatenated weights;
* ``swiglu`` / ``moe`` - grouped FP8 launches (:mod:`.moe_grouped`): gate+up+SiLU-mul in one,
  down fused with the routing-weighted combine (decode) or a combine pass (prefill);
* ``route`` - fp32 router logits, then the noaux_tc choice as one kernel (:mod:`.routing`);
* ``rms_norm`` (+ residual, + two-term FP8 of the output), ``store_latents``, ``concat_heads``
  (:mod:`.norm_rope`) and ``mla_decode`` on a paged cache (:mod:`.mla_decode`);
* ``mla_prefill`` - per sequence through torch's SDPA (flash kernels), as the reference: there is
  no varlen Triton kernel yet, so packed sequences are a Python loop over sequences.

No host synchronisation on the decode path, so a whole decode step can be captured in a CUDA
graph (:mod:`.graphs`).  Prepared weights (dequantized ``kv_b``, concatenated q_a+kv_a, fp32
router weights) are kept here, keyed by module (weakly), never written onto the modules.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..fp8 import block_dequantize
from ..ops import Normed, Routing, TorchOps
from ..ops import sort_by_expert as sort_by_expert_order
from . import use_triton
from .fp8_linear import BLOCK, act_quant, gemm_config, num_sms, scaled_mm_linear, scaled_mm_takes, w8a8_linear
from .mla_decode import mla_decode
from .moe_grouped import grouped_config, grouped_w8a8
from .norm_rope import concat_heads, latent_store, rms_norm, rms_norm_split_quant
from .routing import combine, route_noaux_tc, sort_by_expert
from .tuning import Tuning, load_tuning, mla_config


def _version(t: torch.Tensor) -> int | None:
    """In-place version counter; inference tensors have none (identity is their key)."""
    return None if t.is_inference() else t._version


class TritonOps(TorchOps):
    """The GPU kernels (see the module doc); ``tuning``: launch table (default: this GPU's)."""

    def __init__(self, tuning: Tuning | None = None) -> None:
        super().__init__(cache_dequantized=False)
        self.tuning = tuning or load_tuning()
        self._scaled_ok: dict[tuple, bool] = {}
        self._mm_out_f32: bool | None = None  # torch.mm(..., out_dtype=fp32) available here?
        self._kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> prepared weight

    def precision_switches(self, cfg) -> tuple[int, ...]:
        """Row counts past which these kernels quantize activations to one FP8 term instead of
        two: the dense MLPs' gate/up (the table's ``swiglu_grouped_max_rows``), the Triton GEMM
        where cuBLASLt refuses a shape (``gemm_config``: 256 rows), and the grouped MoE at 256
        routed rows, i.e. 256 // top_k tokens (``grouped_config``). Not listed: the dense linears'
        move to cuBLASLt at ``scaled_mm_min_m`` rows (32), across which the decode sizes have
        always padded 17..31-row steps; riding buckets start past the decode sizes, above it."""
        dense = {self.tuning.swiglu_grouped_max_rows, 256}
        return tuple(sorted(dense | {256 // cfg.num_experts_per_tok} if cfg.is_moe else dense, reverse=True))

    # -- linears ------------------------------------------------------------------------------
    def dense_weight(self, layer, dtype: torch.dtype) -> torch.Tensor:
        # Only absorbed MLA asks for a dense weight (kv_b_proj, 17 MB FP8 per layer): keep the
        # dequantized copy instead of rebuilding it every decode step.
        if not (layer.is_fp8 and layer.weight.is_cuda):
            return super().dense_weight(layer, dtype)
        kept = self._kept.get(layer)
        if kept is None or kept.dtype != dtype:
            kept = self._kept[layer] = block_dequantize(layer.weight, layer.weight_scale_inv, layer.block, dtype)
        return kept

    def linear(self, x: torch.Tensor, layer) -> torch.Tensor:
        if not (layer.is_fp8 and use_triton(x)):
            return super().linear(x, layer)
        y = self.fp8_mm(x.reshape(-1, layer.in_features), layer.weight, layer.weight_scale_inv)
        return y.view(*x.shape[:-1], layer.out_features)

    def linears(self, x: torch.Tensor, layers: tuple) -> tuple[torch.Tensor, ...]:
        """One GEMM over the concatenated weights (MLA's q_a and kv_a: 1536 + 576 rows at V3
        widths): one launch and one pass over ``x``, and the decode split-K gets longer K runs.
        Exact: a row keeps its own 128x128 scale block as long as every layer but the last has
        a multiple of 128 rows.  The copy (15 MB per V3 layer) is rebuilt if a weight changes."""
        if not (use_triton(x) and all(lin.is_fp8 and lin.block == (BLOCK, BLOCK) for lin in layers)
                and all(lin.out_features % BLOCK == 0 for lin in layers[:-1])):
            return super().linears(x, layers)
        key = tuple((lin.weight.data_ptr(), _version(lin.weight), _version(lin.weight_scale_inv)) for lin in layers)
        kept = self._kept.get(layers[0])
        if kept is None or kept[0] != key:
            w = torch.cat([lin.weight for lin in layers])
            kept = self._kept[layers[0]] = (key, w, torch.cat([lin.weight_scale_inv for lin in layers]))
        y = self.fp8_mm(x.reshape(-1, x.shape[-1]), kept[1], kept[2])
        sizes = [lin.out_features for lin in layers]
        return tuple(t.view(*x.shape[:-1], n) for t, n in zip(y.split(sizes, dim=-1), sizes, strict=True))

    def fp8_mm(self, x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor,
               a_quant: tuple | None = None) -> torch.Tensor:
        """[M, K] x FP8 [N, K] -> [M, N]: cuBLASLt from ``scaled_mm_min_m`` rows where it takes
        the shape, else Triton.  ``a_quant``: :func:`act_quant` of ``x`` when the caller has it."""
        m = x.shape[0]
        if self._tries_scaled_mm(m, w):
            try:
                a_quant = a_quant or act_quant(x)
                y = scaled_mm_linear(x, w, w_s, a_quant=a_quant)
                self._scaled_ok[(tuple(w.shape), m)] = True
                return y
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                self._scaled_ok[(tuple(w.shape), m)] = False  # unsupported here: Triton from now on
        cfg = gemm_config(m, w.shape[0], w.shape[1], num_sms(x.device.index or 0), self.tuning)
        return w8a8_linear(x, w, w_s, cfg, a_quant=a_quant if cfg["a_mode"] == 0 else None)

    def _tries_scaled_mm(self, m: int, w: torch.Tensor) -> bool:
        return (m >= self.tuning.scaled_mm_min_m and scaled_mm_takes(*w.shape)
                and self._scaled_ok.get((tuple(w.shape), m), True))

    def _reads_act_quant(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        """Whether :meth:`fp8_mm` of ``x`` by ``w`` reads one-term FP8 activations (cuBLASLt, or
        a Triton config that quantizes, ``a_mode`` 0): a caller quantizes once for several such
        GEMMs only then; the Triton W8A16 configs read ``x`` as it is (widths cuBLASLt refuses:
        tensor-parallel shards, small models)."""
        m = x.shape[0]
        return self._tries_scaled_mm(m, w) or gemm_config(
            m, w.shape[0], w.shape[1], num_sms(x.device.index or 0), self.tuning)["a_mode"] == 0

    def _grouped(self, rows: int, layer, experts: int = 1, down: bool = False) -> dict:
        return grouped_config(rows, layer.out_features, experts, self.tuning, down=down)

    def _gate_up(self, flat: torch.Tensor, mlp, aq: tuple | None) -> torch.Tensor:
        """silu(x W_g^T) * (x W_u^T) of one (dense or shared) expert as a single gated launch."""
        g, u = mlp.gate_proj, mlp.up_proj
        return grouped_w8a8(flat, g.weight.unsqueeze(0), g.weight_scale_inv.unsqueeze(0), None,
                            num_rows=flat.shape[0], mode="gated", w2=u.weight.unsqueeze(0),
                            w2_s=u.weight_scale_inv.unsqueeze(0), a_quant=aq, config=self._grouped(flat.shape[0], g))

    def _fp8_mlp(self, mlp, x: torch.Tensor) -> bool:
        return mlp.gate_proj.is_fp8 and mlp.up_proj.is_fp8 and mlp.down_proj.is_fp8 and use_triton(x)

    def swiglu(self, x: torch.Tensor, mlp, x_quant: tuple | None = None) -> torch.Tensor:
        if not self._fp8_mlp(mlp, x):
            return super().swiglu(x, mlp)
        flat = x.reshape(-1, x.shape[-1])
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        if flat.shape[0] > self.tuning.swiglu_grouped_max_rows:  # prefill-like: plain GEMMs (cuBLASLt) win
            # gate and up read the same activations: quantize once, where they read it at all
            aq = act_quant(flat) if self._reads_act_quant(flat, g.weight) else None
            h = F.silu(self.fp8_mm(flat, g.weight, g.weight_scale_inv, aq)) * self.fp8_mm(
                flat, u.weight, u.weight_scale_inv, aq)
        else:
            h = self._gate_up(flat, mlp, x_quant)
        return self.fp8_mm(h, d.weight, d.weight_scale_inv).view(*x.shape[:-1], d.out_features)

    # -- MoE ----------------------------------------------------------------------------------
    def route(self, x: torch.Tensor, gate) -> Routing:
        """fp32 logits (cuBLAS, exact products and fp32 sums like the reference's upcast), then
        the fused noaux_tc kernel; other configurations choose on the same logits."""
        if not use_triton(x):
            return super().route(x, gate)
        logits = self._router_logits(gate, x)
        routed = route_noaux_tc(logits, gate.e_score_correction_bias, gate.cfg)
        return Routing(*routed) if routed is not None else gate.choose(logits)

    def _router_logits(self, gate, flat: torch.Tensor) -> torch.Tensor:
        """Where this torch lacks ``mm(out_dtype=fp32)``: an fp32 GEMM on a kept fp32 copy of the
        weight (7 MB per V3 layer)."""
        if self._mm_out_f32 is not False and flat.dtype == gate.weight.dtype:
            try:
                logits = torch.mm(flat, gate.weight.t(), out_dtype=torch.float32)
                self._mm_out_f32 = True
                return logits
            except (TypeError, RuntimeError, NotImplementedError):
                self._mm_out_f32 = False
        w32 = self._kept.get(gate)
        if w32 is None or w32.device != flat.device:
            w32 = self._kept[gate] = gate.weight.float()
        return F.linear(flat.float(), w32)

    def moe(self, x: torch.Tensor, experts, routing: Routing, shared, x_quant: tuple | None = None) -> torch.Tensor:
        gp, up, dp = experts.gate_proj, experts.up_proj, experts.down_proj
        if not (gp.is_fp8 and use_triton(x)):
            return super().moe(x, experts, routing, shared)
        weights, indices = routing.weights, routing.indices
        t, dim = x.shape
        rows = t * indices.shape[1]
        cfg = self._grouped(rows, gp, experts.num_experts)
        if rows > 256:
            return self._moe_prefill(x, experts, routing, shared, cfg)
        # Decode: one launch sorts the rows by expert; gate/up read the tokens through `token`,
        # and down is fused with the routing weights and the combine (fp32 atomics).
        offsets, tile_end, token, w_sorted = sort_by_expert(indices, weights, experts.num_experts, cfg["BLOCK_M"])
        sched = (offsets, tile_end)
        # Two-term FP8 of x, shared with the shared expert; usually made by the norm before.
        aq = x_quant or act_quant(x, split=True)
        h = grouped_w8a8(x, gp.weight, gp.weight_scale_inv, None, num_rows=rows, mode="gated", rows=token,
                         w2=up.weight, w2_s=up.weight_scale_inv, config=cfg, schedule=sched, a_quant=aq)
        out = torch.zeros(t, dim, dtype=torch.float32, device=x.device)
        down_cfg = self._grouped(rows, dp, experts.num_experts)
        assert down_cfg["BLOCK_M"] == cfg["BLOCK_M"]  # the schedule is per BLOCK_M
        grouped_w8a8(h, dp.weight, dp.weight_scale_inv, None, num_rows=rows, mode="scatter", out=out,
                     scatter=token, weight=w_sorted, config=down_cfg, schedule=sched)
        if shared is not None:
            if self._fp8_mlp(shared, x) and t <= self.tuning.swiglu_grouped_max_rows:
                d = shared.down_proj
                grouped_w8a8(self._gate_up(x, shared, aq), d.weight.unsqueeze(0), d.weight_scale_inv.unsqueeze(0),
                             None, num_rows=t, mode="scatter", out=out, config=self._grouped(t, d))
            else:  # past the table's switch, or a non-FP8 shared expert: the dense-MLP path, in fp32
                out += self.swiglu(x, shared).float()
        return out.to(x.dtype)

    def _moe_prefill(self, x, experts, routing: Routing, shared, cfg: dict) -> torch.Tensor:
        gp, up, dp = experts.gate_proj, experts.up_proj, experts.down_proj
        rows = routing.indices.numel()
        order, counts = sort_by_expert_order(routing.indices, experts.num_experts)
        token = (order // routing.indices.shape[1]).to(torch.int32)
        # Quantize the tokens once; the gated launch gathers rows from it.
        h = grouped_w8a8(x, gp.weight, gp.weight_scale_inv, counts, num_rows=rows, mode="gated", rows=token,
                         w2=up.weight, w2_s=up.weight_scale_inv, config=cfg, a_quant=act_quant(x))
        # 117M fp32 atomics per layer would cost more than the GEMM: store, then one pass
        # un-sorts, weights and sums the k outputs per token and adds the shared expert.
        y = grouped_w8a8(h, dp.weight, dp.weight_scale_inv, counts, num_rows=rows,
                         config=self._grouped(rows, dp, experts.num_experts, down=True))
        inv = torch.empty_like(order)
        inv[order] = torch.arange(rows, device=x.device)  # pair (token, slot) -> sorted row
        return combine(y, inv, routing.weights, self.swiglu(x, shared) if shared is not None else None)

    # -- norms and attention ------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, norm, residual: torch.Tensor | None = None,
                 quantize: bool = False) -> Normed:
        """One launch; with ``quantize`` at decode sizes, where the dense MLP's or shared expert's
        grouped gate/up takes two-term FP8 (``swiglu_grouped_max_rows``; the MoE's decode launches
        too, at fewer rows still), the same launch writes the two FP8 terms of the output, returned
        as ``quant``; past it no consumer reads them."""
        if not use_triton(x):
            return super().rms_norm(x, norm, residual)
        rows = x.numel() // x.shape[-1]
        if quantize and rows <= self.tuning.swiglu_grouped_max_rows:
            y, h, terms = rms_norm_split_quant(x, norm.weight, norm.eps, residual=residual)
        else:
            (y, h), terms = rms_norm(x, norm.weight, norm.eps, residual=residual), None
        return Normed(y, x if h is None else h, terms)

    def store_latents(self, kv_a: torch.Tensor, norm, batch, layer: int) -> None:
        if batch.slots is None or not use_triton(kv_a):
            return super().store_latents(kv_a, norm, batch, layer)
        c_kv, k_pe = batch.cache.flat(layer)
        latent_store(kv_a.reshape(-1, kv_a.shape[-1]), norm.weight, norm.eps, batch.cos.flatten(0, 1),
                     batch.sin.flatten(0, 1), batch.slots, c_kv, k_pe)

    def concat_heads(self, nope, pe, rope=None):
        return concat_heads(nope, pe, rope) if use_triton(nope) else super().concat_heads(nope, pe, rope)

    def mla_decode(self, q_lat: torch.Tensor, q_pe: torch.Tensor, batch, layer: int, scale: float) -> torch.Tensor:
        """One token per row on a paged cache: the paged latent kernel, which rotates q_pe in
        its prologue, reads each row's length from ``positions`` on the device and walks the
        block table itself: nothing depends on ``kv_len``, so the step replays from a CUDA graph."""
        cache = batch.cache
        if q_lat.shape[1] != 1 or cache.block_tables is None or not use_triton(q_lat):
            return super().mla_decode(q_lat, q_pe, batch, layer, scale)
        c_kv, k_pe = cache.flat(layer)
        block_h, warps, block_n = mla_config(q_lat.shape[0], q_lat.shape[2], self.tuning)
        out = mla_decode(q_lat[:, 0], c_kv, k_pe, cache.block_tables, batch.positions[:, 0], cache.block_size,
                         scale, rope=(batch.cos[:, 0], batch.sin[:, 0]), lens_from_positions=True, q_pe=q_pe[:, 0],
                         block_h=block_h, num_warps=warps, block_n=block_n)
        return out.unsqueeze(1)
