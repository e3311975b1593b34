"""Load a sharded safetensors checkpoint into :class:`~model_host.model.DeepseekV3`.

* The index (``model.safetensors.index.json``) maps tensor names to shards; every shard is
  opened memory-mapped and tensors are copied out one at a time, so peak RAM stays near the
  model's own size.
* Before any data is read, every tensor's name, shape and dtype is checked against the layout
  the config implies (:mod:`model_host.spec`); all problems are reported in one error.
* FP8 projections stay FP8 (+ ``weight_scale_inv``) inside :class:`~model_host.fp8.Linear`
  unless ``fp8="dequantize"``; routed experts are stacked into ``[E, out, in]`` at load time.
* The MTP layer (index ``num_hidden_layers``) is optional; its ``embed_tokens`` and
  ``shared_head.head`` copies are shared with the main model's when they are equal.
* Under tensor / expert parallelism (``parallel`` = this rank's :class:`DistContext`) each
  rank reads only its slices (:mod:`model_host.sharding`) through ``get_slice``, so only those
  bytes of the memory-mapped shards are touched and host memory stays near the rank's share.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import ModelConfig
from .dist import DistContext
from .fp8 import FP8_DTYPE, block_dequantize
from .model import DeepseekV3
from .ops import Ops
from .parallel import parallelize
from .sharding import Layout, Shard
from .spec import TensorSpec, checkpoint_layout

log = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """The checkpoint directory does not match what its config.json implies."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from safetensors headers only."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def scan_checkpoint(ckpt_dir: str | Path) -> dict[str, TensorInfo]:
    """Name -> (shard, shape, dtype) for every tensor, from headers only (no tensor data read)."""
    root = Path(ckpt_dir)
    index = root / INDEX_FILE
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
        weight_map = {}
        if not files:
            raise CheckpointError(f"{root}: no {INDEX_FILE} and no *.safetensors files")
    infos: dict[str, TensorInfo] = {}
    for fname in files:
        path = root / fname
        if not path.exists():
            raise CheckpointError(f"{root}: shard {fname} listed in {INDEX_FILE} does not exist")
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                sl = f.get_slice(name)
                infos[name] = TensorInfo(path, tuple(sl.get_shape()), sl.get_dtype())
    listed_missing = [n for n, fn in weight_map.items() if n not in infos or infos[n].file.name != fn]
    if listed_missing:
        raise CheckpointError(
            f"{root}: {len(listed_missing)} tensors listed in {INDEX_FILE} are not in their shard: "
            + ", ".join(listed_missing[:_MAX_LISTED])
        )
    return infos


def _layer_of(name: str) -> int | None:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _is_mtp_name(cfg: ModelConfig, name: str) -> bool:
    layer = _layer_of(name)
    return layer is not None and layer >= cfg.num_hidden_layers


def validate_checkpoint(
    ckpt_dir: str | Path, cfg: ModelConfig | None = None, *, load_mtp: bool = False
) -> tuple[tuple[TensorSpec, ...], dict[str, TensorInfo]]:
    """Check names, shapes and dtypes of every tensor without reading tensor data.

    MTP tensors are required only with ``load_mtp``; otherwise they are ignored if present.
    Raises :class:`CheckpointError` listing everything missing, unexpected, misshaped or of the
    wrong dtype.  Returns the specs to load and the header info.
    """
    cfg = cfg or ModelConfig.from_json(ckpt_dir)
    infos = scan_checkpoint(ckpt_dir)
    if load_mtp and not cfg.num_nextn_predict_layers:
        raise CheckpointError("load_mtp=True but config.json has num_nextn_predict_layers=0")
    specs = checkpoint_layout(cfg, include_mtp=load_mtp)
    expected = {s.name: s for s in specs}
    missing = [n for n in expected if n not in infos]
    unexpected = [n for n in infos if n not in expected and not _is_mtp_name(cfg, n)]
    if load_mtp:
        unexpected += [n for n in infos if n not in expected and _is_mtp_name(cfg, n)]
    misshaped, wrong_dtype = [], []
    for name, spec in expected.items():
        info = infos.get(name)
        if info is None:
            continue
        if info.shape != spec.shape:
            misshaped.append(f"{name}: shape {list(info.shape)}, expected {list(spec.shape)}")
        if info.dtype not in spec.allowed_dtypes:
            wrong_dtype.append(f"{name}: dtype {info.dtype}, expected {' or '.join(spec.allowed_dtypes)}")
    problems = {
        "missing": missing,
        "unexpected": unexpected,
        "misshaped": misshaped,
        "wrong dtype": wrong_dtype,
    }
    if any(problems.values()):
        counts = ", ".join(f"{len(v)} {k}" for k, v in problems.items())
        lines = [f"checkpoint {ckpt_dir} does not match its config: {counts}"]
        for kind, items in problems.items():
            for item in items[:_MAX_LISTED]:
                lines.append(f"  {kind}: {item}")
            if len(items) > _MAX_LISTED:
                lines.append(f"  {kind}: ... and {len(items) - _MAX_LISTED} more")
        raise CheckpointError("\n".join(lines))
    return specs, infos


