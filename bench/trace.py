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
* bytes saved for backward: every tensor the forward packs (``saved_tensors_hooks``) and the
  output, deduped by storage (as ``bench.timing.saved_bytes`` counts them: an output the
  backward reads costs nothing more), parameters excluded (W0, bias, A, B, m persist whatever
  the method; only activations are counted; x, the layer's input, is an activation and counts).

Then a roofline prediction per GPU: per launch ``max(matmul/peak + other/vector peak,
bytes/bandwidth) + overhead``, summed. Every row is a prediction (column ``kind``); the
constants are printed and written beside the CSV. Ratios are to the floor (a frozen
``nn.Linear``: forward + input gradient, the same mode), to PEFT's DoRA and to PEFT's LoRA.

Providers: ``fused`` (``dora_kernels.DoRALinear``: eval caches the norm), ``fused_peft`` (a PEFT
layer after ``dora_kernels.fuse``), ``reference`` (``reference.DoRALinear``, PEFT's arithmetic,
eager), ``peft_dora``, ``peft_lora`` (PEFT's ``lora.Linear``) and ``linear`` (frozen ``nn.Linear``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dora_kernels import runtime

# ---------------------------------------------------------------------------------------------
# the cost model's constants (printed and written with every trace)

# dense bf16/fp16 tensor-core matmul, fp32 (CUDA cores: fp32 matmuls without tf32 and every
# elementwise FLOP), HBM bandwidth; "nominal" is the data sheet, the other the reachable figure
# the prediction uses (DORA_SPEC.md's 700 TFLOP/s and 2.8 TB/s on an H100).
GPUS = {
    "H100-SXM": {"arch": (9, 0), "sms": 132, "mm_nominal": 989e12, "mm": 700e12, "fp32_nominal": 67e12,
                 "fp32": 50e12, "bw_nominal": 3.35e12, "bw": 2.8e12},
    "H200": {"arch": (9, 0), "sms": 132, "mm_nominal": 989e12, "mm": 700e12, "fp32_nominal": 67e12,
             "fp32": 50e12, "bw_nominal": 4.8e12, "bw": 4.0e12},
    "A100-SXM": {"arch": (8, 0), "sms": 108, "mm_nominal": 312e12, "mm": 230e12, "fp32_nominal": 19.5e12,
                 "fp32": 15e12, "bw_nominal": 2.0e12, "bw": 1.6e12},
}
LAUNCH_OVERHEAD_S = 4e-6

PROVIDERS = ("fused", "fused_peft", "reference", "peft_dora", "peft_lora", "linear")
MODES = ("fwd", "bwd", "step", "eval")
FLOOR = "linear"

# Llama-3-8B's projections (q/k/v/o/gate/up/down) and a 70B up projection: (name, in, out)
SHAPES = [("8B-q/o", 4096, 4096), ("8B-k/v", 4096, 1024), ("8B-gate/up", 4096, 14336),
          ("8B-down", 14336, 4096), ("70B-up", 8192, 28672)]
TOKENS = (1, 16, 256, 4096, 16384)
QUICK_SHAPES = [("8B-q/o", 4096, 4096), ("70B-up", 8192, 28672)]
QUICK_TOKENS = (1, 256, 4096, 16384)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SHORT = {v: k for k, v in _DTYPES.items()}


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


def _custom_impl(qualname):
    """The Python implementation of a ``torch.library.custom_op`` (the real launchers)."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(qualname)
    if opdef is None:
        raise RuntimeError(f"trace: custom op {qualname} has no Python implementation to run on meta tensors")
    return opdef._init_fn


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
        other = 0 if mm else max([t.numel() for t in ins + outs] or [0])
        if name in ("addmm", "baddbmm", "addmv") and outs:
            other = outs[0].numel()  # the bias / accumulate
        dtype = (ins or outs)[0].dtype
        self.events.append(Event("aten", name, mm, other, sum(reads.values()) + sum(writes.values()), dtype))


def count(fn, *, saved=None, param_storages=()):
    """Run ``fn()`` under the launch recorder and the op counter; return (result, Count).

    ``saved``: a list that receives (storage id, bytes) of every non-parameter tensor packed
    for backward while ``fn`` runs."""
    c = Count()

    def on_launch(lc):
        # Keep numbers only: holding the launch's tensors would change what autograd does
        # (AccumulateGrad copies a gradient that something else still references).
        # each launcher states what its FLOPs run on (runtime.UNITS)
        mm = lc.flops if lc.unit == "tensor" else 0
        other = lc.flops if lc.unit == "vector" else 0
        dtype = lc.reads[0][1] if lc.reads else torch.float32
        x_like = [a for a in lc.args if isinstance(a, torch.Tensor)]
        if x_like:
            dtype = max((a.dtype for a in x_like if a.dtype.is_floating_point),
                        key=lambda d: d in (torch.float16, torch.bfloat16), default=dtype)
        c.events.append(Event("triton", lc.name, mm, other, lc.bytes, dtype))

    params = set(param_storages)

    def pack(t):
        if saved is not None and isinstance(t, torch.Tensor) and t.device.type == "meta":
            st = _storage(t)
            if st not in params:
                saved.append((st, t.untyped_storage().nbytes()))
        return t

    with runtime.recording(on_launch), OpCounter(c.events):
        if saved is not None:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fn()
        else:
            out = fn()
    return out, c


def saved_bytes(saved) -> int:
    return sum(dict(saved).values())


# ---------------------------------------------------------------------------------------------
# providers (each a layer on the meta device)

@dataclass(frozen=True)
class Shape:
    name: str
    in_features: int
    out_features: int
    tokens: int
    r: int = 16
    dtype: str = "bf16"
    adapter_dtype: str = "bf16"
    bias: bool = False
    dropout: float = 0.0


def build(provider: str, s: Shape) -> nn.Module:
    dt, adt = _DTYPES[s.dtype], _DTYPES[s.adapter_dtype]
    alpha = 2 * s.r
    if provider == "linear":
        layer = nn.Linear(s.in_features, s.out_features, bias=s.bias, device="meta", dtype=dt)
        layer.requires_grad_(False)
        return layer
    if provider == "fused":
        import dora_kernels

        return dora_kernels.DoRALinear(s.in_features, s.out_features, s.r, alpha, bias=s.bias, dropout=s.dropout,
                                       device="meta", dtype=dt, adapter_dtype=adt)
    if provider == "reference":
        import reference

        return reference.DoRALinear(s.in_features, s.out_features, s.r, alpha, bias=s.bias, dropout=s.dropout,
                                    device="meta", dtype=dt, adapter_dtype=adt)
    if provider in ("peft_dora", "peft_lora", "fused_peft"):
        from peft import LoraConfig, get_peft_model

        base = nn.Sequential(nn.Linear(s.in_features, s.out_features, bias=s.bias, device="meta", dtype=dt))
        cfg = LoraConfig(r=s.r, lora_alpha=alpha, target_modules=["0"], lora_dropout=s.dropout,
                         use_dora=provider != "peft_lora")
        model = get_peft_model(base, cfg, autocast_adapter_dtype=False)
        layer = model.base_model.model[0]
        for p in layer.parameters():
            if p.requires_grad:
                p.data = p.data.to(adt)
        if provider == "fused_peft":
            import dora_kernels

            dora_kernels.fuse(layer)
        return layer
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


@dataclass
class LayerTrace:
    fwd: Count
    bwd: Count
    eval: Count
    saved: int

    def mode(self, m: str) -> Count:
        return {"fwd": self.fwd, "bwd": self.bwd, "step": self.fwd.add(self.bwd), "eval": self.eval}[m]


def trace_layer(provider: str, s: Shape, arch=(9, 0), num_sms=132) -> LayerTrace:
    """One training step (forward with x requiring grad, backward) and one steady-state eval
    forward of ``provider`` on meta tensors; the fused paths plan for ``arch``."""
    with runtime.trace_target(arch, num_sms):
        layer = build(provider, s)
        params = {_storage(p) for p in layer.parameters()}
        x = torch.empty((s.tokens, s.in_features), device="meta", dtype=_DTYPES[s.dtype], requires_grad=True)
        layer.train()
        saved = []
        y, fwd = count(lambda: layer(x), saved=saved, param_storages=params)
        saved.append((_storage(y), y.untyped_storage().nbytes()))
        grad = torch.empty_like(y)
        _, bwd = count(lambda: y.backward(grad))
        layer.eval()
        with torch.no_grad():
            layer(x)  # warm: eval caches (the fused module's norm) are filled once
            _, ev = count(lambda: layer(x))
    return LayerTrace(fwd, bwd, ev, saved_bytes(saved))


# ---------------------------------------------------------------------------------------------
# the roofline

def _mm_peak(dtype, gpu) -> float:
    return gpu["mm"] if dtype in (torch.float16, torch.bfloat16) else gpu["fp32"]


def predict_s(c: Count, gpu: dict) -> float:
    """Σ over launches of max(matmul/peak + other/fp32 peak, bytes/bandwidth) + overhead."""
    t = 0.0
    for e in c.events:
        compute = e.mm_flops / _mm_peak(e.dtype, gpu) + e.other_flops / gpu["fp32"]
        t += max(compute, e.bytes / gpu["bw"]) + LAUNCH_OVERHEAD_S
    return t


def constants() -> dict:
    return {"launch_overhead_s": LAUNCH_OVERHEAD_S,
            "gpus": {k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in v.items()}
                     for k, v in GPUS.items()},
            "rule": "per launch max(matmul_flops/mm + other_flops/fp32, bytes/bw) + launch_overhead_s, summed; "
                    "mm applies to bf16/fp16 matmuls, fp32 to fp32 matmuls and all other FLOPs"}


# ---------------------------------------------------------------------------------------------
# the trace

COLUMNS = ["provider", "mode", "layer", "tokens", "in_features", "out_features", "r", "dtype", "adapter_dtype",
           "bias", "dropout", "launches", "triton_launches", "aten_launches", "mm_flops", "other_flops", "flops",
           "hbm_bytes", "saved_bytes", "gpu", "predicted_ms", "ratio_floor", "ratio_peft_dora", "ratio_peft_lora",
           "kind"]


def run(shapes, tokens, *, r=16, dtype="bf16", adapter_dtype=None, bias=False, dropout=0.0, providers=PROVIDERS,
        gpus=tuple(GPUS), log=None):
    """Trace every (shape, tokens, provider) and return the CSV rows (one per mode and GPU)."""
    adapter_dtype = adapter_dtype or dtype
    rows = []
    arch_gpus = {}
    for g in gpus:
        arch_gpus.setdefault((GPUS[g]["arch"], GPUS[g]["sms"]), []).append(g)
    for name, fin, fout in shapes:
        for n in tokens:
            s = Shape(name, fin, fout, n, r, dtype, adapter_dtype, bias, dropout)
            t0 = time.perf_counter()
            traces = {}
            for p in providers:
                for (arch, sms), gs in arch_gpus.items():
                    if p.startswith("fused") or not traces.get(p):
                        tr = trace_layer(p, s, arch, sms)
                    for g in gs:
                        traces.setdefault(p, {})[g] = tr
            for g in gpus:
                for mode in MODES:
                    base = {}
                    for p in providers:
                        c = traces[p][g].mode(mode)
                        base[p] = predict_s(c, GPUS[g])
                    for p in providers:
                        tr = traces[p][g]
                        c = tr.mode(mode)
                        ms = base[p] * 1e3

                        def ratio(q):
                            return round(base[p] / base[q], 4) if q in base and base[q] > 0 else ""

                        rows.append({
                            "provider": p, "mode": mode, "layer": name, "tokens": n, "in_features": fin,
                            "out_features": fout, "r": r, "dtype": dtype, "adapter_dtype": adapter_dtype,
                            "bias": int(bias), "dropout": dropout, "launches": c.launches,
                            "triton_launches": sum(e.source == "triton" for e in c.events),
                            "aten_launches": sum(e.source == "aten" for e in c.events),
                            "mm_flops": c.mm_flops, "other_flops": c.other_flops, "flops": c.mm_flops + c.other_flops,
                            "hbm_bytes": c.bytes, "saved_bytes": 0 if mode == "eval" else tr.saved, "gpu": g,
                            "predicted_ms": round(ms, 5), "ratio_floor": ratio(FLOOR), "ratio_peft_dora": ratio("peft_dora"),
                            "ratio_peft_lora": ratio("peft_lora"), "kind": "prediction"})
            if log:
                log(f"  {name:11s} {fin:>5d}->{fout:<5d} tokens {n:>5d}: {time.perf_counter() - t0:5.2f} s")
    return rows


def launch_list(provider: str, s: Shape, mode: str, arch=(9, 0), num_sms=132) -> list:
    """The launches (names, in order) of one mode: for reading and for tests."""
    return [e.name for e in trace_layer(provider, s, arch, num_sms).mode(mode).events]


# ---------------------------------------------------------------------------------------------
# targets (issue 7), judged on the trace

def _find(rows, **kw):
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def targets(rows, gpu="H100-SXM"):
    """[(target, met, detail)] for the issue's three targets (H100, bf16, r = 16, no dropout or
    bias, Llama-3-8B projections); empty where the rows do not cover them."""
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
                if f is not None and f[field] != "" and (worst is None or f[field] > worst[0]):
                    worst = (f[field], layer, n)
        return worst

    worst = worst_ratio((4096, 16384), "step", "ratio_floor")
    if worst:
        out.append(("fused fwd+bwd <= 1.10x floor (4096, 16384 tokens)", worst[0] <= 1.10,
                    f"worst {worst[0]:.3f}x at {worst[1]} N={worst[2]} ({(worst[0] / 1.10 - 1) * 100:+.1f}% vs target)"))
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
    worst = worst_ratio((1, 16, 64, 256), "eval", "ratio_peft_lora")
    if worst:
        out.append(("fused eval forward <= 1.05x PEFT LoRA (1-256 tokens)", worst[0] <= 1.05,
                    f"worst {worst[0]:.3f}x at {worst[1]} N={worst[2]} ({(worst[0] / 1.05 - 1) * 100:+.1f}% vs target)"))
    return out


# ---------------------------------------------------------------------------------------------
# output

def _fmt_bytes(b):
    return f"{b / 2**20:.1f}"


def table(rows, gpu="H100-SXM", mode="step") -> str:
    """A markdown table of one GPU and mode: per shape and token count, one line per provider."""
    sel = [r for r in rows if r["gpu"] == gpu and r["mode"] == mode]
    lines = [f"### {gpu}, mode `{mode}` (predicted)", "",
             "| layer | tokens | provider | launches | GFLOP | HBM MiB | saved MiB | ms | x floor | x PEFT DoRA | x PEFT LoRA |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sel:
        lines.append(f"| {r['layer']} | {r['tokens']} | {r['provider']} | {r['launches']} | {r['flops'] / 1e9:.2f} | "
                     f"{_fmt_bytes(r['hbm_bytes'])} | {_fmt_bytes(r['saved_bytes'])} | {r['predicted_ms']:.4f} | "
                     f"{r['ratio_floor']} | {r['ratio_peft_dora']} | {r['ratio_peft_lora']} |")
    return "\n".join(lines)


def constants_text() -> str:
    lines = [f"launch overhead: {LAUNCH_OVERHEAD_S * 1e6:.1f} us per launch"]
    for g, v in GPUS.items():
        lines.append(f"{g}: bf16/fp16 matmul {v['mm'] / 1e12:.0f} TFLOP/s reachable ({v['mm_nominal'] / 1e12:.0f} "
                     f"nominal); fp32 {v['fp32'] / 1e12:.0f} ({v['fp32_nominal'] / 1e12:.1f}); HBM "
                     f"{v['bw'] / 1e12:.2f} TB/s reachable ({v['bw_nominal'] / 1e12:.2f} nominal); plans for "
                     f"sm_{v['arch'][0]}{v['arch'][1]}, {v['sms']} SMs")
    lines.append("per launch: max(matmul FLOPs / matmul peak + other FLOPs / fp32 peak, bytes / HBM) + overhead")
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
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{layer} {mode}", fontsize=9)
            ax.set_xlabel("tokens")
            if j == 0:
                ax.set_ylabel("predicted time / frozen linear")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Dry-run trace, {gpu}, predicted (roofline of counted launches)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(rows, out_dir, *, argv=(), elapsed=None):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "trace.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, "trace_constants.json"), "w") as f:
        json.dump(constants(), f, indent=1)
    tg = targets(rows)
    md = ["# Dry-run trace of one DoRA layer step (predictions, not measurements)", "",
          f"Command: `python -m bench --trace {' '.join(argv)}`" + (f" ({elapsed:.1f} s)" if elapsed else ""),
          f"torch {torch.__version__}; counted on meta tensors (see `bench/trace.py`).", "", "Constants:", "",
          "```", constants_text(), "```", "",
          f"## Targets (H100, bf16, r=16, Llama-3-8B projections; adapters {rows[0]['adapter_dtype'] if rows else '-'})",
          ""]
    md += [f"- **{'met' if ok else 'MISSED'}**: {name} — {detail}" for name, ok, detail in tg] or ["- (not covered)"]
    md += ["", table(rows, mode="step"), "", table(rows, mode="eval"), ""]
    with open(os.path.join(out_dir, "trace.md"), "w") as f:
        f.write("\n".join(md))
    return plot(rows, os.path.join(out_dir, "trace.png")), tg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if a != "--trace"]
    ap = argparse.ArgumentParser(prog="python -m bench --trace", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset (2 shapes, 4 token counts): well under a minute")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/trace[_quick])")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    ap.add_argument("--adapter-dtype", default=None, choices=sorted(_DTYPES),
                    help="adapters' dtype (default: the model's; PEFT's get_peft_model default on bf16 is fp32)")
    ap.add_argument("--bias", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=PROVIDERS)
    args = ap.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    tokens = tuple(args.tokens) if args.tokens else (QUICK_TOKENS if args.quick else TOKENS)
    providers = tuple(dict.fromkeys([FLOOR, "peft_dora", "peft_lora"] + list(args.providers)))
    out = args.out or os.path.join("bench", "results", "trace_quick" if args.quick else "trace")
    print("Dry-run trace (meta tensors; every figure below is a prediction)")
    print(constants_text())
    t0 = time.perf_counter()
    rows = run(shapes, tokens, r=args.r, dtype=args.dtype, adapter_dtype=args.adapter_dtype, bias=args.bias,
               dropout=args.dropout, providers=providers, log=print)
    elapsed = time.perf_counter() - t0
    plotted, tg = write(rows, out, argv=argv, elapsed=elapsed)
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


if __name__ == "__main__":
    sys.exit(main())
