"""The dry-run trace (``python -m bench --trace``) counts sane numbers from the code that runs,
on meta tensors only."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from bench import tables as TB
from bench import trace as T

SHAPE = [("q/o", 1024, 1024)]
TOKENS = (256,)


@pytest.fixture(scope="module")
def rows():
    return T.run(SHAPE, TOKENS, r=16, dtype="bf16")


def _one(rows, provider, mode, gpu="H100-SXM"):
    got = [r for r in rows if r["provider"] == provider and r["mode"] == mode and r["gpu"] == gpu]
    assert len(got) == 1, (provider, mode, gpu, len(got))
    return got[0]


def test_columns_and_rows(rows):
    need = {"provider", "mode", "tokens", "in_features", "out_features", "r", "dtype", "launches", "flops",
            "hbm_bytes", "saved_bytes", "gpu", "predicted_ms", "kind", "triton_gemm_eff",
            "predicted_ms_at_cublas_parity", "ratio_floor_at_cublas_parity", "ratio_peft_dora_at_cublas_parity",
            "ratio_peft_lora_at_cublas_parity"}
    assert need <= set(T.COLUMNS)
    assert all(set(r) == set(T.COLUMNS) for r in rows)
    assert {r["provider"] for r in rows} == set(T.PROVIDERS)
    assert {r["mode"] for r in rows} == set(T.MODES)
    assert {r["gpu"] for r in rows} == set(T.GPUS)
    assert all(r["kind"] == "prediction" and r["predicted_ms"] > 0 for r in rows)


def test_fused_counts_are_sane(rows):
    fused, floor = _one(rows, "fused", "step"), _one(rows, "linear", "step")
    assert 3 <= fused["launches"] <= 24, fused["launches"]
    assert fused["triton_launches"] >= 5  # norm, forward, the pass over G, dx, the sums (x·Aᵀ: torch's GEMM)
    assert floor["launches"] == 2  # x·W0ᵀ and the input gradient
    assert fused["mm_flops"] >= floor["mm_flops"]
    # DoRA adds O(r) work per token and column: a few percent at r = 16.
    assert fused["mm_flops"] <= 1.1 * floor["mm_flops"]
    n, k, m = 256, 1024, 1024
    assert floor["mm_flops"] == 2 * 2 * n * k * m
    assert floor["hbm_bytes"] == 2 * 2 * (n * k + k * m + n * m)
    assert fused["ratio_floor"] >= 1.0
    eval_ = _one(rows, "fused", "eval")
    assert eval_["saved_bytes"] == 0 and eval_["triton_launches"] >= 1  # the forward (norm cached; x·Aᵀ: torch's)


def test_saved_for_backward(rows):
    fused, dora, lora = (_one(rows, p, "fwd")["saved_bytes"] for p in ("fused", "peft_dora", "peft_lora"))
    assert dora > fused > 0
    assert fused >= lora
    n, k, m, r = 256, 1024, 1024, 16
    # W0 is a parameter and x needs no saving for dx: the output alone
    assert _one(rows, "linear", "fwd")["saved_bytes"] == 2 * n * m
    # fused saves x and its output y (bf16, (N, in) and (N, out)), x·Aᵀ (the adapters' dtype, bf16
    # here) and the norm (fp32): parameters excluded, y counted once
    assert fused == 2 * n * k + 2 * n * m + 2 * n * r + 4 * m
    # PEFT's LoRA: x, x·Aᵀ and the output; the fused op adds the norm only
    assert fused - lora == 4 * m


def test_peft_dora_matches_the_reference(rows):
    """reference/ copies PEFT's arithmetic op for op, so the two counts agree."""
    for mode in T.MODES:
        a, b = _one(rows, "peft_dora", mode), _one(rows, "reference", mode)
        assert (a["launches"], a["flops"], a["hbm_bytes"]) == (b["launches"], b["flops"], b["hbm_bytes"])


