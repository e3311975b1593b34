"""GPU kernels for the DeepSeek-V3 runtime (issue 7), each with a pure-PyTorch reference path.

* :mod:`.fp8_linear`  - W8A8 block-scaled FP8 GEMM (per-token x 128-channel activation scales,
  128x128 weight scales, fp32 promotion every 128 K) in Triton, plus ``torch._scaled_mm``;
  :mod:`.fp8_gemv` - the one-row (batch 1) decode GEMV on CUDA cores.
* :mod:`.moe_grouped` - grouped FP8 GEMM over expert-sorted tokens: one launch per projection,
  gate+up fused with SiLU-mul, down fused with the routing-weight scatter-add.
* :mod:`.mla_decode`  - absorbed MLA decode attention straight from the paged latent cache
  (FlashMLA-style: MQA over 576-dim latents, split-KV + log-sum-exp merge).
* :mod:`.norm_rope`   - RMSNorm (+ residual add), MLA's latent store (norm + rope + paged
  write) and prefill's [nope | rope] query / key assembly, one launch each.
* :mod:`.routing`     - the noaux_tc expert choice, the sort of rows by expert, and prefill's
  weighted combine of the expert outputs.
* :mod:`.backend`     - :class:`~.backend.TritonOps`, the :class:`~model_host.ops.Ops` interface
  on these kernels (``model.ops = TritonOps()``).
* :mod:`.tuning`      - launch configurations, one JSON table per GPU model in ``tables/``.
* :mod:`.graphs`      - CUDA-graph capture of the decode step per batch-size bucket.

Every public kernel entry point falls back to its reference on CPU tensors or when Triton is
missing, so CI (CPU only) exercises the same call sites.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU CI usually has none.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


# TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors (numpy interpreter): slow, but it
# lets a machine without a GPU check the kernels' indexing and masking.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can run on these tensors (CUDA + Triton, or the interpreter)."""
    return HAS_TRITON and (INTERPRET or all(t.is_cuda for t in tensors))
