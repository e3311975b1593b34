"""GPU diagnostic (issue 16/18): are the engine's tokens what the model computes?

Teacher-forced: the engine generates with logprobs=5
one plain forward over each emitted sequence
gives the reference row at every position
the error is the largest difference of (logprob of a
top-5 token - logprob of the top token) between the two, in standard deviations of the reference
row. Precision noise of the FP8 regimes is ~0.03-0.1 sd
a paging, masking or packing defect is
order 1 sd. Prints (prefill-token error, worst error) per sequence for solo / chunked / packed
prefill, and speculative decoding with forced drafts.

    python3 bench/prefill_logprob_diag.py            # on a GPU
    python3 bench/prefill_logprob_diag.py --bisect   # the same with groups of TritonOps swapped for TorchOps
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.spec_bench import oracle_drafter
from model_host.checkpoint import make_config, write_random_checkpoint
from model_host.engine.engine import Engine, EngineConfig
from model_host.kernels.backend import TritonOps
from model_host.loader import load_model
from model_host.ops import TorchOps
from model_host.sampler import SamplingParams
from model_host.tokenizer import Tokenizer
from tests.gpu.test_serving_gpu import _chats


def run(model, tok, prompts, cfg, together=True, drafter=None, n=12):
    params = SamplingParams(max_tokens=n, ignore_eos=True, logprobs=5)
    eng = Engine(model, tok, cfg, drafter=drafter) if drafter else Engine(model, tok, cfg)
    got = {}
    groups = [prompts] if together else [[p] for p in prompts]
    seqs = []
    for g in groups:
        ss = [eng.add(p, params) for p in g]
        seqs += ss
        while eng.has_work:
            for o in eng.step():
                if o.token is not None:
                    got.setdefault(o.seq.id, []).append((o.token, o.logprob))
    out = [got[s.id] for s in seqs]
    del eng
    torch.cuda.empty_cache()
    return out

def score(model, prompts, outs):
    worst_err, worst_gap = 0.0, 0.0
    per = []
    for p, toks in zip(prompts, outs, strict=True):
        ids = p + [t for t, _ in toks]
        with torch.no_grad():
            ref = model(torch.tensor([ids], device=model.device)).logits[0].float()
        e_max, g_max, e_first = 0.0, 0.0, None
        for j, (t, lp) in enumerate(toks):
            r = ref[len(p) - 1 + j]
            sd = r.std().item() or 1.0
            top = lp.top
            t0, l0 = top[0]
            for ti, li in top[1:]:
                e = abs((li - l0) - (r[ti] - r[t0]).item()) / sd
                e_max = max(e_max, e)
            g = (r.max() - r[t]).item() / sd
            g_max = max(g_max, g)
            if e_first is None:
                e_first = e_max  # the prefill's token
        per.append((round(e_first, 3), round(e_max, 3)))
        worst_err, worst_gap = max(worst_err, e_max), max(worst_gap, g_max)
    return worst_err, worst_gap, per

def main():
    d = Path(tempfile.mkdtemp())
    cfg = make_config("tiny", mtp=False, hidden_size=256, num_experts_per_tok=16, topk_group=4)
    write_random_checkpoint(d / "a", cfg, dtype="fp8", seed=11)
    model = load_model(d / "a", device="cuda", dtype=torch.bfloat16, ops=TritonOps())
    tok = Tokenizer(d / "a")
    prompts = [tok.encode_chat(c) for c in _chats()]
    print("prompt lens", [len(p) for p in prompts])
    for name, ec, tog in [
        ("solo, unchunked", EngineConfig(max_batch=8, kv_memory_gb=0.05, max_prefill_tokens=4096, max_model_len=4096), False),
        ("solo, chunk 64", EngineConfig(max_batch=8, kv_memory_gb=0.05, max_prefill_tokens=64, max_model_len=4096), False),
        ("8 together, chunk 64 (the test)", EngineConfig(max_batch=8, kv_memory_gb=0.05, max_prefill_tokens=64, max_model_len=4096), True),
        ("8 together, unchunked", EngineConfig(max_batch=8, kv_memory_gb=0.05, max_prefill_tokens=4096, max_model_len=4096), True),
    ]:
        outs = run(model, tok, prompts, ec, tog)
        e, g, per = score(model, prompts, outs)
        print(f"{name}: worst top-5 logit-diff error {e:.3f} sd, worst chosen-token gap to ref top {g:.3f} sd, (prefill-token, worst) per seq {per}", flush=True)
    del model
    torch.cuda.empty_cache()
    cfg = make_config("tiny", hidden_size=256, num_experts_per_tok=16, topk_group=4)
    write_random_checkpoint(d / "b", cfg, dtype="fp8", seed=7)
    model = load_model(d / "b", device="cuda", dtype=torch.bfloat16, ops=TritonOps(), load_mtp=True)
    tok = Tokenizer(d / "b")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 17, 40, 9)]
    for k in (0, 1, 2):
        ec = EngineConfig(max_batch=4, kv_memory_gb=0.05, block_size=16, speculative_tokens=k)
        outs = run(model, tok, prompts, ec, True, drafter=oracle_drafter() if k else None, n=24)
        e, gp, per = score(model, prompts, outs)
        print(f"spec k={k}, batch 4: worst top-5 error {e:.3f} sd, worst chosen gap {gp:.3f} sd, (prefill-token, worst) per seq {per}", flush=True)


GROUPS = {"triton (all)": [], "store_latents": ["store_latents"], "concat_heads": ["concat_heads"],
          "route": ["route"], "linear only": ["linear"], "norm+linears": ["rms_norm", "linear", "linears", "dense_weight"]}


def bisect():
    """Swap groups of TritonOps for TorchOps' and see which one removes the error."""
    d = Path(tempfile.mkdtemp())
    cfg = make_config("tiny", mtp=False, hidden_size=256, num_experts_per_tok=16, topk_group=4)
    write_random_checkpoint(d / "a", cfg, dtype="fp8", seed=11)
    tok = Tokenizer(d / "a")
    prompts = [tok.encode_chat(c) for c in _chats()]
    for name, ops_names in GROUPS.items():
        cls = type("Mixed", (TritonOps,), {n: getattr(TorchOps, n) for n in ops_names})
        model = load_model(d / "a", device="cuda", dtype=torch.bfloat16, ops=cls())
        res = []
        for cname, ec, tog in [("8 together unchunked", EngineConfig(max_batch=8, kv_memory_gb=0.05, max_prefill_tokens=4096, max_model_len=4096), True),
                               ("solo chunk 64", EngineConfig(max_batch=8, kv_memory_gb=0.05, max_prefill_tokens=64, max_model_len=4096), False)]:
            e, g, per = score(model, prompts, run(model, tok, prompts, ec, tog))
            res.append(f"{cname}: worst {e:.3f} sd, (prefill-token, worst) per seq {per}")
        print(f"{name}: " + " | ".join(res), flush=True)
        model = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    bisect() if "--bisect" in sys.argv else main()