def test_the_fused_trace_runs_no_kernel(monkeypatch):
    """Meta tensors only: no Triton kernel is run or compiled, every traced tensor is meta."""
    import triton
    from torch.utils._python_dispatch import TorchDispatchMode

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched during the dry run")

    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", refuse)
    try:
        from triton.runtime.interpreter import InterpretedFunction

        monkeypatch.setattr(InterpretedFunction, "run", refuse)
    except ImportError:
        pass

    devices = set()

    class Devices(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in T._tensors(out):
                if t.numel() > 1:  # the dropout seed is a one-element CPU tensor
                    devices.add(t.device.type)
            return out

    with Devices():
        tr = T.trace_layer("fused", T.Shape("q", 1024, 1024), 256)
    names = [e.name for e in tr.mode("step").events]
    assert "_fwd_kernel" in names and "_dx_kernel" in names, names
    assert devices <= {"meta"}, devices


def test_write_and_targets(rows, tmp_path):
    plotted, targets = T.write(rows, str(tmp_path))
    with open(tmp_path / "trace.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) and set(got[0]) == set(T.COLUMNS)
    text = (tmp_path / "trace.md").read_text()
    assert "prediction" in text and "launch overhead" in text
    # the efficiency the Triton GEMMs are predicted at, its sources, and the parity columns
    assert "triton issue #3672" in text and "triton PR #5726" in text and "at parity" in text
    consts = json.loads((tmp_path / "trace_constants.json").read_text())
    assert consts["triton_gemm_efficiency"]["points"][0][1] == 0.38
    assert any("#3672" in src for src in consts["triton_gemm_efficiency"]["sources"])
    assert plotted == (tmp_path / "trace.png").exists()
    # the shape is not one of the (8B) layers: no target is judged on it
    assert targets == []


def test_count_rules():
    """Views are free, a matmul counts 2·m·n·k, an elementwise op reads and writes once."""
    a = torch.empty(64, 32, device="meta", dtype=torch.bfloat16)
    b = torch.empty(32, 16, device="meta", dtype=torch.bfloat16)
    _, c = T.count(lambda: (a.t().contiguous().t(), a @ b, a * 2, a.view(32, 64), a.to(torch.bfloat16)))
    names = [e.name for e in c.events]
    assert names == ["clone", "mm", "mul"], names
    mm = c.events[1]
    assert mm.mm_flops == 2 * 64 * 32 * 16 and mm.bytes == 2 * (64 * 32 + 32 * 16 + 64 * 16)
    assert c.events[2].bytes == 2 * 2 * 64 * 32 and c.events[2].other_flops == 64 * 32
    v = torch.empty(16, device="meta").expand(64, 16)
    assert T.distinct_bytes(v) == 16 * 4


# ---------------------------------------------------------------------------------------------
# the tables the trace predicts with (bench.tables)

def test_tables_are_the_trace_tables():
    assert T.PROVIDERS == tuple(p for p in TB.PROVIDERS if p != "compiled")
    assert [(s.name, s.in_features, s.out_features) for s in T.SHAPES] == [
        ("8B-q/o", 4096, 4096), ("8B-k/v", 4096, 1024), ("8B-gate/up", 4096, 14336), ("8B-down", 14336, 4096),
        ("70B-up", 8192, 28672)]
    assert tuple(T.GPUS) == ("H100-SXM", "H200", "A100-SXM") == TB.PREDICTED_GPUS
    assert all(T.GPUS[g] is TB.GPUS[g] for g in T.GPUS)
    for arch, sms in TB.ARCH_SMS.items():  # the compile report plans as the trace does where both know the arch
        rows = [v for v in T.GPUS.values() if v["arch"] == (arch // 10, arch % 10)]
        assert all(v["sms"] == sms for v in rows), arch


@pytest.mark.parametrize("name, key, predict, bw", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM", "H100-SXM", 3.35e12),
    ("NVIDIA H100 PCIe", "H100-PCIe", "H100-SXM", 2.0e12),
    ("NVIDIA H100 NVL", "H100-NVL", "H100-SXM", 3.9e12),
    ("NVIDIA H200", "H200", "H200", 4.8e12),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM", "A100-SXM", 2.039e12),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB", "A100-SXM", 1.555e12),
    ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB", "A100-SXM", 1.935e12),
    ("NVIDIA L40S", "L40S", "H100-SXM", 0.864e12),
    ("Some Future GPU", None, "H100-SXM", None),
])
def test_gpu_lookup_by_device_name(name, key, predict, bw):
    assert TB.gpu_key(name) == key
    assert TB.predict_key(name) == predict
    assert TB.nominal_bandwidth(name) == bw


# ---------------------------------------------------------------------------------------------
# the package's Triton GEMMs against cuBLAS

@pytest.mark.parametrize("m, n, k, eff", [(2048, 2048, 2048, 0.38), (2560, 2560, 2560, 0.70),
                                          (2816, 2816, 2816, 0.81), (3072, 3072, 3072, 0.90),
                                          (8192, 8192, 512, 0.76)])
def test_gemm_efficiency_at_the_published_points(m, n, k, eff):
    assert T.triton_gemm_efficiency(2 * m * n * k) == pytest.approx(eff, abs=1e-12)


def test_gemm_efficiency_between_and_beyond_the_points():
    pts = T.TRITON_GEMM_POINTS
    assert T.triton_gemm_efficiency(1.0) == T.triton_gemm_efficiency(pts[0][0] / 10) == 0.38
    assert T.triton_gemm_efficiency(pts[-1][0] * 1000) == 0.76
    for (f0, e0, _), (f1, e1, _) in zip(pts, pts[1:]):
        mid = math.sqrt(f0 * f1)  # halfway in log(FLOPs): halfway in efficiency
        assert T.triton_gemm_efficiency(mid) == pytest.approx((e0 + e1) / 2)


def test_parity_is_the_bound(rows):
    for r in rows:
        assert r["predicted_ms"] >= r["predicted_ms_at_cublas_parity"] > 0
        if r["provider"].startswith("fused"):
            assert r["triton_gemm_eff"] != "" and 0 < r["triton_gemm_eff"] <= 1
            assert r["ratio_floor"] >= r["ratio_floor_at_cublas_parity"]
            assert r["ratio_peft_lora"] >= r["ratio_peft_lora_at_cublas_parity"]
        else:  # no Triton GEMM: cuBLAS's rate either way
            assert r["triton_gemm_eff"] == "" and r["predicted_ms"] == r["predicted_ms_at_cublas_parity"]
            assert r["ratio_floor"] == r["ratio_floor_at_cublas_parity"]
    # 256 tokens of a 1024x1024 layer: the fused GEMMs (0.5 GFLOP, efficiency 0.38) are compute-bound
    fused = _one(rows, "fused", "step")
    assert fused["triton_gemm_eff"] == pytest.approx(0.38)
    assert fused["predicted_ms"] > fused["predicted_ms_at_cublas_parity"]


@pytest.fixture(scope="module")
def big():
    """A compute-bound case (2048 tokens, 2048 -> 2048, bf16) and a memory-bound one (16 tokens)."""
    s = T.Shape("sq", 2048, 2048)
    return {n: {p: T.trace_layer(p, s, n) for p in ("fused", "linear")} for n in (16, 2048)}


@pytest.mark.parametrize("factor", [0.45, 0.6, 1.1])
def test_derivation_recovers_a_known_factor(big, factor):
    """Fake timings: the model itself at a known efficiency and a known cuBLAS rate."""
    gpu = dict(T.GPUS["H100-SXM"], mm=600e12)  # this "GPU"'s cuBLAS reaches 600 TFLOP/s
    for mode in ("fwd", "step", "eval"):
        fused, floor = big[2048]["fused"].mode(mode), big[2048]["linear"].mode(mode)
        d = T.derive_gemm_efficiency(fused, floor, T.predict_s(fused, gpu, eff=factor),
                                     T.predict_s(floor, gpu, at_parity=True), T.GPUS["H100-SXM"])
        assert d["used"], (mode, d)
        assert d["efficiency"] == pytest.approx(factor, rel=1e-6)
        assert d["cublas_tflops"] == pytest.approx(600, rel=1e-6)
        assert 0 < d["rest_ms"] < d["triton_gemm_ms"]


def test_derivation_skips_memory_bound_cases(big):
    gpu = T.GPUS["H100-SXM"]
    fused, floor = big[16]["fused"].mode("fwd"), big[16]["linear"].mode("fwd")
    d = T.derive_gemm_efficiency(fused, floor, T.predict_s(fused, gpu, eff=0.6), T.predict_s(floor, gpu), gpu)
    assert not d["used"] and "compute-bound" in d["why"]
    d = T.derive_gemm_efficiency(fused, floor, 1e-9, 1e-3, gpu)  # faster than the model's rest allows
    assert d["efficiency"] is None and d["why"]


def test_a_measured_factor_goes_back_into_the_model(big, tmp_path):
    path = tmp_path / "gemm_efficiency.json"
    path.write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "constants": "H100-SXM", "efficiency": 0.5}))
    specs = T.gpu_specs(str(path))
    assert specs["H100-SXM"]["triton_gemm_eff"] == 0.5
    assert "triton_gemm_eff" not in specs["H200"] and "triton_gemm_eff" not in T.GPUS["H100-SXM"]
    fused = big[2048]["fused"].mode("step")
    assert T.predict_s(fused, specs["H100-SXM"]) == pytest.approx(T.predict_s(fused, T.GPUS["H100-SXM"], eff=0.5))
    assert T.assumed_efficiency(fused, specs["H100-SXM"]) == pytest.approx(0.5)
    assert all(v["triton_gemm_eff"] == 0.7 for v in T.gpu_specs("0.7").values())
    assert "0.500 of cuBLAS" in T.constants_text(specs)
    with pytest.raises(ValueError):
        T.gpu_specs("-1")


