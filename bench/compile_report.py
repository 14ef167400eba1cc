"""Compile report: every Triton kernel of the package, in every config its launchers choose,
compiled ahead of time for sm_80 / sm_90 (or other archs) without a GPU.

``python -m bench.compile_report [--out DIR] [--arch 80,90] [--quick] [--jobs 2] [--reuse CSV --verify N]``

How the configs are found: the launchers themselves run on meta tensors inside
``dora_kernels.runtime.recording`` and ``trace_target(arch)`` (so the configs are exactly what
the heuristics return for that GPU), through the public op (``dora_linear``: forward, backward,
eval) and ``dropout_mask``, over

* the benchmark's shapes: Llama-3-8B q/k/v/o/gate/up/down (4096→4096, 4096→1024, 4096→14336,
  14336→4096) and a 70B up (8192→28672); tokens 1, 16, 64, 256, 4096, 16384; r 8, 16, 64,
  256; fp32, fp16, bf16, and bf16/fp16 bases with fp32 adapters (PEFT's default on a
  half-precision model);
* a coverage sweep over every bucket edge of the heuristics (tokens and ranks at and around
  each power of two, an aligned and an odd layer), and every dtype pair the op accepts with
  ``allow_tf32`` off and on (it picks the dots' precision), so that every config the
  heuristics can return is compiled at least once (tests/test_compile_report.py checks this
  on random shapes);
* four flag sets per shape — (dropout, bias, need_dx, exact norm grad) = (0,0,1,0),
  (0,1,0,1), (1,1,1,0), (1,0,0,1) — which give every pair of values of any two flags; each
  set runs a training step and an eval forward, so the kernels' own flags (derived from
  these and from the mode) meet in every combination the op reaches.

Each recorded launch (kernel object + actual arguments) is specialised with the JIT's own
binder for the target (integers equal to 1 become constexprs, integers and pointers divisible
by 16 get ``tt.divisibility``, …), deduplicated on (kernel, arch, signature, constexprs,
attributes, options), and compiled once with ``triton.compile(ASTSource(...), target=GPUTarget)``
in a process pool. Registers and the stack frame (``STACK``) come from the wheel's ``cuobjdump
--dump-resource-usage``; where STACK is not zero, ptxas (the one triton uses for that arch)
is run once more with ``-v`` and its "bytes spill stores" is the spill figure (a stack frame
can also hold other things). Shared memory is
the kernel's ``metadata.shared``, checked against ``heuristics.SHARED_LIMIT``; ``mma`` is the
best tensor-core instruction in the PTX (tcgen05 > wgmma > mma.sync > none).

Writes ``compile_report.csv`` and ``compile_report.md`` into ``--out`` (default
``./bench_results/compile_report`` under the current directory; the committed report is made
with ``--out bench/results``). Results are cached (``~/.cache/dora_kernels/compile_report``) by kernel
source, triton version and compile key, so a re-run recompiles only what changed. Each row
carries its ``key`` (the same, minus machine paths): ``--reuse bench/results/compile_report.csv``
takes the committed results for the compiles whose key is listed there (same kernel source,
triton version and inputs), compiles the rest, and ``--verify N`` compiles N of the reused ones
again and flags any that differ (``origin`` says which way each row came).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import functools
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from bench.tables import ALL_PAIRS, DTYPE_PAIRS, DTYPES  # noqa: F401  (the dtype tables: bench/tables.py)
from bench.tables import ARCH_SMS as SMS
from bench.tables import COMPILE_SHAPES as BENCH_SHAPES
from bench.tables import COMPILE_TOKENS as BENCH_TOKENS

DEFAULT_ARCHS = (80, 90)
BENCH_RANKS = (8, 16, 64, 256)
# (dropout, bias, need_dx, exact norm gradient): every pair of values of any two flags
FLAG_SETS = [(0, 0, 1, 0), (0, 1, 0, 1), (1, 1, 1, 0), (1, 0, 0, 1)]
COVER_SHAPES = [(4096, 4096), (1000, 520)]
COVER_TOKENS = (2, 17, 32, 33, 48, 63, 65, 127, 128, 129, 16383, 16385)
COVER_RANKS = (1, 16, 17, 32, 33, 64, 65)
# every dtype pair × tf32 on and off (``torch.backends.cuda.matmul.allow_tf32`` picks the dots'
# precision), at one token count per tile bucket and one rank per rank-chunk bucket
EDGE_TOKENS = (1, 17, 33, 64, 128, 16384)
EDGE_RANKS = (1, 17)
QUICK = {"shapes": [(4096, 4096)], "tokens": (1, 64, 4096), "ranks": (16,),  # (+ nf4 and int8 W0s in bf16)
         "dtypes": [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")], "flags": [(0, 0, 1, 0), (1, 1, 1, 0)],
         "cover": False}
GEMM_KERNELS = ("_fwd_kernel", "_dx_kernel")
SEED = 1234567  # a typical dropout seed: neither 1 nor a multiple of 16

COLUMNS = ["kernel", "config", "dtype", "arch", "registers", "spill_bytes", "shared_bytes", "shared_limit", "mma",
           "mma_all", "num_warps", "num_stages", "specialization", "uses", "example", "source", "status",
           "stack_bytes", "ptxas_spill", "compile_s", "key", "origin", "types"]
# what a compile gives (the rest of a row comes from the job)
RESULT_FIELDS = ("registers", "spill_bytes", "shared_bytes", "mma", "mma_all", "stack_bytes", "ptxas_spill",
                 "compile_s")


# ---------------------------------------------------------------------------------------------
# tools

def tool(name: str) -> str | None:
    """Path of the wheel's ``ptxas`` / ``cuobjdump`` (or one on PATH), or None."""
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p) and os.access(p, os.X_OK):
            return p
    except ImportError:
        pass
    from shutil import which

    return which(name)


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for sm_<arch> (a newer one for recent archs)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:
        return tool("ptxas")


