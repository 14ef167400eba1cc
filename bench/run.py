"""The benchmark driver: ``main(argv)`` sweeps shapes × ranks × tokens × dtypes, runs every
provider in every mode, prints a table per case and writes results.csv / results.json /
ratios.png (and the model figure: model.png) into ``--out``.

Modes (``x`` requires grad, as in a layer inside a network; no dropout):

- ``fwd``: training forward (grad enabled, graph recorded);
- ``bwd``: backward only: the forward runs before each call, outside the timed region;
- ``step``: forward + backward, a training step of one layer; memory is measured here;
- ``eval``: eval-mode forward under ``torch.no_grad()`` (the fused module caches the norm);
- ``norm``: the weight norm alone (``fused``: the norm kernel; ``reference``: PEFT's way), GB/s.

``python -m bench`` is the entry point (it makes sure the CPU runs the fused op's torch path,
not the Triton interpreter, before anything imports ``dora_kernels``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import re
import sys
import time

import torch

from . import providers as P
from . import report as R
from .flops import MODES, layer_flops
from .report import fmt
from .shapes import GROUPS, MODELS, parse_shapes
from .shapes import defaults as sweep_defaults
from .tables import (KIND_CPU_SHAPES, KIND_FLOOR, KIND_PROVIDERS, KIND_SHAPES, LAYER_KINDS, QDORA_FLOOR, QDORA_FORMAT,
                     QDORA_PROVIDERS, QDORA_ROLES, default_out, nominal_bandwidth)
from .timing import bench, peak_bytes, saved_bytes

ALL_MODES = MODES + ("norm",)


def _ints(s: str) -> tuple:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _names(s: str) -> tuple:
    return tuple(v.strip() for v in s.split(",") if v.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the fused DoRA op against PyTorch, torch.compile, PEFT's DoRA and LoRA, and a frozen "
                    "nn.Linear (the floor). Defaults depend on the device: see bench/README.md.",
        epilog="python -m bench --trace ... runs the dry-run launch/traffic trace instead (bench/trace.py, its own "
               "options).")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true", help="a short sweep (CPU: about a minute)")
    p.add_argument("--shapes", help="comma list: groups (gpu, gpu-quick, cpu, cpu-quick), models "
                                    f"({', '.join(MODELS)}), MODEL.PROJ (llama3-8b.q), or INxOUT")
    p.add_argument("--tokens", type=_ints, help="comma list of token counts N, e.g. 1,16,256,4096,16384")
    p.add_argument("--ranks", type=_ints, help="comma list of LoRA ranks, e.g. 8,16,64")
    p.add_argument("--dtypes", type=_names, help="comma list of bf16, fp16, fp32 (x and the frozen weight)")
    p.add_argument("--adapter-dtype", choices=["fp32", "same"], default="fp32",
                   help="adapters' dtype: fp32 (PEFT's default on bf16/fp16 models) or the same as x")
    p.add_argument("--modes", type=_names, default=ALL_MODES,
                   help=f"comma list of {', '.join(ALL_MODES)} (norm: the weight-norm kernel alone, GB/s)")
    p.add_argument("--providers", type=_names, help=f"comma list of {', '.join(P.PROVIDERS)} (default: all), or of "
                                                    f"the QDoRA ones: {', '.join(QDORA_PROVIDERS)}")
    p.add_argument("--qdora", action="store_true",
                   help=f"the QDoRA providers ({', '.join(QDORA_PROVIDERS)}: PEFT's DoRA over a bitsandbytes nf4 "
                        "Linear4bit with double quantisation, blocksize 64, fused by dora_kernels.fuse, PEFT's LoRA "
                        "over it and the frozen Linear4bit, the floor) instead of the default ones, no model figure"),
    p.add_argument("--out", help="output folder (default ./bench_results/<device>-<date>-<time> under the current "
                                 "directory)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", action="store_true", help="run only the model-level figure")
    g.add_argument("--no-model", action="store_true", help="skip the model-level figure")
    p.add_argument("--model-preset", choices=["tiny", "mini", "small"], help="model size (default by device)")
    p.add_argument("--model-variants", type=_names,
                   help="comma list of the model figure's variants: fused, peft_dora, peft_lora (LoRA/DoRA at r=16), "
                        "fused_dvora, peft_vera (DVoRA / PEFT VeRA at --model-dvora-r), fused_r<R> (fused DoRA at "
                        "rank R); default all five and fused_r<--model-dvora-r>")
    p.add_argument("--model-dvora-r", type=int,
                   help="rank of the model figure's fused_dvora and peft_vera (default 256, the trace's DVORA_R)")
    p.add_argument("--warmup-ms", type=float, help="warm-up time per measurement (GPU 25, CPU 20)")
    p.add_argument("--rep-ms", type=float, help="timed time per measurement (GPU 100, CPU 150, CPU --quick 100)")
    p.add_argument("--min-reps", type=int, default=5, help="CPU: at least this many timed calls")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch threads (default 1: steady wall-clock times on a shared machine; 0: torch's "
                        "default)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--layers", type=_names, default=("linear",),
                   help="comma list of linear (the projection sweep), conv (a Stable-Diffusion UNet 3x3 Conv2d "
                        "320->320, 2x64x64), embedding (vocab 128256, dim 4096, 4096 ids); CPU: tiny conv/embedding "
                        "shapes. conv/embedding providers: fused (PEFT after dora_kernels.fuse), peft_dora, "
                        "peft_lora, base (the frozen layer, the floor); default linear")
    p.add_argument("--list", action="store_true", help="list the shapes and providers, then exit")
    return p


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"cpu: {name} ({n} thread{'s' if n != 1 else ''})"


def hbm_peak(device: str) -> float | None:
    """The GPU's nominal memory bandwidth in bytes/s (2 · memory clock · bus width), or None."""
    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8
    return nominal_bandwidth(torch.cuda.get_device_name())  # the data sheet's, by name (bench.tables.GPUS)