def test_dvora_rows_trace_the_fused_op_and_count_trainables():
    """fused DVoRA runs the fused kernels with a frozen A (no dA partials) and trains r + 2·out."""
    pytest.importorskip("peft")
    from bench import trace as T
    from bench.shapes import Shape

    shape = Shape("t", 96, 80)
    tr = T.trace_layer("fused_dvora", shape, 64, r=256)
    names = [e.name for e in tr.mode("step").events if e.source == "triton"]
    assert names.count("_dx_kernel") == 1 and "_fwd_kernel" in names
    assert tr.trainable == 256 + 2 * 80
    assert T.trace_layer("fused", shape, 64, r=16).trainable == 16 * (96 + 80) + 80
    assert T.trace_layer("peft_vera", shape, 64, r=256).trainable == 256 + 80
    rows = T.run([shape], (4096,), r=256, providers=("linear", "fused", "fused_dvora"), gpus=("H100-SXM",))
    rows16 = T.run([shape], (4096,), r=16, providers=("linear", "fused"), gpus=("H100-SXM",))
    for r in rows + rows16:
        r["layer"] = "8B-" + r["layer"]
    (got,) = T.dvora_targets(rows, rows16)
    a = next(r for r in rows if r["provider"] == "fused_dvora" and r["mode"] == "step")["predicted_ms"]
    b = next(r for r in rows16 if r["provider"] == "fused" and r["mode"] == "step")["predicted_ms"]
    assert got[1:4] == (a, b, round(a / b, 3)) and got[4] == (a / b <= T.DVORA_LIMIT)


