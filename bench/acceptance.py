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
  this GPU, per shape, token count, provider and mode (``measured_vs_predicted.csv``)

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

def _gpu_key(name: str) -> str:
    from bench.trace import GPUS

    for key, probe in (("H200", "H200"), ("H100-SXM", "H100"), ("A100-SXM", "A100")):
        if probe in name:
            return key
    return next(iter(GPUS))


def compare(out_dir: str, gpu: dict) -> int:
    """Join ``bench/results.csv`` (metric ``time``) with the trace's prediction for this GPU."""
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
    key = _gpu_key(gpu["name"])
    consts = dict(trace.GPUS[key], arch=tuple(gpu["arch"]), sms=gpu["sms"])
    trace.GPUS["this-gpu"] = consts
    groups = {}
    for r in measured:
        g = (int(r["in_features"]), int(r["out_features"]), r["dtype"], r.get("adapter_dtype") or r["dtype"], int(r["r"]))
        groups.setdefault(g, set()).add(int(r["tokens"]))
    predicted = {}
    for (fin, fout, dt, adt, rank), toks in groups.items():
        rows = trace.run([(f"{fin}x{fout}", fin, fout)], sorted(toks), r=rank, dtype=dt, adapter_dtype=adt,
                         gpus=("this-gpu",))
        for p in rows:
            predicted[(fin, fout, dt, adt, rank, p["tokens"], p["provider"], p["mode"])] = p
    out_rows = []
    for r in measured:
        k = (int(r["in_features"]), int(r["out_features"]), r["dtype"], r.get("adapter_dtype") or r["dtype"],
             int(r["r"]), int(r["tokens"]), r["provider"], r["mode"])
        p = predicted.get(k)
        if p is None:
            continue
        ms = float(r["median"])
        out_rows.append({"layer": r.get("name", ""), "in_features": k[0], "out_features": k[1], "dtype": k[2],
                         "adapter_dtype": k[3], "r": k[4], "tokens": k[5], "provider": k[6], "mode": k[7],
                         "measured_ms": ms, "predicted_ms": p["predicted_ms"],
                         "measured_over_predicted": round(ms / p["predicted_ms"], 3) if p["predicted_ms"] else "",
                         "launches": p["launches"], "hbm_bytes": p["hbm_bytes"], "flops": p["flops"],
                         "gpu": gpu["name"], "constants": key})
    path = os.path.join(out_dir, "measured_vs_predicted.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out_rows[0]) if out_rows else ["layer"])
        w.writeheader()
        w.writerows(out_rows)
    print(f"\nmeasured vs predicted on {gpu['name']} (prediction constants: {key}, planned for "
          f"sm_{gpu['arch'][0]}{gpu['arch'][1]}, {gpu['sms']} SMs)")
    print(f"{'shape':>12s} {'tokens':>6s} {'provider':>10s} {'mode':>5s} {'measured ms':>12s} {'predicted':>10s} "
          f"{'ratio':>6s}")
    for r in out_rows:
        print(f"{r['in_features']:>5d}x{r['out_features']:<6d} {r['tokens']:>6d} {r['provider']:>10s} {r['mode']:>5s} "
              f"{r['measured_ms']:12.4f} {r['predicted_ms']:10.4f} {r['measured_over_predicted']:>6}")
    print(f"wrote {path} ({len(out_rows)} rows)")
    return 0 if out_rows else 1


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
