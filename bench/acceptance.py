"""Acceptance run on a GPU: everything that needs one, into one folder.

    python -m bench.acceptance [--part tests|selftest|compile|bench|model|compare|all] [--out DIR]

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

``all`` runs them in that order. The folder defaults to ``bench/results/<gpu-name>-<YYYYMMDD>/``;
``acceptance.json`` there records each part's command, exit status and duration. Without a
CUDA device it prints why and exits with status 3.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time

PARTS = ("tests", "selftest", "compile", "bench", "model", "compare")
NO_GPU = 3


def _gpu():
    import torch

    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(i)
    return {"name": torch.cuda.get_device_name(i), "arch": (p.major, p.minor), "sms": p.multi_processor_count}


def default_out(gpu) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-")
    return os.path.join("bench", "results", f"{slug}-{_dt.date.today():%Y%m%d}")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the compiled kernels, never the interpreter
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _run(name, cmd, out_dir, log_name, timeout):
    """Run ``cmd``, teeing its output to ``out_dir/log_name``; return (status, seconds)."""
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    path = os.path.join(out_dir, log_name)
    with open(path, "w") as log, open(path) as tail:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=_env())
        rc = None
        while rc is None:
            try:
                rc = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    rc = "timeout"
            sys.stdout.write(tail.read())
            sys.stdout.flush()
        if rc == "timeout":
            log.write(f"\n[acceptance] {name} stopped after {timeout} s\n")
            print(f"[acceptance] {name} stopped after {timeout} s")
    dt = time.perf_counter() - t0
    print(f"== {name}: {'exit ' + str(rc) if rc != 'timeout' else 'TIMED OUT'} in {dt:.0f} s -> {path}")
    return rc, dt


def _record(out_dir, part, cmd, rc, dt):
    path = os.path.join(out_dir, "acceptance.json")
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[part] = {"command": cmd, "status": rc, "seconds": round(dt, 1),
                  "finished": _dt.datetime.now().isoformat(timespec="seconds")}
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

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.acceptance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=PARTS + ("all",))
    ap.add_argument("--out", default=None, help="folder (default bench/results/<gpu-name>-<YYYYMMDD>)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per part (default 600)")
    ap.add_argument("--bench-args", default="", help="extra options for `python -m bench` (e.g. --shapes gpu-quick)")
    args = ap.parse_args(argv)

    gpu = _gpu()
    if gpu is None:
        print("bench.acceptance needs a CUDA GPU and torch sees none: nothing was run.\n"
              "Without a GPU, run the CPU checks instead: `python -m pytest -q`, "
              "`python -m dora_kernels.selftest` (the kernels through Triton's interpreter), "
              "`python -m bench.compile_report` (ahead-of-time compile report) and "
              "`python -m bench --trace` (dry-run cost trace).", file=sys.stderr)
        return NO_GPU
    out_dir = args.out or default_out(gpu)
    os.makedirs(out_dir, exist_ok=True)
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
    for part in parts:
        if part == "compare":
            t0 = time.perf_counter()
            rc = compare(out_dir, gpu)
            _record(out_dir, part, ["bench.acceptance.compare"], rc, time.perf_counter() - t0)
        else:
            rc, dt = _run(part, commands[part], out_dir, f"{part}.txt", args.timeout)
            _record(out_dir, part, commands[part], rc, dt)
        status[part] = rc
    print("\nsummary: " + ", ".join(f"{p} {'ok' if rc == 0 else rc}" for p, rc in status.items()) + f" ({out_dir})")
    return 0 if all(rc == 0 for rc in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
