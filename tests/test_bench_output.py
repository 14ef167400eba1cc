"""Where the benchmark tools write: ``--out``, else ``./bench_results/<name>`` under the current
working directory, never beside their own source (inside site-packages on an install). And a
benchmark stopped part-way keeps the rows it measured."""

from __future__ import annotations

import csv
import json
import os

import pytest

import bench

BENCH_DIR = os.path.dirname(os.path.abspath(bench.__file__))
TINY = ["--device", "cpu", "--shapes", "32x48", "--ranks", "4", "--dtypes", "fp32", "--modes", "step",
        "--providers", "linear", "--no-model", "--no-plot", "--warmup-ms", "0", "--rep-ms", "0", "--min-reps", "1"]


def _tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The test runs in an empty working directory; bench/ is checked to be left as it was."""
    before = _tree(BENCH_DIR)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert [p for p in _tree(BENCH_DIR) if "__pycache__" not in p] == [p for p in before if "__pycache__" not in p]


def _only_folder(root):
    names = [n for n in os.listdir(root) if not n.startswith(".")]
    assert len(names) == 1, names
    return root / names[0]


def test_benchmark_writes_under_the_working_directory(in_tmp):
    from bench.run import main

    assert main([*TINY, "--tokens", "16"]) == 0
    root = in_tmp / "bench_results"
    out = _only_folder(root)
    assert out.name.startswith("cpu-")
    assert {"results.csv", "results.json", "table.txt"} <= set(os.listdir(out))
    assert (root / ".gitignore").read_text().splitlines()[-1] == "*"
    assert json.loads((out / "results.json").read_text())["meta"]["partial"] is False


def test_trace_writes_under_the_working_directory(in_tmp):
    from bench import trace

    assert trace.main(["--trace", "--quick", "--tokens", "16", "--providers", "linear"]) == 0
    out = in_tmp / "bench_results" / "trace_quick"
    assert {"trace.csv", "trace.md", "trace_constants.json"} <= set(os.listdir(out))


def test_compile_report_writes_under_the_working_directory(in_tmp, monkeypatch):
    from bench import compile_report as CR

    seen = {}
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # it refuses to start under the interpreter it cannot compile for
    monkeypatch.setattr(CR, "tools_available", lambda: True)
    monkeypatch.setattr(CR, "collect", lambda *a, **k: {})  # nothing is compiled here
    monkeypatch.setattr(CR, "compile_all", lambda *a, **k: [])
    monkeypatch.setattr(CR, "write", lambda rows, out_dir, **k: seen.setdefault("out", out_dir) and [])
    assert CR.main(["--arch", "90", "--quick"]) == 0
    assert seen["out"] == str(in_tmp / "bench_results" / "compile_report")


def test_acceptance_folders_are_under_the_working_directory(in_tmp):
    from bench import acceptance as A

    gpu = {"name": "NVIDIA H100 80GB HBM3", "arch": (9, 0), "sms": 132}
    full, quick = A.default_out(gpu), A.default_out(gpu, quick=True)
    for path in (full, quick):
        assert os.path.dirname(path) == str(in_tmp / "bench_results")
    assert os.path.basename(full).startswith("nvidia-h100-80gb-hbm3-")
    assert os.path.basename(quick).startswith("nvidia-h100-80gb-hbm3-quick-")


def test_a_stopped_benchmark_keeps_the_cases_it_measured(tmp_path, monkeypatch):
    from bench import run as R

    real, calls = R.Runner.run_case, []

    def run_case(self, rows, shape, tokens, *a, **k):
        calls.append(tokens)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process stopped from outside, say
        return real(self, rows, shape, tokens, *a, **k)

    monkeypatch.setattr(R.Runner, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        R.main([*TINY, "--tokens", "8,16", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["partial"] is True
    with open(tmp_path / "results.csv", newline="") as f:
        assert {r["tokens"] for r in csv.DictReader(f)} == {"8"}
    assert "N=8" in (tmp_path / "table.txt").read_text()
