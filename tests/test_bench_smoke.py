"""Smoke test of the benchmark driver (``bench.run.main``) on a tiny case: it runs, and the CSV
has the tidy columns and one row per provider × mode × metric."""

import csv
import importlib.util

from bench.report import COLUMNS
from bench.run import main


def test_bench_main_writes_tidy_csv(tmp_path):
    rc = main(["--device", "cpu", "--shapes", "32x48", "--tokens", "16", "--ranks", "4", "--dtypes", "fp32",
               "--modes", "step", "--providers", "fused,linear", "--no-model", "--warmup-ms", "0", "--rep-ms", "0",
               "--min-reps", "1", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    got = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    want = {(p, "step", m) for p in ("fused", "linear") for m in ("time", "tflops", "saved_mem")}
    want.add(("fused", "step", "over_floor"))
    assert got == want, f"rows: {sorted(got)}"
    assert len(rows) == len(want)
    for r in rows:
        assert (r["name"], r["tokens"], r["in_features"], r["out_features"], r["r"], r["dtype"]) == \
            ("32x48", "16", "32", "48", "4", "fp32")
        assert float(r["p20"]) <= float(r["median"]) <= float(r["p80"])
        assert float(r["median"]) > 0
    assert (tmp_path / "results.json").exists()
    assert "32→48" in (tmp_path / "table.txt").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "ratios.png").stat().st_size > 0


def test_bench_conv_and_embedding_layers_run(tmp_path):
    rc = main(["--device", "cpu", "--layers", "conv,embedding", "--ranks", "4", "--dtypes", "fp32", "--modes",
               "fwd,step", "--no-model", "--warmup-ms", "0", "--rep-ms", "0", "--min-reps", "1", "--no-plot",
               "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name in ("conv3x3-tiny", "embed-tiny"):
        got = {(r["provider"], r["mode"], r["metric"]) for r in rows if r["name"] == name}
        for p in ("fused", "peft_dora", "peft_lora", "base"):
            assert (p, "step", "time") in got, (name, p)
        assert ("fused", "step", "over_floor") in got
        assert ("fused", "step", "speedup_vs_peft_dora") in got
        assert all(float(r["median"]) > 0 for r in rows if r["name"] == name and r["metric"] == "time")
