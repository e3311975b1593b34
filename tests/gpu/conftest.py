"""Shared helpers for the GPU-kernel tests (the CPU reference checks run everywhere)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from model_host.kernels import HAS_TRITON
from model_host.kernels.tuning import load_tuning

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


def triton_only():
    """The kernel ops with every dense GEMM on our Triton kernels (no cuBLASLt from 32 rows)."""
    from model_host.kernels.backend import TritonOps

    return TritonOps(dataclasses.replace(load_tuning(), scaled_mm_min_m=1 << 62))


def route_config(experts: int, *, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
                 routed_scaling_factor: float) -> SimpleNamespace:
    """The routing fields of a ModelConfig (sigmoid scoring, noaux_tc), for the routing kernel."""
    return SimpleNamespace(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group,
                           topk_group=topk_group, topk_method="noaux_tc", scoring_func="sigmoid",
                           norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor)
