"""Host <-> device copies that never wait for the GPU's queue.

``torch.tensor(data, device="cuda")`` and ``t.tolist()`` on a CUDA tensor synchronize the
stream: the host waits until every kernel queued before them has run. The engine's overlapped
step (engine/engine.py) queues step n+1 before it reads step n's tokens, so its copies must go
through pinned host memory with ``non_blocking=True``; the CUDA caching host allocator keeps a
pinned buffer alive until the copy that reads it has run.
"""

from __future__ import annotations

import torch


def upload(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or nested list) as a tensor on ``device``, queued without a stream sync."""
    return to_device(torch.tensor(data, dtype=dtype), device)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``, queued without a stream sync."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def download(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied to (pinned) host memory, queued: read it only after an event recorded later
    on the stream has completed (or on the CPU, at once)."""
    return t.to("cpu", non_blocking=True)
