"""Programmatic dependent launch (PDL, sm_90+) for the runtime's Triton kernels.

A decode step at batch 1 is ~75 short kernels, and under a CUDA graph each boundary still
costs the next grid's launch and ramp-up while the machine idles.  With PDL a kernel is
launched with ``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``: its programs may be
scheduled as soon as every program of the kernel before it has called
``griddepcontrol.launch_dependents`` (or exited), and they block in ``griddepcontrol.wait``
until that kernel has completed and its memory is visible.

The protocol every kernel here follows (:func:`gdc_enter`, first statement of the kernel):
wait before *any* global access, which keeps both read-after-write and write-after-read
hazards with the previous kernel ordered; and because a kernel cannot complete before its
wait returned, completion stays transitive along the chain (a kernel reading what two launches
earlier wrote is still safe).  Kernels of other libraries (cuBLAS, torch) launch without the
attribute and serialize as usual.  Modes (``LAUNCH["pdl"]``, env ``MODEL_HOST_PDL``):

* ``"off"``   - plain launches;
* ``"wait"``  - launched with the attribute, no explicit trigger: the next grid is set up while
  this one drains and starts as its last program exits;
* ``"early"`` - also trigger right after the wait, so the next grid's programs become resident
  (and block in their wait) while this kernel still runs.

Off by default: on the H200 both modes made whole decode steps slower (docs/gpu_notes.md,
bs1 1.61 "wait" / 1.53 "early" against 1.49 ms off, in one run).  ``LAUNCH`` follows the TUNED dicts of the kernel modules:
process-wide launch policy that the benchmark flips to measure its effect.
"""

from __future__ import annotations

import functools
import os

import torch

from . import HAS_TRITON

PDL_MODES = {"off": 0, "wait": 1, "early": 2}
LAUNCH = {"pdl": os.environ.get("MODEL_HOST_PDL", "off")}

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def gdc_enter(PDL: tl.constexpr):
        """Wait for the previous kernel; in mode 2 also let the next one launch (module doc)."""
        if PDL > 0:
            gdc_wait()
        if PDL > 1:
            gdc_launch_dependents()


@functools.lru_cache(maxsize=8)
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_args(t: torch.Tensor) -> dict:
    """Keyword arguments of a kernel launch on ``t``'s device: the kernel's ``PDL`` constexpr
    (a :data:`PDL_MODES` value), plus Triton's ``launch_pdl`` option where PDL is on (Hopper or
    newer, not the interpreter).  An unknown mode raises, naming the valid ones."""
    mode = LAUNCH["pdl"]
    if mode not in PDL_MODES:
        raise ValueError(f"MODEL_HOST_PDL={mode!r}: use one of {', '.join(PDL_MODES)}")
    if PDL_MODES[mode] and t.is_cuda and _supported(t.device.index or 0):
        return {"PDL": PDL_MODES[mode], "launch_pdl": True}
    return {"PDL": 0}
