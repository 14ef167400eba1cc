"""Acceptance run on a GPU: everything that needs one, into one folder.

    python -m bench.acceptance [--part tests|selftest|compile|bench|model|compare|all] [--out DIR]
    python -m bench.acceptance --quick [--budget 390] [--out DIR] [--cold-cache]

Parts (each runnable alone, each adding to the same folder, each under ``--timeout`` seconds,
10 minutes by default):

* ``tests``    — the test suite on CUDA: ``python -m pytest -q`` (``tests.txt``)
* ``selftest`` — ``python -m dora_kernels.selftest --device cuda`` (``selftest.txt``)
* ``compile``  — ``python -m bench.compile_report --arch <this GPU's>`` (``compile_report.*``)
* ``bench``    — the timed benchmark, ``python -m bench --no-model`` with the GPU defaults
  (``bench/``; extra options with ``--bench-args "..."``)
* ``model``    — the model-level figure, ``python -m bench --model`` (``model/``)
* ``compare``  — measured (``bench/results.csv``) against the dry-run trace's prediction for
  this GPU, per shape, token count, provider and mode (``measured_vs_predicted.csv``: with the
  Triton GEMMs at the assumed efficiency, at cuBLAS parity, and refit: at the cuBLAS rate and the
  efficiency this run measures), and that efficiency: the fused Triton GEMM kernels' measured time against the cuBLAS
  floor measured in the same run (``gemm_efficiency.csv``, ``gemm_efficiency.json``; printed,
  and put back into the model with ``python -m bench --trace --gemm-efficiency
  <folder>/gemm_efficiency.json``)

``all`` runs them in that order. The folder defaults to ``./bench_results/<gpu-name>-<YYYYMMDD>/``
under the current directory; ``acceptance.json`` there records each part's command, exit status,
duration and Triton compiles. Without a CUDA device it prints why and exits with status 3.

``--quick`` is the first contact with a GPU, about 5 minutes from a cold Triton cache and never
more than 7 (``QUICK_PARTS``: each part in its own process under its own cap, the caps adding up
to the ``--budget``, 6.5 minutes by default; a part is stopped at its cap or at what is left of
the budget, recorded as ``timeout``, and the run goes on; a part for which too little is left is
``skipped``):

* ``selftest`` — ``dora_kernels.selftest --device cuda --quick --only in100-out72``: 30 cases,
  1 and 37 tokens, 100 → 72, r 8, in fp32, fp16, bf16, bf16/fp32 and fp16/fp32, with and without
  bias and dropout, the exact norm gradient and small magnitudes; output and every gradient
* ``tests``    — ``pytest`` on the node ids of ``QUICK_TESTS`` (op parity on both backends, the
  runtime, ``fuse`` against PEFT; no hypothesis-generated examples), ``tests.xml`` beside the log
* ``bench``    — the timed layer step and eval forward of the Llama-3-8B projections at 4096 and
  16384 tokens, bf16, r 16: fused, PEFT DoRA, PEFT LoRA, the frozen linear, with peak memory
  (``bench/``; written after every case, so a stopped part keeps what it measured)
* ``compare``  — the ``compare`` part above on those times, in a process of its own

Each part's Triton compiles are counted as the kernel binaries (``*.cubin``, ``*.hsaco``) it adds
to the Triton cache directory (``TRITON_CACHE_DIR``, else ``triton.knobs.cache.dir``; set for
every part, so they all use the one that is counted; ``--cold-cache`` makes it a new empty one).
``summary.json`` and ``summary.md`` (rewritten after every part) give per part the status, exit
code, seconds, cap, compiles by kernel, log and a one-line result, and the fused layer's ratios
to the floor and to PEFT.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

PARTS = ("tests", "selftest", "compile", "bench", "model", "compare")
NO_GPU = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (tests/ is there)

# ---------------------------------------------------------------------------------------------
# the quick run

QUICK_BUDGET_S = 390  # 6.5 min for the whole run
QUICK_LIMIT_S = 420  # 7 min: what the parts' caps may add up to, at most
QUICK_SELFTEST = ("--device", "cuda", "--quick", "--only", "in100-out72")
# A fixed list of node ids: no hypothesis-generated examples; the ``backend`` fixture's ``torch``
# param runs the pure-torch path on CUDA.
QUICK_TESTS = (
    "tests/test_ops.py::test_backend_fixture_picks_the_path[triton]",
    "tests/test_ops.py::test_backend_fixture_picks_the_path[torch]",
    "tests/test_ops.py::test_parity[triton-N1-in100-out72-r8-f32-bias_frozen]",
    "tests/test_ops.py::test_parity[triton-N0-in100-out72-r8-f32-bias_grad]",
    "tests/test_ops.py::test_parity[triton-N37-in100-out72-r8-bf16-bias_frozen-x-rowpad]",
    "tests/test_ops.py::test_parity[triton-B2x3-in40-out24-r4-bf16-adf32-bias_grad-drop_train-x-T]",
    "tests/test_ops.py::test_parity[triton-N11-in70-out40-r80-f32-drop_train-x-step2]",
    "tests/test_ops.py::test_parity[triton-N130-in24-out20-r4-bf16-bias_frozen-drop_train]",
    "tests/test_ops.py::test_exact_norm_grad[triton-N37-in100-out72-r8-bf16-adf32-bias_frozen-x-rowpad]",
    "tests/test_ops.py::test_parity[torch-N37-in100-out72-r8-bf16-bias_frozen-x-rowpad]",
    "tests/test_ops.py::test_parity[torch-B2x3-in40-out24-r4-bf16-adf32-bias_grad-drop_train-x-T]",
    "tests/test_runtime.py",
    "tests/test_fuse.py::test_matches_peft[triton-bias-bf16base-f32adapters-p0.3]",
    "tests/test_fuse.py::test_matches_peft[triton-nobias-f32-p0]",
    "tests/test_fuse.py::test_matches_peft[torch-bias-bf16base-f32adapters-p0.3]",
)
QUICK_BENCH = ("--device", "cuda", "--shapes", "llama3-8b", "--tokens", "4096,16384", "--ranks", "16", "--dtypes",
               "bf16", "--modes", "step,eval", "--providers", "fused,peft_dora,peft_lora,linear", "--no-model")


@dataclass(frozen=True)
class Part:
    """One part of the quick run: a command in its own process, stopped after ``cap_s`` seconds;
    not started when less than ``need_s`` of the run's budget is left."""

    name: str
    command: tuple
    cap_s: int
    need_s: int
    what: str
    cwd: str | None = None