def tools_available() -> bool:
    return tool("ptxas") is not None and tool("cuobjdump") is not None


# ---------------------------------------------------------------------------------------------
# the launches the launchers choose (meta tensors)

@dataclass(frozen=True)
class Case:
    in_f: int
    out_f: int
    tokens: int
    r: int
    dtype: str
    adapter: str
    dropout: int
    bias: int
    need_dx: int
    exact: int
    source: str
    tf32: int = 0
    frozen_a: int = 0  # lora_A needs no gradient (DVoRA's shared projection): no dA partials
    quant: str = ""  # a quantised W0 (QDoRA): "nf4" (nested absmax) or "int8"
    wdtype: str = ""  # the quantised W0's dtype where it is not x's
    dvora: str = ""  # DVoRA's factor alone (_dvora_cases): vera_B's dtype; dtype, adapter: λ_d's, λ_b's

    @property
    def label(self):
        d = self.dtype if self.adapter == self.dtype else f"{self.dtype}+{self.adapter}"
        return (f"{self.in_f}->{self.out_f} N={self.tokens} r={self.r} {d}"
                f"{' drop' if self.dropout else ''}{' bias' if self.bias else ''}"
                f"{'' if self.need_dx else ' no-dx'}{' exact' if self.exact else ''}{' tf32' if self.tf32 else ''}{' frozen-A' if self.frozen_a else ''}"
                f"{f' {self.quant}' if self.quant else ''}{f' W0 {self.wdtype}' if self.wdtype else ''}"
                f"{f' dvora B {self.dvora}' if self.dvora else ''}")


def _grid(source, shapes, tokens, ranks, pairs, flags=FLAG_SETS, tf32=(0,), frozen_a=0) -> list:
    return [Case(fi, fo, n, r, d, a, *fl, source, t, frozen_a) for (fi, fo), n, r, (d, a), fl, t
            in itertools.product(shapes, tokens, ranks, pairs, flags, tf32)]


# a frozen lora_A (DVoRA): the dx kernel without dA partials, up to DVoRA's r = 1024
FROZEN_A_RANKS = (1, 17, 256, 1024)
FROZEN_A_FLAGS = [(0, 0, 1, 0), (1, 1, 1, 0), (0, 1, 1, 1)]


# QDoRA: a 4-bit (nf4, nested absmax) or int8 W0 dequantised in the norm and, up to
# heuristics.DEQUANT_IN_KERNEL_TOKENS tokens, in the GEMM kernels (above: the dequantising kernel and
# the dense GEMMs); one odd layer, one token count per tile bucket, the dtypes of QLoRA training
# (bf16 or fp16 x, 16-bit or fp32 adapters; fp32), W0 in x's dtype and a bf16 W0 under fp16 x.
QUANT_FORMATS = ("nf4", "int8")
QUANT_TOKENS = (1, 17, 64, 128, 256, 257)
QUANT_PAIRS = [("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")]


def _quant_grid() -> list:
    out = []
    for fmt, (fi, fo), n, (d, a), fl in itertools.product(QUANT_FORMATS, COVER_SHAPES[1:], QUANT_TOKENS, QUANT_PAIRS,
                                                          FLAG_SETS):
        out.append(Case(fi, fo, n, 17, d, a, *fl, "coverage", 0, 0, fmt))
        if fmt == "nf4" and d == "fp16":
            out.append(Case(fi, fo, n, 17, d, a, *fl, "coverage", 0, 0, fmt, "bf16"))
    return out