# ---------------------------------------------------------------------------------------------
# conv / embedding layers (``python -m bench --trace --layers conv,embedding``)

@pytest.fixture(scope="module")
def kind_rows():
    return T.run_kinds(("conv", "embedding"), r=16, dtype="bf16", gpus=("H100-SXM",))


def test_conv_and_embedding_rows_exist(kind_rows):
    for kind in ("conv", "embedding"):
        layer = TB.KIND_SHAPES[kind][0]
        got = {(r["provider"], r["mode"]) for r in kind_rows if r["layer"] == layer}
        assert got == {(p, m) for p in TB.KIND_PROVIDERS for m in T.MODES}
    assert all(set(r) == set(T.COLUMNS) for r in kind_rows)
    for r in kind_rows:  # a frozen nn.Embedding has no backward: nothing to launch
        none = r["provider"] == "base" and r["mode"] == "bwd" and r["layer"] == TB.KIND_SHAPES["embedding"][0]
        assert (r["predicted_ms"] == 0 and r["launches"] == 0) if none else r["predicted_ms"] > 0, r
    conv_base = [r for r in kind_rows if r["provider"] == "base" and r["mode"] == "step"
                 and r["layer"] == TB.KIND_SHAPES["conv"][0]][0]
    # forward and input gradient of the 3x3 conv: 2 x 2·(2·64·64)·(320·9)·320 FLOPs
    assert conv_base["mm_flops"] == 2 * 2 * (2 * 64 * 64) * (320 * 9) * 320
    assert conv_base["ratio_floor"] == 1.0


def test_fused_kinds_save_no_more_than_peft_dora(kind_rows):
    for kind in ("conv", "embedding"):
        layer = TB.KIND_SHAPES[kind][0]
        step = {r["provider"]: r for r in kind_rows if r["layer"] == layer and r["mode"] == "step"}
        assert step["fused"]["saved_bytes"] <= step["peft_dora"]["saved_bytes"], kind


def test_fused_conv_step_runs_the_norm_kernel_and_forms_no_lora_product():
    fused = T.trace_kind("conv", "fused").mode("step")
    names = [e.name for e in fused.events]
    assert "_norm_kernel" in names
    assert {e.name for e in fused.events if e.source == "triton"} == {"_norm_kernel", "_conv_fwd_kernel",
                                                                      "_conv_bwd_kernel", "_conv_sum_kernel"}
    assert "mm" not in names  # no (out, in·k·k) product B·A
    peft = [e.name for e in T.trace_kind("conv", "peft_dora").mode("step").events]
    assert "mm" in peft and "_norm_kernel" not in peft


def test_trace_main_writes_the_kind_tables(tmp_path):
    assert T.main(["--trace", "--layers", "conv,embedding", "--adapter-dtype", "bf16", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "trace.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["layer"] for r in rows} == {TB.KIND_SHAPES[k][0] for k in ("conv", "embedding")}
    assert "x floor" in (tmp_path / "trace.md").read_text()