def quick_parts(out_dir: str, py: str = sys.executable) -> list:
    """The quick run's parts, in order (their caps add up to ``QUICK_BUDGET_S``)."""
    return [
        Part("selftest", (py, "-m", "dora_kernels.selftest", *QUICK_SELFTEST), 135, 60,
             "self-test, 30 CUDA cases: output and every gradient; fp32, fp16, bf16, bf16/fp16 + fp32 adapters; "
             "1 and 37 tokens, 100 -> 72, r 8; bias, dropout, exact norm gradient, small m"),
        Part("tests", (py, "-m", "pytest", "-q", f"--junitxml={os.path.join(out_dir, 'tests.xml')}",
                       "--durations=5", *QUICK_TESTS), 90, 45,
             f"{len(QUICK_TESTS)} pytest node ids on CUDA: op parity (triton and torch backends), runtime, "
             "fuse vs PEFT",
             cwd=ROOT),
        Part("bench", (py, "-m", "bench", *QUICK_BENCH, "--out", os.path.join(out_dir, "bench")), 120, 60,
             "timed step (fwd+bwd) and eval forward, Llama-3-8B projections, 4096 and 16384 tokens, bf16, r 16: "
             "fused, peft_dora, peft_lora, linear; peak memory"),
        Part("compare", (py, "-m", "bench.acceptance", "--part", "compare", "--out", out_dir), 45, 20,
             "measured vs the dry-run trace's prediction; the Triton GEMM efficiency vs cuBLAS"),
    ]


# ---------------------------------------------------------------------------------------------
# counting Triton compiles

BINARY_SUFFIXES = (".cubin", ".hsaco")  # one per compiled kernel (NVIDIA, AMD) in Triton's cache


def triton_cache_dir(env=None) -> str:
    """The directory Triton caches compiled kernels in: ``TRITON_CACHE_DIR``, else the knob's default."""
    d = (env if env is not None else os.environ).get("TRITON_CACHE_DIR")
    if d:
        return d
    try:
        from triton import knobs

        return knobs.cache.dir
    except (ImportError, AttributeError):
        return os.path.join(os.path.expanduser("~"), ".triton", "cache")


def cache_binaries(cache_dir: str) -> set:
    """Paths (relative to ``cache_dir``) of the compiled kernel binaries in the cache."""
    found = set()
    for dirpath, _, files in os.walk(cache_dir):
        for f in files:
            if f.endswith(BINARY_SUFFIXES):
                found.add(os.path.relpath(os.path.join(dirpath, f), cache_dir))
    return found


def compiled_kernels(new: set) -> dict:
    """{kernel name: compiles} of the binaries ``new`` (the file's stem is the kernel's name)."""
    by = {}
    for p in sorted(new):
        k = os.path.splitext(os.path.basename(p))[0]
        by[k] = by.get(k, 0) + 1
    return by


