"""The one place every Triton kernel of the package is launched from.

``launch`` runs a kernel, or, inside ``recording(rec)``, hands the launch to ``rec`` instead
(with the FLOPs the launcher counted, the tensors it reads and writes, the kernel object and
its actual arguments), so a dry run on meta tensors can count launches, FLOPs and bytes from
the code path itself, and the compile report can specialise each launch exactly as the JIT
would (``bench/compile_report.py``).

``DORA_KERNELS_AUTOTUNE=1`` (read at each launch) lets Triton's autotuner choose the tile of
the two GEMM kernels among neighbours of the heuristic's config, on a GPU only; under the
interpreter, on meta tensors and while recording it is ignored.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import torch

from . import heuristics as H

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_recorder = None


@dataclass
class Launch:
    """One kernel launch as the launcher issued it.

    ``reads``/``writes``: (shape, dtype) of every tensor read or written once (the bytes a
    roofline counts); ``kernel``: the ``triton.jit`` function; ``args``: the positional
    arguments as passed (tensors, possibly meta, and Python scalars), ``meta`` the keyword ones.
    """

    name: str
    grid: tuple
    meta: dict
    flops: int
    reads: list = field(default_factory=list)
    writes: list = field(default_factory=list)
    kernel: object = field(default=None, repr=False, compare=False)
    args: tuple = field(default=(), repr=False, compare=False)

    @property
    def bytes(self) -> int:
        return sum(_nbytes(s, d) for s, d in self.reads + self.writes)


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def _name(kernel) -> str:
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__name__", repr(kernel))


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
        _recorder(Launch(_name(kernel), tuple(grid), dict(meta), int(flops),
                         [(tuple(t.shape), t.dtype) for t in reads], [(tuple(t.shape), t.dtype) for t in writes],
                         kernel=kernel, args=tuple(args)))
        return
    if H.autotune_enabled() and not INTERPRET and _name(kernel) in _TUNED:
        tuned = _autotuned(kernel, meta, args)
        if tuned is not None:
            tuner, grid_fn, rest = tuned
            tuner[grid_fn](*args, **rest)
            return
    kernel[tuple(grid)](*args, **meta)


# ---------------------------------------------------------------------------------------------
# DORA_KERNELS_AUTOTUNE=1: the two GEMM kernels only

def _cdiv(a, b):
    return -(-int(a) // int(b))


def _fwd_candidates(base: dict) -> list[dict]:
    return H.autotune_candidates(base)


def _dx_candidates(base: dict) -> list[dict]:
    # BLOCK_N stays: the launcher sizes the dA partials (one slice per token block) from it.
    out = [base]
    if base["BLOCK_N"] >= 64:
        for bk, bm, warps in ((128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 32, 4)):
            out.append({**base, "BLOCK_K": bk, "BLOCK_M": bm, "num_warps": warps})
    for st in (2, 3, 4):
        out.append({**base, "num_stages": st})
    uniq = []
    for c in out:
        if c not in uniq:
            uniq.append(c)
    return uniq


# kernel name -> (meta keys the autotuner owns, candidates, grid from the bound arguments, key)
_TUNED = {
    "_fwd_kernel": (("BLOCK_N", "BLOCK_M", "BLOCK_K", "num_warps", "num_stages"), _fwd_candidates,
                    lambda a: (_cdiv(a["N"], a["BLOCK_N"]) * _cdiv(a["M"], a["BLOCK_M"]),),
                    ["N", "M", "K", "R", "HAS_BIAS", "HAS_DROPOUT"]),
    "_dx_kernel": (("BLOCK_K", "BLOCK_M", "num_warps", "num_stages"), _dx_candidates,
                   lambda a: (_cdiv(a["N"], a["BLOCK_N"]) * _cdiv(a["K"], a["BLOCK_K"]),),
                   ["N", "M", "K", "R", "HAS_DROPOUT", "WITH_DX"]),
}
_TUNERS: dict = {}


def _on_gpu(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


def _autotuned(kernel, meta, args):
    """(autotuner, grid function, remaining meta) for a GEMM launch on CUDA tensors, or None.

    One ``triton.autotune`` wrapper per kernel and heuristic config (the candidates are that
    config's neighbours, the first being the config itself), built on first use and cached;
    its key is the problem size and flags.
    """
    if not _on_gpu(args):
        return None
    name = _name(kernel)
    owned, candidates, grid_fn, key = _TUNED[name]
    if name == "_dx_kernel" and not meta.get("WITH_DX", True):
        return None  # no GEMM in it: the dA pass over x only
    if not all(k in meta for k in owned):
        return None
    cache_key = (name, tuple(sorted(meta.items())))
    tuner = _TUNERS.get(cache_key)
    if tuner is None:
        import triton

        configs = []
        for c in candidates(dict(meta)):
            c = {k: c[k] for k in owned}
            if c not in configs:
                configs.append(c)
        configs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs]
        tuner = triton.autotune(configs=configs, key=[k for k in key if k in kernel.arg_names])(kernel)
        _TUNERS[cache_key] = tuner
    rest = {k: v for k, v in meta.items() if k not in owned}
    return tuner, grid_fn, rest


# ---------------------------------------------------------------------------------------------
# targets

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
