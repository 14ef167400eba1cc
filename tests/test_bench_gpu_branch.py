"""The benchmark's GPU branch, run on a CPU against a stand-in CUDA.

``python -m bench`` on a GPU takes code paths a CPU run never reaches: ``triton.testing.do_bench``,
CUDA-event timing with an untimed setup (the backward mode), ``max_memory_allocated`` peaks, the
HBM-bandwidth figure of the norm mode, the device slug and name, and the peak-memory columns.
Here ``torch.cuda`` answers as a GPU would (events time with ``perf_counter``, peaks are fixed
numbers), ``do_bench`` times with the wall clock, and the layer and model builders (plus a
``TorchFunctionMode`` for stray ``.to("cuda")`` calls) put on the CPU what they are asked to put on
``cuda``, so the rest of the driver runs unchanged. The numbers mean nothing;
the test shows that the GPU run completes and writes the rows and columns it should. Skipped on
a machine with a real GPU, where the real run is the test.

The quick acceptance run (``python -m bench.acceptance --quick``) is tested here too, against the
same stand-in: its parts, caps and commands, and its runner with stand-in commands in place of
the GPU parts (a part over its cap is stopped with what it started, the run goes on, a part the
budget cannot hold is skipped, compiles are counted from the Triton cache, the summary is written).
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import subprocess
import sys
import time
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU is present")


def _cpu(d):
    if isinstance(d, torch.device) and d.type == "cuda":
        return torch.device("cpu")
    if isinstance(d, str) and d.startswith("cuda"):
        return "cpu"
    return d


class _CudaOnCpu(TorchFunctionMode):
    """Tensors asked for on ``cuda`` are made on the CPU."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func in (torch.Tensor.to,):
            args = tuple(_cpu(a) for a in args)
        return func(*args, **kwargs)


class _Event:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, **_):
    times = []
    for _i in range(3):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return [times[1], times[0], times[2]] if quantiles else times[1]


