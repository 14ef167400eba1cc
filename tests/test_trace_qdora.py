"""QDoRA rows of the dry-run trace (``python -m bench --trace --qdora``) and of the timed benchmark
(``python -m bench --qdora``): PEFT's QDoRA, the fused QDoRA, PEFT's QLoRA and the frozen
bitsandbytes ``Linear4bit`` (nf4, double quantisation, blocksize 64), on meta tensors and on a
CPU at tiny shapes."""

from __future__ import annotations

import csv
import importlib.util
import sys

import pytest
import torch

from bench import providers as P
from bench import tables as TB
from bench import trace as T
from bench.shapes import Shape
from dora_kernels.heuristics import DEQUANT_IN_KERNEL_TOKENS

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None
                               or importlib.util.find_spec("peft") is None, reason="needs bitsandbytes and peft")

SHAPE = Shape("8B-tiny", 256, 512)  # a multiple of the blocksize; named as the trace names Llama-3-8B's
TOKENS = (1, 4096)


@pytest.fixture(scope="module")
def rows():
    got, notes = T.run_qdora([SHAPE], TOKENS, r=16, dtype="bf16", gpus=("H100-SXM",))
    assert not notes, notes
    return got


def _one(rows, provider, mode, tokens):
    got = [r for r in rows if (r["provider"], r["mode"], r["tokens"]) == (provider, mode, tokens)]
    assert len(got) == 1, (provider, mode, tokens, len(got))
    return got[0]


@needs_bnb
def test_qdora_rows_and_counts(rows):
    assert {(r["provider"], r["mode"], r["tokens"]) for r in rows} == \
        {(p, m, n) for p in TB.QDORA_PROVIDERS for m in T.MODES for n in TOKENS}
    assert all(set(r) == set(T.COLUMNS) and r["predicted_ms"] > 0 for r in rows)
    n_w = SHAPE.in_features * SHAPE.out_features
    for n in TOKENS:
        for mode in ("step", "eval"):
            got = {p: _one(rows, p, mode, n) for p in TB.QDORA_PROVIDERS}
            # PEFT's QDoRA dequantises W for its norm and forms B·A: more bytes than its LoRA, which
            # moves more than the frozen Linear4bit alone
            assert got["peft_qdora"]["hbm_bytes"] > got["peft_qlora"]["hbm_bytes"] > got["qlora_floor"]["hbm_bytes"]
            if n > DEQUANT_IN_KERNEL_TOKENS:
                # W0 dequantised into a dense transient (as bitsandbytes does): more bytes than the floor
                assert got["fused_qdora"]["hbm_bytes"] > got["qlora_floor"]["hbm_bytes"]
            elif mode == "eval":
                # the kernels read the codes (the norm, the GEMM: a quarter of a 16-bit W0 each), under
                # the one 16-bit W0 a dequantisation writes (and reads again)
                assert got["fused_qdora"]["hbm_bytes"] < n_w * 2
            else:  # and the step's dx GEMM too, while bitsandbytes' backward dequantises
                assert got["fused_qdora"]["hbm_bytes"] < got["qlora_floor"]["hbm_bytes"]
            assert got["qlora_floor"]["hbm_bytes"] >= n_w // 2  # the packed codes are read at least once
            assert got["qlora_floor"]["ratio_floor"] == 1.0 and got["peft_qdora"]["ratio_peft_dora"] == 1.0
            assert got["peft_qlora"]["ratio_peft_lora"] == 1.0
    floor = _one(rows, "qlora_floor", "step", 4096)
    assert floor["mm_flops"] == 2 * 2 * 4096 * n_w  # forward and input gradient
    assert floor["saved_bytes"] == 2 * 4096 * SHAPE.out_features  # the output only: W is a parameter
    fused, dora = _one(rows, "fused_qdora", "step", 4096), _one(rows, "peft_qdora", "step", 4096)
    assert fused["triton_launches"] >= 1  # the fused op's kernels, recorded where they launch
    assert fused["saved_bytes"] <= dora["saved_bytes"]


@needs_bnb
def test_qdora_targets_and_tables(rows):
    got = T.qdora_targets(rows)
    assert [name for name, _, _ in got] == [t[0] for t in T.QDORA_TARGETS]
    for name, ok, detail in got:
        assert ok in (True, False), (name, detail)  # every target has at least one case here
    cases = T.qdora_cases(rows)
    step = [c for c in cases if c[0] == T.QDORA_TARGETS[0][0]]
    assert [c[2] for c in step] == [4096] and step[0][5] == (step[0][3] <= T.QDORA_DORA_LIMIT)
    text = T.qdora_text(rows)
    assert "fused_qdora" in text and "Saved for backward" in text


