"""Small building blocks: RMSNorm's parameters (the norm is :meth:`model_host.ops.Ops.rms_norm`)
and the token embedding (the LM head is a plain Linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm's ``weight`` and ``eps``; statistics in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

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