def _set_param(model: nn.Module, target: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = target.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf not in module._parameters:
        raise CheckpointError(f"model has no parameter {target}")
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _equal_tables(a: torch.Tensor, b: torch.Tensor, rows_per_chunk: int = 4096) -> bool:
    """Exact equality of a checkpoint table and a loaded one, compared chunk by chunk.

    Chunks keep the extra memory to a few MB even for V3's [129280, 7168] tables.
    """
    if a.shape != b.shape:
        return False
    for start in range(0, a.shape[0], rows_per_chunk):
        chunk = a[start : start + rows_per_chunk].to(b.device, b.dtype)
        if not torch.equal(chunk, b[start : start + rows_per_chunk]):
            return False
    return True


def _read_shard(handle, name: str, shard: Shard) -> torch.Tensor:
    """This rank's part of tensor ``name``: only its rows / columns are read from the mmap."""
    if shard.dim is None:
        return handle.get_tensor(name)
    cut = slice(shard.start, shard.stop)
    return handle.get_slice(name)[cut] if shard.dim == 0 else handle.get_slice(name)[:, cut]


def load_model(
    ckpt_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    load_mtp: bool = False,
    fp8: str = "keep",
    max_layers: int | None = None,
    ops: Ops | None = None,
    parallel: DistContext | None = None,
) -> DeepseekV3:
    """Validate and load a checkpoint directory.

    device/dtype: where and in which dtype non-FP8 weights live (activations use ``dtype``).
    load_mtp:     also load the MTP layer (needs ``num_nextn_predict_layers`` = 1).
    fp8:          "keep" (FP8 weight + scale in each Linear, dequantized per ops policy) or
                  "dequantize" (convert to ``dtype`` at load time).
    max_layers:   load only the first N decoder layers (debugging big checkpoints on small
                  machines); the rest are validated but not read.
    ops:          the kernels the model calls (default :class:`~model_host.ops.TorchOps`).
    parallel:     this rank's process group: load its tensor / expert-parallel share only
                  (default: the whole model, one process).
    """
    if fp8 not in ("keep", "dequantize"):
        raise ValueError(f"fp8={fp8!r} (expected 'keep' or 'dequantize')")
    t0 = time.perf_counter()
    cfg = ModelConfig.from_json(ckpt_dir)
    specs, infos = validate_checkpoint(ckpt_dir, cfg, load_mtp=load_mtp)
    model_cfg = cfg
    if fp8 == "dequantize":
        model_cfg = model_cfg.replace(quantization=None)
    if max_layers is not None:
        if load_mtp:
            raise ValueError("max_layers cannot be combined with load_mtp")
        specs = tuple(s for s in specs if _layer_of(s.name) is None or _layer_of(s.name) < max_layers)
        model_cfg = model_cfg.replace(num_hidden_layers=max_layers)
    device = torch.device(device)
    ctx = parallel or DistContext()
    layout = Layout(cfg, ctx.rank, ctx.world)
    shards = {s.name: layout.shard(s) for s in specs}
    specs = tuple(s for s in specs if shards[s.name] is not None)  # other ranks' experts
    model = parallelize(DeepseekV3(model_cfg, with_mtp=load_mtp, dtype=dtype, device="meta", ops=ops), ctx)
    params = dict(model.named_parameters())

    # Stacked expert tensors are allocated once and filled slot by slot.
    stacked: dict[str, torch.Tensor] = {}
    for s in specs:
        if s.kind == "scale" and fp8 == "dequantize":
            continue  # folded into the weight at load time
        if s.expert is not None and s.target not in stacked:
            p = params[s.target]
            pdtype = p.dtype if p.dtype in (FP8_DTYPE, torch.float32) else dtype
            stacked[s.target] = torch.empty(p.shape, dtype=pdtype, device=device)

    # MTP copies of the embedding / head go last: they may be tied to the globals.
    mtp_shared = {
        "mtp.0.embed_tokens.weight": "embed_tokens.weight",
        "mtp.0.shared_head.head.weight": "lm_head.weight",
    }
    by_file: dict[Path, list[TensorSpec]] = defaultdict(list)
    deferred = []
    for s in specs:
        if s.kind == "scale" and fp8 == "dequantize":
            continue  # consumed together with its weight
        (deferred if s.target in mtp_shared else by_file[infos[s.name].file]).append(s)

    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def read(name: str) -> torch.Tensor:
            path = infos[name].file
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            return _read_shard(handles[path], name, shards[name])

        def convert(s: TensorSpec, t: torch.Tensor) -> torch.Tensor:
            if s.fp8:
                if fp8 == "dequantize":
                    return block_dequantize(
                        t, read(s.name + "_scale_inv"), cfg.quantization.block_size, dtype
                    )
                return t
            if s.kind in ("scale", "bias"):
                return t.to(torch.float32)  # scales and the routing bias stay fp32
            return t.to(dtype)

        for path in sorted(by_file):
            for s in sorted(by_file[path], key=lambda s: s.name):
                t = convert(s, read(s.name))
                if s.expert is None:
                    _set_param(model, s.target, t.to(device))
                else:
                    stacked[s.target][layout.local_expert(s.expert)].copy_(t)
                del t
        for target, t in stacked.items():
            _set_param(model, target, t)
        for s in deferred:
            t = read(s.name)
            glob = model.get_parameter(mtp_shared[s.target])
            if _equal_tables(t, glob):
                _set_param(model, s.target, glob.data)  # tie: no second copy of a [V, D] table
            else:
                log.info("%s differs from %s; loading a separate copy", s.name, mtp_shared[s.target])
                _set_param(model, s.target, convert(s, t).to(device))

    model.rotary.to(device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"parameters not loaded: {leftover[:_MAX_LISTED]}")
    model.eval()
    log.info("loaded %s in %.1fs", ckpt_dir, time.perf_counter() - t0)
    return model
