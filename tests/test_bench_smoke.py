"""Smoke test of the benchmark driver (``bench.run.main``) on a tiny case: it runs, and the CSV
has the tidy columns and one row per provider × mode × metric."""

import csv
import importlib.util

import pytest

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


def _trainable_per_layer(preset, variant, r):
    """The trainable parameters of one decoder layer's seven adapted projections, counted from the
    Llama shapes: LoRA r·(in+out), DoRA + out (m), DVoRA r + 2·out (λ_d, λ_b, m), VeRA r + out."""
    head = preset.hidden // preset.heads
    q, kv = preset.heads * head, preset.kv_heads * head
    h, i = preset.hidden, preset.intermediate
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    per = {"peft_lora": lambda fin, out: r * (fin + out), "fused_dvora": lambda fin, out: r + 2 * out,
           "peft_vera": lambda fin, out: r + out}.get(variant, lambda fin, out: r * (fin + out) + out)
    return sum(per(fin, out) for fin, out in shapes)


def test_model_figure_runs_every_variant_with_trainable_counts(tmp_path):
    """The default model variants (DoRA/LoRA at r = 16; DVoRA, VeRA and fused DoRA at the trace's
    DVoRA rank) build and step on the tiny preset (the op's torch path), and their trainable
    parameters are counted in the CSV and the table."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import dora_kernels
    from bench import model as M
    from bench.trace import DVORA_R

    preset = M.PRESETS["tiny"]
    variants = ("fused", "peft_dora", "peft_lora", "fused_dvora", "peft_vera", f"fused_r{DVORA_R}")
    assert M.default_variants(preset) == variants and preset.dvora_r == DVORA_R
    with dora_kernels.use_backend("torch"):  # the interpreter would take minutes over the model
        rc = main(["--device", "cpu", "--model", "--model-preset", "tiny", "--no-plot", "--warmup-ms", "0",
                   "--rep-ms", "0", "--min-reps", "1", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["mode"] == "model-step"]
    got = {(r["provider"], r["metric"]) for r in rows}
    lines = (tmp_path / "table.txt").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    assert lines[header].split()[:3] == ["variant", "r", "trainable"]
    table = {line.split()[0]: line.split() for line in lines[header + 2:header + 2 + len(variants)]}
    for v in variants:
        r = M.rank(preset, v)
        want = preset.layers * _trainable_per_layer(preset, v, r)
        assert {(v, "time"), (v, "saved_mem"), (v, "trainable_params")} <= got, (v, sorted(got))
        (count,) = [float(x["median"]) for x in rows if x["provider"] == v and x["metric"] == "trainable_params"]
        assert count == want, (v, count, want)
        assert {int(x["r"]) for x in rows if x["provider"] == v} == {r}
        assert table[v][1:3] == [str(r), f"{want:,}"], table[v]
    # ratios against the PEFT variant of the same method and rank only, and the DVoRA step over fused DoRA's
    assert {("fused", "speedup_vs_peft_dora"), ("fused", "speedup_vs_peft_lora"),
            ("fused_dvora", "speedup_vs_peft_vera"), ("fused_dvora", "over_fused"),
            (f"fused_r{DVORA_R}", "over_fused")} <= got, sorted(got)
    assert not {m for p, m in got if p == f"fused_r{DVORA_R}" and m.startswith("speedup")}
    assert not {m for p, m in got if p == "fused_dvora" and m in ("speedup_vs_peft_dora", "speedup_vs_peft_lora")}


def test_model_trainable_parameters_are_the_adapters():
    """What the counts count: DVoRA trains λ_d, λ_b and m per layer, VeRA λ_d and λ_b (its
    shared projections frozen), so a model's count is the layer formula above."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import torch

    import dora_kernels
    from bench import model as M

    preset = M.PRESETS["tiny"]
    kinds = {"fused_dvora": {"dvora_lambda_d", "dvora_lambda_b", "dvora_magnitude"},
             "peft_vera": {"vera_lambda_d", "vera_lambda_b"}}
    for variant, names in kinds.items():
        with dora_kernels.use_backend("torch"):  # DVoRA's init takes m = ‖V‖ rows (interpreted: ~8 s)
            model, _ = M.build(preset, variant, torch.float32, "cpu")
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert {n.split(".")[-2] for n, _ in trained} == names, variant
        want = preset.layers * _trainable_per_layer(preset, variant, preset.dvora_r)
        assert sum(p.numel() for _, p in trained) == want, variant


def test_model_variants_option(tmp_path):
    """--model-variants picks the variants (fused_r<R>: fused DoRA at rank R); an unknown one is an error."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import dora_kernels

    args = ["--device", "cpu", "--model", "--model-preset", "tiny", "--no-plot", "--warmup-ms", "0", "--rep-ms", "0",
            "--min-reps", "1", "--out", str(tmp_path)]
    assert main([*args, "--model-variants", "fused,nope"]) == 2
    with dora_kernels.use_backend("torch"):
        assert main([*args, "--model-variants", "peft_vera,fused_r8", "--model-dvora-r", "32"]) == 0
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["provider"], r["r"]) for r in rows} == {("peft_vera", "32"), ("fused_r8", "8")}
