"""The one place every Triton kernel of the package is launched from.

``launch`` runs a kernel, or, inside ``recording(rec)``, hands the launch to ``rec`` instead
(with the FLOPs the launcher counted and the tensors it reads and writes), so a dry run on
meta tensors can count launches, FLOPs and bytes from the code path itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_recorder = None


@dataclass
class Launch:
    name: str
    grid: tuple
    meta: dict
    flops: int
    reads: list = field(default_factory=list)  # (shape, dtype) of every tensor read once
    writes: list = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(_nbytes(s, d) for s, d in self.reads + self.writes)


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


@contextlib.contextmanager
def recording(recorder):
    """Within this block, ``launch`` calls ``recorder(Launch)`` instead of running kernels."""
    global _recorder
    prev, _recorder = _recorder, recorder
    try:
        yield recorder
    finally:
        _recorder = prev


def is_recording() -> bool:
    return _recorder is not None


def launch(kernel, grid, args, meta, *, flops=0, reads=(), writes=()):
    if _recorder is not None:
        _recorder(Launch(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__, tuple(grid),
                         dict(meta), int(flops), [(tuple(t.shape), t.dtype) for t in reads],
                         [(tuple(t.shape), t.dtype) for t in writes]))
        return
    kernel[tuple(grid)](*args, **meta)


def uses_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run compiled kernels; CPU tensors the interpreter when TRITON_INTERPRET=1
    (set before import); meta tensors only count, inside ``recording``."""
    if t.dtype == torch.float64:
        return False
    if t.is_cuda:
        return True
    if t.device.type == "meta":
        return is_recording()
    return t.device.type == "cpu" and INTERPRET


_TRACE_ARCH = (9, 0)
_TRACE_SMS = 132


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int):
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def target(t: torch.Tensor):
    """(arch, SM count) the launch heuristics plan for: the tensor's GPU, an H100 for a dry
    run, or (None, 4) under the interpreter."""
    if t.is_cuda:
        return _cuda_props(t.device.index if t.device.index is not None else torch.cuda.current_device())
    if t.device.type == "meta":
        return _TRACE_ARCH, _TRACE_SMS
    return None, 4


@contextlib.contextmanager
def trace_target(arch=(9, 0), num_sms=132):
    """Plan dry runs (meta tensors) for another GPU."""
    global _TRACE_ARCH, _TRACE_SMS
    prev = _TRACE_ARCH, _TRACE_SMS
    _TRACE_ARCH, _TRACE_SMS = tuple(arch), int(num_sms)
    try:
        yield
    finally:
        _TRACE_ARCH, _TRACE_SMS = prev
