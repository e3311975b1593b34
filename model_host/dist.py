"""Process groups for tensor / expert parallelism: one process per GPU (or per CPU worker).

Two ways to start, one result (a :class:`DistContext`):

* ``torchrun`` (single or multi node): it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`from_env` reads them.
* self-spawned (``model-host serve --tp N``, one node): rank 0 is the serving process and
  :func:`spawn` starts ranks 1..N-1 with ``torch.multiprocessing`` (spawn, not fork).

The global rank picks the model shard; the local rank (this node's index) picks the GPU, so
nothing assumes a single node.  NCCL does the tensor collectives on GPUs, gloo on CPU; step
plans (Python objects) always travel over a gloo group, which needs no device memory or sync.

NVLink multicast (NVLS / symmetric-memory multicast / NVSHMEM NVLS) is never used: the three
variables in :data:`NO_MULTICAST_ENV` are forced in every process before NCCL starts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TIMEOUT = timedelta(minutes=30)  # first collectives wait for every rank to load its shard


@dataclass(frozen=True)
class Rendezvous:
    """Where and who this process is: global rank, world size, local rank, master address."""

    rank: int
    world: int
    local_rank: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


@dataclass(frozen=True)
class DistContext:
    """An initialized parallel group; ``world == 1`` means no torch.distributed at all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Any = None  # tensor collectives (NCCL on GPU, gloo on CPU)
    control: Any = None  # gloo group for step plans

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the scheduler and the HTTP server; the others follow its plans."""
        return self.rank == 0

    # ------------------------------------------------------------- collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over ranks, in place (a no-op on one rank)."""
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dim (rank order)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (pickled over the gloo control group)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def disable_multicast() -> None:
    """Force the no-NVLink-multicast settings in this process (and in children it starts)."""
    os.environ.update(NO_MULTICAST_ENV)


def from_env(env: dict[str, str] | None = None) -> Rendezvous | None:
    """The torchrun rendezvous in the environment, or None when not started by torchrun."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    return Rendezvous(
        rank=int(env["RANK"]),
        world=int(env["WORLD_SIZE"]),
        local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", "29500")),
    )


def init(rv: Rendezvous, device_type: str = "cpu") -> DistContext:
    """Join the group described by ``rv`` on ``device_type`` ("cpu" or "cuda")."""
    disable_multicast()
    if device_type == "cuda":
        torch.cuda.set_device(rv.local_rank)
        device = torch.device("cuda", rv.local_rank)
    else:
        device = torch.device("cpu")
    if rv.world == 1:
        return DistContext(device=device)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{rv.master_addr}:{rv.master_port}",
        rank=rv.rank,
        world_size=rv.world,
        timeout=TIMEOUT,
        device_id=device if device_type == "cuda" else None,
    )
    group = dist.group.WORLD
    control = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else group
    return DistContext(rv.rank, rv.world, rv.local_rank, device, group, control)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, target: Callable[..., None], args: tuple = (), port: int | None = None) -> tuple[Rendezvous, list]:
    """Start ranks 1..world-1 as child processes running ``target(rendezvous, *args)``.

    Returns rank 0's rendezvous (for the calling process) and the child processes.  The
    children inherit the no-multicast variables and set them again themselves (:func:`init`).
    """
    disable_multicast()
    port = port or free_port()
    ctx = mp.get_context("spawn")
    procs = []
    for r in range(1, world):
        p = ctx.Process(target=target, args=(Rendezvous(r, world, r, "127.0.0.1", port), *args), daemon=True)
        p.start()
        procs.append(p)
    return Rendezvous(0, world, 0, "127.0.0.1", port), procs
