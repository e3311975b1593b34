"""Kernel launch configurations as data: one JSON table per GPU model in ``tables/``.

:func:`load_tuning` reads the table of the current GPU once (``tables/<gpu>.json``, e.g.
``h200.json`` for an "NVIDIA H200"; ``h200.json`` where there is no table of its own) into a
frozen :class:`Tuning`, which :class:`~.backend.TritonOps` hands to every launcher.  A sweep
(``bench/decode_bench.py --tune``) builds candidate :class:`Tuning` values with
:func:`dataclasses.replace` and writes the winner as a new table file (:func:`write_table`);
nothing is patched at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

TABLES = Path(__file__).with_name("tables")
DEFAULT_TABLE = "h200"


@dataclass(frozen=True)
class Tuning:
    """scaled_mm_min_m: rows from which dense FP8 GEMMs go to cuBLASLt (Triton below).
    small_m: Triton tensor-core tiles for M <= 256 (N tile, warps, stages, split-K waves).
    gemv: the CUDA-core one-row GEMV, for M <= ``max_m`` (0: never).
    grouped_decode / grouped_prefill / grouped_prefill_down: the grouped MoE launches.
    mla_decode: the paged MLA kernel's heads per program, warps and key block, narrow for few query rows
    and wide from ``wide_min_rows`` (larger decode batches, and eager steps where prompt chunks
    ride as rows).
    swiglu_grouped_max_rows: rows up to which a dense MLP or shared expert runs gate and up as one
    grouped launch on two-term FP8 activations (16-row tiles, bf16 precision); past it, as two
    GEMMs on one FP8 term, as prefill does. A precision switch (``TritonOps.precision_switches``):
    a power of two up to 256, so that no captured decode or prefill size pads across it."""

    scaled_mm_min_m: int
    small_m: dict
    gemv: dict
    grouped_decode: dict
    grouped_prefill: dict
    grouped_prefill_down: dict
    mla_decode: dict
    swiglu_grouped_max_rows: int = 256

    def __post_init__(self) -> None:  # frozen all the way down: the tables are read-only
        v = self.swiglu_grouped_max_rows
        if not (16 <= v <= 256 and v & (v - 1) == 0):  # decode graphs pad to powers of two,
            # prefill graphs start past 256 rows: neither may pad a step across this switch
            raise ValueError(f"swiglu_grouped_max_rows={v!r}: use a power of two from 16 to 256")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                object.__setattr__(self, f.name, _Frozen(v))

    def to_json(self) -> str:
        return json.dumps({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}, indent=2)


class _Frozen(dict):
    """A read-only dict (lists become tuples), hashable so configs can key caches."""

    def __init__(self, d: dict) -> None:
        super().__init__({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def _readonly(self, *_a, **_k):
        raise TypeError("tuning tables are read-only: build a new Tuning with dataclasses.replace")

    __setitem__ = __delitem__ = update = clear = pop = setdefault = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def _plain(v):
    return {k: list(x) if isinstance(x, tuple) else x for k, x in v.items()} if isinstance(v, dict) else v


def mla_config(rows: int, heads: int, tuning: Tuning) -> tuple[int, int, int]:
    """(heads per program, warps, keys per iteration) of the paged MLA kernel for a step of
    ``rows`` query rows of ``heads`` heads. Few rows want many programs (narrow head blocks);
    many rows, as in an eager step where prompt chunks ride, want each program to read a row's
    keys for more heads at once, and wider key blocks (fewer online-softmax rescales of the
    [heads, 512] accumulator). A block never exceeds the heads there are (a rank's share under
    --tp), nor goes under 16 (the smallest MMA)."""
    t = tuning.mla_decode
    key = "wide" if rows >= t["wide_min_rows"] else "narrow"
    return (min(t[key + "_block_h"], max(16, 1 << (heads - 1).bit_length())), t[key + "_num_warps"],
            t.get(key + "_block_n", 32))


def gpu_key(name: str) -> str:
    """Table name of a device name: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100"."""
    m = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    return m.group(1).lower() if m else DEFAULT_TABLE


def read_table(path: Path) -> Tuning:
    data = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    try:
        return Tuning(**data)
    except TypeError as e:
        raise ValueError(f"{path}: {e}; fields are {[f.name for f in dataclasses.fields(Tuning)]}") from None


@functools.lru_cache(maxsize=4)
def load_tuning(gpu: str | None = None) -> Tuning:
    """The table of ``gpu`` (default: CUDA device 0's name), read once per process."""
    if gpu is None:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else DEFAULT_TABLE
    path = TABLES / f"{gpu_key(gpu)}.json"
    return read_table(path if path.exists() else TABLES / f"{DEFAULT_TABLE}.json")


def write_table(tuning: Tuning, directory: Path, gpu: str) -> Path:
    """Write ``tuning`` as ``<directory>/<gpu key>.json`` (copy it into ``tables/`` to adopt it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{gpu_key(gpu)}.json"
    path.write_text(tuning.to_json() + "\n")
    return path