def _gpu():
    import torch

    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(i)
    return {"name": torch.cuda.get_device_name(i), "arch": (p.major, p.minor), "sms": p.multi_processor_count}


def _slug(gpu) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-")


def default_out(gpu, quick: bool = False) -> str:
    """``./bench_results/<gpu-name>-<YYYYMMDD>`` (``--quick``: ``<gpu-name>-quick-<YYYYMMDD-HHMMSS>``, a new
    folder per run) under the current directory."""
    from bench.tables import default_out as under_cwd

    if quick:
        return under_cwd(f"{_slug(gpu)}-quick-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    return under_cwd(f"{_slug(gpu)}-{_dt.date.today():%Y%m%d}")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the compiled kernels, never the interpreter
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONUNBUFFERED"] = "1"  # the log has everything up to the moment a part is stopped
    return env


def _kill(proc):
    """Stop the part and everything it started (it runs in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (AttributeError, OSError):
        proc.kill()
    proc.wait()


def _run(name, cmd, out_dir, log_name, timeout, env=None, cwd=None):
    """Run ``cmd``, teeing its output to ``out_dir/log_name``; stop it (and its children) after
    ``timeout`` seconds; return (exit status or ``"timeout"``, seconds)."""
    print(f"\n== {name}: {' '.join(cmd)}" + (f"  (in {cwd})" if cwd else ""), flush=True)
    t0 = time.perf_counter()
    path = os.path.join(out_dir, log_name)
    with open(path, "w") as log, open(path) as tail:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=_env() if env is None else env, cwd=cwd, start_new_session=True)
        rc = None
        try:
            while rc is None:
                try:
                    rc = proc.wait(timeout=max(0.05, min(1.0, timeout - (time.perf_counter() - t0))))
                except subprocess.TimeoutExpired:
                    if time.perf_counter() - t0 >= timeout:
                        _kill(proc)
                        rc = "timeout"
                sys.stdout.write(tail.read())
                sys.stdout.flush()
        except KeyboardInterrupt:
            _kill(proc)
            raise
        if rc == "timeout":
            log.write(f"\n[acceptance] {name} stopped after {timeout:.0f} s\n")
            print(f"[acceptance] {name} stopped after {timeout:.0f} s")
    dt = time.perf_counter() - t0
    print(f"== {name}: {'exit ' + str(rc) if rc != 'timeout' else 'TIMED OUT'} in {dt:.0f} s -> {path}")
    return rc, dt


def _record(out_dir, part, cmd, rc, dt, **extra):
    path = os.path.join(out_dir, "acceptance.json")
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[part] = {"command": list(cmd), "status": rc, "seconds": round(dt, 1),
                  "finished": _dt.datetime.now().isoformat(timespec="seconds"), **extra}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


# ---------------------------------------------------------------------------------------------
# measured vs predicted

def gpu_spec(gpu: dict) -> tuple:
    """(key, spec): the ``bench.tables.GPUS`` row whose peaks predict for this GPU
    (``tables.predict_key``), planned for this GPU's arch and SM count."""
    from bench import tables

    key = tables.predict_key(gpu["name"])
    return key, dict(tables.GPUS[key], arch=tuple(gpu["arch"]), sms=gpu["sms"])


def compare(out_dir: str, gpu: dict) -> int:
    """Join ``bench/results.csv`` (metric ``time``) with the trace's prediction for this GPU
    (``measured_vs_predicted.csv``), and derive the Triton GEMM efficiency this GPU shows
    (``gemm_efficiency.csv`` / ``.json``, see ``gemm_efficiency``)."""
    from bench import trace

    src = os.path.join(out_dir, "bench", "results.csv")
    if not os.path.exists(src):
        print(f"compare: {src} is missing (run --part bench first)")
        return 1
    with open(src) as f:
        measured = [r for r in csv.DictReader(f) if r.get("metric") == "time" and r.get("mode") in trace.MODES
                    and r.get("provider") in trace.PROVIDERS]
    if not measured:
        print("compare: no time rows for the traced providers/modes in the benchmark's CSV")
        return 1
    key, spec = gpu_spec(gpu)
    groups = {}
    for r in measured:
        g = (int(r["in_features"]), int(r["out_features"]), r["dtype"], r.get("adapter_dtype") or r["dtype"], int(r["r"]))
        groups.setdefault(g, set()).add(int(r["tokens"]))
    predicted, traces = {}, {}
    for (fin, fout, dt, adt, rank), toks in groups.items():
        got = {}
        rows = trace.run([(f"{fin}x{fout}", fin, fout)], sorted(toks), r=rank, dtype=dt, adapter_dtype=adt,
                         gpus={"this-gpu": spec}, traces_out=got)
        for p in rows:
            predicted[(fin, fout, dt, adt, rank, p["tokens"], p["provider"], p["mode"])] = p
        for (_, n, prov, _), tr in got.items():
            traces[(fin, fout, dt, adt, rank, n, prov)] = tr
    times = {}
    for r in measured:
        k = (int(r["in_features"]), int(r["out_features"]), r["dtype"], r.get("adapter_dtype") or r["dtype"],
             int(r["r"]), int(r["tokens"]), r["provider"], r["mode"])
        times[k] = (r, float(r["median"]))
    eff_rows, summary = gemm_efficiency(times, traces, spec, gpu, key)
    refit = None  # the model with this run's cuBLAS rate and Triton GEMM efficiency
    if summary["efficiency"]:
        refit = dict(spec, mm=summary["cublas_tflops"] * 1e12, triton_gemm_eff=summary["efficiency"])
    out_rows = []
    for k, (r, ms) in times.items():
        p = predicted.get(k)
        if p is None:
            continue
        par = p["predicted_ms" + trace.PARITY]
        row = {"layer": r.get("name", ""), "in_features": k[0], "out_features": k[1], "dtype": k[2],
               "adapter_dtype": k[3], "r": k[4], "tokens": k[5], "provider": k[6], "mode": k[7],
               "measured_ms": ms, "predicted_ms": p["predicted_ms"],
               "measured_over_predicted": round(ms / p["predicted_ms"], 3) if p["predicted_ms"] else "",
               "predicted_ms_at_cublas_parity": par, "measured_over_parity": round(ms / par, 3) if par else "",
               "triton_gemm_eff": p["triton_gemm_eff"], "predicted_ms_refit": "", "measured_over_refit": "",
               "launches": p["launches"], "hbm_bytes": p["hbm_bytes"], "flops": p["flops"],
               "gpu": gpu["name"], "constants": key}
        if refit is not None:
            c = traces[k[:7]].mode(k[7])
            pm = round(trace.predict_s(c, refit) * 1e3, 5)
            row.update(predicted_ms_refit=pm, measured_over_refit=round(ms / pm, 3) if pm else "")
        out_rows.append(row)
    path = os.path.join(out_dir, "measured_vs_predicted.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out_rows[0]) if out_rows else ["layer"])
        w.writeheader()
        w.writerows(out_rows)
    print(f"\nmeasured vs predicted on {gpu['name']} (prediction constants: {key}, planned for "
          f"sm_{gpu['arch'][0]}{gpu['arch'][1]}, {gpu['sms']} SMs; 'parity': the Triton GEMMs at cuBLAS's rate, "
          "'refit': with the cuBLAS rate and the efficiency derived below)")
    print(f"{'shape':>12s} {'tokens':>6s} {'provider':>10s} {'mode':>5s} {'measured ms':>12s} {'predicted':>10s} "
          f"{'ratio':>6s} {'parity':>10s} {'ratio':>6s} {'refit':>10s} {'ratio':>6s}")
    for r in out_rows:
        print(f"{r['in_features']:>5d}x{r['out_features']:<6d} {r['tokens']:>6d} {r['provider']:>10s} {r['mode']:>5s} "
              f"{r['measured_ms']:12.4f} {r['predicted_ms']:10.4f} {r['measured_over_predicted']:>6} "
              f"{r['predicted_ms_at_cublas_parity']:10.4f} {r['measured_over_parity']:>6} "
              f"{r['predicted_ms_refit'] or '-':>10} {r['measured_over_refit'] or '-':>6}")
    print(f"wrote {path} ({len(out_rows)} rows)")
    _write_efficiency(out_dir, eff_rows, summary, spec["mm"] / 1e12)
    return 0 if out_rows else 1


# ---------------------------------------------------------------------------------------------
# the Triton GEMM efficiency this GPU shows

EFF_COLUMNS = ["in_features", "out_features", "dtype", "adapter_dtype", "r", "tokens", "provider", "mode",
               "measured_ms", "floor_ms", "cublas_tflops", "triton_gemm_ms", "rest_ms", "efficiency",
               "model_efficiency", "used", "why"]


def gemm_efficiency(times: dict, traces: dict, spec: dict, gpu: dict, key: str) -> tuple:
    """(per-case rows, summary) of the efficiency of the package's Triton GEMMs relative to
    cuBLAS on this GPU.

    ``times``: {(in, out, dtype, adapter dtype, r, tokens, provider, mode): (csv row, measured ms)};
    ``traces``: {(in, out, dtype, adapter dtype, r, tokens, provider): bench.trace.LayerTrace}.
    For every measured ``fused`` / ``fused_peft`` case with its floor (``linear``, same mode) measured
    in the same run, ``bench.trace.derive_gemm_efficiency``: the cuBLAS rate the floor reached, and
    the factor on the fused Triton GEMMs' matmul FLOPs at which the model reproduces the fused
    time (cuBLAS's time for those FLOPs / the fused GEMM kernels' measured time). The summary's
    ``efficiency`` is the median over the ``fused`` cases the derivation can use (compute-bound:
    large token counts), else over the ``fused_peft`` ones; None if there are none."""
    from bench import trace

    rows = []
    for k, (_, ms) in sorted(times.items(), key=lambda kv: kv[0]):
        if k[6] not in ("fused", "fused_peft"):
            continue
        floor = times.get(k[:6] + ("linear", k[7]))
        tf, tl = traces.get(k[:7]), traces.get(k[:6] + ("linear",))
        if floor is None or tf is None or tl is None:
            continue
        c = tf.mode(k[7])
        d = trace.derive_gemm_efficiency(c, tl.mode(k[7]), ms * 1e-3, floor[1] * 1e-3, spec)
        model = trace.assumed_efficiency(c, spec)
        rows.append({"in_features": k[0], "out_features": k[1], "dtype": k[2], "adapter_dtype": k[3], "r": k[4],
                     "tokens": k[5], "provider": k[6], "mode": k[7], "measured_ms": ms, "floor_ms": floor[1],
                     "cublas_tflops": _r(d["cublas_tflops"], 1), "triton_gemm_ms": _r(d["triton_gemm_ms"], 5),
                     "rest_ms": _r(d["rest_ms"], 5), "efficiency": _r(d["efficiency"], 4),
                     "model_efficiency": _r(model, 4), "used": int(d["used"]), "why": d["why"]})
    used = [r for r in rows if r["used"] and r["provider"] == "fused"] or \
        [r for r in rows if r["used"] and r["provider"] == "fused_peft"]
    effs = sorted(r["efficiency"] for r in used)
    by_mode = {}
    for r in used:
        by_mode.setdefault(r["mode"], []).append(r["efficiency"])
    summary = {
        "gpu": gpu["name"], "constants": key, "efficiency": _median(effs), "cases": len(effs),
        "min": effs[0] if effs else None, "max": effs[-1] if effs else None,
        "by_mode": {m: _median(sorted(v)) for m, v in by_mode.items()},
        "cublas_tflops": _median(sorted(r["cublas_tflops"] for r in used)),
        "model_efficiency_there": _median(sorted(r["model_efficiency"] for r in used if r["model_efficiency"])),
        "method": "per measured case (fused provider and the frozen nn.Linear floor, same mode, same run): the "
                  "cuBLAS matmul rate P at which the trace's model reproduces the floor's measured time, then the "
                  "factor on the fused Triton GEMMs' matmul FLOPs at which it reproduces the fused measured time "
                  "with P as the peak (= cuBLAS's time for those FLOPs / the fused GEMM kernels' measured time); "
                  "the median over the compute-bound cases",
        "model": trace.TRITON_GEMM_RULE, "sources": list(trace.TRITON_GEMM_SOURCES),
        "use": "python -m bench --trace --gemm-efficiency <this file>",
    }
    return rows, summary


def _r(v, digits):
    return "" if v is None else round(v, digits)


def _median(v):
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _write_efficiency(out_dir: str, rows: list, summary: dict, spec_tflops: float):
    with open(os.path.join(out_dir, "gemm_efficiency.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=EFF_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    path = os.path.join(out_dir, "gemm_efficiency.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nTriton GEMM efficiency vs cuBLAS on {summary['gpu']} (measured fused GEMM kernels against the cuBLAS "
          "floor of the same run; see gemm_efficiency.csv)")
    for r in rows:
        eff = r["efficiency"] if r["efficiency"] != "" else "-"
        print(f"  {r['in_features']:>5d}x{r['out_features']:<6d} N={r['tokens']:<6d} {r['provider']:>10s} "
              f"{r['mode']:>5s}: {eff:>7} (model {r['model_efficiency']}; cuBLAS {r['cublas_tflops']} TFLOP/s)"
              + ("" if r["used"] else f"  not used: {r['why']}"))
    if summary["efficiency"] is None:
        print("  no case determines it (it needs compute-bound cases: 4096 tokens or more on the 8B shapes); the "
              "trace keeps the published-points function")
    else:
        print(f"  => {summary['efficiency']:.3f} of cuBLAS (median of {summary['cases']} cases, "
              f"{summary['min']:.3f}-{summary['max']:.3f}; the published-points model assumed "
              f"{summary['model_efficiency_there']} there; cuBLAS reached {summary['cublas_tflops']} TFLOP/s, the "
              f"model's peak is {spec_tflops:.0f})")
        print(f"  put it back into the model: {summary['use'].replace('<this file>', path)}")
    print(f"wrote {path}, gemm_efficiency.csv")


# ---------------------------------------------------------------------------------------------
# the quick run: parts, budget, summary

def run_quick(parts, out_dir: str, gpu: dict, budget_s: float, t_start: float, cache_dir: str) -> int:
    """Run ``parts`` in order, each under ``min(cap, what is left of the budget)``; count each one's
    Triton compiles; write ``summary.json`` / ``summary.md`` (and ``acceptance.json``) after each.
    Returns 0 when every part passed."""
    env = _env()
    env["TRITON_CACHE_DIR"] = cache_dir
    os.makedirs(cache_dir, exist_ok=True)
    summary = {"kind": "quick", "gpu": gpu["name"], "arch": f"sm_{gpu['arch'][0]}{gpu['arch'][1]}",
               "sms": gpu["sms"], "out": os.path.abspath(out_dir),
               "started": _dt.datetime.now().isoformat(timespec="seconds"), "budget_s": budget_s,
               "caps_s": sum(p.cap_s for p in parts), "triton_cache": cache_dir,
               "compiles_counted_as": f"new kernel binaries ({', '.join('*' + x for x in BINARY_SUFFIXES)}) in the "
                                      "Triton cache directory after the part, against before it",
               "parts": [], "elapsed_s": 0.0, "ok": False}
    print(f"quick acceptance on {gpu['name']} -> {os.path.abspath(out_dir)}\n"
          f"budget {budget_s:.0f} s; parts: " + ", ".join(f"{p.name} (cap {p.cap_s} s)" for p in parts)
          + f"; Triton cache {cache_dir}")
    for part in parts:
        left = budget_s - (time.perf_counter() - t_start)
        rec = {"name": part.name, "what": part.what, "command": list(part.command), "cwd": part.cwd,
               "cap_s": part.cap_s, "timeout_s": None, "status": "skipped", "exit": None, "seconds": 0.0,
               "compiles": None, "compiled_kernels": {}, "log": f"{part.name}.txt", "result": ""}
        if part.cwd is not None and not os.path.isdir(part.cwd):
            rec["result"] = f"not run: {part.cwd} does not exist"
        elif part.name == "tests" and not os.path.isdir(os.path.join(part.cwd or ".", "tests")):
            rec["result"] = "not run: no tests/ beside bench/ (a checkout of the repository has it)"
        elif left < part.need_s:
            rec["result"] = f"not run: {max(left, 0):.0f} s of the budget left, it needs {part.need_s} s"
        else:
            timeout = min(part.cap_s, left)
            before = cache_binaries(cache_dir)
            rc, dt = _run(part.name, list(part.command), out_dir, rec["log"], timeout, env=env, cwd=part.cwd)
            new = cache_binaries(cache_dir) - before
            rec.update(timeout_s=round(timeout, 1), seconds=round(dt, 1), compiles=len(new),
                       compiled_kernels=compiled_kernels(new), exit=None if rc == "timeout" else rc,
                       status="timeout" if rc == "timeout" else ("ok" if rc == 0 else "failed"))
            rec["result"] = _result(part.name, out_dir, rec)
            if rc == "timeout":
                cut = f"stopped after {timeout:.0f} s" + (" (what was left of the budget)" if timeout < part.cap_s else "")
                rec["result"] = cut + (f"; {rec['result']}" if rec["result"] else "")
            print(f"== {part.name}: {rec['status']} in {dt:.0f} s (cap {part.cap_s} s), {len(new)} Triton kernels "
                  f"compiled" + (f" ({', '.join(f'{k} {n}' for k, n in rec['compiled_kernels'].items())})"
                                 if new else "") + (f"; {rec['result']}" if rec["result"] else ""), flush=True)
            _record(out_dir, part.name, part.command, rec["status"] if rc == "timeout" else rc, dt,
                    compiles=len(new), quick=True)
        if rec["status"] == "skipped":
            print(f"\n== {part.name}: skipped, {rec['result'][len('not run: '):]}", flush=True)
        summary["parts"].append(rec)
        summary["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        summary["ok"] = all(r["status"] == "ok" for r in summary["parts"]) and len(summary["parts"]) == len(parts)
        write_summary(out_dir, summary)
    print("\n" + summary_table(summary["parts"]))
    print(f"\nquick acceptance: {'all parts ok' if summary['ok'] else 'NOT all parts ok'} in "
          f"{summary['elapsed_s']:.0f} s -> {os.path.abspath(out_dir)} (summary.md, summary.json)")
    return 0 if summary["ok"] else 1


def _tail(path, n=4000) -> str:
    try:
        with open(path, errors="replace") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read()
    except OSError:
        return ""


def _result(name: str, out_dir: str, rec: dict) -> str:
    """A one-line result of a finished part, read from what it wrote ("" when there is none)."""
    text = _tail(os.path.join(out_dir, rec["log"]))
    try:
        if name == "selftest":
            hits = re.findall(r"^(\d+/\d+ checks passed, \d+ failed.*)$", text, re.M)
            return hits[-1] if hits else ""
        if name == "tests":
            hits = [ln.strip("= ") for ln in text.splitlines()
                    if re.search(r"\b(passed|failed|errors?|no tests ran)\b.* in [\d.]+s", ln)]
            return hits[-1] if hits else ""
        if name == "bench":
            rows = bench_ratios(out_dir)
            if not rows:
                return ""
            worst = max(r["over_floor"] for r in rows if r["over_floor"] is not None)
            return f"{len(rows)} cases; fused step over the floor up to {worst:.3f}x (summary.md has each)"
        if name == "compare":
            with open(os.path.join(out_dir, "gemm_efficiency.json")) as f:
                eff = json.load(f)
            if eff.get("efficiency") is None:
                return "no compute-bound case: the Triton GEMM efficiency is not determined"
            return (f"Triton GEMM efficiency {eff['efficiency']:.3f} of cuBLAS ({eff['cases']} cases), cuBLAS at "
                    f"{eff['cublas_tflops']:.0f} TFLOP/s")
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return ""


RATIO_METRICS = (("over_floor", "step"), ("speedup_vs_peft_dora", "step"), ("speedup_vs_peft_lora", "step"),
                 ("mem_vs_peft_lora", "step"), ("over_floor", "eval"))


def _ratio_key(metric, mode):
    return metric if mode == "step" else f"{metric}_{mode}"


def bench_ratios(out_dir: str) -> list:
    """The fused layer's ratios per (shape, tokens) from ``bench/results.csv``: step over the floor,
    × PEFT DoRA, × PEFT LoRA, peak memory / PEFT LoRA's, eval over the floor (None where absent)."""
    path = os.path.join(out_dir, "bench", "results.csv")
    if not os.path.exists(path):
        return []
    wanted = {(m, mode): _ratio_key(m, mode) for m, mode in RATIO_METRICS}
    cases = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            k = wanted.get((r.get("metric"), r.get("mode")))
            if r.get("provider") != "fused" or k is None:
                continue
            case = (int(r["in_features"]), int(r["out_features"]), int(r["tokens"]), r["name"])
            cases.setdefault(case, {})[k] = float(r["median"])
    return [{"layer": name, "in_features": fin, "out_features": fout, "tokens": n,
             **{k: v.get(k) for k in wanted.values()}} for (fin, fout, n, name), v in sorted(cases.items())]


def summary_table(parts: list) -> str:
    lines = ["| part | status | seconds | cap s | Triton compiles | log | result |", "|---|---|---:|---:|---:|---|---|"]
    for r in parts:
        comp = "" if r["compiles"] is None else str(r["compiles"])
        status = r["status"] + ("" if r["exit"] in (None, 0) else f" (exit {r['exit']})")
        lines.append(f"| {r['name']} | {status} | {r['seconds']:.0f} | {r['cap_s']} | {comp} | {r['log']} | "
                     f"{r['result']} |")
    return "\n".join(lines)


def write_summary(out_dir: str, summary: dict):
    """``summary.json`` and ``summary.md`` of a quick run (the parts run so far)."""
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(dict(summary, bench=bench_ratios(out_dir)), f, indent=1)
    md = [f"# Quick acceptance on {summary['gpu']} ({summary['arch']}, {summary['sms']} SMs)", "",
          f"Started {summary['started']}; {summary['elapsed_s']:.0f} s of a {summary['budget_s']:.0f} s budget "
          f"(caps add up to {summary['caps_s']} s); "
          f"{'every part ok' if summary['ok'] else 'not every part ok'}. Triton compiles: "
          f"{summary['compiles_counted_as']} (`{summary['triton_cache']}`).", "", summary_table(summary["parts"]), ""]
    for r in summary["parts"]:
        md.append(f"- **{r['name']}**: {r['what']}. `{' '.join(r['command'])}`"
                  + (f" (in `{r['cwd']}`)" if r["cwd"] else "")
                  + (f"; compiled: {', '.join(f'{k} {n}' for k, n in r['compiled_kernels'].items())}"
                     if r["compiled_kernels"] else ""))
    ratios = bench_ratios(out_dir)
    if ratios:
        def cell(v):
            return "" if v is None else f"{v:.3f}"
        md += ["", "## The fused layer (bench/results.csv, provider fused)", "",
               "Targets: step over the floor <= 1.15, x PEFT DoRA >= 2.5, x PEFT LoRA >= 1, peak memory / PEFT "
               "LoRA's <= 1.05.", "",
               "| layer | in -> out | tokens | step / floor | x PEFT DoRA | x PEFT LoRA | peak mem / LoRA "
               "| eval / floor |",
               "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in ratios:
            md.append(f"| {r['layer']} | {r['in_features']} -> {r['out_features']} | {r['tokens']} | "
                      f"{cell(r['over_floor'])} | {cell(r['speedup_vs_peft_dora'])} | {cell(r['speedup_vs_peft_lora'])}"
                      f" | {cell(r['mem_vs_peft_lora'])} | {cell(r['over_floor_eval'])} |")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    t_start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.acceptance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=PARTS + ("all",),
                    help="one part (with --quick: one of the quick run's parts)")
    ap.add_argument("--out", default=None, help="folder (default ./bench_results/<gpu-name>-<YYYYMMDD>, with --quick "
                                                "./bench_results/<gpu-name>-quick-<YYYYMMDD-HHMMSS>)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per part (default 600; not --quick)")
    ap.add_argument("--bench-args", default="", help="extra options for `python -m bench` (e.g. --shapes gpu-quick)")
    ap.add_argument("--quick", action="store_true",
                    help="the first-contact run: self-test subset, named tests, the 8B layer timings, compare; "
                         "about 5 minutes, each part under its own cap")
    ap.add_argument("--budget", type=float, default=QUICK_BUDGET_S,
                    help=f"--quick: seconds for the whole run (default {QUICK_BUDGET_S})")
    ap.add_argument("--cold-cache", action="store_true",
                    help="--quick: compile into a new, empty Triton cache directory, removed afterwards (the "
                         "compiles of a cold start on a machine whose cache is warm)")
    args = ap.parse_args(argv)

    gpu = _gpu()
    if gpu is None:
        print("bench.acceptance needs a CUDA GPU and torch sees none: nothing was run.\n"
              "Without a GPU, run the CPU checks instead: `python -m pytest -q`, "
              "`python -m dora_kernels.selftest` (the kernels through Triton's interpreter), "
              "`python -m bench.compile_report` (ahead-of-time compile report) and "
              "`python -m bench --trace` (dry-run cost trace).", file=sys.stderr)
        return NO_GPU
    out_dir = os.path.abspath(args.out) if args.out else default_out(gpu, quick=args.quick)
    os.makedirs(out_dir, exist_ok=True)
    if args.quick:
        parts = quick_parts(out_dir)
        if args.part != "all":
            parts = [p for p in parts if p.name == args.part]
            if not parts:
                print(f"bench.acceptance --quick has no part {args.part!r} (its parts: "
                      f"{', '.join(p.name for p in quick_parts(out_dir))})", file=sys.stderr)
                return 2
        if not args.cold_cache:
            return run_quick(parts, out_dir, gpu, args.budget, t_start, triton_cache_dir())
        import shutil
        import tempfile

        cache = tempfile.mkdtemp(prefix="triton-cache-")
        try:
            return run_quick(parts, out_dir, gpu, args.budget, t_start, cache)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    py = sys.executable
    cc = f"{gpu['arch'][0]}{gpu['arch'][1]}"
    jobs = str(min(16, os.cpu_count() or 2))
    commands = {
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        "selftest": [py, "-m", "dora_kernels.selftest", "--device", "cuda"],
        "compile": [py, "-m", "bench.compile_report", "--arch", cc, "--out", out_dir, "--jobs", jobs],
        "bench": [py, "-m", "bench", "--no-model", "--out", os.path.join(out_dir, "bench"), *args.bench_args.split()],
        "model": [py, "-m", "bench", "--model", "--out", os.path.join(out_dir, "model")],
    }
    parts = PARTS if args.part == "all" else (args.part,)
    print(f"acceptance on {gpu['name']} (sm_{cc}, {gpu['sms']} SMs) -> {out_dir}")
    status = {}
    cache = triton_cache_dir()
    for part in parts:
        if part == "compare":
            t0 = time.perf_counter()
            rc = compare(out_dir, gpu)
            _record(out_dir, part, ["bench.acceptance.compare"], rc, time.perf_counter() - t0)
        else:
            before = cache_binaries(cache)
            rc, dt = _run(part, commands[part], out_dir, f"{part}.txt", args.timeout)
            new = cache_binaries(cache) - before
            print(f"== {part}: {len(new)} Triton kernels compiled (new binaries in {cache})")
            _record(out_dir, part, commands[part], rc, dt, compiles=len(new))
        status[part] = rc
    print("\nsummary: " + ", ".join(f"{p} {'ok' if rc == 0 else rc}" for p, rc in status.items()) + f" ({out_dir})")
    return 0 if all(rc == 0 for rc in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
