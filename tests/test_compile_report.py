"""Every kernel, in every config its launchers can choose, compiles for sm_80 and sm_90 without a
GPU to code that neither spills registers nor overflows shared memory, and its 16-bit GEMM tiles
reach wgmma on sm_90.

Runs ``python -m bench.compile_report --arch 80,90`` in a fresh process (the kernels must be JIT
functions there, while this test session interprets them): the launchers run on meta tensors
over the benchmark's shapes and a sweep of every bucket edge of the heuristics (tokens, ranks,
every dtype pair the op accepts, tf32 on and off, dropout/bias/dx/exact-norm flags), and every
distinct compile is built with the wheel's ptxas. Each row is held to the report's own rules
(``bench.compile_report.problems``). ``test_random_shapes_choose_compiled_configs`` checks that
the sweep is complete: the launchers, on random shapes, choose only configs it compiled.

Compiling all of them takes about half an hour on 2 cores, so results are memoised by kernel
source, triton version and compile inputs: in ``~/.cache/dora_kernels/compile_report`` (this
machine's compiles) and in the committed ``bench/results/compile_report.csv`` (its ``key``
column), which ``python -m bench.compile_report --arch 80,90`` regenerates. A compile found in
neither is compiled here, so a changed kernel is always compiled and checked; of the results
taken from the committed report, ``VERIFY`` are compiled again on every run (drawn from every
kernel and arch, different ones each day) and must match.
The committed report also covers the consumer cards (sm_86, sm_89, sm_120):
``test_committed_report_covers_every_arch`` holds its rows to the same rules without compiling.
Skipped when the wheel's ptxas / cuobjdump are missing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import compile_report as CR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
COMMITTED_ARCHS = (80, 86, 89, 90, 120)  # what bench/results/compile_report.csv covers
REPORT = os.path.join(ROOT, "bench", "results", "compile_report.csv")
VERIFY = 24  # reused rows compiled again on every run

pytestmark = pytest.mark.skipif(not CR.tools_available(), reason="ptxas / cuobjdump not available")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_report")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "bench.compile_report", "--arch", ",".join(map(str, ARCHS)),
                           "--jobs", str(max(2, min(8, os.cpu_count() or 2))), "--reuse", REPORT,
                           "--verify", str(VERIFY), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "compile_report.csv") as f:
        got = list(csv.DictReader(f))
    for r in got:  # the CSV's numbers, as the report computed them
        for k in ("registers", "spill_bytes", "shared_bytes", "shared_limit", "num_warps"):
            r[k] = int(r[k]) if r[k] not in ("", None) else ""
    return got


def _id(r):
    return f"{r['kernel']} {r['arch']} {r['dtype']} [{r['config']}] e.g. {r['example']}"


def test_every_kernel_and_arch_compiled(rows):
    kernels = {r["kernel"] for r in rows}
    assert {"_norm_kernel", "_xa_kernel", "_fwd_kernel", "_bwd_dy_kernel", "_dx_kernel", "_sum_partials_kernel",
            "_dm_redo_kernel", "_mask_kernel", "_dequant_kernel", "_absmax_kernel", "_fwd_norm_kernel",
            "_dvora_b_kernel", "_dvora_dlambda_kernel", "_dvora_sum_kernel", "_conv_fwd_kernel", "_conv_bwd_kernel",
            "_conv_sum_kernel"} <= kernels, kernels
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ARCHS}
    assert {r["dtype"] for r in rows} >= {f"{d}+{a}" if d != a else d for d, a in CR.ALL_PAIRS}
    assert any("PREC=tf32 " in r["config"] for r in rows) and any("PREC=tf32x3" in r["config"] for r in rows)
    bad = [f"{_id(r)}: {r['status']}" for r in rows
           if r["status"].startswith(("compile error", "worker", "cuobjdump", "report mismatch"))]
    assert not bad, "\n".join(bad)
    assert all(r["registers"] != "" and r["shared_bytes"] != "" for r in rows)


def test_committed_report_covers_every_arch():
    """The committed report: every kernel on every arch users have, 0 flagged (spills, shared
    memory over the arch's limit, compile errors, sm_90 GEMM tiles without wgmma) on each."""
    with open(REPORT) as f:
        committed = list(csv.DictReader(f))
    for r in committed:
        for k in ("registers", "spill_bytes", "shared_bytes", "shared_limit", "num_warps"):
            r[k] = int(r[k]) if r[k] not in ("", None) else ""
    assert {r["arch"] for r in committed} == {f"sm_{a}" for a in COMMITTED_ARCHS}
    kernels = {r["kernel"] for r in committed}
    for arch in COMMITTED_ARCHS:
        assert {r["kernel"] for r in committed if r["arch"] == f"sm_{arch}"} == kernels, arch
    bad = [f"{_id(r)}: {CR.problems(r)}" for r in committed if CR.problems(r)]
    assert not bad, "\n".join(bad[:20])


def test_no_spills(rows):
    bad = [f"{_id(r)}: {r['spill_bytes']} B spilled ({r['ptxas_spill']}), {r['registers']} registers"
           for r in rows if r["spill_bytes"] not in ("", 0)]
    assert not bad, "\n".join(bad)


def test_shared_memory_within_the_arch_limit(rows):
    bad = [f"{_id(r)}: {r['shared_bytes']} B > {r['shared_limit']} B" for r in rows
           if r["shared_bytes"] != "" and r["shared_bytes"] > r["shared_limit"]]
    assert not bad, "\n".join(bad)


def test_16bit_gemm_tiles_use_wgmma_on_sm90(rows):
    gemm = [r for r in rows if r["arch"] == "sm_90" and CR.is_gemm_config(r)]
    assert gemm, "no bf16 GEMM tile in the subset"
    bad = [f"{_id(r)}: {r['mma_all']}" for r in gemm if r["mma"] != "wgmma"]
    assert not bad, "\n".join(bad)


def test_reused_results_are_checked(rows):
    """Rows taken from the committed report (same kernel source, triton version and compile
    inputs) are spot-checked by compiling some of them again; none may differ."""
    origins = {r["origin"] for r in rows}
    assert origins <= {"compiled", "cached", "reused", "reused+checked"}, origins
    reused = [r for r in rows if r["origin"].startswith("reused")]
    if reused:
        assert sum(r["origin"] == "reused+checked" for r in reused) == min(VERIFY, len(reused))
    bad = [f"{_id(r)}: {r['status']}" for r in rows if r["status"].startswith("report mismatch")]
    assert not bad, "\n".join(bad)


_RANDOM_CONFIGS = """
import json, random, sys
from bench import compile_report as CR
rng = random.Random(int(sys.argv[1]))
archs = [int(a) for a in sys.argv[2].split(",")]
out = []
for _ in range(int(sys.argv[3])):
    d, a = rng.choice(CR.ALL_PAIRS)
    case = CR.Case(rng.choice([rng.randrange(16, 9000), 4096, 14336]), rng.choice([rng.randrange(16, 9000), 1024]),
                   rng.choice([rng.randrange(1, 200), rng.randrange(1, 20000)]), rng.randrange(1, 257), d, a,
                   *rng.choice(CR.FLAG_SETS), "random", rng.randrange(2))
    for arch in archs:
        for lc in CR.record(case, arch):
            job = CR.specialise(lc, arch)
            out.append([case.label, job["kernel"], f"sm_{arch}", job["config"], job["types"]])
print(json.dumps(out))
"""


def test_random_shapes_choose_compiled_configs(rows):
    """The sweep reaches every config the launchers choose: random layers (tokens 1–20000, odd
    dims, r 1–256, any dtype pair, flags, tf32) pick only (kernel, arch, constexprs, warps, stages,
    pointer dtypes) it compiled.
    (The launchers run in a fresh process, where the kernels are JIT functions.)"""
    compiled = {(r["kernel"], r["arch"], r["config"], r["types"]) for r in rows}
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _RANDOM_CONFIGS, "20261125", ",".join(map(str, ARCHS)), "60"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(chosen) > 60 * len(ARCHS) * 4
    missing = sorted({f"{key}: e.g. {label}" for label, *k in chosen if (key := tuple(k)) not in compiled})
    assert not missing, "configs the sweep missed:\n" + "\n".join(missing[:20])


def test_rules_flag_what_they_should():
    """The report's own checks (used above and in the committed report) catch each problem."""
    ok = {"kernel": "_fwd_kernel", "config": "BLOCK_N=128 BLOCK_M=128 w8 s4", "dtype": "bf16", "arch": "sm_90",
          "registers": 190, "spill_bytes": 0, "shared_bytes": 1000, "shared_limit": 2000, "mma": "wgmma",
          "num_warps": 8, "status": "ok"}
    assert CR.problems(ok) == []
    assert CR.problems({**ok, "spill_bytes": 48})[0].startswith("SPILL")
    assert CR.problems({**ok, "shared_bytes": 4000})[0].startswith("OVER SHARED")
    assert CR.problems({**ok, "mma": "mma"})[0].startswith("NO WGMMA")
    assert CR.problems({**ok, "mma": "mma", "arch": "sm_80"}) == []
    assert CR.problems({**ok, "mma": "mma", "config": "BLOCK_N=32 BLOCK_M=64 w4 s4"}) == []  # small-token tile
    assert CR.problems({**ok, "mma": "mma", "dtype": "fp32"}) == []


def test_autotune_candidates_keep_what_the_launchers_rely_on():
    """DORA_KERNELS_AUTOTUNE=1: the GEMM candidates start from the heuristic's config, are
    distinct, and the dx kernel keeps BLOCK_N (the launcher sizes the dA partials by it)."""
    from dora_kernels import heuristics as H

    bf16, h100 = torch.bfloat16, (9, 0)
    for name, cfg in (("_fwd_kernel", H.fwd_config(N=4096, M=4096, dtype=bf16, arch=h100, has_dropout=False)),
                      ("_dx_kernel", H.dx_config(N=4096, K=4096, dtype=bf16, arch=h100, has_dropout=False,
                                                 has_dx=True))):
        base = cfg.meta
        tuned = H.AUTOTUNED[name]
        got = tuned.candidates(dict(base))
        assert got[0] == base and len(got) > 1
        assert len({tuple(sorted(c.items())) for c in got}) == len(got)
        assert all(set(tuned.owned) <= set(c) for c in got)
        if name == "_dx_kernel":
            assert all(c["BLOCK_N"] == base["BLOCK_N"] for c in got)
            assert tuned.grid({"N": 300, "K": 1000, "BLOCK_N": 128, "BLOCK_K": 64}) == (3 * 16,)
            assert not tuned.applies({"HAS_DX": False})
        else:
            assert tuned.grid({"N": 300, "M": 1000, "BLOCK_N": 128, "BLOCK_M": 64}) == (3 * 16,)


def test_autotune_is_ignored_off_the_gpu(monkeypatch):
    from dora_kernels import runtime

    monkeypatch.setenv("DORA_KERNELS_AUTOTUNE", "1")
    assert not runtime._autotune_on({"x_ptr": torch.zeros(4, 8)})


def test_autotune_plumbing_gives_the_same_numbers(monkeypatch):
    """The autotuned launch (grid from the chosen config, the autotuner owning the tile keys)
    computes what the plain launch computes. Checked under the interpreter with one candidate
    (the heuristic's config): Triton benchmarks several only on a GPU."""
    from dora_kernels import backend, runtime
    from dora_kernels import heuristics as H

    if not backend.INTERPRET:
        pytest.skip("needs the interpreter (a CPU run)")
    import dora_kernels

    torch.manual_seed(0)
    x = torch.randn(70, 48, requires_grad=True)
    w = torch.randn(40, 48)
    A, B, m = torch.randn(8, 48, requires_grad=True), torch.randn(40, 8, requires_grad=True), torch.rand(40,
                                                                                                     requires_grad=True)

    def run():
        y = dora_kernels.dora_linear(x, w, A, B, m, 2.0)
        y.backward(torch.ones_like(y))
        grads = [t.grad.clone() for t in (x, A, B, m)]
        for t in (x, A, B, m):
            t.grad = None
        return [y.detach()] + grads

    plain = run()
    monkeypatch.setenv("DORA_KERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(runtime, "_autotune_on", lambda bound: True)  # launch() takes the autotune branch
    monkeypatch.setattr(runtime, "_TUNERS", {})
    for name, tuned in list(H.AUTOTUNED.items()):
        monkeypatch.setitem(H.AUTOTUNED, name, dataclasses.replace(tuned, candidates=lambda meta: [meta]))
    tuned = run()
    assert sorted(k[0] for k in runtime._TUNERS) == ["_dx_kernel", "_fwd_kernel"]
    for a, b in zip(plain, tuned):
        assert torch.equal(a, b)
