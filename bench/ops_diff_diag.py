"""GPU diagnostic: every TritonOps call of an engine run checked against a reference on the same inputs.

Each op of :class:`~model_host.kernels.backend.TritonOps` is recomputed by
:class:`~model_host.ops.TorchOps` (``mla_prefill`` by an fp32 manual attention; ``store_latents``
by comparing the layer's whole cache before and after, so a write outside its slots shows), and
the worst relative error per (phase, op) is printed with the shapes where it happened. FP8
activation noise is ~0.03-0.05 for GEMMs, < 0.01 for the rest; a defect is order 1. Graphs off.
Found the FP8 GEMM shape defects of docs/gpu_notes.md ("Causes").

    python3 bench/ops_diff_diag.py
"""
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.prefill_logprob_diag import run, score
from model_host.checkpoint import make_config, write_random_checkpoint
from model_host.engine.engine import EngineConfig
from model_host.kernels.backend import TritonOps
from model_host.kernels.norm_rope import concat_heads_reference, latent_store_reference
from model_host.loader import load_model
from model_host.ops import TorchOps
from model_host.tokenizer import Tokenizer
from tests.gpu.test_serving_gpu import _chats


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / (b.abs().max() + 1e-6)).item() if b.numel() else 0.0


def manual_attention(q, k, v, cu_q, cu_k, scale) -> torch.Tensor:
    """fp32 attention per packed sequence, queries the last of its keys (bottom-right causal)."""
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for q0, q1, k0, k1 in zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True):
        lq, lk = q1 - q0, k1 - k0
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k[k0:k1].float()) * scale
        visible = torch.arange(lk, device=q.device) <= torch.arange(lk - lq, lk, device=q.device)[:, None]
        out[q0:q1] = torch.einsum("hqk,khd->qhd", s.masked_fill(~visible, float("-inf")).softmax(-1),
                                  v[k0:k1].float())
    return out


class DiffOps(TritonOps):
    """TritonOps whose every call is also computed by the reference and logged per (tag, op)."""

    tag = "?"

    def __init__(self) -> None:
        super().__init__()
        self.ref = TorchOps(cache_dequantized=True)
        self.log = defaultdict(lambda: [0, 0.0, ""])  # (tag, op) -> [calls, worst error, where]

    def note(self, op: str, e: float, where) -> None:
        r = self.log[(self.tag, op)]
        r[0] += 1
        if e > r[1]:
            r[1], r[2] = e, where

    def linear(self, x, layer):
        y = super().linear(x, layer)
        self.note("linear", err(y, self.ref.linear(x, layer)), tuple(x.shape))
        return y

    def linears(self, x, layers):
        ys = super().linears(x, layers)
        for y, lin in zip(ys, layers, strict=True):
            self.note("linears", err(y, self.ref.linear(x, lin)), tuple(x.shape))
        return ys

    def swiglu(self, x, mlp, x_quant=None):
        y = super().swiglu(x, mlp, x_quant)
        self.note("swiglu", err(y, self.ref.swiglu(x, mlp)), tuple(x.shape))
        return y

    def route(self, x, gate):
        r, rr = super().route(x, gate), self.ref.route(x, gate)
        same = (r.indices.sort(-1).values == rr.indices.sort(-1).values).all(-1).float().mean().item()
        self.note("route (1 - same)", 1 - same, tuple(x.shape))
        return r

    def moe(self, x, experts, routing, shared, x_quant=None):
        y = super().moe(x, experts, routing, shared, x_quant)
        self.note("moe", err(y, self.ref.moe(x, experts, routing, shared)), tuple(x.shape))
        return y

    def rms_norm(self, x, norm, residual=None, quantize=False):
        n, r = super().rms_norm(x, norm, residual, quantize), self.ref.rms_norm(x, norm, residual)
        self.note("rms_norm", max(err(n.out, r.out), err(n.residual, r.residual)), tuple(x.shape))
        return n

    def concat_heads(self, nope, pe, rope=None):
        y = super().concat_heads(nope, pe, rope)
        where = f"{tuple(nope.shape)} {nope.stride()} pe {tuple(pe.shape)} {pe.stride()}"
        self.note("concat_heads(q)" if rope else "concat_heads(k)", err(y, concat_heads_reference(nope, pe, rope)),
                  where)
        return y

    def store_latents(self, kv_a, norm, batch, layer):
        if batch.slots is None:
            return super().store_latents(kv_a, norm, batch, layer)
        c_all, pe_all = batch.cache.flat(layer)
        c_ref, pe_ref = c_all.clone(), pe_all.clone()
        super().store_latents(kv_a, norm, batch, layer)
        latent_store_reference(kv_a.reshape(-1, kv_a.shape[-1]), norm.weight, norm.eps, batch.cos.flatten(0, 1),
                               batch.sin.flatten(0, 1), batch.slots, c_ref, pe_ref)
        self.note("store_latents", max(err(c_all, c_ref), err(pe_all, pe_ref)),
                  f"kv_a {tuple(kv_a.shape)} {kv_a.stride()}, {batch.slots.numel()} slots")
        return None

    def mla_decode(self, q_lat, q_pe, batch, layer, scale):
        y = super().mla_decode(q_lat, q_pe, batch, layer, scale)
        self.note("mla_decode", err(y, self.ref.mla_decode(q_lat, q_pe, batch, layer, scale)), tuple(q_lat.shape))
        return y

    def mla_prefill(self, q, k, v, cu_q, cu_k, scale):
        y = super().mla_prefill(q, k, v, cu_q, cu_k, scale)
        self.note("mla_prefill", err(y, manual_attention(q, k, v, cu_q, cu_k, scale)),
                  f"q {tuple(q.shape)} cu_q {cu_q.tolist()[:6]} cu_k {cu_k.tolist()[:6]}")
        return y


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ["MODEL_HOST_CUDA_GRAPHS"] = "0"  # the checks sync the host: no graph capture
    d = Path(tempfile.mkdtemp())
    cfg = make_config("tiny", mtp=False, hidden_size=256, num_experts_per_tok=16, topk_group=4)
    write_random_checkpoint(d / "a", cfg, dtype="fp8", seed=11)
    tok = Tokenizer(d / "a")
    prompts = [tok.encode_chat(c) for c in _chats()]
    ops = DiffOps()
    model = load_model(d / "a", device=dev, dtype=torch.bfloat16, ops=ops)
    for name, ec, together in [
        ("8 together, unchunked", EngineConfig(max_batch=8, kv_memory_gb=0.05, max_prefill_tokens=4096,
                                               max_model_len=4096), True),
        ("solo, chunk 64", EngineConfig(max_batch=8, kv_memory_gb=0.05, max_prefill_tokens=64,
                                        max_model_len=4096), False)]:
        ops.tag = "engine"
        outs = run(model, tok, prompts, ec, together)
        ops.tag = "reference"
        e, _, per = score(model, prompts, outs)
        print(f"\n{name}: worst top-5 error {e:.3f} sd, (prefill-token, worst) per sequence {per}")
        for (tag, op), (n, worst, where) in sorted(ops.log.items()):
            print(f"  {tag:9s} {op:20s} calls {n:5d}  worst rel err {worst:.4f}  at {where}")
        ops.log.clear()


if __name__ == "__main__":
    main()
