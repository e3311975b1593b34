"""Small building blocks: RMSNorm and the token embedding (the LM head is a plain Linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import get_backend


class RMSNorm(nn.Module):
    """Root-mean-square norm; statistics in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(get_backend(), "rms_norm", None)  # one GPU launch instead of casts + norm
        if fused is not None and (y := fused(x, self.weight, self.eps)) is not None:
            return y
        # fp32 statistics: bf16 sum-of-squares over 7168 channels loses ~3 significant bits.
        return F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps).to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor,
                    prequantize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, norm(h))`` with ``h = x + delta``: the residual add fused with the norm on GPUs.
        ``prequantize``: the output feeds FP8 GEMMs, so a backend may quantize it in the same pass."""
        fused = getattr(get_backend(), "add_rms_norm", None)
        if fused is not None and (out := fused(x, delta, self.weight, self.eps, quantize=prequantize)) is not None:
            return out
        h = x + delta
        return h, self(h)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class Embedding(nn.Module):
    """Token embedding table ``[vocab, hidden]`` (never FP8 in DeepSeek-V3 checkpoints)."""

    def __init__(
        self, num_embeddings: int, dim: int, *, dtype: torch.dtype | None = None, device=None
    ) -> None:
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, dim, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