def _slug(device: str) -> str:
    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = ""
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda or ""}


def _list():
    print("shape groups:")
    for g, shapes in GROUPS.items():
        print(f"  {g}: " + ", ".join(s.label for s in shapes))
    print("models (MODEL or MODEL.PROJ):")
    for m, projs in MODELS.items():
        print(f"  {m}: " + ", ".join(f"{k} {i}→{o}" for k, (i, o) in projs.items()))
    print("providers: " + ", ".join(P.PROVIDERS))
    print("QDoRA providers (--qdora, or by name): " + ", ".join(QDORA_PROVIDERS))
    print("modes: " + ", ".join(ALL_MODES))


def _calls(module, mode, x, G):
    """(fn, setup) timing ``mode``: each call is ``fn()``, or ``fn(setup())`` with only ``fn`` timed."""
    if mode == "eval":
        module.eval()

        def infer():
            with torch.no_grad():
                return module(x)
        return infer, None
    module.train()
    if mode == "fwd":
        return (lambda: module(x)), None
    if mode == "step":
        return (lambda: module(x).backward(G)), None
    if mode == "bwd":
        return (lambda y: y.backward(G)), (lambda: module(x))
    raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")


def kind_flops(kind, mode, t, *, floor=False) -> int:
    """Counted matmul FLOPs of a conv / embedding case (``bench.providers.KindTensors``), as
    ``bench.flops`` counts a Linear's: the conv as a (tokens, in·k²) × (in·k², out) product, the
    embedding's lookup as none; the rank path 2·N·r·(K + out) forward, twice that backward."""
    n, out = t.tokens, t.out_features
    k = t.in_features * t.sizes["kernel"] ** 2 if kind == "conv" else 0
    base = 2 * n * k * out
    rank = 0 if floor else 2 * n * t.r * (k + out)
    fwd, bwd = base + rank, base + 2 * rank
    if kind == "embedding" and floor:
        bwd = 0  # a frozen lookup has no backward
    return {"fwd": fwd, "eval": fwd, "bwd": bwd, "step": fwd + bwd}[mode]


