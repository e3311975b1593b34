"""Shared fixtures for model_host tests: small random checkpoints written by our own writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_host.checkpoint import make_config, write_random_checkpoint
from model_host.loader import load_model


@pytest.fixture(autouse=True)
def _single_thread():
    """Run model_host tests on one intra-op thread, restoring the setting afterwards.

    The models here are tiny: each op is microseconds of work, and OpenMP's thread hand-off
    dominates (20 ms vs 500+ ms per decode step when the 2-core machine is shared).
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The `tiny` preset (real 129280 vocab, 3 layers: 1 dense + 2 MoE, MTP) in BF16."""
    out = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(out, make_config("tiny"), dtype="bf16", seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    """`tiny` loaded in float32 with its MTP layer."""
    torch.manual_seed(0)
    return load_model(tiny_ckpt, dtype=torch.float32, load_mtp=True)


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt):
    from model_host.tokenizer import Tokenizer

    return Tokenizer(tiny_ckpt)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> Path:
    """A small-vocab (1024) tiny model in BF16, no MTP: fast for numerics tests."""
    out = tmp_path_factory.mktemp("small")
    write_random_checkpoint(
        out, make_config("tiny", vocab_size=1024, mtp=False), dtype="bf16", tokenizer=False
    )
    return out


@pytest.fixture(scope="session")
def small_model(small_ckpt):
    return load_model(small_ckpt, dtype=torch.float32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: an elementwise relative error that ignores near-zero entries' noise."""
    return ((a - b).abs().max() / b.abs().max()).item()
