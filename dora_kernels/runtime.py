"""The one place every Triton kernel of the package is launched from.

``launch(kernel, grid, meta, **args)`` binds the arguments by name (``kernel.arg_names``):
a tensor passed as ``name`` fills the pointer ``name_ptr`` and the ``stride_*`` parameters
that follow it; an optional tensor that is absent is passed as ``None`` (its pointer and
strides become ``None``, which the JIT treats as constants) and the kernel's ``HAS_<NAME>``
flag, where it has one, is derived here from whether it was given. Scalars and sizes are
passed under their parameter names, ``meta`` holds the ``tl.constexpr`` meta-parameters and
``num_warps`` / ``num_stages`` (``dora_kernels.heuristics``).

Each launch runs on its tensors' CUDA device (and that device's current stream), whatever the
current device is. Inside ``recording(rec)`` it hands the launch to ``rec`` instead (with the
FLOPs the launcher counted and the unit they run on, the tensors it reads and writes, the
kernel object and its bound arguments), so a dry run on meta tensors can count launches, FLOPs
and bytes from the code path itself, and the compile report can specialise each launch
exactly as the JIT would (``bench/compile_report.py``).

A kernel that fails to compile, or to launch for want of resources (shared memory, registers),
raises ``KernelUnavailable`` naming the GPU, the kernel, its config and the error; the failure is
remembered per (kernel, config, device), so a second launch of it raises at once without
compiling again. ``ops`` then runs that step on the torch path in the ``auto`` backend (one
warning), or raises with ``DORA_KERNELS_STRICT=1`` or the ``triton`` backend. Faults on the
device (an illegal address) are not such failures: they surface as they are.

``DORA_KERNELS_AUTOTUNE=1`` (read at each launch) lets Triton's autotuner choose the tile of
the two GEMM kernels among neighbours of the heuristic's config (``heuristics.AUTOTUNED``), on
a GPU only; under the interpreter, on meta tensors and while recording it is ignored.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass, field

import torch

from . import heuristics as H
from .backend import INTERPRET

# What a launch's FLOPs run on: "tensor" (tensor-core dots: GEMM-like kernels) or "vector" (CUDA
# cores: reductions, masks). The dry-run trace charges each at its own peak.
UNITS = ("tensor", "vector")

_recorder = None


@dataclass
class Launch:
    """One kernel launch as the launcher issued it.

    ``reads``/``writes``: (shape, dtype) of every tensor read or written once (the bytes a
    roofline counts); ``unit``: what its ``flops`` run on (``UNITS``); ``vector_flops``: work on
    the CUDA cores besides (a quantised W0 dequantised in registers, once per token block that
    loads it); ``kernel``: the
    ``triton.jit`` function; ``args``: its non-constexpr parameters by name as bound (tensors,
    possibly meta, Python scalars, None), ``meta`` the constexprs and launch options.
    """

    name: str
    grid: tuple
    meta: dict
    flops: int
    unit: str = "tensor"
    vector_flops: int = 0
    reads: list = field(default_factory=list)
    writes: list = field(default_factory=list)
    kernel: object = field(default=None, repr=False, compare=False)
    args: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def bytes(self) -> int:
        return sum(_nbytes(s, d) for s, d in self.reads + self.writes)


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def kernel_name(kernel) -> str:
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


def bind(kernel, meta: dict, args: dict) -> dict:
    """The kernel's non-constexpr parameters by name, from tensors given by name (see module doc)."""
    name = kernel_name(kernel)
    names = list(kernel.arg_names)
    given = dict(args)
    bound = {}
    i = 0
    while i < len(names):
        p = names[i]
        i += 1
        if p in meta:
            continue
        if p.endswith("_ptr"):
            key = p[:-4]
            if key not in given:
                raise TypeError(f"{name}: no tensor {key!r} given for {p}")
            t = given.pop(key)
            strides = []
            while i < len(names) and names[i].startswith("stride_"):
                strides.append(names[i])
                i += 1
            bound[p] = t
            if t is not None and strides and len(strides) != t.dim():
                raise ValueError(f"{name}: {key} has {t.dim()} dims, the kernel takes {len(strides)} strides")
            for s, v in zip(strides, t.stride() if t is not None else [None] * len(strides)):
                bound[s] = v
            flag = f"HAS_{key.upper()}"
            if flag in names:
                if flag in meta:
                    raise TypeError(f"{name}: {flag} is derived from {key!r}, do not pass it")
                meta[flag] = t is not None
        elif p in given:
            bound[p] = given.pop(p)
        elif p not in meta:
            raise TypeError(f"{name}: no value given for {p}")
    if given:
        raise TypeError(f"{name}: unknown arguments {sorted(given)}")
    return bound