class Runner:
    """State of one run: options, notes, rows, printed lines."""

    def __init__(self, args, device):
        self.args = args
        self.device = device
        self.notes: list[str] = []
        self.lines: list[str] = []
        self.broken: dict = {}  # provider -> why it was dropped mid-run

    def emit(self, text=""):
        print(text, flush=True)
        self.lines.append(text)

    def note(self, text):
        self.notes.append(text)
        self.emit(f"note: {text}")

    def timing(self):
        a = self.args
        cuda = self.device == "cuda"
        warm = a.warmup_ms if a.warmup_ms is not None else (25.0 if cuda else 20.0)
        rep = a.rep_ms if a.rep_ms is not None else (100.0 if cuda else (100.0 if a.quick else 150.0))
        return {"warmup_ms": warm, "rep_ms": rep, "min_reps": a.min_reps}

    # -- one layer case ----------------------------------------------------------------------
    def measure(self, module, mode, t, params):
        """{"time": (median, p20, p80) ms, and for the step "peak" (GPU) and "saved" bytes}."""
        x = t.x
        fn, setup = _calls(module, mode, x, t.grad)
        gtn = None if mode in ("fwd", "eval") else params + [x]
        try:
            res = {"time": bench(fn, self.device, setup=setup, grad_to_none=gtn, **self.timing())}
            if mode == "step":
                res["peak"] = peak_bytes(fn, grad_to_none=gtn) if self.device == "cuda" else None
                res["saved"] = saved_bytes(lambda: module(x), held=list(module.parameters()))
        finally:
            for p in params + [x]:
                p.grad = None
            module.train()
        return res

    def run_case(self, rows, shape, tokens, r, dtype, adapter_dtype, provs, modes):
        a_dt = P.short_dtype(adapter_dtype)
        title = (f"── {shape.label} · N={tokens} · r={r} · {P.short_dtype(dtype)} (adapters {a_dt}) — "
                 f"median ms (TFLOP/s); ratios of fused ──")
        t = P.make_tensors(tokens, shape.in_features, shape.out_features, r, dtype, adapter_dtype, self.device)
        res = {}
        for prov in provs:
            if prov in self.broken:
                continue
            try:
                module = P.build(prov, t)
            except P.Unavailable as e:
                self.broken[prov] = str(e)
                self.note(f"{prov} skipped: {e}")
                continue
            except Exception as e:  # noqa: BLE001  (a provider that fails to build is reported, not fatal)
                self.note(f"{prov} failed to build for {shape.name} N={tokens} r={r}: {type(e).__name__}: {e}")
                continue
            params = P.trainable(module)
            for mode in modes:
                try:
                    res[(prov, mode)] = self.measure(module, mode, t, params)
                except Exception as e:  # noqa: BLE001
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    if prov == "compiled" and not any(k[0] == "compiled" for k in res) and \
                            not isinstance(e, torch.cuda.OutOfMemoryError):
                        self.broken[prov] = f"torch.compile failed: {type(e).__name__}: {msg}"
                        self.note(f"compiled dropped: {self.broken[prov]}")
                        break
                    self.note(f"{prov} {mode} failed for {shape.name} N={tokens} r={r}: {type(e).__name__}: {msg}")
                    if self.device == "cuda":
                        torch.cuda.empty_cache()
            del module, params
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()
        del t
        shown = [p for p in provs if any(k[0] == p for k in res)]
        flops = {(p, m): layer_flops(m, tokens, shape.in_features, shape.out_features, r,
                                     floor=p in ("linear", QDORA_FLOOR))
                 for p in shown for m in modes}
        mem_key, mem_label = ("peak", "peak") if self.device == "cuda" else ("saved", "saved")
        plain = [p for p in shown if p not in QDORA_PROVIDERS]
        if plain or not shown:
            self.emit(R.case_table(title, res, plain, list(modes), flops, mem_key=mem_key, mem_label=mem_label))
            self.emit()
        # the QDoRA providers keyed by their DoRA roles (fused, peft_dora, peft_lora, linear), so
        # bench.report's ratios are fused_qdora's against PEFT's QDoRA, QLoRA and the Linear4bit
        qdora = {(QDORA_ROLES[p], m): v for (p, m), v in res.items() if p in QDORA_PROVIDERS}
        if qdora:
            roles = [QDORA_ROLES[p] for p in QDORA_PROVIDERS if p in shown]
            fmt = QDORA_FORMAT
            self.emit(R.case_table(
                title.replace("ratios of fused", f"QDoRA ({fmt['quant_type']}, "
                              f"{'double quantisation, ' if fmt['compress_statistics'] else ''}blocksize "
                              f"{fmt['blocksize']}): ratios of fused_qdora"),
                qdora, roles, list(modes), {(QDORA_ROLES[p], m): f for (p, m), f in flops.items() if p in QDORA_ROLES},
                mem_key=mem_key, mem_label=mem_label, names={v: k for k, v in QDORA_ROLES.items()},
                ratio_labels=("×PEFT-QDoRA", "×PEFT-QLoRA", "/Linear4bit")))
            self.emit()
        common = dict(name=shape.name, tokens=tokens, in_features=shape.in_features, out_features=shape.out_features,
                      r=r, dtype=P.short_dtype(dtype), adapter_dtype=a_dt)
        for (prov, mode), v in res.items():
            med, p20, p80 = v["time"]
            rows.add(provider=prov, mode=mode, metric="time", unit="ms", median=med, p20=p20, p80=p80, **common)
            f = flops[(prov, mode)] / 1e9  # GFLOP per call; / ms → TFLOP/s
            rows.add(provider=prov, mode=mode, metric="tflops", unit="TFLOP/s", median=f / med, p20=f / p80,
                     p80=f / p20, **common)
            if v.get("peak") is not None:
                rows.add(provider=prov, mode=mode, metric="peak_mem", unit="MiB", median=v["peak"] / R.MiB, **common)
            if v.get("saved") is not None:
                rows.add(provider=prov, mode=mode, metric="saved_mem", unit="MiB", median=v["saved"] / R.MiB,
                         **common)
        for prov in R.RATIO_PROVIDERS:
            for mode in modes:
                for metric, (med, p20, p80) in R.ratios(res, prov, mode, mem_key=mem_key).items():
                    rows.add(provider=prov, mode=mode, metric=metric, unit="x", median=med, p20=p20, p80=p80,
                             **common)
        for mode in modes:  # fused_qdora's: speedup_vs_peft_dora is against PEFT QDoRA, over_floor the Linear4bit
            for metric, (med, p20, p80) in R.ratios(qdora, "fused", mode, mem_key=mem_key).items():
                rows.add(provider="fused_qdora", mode=mode, metric=metric, unit="x", median=med, p20=p20, p80=p80,
                         **common)

    # -- a conv / embedding layer (--layers) -----------------------------------------------------
    def run_kind(self, rows, kind, dtype, adapter_dtype, r, modes):
        """PEFT's DoRA on a Conv2d / Embedding, fused (``dora_kernels.fuse``) and not, PEFT's LoRA
        and the frozen layer (``base``, the floor; a frozen nn.Embedding has no backward: its
        step is timed as the lookup, its bwd is not timed)."""
        name, sizes = (KIND_SHAPES if self.device == "cuda" else KIND_CPU_SHAPES)[kind]
        t = P.make_kind_tensors(kind, name, sizes, r, dtype, adapter_dtype, self.device)
        a_dt = P.short_dtype(adapter_dtype)
        title = (f"── {kind} {name} {sizes} · tokens {t.tokens} · r={r} · {P.short_dtype(dtype)} (adapters {a_dt})"
                 f" — median ms (TFLOP/s); ratios of fused ──")
        res = {}
        for prov in KIND_PROVIDERS:
            why = P.check_installed("fused_peft" if prov == "fused" else
                                    ("linear" if prov == KIND_FLOOR else prov))
            if why:
                self.note(f"{kind} {prov} skipped: {why}")
                continue
            try:
                module = P.build_kind(prov, t)
            except Exception as e:  # noqa: BLE001  (a provider that fails to build is reported, not fatal)
                self.note(f"{kind} {prov} failed to build: {type(e).__name__}: {e}")
                continue
            params = P.trainable(module)
            for mode in modes:
                frozen_lookup = kind == "embedding" and prov == KIND_FLOOR and mode in ("bwd", "step")
                if frozen_lookup and mode == "bwd":
                    continue
                try:
                    res[(prov, mode)] = self.measure(module, "fwd" if frozen_lookup else mode, t, params)
                except Exception as e:  # noqa: BLE001
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    self.note(f"{kind} {prov} {mode} failed: {type(e).__name__}: {msg}")
                    if self.device == "cuda":
                        torch.cuda.empty_cache()
            del module, params
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()
        shown = [p for p in KIND_PROVIDERS if any(k[0] == p for k in res)]
        flops = {(p, m): kind_flops(kind, m, t, floor=p == KIND_FLOOR) for p in shown for m in modes}
        # bench.report's ratios divide by the provider named "linear": the floor, here ``base``
        keyed = {("linear" if p == KIND_FLOOR else p, m): v for (p, m), v in res.items()}
        mem_key, mem_label = ("peak", "peak") if self.device == "cuda" else ("saved", "saved")
        self.emit(R.case_table(title, keyed, ["linear" if p == KIND_FLOOR else p for p in shown], list(modes),
                               {("linear" if p == KIND_FLOOR else p, m): f for (p, m), f in flops.items()},
                               mem_key=mem_key, mem_label=mem_label).replace("linear", KIND_FLOOR))
        self.emit()
        common = dict(name=name, tokens=t.tokens, in_features=t.in_features, out_features=t.out_features, r=r,
                      dtype=P.short_dtype(dtype), adapter_dtype=a_dt)
        for (prov, mode), v in res.items():
            med, p20, p80 = v["time"]
            rows.add(provider=prov, mode=mode, metric="time", unit="ms", median=med, p20=p20, p80=p80, **common)
            f = flops[(prov, mode)] / 1e9
            rows.add(provider=prov, mode=mode, metric="tflops", unit="TFLOP/s", median=f / med, p20=f / p80,
                     p80=f / p20, **common)
            if v.get("peak") is not None:
                rows.add(provider=prov, mode=mode, metric="peak_mem", unit="MiB", median=v["peak"] / R.MiB, **common)
            if v.get("saved") is not None:
                rows.add(provider=prov, mode=mode, metric="saved_mem", unit="MiB", median=v["saved"] / R.MiB,
                         **common)
        for mode in modes:
            for metric, (med, p20, p80) in R.ratios(keyed, "fused", mode, mem_key=mem_key).items():
                rows.add(provider="fused", mode=mode, metric=metric, unit="x", median=med, p20=p20, p80=p80, **common)

    # -- the weight norm alone ----------------------------------------------------------------
    def run_norm(self, rows, shape, r, dtype, adapter_dtype, provs):
        """n = ‖W0 + s·B·A‖ by the fused op's norm kernel (``fused``) and PEFT's way (``reference``:
        B·A through an identity matrix, in the adapters' dtype): time and GB/s of the bytes it
        must move (W0, A, B read once, n written)."""
        t = P.make_tensors(1, shape.in_features, shape.out_features, r, dtype, adapter_dtype, self.device)
        fns = {}
        if "fused" in provs and "fused" not in self.broken:
            import dora_kernels

            wn = getattr(dora_kernels, "weight_norm", None)
            if wn is not None:
                fns["fused"] = lambda: wn(t.weight, t.lora_A, t.lora_B, t.scaling)
        if "reference" in provs:
            import reference

            fns["reference"] = lambda: reference.dora_weight_norm(t.weight, t.lora_A, t.lora_B, t.scaling,
                                                                  dtype=t.lora_A.dtype)
        if not fns:
            return
        nbytes = sum(v.numel() * v.element_size() for v in (t.weight, t.lora_A, t.lora_B)) + 4 * shape.out_features
        peak = hbm_peak(self.device)
        common = dict(name=shape.name, mode="norm", tokens=0, in_features=shape.in_features,
                      out_features=shape.out_features, r=r, dtype=P.short_dtype(dtype),
                      adapter_dtype=P.short_dtype(adapter_dtype))
        cells = []
        for prov, fn in fns.items():
            try:
                with torch.no_grad():
                    med, p20, p80 = bench(fn, self.device, **self.timing())
            except Exception as e:  # noqa: BLE001
                self.note(f"{prov} norm failed for {shape.name} r={r}: {type(e).__name__}: {e}")
                continue
            gb = nbytes / 1e6  # GB/s = bytes / 1e9 / (ms / 1e3)
            rows.add(provider=prov, metric="time", unit="ms", median=med, p20=p20, p80=p80, **common)
            rows.add(provider=prov, metric="gbps", unit="GB/s", median=gb / med, p20=gb / p80, p80=gb / p20, **common)
            cell = f"{prov} {fmt(med)} ms, {fmt(gb / med, 4)} GB/s"
            if peak:
                frac = nbytes / (med * 1e-3) / peak
                rows.add(provider=prov, metric="hbm_fraction", unit="x", median=frac,
                         p20=nbytes / (p80 * 1e-3) / peak, p80=nbytes / (p20 * 1e-3) / peak, **common)
                cell += f" ({100 * frac:.0f}% of {peak / 1e12:.2f} TB/s)"
            cells.append(cell)
        self.emit(f"── weight norm {shape.label} · r={r} · {P.short_dtype(dtype)} (adapters "
                  f"{P.short_dtype(adapter_dtype)}), {nbytes / R.MiB:.4g} MiB moved: " + "; ".join(cells))
        self.emit()

    # -- the model figure ----------------------------------------------------------------------
    def run_model(self, rows, preset, variants, dtype, out_dir):
        """The model figure (``bench.model``) of ``variants`` on ``preset``: a table, rows with
        mode ``model-step`` (r the variant's; its trainable parameters as ``trainable_params``),
        model.png."""
        from . import model as M

        for mod in ("transformers", "peft"):
            try:
                __import__(mod)
            except ImportError as e:
                self.note(f"model figure skipped: {mod} is not installed ({e})")
                return
        by_rank = {}
        for v in variants:
            by_rank.setdefault(M.rank(preset, v), []).append(v)
        ranks = "; ".join(f"r={r}: {'/'.join(vs)}" for r, vs in by_rank.items())
        title = (f"── model step: {preset.name} (LlamaForCausalLM, {preset.layers} layers, hidden {preset.hidden}, "
                 f"intermediate {preset.intermediate}, batch {preset.batch} × seq {preset.seq}, "
                 f"{P.short_dtype(dtype)}), adapters on q/k/v/o/gate/up/down ({ranks}) ──")
        self.emit(title)
        res = M.run(preset, variants, dtype, self.device, on_note=self.note, **self.timing())
        mem_key, mem_label = ("peak", "peak") if self.device == "cuda" else ("saved", "saved")
        self.emit(R.model_table("", res, list(variants), mem_key=mem_key, mem_label=mem_label).lstrip("\n"))
        self.emit()
        common = dict(name=preset.name, mode="model-step", tokens=preset.batch * preset.seq,
                      in_features=preset.hidden, out_features=preset.intermediate,
                      dtype=P.short_dtype(dtype), adapter_dtype="fp32" if dtype != torch.float64 else "fp64")
        for v, x in res.items():
            med, p20, p80 = x["time"]
            at = dict(common, provider=v, r=x["r"])
            rows.add(metric="time", unit="ms", median=med, p20=p20, p80=p80, **at)
            if x.get("peak") is not None:
                rows.add(metric="peak_mem", unit="MiB", median=x["peak"] / R.MiB, **at)
            rows.add(metric="saved_mem", unit="MiB", median=x["saved"] / R.MiB, **at)
            rows.add(metric="trainable_params", unit="params", median=x["trainable"], **at)
            if v.startswith("fused"):  # the ratios of the fused variants, as the layer sweep gives fused's
                for metric, (med, p20, p80) in R.model_ratios(res, v, mem_key=mem_key).items():
                    rows.add(metric=metric, unit="x", median=med, p20=p20, p80=p80, **at)
        if not self.args.no_plot and res:
            why = R.plot_model(title.strip("─ "), res, list(variants), os.path.join(out_dir, "model.png"),
                               mem_key=mem_key, mem_label=f"{mem_label} memory")
            if why:
                self.note(why)


