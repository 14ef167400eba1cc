"""The dry-run trace (``python -m bench --trace``) counts sane numbers from the code that runs,
on meta tensors only."""

from __future__ import annotations

import csv

import pytest
import torch

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
            "hbm_bytes", "saved_bytes", "gpu", "predicted_ms", "kind"}
    assert need <= set(T.COLUMNS)
    assert all(set(r) == set(T.COLUMNS) for r in rows)
    assert {r["provider"] for r in rows} == set(T.PROVIDERS)
    assert {r["mode"] for r in rows} == set(T.MODES)
    assert {r["gpu"] for r in rows} == set(T.GPUS)
    assert all(r["kind"] == "prediction" and r["predicted_ms"] > 0 for r in rows)


def test_fused_counts_are_sane(rows):
    fused, floor = _one(rows, "fused", "step"), _one(rows, "linear", "step")
    assert 3 <= fused["launches"] <= 24, fused["launches"]
    assert fused["triton_launches"] >= 5  # norm, x·Aᵀ, forward, the pass over G, dx
    assert floor["launches"] == 2  # x·W0ᵀ and the input gradient
    assert fused["mm_flops"] >= floor["mm_flops"]
    # DoRA adds O(r) work per token and column: a few percent at r = 16.
    assert fused["mm_flops"] <= 1.1 * floor["mm_flops"]
    n, k, m = 256, 1024, 1024
    assert floor["mm_flops"] == 2 * 2 * n * k * m
    assert floor["hbm_bytes"] == 2 * 2 * (n * k + k * m + n * m)
    assert fused["ratio_floor"] >= 1.0
    eval_ = _one(rows, "fused", "eval")
    assert eval_["saved_bytes"] == 0 and eval_["triton_launches"] >= 2


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

    s = T.Shape("q", 1024, 1024, 256)
    with Devices():
        tr = T.trace_layer("fused", s)
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
    assert (tmp_path / "trace_constants.json").exists()
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
