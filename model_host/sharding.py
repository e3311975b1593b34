"""Which part of each checkpoint tensor a rank holds under tensor + expert parallelism.

One rule set, used by the memory planner (:mod:`model_host.plan`), the sharded loader and the
parallel modules (:mod:`model_host.parallel`), so the three cannot disagree.  The layout is
DeepSeek's reference one:

* attention: ``q_proj`` / ``q_b_proj`` / ``kv_b_proj`` split by output rows (whole heads per
  rank), ``o_proj`` by input columns (row-parallel, all-reduced); ``q_a`` / ``kv_a`` and norms
  replicated, so the latent cache is computed and stored in full on every rank;
* dense MLP and the shared expert: ``gate``/``up`` by rows, ``down`` by columns;
* routed experts: whole experts, ``E / world`` consecutive ones per rank (expert parallel);
* ``embed_tokens`` and ``lm_head`` (and the MTP copies): vocabulary rows split;
* the router (``gate``, its bias), ``eh_proj`` and all norms: replicated.

FP8 ``weight_scale_inv`` slices follow their weight: a split must fall on a 128-row/column
block boundary, else :class:`ShardError` names the tensor and the fix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .config import ModelConfig
from .spec import TensorSpec, checkpoint_layout

_ROW_SPLIT = (
    "embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "self_attn.q_proj.weight",
    "self_attn.q_b_proj.weight", "self_attn.kv_b_proj.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
)  # fmt: skip
_COL_SPLIT = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.shared_experts.down_proj.weight")
_SCALE = "_scale_inv"


class ShardError(ValueError):
    """The model cannot be split over this many ranks (the message names the tensor and the fix)."""


@dataclass(frozen=True)
class Shard:
    """A rank's part of one tensor: ``dim`` None = the whole tensor, else ``[start, stop)`` of dim."""

    dim: int | None = None
    start: int = 0
    stop: int = 0

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return full
        s = list(full)
        s[self.dim] = self.stop - self.start
        return tuple(s)


WHOLE = Shard()


@dataclass(frozen=True)
class Layout:
    """Rank ``rank`` of ``world`` tensor/expert-parallel ranks for ``cfg``."""

    cfg: ModelConfig
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        check_divisible(self.cfg, self.world)
        if not 0 <= self.rank < self.world:
            raise ShardError(f"rank {self.rank} is outside world size {self.world}")

    # ------------------------------------------------------------------ sizes
    @property
    def heads(self) -> int:
        return self.cfg.num_attention_heads // self.world

    @property
    def vocab(self) -> int:
        return self.cfg.vocab_size // self.world

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab

    @property
    def experts(self) -> int:
        return (self.cfg.n_routed_experts or 0) // self.world

    @property
    def expert_start(self) -> int:
        return self.rank * self.experts

    def owns_expert(self, e: int) -> bool:
        return self.expert_start <= e < self.expert_start + self.experts

    # ----------------------------------------------------------------- tensors
    def shard(self, spec: TensorSpec) -> Shard | None:
        """This rank's part of ``spec``; None when another rank owns it (a routed expert)."""
        if spec.expert is not None:
            return WHOLE if self.owns_expert(spec.expert) else None
        if self.world == 1:
            return WHOLE
        base = spec.name[: -len(_SCALE)] if spec.kind == "scale" else spec.name
        dim = 0 if base.endswith(_ROW_SPLIT) else 1 if base.endswith(_COL_SPLIT) else None
        if dim is None:
            return WHOLE
        if spec.kind != "scale":
            n = spec.shape[dim] // self.world
            return Shard(dim, self.rank * n, (self.rank + 1) * n)
        # A scale entry covers a whole block: the weight's split must land on block edges.
        block = self.cfg.quantization.block_size[dim]
        n = self._weight_shapes[base][dim] // self.world
        if n % block:
            raise ShardError(
                f"{base}: {self.world} ranks split dim {dim} into {n}-wide parts, not a multiple of the "
                f"{block}-wide FP8 block; use a tensor-parallel degree that keeps {block}-aligned parts"
            )
        return Shard(dim, self.rank * n // block, (self.rank + 1) * n // block)

    @functools.cached_property
    def _weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full weight shapes by name: a scale's own shape loses the unpadded weight extent."""
        return {s.name: s.shape for s in checkpoint_layout(self.cfg, include_mtp=True)}

    def local_shape(self, spec: TensorSpec) -> tuple[int, ...] | None:
        sh = self.shard(spec)
        return None if sh is None else sh.shape(spec.shape)

    def local_expert(self, e: int) -> int:
        """Slot of global expert ``e`` in this rank's stacked expert weights."""
        return e - self.expert_start


def check_divisible(cfg: ModelConfig, world: int) -> None:
    """Raise :class:`ShardError` unless heads, vocab, experts and MLP widths split evenly."""
    if world < 1:
        raise ShardError(f"tensor-parallel degree {world} must be >= 1")
    sizes = {
        "num_attention_heads": cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
    }
    if cfg.is_moe:
        sizes["n_routed_experts"] = cfg.n_routed_experts
        sizes["moe_intermediate_size * n_shared_experts"] = cfg.moe_intermediate_size * cfg.n_shared_experts
    bad = [f"{k}={v}" for k, v in sizes.items() if v % world]
    if bad:
        raise ShardError(f"tensor-parallel degree {world} does not divide {', '.join(bad)}; choose a divisor")