def meta_quant_weight(fmt: str, out_f: int, in_f: int, dtype, blocksize: int = 64):
    """A ``QuantWeight`` of meta tensors: bitsandbytes' nf4 with nested absmax (its default
    nested blocksize 256), or int8 with row scales (whose dequantised dtype is fp32)."""
    from dora_kernels.quant import NestedAbsmax, QuantWeight

    dev = "meta"
    if fmt == "int8":
        return QuantWeight("int8", torch.empty((out_f, in_f), dtype=torch.int8, device=dev), (out_f, in_f),
                           torch.float32, scb=torch.empty(out_f, device=dev))
    n = out_f * in_f
    blocks = -(-n // blocksize)
    nested = NestedAbsmax(torch.empty(256, device=dev), torch.empty(-(-blocks // 256), device=dev), 256,
                          torch.empty((), device=dev))
    return QuantWeight(fmt, torch.empty((n + 1) // 2, dtype=torch.uint8, device=dev), (out_f, in_f), dtype,
                       absmax=torch.empty(blocks, dtype=torch.uint8, device=dev), code=torch.empty(16, device=dev),
                       blocksize=blocksize, nested=nested)


# DVoRA's factor B′ = diag(λ_b)·B·diag(λ_d) and its λ gradients (dora_kernels.kernels_dvora), alone
# (the DoRA kernels with its frozen A are the frozen-A cases above): every tile of the
# heuristics.dvora_*_config functions (outs and ranks at and around their edges, odd ones) for every
# pair of λ dtypes over an fp32 vera_B, and over a vera_B in λ_b's 16-bit dtype (a model cast whole);
# for odd r vera_B is a slice of a wider one (r + 1 columns).
DVORA_OUTS = (1, 1001, 4096, 28672)
DVORA_RANKS = (1, 17, 64, 256, 1024)
DVORA_DTYPES = [(d, b, v) for d, b in itertools.product(("fp32", "fp16", "bf16"), repeat=2)
                for v in ("fp32",) + ((b,) if b != "fp32" else ())]


def _dvora_cases() -> list:
    return [Case(0, o, 0, r, ld, lb, 0, 0, 0, 0, "coverage", dvora=b)
            for o, r, (ld, lb, b) in itertools.product(DVORA_OUTS, DVORA_RANKS, DVORA_DTYPES)]


def _record_dvora(case: Case, arch: int) -> list:
    """The launches of ``dvora_ops.dvora_factor`` and its backward for a ``_dvora_cases`` case."""
    from dora_kernels import dvora_ops, runtime

    from bench.trace import OpCounter

    vb = torch.empty((case.out_f, case.r + case.r % 2), device="meta", dtype=DTYPES[case.dvora])[:, :case.r]
    ld = torch.empty((case.r,), device="meta", dtype=DTYPES[case.dtype], requires_grad=True)
    lb = torch.empty((case.out_f,), device="meta", dtype=DTYPES[case.adapter], requires_grad=True)
    launches = []
    with runtime.trace_target((arch // 10, arch % 10), SMS.get(arch, 132)), runtime.recording(launches.append), \
            OpCounter([]):
        b = dvora_ops.dvora_factor(vb, ld, lb)
        b.backward(torch.empty_like(b))
    return launches


# DoRA's combination on conv outputs (dora_kernels.conv, kernels_conv): the forward, backward and
# partial-sum kernels over every tile of heuristics.conv_config (positions 16/49/4096 in NCHW,
# channels 4/320 channels_last), each form, the dtype pairs a fused PEFT conv reaches (dropout: same
# dtype only, PEFT fails otherwise) with the base's or the promoted output dtype, and every subset of
# trainable inputs (the empty one: an eval forward), which gives every output flag of the backward.
CONV_BENCH = (2, 320, 64, 64)  # the trace's Stable-Diffusion UNet 3x3 conv output
CONV_SHAPES = [((3, 5, 4, 4), "nchw"), ((1, 7, 7, 7), "nchw"), ((2, 4, 9, 9), "channels_last")]
CONV_FORMS = ("bias-in-result", "bias-added", "no-bias", "dropout")


@dataclass(frozen=True)
class ConvCase:
    """``dora_conv_scale`` (``form``: bias taken out of the result, added only, none) or
    ``dora_conv_dropout`` on a (batch, channels, *spatial) output in ``layout``; ``out``: the output
    dtype ("" the promoted one, as for a fused layer's earlier adapters)."""

    shape: tuple
    layout: str
    dtype: str
    adapter: str
    form: str
    out: str
    source: str
    every_subset: int = 1  # 0: all inputs trainable, all but result (a first layer), none

    @property
    def label(self):
        d = self.dtype if self.adapter == self.dtype else f"{self.dtype}+{self.adapter}"
        return (f"conv {'x'.join(map(str, self.shape))} {self.layout} {d}{f'->{self.out}' if self.out else ''} "
                f"{self.form}")


def conv_cases(quick: bool = False) -> list:
    """``ConvCase``s; ``quick``: the bench shape, QUICK's dtype pairs, the bias-in-result and dropout forms."""
    shapes = [(CONV_BENCH, "nchw", "bench"), (CONV_BENCH, "channels_last", "bench")]
    pairs, forms = (QUICK["dtypes"], CONV_FORMS[::3]) if quick else (DTYPE_PAIRS, CONV_FORMS)
    if not quick:
        shapes += [(s, lay, "coverage") for s, lay in CONV_SHAPES]
    out = []
    for (shape, layout, source), (d, a), form in itertools.product(shapes, pairs, forms):
        if form == "dropout" and d != a:
            continue
        for o in ("", d) if d != a else ("",):
            # every subset of trainable inputs on one small shape (every output flag of the backward
            # with every dtype and form); three elsewhere (16 give 4x the compiles of this elementwise
            # kernel, far from its register limits)
            out.append(ConvCase(shape, layout, d, a, form, o, source, int(not quick and shape == CONV_SHAPES[0][0])))
    return out


def _record_conv(case: ConvCase, arch: int) -> list:
    """The launches of a ``ConvCase``'s forward and backward, once for every subset of its trainable
    inputs (three of them without ``every_subset``)."""
    from dora_kernels import conv, runtime

    dt, adt = DTYPES[case.dtype], DTYPES[case.adapter]
    N, C, *S = case.shape
    dev = "meta"

    def act(dtype):  # (N, C, *S), channels innermost for channels_last
        if case.layout == "channels_last":
            return torch.empty((N, *S, C), device=dev, dtype=dtype).movedim(-1, 1)
        return torch.empty(case.shape, device=dev, dtype=dtype)

    t = {"result": act(dt), "lora": act(adt), "magnitude": torch.empty((1, C) + (1,) * len(S), device=dev, dtype=adt)}
    if case.form == "dropout":
        t["base"] = act(dt)
    elif case.form != "no-bias":
        t["bias"] = torch.empty(C, device=dev, dtype=dt)
    norm = torch.empty(C, device=dev)
    out_dtype = DTYPES[case.out] if case.out else None
    launches = []
    with runtime.trace_target((arch // 10, arch % 10), SMS.get(arch, 132)), runtime.recording(launches.append):
        subsets = [s for k in range(len(t) + 1) for s in itertools.combinations(t, k)] if case.every_subset \
            else [tuple(t), tuple(n for n in t if n != "result"), ()]
        for trains in subsets:
            x = {n: v.detach().requires_grad_(n in trains) for n, v in t.items()}
            if case.form == "dropout":
                y = conv.dora_conv_dropout(x["result"], x["base"], x["lora"], x["magnitude"], norm, 2.0,
                                           out_dtype=out_dtype)
            else:
                y = conv.dora_conv_scale(x["result"], x["lora"], x["magnitude"], norm, 2.0, x.get("bias"),
                                         bias_in_result=case.form == "bias-in-result", out_dtype=out_dtype)
            if y.requires_grad:
                y.backward(torch.empty_like(y))
    return launches


def cases(quick: bool = False) -> list:
    if quick:
        q = QUICK
        quant = [Case(fi, fo, n, 16, "bf16", "bf16", *fl, "bench", 0, 0, fmt) for (fi, fo) in q["shapes"]
                 for n in q["tokens"] for fl in q["flags"] for fmt in QUANT_FORMATS]
        return (_grid("bench", q["shapes"], q["tokens"], q["ranks"], q["dtypes"], q["flags"]) + quant
                + conv_cases(quick=True))
    return (_grid("bench", BENCH_SHAPES, BENCH_TOKENS, BENCH_RANKS, DTYPE_PAIRS)
            + _grid("coverage", COVER_SHAPES, COVER_TOKENS, COVER_RANKS, DTYPE_PAIRS)
            + _grid("coverage", COVER_SHAPES, EDGE_TOKENS, EDGE_RANKS, ALL_PAIRS, tf32=(0, 1))
            + _grid("coverage", BENCH_SHAPES[:1] + COVER_SHAPES, EDGE_TOKENS, FROZEN_A_RANKS, DTYPE_PAIRS,
                    flags=FROZEN_A_FLAGS, frozen_a=1)
            + _quant_grid() + _dvora_cases() + conv_cases())


def record(case: Case, arch: int) -> list:
    """The ``Launch`` records (kernel + actual arguments) of one training step and one eval
    forward of the fused op for ``case``, planned for sm_<arch>."""
    if isinstance(case, ConvCase):
        return _record_conv(case, arch)
    if case.dvora:
        return _record_dvora(case, arch)
    dt, adt = DTYPES[case.dtype], DTYPES[case.adapter]
    dev = "meta"
    x = torch.empty((case.tokens, case.in_f), device=dev, dtype=dt, requires_grad=bool(case.need_dx))
    if case.quant:
        w = meta_quant_weight(case.quant, case.out_f, case.in_f, DTYPES[case.wdtype or case.dtype])
    else:
        w = torch.empty((case.out_f, case.in_f), device=dev, dtype=dt)
    A = torch.empty((case.r, case.in_f), device=dev, dtype=adt, requires_grad=not case.frozen_a)
    B = torch.empty((case.out_f, case.r), device=dev, dtype=adt, requires_grad=True)
    m = torch.empty((case.out_f,), device=dev, dtype=adt, requires_grad=True)
    bias = torch.empty((case.out_f,), device=dev, dtype=dt) if case.bias else None
    p = 0.1 if case.dropout else 0.0
    launches = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(case.tf32)
    try:
        _record(case, arch, x, w, A, B, m, bias, p, launches)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return launches


def _record(case, arch, x, w, A, B, m, bias, p, launches):
    import dora_kernels
    from dora_kernels import runtime

    from bench.trace import OpCounter

    dev = x.device
    with runtime.trace_target((arch // 10, arch % 10), SMS.get(arch, 132)), runtime.recording(launches.append), \
            OpCounter([]):
        y = dora_kernels.dora_linear(x, w, A, B, m, 2.0, bias, dropout_p=p, training=True,
                                     norm_grad="exact" if case.exact else "detached",
                                     dropout_seed=SEED if p else None)
        y.backward(torch.empty_like(y))
        with torch.no_grad():
            dora_kernels.dora_linear(x, w, A, B, m, 2.0, bias, dropout_p=p, training=False)
        if p:
            dora_kernels.dropout_mask(SEED, (case.tokens, case.in_f), p, device=dev)


# ---------------------------------------------------------------------------------------------
# the JIT's specialisation, without a driver

_BINDERS: dict = {}


def _binder(kernel, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (id(kernel), arch)
    if key not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[key] = (backend, create_function_from_signature(kernel.signature, kernel.params, backend))
    return _BINDERS[key]


def specialise(launch, arch: int) -> dict:
    """The compile inputs the JIT would build for this launch on sm_<arch>: what ``JITFunction.run``
    does before ``compile`` (binder, then ``_pack_args``), on the recorded arguments."""
    kernel = launch.kernel
    backend, binder = _binder(kernel, arch)
    kwargs = dict(launch.meta)
    bound, spec, opts = binder(**launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    names = [p.name for p in kernel.params]
    special = []
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            continue
        v = bound[p.name]
        if signature[p.name] == "constexpr":
            special.append(f"{p.name}={v}")
    for path, a in attrs.items():
        if a and not kernel.params[path[0]].is_constexpr and not signature[names[path[0]]].startswith("*"):
            special.append(f"{names[path[0]]}%16")
    opt = {k: v for k, v in options.__dict__.items()}
    return {"kernel": kernel.__name__, "module": kernel.fn.__module__, "arch": arch, "src": kernel.cache_key,
            "file": _file_hash(kernel),
            "signature": signature, "constexprs": [[list(k), _plain(v)] for k, v in constexprs.items()],
            "attrs": [[list(k), v] for k, v in attrs.items()], "options": _plain(opt),
            "num_warps": options.num_warps, "num_stages": options.num_stages,
            "config": " ".join(f"{p.name}={_short(bound[p.name])}" for p in kernel.params if p.is_constexpr)
            + f" w{options.num_warps} s{options.num_stages}",
            "specialization": " ".join(special),
            "types": " ".join(signature[p.name] for p in kernel.params if str(signature[p.name]).startswith("*"))}


def _short(v):
    return int(v) if isinstance(v, bool) else v


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def job_key(job: dict) -> str:
    sig = {k: job[k] for k in ("kernel", "arch", "signature", "constexprs", "attrs", "options")}
    return hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# compiling one job (in a worker process)

def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _tuple_keys(pairs):
    return {tuple(k): _tuplify(v) for k, v in pairs}


def _file_hash(kernel) -> str:
    """The kernel's source file, hashed: a worker compiles what the launches were recorded
    against. (Not the JIT's ``cache_key``: triton 3.6's differs between processes.)"""
    import inspect

    path = inspect.getsourcefile(kernel.fn)
    return _hash_file(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _hash_file(path, mtime_ns):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def compile_job(job: dict) -> dict:
    """Compile one specialised launch for its arch; registers, spills, shared memory, mma."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    if job.get("file") and _file_hash(kernel) != job["file"]:
        return {"status": "stale: the kernel's source changed after its launches were recorded; run again"}
    constexprs = _tuple_keys(job["constexprs"])
    attrs = {tuple(k): v for k, v in job["attrs"]}
    target = GPUTarget("cuda", job["arch"], 32)
    t0 = time.perf_counter()
    res = {"status": "ok"}
    try:
        options = {k: _tuplify(v) for k, v in job["options"].items()}
        ck = triton.compile(ASTSource(kernel, job["signature"], constexprs, attrs), target=target, options=options)
    except Exception as e:  # a config that does not compile is a finding, not a crash
        res.update(status=f"compile error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        res["compile_s"] = round(time.perf_counter() - t0, 2)
        return res
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    res["shared_bytes"] = int(ck.metadata.shared)
    ptx = ck.asm.get("ptx", "")
    kinds = [k for k, pat in (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"))
             if pat in ptx]
    res["mma"] = kinds[0] if kinds else "none"
    res["mma_all"] = "+".join(kinds) if kinds else "none"
    with tempfile.TemporaryDirectory(prefix="dora_cr_") as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        out = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True)
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out.stdout)
        if m:
            res["registers"] = int(m.group(1))
            res["stack_bytes"] = res["spill_bytes"] = int(m.group(2))
        else:
            res["status"] = f"cuobjdump: {out.stdout[-200:]} {out.stderr[-200:]}"
        if res.get("spill_bytes"):
            # STACK is the whole stack frame; ptxas itself tells how much of it is spills.
            res["ptxas_spill"] = "?"
            ptx_path = os.path.join(d, "k.ptx")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            arch = job["arch"]
            sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            v = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={sm}", ptx_path, "-o", os.path.join(d, "v.cubin")],
                               capture_output=True, text=True)
            sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", v.stderr + v.stdout)
            if sp:
                res["ptxas_spill"] = f"{sp.group(1)} B stores / {sp.group(2)} B loads"
                res["spill_bytes"] = int(sp.group(1))
    return res


# ---------------------------------------------------------------------------------------------
# the report

def _cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dora_kernels", "compile_report")


def _versioned_key(job, src_hash):
    import triton

    return hashlib.sha256(f"{job_key(job)}|{src_hash}|{triton.__version__}".encode()).hexdigest()[:32]


def _arg_class(a):
    """What the JIT specialises an argument on (a conservative superset of its key)."""
    if isinstance(a, torch.Tensor):
        return ("t", a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return ("c", a)
    if isinstance(a, int):
        return ("i", a == 1, a % 16 == 0, -2**31 <= a < 2**31, a >= 0)
    return ("o", type(a).__name__)


def collect_arch(arch: int, quick: bool = False) -> dict:
    """{job key: job} for one arch: every distinct compile of the benchmark cases, plus one
    compile per config (constexprs, warps, stages, dtypes) that only the coverage sweep reaches."""
    jobs, by_pre, bench_cfgs, cover_cfgs = {}, {}, set(), set()
    for c in cases(quick):
        dlabel = c.dtype if c.adapter == c.dtype else f"{c.dtype}+{c.adapter}"
        for lc in record(c, arch):
            pre = (lc.name, tuple(sorted(lc.meta.items())), tuple(_arg_class(a) for a in lc.args.values()))
            k = by_pre.get(pre)
            if k is None:
                job = specialise(lc, arch)
                cfg = (job["kernel"], job["config"], job["types"])
                k = job_key(job)
                if c.source == "bench":
                    bench_cfgs.add(cfg)
                elif k not in jobs and (cfg in bench_cfgs or cfg in cover_cfgs):
                    by_pre[pre] = None  # this config is compiled already, in another specialisation
                    continue
                else:
                    cover_cfgs.add(cfg)
                by_pre[pre] = k
                if k not in jobs:
                    job.update(dtype=dlabel, example=c.label, source=c.source, uses=0)
                    jobs[k] = job
            if k is not None:
                jobs[k]["uses"] += 1
    return jobs


def _collect_worker(arch, quick):
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return arch, collect_arch(arch, quick)


def collect(archs, quick=False, *, n_jobs=1, log=print):
    """{job key: job} for every distinct compile over ``cases(quick)`` and ``archs``."""
    t0 = time.perf_counter()
    jobs = {}
    if n_jobs > 1 and len(archs) > 1:
        with cf.ProcessPoolExecutor(max_workers=min(n_jobs, len(archs)), mp_context=mp.get_context("spawn")) as pool:
            for arch, js in pool.map(_collect_worker, archs, [quick] * len(archs)):
                jobs.update(js)
                log(f"  sm_{arch}: {len(js)} distinct compiles ({time.perf_counter() - t0:.0f} s)")
    else:
        for arch in archs:
            js = collect_arch(arch, quick)
            jobs.update(js)
            log(f"  sm_{arch}: {len(js)} distinct compiles ({time.perf_counter() - t0:.0f} s)")
    return jobs


def report_key(job) -> str:
    """The job's key across machines: kernel source, triton version and compile inputs (the
    options' library paths reduced to file names)."""
    import triton

    opts = dict(job["options"])
    if opts.get("extern_libs"):
        opts["extern_libs"] = [[name, os.path.basename(str(path))] for name, path in opts["extern_libs"]]
    sig = {k: job[k] for k in ("kernel", "arch", "signature", "constexprs", "attrs")}
    sig.update(options=opts, src=job["src"], triton=triton.__version__, ptxas=_ptxas_version(job["arch"]))
    return hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=None)
def _ptxas_version(arch) -> str:
    """The version line of the ptxas that compiles sm_<arch> (``TRITON_PTXAS_PATH`` may change it)."""
    try:
        out = subprocess.run([_ptxas(arch), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        return ""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def load_report(path) -> dict:
    """{report key: compile result} of the rows of a ``compile_report.csv`` (for ``reuse``)."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("key"):
                continue
            res = {k: row.get(k, "") for k in RESULT_FIELDS}
            if row["status"].startswith("compile error"):
                res["status"] = row["status"]  # a compile that failed: fails again
            elif row["status"] == "ok" or row["status"].startswith(("SPILL", "OVER SHARED", "NO WGMMA")):
                if not all(str(res[k]).isdigit() for k in ("registers", "spill_bytes", "shared_bytes")):
                    continue  # no numbers: compile it again
                res["status"] = "ok"  # the row's problems are recomputed from its numbers
            else:
                continue  # stale, worker or tool errors: compile it again
            for k in ("registers", "spill_bytes", "shared_bytes", "stack_bytes"):
                res[k] = int(res[k]) if str(res[k]).isdigit() else ""
            out[row["key"]] = res
    return out


def _verify_picks(reused: dict, jobs: dict, n: int, seed: int) -> list:
    """``n`` of the reused job keys, drawn with ``seed`` in turn from each (kernel, arch), so that
    every kernel and arch is checked and different runs check different rows."""
    import random

    groups = {}
    for rk, k in sorted(reused.items()):
        groups.setdefault((jobs[k]["kernel"], jobs[k]["arch"]), []).append(k)
    rng = random.Random(seed)
    for g in groups.values():
        rng.shuffle(g)
    picks, order = [], sorted(groups)
    while len(picks) < n and any(groups.values()):
        for g in order:
            if groups[g] and len(picks) < n:
                picks.append(groups[g].pop())
    return picks


def compile_all(jobs: dict, n_jobs: int = 2, *, cache=True, reuse=None, verify=0, verify_seed=0,
                log=print) -> list:
    """Compile every job; return report rows sorted by kernel, arch, dtype, config.

    A job is taken from the local cache (``cache``), else from ``reuse`` ({report key: result},
    see ``load_report``: an earlier report of the same kernel source and triton version), else
    compiled. ``verify`` of the reused ones are compiled again, and a result that differs from the
    report's marks the row ``report mismatch``."""
    from dora_kernels import heuristics as H

    cdir = _cache_dir()
    os.makedirs(cdir, exist_ok=True)
    results, origin, todo, reused = {}, {}, [], {}
    rkeys = {k: report_key(job) for k, job in jobs.items()}
    for k, job in jobs.items():
        path = os.path.join(cdir, _versioned_key(job, job["src"]) + ".json")
        if cache and os.path.exists(path):
            with open(path) as f:
                results[k] = json.load(f)
            origin[k] = "cached"
        elif reuse and rkeys[k] in reuse:
            results[k] = dict(reuse[rkeys[k]])
            origin[k] = "reused"
            reused[rkeys[k]] = k
        else:
            todo.append((k, job, path))
            origin[k] = "compiled"
    checks = {k: results[k] for k in _verify_picks(reused, jobs, verify, verify_seed)}
    for k in checks:
        todo.append((k, jobs[k], os.path.join(cdir, _versioned_key(jobs[k], jobs[k]["src"]) + ".json")))
    log(f"  {len(jobs)} distinct compiles: {sum(v == 'cached' for v in origin.values())} cached, {len(reused)} "
        f"reused from a report ({len(checks)} of them compiled again to check, seed {verify_seed}), "
        f"{len(todo) - len(checks)} to compile, on {n_jobs} processes")
    t0 = time.perf_counter()
    if todo:
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx) as pool:
            futs = {pool.submit(compile_job, job): (k, path) for k, job, path in todo}
            for i, fut in enumerate(cf.as_completed(futs), 1):
                k, path = futs[fut]
                try:
                    res = fut.result()
                except Exception as e:
                    res = {"status": f"worker error: {type(e).__name__}: {e}"}
                if k in checks:
                    want = checks[k]
                    diff = [f"{f} {want.get(f)!r} in the report, {res.get(f)!r} now"
                            for f in RESULT_FIELDS + ("status",)
                            if f != "compile_s" and str(want.get(f, "")) != str(res.get(f, ""))]
                    if diff:
                        res = dict(res, status="report mismatch: " + "; ".join(diff))
                    origin[k] = "reused+checked"
                results[k] = res
                if res.get("status") == "ok":
                    with open(path, "w") as f:
                        json.dump(res, f)
                if i % 25 == 0 or i == len(todo):
                    log(f"    {i}/{len(todo)} compiled ({time.perf_counter() - t0:.0f} s)")
    rows = []
    for k, job in jobs.items():
        res = results[k]
        arch = job["arch"]
        limit = H.shared_limit((arch // 10, arch % 10))
        row = {"kernel": job["kernel"], "config": job["config"], "dtype": job["dtype"], "arch": f"sm_{arch}",
               "shared_limit": limit, "num_warps": job["num_warps"], "num_stages": job["num_stages"],
               "specialization": job["specialization"], "types": job["types"], "uses": job["uses"],
               "example": job["example"],
               "source": job["source"], "status": res.get("status", ""), "key": rkeys[k], "origin": origin[k]}
        row.update({f: res.get(f, "") for f in RESULT_FIELDS})
        row["status"] = "; ".join(problems(row)) or row["status"]
        rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["config"], r["specialization"]))
    return rows


def is_gemm_config(row) -> bool:
    """A bf16/fp16 GEMM tile that ought to reach wgmma on sm_90: ``_fwd_kernel`` / ``_dx_kernel``
    (with its dx loop) with BLOCK_N >= 64 and >= 4 warps."""
    cfg = dict(kv.split("=", 1) for kv in row["config"].split() if "=" in kv)
    if row["kernel"] not in GEMM_KERNELS or row["dtype"].split("+")[0] not in ("bf16", "fp16"):
        return False
    if row["kernel"] == "_dx_kernel" and cfg.get("HAS_DX") == "0":
        return False  # the dA pass alone: a rank-r product, no GEMM
    return int(cfg.get("BLOCK_N", 0)) >= 64 and int(row["num_warps"]) >= 4


def problems(row) -> list:
    out = []
    if row["status"] not in ("ok", ""):
        return [row["status"]]
    if row["spill_bytes"] not in ("", 0):
        out.append(f"SPILL {row['spill_bytes']} B")
    if row["shared_bytes"] != "" and row["shared_bytes"] > row["shared_limit"]:
        out.append(f"OVER SHARED {row['shared_bytes']} > {row['shared_limit']}")
    if row["arch"] == "sm_90" and is_gemm_config(row) and row["mma"] != "wgmma":
        out.append(f"NO WGMMA ({row['mma']})")
    return out


def _rel(arg: str) -> str:
    return os.path.relpath(arg) if os.path.isabs(arg) and os.path.exists(arg) else arg


def write(rows, out_dir, *, argv=(), elapsed=None, n_jobs=2):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compile_report.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    import triton

    bad = [r for r in rows if r["status"] != "ok"]
    md = ["# Compile report", "",
          f"`python -m bench.compile_report {' '.join(_rel(a) for a in argv)}` — triton {triton.__version__}, torch "
          f"{torch.__version__}, compiled ahead of time (no GPU)"
          + (f", {elapsed:.0f} s on {n_jobs} processes" if elapsed else "")
          + f" (the rows' own compile times add up to {sum(float(r['compile_s'] or 0) for r in rows):.0f} s; "
          "`origin` says which rows were compiled in this run, cached from an earlier run on this machine, or "
          "reused from a committed report).",
          "",
          "One row per distinct compile (kernel, arch, JIT specialisation, constexprs, warps, stages). "
          "`spill_bytes` is ptxas's spill stores where cuobjdump's STACK is not 0 (else 0); `shared_limit` is `heuristics.SHARED_LIMIT`; `mma` the best "
          "tensor-core instruction in the PTX; `uses` how many launches of the traced cases compile to it; "
          "`source` bench (a benchmark shape reaches it) or coverage (only the heuristic sweep does).", "",
          f"**{len(rows)} compiles, {len(bad)} flagged** (spill, shared memory over the limit, a bf16/fp16 GEMM "
          "tile without wgmma on sm_90, or a compile error).", ""]
    cfgs = {}
    for r in rows:
        cfgs.setdefault((r["arch"], r["kernel"], r["config"], r["types"]), set()).add(r["source"])
    for arch in sorted({a for a, *_ in cfgs}):
        mine = [v for (a, *_), v in cfgs.items() if a == arch]
        md.append(f"- {arch}: {len(mine)} distinct configs (kernel, constexprs, warps, stages, pointer dtypes) that "
                  f"the heuristics return, {sum('bench' in v for v in mine)} of them on the benchmark's shapes, "
                  f"{sum('bench' not in v for v in mine)} only in the coverage sweep; each one compiled here (any that "
                  "failed to compile is listed under Flagged).")
    md.append("")
    if bad:
        md += ["## Flagged", "", "| kernel | arch | dtype | config | spec | regs | spill | shared | mma | status | example |",
               "|---|---|---|---|---|---:|---:|---:|---|---|---|"]
        for r in bad:
            md.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | `{r['config']}` | {r['specialization']} | "
                      f"{r['registers']} | {r['spill_bytes']} {r['ptxas_spill']} | {r['shared_bytes']} | {r['mma']} | "
                      f"{r['status']} | {r['example']} |")
        md.append("")
    md += ["## Summary by kernel and arch", "", "| kernel | arch | compiles | max regs | spilling | max shared KiB | limit KiB | mma |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (k, a), rs in sorted(groups.items()):
        regs = [r["registers"] for r in rs if r["registers"] != ""]
        sh = [r["shared_bytes"] for r in rs if r["shared_bytes"] != ""]
        mmas = sorted({r["mma"] for r in rs if r["mma"]})
        md.append(f"| {k} | {a} | {len(rs)} | {max(regs) if regs else ''} | "
                  f"{sum(1 for r in rs if r['spill_bytes'] not in ('', 0))} | "
                  f"{max(sh) / 1024 if sh else 0:.0f} | {rs[0]['shared_limit'] / 1024:.0f} | {', '.join(mmas)} |")
    md += ["", "## All compiles", "",
           "| kernel | config | dtype | arch | registers | spill_bytes | shared_bytes | shared_limit | mma | spec | uses | source | status |",
           "|---|---|---|---|---:|---:|---:|---:|---|---|---:|---|---|"]
    for r in rows:
        md.append(f"| {r['kernel']} | `{r['config']}` | {r['dtype']} | {r['arch']} | {r['registers']} | "
                  f"{r['spill_bytes']} | {r['shared_bytes']} | {r['shared_limit']} | {r['mma_all']} | "
                  f"{r['specialization']} | {r['uses']} | {r['source']} | {r['status']} |")
    with open(os.path.join(out_dir, "compile_report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return bad


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None,
                    help="output folder (default ./bench_results/compile_report under the current directory)")
    ap.add_argument("--arch", default=None,
                    help="comma-separated compute capabilities (default 80,90; e.g. 80,90,100 where this triton "
                         "targets sm_100)")
    ap.add_argument("--quick", action="store_true", help="one shape, three token counts, r=16, fp32/bf16")
    ap.add_argument("--jobs", type=int, default=2, help="compiling processes (default 2)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--reuse", metavar="CSV",
                    help="take the results of an earlier compile_report.csv for the compiles whose key (kernel "
                         "source, triton version, inputs) it lists")
    ap.add_argument("--verify", type=int, default=0, metavar="N",
                    help="compile N of the reused rows again and flag any that differ from the report")
    ap.add_argument("--verify-seed", type=int, default=None,
                    help="which reused rows --verify draws (default: today's date, so runs rotate over them)")
    args = ap.parse_args(argv)
    # The report compiles the kernels, so they must be JIT functions, not the interpreter's.
    if "dora_kernels.kernels" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "0"
    elif os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_report: dora_kernels was imported under TRITON_INTERPRET=1; run it in a fresh process",
              file=sys.stderr)
        return 2
    if not tools_available():
        print("compile_report: ptxas / cuobjdump not found (neither in the triton wheel nor on PATH)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    if args.out is None:
        from bench.tables import default_out

        args.out = default_out("compile_report")
    t0 = time.perf_counter()
    if args.arch:
        archs = [int(a) for a in args.arch.split(",") if a]
    else:
        archs = list(DEFAULT_ARCHS)
    print(f"compile report for sm_{', sm_'.join(map(str, archs))}"
          f"{' (quick)' if args.quick else ''}")
    jobs = collect(archs, args.quick, n_jobs=args.jobs)
    reuse = None
    if args.reuse:
        if os.path.exists(args.reuse):
            reuse = load_report(args.reuse)
        else:
            print(f"compile_report: --reuse {args.reuse} does not exist; compiling everything", file=sys.stderr)
    seed = args.verify_seed if args.verify_seed is not None else int(time.strftime("%Y%m%d"))
    rows = compile_all(jobs, args.jobs, cache=not args.no_cache, reuse=reuse, verify=args.verify, verify_seed=seed)
    elapsed = time.perf_counter() - t0
    bad = write(rows, args.out, argv=argv, elapsed=elapsed, n_jobs=args.jobs)
    print(f"{len(rows)} compiles, {len(bad)} flagged; wrote {args.out}/compile_report.csv and .md "
          f"({elapsed:.0f} s)")
    for r in bad:
        print(f"  {r['kernel']} {r['arch']} {r['dtype']} [{r['config']}] {r['specialization']}: {r['status']} "
              f"(regs {r['registers']}, shared {r['shared_bytes']}; e.g. {r['example']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
