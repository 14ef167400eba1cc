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
"""

from __future__ import annotations

import csv
import json
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
        multi_processor_count=132, total_memory=80 << 30))
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

    rc = main(["--device", "cuda", "--model", "--model-preset", "tiny", "--dtypes", "fp32", "--no-plot",
               "--warmup-ms", "0", "--rep-ms", "0", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["provider"], r["metric"]) for r in rows if r["mode"] == "model-step"}
    assert {("fused", "peak_mem"), ("peft_dora", "peak_mem"), ("fused", "time")} <= got, sorted(got)


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