class KernelUnavailable(RuntimeError):
    """A kernel config that did not compile or launch on this device (see module doc)."""

    def __init__(self, kernel: str, config: str, device: str, error: BaseException):
        self.kernel, self.config, self.device, self.error = kernel, config, device, error
        super().__init__(f"{kernel} [{config}] cannot run on {device}: {type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}")


def _compile_errors() -> tuple:
    """Triton's errors of compiling or of launch resources (not the interpreter's, not faults)."""
    found = []
    for mod, name in (("triton.errors", "TritonError"), ("triton.runtime.errors", "OutOfResources"),
                      ("triton.runtime.errors", "PTXASError"), ("triton.compiler.errors", "CompilationError")):
        try:
            found.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_FAILED: dict = {}  # (kernel, config, device) -> KernelUnavailable


def _device_name(device) -> str:
    if device is None:
        return "the CPU (interpreter)"
    try:
        return f"{device} ({torch.cuda.get_device_name(device)})"
    except Exception:  # a stand-in device in tests
        return str(device)


def _config_key(meta: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(meta.items()))


def _run(kernel, grid, bound, meta):
    tuned = _autotuned(kernel, meta) if _autotune_on(bound) else None
    if tuned is not None:
        tuner, grid_fn, rest = tuned
        tuner[grid_fn](**bound, **rest)
    else:
        kernel[tuple(grid)](**bound, **meta)


def launch(kernel, grid, meta, *, flops=0, unit="tensor", vector_flops=0, reads=(), writes=(), **args):
    """Run ``kernel`` on ``grid`` with ``args`` bound by name and ``meta`` (see module doc)."""
    meta = dict(meta)
    bound = bind(kernel, meta, args)
    name = kernel_name(kernel)
    if _recorder is not None:
        _recorder(Launch(name, tuple(grid), meta, int(flops), unit, int(vector_flops),
                         [(tuple(t.shape), t.dtype) for t in reads], [(tuple(t.shape), t.dtype) for t in writes],
                         kernel=kernel, args=bound))
        return
    device = _cuda_device(bound)
    key = (name, _config_key(meta), str(device))
    if key in _FAILED:
        raise _FAILED[key]
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        try:
            _run(kernel, grid, bound, meta)
        except _compile_errors() as e:
            if type(e).__name__ == "InterpreterError":
                raise
            _FAILED[key] = KernelUnavailable(name, key[1], _device_name(device), e)
            raise _FAILED[key] from e


# ---------------------------------------------------------------------------------------------
# DORA_KERNELS_AUTOTUNE=1: the two GEMM kernels only

_TUNERS: dict = {}


def _cuda_device(bound: dict):
    """The CUDA device of the launch's tensors, or None (CPU tensors under the interpreter)."""
    return next((v.device for v in bound.values() if isinstance(v, torch.Tensor) and v.is_cuda), None)


def _autotune_on(bound: dict) -> bool:
    return H.autotune_enabled() and not INTERPRET and _cuda_device(bound) is not None


def _autotuned(kernel, meta):
    """(autotuner, grid function, remaining meta) for a GEMM launch on CUDA tensors, or None.

    One ``triton.autotune`` wrapper per kernel and heuristic config (the candidates are that
    config's neighbours, ``heuristics.AUTOTUNED``, the first being the config itself), built on
    first use and cached; its key is the problem size and flags.
    """
    name = kernel_name(kernel)
    if name not in H.AUTOTUNED:
        return None
    tuned = H.AUTOTUNED[name]
    if not tuned.applies(meta) or not all(k in meta for k in tuned.owned):
        return None
    cache_key = (name, tuple(sorted(meta.items())))
    tuner = _TUNERS.get(cache_key)
    if tuner is None:
        import triton

        configs = []
        for c in tuned.candidates(dict(meta)):
            c = {k: c[k] for k in tuned.owned}
            if c not in configs:
                configs.append(c)
        configs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs]
        tuner = triton.autotune(configs=configs, key=[k for k in tuned.key if k in kernel.arg_names])(kernel)
        _TUNERS[cache_key] = tuner
    rest = {k: v for k, v in meta.items() if k not in tuned.owned}
    return tuner, tuned.grid, rest


# ---------------------------------------------------------------------------------------------
# the GPU the heuristics plan for

_TRACE_ARCH = (9, 0)
_TRACE_SMS = 132


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int):
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def target(t: torch.Tensor):
    """(arch, SM count) the launch heuristics plan for: the tensor's GPU, an H100 for a dry
    run (or the GPU of ``trace_target``), or (None, 4) under the interpreter."""
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