@pytest.fixture
def fake_cuda(monkeypatch):
    import triton.testing

    # Imported before torch.cuda says yes: bitsandbytes (which PEFT imports when installed) sets
    # up its CUDA backend at import, which the stand-in cannot serve.
    for mod in ("bitsandbytes", "peft"):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001  (a missing or broken optional package: the tests skip or say so)
            pass
    c = torch.cuda
    monkeypatch.setattr(c, "is_available", lambda: True)
    monkeypatch.setattr(c, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(c, "empty_cache", lambda: None)
    monkeypatch.setattr(c, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(c, "memory_allocated", lambda *a, **k: 1 << 20)
    monkeypatch.setattr(c, "max_memory_allocated", lambda *a, **k: 3 << 20)
    monkeypatch.setattr(c, "get_device_name", lambda *a, **k: "NVIDIA H100 80GB HBM3 (stand-in)")
    monkeypatch.setattr(c, "current_device", lambda: 0)
    monkeypatch.setattr(c, "get_device_properties", lambda *a, **k: types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3 (stand-in)", memory_clock_rate=2_619_000, memory_bus_width=5120,
        multi_processor_count=132, total_memory=80 << 30, major=9, minor=0))
    monkeypatch.setattr(c, "Event", _Event)
    monkeypatch.setattr(triton.testing, "do_bench", _do_bench)
    from bench import model as M
    from bench import providers as P

    make_tensors, build = P.make_tensors, M.build
    monkeypatch.setattr(P, "make_tensors", lambda *a, **k: make_tensors(*a[:-1], "cpu", **k))
    monkeypatch.setattr(M, "build", lambda preset, variant, dtype, device: build(preset, variant, dtype, "cpu"))
    with _CudaOnCpu():
        yield


def test_gpu_run_completes_with_gpu_columns(fake_cuda, tmp_path):
    from bench.run import main

    rc = main(["--device", "cuda", "--shapes", "32x48", "--tokens", "16", "--ranks", "4", "--dtypes", "bf16",
               "--modes", "step,bwd,eval,norm", "--providers", "fused,reference,linear", "--no-model",
               "--no-plot", "--warmup-ms", "0", "--rep-ms", "0", "--out", str(tmp_path)])
    assert rc == 0
    table = (tmp_path / "table.txt").read_text()
    assert "H100" in table and "do_bench" in table and "fused op path: triton" in table
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    for prov in ("fused", "reference", "linear"):
        assert (prov, "step", "peak_mem") in got, sorted(got)  # the GPU's peak, absent on a CPU
        assert (prov, "bwd", "time") in got and (prov, "eval", "time") in got
    assert ("fused", "norm", "time") in got
    assert any(r["mode"] == "norm" and r["metric"] == "hbm_fraction" for r in rows), sorted(got)
    peaks = [float(r["median"]) for r in rows if r["metric"] == "peak_mem"]
    assert peaks and all(p == pytest.approx(2.0) for p in peaks)  # 3 MiB peak − 1 MiB before
    assert {r["device"] for r in rows} == {"NVIDIA H100 80GB HBM3 (stand-in)"}


def test_gpu_model_figure_completes(fake_cuda, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import dataclasses

    from bench import model as M
    from bench.run import main

    # a smaller "tiny" (the interpreter runs the fused layers here)
    tiny = dataclasses.replace(M.PRESETS["tiny"], hidden=64, intermediate=96, layers=1, vocab=128, seq=16, r=4)
    monkeypatch.setitem(M.PRESETS, "tiny", tiny)

    # the DoRA/LoRA variants only: the DVoRA ones would run DVoRA's kernels through the interpreter
    # here (~15 s); tests/test_bench_smoke.py runs every variant on the CPU path
    rc = main(["--device", "cuda", "--model", "--model-preset", "tiny", "--model-variants", "fused,peft_dora,peft_lora",
               "--dtypes", "fp32", "--no-plot", "--warmup-ms", "0", "--rep-ms", "0", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["provider"], r["metric"]) for r in rows if r["mode"] == "model-step"}
    want = {("fused", "peak_mem"), ("peft_dora", "peak_mem"), ("fused", "time"), ("fused", "trainable_params")}
    assert want <= got, sorted(got)
    assert {r["provider"] for r in rows} == {"fused", "peft_dora", "peft_lora"}


def test_acceptance_derives_the_gemm_efficiency_from_fake_timings(tmp_path, monkeypatch):
    """``bench.acceptance --part compare`` on a results.csv whose times are the trace's own model
    with the Triton GEMMs at 0.6 of cuBLAS and cuBLAS at 650 TFLOP/s: it recovers 0.6, writes it
    into the folder, and the trace reads it back."""
    from bench import acceptance as A
    from bench import trace as T

    gpu = {"name": "NVIDIA H100 80GB HBM3 (stand-in)", "arch": (9, 0), "sms": 132}
    key, spec = A.gpu_spec(gpu)
    assert key == "H100-SXM" and spec is not T.GPUS[key]
    truth = dict(spec, mm=650e12)
    shape, rows = T.Shape("2048x2048", 2048, 2048), []
    for n in (16, 2048):
        for prov in ("fused", "linear"):
            tr = T.trace_layer(prov, shape, n)
            for mode in T.MODES:
                c = tr.mode(mode)
                ms = 1e3 * (T.predict_s(c, truth, eff=0.6) if prov == "fused" else T.predict_s(c, truth))
                rows.append({"name": shape.name, "provider": prov, "mode": mode, "metric": "time", "unit": "ms",
                             "tokens": n, "in_features": 2048, "out_features": 2048, "r": 16, "dtype": "bf16",
                             "adapter_dtype": "bf16", "median": repr(ms), "p20": repr(ms), "p80": repr(ms)})
    (tmp_path / "bench").mkdir()
    with open(tmp_path / "bench" / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    gpus_before = {k: dict(v) for k, v in T.GPUS.items()}
    monkeypatch.setattr(A, "_gpu", lambda: gpu)
    assert A.main(["--part", "compare", "--out", str(tmp_path)]) == 0
    assert {k: dict(v) for k, v in T.GPUS.items()} == gpus_before  # the trace's GPU table is left alone

    summary = json.loads((tmp_path / "gemm_efficiency.json").read_text())
    assert summary["constants"] == "H100-SXM" and summary["gpu"] == gpu["name"]
    assert summary["efficiency"] == pytest.approx(0.6, rel=1e-6)
    assert summary["cases"] == 4 and set(summary["by_mode"]) == set(T.MODES)  # the 2048-token cases
    assert summary["cublas_tflops"] == pytest.approx(650, rel=1e-4)
    with open(tmp_path / "gemm_efficiency.csv", newline="") as f:
        cases = list(csv.DictReader(f))
    assert {(c["tokens"], c["used"]) for c in cases} == {("16", "0"), ("2048", "1")}
    assert all(float(c["cublas_tflops"]) == pytest.approx(650, rel=1e-4) for c in cases if c["used"] == "1")
    with open(tmp_path / "measured_vs_predicted.csv", newline="") as f:
        joined = list(csv.DictReader(f))
    assert len(joined) == len(rows)
    for r in joined:
        assert float(r["predicted_ms"]) >= float(r["predicted_ms_at_cublas_parity"])
        # refit with the measured cuBLAS rate and efficiency, the model reproduces the fake measurement
        assert float(r["measured_over_refit"]) == pytest.approx(1.0, abs=2e-3)
    status = json.loads((tmp_path / "acceptance.json").read_text())
    assert status["compare"]["status"] == 0

    specs = T.gpu_specs(str(tmp_path / "gemm_efficiency.json"))
    assert specs["H100-SXM"]["triton_gemm_eff"] == pytest.approx(0.6, rel=1e-6)



# ---------------------------------------------------------------------------------------------
# the quick acceptance run

def test_quick_parts_fit_their_budget_and_run_what_they_should():
    from bench import acceptance as A
    from bench.run import parser
    from bench.shapes import parse_shapes

    parts = A.quick_parts("/o", py="PY")
    assert [p.name for p in parts] == ["selftest", "tests", "bench", "compare"]
    assert sum(p.cap_s for p in parts) <= A.QUICK_BUDGET_S == 390 < A.QUICK_LIMIT_S == 420
    assert all(0 < p.need_s <= p.cap_s for p in parts)
    by = {p.name: p for p in parts}

    assert by["selftest"].command == ("PY", "-m", "dora_kernels.selftest", "--device", "cuda", "--quick", "--only",
                                      "in100-out72")
    from dora_kernels import selftest

    cases = [c for c in selftest.cases("cuda", True) if "in100-out72" in c.id]
    assert 10 <= len(cases) <= 40
    assert {"fp32", "fp16", "bf16", "bf16+fp32"} <= {c.case.dtype for c in cases}
    assert any(c.case.drop == "train" for c in cases) and any(c.case.drop == "none" for c in cases)
    n = [c.case.lead[0] for c in cases]
    assert any(k % 16 and k > 1 for k in n) and all(c.case.i % 16 or c.case.o % 16 for c in cases)  # odd shapes

    t = by["tests"]
    assert t.command[:4] == ("PY", "-m", "pytest", "-q") and t.cwd == A.ROOT
    assert "--junitxml=" + os.path.join("/o", "tests.xml") in t.command
    assert t.command[-len(A.QUICK_TESTS):] == A.QUICK_TESTS
    assert any(i.startswith("tests/test_ops.py::test_parity[triton-") for i in A.QUICK_TESTS)
    assert any(i.startswith("tests/test_ops.py::test_parity[torch-") for i in A.QUICK_TESTS)  # the torch path on CUDA
    assert any(i.startswith("tests/test_fuse.py::test_matches_peft[") for i in A.QUICK_TESTS)
    assert "tests/test_runtime.py" in A.QUICK_TESTS

    b = by["bench"].command
    assert b[:3] == ("PY", "-m", "bench")
    args = parser().parse_args(list(b[3:]))
    assert (args.device, args.tokens, args.ranks, args.dtypes, args.modes, args.no_model, args.out) == \
        ("cuda", (4096, 16384), (16,), ("bf16",), ("step", "eval"), True, os.path.join("/o", "bench"))
    assert args.providers == ("fused", "peft_dora", "peft_lora", "linear") and args.adapter_dtype == "fp32"
    assert [(s.in_features, s.out_features) for s in parse_shapes(args.shapes)] == \
        [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # the Llama-3-8B projections
    assert by["compare"].command == ("PY", "-m", "bench.acceptance", "--part", "compare", "--out", "/o")


def _hypothesis_tests(path):
    """Names of the functions in a test file that hypothesis generates examples for."""
    names, pending = set(), False
    with open(path) as f:
        for line in f:
            if line.startswith("@given("):
                pending = True
            m = re.match(r"def (\w+)\(", line)
            if m and pending:
                names.add(m.group(1))
                pending = False
    return names


def test_quick_test_ids_exist_and_hold_no_hypothesis_examples():
    from bench import acceptance as A

    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *A.QUICK_TESTS], cwd=A.ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert len(ids) >= len(A.QUICK_TESTS)
    files = {i.split("::")[0] for i in A.QUICK_TESTS}
    generated = set().union(*(_hypothesis_tests(os.path.join(A.ROOT, f)) for f in files))
    assert generated  # the check sees them (test_ops.py has some)
    assert not [i for i in ids if i.split("::")[1].split("[")[0] in generated]


def _py(code):
    return (sys.executable, "-c", code)


FAKE_COMPILE = ("import os; d = os.path.join(os.environ['TRITON_CACHE_DIR'], 'AB12'); os.makedirs(d); "
                "open(os.path.join(d, '_fwd_kernel.cubin'), 'w').close(); open(os.path.join(d, '_fwd_kernel.json'), "
                "'w').close(); print('30/30 checks passed, 0 failed, 3 cases in 0.1 s')")
# starts a grandchild, records its pid, then hangs: stopping the part must stop both
HANG = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "open(sys.argv[1], 'w').write(str(p.pid)); print('started', flush=True); time.sleep(120)")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _quick(monkeypatch, tmp_path, parts, *extra):
    from bench import acceptance as A

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(A, "quick_parts", lambda out_dir, py=sys.executable: parts)
    out = tmp_path / "quick"
    rc = A.main(["--quick", "--out", str(out), *extra])
    return rc, out, json.loads((out / "summary.json").read_text())


def test_quick_run_stops_a_part_at_its_cap_and_goes_on(fake_cuda, tmp_path, monkeypatch, capsys):
    from bench.acceptance import Part

    pid_file = tmp_path / "grandchild.pid"
    (tmp_path / "here").mkdir()
    parts = [Part("selftest", _py(FAKE_COMPILE), 30, 1, "stand-in"),
             Part("tests", (*_py(HANG), str(pid_file)), 2, 1, "stand-in that hangs"),
             Part("bench", _py("import os, sys; print(os.getcwd()); sys.exit(1)"), 30, 1, "stand-in that fails",
                  cwd=str(tmp_path / "here")),
             Part("compare", _py("print('compared')"), 30, 1, "stand-in")]
    t0 = time.perf_counter()
    rc, out, summary = _quick(monkeypatch, tmp_path, parts)
    assert time.perf_counter() - t0 < 60
    assert rc == 1 and summary["ok"] is False and summary["kind"] == "quick"
    assert summary["gpu"] == "NVIDIA H100 80GB HBM3 (stand-in)" and summary["arch"] == "sm_90"
    got = {p["name"]: p for p in summary["parts"]}
    assert [p["name"] for p in summary["parts"]] == ["selftest", "tests", "bench", "compare"]
    assert [got[n]["status"] for n in got] == ["ok", "timeout", "failed", "ok"]
    assert [got[n]["compiles"] for n in got] == [1, 0, 0, 0]
    assert got["selftest"]["compiled_kernels"] == {"_fwd_kernel": 1}
    assert got["selftest"]["result"] == "30/30 checks passed, 0 failed, 3 cases in 0.1 s"
    assert got["tests"]["exit"] is None and 2 <= got["tests"]["seconds"] < 30
    assert got["bench"]["exit"] == 1
    assert not _alive(int(pid_file.read_text()))  # the part's own children were stopped with it
    assert "started" in (out / "tests.txt").read_text() and "stopped after 2 s" in (out / "tests.txt").read_text()
    assert (out / "bench.txt").read_text().strip() == str(tmp_path / "here")
    assert (out / "compare.txt").read_text().strip() == "compared"
    record = json.loads((out / "acceptance.json").read_text())
    assert record["tests"]["status"] == "timeout" and record["selftest"]["compiles"] == 1
    md = (out / "summary.md").read_text()
    assert "| tests | timeout | " in md and "| selftest | ok | " in md and "| bench | failed (exit 1) | " in md
    printed = capsys.readouterr().out
    assert "1 Triton kernels compiled (_fwd_kernel 1)" in printed and str(out) in printed


def test_quick_run_skips_what_its_budget_cannot_hold(fake_cuda, tmp_path, monkeypatch):
    from bench.acceptance import Part

    parts = [Part("selftest", _py("pass"), 30, 1, "stand-in"),
             Part("tests", _py("pass"), 30, 100, "needs more than is left"),
             Part("bench", _py("import time; time.sleep(120)"), 100, 1, "stopped at what is left of the budget"),
             Part("compare", _py("pass"), 30, 1, "nothing left for it")]
    rc, out, summary = _quick(monkeypatch, tmp_path, parts, "--budget", "6")
    got = {p["name"]: p for p in summary["parts"]}
    assert rc == 1 and [got[n]["status"] for n in got] == ["ok", "skipped", "timeout", "skipped"]
    assert got["tests"]["result"].startswith("not run:") and got["tests"]["compiles"] is None
    # what is left of the 6 s (rounded to 0.1 s: 6.0 where the parts before took under 50 ms), not its cap
    assert got["bench"]["timeout_s"] <= 6 < got["bench"]["cap_s"]
    assert summary["elapsed_s"] < 6 + 5
    assert not (out / "tests.txt").exists()
    assert "| tests | skipped | " in (out / "summary.md").read_text()


def test_quick_run_without_a_gpu_runs_nothing(tmp_path):
    from bench import acceptance as A

    assert A.main(["--quick", "--out", str(tmp_path / "q")]) == A.NO_GPU
    assert not (tmp_path / "q").exists()