def _model_plan(args, default_preset: str):
    """(preset, variants) of the model figure from ``--model-preset``, ``--model-dvora-r`` and
    ``--model-variants``; ValueError for an unknown variant or a rank below 1."""
    import dataclasses

    from . import model as M

    preset = M.PRESETS[args.model_preset or default_preset]
    if args.model_dvora_r is not None:
        if args.model_dvora_r < 1:
            raise ValueError(f"--model-dvora-r {args.model_dvora_r}: a rank is at least 1")
        preset = dataclasses.replace(preset, dvora_r=args.model_dvora_r)
    variants = tuple(dict.fromkeys(args.model_variants or M.default_variants(preset)))
    for v in variants:
        M.rank(preset, v)
    return preset, variants


def main(argv=None) -> int:
    """Run the benchmark (see ``python -m bench --help``); returns the exit status."""
    args = parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args) -> int:
    t_start = time.perf_counter()
    if args.list:
        _list()
        return 0
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    d = sweep_defaults(device, args.quick)
    try:
        shapes = parse_shapes(args.shapes or d.shapes)
        dtypes = [P.dtype_of(n) for n in (args.dtypes or d.dtypes)]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens = args.tokens or d.tokens
    ranks = args.ranks or d.ranks
    modes = tuple(args.modes)
    bad = [m for m in modes if m not in ALL_MODES]
    provs = list(args.providers or (QDORA_PROVIDERS if args.qdora else P.PROVIDERS))
    bad += [p for p in provs if p not in P.PROVIDERS + QDORA_PROVIDERS]
    if args.qdora and not args.model:
        args.no_model = True  # the model figure is DoRA's (bench/model.py)
    if bad:
        print(f"error: unknown mode/provider {', '.join(bad)} (modes: {', '.join(ALL_MODES)}; providers: "
              f"{', '.join(P.PROVIDERS + QDORA_PROVIDERS)})", file=sys.stderr)
        return 2

    if not args.no_model:
        try:
            model_preset, model_variants = _model_plan(args, d.model_preset)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    if device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    stamp = datetime.datetime.now().astimezone()
    out_dir = args.out or default_out(f"{_slug(device)}-{stamp:%Y%m%d-%H%M%S}")
    versions = _versions()
    path = P.fused_path(device)
    run = Runner(args, device)
    common = dict(device=_device_name(device), timestamp=stamp.isoformat(timespec="seconds"), fused_path=path,
                  **versions)
    rows = R.Rows(common)

    run.emit(f"dora_kernels benchmark · {common['device']} · torch {versions['torch']} · triton {versions['triton']}"
             f" · cuda {versions['cuda'] or '—'}")
    run.emit(f"fused op path: {path}" + ("  (Triton interpreter: these timings say nothing about speed)"
                                         if path == "triton-interpreter" else ""))
    tm = run.timing()
    if device == "cuda":
        run.emit(f"time: triton.testing.do_bench, CUDA events, L2 flushed, warm-up {tm['warmup_ms']:g} ms, "
                 f"{tm['rep_ms']:g} ms of timed calls; median [p20, p80] in the CSV")
        run.emit("memory (step): peak = torch.cuda.max_memory_allocated() during the step minus what was allocated "
                 "before; saved = bytes saved for backward + output (parameters left out)")
    else:
        run.emit(f"time: wall clock (time.perf_counter), warm-up {tm['warmup_ms']:g} ms, {tm['rep_ms']:g} ms and "
                 f"at least {tm['min_reps']} timed calls; median [p20, p80] in the CSV")
        run.emit("memory (step): saved = bytes of the tensors autograd saves for backward + the output "
                 "(parameters left out) — the CPU stand-in for the GPU's peak memory")
    run.emit("TFLOP/s from counted FLOPs: fwd 2·N·in·out + 2·N·r·(in+out), bwd 2·N·in·out + 4·N·r·(in+out); "
             "floor (linear) 2·N·in·out each way (bench/flops.py)")

    if device == "cpu" and args.quick and args.providers is None and "compiled" in provs:
        provs.remove("compiled")
        run.note("compiled skipped in a CPU --quick run: torch.compile spends ~20 s compiling per graph on a small "
                 "CPU (ask for it with --providers ...,compiled)")
    for prov in list(provs):
        why = P.check_installed(prov)
        if why:
            provs.remove(prov)
            run.note(f"{prov} skipped: {why}")
    run.emit()

    layer_modes = tuple(m for m in modes if m in MODES)

    def meta(partial=False):
        return dict(common, args=vars(args) | {"tokens": list(tokens), "ranks": list(ranks), "modes": list(modes)},
                    shapes=[s.label for s in shapes], providers=provs, timing=tm, notes=run.notes, partial=partial,
                    memory="GPU: peak_mem (max_memory_allocated during the step minus before) and saved_mem; "
                           "CPU: saved_mem only (bytes saved for backward + output, parameters left out)",
                    flops="fwd 2·N·in·out + 2·N·r·(in+out); bwd 2·N·in·out + 4·N·r·(in+out); step = fwd + bwd; "
                          "eval = fwd; linear: 2·N·in·out per direction")

    def checkpoint():
        """The rows so far (``meta.partial`` true): a run stopped from outside keeps what it measured."""
        rows.write(out_dir, meta(partial=True))
        with open(os.path.join(out_dir, "table.txt"), "w") as f:
            f.write("\n".join(run.lines) + "\n")

    layers = tuple(args.layers)
    bad_layers = [k for k in layers if k not in LAYER_KINDS]
    if bad_layers:
        print(f"error: unknown --layers {', '.join(bad_layers)} (one of {', '.join(LAYER_KINDS)})", file=sys.stderr)
        return 2
    os.makedirs(out_dir, exist_ok=True)
    if not args.model:
        for kind in (k for k in layers if k != "linear"):
            for dtype in dtypes:
                a_dtype = torch.float32 if args.adapter_dtype == "fp32" else dtype
                for r in ranks:
                    run.run_kind(rows, kind, dtype, a_dtype, r, layer_modes)
                    checkpoint()
    if not args.model and "linear" in layers:
        for dtype in dtypes:
            a_dtype = torch.float32 if args.adapter_dtype == "fp32" else dtype
            for shape in shapes:
                for r in ranks:
                    if "norm" in modes:
                        run.run_norm(rows, shape, r, dtype, a_dtype, provs)
                    if layer_modes:
                        for n in tokens:
                            run.run_case(rows, shape, n, r, dtype, a_dtype, provs, layer_modes)
                            checkpoint()

    if not args.no_model:
        run.run_model(rows, model_preset, model_variants, dtypes[0], out_dir)

    if not args.no_plot and not args.model:
        why = R.plot_ratios(rows.rows, os.path.join(out_dir, "ratios.png")) if rows.rows else "no rows to plot"
        if why:
            run.note(why)
    csv_path, json_path = rows.write(out_dir, meta())
    if run.notes:
        run.emit("notes:")
        for n in run.notes:
            run.emit(f"  - {n}")
    pngs = [f for f in ("ratios.png", "model.png") if os.path.exists(os.path.join(out_dir, f))]
    run.emit(f"wrote {len(rows.rows)} rows to {csv_path} and {json_path}; table.txt"
             + "".join(f", {f}" for f in pngs) + f" in {out_dir} ({time.perf_counter() - t_start:.0f} s)")
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write("\n".join(run.lines) + "\n")
    return 0
