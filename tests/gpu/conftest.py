"""Shared helpers for the GPU-kernel tests (the CPU reference checks run everywhere)."""

from __future__ import annotations

import pytest
import torch

from model_host.kernels import HAS_TRITON

requires_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and Triton (none visible)"
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
