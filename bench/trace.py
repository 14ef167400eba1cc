"""Dry-run trace: what one DoRA layer step costs, counted from the code path that runs.

``python -m bench --trace [--quick] [--out DIR]`` (or ``python -m bench.trace``) runs one layer
step of each provider on meta tensors — no GPU, no memory, 70B-class shapes in seconds — and
counts, per mode (``fwd``: training forward; ``bwd``: its backward; ``step``: both; ``eval``:
a no-grad forward in eval mode, steady state):

* launches, matmul FLOPs, other FLOPs and HBM bytes. The fused path's Triton launches come from
  the launch point (``dora_kernels.runtime.recording``: each launcher states the FLOPs it does and
  the tensors it reads and writes once); every ATen op that any provider issues, the fused
  path's own few torch ops included, is seen by a ``TorchDispatchMode``: views, allocations
  and other metadata ops are free, ``mm``/``addmm``/``bmm`` count ``2·m·n·k`` matmul FLOPs, every
  other op one FLOP per element; each op is one launch that reads its inputs and writes its
  outputs once (a broadcast input counts its distinct elements). The fused op's
  ``torch.library`` custom ops run their real implementation on the meta tensors (a meta
  tensor would otherwise take the op's fake), so their torch ops and launches are counted once.
* bytes saved for backward: ``bench.timing.saved_bytes``, as the timed benchmark counts them —
  every tensor the forward packs (``saved_tensors_hooks``) and still holds, and the output,
  deduped by storage (an output the backward reads costs nothing more), parameters excluded
  (W0, bias, A, B, m persist whatever the method; only activations are counted; x, the layer's
  input, is an activation and counts).

Then a roofline prediction per GPU: per launch ``max(matmul/(peak · efficiency) + other/vector
peak, bytes/bandwidth) + overhead``, summed. The matmul peak is a cuBLAS-class rate; the
efficiency is 1 for ATen (cuBLAS) launches and, for the package's bf16/fp16 Triton GEMMs,
``triton_gemm_efficiency`` of the launch's FLOPs (published H100 measurements of pointer-based
``tl.dot`` GEMMs against cuBLAS: triton issue #3672 and PR #5726) or a factor a GPU run measured
(``--gemm-efficiency``). ``predicted_ms`` and the ratios use it; the ``*_at_cublas_parity``
columns give the bound with every Triton GEMM at cuBLAS's rate. Every row is a prediction
(column ``kind``); the constants are printed and written beside the CSV. Ratios are to the floor
(a frozen ``nn.Linear``: forward + input gradient, the same mode), to PEFT's DoRA and to PEFT's
LoRA.

Providers: ``fused`` (``dora_kernels.DoRALinear``: eval caches the norm), ``fused_peft`` (a PEFT
layer after ``dora_kernels.fuse``), ``reference`` (``reference.DoRALinear``, PEFT's arithmetic,
eager), ``peft_dora``, ``peft_lora`` (PEFT's ``lora.Linear``) and ``linear`` (frozen ``nn.Linear``),
built by ``bench.providers`` as the timed benchmark builds them, on meta tensors. Shapes, token
counts, dtypes, providers and the GPUs' figures come from ``bench.tables``. ``--qdora``: the QDoRA
providers (``peft_qdora``, ``fused_qdora``, ``peft_qlora``, ``qlora_floor``) on a bitsandbytes nf4
base, bitsandbytes' ops costed by ``BNB_RULE``, and the QDoRA targets (``QDORA_TARGETS``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dora_kernels import heuristics as H
from dora_kernels import runtime

from . import providers as P
from . import tables as TB
from .shapes import Shape
from .timing import saved_bytes

# ---------------------------------------------------------------------------------------------
# the cost model's constants (printed and written with every trace): the GPUs with peaks in
# bench.tables.GPUS (matmul, fp32 and HBM figures, nominal and reachable; the launch overhead)

GPUS = {k: TB.GPUS[k] for k in TB.PREDICTED_GPUS}
LAUNCH_OVERHEAD_S = TB.LAUNCH_S

PROVIDERS = TB.TRACE_PROVIDERS
MODES = TB.MODES
FLOOR = TB.FLOOR

# Llama-3-8B's projections (q/k/v/o/gate/up/down) and a 70B up projection
SHAPES = [Shape(*s) for s in TB.TRACE_SHAPES]
TOKENS = TB.TOKENS
QUICK_SHAPES = [Shape(*s) for s in TB.TRACE_QUICK_SHAPES]
QUICK_TOKENS = TB.TRACE_QUICK_TOKENS


# ---------------------------------------------------------------------------------------------
# counting

@dataclass
class Event:
    """One launch: a Triton kernel (``source="triton"``) or an ATen op (``"aten"``)."""

    source: str
    name: str
    mm_flops: int
    other_flops: int
    bytes: int
    dtype: torch.dtype


@dataclass
class Count:
    events: list = field(default_factory=list)

    def add(self, other: "Count") -> "Count":
        return Count(self.events + other.events)

    @property
    def launches(self):
        return len(self.events)

    @property
    def mm_flops(self):
        return sum(e.mm_flops for e in self.events)

    @property
    def other_flops(self):
        return sum(e.other_flops for e in self.events)

    @property
    def bytes(self):
        return sum(e.bytes for e in self.events)


_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_FREE = _ALLOC | {"detach", "alias", "lift_fresh", "_local_scalar_dense", "set_", "resize_", "_reshape_alias",
                  "resolve_conj", "resolve_neg", "_conj", "_neg_view", "sym_size", "sym_stride", "sym_numel",
                  "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream"}
# ops whose first argument is written but not read
_WRITE_ONLY_SELF = {"fill_", "zero_", "copy_", "uniform_", "normal_", "bernoulli_", "random_", "exponential_"}
_MM = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "linear", "_addmm_activation"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a kernel reads from ``t`` (a broadcast dim counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= int(size)
    if t.numel() == 0:
        n = 0
    return n * t.element_size()


def _tkey(t):
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _storage(t):
    return t.untyped_storage()._cdata


def _mm_flops(name, args, out):
    def shp(i):
        return tuple(args[i].shape)

    if name == "mm":
        (n, k), (_, m) = shp(0), shp(1)
        return 2 * n * k * m
    if name in ("addmm", "_addmm_activation"):
        (n, k), (_, m) = shp(1), shp(2)
        return 2 * n * k * m
    if name == "bmm":
        (b, n, k), (_, _, m) = shp(0), shp(1)
        return 2 * b * n * k * m
    if name == "baddbmm":
        (b, n, k), (_, _, m) = shp(1), shp(2)
        return 2 * b * n * k * m
    if name == "mv":
        n, k = shp(0)
        return 2 * n * k
    if name == "addmv":
        n, k = shp(1)
        return 2 * n * k
    if name == "linear":
        x, w = args[0], args[1]
        return 2 * (x.numel() // max(1, x.shape[-1])) * w.shape[0] * w.shape[1]
    return 0


_CONV = {"convolution", "convolution_backward"}


def _conv_macs(x_shape, w_shape, out_shape, transposed):
    """Multiply-adds of one convolution: per output element in/groups·prod(k) (transposed: per
    input element)."""
    per = int(w_shape[1]) * math.prod(int(k) for k in w_shape[2:])
    return math.prod(int(v) for v in (x_shape if transposed else out_shape)) * per


def _conv_flops(name, args, out):
    """(matmul FLOPs, other FLOPs) of ``aten.convolution`` (2·MACs, the bias add as other) and
    ``aten.convolution_backward`` (2·MACs per input / weight gradient asked for, the bias
    gradient's reduction as other)."""
    if name == "convolution":
        x, w, bias, transposed = args[0], args[1], args[2], bool(args[6])
        return 2 * _conv_macs(x.shape, w.shape, out.shape, transposed), (out.numel() if bias is not None else 0)
    g, x, w, transposed, mask = args[0], args[1], args[2], bool(args[7]), args[10]
    macs = _conv_macs(x.shape, w.shape, g.shape, transposed)
    return 2 * macs * (int(bool(mask[0])) + int(bool(mask[1]))), (g.numel() if mask[2] else 0)


def _custom_impl(qualname):
    """The Python implementation of a ``torch.library.custom_op`` (the real launchers)."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(qualname)
    if opdef is None:
        raise RuntimeError(f"trace: custom op {qualname} has no Python implementation to run on meta tensors")
    return opdef._init_fn


# bitsandbytes' 4-bit ops (``torch.ops.bitsandbytes.*``; their fake kernels run on meta tensors).
# dequantize_4bit: one launch reading the packed codes (n/2 bytes) and the absmax and writing the
# dequantised weight (n × its element size). Every 4-bit dequantisation, bitsandbytes' or the
# package's, is charged the same work an element (``DEQUANT_OPS``: the package's count) on the CUDA
# cores; dequantize_blockwise (the nested absmax) takes the generic rule. gemm_4bit (Linear4bit's
# forward in bitsandbytes 0.50) is two different things on a GPU, chosen by bitsandbytes' CUDA
# dispatch (``bnb_gemm_4bit_custom``).
DEQUANT_OPS = H.DEQUANT_OPS[4]
BNB_RULE = ("bitsandbytes ops (torch.ops.bitsandbytes.*, run on meta by their fake kernels): every 4-bit "
            f"dequantisation (bitsandbytes' or the package's) is charged {DEQUANT_OPS} CUDA-core operations an "
            "element, once per launch (the package's in-kernel GEMMs: once per token block); dequantize_4bit: one "
            "launch, bytes = packed codes read (n/2) + absmax read + dequantised weight written (n x element size, 2 "
            "bytes in bf16); dequantize_blockwise: the generic rule; gemm_4bit (Linear4bit forward): as "
            "bitsandbytes 0.50's CUDA dispatch picks (backends/cuda/ops.py _gemm_4bit_use_custom_cuda, ported for "
            "sm80/sm90: always at <= 4 tokens, never above 1536, a shape/occupancy table between), either its fused "
            "4-bit kernel, one launch reading x, the packed codes, the uint8 absmax, the nested absmax and table and "
            "writing y, 2*M*N*K matmul FLOPs charged at the cuBLAS rate (an optimistic bound for bitsandbytes' "
            "SIMT/mma.sync kernel), or dequantise + cuBLAS: dequantize_blockwise of the absmax, the offset add, "
            "dequantize_4bit, the matmul (x and the dequantised weight read, y written); gemv_4bit: one launch, the "
            "bytes it reads (x, packed codes, absmax, table) and y written, 2*M*N*K matmul FLOPs; the backward's "
            "dequantize_4bit and matmul are the ops bitsandbytes issues")
BNB_CUSTOM_MAX_M = 1536  # bitsandbytes 0.50 (CUDA): dequantise + F.linear above this many tokens
BNB_CUSTOM_FLOOR_M = 4  # and its fused kernel at this many or fewer, on every arch


def bnb_gemm_4bit_custom(M: int, N: int, K: int, blocksize: int, dtype, arch, sms: int) -> bool:
    """Whether bitsandbytes 0.50's ``gemm_4bit`` runs its fused 4-bit kernel (True) or dequantises
    the weight and calls ``F.linear`` (False) for x (M, K) and a 4-bit W (N, K) on a GPU of compute
    capability ``arch`` with ``sms`` SMs: ``backends/cuda/ops.py`` (the ``gemm_4bit`` CUDA kernel's
    checks and ``_gemm_4bit_use_custom_cuda``), ported for sm80 and sm90, the arches the trace
    predicts for; any other arch gets the rules every arch shares (fused at M ≤ 4 only)."""
    if M > BNB_CUSTOM_MAX_M or K % blocksize:
        return False
    if M <= BNB_CUSTOM_FLOOR_M:
        return True
    major, minor = (tuple(arch) + (0, 0))[:2] if arch else (0, 0)
    if dtype == torch.float32 or major < 7:
        return M < 8
    sm80, sm90 = (major, minor) == (8, 0), major == 9
    if not (sm80 or sm90):
        return False
    n_blocks = (N + 63) // 64
    if N * K < 4 * 1024 * 1024:  # small weights: dequantising costs more than it saves
        if K * 2 < N:
            low_wave = n_blocks * 3 < sms
            return M <= ((1536 if low_wave else 512) if sm80 else (512 if low_wave else 320))
        quarter_wave = n_blocks * 4 <= sms
        if sm80 and quarter_wave:
            return M <= (32 if n_blocks * 8 <= sms else 128) if K >= N else M <= 384
        if quarter_wave:
            return M <= 32
        return M <= 16 if n_blocks * 2 <= sms else False
    if M > 512:
        return False
    if M < 8:
        if M >= 6 and n_blocks >= (36 if sm90 else 48):
            lt_75, lt_60 = n_blocks * 4 < sms * 3, n_blocks * 5 < sms * 3
            if K > N and lt_75:
                return False
            if K == N and ((sm80 and lt_60) or (sm90 and lt_75 and not lt_60)):
                return False
        return True
    if sm80:
        if n_blocks >= sms * 3:
            return M <= 128
        if n_blocks >= sms:
            return M <= (64 if K < N else 32)
        if K >= N * 3 and n_blocks * 4 > sms:
            return False
        if K == N and n_blocks >= 48 and n_blocks * 5 < sms * 3:
            return False
        if n_blocks * 2 < sms:
            if K <= N:
                return M <= 128
            if n_blocks * 3 >= sms:
                return False
        if n_blocks >= sms // 2 and K < N:
            return M <= 128
        return M <= 16
    if n_blocks >= sms * 3:
        return M <= 64
    if n_blocks >= sms * 2:
        return M <= 48
    if n_blocks >= sms:
        return M <= 32
    if n_blocks >= sms // 2:
        return False if K >= N and n_blocks * 4 < sms * 3 else M <= 16
    return False


def _bound(func, args, kwargs) -> dict:
    """An op's arguments by their schema names."""
    got = dict(zip((a.name for a in func._schema.arguments), args))
    got.update(kwargs)
    return got


def _bnb_events(name, func, args, kwargs, out):
    """The launches of a bitsandbytes op under ``BNB_RULE``, or None for the generic rule."""
    a = _bound(func, args, kwargs)
    if name == "gemv_4bit":
        A, (n_out, k) = a["A"], a["shapeB"]
        m = A.numel() // k
        nbytes = sum(distinct_bytes(t) for t in _tensors(a)) + distinct_bytes(out)
        return [Event("aten", "gemv_4bit", 2 * m * n_out * k, DEQUANT_OPS * n_out * k, nbytes, A.dtype)]
    if name == "dequantize_4bit":
        n = out.numel()
        nbytes = sum(distinct_bytes(t) for t in _tensors(a)) + distinct_bytes(out)
        return [Event("aten", "dequantize_4bit", 0, DEQUANT_OPS * n, nbytes, out.dtype)]
    if name != "gemm_4bit":
        return None
    A, packed, (n_out, k) = a["A"], a["B"], a["shapeB"]
    m, bias, q8 = A.numel() // k, a.get("bias"), a.get("absmax_8bit")
    mm, extra = 2 * m * n_out * k, (m * n_out if bias is not None else 0)
    arch, sms = runtime.target(A)
    if bnb_gemm_4bit_custom(m, n_out, k, a["blocksize"], A.dtype, arch, sms):
        nbytes = sum(distinct_bytes(t) for t in _tensors(a)) + distinct_bytes(out)
        return [Event("aten", "gemm_4bit", mm, extra + DEQUANT_OPS * n_out * k, nbytes, A.dtype)]
    n, el = n_out * k, A.element_size()
    absmax = a["absmax"]  # fp32: the nested absmax (with absmax_8bit) or the absmax itself
    blocks = q8.numel() if q8 is not None else absmax.numel()
    ev = []
    if q8 is not None:  # the uint8 absmax dequantised (blocks of 256), then the offset added
        ev.append(Event("aten", "gemm_4bit.dequantize_blockwise", 0, blocks, distinct_bytes(q8)
                        + distinct_bytes(absmax) + distinct_bytes(a["absmax_code"]) + 4 * blocks, torch.float32))
        ev.append(Event("aten", "gemm_4bit.add", 0, blocks, 8 * blocks + 4, torch.float32))
    ev.append(Event("aten", "gemm_4bit.dequantize_4bit", 0, DEQUANT_OPS * n, distinct_bytes(packed) + 4 * blocks
                    + n * el, A.dtype))
    ev.append(Event("aten", "gemm_4bit.linear", mm, extra, distinct_bytes(A) + n * el + distinct_bytes(out)
                    + (distinct_bytes(bias) if bias is not None else 0), A.dtype))
    return ev


class OpCounter(TorchDispatchMode):
    """Counts every ATen op that touches a meta tensor as one launch (see module doc).

    Ops of the ``dora_kernels`` namespace (the fused op's custom ops) are not counted: their
    real implementation runs instead, under this mode and the caller's ``recording``, so its
    Triton launches and torch ops are counted once each."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        qual = func._schema.name
        if qual.startswith("dora_kernels::"):
            with self:
                return _custom_impl(qual)(*args, **kwargs)
        out = func(*args, **kwargs)
        self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out):
        name = func._schema.name.split("::")[-1]
        ins = list(_tensors((args, kwargs)))
        outs = list(_tensors(out))
        if not any(t.device.type == "meta" for t in ins + outs):
            return  # host work (the dropout seed on the CPU)
        if func._schema.name.startswith("bitsandbytes::"):
            got = _bnb_events(name, func, args, kwargs, out)
            if got is not None:
                self.events.extend(got)
                return
        if name in _FREE:
            return
        if outs and all(t.numel() == 0 for t in outs):
            return  # nothing to compute: no kernel
        in_storages = {_storage(t) for t in ins}
        mutable = func._schema.is_mutable
        if outs and not mutable and all(_storage(t) in in_storages for t in outs):
            return  # a view, or an input returned as is (``.to`` of its own dtype, ``contiguous``)
        reads = {}
        for i, t in enumerate(ins):
            if i == 0 and name in _WRITE_ONLY_SELF and args and args[0] is t:
                continue
            reads.setdefault(_tkey(t), distinct_bytes(t))
        writes = {}
        for t in outs:
            writes.setdefault(_tkey(t), distinct_bytes(t))
        mm = _mm_flops(name, args, out) if name in _MM else 0
        if name in _CONV:
            mm, other = _conv_flops(name, args, out)
        else:
            other = 0 if mm else max([t.numel() for t in ins + outs] or [0])
        if name == "embedding" and outs:
            # a gather: the rows it looks up, not the whole table (the ids, the rows read, the rows written)
            nbytes = outs[0].numel() * outs[0].element_size()
            reads = {"ids": distinct_bytes(args[1]), "rows": nbytes}
            other = outs[0].numel()
        if name in ("addmm", "baddbmm", "addmv") and outs:
            other = outs[0].numel()  # the bias / accumulate
        dtype = (ins or outs)[0].dtype
        self.events.append(Event("aten", name, mm, other, sum(reads.values()) + sum(writes.values()), dtype))


def count(fn):
    """Run ``fn()`` under the launch recorder and the op counter; return (result, Count)."""
    c = Count()

    def on_launch(lc):
        # Keep numbers only: holding the launch's tensors would change what autograd does
        # (AccumulateGrad copies a gradient that something else still references).
        # Each launcher states what its FLOPs run on (runtime.UNITS).
        mm = lc.flops if lc.unit == "tensor" else 0
        other = (lc.flops if lc.unit == "vector" else 0) + lc.vector_flops  # (+ in-register dequantising)
        dtype = lc.reads[0][1] if lc.reads else torch.float32
        x_like = [a for a in lc.args.values() if isinstance(a, torch.Tensor)]
        if x_like:
            dtype = max((a.dtype for a in x_like if a.dtype.is_floating_point),
                        key=lambda d: d in (torch.float16, torch.bfloat16), default=dtype)
        c.events.append(Event("triton", lc.name, mm, other, lc.bytes, dtype))

    with runtime.recording(on_launch), OpCounter(c.events):
        out = fn()
    return out, c


# ---------------------------------------------------------------------------------------------
# one layer's step (bench.providers builds it, on the meta device)

@dataclass
class LayerTrace:
    fwd: Count
    bwd: Count
    eval: Count
    saved: int
    trainable: int = 0  # trainable parameters of the layer

    def mode(self, m: str) -> Count:
        return {"fwd": self.fwd, "bwd": self.bwd, "step": self.fwd.add(self.bwd), "eval": self.eval}[m]


def trace_layer(provider: str, shape: Shape, tokens: int, *, r=16, dtype="bf16", adapter_dtype=None, bias=False,
                dropout=0.0, arch=(9, 0), num_sms=132) -> LayerTrace:
    """One training step (forward with x requiring grad, backward) and one steady-state eval
    forward of ``provider`` (``bench.providers.build``) on meta tensors: ``tokens`` × ``shape``,
    rank ``r``, x/weight in ``dtype``, adapters in ``adapter_dtype`` (default ``dtype``); the
    fused paths plan for ``arch`` with ``num_sms`` SMs."""
    with runtime.trace_target(arch, num_sms):
        t = P.make_tensors(tokens, shape.in_features, shape.out_features, r, TB.dtype_of(dtype),
                           TB.dtype_of(adapter_dtype or dtype), "meta", bias=bias, dropout=dropout)
        return _trace_module(P.build(provider, t), t)


def _trace_module(layer, t) -> LayerTrace:
    """Count ``layer``'s training step on ``t.x`` (backward with ``t.grad``; none where nothing
    requires grad: a frozen nn.Embedding) and its steady-state eval forward."""
    layer.train()
    saved, (y, fwd) = saved_bytes(lambda: count(lambda: layer(t.x)), held=list(layer.parameters()),
                                  return_output=True)
    bwd = count(lambda: y.backward(t.grad))[1] if y.requires_grad else Count()
    layer.eval()
    with torch.no_grad():
        layer(t.x)  # warm: eval caches (the fused module's norm) are filled once
        _, ev = count(lambda: layer(t.x))
    return LayerTrace(fwd, bwd, ev, saved, sum(p.numel() for p in P.trainable(layer)))


def trace_kind(kind: str, provider: str, *, name=None, sizes=None, r=16, dtype="bf16", adapter_dtype=None,
               arch=(9, 0), num_sms=132) -> LayerTrace:
    """``trace_layer`` for a conv / embedding layer (``bench.providers.build_kind``; the shape
    ``bench.tables.KIND_SHAPES[kind]`` unless ``name``/``sizes`` are given)."""
    dname, dsizes = TB.KIND_SHAPES[kind]
    with runtime.trace_target(arch, num_sms):
        t = P.make_kind_tensors(kind, name or dname, sizes or dsizes, r, TB.dtype_of(dtype),
                                TB.dtype_of(adapter_dtype or dtype), "meta")
        return _trace_module(P.build_kind(provider, t), t)


# ---------------------------------------------------------------------------------------------
# the roofline

def _mm_peak(dtype, gpu) -> float:
    return gpu["mm"] if dtype in TB.HALF else gpu["fp32"]


# The package's Triton GEMMs against cuBLAS. ``mm`` is a cuBLAS-class rate (what ``torch.mm``
# reaches); Triton's pointer-based ``tl.dot`` GEMMs (the package's kernels load through pointers:
# no TMA descriptors, no persistent schedule) reach less on Hopper. Published H100 figures, as
# (2·m·n·k FLOPs, Triton / cuBLAS, source):
TRITON_GEMM_POINTS = (
    (2 * 2048 ** 3, 0.38, "triton issue #3672 (H100 fp16, tutorial 03 kernel, 2048^3)"),
    (2 * 2560 ** 3, 0.70, "triton issue #3672 (2560^3)"),
    (2 * 2816 ** 3, 0.81, "triton issue #3672 (2816^3)"),
    (2 * 3072 ** 3, 0.90, "triton issue #3672 (3072^3)"),
    (2 * 8192 * 8192 * 512, 0.76, "triton PR #5726 (H100, 8192x8192x512)"),
)
TRITON_GEMM_SOURCES = ("triton issue #3672 (https://github.com/triton-lang/triton/issues/3672): H100 fp16, the "
                       "tutorial 03 kernel against cuBLAS, 0.38 / 0.70 / 0.81 / 0.90 at 2048^3 / 2560^3 / 2816^3 / "
                       "3072^3",
                       "triton PR #5726 (https://github.com/triton-lang/triton/pull/5726): H100, 0.76 at "
                       "8192x8192x512",
                       "TMA / persistent Triton kernels reach 0.92-1.05 of cuBLAS (e.g. triton PR #5461, H100 fp8 "
                       "8192x8192x4096: 1.05); not used: the package's kernels are pointer-based")
TRITON_GEMM_RULE = ("the package's bf16/fp16 Triton launches with tensor-core FLOPs run their matmul FLOPs at "
                    "mm x efficiency, efficiency = piecewise-linear in log(FLOPs of the launch) through "
                    + ", ".join(f"{f:.3g} FLOP -> {e:.2f}" for f, e, _ in TRITON_GEMM_POINTS)
                    + ", constant beyond the first and last point (or the GPU's measured triton_gemm_eff); "
                      "ATen/cuBLAS launches and fp32 launches at 1.0")


def triton_gemm_efficiency(flops: float) -> float:
    """The fraction of cuBLAS's matmul rate assumed for one of the package's Triton GEMM launches
    of ``flops`` tensor-core FLOPs (its 2·m·n·k).

    Piecewise-linear in log(FLOPs) through ``TRITON_GEMM_POINTS``, held constant beyond the first
    and the last point: 0.38, 0.70, 0.81, 0.90 at the FLOPs of 2048³, 2560³, 2816³, 3072³ (triton
    issue #3672: H100, fp16, the tutorial 03 kernel — pointer-based ``tl.dot`` — against cuBLAS)
    and 0.76 at 8192×8192×512 (triton PR #5726, H100), so 0.38 for smaller GEMMs and 0.76 for
    larger ones. The two sources disagree (the drop from 0.90 to 0.76 between 3072³ and
    8192·8192·512); the function passes through both rather than pick one. TMA / persistent
    Triton kernels reach 0.92–1.05 of cuBLAS, but the package's kernels load through pointers.
    A GPU run measures the real factor (``bench.acceptance``: ``gemm_efficiency.json``) and
    ``--gemm-efficiency`` puts it back in place of this function."""
    pts = TRITON_GEMM_POINTS
    if flops <= pts[0][0]:
        return pts[0][1]
    for (f0, e0, _), (f1, e1, _) in zip(pts, pts[1:]):
        if flops <= f1:
            w = (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return e0 + w * (e1 - e0)
    return pts[-1][1]


def is_triton_gemm(e: Event) -> bool:
    """One of the package's Triton launches whose tensor-core FLOPs run below cuBLAS's rate."""
    return e.source == "triton" and e.mm_flops > 0 and e.dtype in TB.HALF


def gemm_efficiency(e: Event, gpu: dict) -> float:
    """The fraction of ``gpu["mm"]`` launch ``e``'s matmul FLOPs run at: 1 for ATen (cuBLAS) and
    fp32 launches; for the package's bf16/fp16 Triton GEMMs the GPU's measured ``triton_gemm_eff``
    where it has one, else ``triton_gemm_efficiency(e.mm_flops)``."""
    if not is_triton_gemm(e):
        return 1.0
    fixed = gpu.get("triton_gemm_eff")
    return float(fixed) if fixed is not None else triton_gemm_efficiency(e.mm_flops)


def launch_s(e: Event, gpu: dict, eff: float = 1.0) -> float:
    """One launch: max(matmul/(peak · eff) + other/fp32 peak, bytes/bandwidth) + overhead."""
    compute = e.mm_flops / (_mm_peak(e.dtype, gpu) * eff) + e.other_flops / gpu["fp32"]
    return max(compute, e.bytes / gpu["bw"]) + gpu["launch_s"]


def predict_s(c: Count, gpu: dict, *, at_parity: bool = False, eff: float | None = None) -> float:
    """Σ over launches of ``launch_s``, the package's Triton GEMMs at ``gemm_efficiency`` of the
    matmul peak; ``at_parity``: at cuBLAS's rate (the upper bound); ``eff``: this one factor."""
    t = 0.0
    for e in c.events:
        if at_parity or not is_triton_gemm(e):
            f = 1.0
        else:
            f = eff if eff is not None else gemm_efficiency(e, gpu)
        t += launch_s(e, gpu, f)
    return t


def assumed_efficiency(c: Count, gpu: dict):
    """The efficiency the prediction assumes over ``c``'s Triton GEMM launches, FLOP-weighted
    (Σ FLOPs / Σ FLOPs/efficiency), or None where it has none."""
    gemms = [e for e in c.events if is_triton_gemm(e)]
    if not gemms:
        return None
    return sum(e.mm_flops for e in gemms) / sum(e.mm_flops / gemm_efficiency(e, gpu) for e in gemms)


def _solve(f, target, lo, hi, iters=200):
    """x in [lo, hi] (log-bisection) with f(x) = target, f decreasing; None if out of range."""
    if not f(lo) >= target >= f(hi):
        return None
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return math.sqrt(lo * hi)


def derive_gemm_efficiency(fused: Count, floor: Count, fused_s: float, floor_s: float, gpu: dict) -> dict:
    """The efficiency of the package's Triton GEMMs relative to cuBLAS that one measured case shows.

    ``floor``/``fused``: the trace's launches of the frozen ``nn.Linear`` and of a fused provider
    in the same mode and case; ``floor_s``/``fused_s``: their measured times (one GPU run).
    First the cuBLAS rate this GPU reached: the matmul peak P for which the model reproduces the
    floor's measured time. Then, with P in place of ``gpu["mm"]``, the one factor ``efficiency``
    on the Triton GEMMs' matmul FLOPs for which the model reproduces the fused measured time —
    when the rest is small, (the fused GEMMs' FLOPs / P) / (measured fused − the predicted rest),
    i.e. cuBLAS's time for those FLOPs over the fused GEMM kernels' measured time. ``used`` says
    whether the case determines it: the floor's matmuls are at least half its measured time, and
    the fused Triton GEMMs' compute at least half the fused one (compute-bound, large token
    counts); ``why`` says otherwise."""
    out = {"efficiency": None, "cublas_tflops": None, "triton_gemm_ms": None, "rest_ms": None, "used": False,
           "why": ""}
    if not any(is_triton_gemm(e) for e in fused.events):
        out["why"] = "no Triton GEMM launch"
        return out
    if not any(e.mm_flops and e.dtype in TB.HALF for e in floor.events):
        out["why"] = "the floor has no bf16/fp16 matmul"
        return out

    def floor_at(peak):
        return predict_s(floor, dict(gpu, mm=peak), at_parity=True)

    peak = _solve(floor_at, floor_s, 1e9, 1e18)
    if peak is None:
        out["why"] = "the floor's measured time is below the model's memory time"
        return out
    out["cublas_tflops"] = peak / 1e12
    g = dict(gpu, mm=peak)
    floor_mm_s = sum(e.mm_flops / peak for e in floor.events if e.dtype in TB.HALF)
    eff = _solve(lambda x: predict_s(fused, g, eff=x), fused_s, 1e-3, 1e3)
    if eff is None:
        out["why"] = "the rest of the fused launches alone take longer than measured"
        return out
    gemm_s = sum(e.mm_flops / (peak * eff) + e.other_flops / g["fp32"] for e in fused.events if is_triton_gemm(e)
                 and e.mm_flops / (peak * eff) + e.other_flops / g["fp32"] >= e.bytes / g["bw"])
    out.update(efficiency=eff, triton_gemm_ms=gemm_s * 1e3, rest_ms=(fused_s - gemm_s) * 1e3)
    if floor_mm_s < 0.5 * floor_s:
        out["why"] = "the floor is not compute-bound (its time says little about cuBLAS's rate)"
    elif gemm_s < 0.5 * fused_s:
        out["why"] = "the fused Triton GEMMs are not compute-bound (under half the measured time)"
    else:
        out["used"] = True
    return out


def constants(gpus=None) -> dict:
    gpus = GPUS if gpus is None else gpus
    return {"launch_overhead_s": LAUNCH_OVERHEAD_S,
            "gpus": {k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in v.items()}
                     for k, v in gpus.items()},
            "rule": "per launch max(matmul_flops/(mm x efficiency) + other_flops/fp32, bytes/bw) + launch_overhead_s, "
                    "summed; mm applies to bf16/fp16 matmuls, fp32 to fp32 matmuls and all other FLOPs; "
                    "predicted_ms with the Triton GEMM efficiency below, predicted_ms_at_cublas_parity at 1.0",
            "triton_gemm_efficiency": {"rule": TRITON_GEMM_RULE,
                                       "points": [[f, e, src] for f, e, src in TRITON_GEMM_POINTS],
                                       "sources": list(TRITON_GEMM_SOURCES)},
            "bitsandbytes": {"rule": BNB_RULE, "gemm_4bit_custom_max_tokens": BNB_CUSTOM_MAX_M,
                             "gemm_4bit_custom_floor_tokens": BNB_CUSTOM_FLOOR_M}}


# ---------------------------------------------------------------------------------------------
# the trace

COLUMNS = ["provider", "mode", "layer", "tokens", "in_features", "out_features", "r", "dtype", "adapter_dtype",
           "bias", "dropout", "launches", "triton_launches", "aten_launches", "mm_flops", "other_flops", "flops",
           "hbm_bytes", "saved_bytes", "trainable_params", "gpu", "predicted_ms", "ratio_floor", "ratio_peft_dora",
           "ratio_peft_lora",
           "triton_gemm_eff", "predicted_ms_at_cublas_parity", "ratio_floor_at_cublas_parity",
           "ratio_peft_dora_at_cublas_parity", "ratio_peft_lora_at_cublas_parity", "kind"]
PARITY = "_at_cublas_parity"  # the suffix of the columns that run the Triton GEMMs at cuBLAS's rate


PEERS = ("peft_dora", "peft_lora")  # the providers the ratio_peft_dora / ratio_peft_lora columns divide by


def _case_rows(traces, providers, specs, fields, floor=FLOOR, peers=PEERS):
    """The CSV rows of one case: ``traces[provider][gpu]`` (``LayerTrace``) per mode and GPU;
    ``fields``: the case's columns (layer, tokens, in/out features, r, dtypes, bias, dropout);
    ``floor``: the provider the ``ratio_floor`` columns divide by, ``peers`` the ones the
    ``ratio_peft_dora`` / ``ratio_peft_lora`` columns divide by (the QDoRA trace: PEFT's QDoRA and QLoRA)."""
    rows = []
    for g in specs:
        for mode in MODES:
            base, par = {}, {}
            for p in providers:
                c = traces[p][g].mode(mode)
                base[p] = predict_s(c, specs[g])
                par[p] = predict_s(c, specs[g], at_parity=True)
            for p in providers:
                tr = traces[p][g]
                c = tr.mode(mode)
                ms = base[p] * 1e3
                eff = assumed_efficiency(c, specs[g])

                def ratio(q, t=base):
                    return round(t[p] / t[q], 4) if q in t and t[q] > 0 else ""

                rows.append({
                    "provider": p, "mode": mode, **fields, "launches": c.launches,
                    "triton_launches": sum(e.source == "triton" for e in c.events),
                    "aten_launches": sum(e.source == "aten" for e in c.events),
                    "mm_flops": c.mm_flops, "other_flops": c.other_flops, "flops": c.mm_flops + c.other_flops,
                    "hbm_bytes": c.bytes, "saved_bytes": 0 if mode == "eval" else tr.saved,
                    "trainable_params": tr.trainable, "gpu": g,
                    "predicted_ms": round(ms, 5), "ratio_floor": ratio(floor), "ratio_peft_dora": ratio(peers[0]),
                    "ratio_peft_lora": ratio(peers[1]),
                    "triton_gemm_eff": "" if eff is None else round(eff, 4),
                    "predicted_ms" + PARITY: round(par[p] * 1e3, 5), "ratio_floor" + PARITY: ratio(floor, par),
                    "ratio_peft_dora" + PARITY: ratio(peers[0], par),
                    "ratio_peft_lora" + PARITY: ratio(peers[1], par), "kind": "prediction"})
    return rows


def run(shapes, tokens, *, r=16, dtype="bf16", adapter_dtype=None, bias=False, dropout=0.0, providers=PROVIDERS,
        gpus=tuple(GPUS), log=None, traces_out=None, floor=FLOOR, peers=PEERS):
    """Trace every (shape, tokens, provider) and return the CSV rows (one per mode and GPU); the
    ratio columns divide by ``floor`` and ``peers`` (``_case_rows``).

    ``shapes``: ``bench.shapes.Shape`` or (name, in, out); ``gpus``: names of ``GPUS`` or a
    {name: spec} of specs like theirs (the acceptance run passes this GPU's; a spec with
    ``triton_gemm_eff`` predicts the Triton GEMMs at that measured factor). ``traces_out``: a dict
    that receives each ``LayerTrace`` by (layer name, tokens, provider, gpu)."""
    adapter_dtype = adapter_dtype or dtype
    specs = dict(gpus) if isinstance(gpus, dict) else {g: GPUS[g] for g in gpus}
    gpus = tuple(specs)
    case = dict(r=r, dtype=dtype, adapter_dtype=adapter_dtype, bias=bias, dropout=dropout)
    rows = []
    arch_gpus = {}
    for g in gpus:
        arch_gpus.setdefault((tuple(specs[g]["arch"]), specs[g]["sms"]), []).append(g)
    for shape in shapes:
        shape = shape if isinstance(shape, Shape) else Shape(*shape)
        name, fin, fout = shape.name, shape.in_features, shape.out_features
        for n in tokens:
            t0 = time.perf_counter()
            traces = {}
            for p in providers:
                for (arch, sms), gs in arch_gpus.items():
                    # the fused paths plan per arch; bitsandbytes' 4-bit matmul is dispatched per arch
                    if p.startswith("fused") or p in TB.QDORA_PROVIDERS or not traces.get(p):
                        tr = trace_layer(p, shape, n, arch=arch, num_sms=sms, **case)
                    for g in gs:
                        traces.setdefault(p, {})[g] = tr
                        if traces_out is not None:
                            traces_out[(name, n, p, g)] = tr
            rows += _case_rows(traces, providers, specs,
                               dict(layer=name, tokens=n, in_features=fin, out_features=fout, r=r, dtype=dtype,
                                    adapter_dtype=adapter_dtype, bias=int(bias), dropout=dropout), floor, peers)
            if log:
                log(f"  {name:11s} {fin:>5d}->{fout:<5d} tokens {n:>5d}: {time.perf_counter() - t0:5.2f} s")
    return rows


def run_kinds(kinds, *, r=16, dtype="bf16", adapter_dtype=None, providers=TB.KIND_PROVIDERS, gpus=tuple(GPUS),
              shapes=None, log=None, traces_out=None):
    """``run`` for conv / embedding layers (``bench.tables.KIND_SHAPES``, or ``shapes[kind] =
    (name, sizes)``): the rows of every provider of ``providers`` (the floor, ``base``, always
    included), ratios to ``base``. ``tokens``: output positions (conv) or ids (embedding);
    ``in_features``/``out_features``: channels (conv) or vocab/dim (embedding)."""
    adapter_dtype = adapter_dtype or dtype
    specs = dict(gpus) if isinstance(gpus, dict) else {g: GPUS[g] for g in gpus}
    providers = tuple(dict.fromkeys([TB.KIND_FLOOR, "peft_dora", "peft_lora"] + list(providers)))
    arch_gpus = {}
    for g in specs:
        arch_gpus.setdefault((tuple(specs[g]["arch"]), specs[g]["sms"]), []).append(g)
    rows = []
    for kind in kinds:
        name, sizes = (shapes or {}).get(kind, TB.KIND_SHAPES[kind])
        t0 = time.perf_counter()
        traces = {}
        for p in providers:
            for (arch, sms), gs in arch_gpus.items():
                if p.startswith("fused") or not traces.get(p):
                    tr = trace_kind(kind, p, name=name, sizes=sizes, r=r, dtype=dtype, adapter_dtype=adapter_dtype,
                                    arch=arch, num_sms=sms)
                for g in gs:
                    traces.setdefault(p, {})[g] = tr
                    if traces_out is not None:
                        traces_out[(name, p, g)] = tr
        t = P.make_kind_tensors(kind, name, sizes, r, TB.dtype_of(dtype), TB.dtype_of(adapter_dtype), "meta")
        rows += _case_rows(traces, providers, specs,
                           dict(layer=name, tokens=t.tokens, in_features=t.in_features, out_features=t.out_features,
                                r=r, dtype=dtype, adapter_dtype=adapter_dtype, bias=int(t.bias is not None),
                                dropout=0.0), floor=TB.KIND_FLOOR)
        if log:
            log(f"  {name:16s} {kind:9s} ({dtype}, adapters {adapter_dtype}): {time.perf_counter() - t0:5.2f} s")
    return rows


def kind_shape_text(kinds) -> str:
    """One line per layer kind: what the rows trace."""
    out = []
    for kind in kinds:
        name, s = TB.KIND_SHAPES[kind]
        if kind == "conv":
            out.append(f"- `{name}`: PEFT DoRA on a 3x3 `nn.Conv2d` {s['in_ch']}->{s['out_ch']} channels, padding "
                       f"{s['padding']}, bias, input ({s['batch']}, {s['in_ch']}, {s['size']}, {s['size']}) "
                       f"(a Stable-Diffusion UNet block at 512x512 images, batch {s['batch']}); tokens = output "
                       f"positions {s['batch']}x{s['size']}x{s['size']}; floor `base`: the frozen conv, forward + "
                       "input gradient")
        else:
            out.append(f"- `{name}`: PEFT DoRA on an `nn.Embedding` of vocab {s['vocab']}, dim {s['dim']} "
                       f"(Llama-3's), ids ({s['batch']}, {s['seq']}); in_features = vocab, out_features = dim; "
                       "floor `base`: the frozen lookup (it has no backward: its step is the forward)")
    return "\n".join(out)


def _main_kinds(args, argv, specs, kinds) -> int:
    out = args.out or TB.default_out("trace_" + "_".join(kinds))
    a_dtypes = [args.adapter_dtype] if args.adapter_dtype else list(dict.fromkeys([args.dtype, "fp32"]))
    provs = [p for p in args.providers if p in TB.KIND_PROVIDERS] or list(TB.KIND_PROVIDERS)
    print("Dry-run trace (meta tensors; every figure below is a prediction)")
    print(constants_text(specs))
    t0 = time.perf_counter()
    rows = []
    for a in a_dtypes:
        rows += run_kinds(kinds, r=args.r, dtype=args.dtype, adapter_dtype=a, providers=provs, gpus=specs, log=print)
    elapsed = time.perf_counter() - t0
    write_tables(rows, out, specs)
    md = ["# Dry-run trace: DoRA on Conv2d and Embedding layers (predictions, not measurements)", "",
          f"Command: `python -m bench --trace {' '.join(argv)}` ({elapsed:.1f} s); torch {torch.__version__}; "
          "counted on meta tensors (see `bench/trace.py`).", "",
          f"Providers: `fused` (PEFT's DoRA layer after `dora_kernels.fuse`), `peft_dora` (the same unfused), "
          f"`peft_lora` (PEFT's LoRA, same r), `base` (the frozen layer: the floor); r = {args.r}, "
          f"{args.dtype} base, adapters in " + " and ".join(a_dtypes) + " (column `adapter_dtype`). "
          "`x floor` divides by `base`.", "", kind_shape_text(kinds), "", "Constants:", "", "```",
          constants_text(specs), "```", ""]
    for a in a_dtypes:
        sel = [r for r in rows if r["adapter_dtype"] == a]
        md += [f"## Adapters {a}", "", table(sel, mode="step"), "", table(sel, mode="eval"), ""]
    with open(os.path.join(out, "trace.md"), "w") as f:
        f.write("\n".join(md))
    for a in a_dtypes:
        print(f"\nadapters {a}")
        print(table([r for r in rows if r["adapter_dtype"] == a], mode="step"))
    print(f"\nwrote {out}/trace.csv, trace.md, trace_constants.json")
    print(f"traced in {elapsed:.1f} s")
    return 0


def launch_list(provider: str, shape: Shape, tokens: int, mode: str, **case) -> list:
    """The launches (names, in order) of one mode (``case``: ``trace_layer``'s options): for reading
    and for tests."""
    return [e.name for e in trace_layer(provider, shape, tokens, **case).mode(mode).events]


# ---------------------------------------------------------------------------------------------
# targets (issue 7), judged on the trace

def _find(rows, **kw):
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def targets(rows, gpu="H100-SXM"):
    """[(target, met, detail)] for the issue's three targets (H100, bf16, r = 16, no dropout or
    bias, Llama-3-8B projections); empty where the rows do not cover them. Time targets are
    judged on the prediction (Triton GEMMs at the assumed efficiency); the detail adds the
    figure at cuBLAS parity, the bound."""
    out = []
    rows = [r for r in rows if r["r"] == 16 and r["dtype"] == "bf16" and not r["dropout"] and not r["bias"]]
    layers = sorted({r["layer"] for r in rows if r["layer"].startswith("8B")})
    have = {(r["layer"], r["tokens"]) for r in rows}

    def one(layer, n, mode, p):
        got = _find(rows, provider=p, mode=mode, layer=layer, tokens=n, gpu=gpu)
        return got[0] if got else None

    def worst_ratio(tokens, mode, field):
        """(largest fused ``field``, layer, tokens) over the layers and token counts, or None."""
        worst = None
        for layer in layers:
            for n in tokens:
                f = one(layer, n, mode, "fused") if (layer, n) in have else None
                if f is not None and f.get(field, "") != "" and (worst is None or f[field] > worst[0]):
                    worst = (f[field], layer, n)
        return worst

    def ratio_target(name, tokens, mode, field, limit):
        worst = worst_ratio(tokens, mode, field)
        if not worst:
            return
        detail = f"worst {worst[0]:.3f}x at {worst[1]} N={worst[2]} ({(worst[0] / limit - 1) * 100:+.1f}% vs target)"
        bound = worst_ratio(tokens, mode, field + PARITY)
        if bound:
            detail += (f"; at cuBLAS parity {bound[0]:.3f}x at {bound[1]} N={bound[2]} "
                       f"({'met' if bound[0] <= limit else 'missed'} there)")
        out.append((name, worst[0] <= limit, detail))

    ratio_target("fused fwd+bwd <= 1.10x floor (4096, 16384 tokens)", (4096, 16384), "step", "ratio_floor", 1.10)
    worst = None
    for layer in layers:
        for n in (4096, 16384):
            if (layer, n) not in have:
                continue
            f, lo = one(layer, n, "fwd", "fused"), one(layer, n, "fwd", "peft_lora")
            if f is None or lo is None:
                continue
            budget = 1.05 * lo["saved_bytes"]
            over = f["saved_bytes"] - budget
            if worst is None or over / budget > worst[0] / worst[3]:
                worst = (over, layer, n, budget, f["saved_bytes"], lo["saved_bytes"])
    if worst:
        over, layer, n, budget, fs, ls = worst
        out.append(("fused saved (with the output) <= 1.05x PEFT LoRA's", over <= 0,
                    f"worst {layer} N={n}: fused {fs / 2**20:.2f} MiB vs budget {budget / 2**20:.2f} MiB "
                    f"(LoRA {ls / 2**20:.2f} MiB); {'over' if over > 0 else 'under'} by {abs(over) / 2**10:.1f} KiB "
                    f"({over / budget * 100:+.2f}%)"))
    ratio_target("fused eval forward <= 1.05x PEFT LoRA (1-256 tokens)", (1, 16, 64, 256), "eval", "ratio_peft_lora",
                 1.05)
    return out


# ---------------------------------------------------------------------------------------------
# output

def _fmt_bytes(b):
    return f"{b / 2**20:.1f}"


def table(rows, gpu="H100-SXM", mode="step", peers=("PEFT DoRA", "PEFT LoRA")) -> str:
    """A markdown table of one GPU and mode: per shape and token count, one line per provider;
    ``peers``: what the ``ratio_peft_dora`` / ``ratio_peft_lora`` columns divide by."""
    sel = [r for r in rows if r["gpu"] == gpu and r["mode"] == mode]
    d, lo = peers
    lines = [f"### {gpu}, mode `{mode}` (predicted; GEMM eff: the Triton GEMMs' assumed efficiency vs cuBLAS, "
             "the parity columns the bound at 1.0)", "",
             f"| layer | tokens | provider | launches | GFLOP | HBM MiB | saved MiB | GEMM eff | ms | x floor "
             f"| x {d} | x {lo} | ms at parity | x floor at parity | x {d} at parity "
             f"| x {lo} at parity |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sel:
        eff = r.get("triton_gemm_eff", "")
        lines.append(f"| {r['layer']} | {r['tokens']} | {r['provider']} | {r['launches']} | {r['flops'] / 1e9:.2f} | "
                     f"{_fmt_bytes(r['hbm_bytes'])} | {_fmt_bytes(r['saved_bytes'])} | "
                     f"{'-' if eff == '' else f'{eff:.2f}'} | {r['predicted_ms']:.4f} | "
                     f"{r['ratio_floor']} | {r['ratio_peft_dora']} | {r['ratio_peft_lora']} | "
                     f"{r['predicted_ms' + PARITY]:.4f} | {r['ratio_floor' + PARITY]} | "
                     f"{r['ratio_peft_dora' + PARITY]} | {r['ratio_peft_lora' + PARITY]} |")
    return "\n".join(lines)


def constants_text(gpus=None) -> str:
    gpus = GPUS if gpus is None else gpus
    lines = [f"launch overhead: {LAUNCH_OVERHEAD_S * 1e6:.1f} us per launch"]
    for g, v in gpus.items():
        fixed = v.get("triton_gemm_eff")
        lines.append(f"{g}: bf16/fp16 matmul {v['mm'] / 1e12:.0f} TFLOP/s reachable ({v['mm_nominal'] / 1e12:.0f} "
                     f"nominal); fp32 {v['fp32'] / 1e12:.0f} ({v['fp32_nominal'] / 1e12:.1f}); HBM "
                     f"{v['bw'] / 1e12:.2f} TB/s reachable ({v['bw_nominal'] / 1e12:.2f} nominal); plans for "
                     f"sm_{v['arch'][0]}{v['arch'][1]}, {v['sms']} SMs"
                     + (f"; Triton GEMMs at {fixed:.3f} of cuBLAS (measured: {v.get('triton_gemm_eff_source', '-')})"
                        if fixed is not None else ""))
    pts = ", ".join(f"{f / 1e9:.1f} GFLOP {e:.2f}" for f, e, _ in TRITON_GEMM_POINTS)
    lines.append("Triton GEMMs (the package's bf16/fp16 tensor-core launches; ATen/cuBLAS and fp32 launches at 1.0): "
                 f"efficiency vs cuBLAS piecewise-linear in log(FLOPs of the launch) through {pts} (2048^3, 2560^3, "
                 "2816^3, 3072^3: triton issue #3672, H100 fp16, tutorial 03 kernel; 8192x8192x512: triton PR #5726, "
                 "H100), constant outside; TMA/persistent kernels reach 0.92-1.05, the package's kernels are "
                 "pointer-based")
    lines.append("predicted ms and ratios: Triton GEMMs at that efficiency; *_at_cublas_parity / 'at parity': at 1.0, "
                 "the upper bound")
    lines.append("per launch: max(matmul FLOPs / (matmul peak x efficiency) + other FLOPs / fp32 peak, bytes / HBM) "
                 "+ overhead")
    return "\n".join(lines)


def plot(rows, path, gpu="H100-SXM") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 7.5), squeeze=False)
    for j, layer in enumerate(layers):
        for i, mode in enumerate(("step", "eval")):
            ax = axes[i][j]
            styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
            markers = ["o", "s", "^", "v", "D", "x"]
            for i, p in enumerate(dict.fromkeys(r["provider"] for r in rows)):
                pts = sorted((r["tokens"], r["ratio_floor"]) for r in rows
                             if r["gpu"] == gpu and r["mode"] == mode and r["layer"] == layer and r["provider"] == p)
                if pts:  # distinct dashes and markers: coinciding providers (fused / fused_peft) stay visible
                    ax.plot([a for a, _ in pts], [b for _, b in pts], marker=markers[i % 6], linestyle=styles[i % 6],
                            markersize=4, label=p)
                if p == "fused":  # the bound: the Triton GEMMs at cuBLAS's rate
                    pts = sorted((r["tokens"], r["ratio_floor" + PARITY]) for r in rows if r["gpu"] == gpu
                                 and r["mode"] == mode and r["layer"] == layer and r["provider"] == p)
                    if pts:
                        ax.plot([a for a, _ in pts], [b for _, b in pts], color="grey", linestyle=":", linewidth=1,
                                marker=".", markersize=3, label="fused at cuBLAS parity")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{layer} {mode}", fontsize=9)
            ax.set_xlabel("tokens")
            if j == 0:
                ax.set_ylabel("predicted time / frozen linear")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Dry-run trace, {gpu}, predicted (roofline of counted launches; Triton GEMMs at the assumed "
                 "efficiency vs cuBLAS, grey: at parity)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


DVORA_R = 256  # the DVoRA rank, against fused DoRA at r = 16
DVORA_LIMIT = 1.25


def dvora_targets(rows_dvora, rows_dora16, *, gpu="H100-SXM", tokens=4096) -> list:
    """(layer, fused DVoRA step ms at its r, fused DoRA step ms at r = 16, ratio, ok) for the
    Llama-3-8B projections: the DVoRA target is a step within ``DVORA_LIMIT`` of DoRA's."""
    out = []
    for r in rows_dvora:
        if (r["provider"], r["mode"], r["gpu"], r["tokens"]) != ("fused_dvora", "step", gpu, tokens) \
                or not r["layer"].startswith("8B"):
            continue
        (d,) = _find(rows_dora16, provider="fused", mode="step", gpu=gpu, tokens=tokens, layer=r["layer"])
        ratio = r["predicted_ms"] / d["predicted_ms"]
        parity = r["predicted_ms" + PARITY] / d["predicted_ms" + PARITY]
        out.append((r["layer"], r["predicted_ms"], d["predicted_ms"], round(ratio, 3), ratio <= DVORA_LIMIT,
                    round(parity, 3)))
    return out


def dvora_text(rows_dvora, rows_dora16) -> str:
    lines = [f"DVoRA step at r = {rows_dvora[0]['r']} against the fused DoRA step at r = 16 (H100, 4096 tokens; "
             f"target <= {DVORA_LIMIT}x; the Triton GEMM efficiency of the trace, and the ratio at cuBLAS parity):", "",
             "| layer | fused DVoRA ms | fused DoRA r=16 ms | ratio | target | ratio at cuBLAS parity |",
             "|---|---:|---:|---:|---|---:|"]
    for layer, a, b, ratio, ok, parity in dvora_targets(rows_dvora, rows_dora16):
        lines.append(f"| {layer} | {a:.4f} | {b:.4f} | {ratio} | {'met' if ok else 'MISSED'} | {parity} |")
    trainable = {(r["provider"], r["layer"]): r["trainable_params"] for r in rows_dvora
                 if r["mode"] == "step" and r["gpu"] == "H100-SXM"}
    lines += ["", "Trainable parameters per layer:", "", "| layer | " + " | ".join(
        ["fused_dvora", "peft_vera", f"fused (DoRA r={rows_dvora[0]['r']})", "fused (DoRA r=16)"]) + " |",
        "|---|---:|---:|---:|---:|"]
    for layer in dict.fromkeys(r["layer"] for r in rows_dvora):
        lines.append(f"| {layer} | {trainable.get(('fused_dvora', layer), '-')} | "
                     f"{trainable.get(('peft_vera', layer), '-')} | {trainable.get(('fused', layer), '-')} | "
                     f"{next((r['trainable_params'] for r in rows_dora16 if r['layer'] == layer and r['provider'] == 'fused'), '-')} |")
    return "\n".join(lines)


QDORA_PEERS = ("peft_qdora", "peft_qlora")  # the QDoRA trace's ratio_peft_dora / ratio_peft_lora
QDORA_PEER_NAMES = ("PEFT QDoRA", "PEFT QLoRA")
QDORA_DORA_LIMIT = 0.5  # fused QDoRA step <= half PEFT QDoRA's
# (name, mode, tokens, ratio column, limit): the QDoRA targets, judged per layer and token count
QDORA_TARGETS = (
    (f"fused QDoRA step <= {QDORA_DORA_LIMIT}x PEFT QDoRA ({', '.join(map(str, TB.QDORA_STEP_TOKENS))} tokens)",
     "step", TB.QDORA_STEP_TOKENS, "ratio_peft_dora", QDORA_DORA_LIMIT),
    (f"fused QDoRA step <= PEFT QLoRA ({', '.join(map(str, TB.QDORA_STEP_TOKENS))} tokens)",
     "step", TB.QDORA_STEP_TOKENS, "ratio_peft_lora", 1.0),
    (f"fused QDoRA eval forward <= bitsandbytes QLoRA's (PEFT QLoRA eval; "
     f"{', '.join(map(str, TB.QDORA_EVAL_TOKENS))} tokens)", "eval", TB.QDORA_EVAL_TOKENS, "ratio_peft_lora", 1.0),
)


def run_qdora(shapes, tokens=None, *, r=16, dtype="bf16", adapter_dtype=None, bias=False, dropout=0.0,
              gpus=tuple(GPUS), log=None):
    """``run`` for the QDoRA providers (``bench.tables.QDORA_PROVIDERS``: a bitsandbytes 4-bit base in
    ``QDORA_FORMAT``), ratios to ``qlora_floor`` and to PEFT's QDoRA and QLoRA; by default at the
    step's and the eval targets' token counts. Returns (rows, notes): a provider whose package is
    missing is left out, with a note ("unavailable: bitsandbytes is not installed")."""
    tokens = tuple(tokens) if tokens else tuple(sorted(set(TB.QDORA_STEP_TOKENS) | set(TB.QDORA_EVAL_TOKENS)))
    notes, providers = [], []
    for p in TB.QDORA_PROVIDERS:
        why = P.check_installed(p)
        if why:
            notes.append(f"{p} unavailable: {why}")
        else:
            providers.append(p)
    if not providers:
        return [], notes
    rows = run(shapes, tokens, r=r, dtype=dtype, adapter_dtype=adapter_dtype, bias=bias, dropout=dropout,
               providers=tuple(providers), gpus=gpus, log=log, floor=TB.QDORA_FLOOR, peers=QDORA_PEERS)
    return rows, notes


def qdora_cases(rows, gpu="H100-SXM") -> list:
    """Per target of ``QDORA_TARGETS``, layer and token count: (target, layer, tokens, ratio or None,
    limit, met or None, ratio at cuBLAS parity or None); None where the rows do not cover it."""
    out = []
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for name, mode, tokens, column, limit in QDORA_TARGETS:
        for layer in layers:
            for n in tokens:
                got = _find(rows, provider="fused_qdora", mode=mode, layer=layer, tokens=n, gpu=gpu)
                v = got[0].get(column, "") if got else ""
                if v == "":
                    out.append((name, layer, n, None, limit, None, None))
                    continue
                par = got[0].get(column + PARITY, "")
                out.append((name, layer, n, v, limit, v <= limit, None if par == "" else par))
    return out


def qdora_targets(rows, gpu="H100-SXM") -> list:
    """[(target, met, detail)] of ``QDORA_TARGETS`` (met: every layer and token count; None where
    no row covers it), the worst case in the detail with its figure at cuBLAS parity."""
    out = []
    cases = qdora_cases(rows, gpu)
    for name, _, _, _, limit in QDORA_TARGETS:
        mine = [c for c in cases if c[0] == name and c[3] is not None]
        if not mine:
            out.append((name, None, "not covered (no fused_qdora rows or no peer rows)"))
            continue
        worst = max(mine, key=lambda c: c[3])
        missed = sum(not c[5] for c in mine)
        detail = (f"worst {worst[3]:.3f}x at {worst[1]} N={worst[2]} ({(worst[3] / limit - 1) * 100:+.1f}% vs "
                  f"target); {missed} of {len(mine)} cases missed")
        pars = [c for c in mine if c[6] is not None]
        if pars:
            wp = max(pars, key=lambda c: c[6])
            detail += (f"; at cuBLAS parity worst {wp[6]:.3f}x at {wp[1]} N={wp[2]} "
                       f"({'met' if wp[6] <= limit else 'missed'} there)")
        out.append((name, missed == 0, detail))
    return out


def _verdict(ok) -> str:
    return "not covered" if ok is None else ("met" if ok else "MISSED")


def qdora_text(rows, gpu="H100-SXM") -> str:
    """The QDoRA targets (summary and per case), the fused path's launches and the saved bytes."""
    lines = [f"Targets ({gpu}; `x PEFT QDoRA` / `x PEFT QLoRA` = fused_qdora's predicted time over theirs; "
             "judged on the predicted time, the figure with the Triton GEMMs at cuBLAS parity beside it):", ""]
    lines += [f"- **{_verdict(ok)}**: {name} — {detail}" for name, ok, detail in qdora_targets(rows, gpu)]
    lines += ["", "| target | layer | tokens | ratio | limit | verdict | ratio at cuBLAS parity |",
              "|---|---|---:|---:|---:|---|---:|"]
    for name, layer, n, v, limit, ok, par in qdora_cases(rows, gpu):
        lines.append(f"| {name} | {layer} | {n} | {'-' if v is None else v} | {limit} | {_verdict(ok)} | "
                     f"{'-' if par is None else par} |")
    step = [r for r in rows if r["gpu"] == gpu and r["mode"] == "step" and r["tokens"] in TB.QDORA_STEP_TOKENS]
    floors = [(r["layer"], r["tokens"], r["predicted_ms"] / q[0]["predicted_ms"]) for r in step
              if r["provider"] == TB.QDORA_FLOOR
              for q in [_find(step, provider="peft_qdora", layer=r["layer"], tokens=r["tokens"])] if q]
    if floors:
        lines += ["", f"The floor bounds any implementation: {TB.QDORA_FLOOR}'s step (dequantise and both GEMMs, "
                  "nothing else) over PEFT QDoRA's: " + ", ".join(f"{l} N={n} {v:.3f}" for l, n, v in floors)
                  + " (a target below it cannot be met)."]
    fused = [r for r in step if r["provider"] == "fused_qdora"]
    if fused:
        lines += ["", "How the fused path ran (launches of the step, as the package's code issued them on meta "
                  "tensors under the launch recorder: the branch a GPU takes):", ""]
        lines += [f"- {r['layer']} N={r['tokens']}: {r['launches']} launches, {r['triton_launches']} Triton, "
                  f"{r['aten_launches']} torch ops" for r in fused]
    layers = list(dict.fromkeys(r["layer"] for r in step))
    if layers:
        lines += ["", f"Saved for backward (MiB, the output included; parameters and the 4-bit weight excluded), "
                  f"step at {', '.join(map(str, TB.QDORA_STEP_TOKENS))} tokens:", "",
                  "| layer | tokens | " + " | ".join(TB.QDORA_PROVIDERS) + " | fused / PEFT QLoRA |",
                  "|---|---:|" + "---:|" * (len(TB.QDORA_PROVIDERS) + 1)]
        for layer in layers:
            for n in TB.QDORA_STEP_TOKENS:
                got = {r["provider"]: r["saved_bytes"] for r in step if r["layer"] == layer and r["tokens"] == n}
                if not got:
                    continue
                f, lo = got.get("fused_qdora"), got.get("peft_qlora")
                lines.append(f"| {layer} | {n} | " + " | ".join(
                    _fmt_bytes(got[p]) if p in got else "-" for p in TB.QDORA_PROVIDERS)
                    + f" | {round(f / lo, 4) if f is not None and lo else '-'} |")
    return "\n".join(lines)


def write_tables(rows, out_dir, gpus=None):
    """trace.csv (``COLUMNS``) and trace_constants.json into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "trace.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, "trace_constants.json"), "w") as f:
        json.dump(constants(gpus), f, indent=1)


def write(rows, out_dir, *, argv=(), elapsed=None, gpus=None):
    write_tables(rows, out_dir, gpus)
    tg = targets(rows)
    md = ["# Dry-run trace of one DoRA layer step (predictions, not measurements)", "",
          f"Command: `python -m bench --trace {' '.join(argv)}`" + (f" ({elapsed:.1f} s)" if elapsed else ""),
          f"torch {torch.__version__}; counted on meta tensors (see `bench/trace.py`).", "", "Constants:", "",
          "```", constants_text(gpus), "```", "",
          f"## Targets (H100, bf16, r=16, Llama-3-8B projections; adapters {rows[0]['adapter_dtype'] if rows else '-'})",
          ""]
    md += [f"- **{'met' if ok else 'MISSED'}**: {name} — {detail}" for name, ok, detail in tg] or ["- (not covered)"]
    md += ["", table(rows, mode="step"), "", table(rows, mode="eval"), ""]
    with open(os.path.join(out_dir, "trace.md"), "w") as f:
        f.write("\n".join(md))
    return plot(rows, os.path.join(out_dir, "trace.png")), tg


def gpu_specs(gemm_efficiency=None) -> dict:
    """Copies of ``GPUS`` to predict with. ``gemm_efficiency``: a number (every GPU's Triton GEMMs
    at that fraction of cuBLAS's rate) or the path of the ``gemm_efficiency.json`` an acceptance
    run wrote (its GPU's row at the factor it measured; the others keep the published-points
    function)."""
    specs = {k: dict(v) for k, v in GPUS.items()}
    if gemm_efficiency is None:
        return specs
    try:
        eff, keys, src = float(gemm_efficiency), list(specs), "--gemm-efficiency"
    except ValueError:
        with open(gemm_efficiency) as f:
            data = json.load(f)
        eff, keys, src = data.get("efficiency"), [data.get("constants")], f"{gemm_efficiency} ({data.get('gpu')})"
        if eff is None or keys[0] not in specs:
            raise ValueError(f"{gemm_efficiency}: no measured efficiency for one of {', '.join(specs)}") from None
    if not 0 < eff:
        raise ValueError(f"a GEMM efficiency must be positive, not {eff}")
    for k in keys:
        specs[k].update(triton_gemm_eff=float(eff), triton_gemm_eff_source=src)
    return specs


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if a != "--trace"]
    ap = argparse.ArgumentParser(prog="python -m bench --trace", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset (2 shapes, 4 token counts): well under a minute")
    ap.add_argument("--out", default=None, help="output folder (default ./bench_results/trace[_quick] under the "
                                                "current directory)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=sorted(TB.DTYPES))
    ap.add_argument("--adapter-dtype", default=None, choices=sorted(TB.DTYPES),
                    help="adapters' dtype (default: the model's; PEFT's get_peft_model default on bf16 is fp32)")
    ap.add_argument("--bias", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=PROVIDERS + TB.DVORA_PROVIDERS + (TB.KIND_FLOOR,))
    ap.add_argument("--dvora", action="store_true",
                    help=f"DVoRA rows: fused DVoRA, PEFT VeRA and fused DoRA at --r (default {DVORA_R}), fused DoRA at "
                         "r = 16, the Llama-3-8B projections at 4096 tokens, and the DVoRA target")
    q_tokens = ", ".join(map(str, sorted(set(TB.QDORA_STEP_TOKENS) | set(TB.QDORA_EVAL_TOKENS))))
    ap.add_argument("--qdora", action="store_true",
                    help="QDoRA rows: PEFT QDoRA, fused QDoRA (PEFT's after dora_kernels.fuse), PEFT QLoRA and the "
                         "frozen Linear4bit (the floor) on a bitsandbytes nf4 base (double quantisation, blocksize "
                         f"64), the Llama-3-8B projections at {q_tokens} tokens (--tokens: others), and the QDoRA "
                         "targets")
    ap.add_argument("--layers", default=None, metavar="conv,embedding",
                    help="trace DoRA on other layer kinds instead of the Linear projections: conv (a Stable-Diffusion "
                         "UNet 3x3 Conv2d) and/or embedding (a 128k-vocab Embedding); providers fused (PEFT after "
                         "dora_kernels.fuse), peft_dora, peft_lora and base (the frozen layer, the floor); adapters in "
                         "--adapter-dtype, or both the model's dtype and fp32 without it")
    ap.add_argument("--gemm-efficiency", default=None, metavar="X|JSON",
                    help="the package's Triton GEMMs at this fraction of cuBLAS on every GPU, or the "
                         "gemm_efficiency.json of an acceptance run (its GPU at the measured factor); default: the "
                         "published-points function (triton_gemm_efficiency)")
    args = ap.parse_args(argv)
    try:
        specs = gpu_specs(args.gemm_efficiency)
    except (OSError, ValueError, KeyError) as e:
        ap.error(f"--gemm-efficiency: {e}")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    tokens = tuple(args.tokens) if args.tokens else (QUICK_TOKENS if args.quick else TOKENS)
    if args.dvora:
        return _main_dvora(args, argv, specs, shapes)
    if args.qdora:
        return _main_qdora(args, argv, specs, shapes)
    kinds = [k for k in (args.layers or "").split(",") if k.strip()]
    bad = [k for k in kinds if k not in TB.LAYER_KINDS]
    if bad:
        ap.error(f"--layers: unknown {', '.join(bad)} (one of {', '.join(TB.LAYER_KINDS)})")
    if kinds and "linear" in kinds:
        ap.error("--layers: linear is the default trace; ask for conv and/or embedding here")
    if kinds:
        return _main_kinds(args, argv, specs, kinds)
    if TB.KIND_FLOOR in args.providers:
        ap.error(f"--providers {TB.KIND_FLOOR}: the floor of --layers conv,embedding (the Linear trace's is {FLOOR})")
    providers = tuple(dict.fromkeys([FLOOR, "peft_dora", "peft_lora"] + list(args.providers)))
    out = args.out or TB.default_out("trace_quick" if args.quick else "trace")
    print("Dry-run trace (meta tensors; every figure below is a prediction)")
    print(constants_text(specs))
    t0 = time.perf_counter()
    rows = run(shapes, tokens, r=args.r, dtype=args.dtype, adapter_dtype=args.adapter_dtype, bias=args.bias,
               dropout=args.dropout, providers=providers, gpus=specs, log=print)
    elapsed = time.perf_counter() - t0
    plotted, tg = write(rows, out, argv=argv, elapsed=elapsed, gpus=specs)
    print()
    print(table(rows, mode="step"))
    print()
    print("Targets (H100, bf16, r=16, Llama-3-8B projections):")
    for name, ok, detail in tg:
        print(f"  {'met   ' if ok else 'MISSED'} {name}: {detail}")
    print(f"\nwrote {out}/trace.csv, trace.md, trace_constants.json" + (", trace.png" if plotted else
                                                                         " (no plot: matplotlib missing)"))
    print(f"traced in {elapsed:.1f} s")
    return 0


def _main_dvora(args, argv, specs, shapes) -> int:
    r = args.r if "--r" in argv else DVORA_R
    out = args.out or TB.default_out("trace_dvora")
    t0 = time.perf_counter()
    common = dict(dtype=args.dtype, adapter_dtype=args.adapter_dtype, bias=args.bias, dropout=args.dropout,
                  gpus=specs)
    rows = run(shapes, (4096,), r=r, providers=(FLOOR, "fused", "fused_dvora", "peft_vera"), **common)
    rows16 = run(shapes, (4096,), r=16, providers=(FLOOR, "fused"), **common)
    elapsed = time.perf_counter() - t0
    write_tables(rows + rows16, out, specs)
    text = dvora_text(rows, rows16)
    md = ["# Dry-run trace: DVoRA (predictions, not measurements)", "",
          f"Command: `python -m bench --trace {' '.join(argv)}` ({elapsed:.1f} s); torch {torch.__version__}; "
          "counted on meta tensors (see `bench/trace.py`).", "", "Constants:", "", "```", constants_text(specs), "```",
          "", text, "", table(rows + rows16, mode="step"), ""]
    with open(os.path.join(out, "trace.md"), "w") as f:
        f.write("\n".join(md))
    print(text)
    print(f"\nwrote {out}/trace.csv, trace.md")
    return 0


def _main_qdora(args, argv, specs, shapes) -> int:
    out = args.out or TB.default_out("trace_qdora_quick" if args.quick else "trace_qdora")
    shapes = [s for s in shapes if s.name.startswith("8B")]
    print("Dry-run trace: QDoRA (meta tensors; every figure below is a prediction)")
    print(constants_text(specs))
    print(BNB_RULE)
    t0 = time.perf_counter()
    rows, notes = run_qdora(shapes, args.tokens, r=args.r, dtype=args.dtype, adapter_dtype=args.adapter_dtype,
                            bias=args.bias, dropout=args.dropout, gpus=specs, log=print)
    elapsed = time.perf_counter() - t0
    for n in notes:
        print(f"note: {n}")
    if not rows:
        print("no QDoRA provider can run here: nothing written", file=sys.stderr)
        return 2
    write_tables(rows, out, specs)
    text = qdora_text(rows)
    fmt = TB.QDORA_FORMAT
    a_dtype = rows[0]["adapter_dtype"]
    md = ["# Dry-run trace: QDoRA (predictions, not measurements)", "",
          f"Command: `python -m bench --trace {' '.join(argv)}` ({elapsed:.1f} s); torch {torch.__version__}; "
          "counted on meta tensors (see `bench/trace.py`).", "",
          f"Base: a bitsandbytes `Linear4bit`, {fmt['quant_type']}, double quantisation "
          f"(compress_statistics={fmt['compress_statistics']}), blocksize {fmt['blocksize']}, compute dtype "
          f"{args.dtype}; r = {args.r}, adapters {a_dtype}. Providers: `peft_qdora` (PEFT's "
          "`lora.bnb.Linear4bit` with DoRA, what PEFT runs today), `fused_qdora` (the same after "
          "`dora_kernels.fuse`), `peft_qlora` (PEFT's LoRA over the same base), `qlora_floor` (the frozen "
          "`Linear4bit`: forward and input gradient). Here `x floor` divides by `qlora_floor`, `x PEFT QDoRA` by "
          "`peft_qdora`, `x PEFT QLoRA` by `peft_qlora` (in trace.csv: `ratio_floor`, `ratio_peft_dora`, "
          "`ratio_peft_lora`).", ""]
    md += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    md += ["Constants:", "", "```", constants_text(specs), BNB_RULE, "```", "", text, ""]
    step = [r for r in rows if r["tokens"] in TB.QDORA_STEP_TOKENS]
    ev = [r for r in rows if r["tokens"] in TB.QDORA_EVAL_TOKENS]
    md += [table(step, mode="step", peers=QDORA_PEER_NAMES), "", table(ev, mode="eval", peers=QDORA_PEER_NAMES), ""]
    with open(os.path.join(out, "trace.md"), "w") as f:
        f.write("\n".join(md))
    print()
    print(table(step, mode="step", peers=QDORA_PEER_NAMES))
    print()
    print(text)
    print(f"\nwrote {out}/trace.csv, trace.md, trace_constants.json")
    print(f"traced in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