def test_bitsandbytes_dispatch_rule():
    """bitsandbytes 0.50's CUDA choice between its fused 4-bit kernel and dequantise + F.linear."""
    bf = torch.bfloat16
    h100 = ((9, 0), 132)
    assert T.bnb_gemm_4bit_custom(1, 4096, 4096, 64, bf, *h100)  # decode: the fused kernel
    assert not T.bnb_gemm_4bit_custom(4096, 4096, 4096, 64, bf, *h100)  # above 1536 tokens: dequantise
    assert not T.bnb_gemm_4bit_custom(16, 4096, 4096, 64, bf, *h100)  # q/o below a wave: dequantise
    assert T.bnb_gemm_4bit_custom(16, 14336, 4096, 64, bf, *h100)  # gate/up, > 1 wave: fused to 32 tokens
    assert not T.bnb_gemm_4bit_custom(64, 14336, 4096, 64, bf, *h100)
    assert not T.bnb_gemm_4bit_custom(2, 4096, 100, 64, bf, *h100)  # in not a multiple of the blocksize


@needs_bnb
def test_bitsandbytes_ops_are_costed():
    """gemm_4bit at one token is one launch reading the packed weight; the step's backward dequantises."""
    floor = T.trace_layer("qlora_floor", Shape("t", 4096, 4096), 1)
    (ev,) = floor.eval.events
    n = 4096 * 4096
    assert ev.name == "gemm_4bit" and ev.mm_flops == 2 * n
    assert n // 2 <= ev.bytes <= n // 2 + n // 64 * 2 + 4096 * 8  # codes, uint8 absmax (+ nested), x and y
    big = T.trace_layer("qlora_floor", Shape("t", 4096, 4096), 4096).mode("step")
    names = [e.name for e in big.events]
    assert names.count("dequantize_4bit") == 1 and "gemm_4bit.dequantize_4bit" in names  # bwd, fwd
    deq = next(e for e in big.events if e.name == "dequantize_4bit")
    # the same dequantising work an element as the package's kernels are charged (T.DEQUANT_OPS)
    assert deq.bytes == n // 2 + 4 * (n // 64) + 2 * n and deq.other_flops == T.DEQUANT_OPS * n
    assert ev.other_flops == T.DEQUANT_OPS * n


@needs_bnb
def test_trace_main_writes_the_qdora_tables(tmp_path):
    assert T.main(["--trace", "--qdora", "--quick", "--tokens", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "trace.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert {r["provider"] for r in got} == set(TB.QDORA_PROVIDERS)
    assert {r["layer"] for r in got} == {"8B-q/o"}
    md = (tmp_path / "trace.md").read_text()
    assert "x PEFT QDoRA" in md and "nf4" in md and "gemm_4bit" in md


def test_qdora_providers_skip_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    t = P.make_tensors(4, 64, 32, 4, torch.float32, torch.float32, "cpu")
    for p in TB.QDORA_PROVIDERS:
        assert "bitsandbytes is not installed" in P.check_installed(p)
        with pytest.raises(P.Unavailable, match="bitsandbytes is not installed"):
            P.build(p, t)
    rows, notes = T.run_qdora([SHAPE], (1,), gpus=("H100-SXM",))
    assert rows == [] and len(notes) == 4 and all("unavailable: bitsandbytes is not installed" in n for n in notes)


# ---------------------------------------------------------------------------------------------
# the timed benchmark's providers, on the CPU (the op's torch path, as ``python -m bench`` runs it)

@needs_bnb
def test_qdora_providers_run_on_the_cpu(torch_backend):
    t = P.make_tensors(8, 128, 64, 4, torch.float32, torch.float32, "cpu")
    outs = {}
    for p in TB.QDORA_PROVIDERS:
        layer = P.build(p, t)
        layer.train()
        y = layer(t.x)
        y.backward(t.grad)
        assert y.shape == (8, 64) and t.x.grad is not None
        if p != "qlora_floor":
            assert all(q.grad is not None for q in P.trainable(layer)), p
        layer.eval()
        with torch.no_grad():
            outs[p] = (y.detach(), layer(t.x))
        t.x.grad = None
    # the same 4-bit weight and adapters: PEFT's QDoRA and the fused one agree, train and eval
    for i in range(2):
        torch.testing.assert_close(outs["fused_qdora"][i], outs["peft_qdora"][i], rtol=1e-4, atol=1e-4)


@needs_bnb
def test_bench_main_runs_the_qdora_providers(tmp_path, torch_backend):
    from bench.run import main

    rc = main(["--device", "cpu", "--qdora", "--shapes", "128x64", "--tokens", "8", "--ranks", "4", "--dtypes",
               "fp32", "--modes", "step,eval", "--warmup-ms", "0", "--rep-ms", "0", "--min-reps", "1", "--no-plot",
               "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "results.csv", newline="") as f:
        got = {(r["provider"], r["mode"], r["metric"]) for r in csv.DictReader(f)}
    for p in TB.QDORA_PROVIDERS:
        assert (p, "step", "time") in got and (p, "step", "saved_mem") in got and (p, "eval", "time") in got
    for metric in ("speedup_vs_peft_dora", "speedup_vs_peft_lora", "over_floor", "mem_vs_peft_lora"):
        assert ("fused_qdora", "step", metric) in got, metric
    assert "×PEFT-QDoRA" in (tmp_path / "table.txt").read_text()
