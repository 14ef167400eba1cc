"""Tidy rows, the CSV/JSON files, the stdout tables and the ratio plots.

One row per provider × mode × shape × metric (Liger's layout). Metrics:

==========================  ========  =========================================================
metric                      unit      meaning
==========================  ========  =========================================================
time                        ms        run time of one call (median, p20, p80)
tflops                      TFLOP/s   counted FLOPs (``bench.flops``) / time (p20 from p80 time)
peak_mem                    MiB       GPU: peak allocated during a step, above what was held
saved_mem                   MiB       bytes saved for backward + output (``bench.timing``)
speedup_vs_peft_dora        x         PEFT DoRA time / this provider's time   (higher is better)
speedup_vs_peft_lora        x         PEFT LoRA time / this provider's time   (≥ 1: no slower)
speedup_vs_peft_vera        x         PEFT VeRA time / this variant's time (the model figure)
over_floor                  x         this provider's time / the frozen nn.Linear's time
mem_vs_peft_lora            x         this provider's step memory / PEFT LoRA's (peak on GPU,
                                      saved on CPU)
over_fused                  x         the model figure: this variant's step time / ``fused``'s
                                      (fused DoRA at the preset's r)
trainable_params            params    the model figure: parameters with requires_grad
==========================  ========  =========================================================

Ratios are given for ``fused`` and ``fused_peft`` (the model figure: the fused variants, each
against the PEFT variants at its own rank, and ``over_fused``); their p20/p80 pair the
numerator's p20/p80 with the denominator's p80/p20 (a conservative band).
"""

from __future__ import annotations

import csv
import json
import os
import textwrap

from .tables import RATIO_PROVIDERS

COLUMNS = ["name", "provider", "mode", "metric", "unit", "tokens", "in_features", "out_features", "r", "dtype",
           "median", "p20", "p80", "device", "torch", "triton", "cuda", "timestamp", "adapter_dtype", "fused_path"]

MiB = 1 << 20
# (metric, label, target, higher is better)
RATIOS = [
    ("speedup_vs_peft_dora", "speedup vs PEFT DoRA (×)", 2.5, True),
    ("speedup_vs_peft_lora", "speedup vs PEFT LoRA (×)", 1.0, True),
    ("over_floor", "time / frozen nn.Linear (×)", 1.15, False),
    ("mem_vs_peft_lora", "step memory / PEFT LoRA's (×)", 1.05, False),
]


def _div(a, b):
    return a / b if a is not None and b else None


def ratios(res: dict, provider: str, mode: str, *, mem_key: str) -> dict:
    """{metric: (median, p20, p80)} of ``provider`` against the peers in ``res``
    (``res[(provider, mode)] = {"time": (med, p20, p80), "peak": bytes, "saved": bytes}``)."""
    out = {}
    me = res.get((provider, mode))
    if me is None:
        return out
    t = me["time"]
    for peer, metric in (("peft_dora", "speedup_vs_peft_dora"), ("peft_lora", "speedup_vs_peft_lora"),
                         ("peft_vera", "speedup_vs_peft_vera")):
        other = res.get((peer, mode))
        if other is not None:
            o = other["time"]
            out[metric] = (o[0] / t[0], o[1] / t[2], o[2] / t[1])
    floor = res.get(("linear", mode))
    if floor is not None:
        f = floor["time"]
        out["over_floor"] = (t[0] / f[0], t[1] / f[2], t[2] / f[1])
    lora = res.get(("peft_lora", mode))
    if lora is not None and me.get(mem_key) is not None and lora.get(mem_key):
        r = me[mem_key] / lora[mem_key]
        out["mem_vs_peft_lora"] = (r, r, r)
    return out


class Rows:
    """Collects tidy rows; ``common`` holds the per-run columns (device, versions, timestamp…)."""

    def __init__(self, common: dict):
        self.common = common
        self.rows: list[dict] = []

    def add(self, *, name, provider, mode, metric, unit, tokens, in_features, out_features, r, dtype, median,
            p20=None, p80=None, adapter_dtype=""):
        row = dict(name=name, provider=provider, mode=mode, metric=metric, unit=unit, tokens=tokens,
                   in_features=in_features, out_features=out_features, r=r, dtype=dtype, median=median,
                   p20=median if p20 is None else p20, p80=median if p80 is None else p80)
        row.update(self.common)
        row["adapter_dtype"] = adapter_dtype
        self.rows.append({k: row.get(k, "") for k in COLUMNS})

    def write(self, out_dir: str, meta: dict) -> tuple[str, str]:
        os.makedirs(out_dir, exist_ok=True)
        csv_path = os.path.join(out_dir, "results.csv")
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        json_path = os.path.join(out_dir, "results.json")
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": self.rows}, f, indent=1)
        return csv_path, json_path


# ---------------------------------------------------------------------------------------------
# stdout tables

def fmt(v, digits=4):
    if v is None:
        return "—"
    return f"{v:.{digits}g}"


def _grid(header: list, body: list) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [line(header), "-" * len(line(header))] + [line(r) for r in body]


def case_table(title: str, res: dict, providers: list, modes: list, flops: dict, *, mem_key: str,
               mem_label: str, names: dict | None = None, ratio_labels=("×PEFT-DoRA", "×PEFT-LoRA", "/floor")) -> str:
    """One case's block: per mode the median ms (TFLOP/s) of each provider, then fused's ratios;
    a memory line for the step. ``names``: the column title of a provider where it is not its key
    (the QDoRA providers keyed by their DoRA roles); ``ratio_labels``: the ratio columns' titles."""
    header = ["mode"] + [(names or {}).get(p, p) for p in providers] + list(ratio_labels)
    body = []
    for mode in modes:
        row = [mode]
        for p in providers:
            r = res.get((p, mode))
            if r is None:
                row.append("—")
            else:
                ms = r["time"][0]
                tf = flops[(p, mode)] / (ms * 1e-3) / 1e12
                row.append(f"{fmt(ms)} ({fmt(tf, 3)})")
        rat = ratios(res, "fused", mode, mem_key=mem_key)
        keys = ("speedup_vs_peft_dora", "speedup_vs_peft_lora", "over_floor")
        row += [fmt(rat.get(k, (None,))[0], 3) for k in keys]
        body.append(row)
    if "step" in modes:
        row = [f"mem ({mem_label}, MiB)"]
        for p in providers:
            r = res.get((p, "step"))
            row.append(fmt(r[mem_key] / MiB, 4) if r is not None and r.get(mem_key) is not None else "—")
        rat = ratios(res, "fused", "step", mem_key=mem_key).get("mem_vs_peft_lora")
        row += [f"mem/LoRA {fmt(rat[0], 3)}" if rat else "", "", ""]
        body.append(row)
    return "\n".join([title] + _grid(header, body))


# the model figure's ratios: (metric, column title, the variant it divides by)
MODEL_RATIOS = [
    ("speedup_vs_peft_dora", "×PEFT-DoRA", "peft_dora"),
    ("speedup_vs_peft_lora", "×PEFT-LoRA", "peft_lora"),
    ("speedup_vs_peft_vera", "×PEFT-VeRA", "peft_vera"),
    ("over_fused", "/fused", "fused"),
    ("mem_vs_peft_lora", "mem/LoRA", "peft_lora"),
]


VERA_VARIANTS = ("fused_dvora", "peft_vera")  # the model figure's VeRA family; the others are LoRA/DoRA


def model_ratios(res: dict, variant: str, *, mem_key: str) -> dict:
    """{metric: (median, p20, p80)} of model variant ``variant`` (``res[v] = {"time", mem_key, "r",
    ...}``, ``bench.model.run``): its speedups and memory against the PEFT variants of its own
    family (PEFT DoRA/LoRA for the DoRA variants, PEFT VeRA for DVoRA) at its own rank, and
    ``over_fused``, its step time over ``fused``'s (fused DoRA at the preset's r, the DVoRA
    target's denominator) for every other variant."""
    me = res.get(variant)
    if me is None:
        return {}
    peers = {m: peer for m, _, peer in MODEL_RATIOS}

    def alike(peer):  # the same method family (LoRA/DoRA or VeRA/DVoRA) at the same rank
        return (peer in VERA_VARIANTS) == (variant in VERA_VARIANTS) and res[peer].get("r") == me.get("r")
    out = {m: v for m, v in ratios({(k, "step"): x for k, x in res.items()}, variant, "step", mem_key=mem_key).items()
           if m in peers and alike(peers[m])}
    fused = res.get("fused")
    if fused is not None and variant != "fused":
        t, f = me["time"], fused["time"]
        out["over_fused"] = (t[0] / f[0], t[1] / f[2], t[2] / f[1])
    return out


def count(n) -> str:
    """A parameter count in short form: 8448 → 8.45k, 1198464 → 1.2M."""
    if n is None:
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def model_table(title: str, res: dict, variants: list, *, mem_key: str, mem_label: str) -> str:
    """Per variant: its rank, trainable parameters, step time (median, p20, p80), memory and the
    ratios of ``model_ratios`` (a column only where some variant has it)."""
    rats = {v: model_ratios(res, v, mem_key=mem_key) for v in variants}
    cols = [(m, label) for m, label, _ in MODEL_RATIOS if any(m in r for r in rats.values())]
    header = ["variant", "r", "trainable", "step ms", "p20", "p80", f"{mem_label} MiB"] + [c for _, c in cols]
    body = []
    for v in variants:
        r = res.get(v)
        if r is None:
            body.append([v] + ["—"] * (len(header) - 1))
            continue
        mem = r.get(mem_key)
        body.append([v, r.get("r", "—"), f"{r['trainable']:,}" if r.get("trainable") is not None else "—",
                     fmt(r["time"][0]), fmt(r["time"][1]), fmt(r["time"][2]),
                     fmt(mem / MiB) if mem is not None else "—"]
                    + [fmt(rats[v][m][0], 3) if m in rats[v] else "—" for m, _ in cols])
    return "\n".join([title] + _grid(header, body))


# ---------------------------------------------------------------------------------------------
# plots

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ratios(rows: list, path: str) -> str | None:
    """ratios.png: per mode (rows) and ratio (columns), the fused providers' ratios against the
    token count, one line per shape × r × dtype (solid: fused, dashed: fused_peft), targets
    dashed grey. Returns a note if nothing was drawn."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed: no plot (pip install matplotlib, or the 'bench' extra)"
    layer = [r for r in rows if r["provider"] in RATIO_PROVIDERS and r["mode"] in ("fwd", "bwd", "step", "eval")
             and r["metric"] in {m for m, *_ in RATIOS}]
    if not layer:
        return "no ratio to plot (the ratios need fused and at least one of peft_dora, peft_lora, linear)"
    modes = [m for m in ("fwd", "bwd", "step", "eval") if any(r["mode"] == m for r in layer)]
    metrics = [m for m in RATIOS if any(r["metric"] == m[0] for r in layer)]
    fig, axes = plt.subplots(len(modes), len(metrics), figsize=(4.2 * len(metrics), 3.1 * len(modes)),
                             squeeze=False)
    series = sorted({(r["name"], r["in_features"], r["out_features"], r["r"], r["dtype"]) for r in layer},
                    key=lambda s: (s[0], s[3], s[4]))
    colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    handles = {}
    for i, mode in enumerate(modes):
        for j, (metric, label, target, higher) in enumerate(metrics):
            ax = axes[i][j]
            drawn = False
            for k, key in enumerate(series):
                for prov, style in (("fused", "-"), ("fused_peft", "--")):
                    pts = sorted((int(r["tokens"]), r["median"], r["p20"], r["p80"]) for r in layer
                                 if r["provider"] == prov and r["mode"] == mode and r["metric"] == metric
                                 and (r["name"], r["in_features"], r["out_features"], r["r"], r["dtype"]) == key)
                    if not pts:
                        continue
                    xs, ys, lo, hi = zip(*pts)
                    h, = ax.plot(xs, ys, style, marker="o", ms=3, color=colors(k % colors.N))
                    ax.fill_between(xs, lo, hi, color=colors(k % colors.N), alpha=0.12, lw=0)
                    if prov == "fused":
                        handles[f"{key[0]} {key[1]}→{key[2]} r{key[3]} {key[4]}"] = h
                    drawn = True
            if not drawn:
                ax.axis("off")
                continue
            ax.axhline(target, color="grey", ls=":", lw=1)
            if metric != "mem_vs_peft_lora" or mode == "step":
                ax.annotate(f"target {'≥' if higher else '≤'} {target:g} (GPU)", (0.02, 0.93),
                            xycoords="axes fraction", fontsize=7, color="grey", va="top")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}: {label}", fontsize=9)
            ax.set_xlabel("tokens", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    meta = rows[0]
    fig.suptitle(f"dora_kernels vs PEFT and the floor — {meta['device']} · torch {meta['torch']} · "
                 f"fused path: {meta['fused_path']}  (solid: fused; dashed: fused via fuse() on PEFT)", fontsize=10)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)), fontsize=7,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * ((len(handles) - 1) // 4), 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


MODEL_COLORS = {"fused": "tab:green", "peft_dora": "tab:red", "peft_lora": "tab:blue", "fused_dvora": "tab:purple",
                "peft_vera": "tab:orange"}  # fused_r<R>: olive


def model_label(v: str, r: dict) -> str:
    """A bar's label: the variant, its rank and trainable parameters (``count``)."""
    return f"{v}\nr={r.get('r', '?')}\n{count(r.get('trainable'))} trainable"


def plot_model(title: str, res: dict, variants: list, path: str, *, mem_key: str, mem_label: str) -> str | None:
    """model.png: step time and memory of each model variant (bars, p20–p80 whiskers), each bar
    labelled with the variant's rank and trainable parameters."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed: no model plot"
    vs = [v for v in variants if v in res]
    if not vs:
        return "no model result to plot"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(9.0, 2.0 * len(vs)), 3.8))
    labels = [model_label(v, res[v]) for v in vs]
    colors = [MODEL_COLORS.get(v, "tab:olive") for v in vs]
    med = [res[v]["time"][0] for v in vs]
    err = [[m - res[v]["time"][1] for v, m in zip(vs, med)], [res[v]["time"][2] - m for v, m in zip(vs, med)]]
    a1.bar(labels, med, yerr=err, color=colors, capsize=3)
    a1.set_ylabel("step time (ms)")
    mems = [(res[v].get(mem_key) or 0) / MiB for v in vs]
    a2.bar(labels, mems, color=colors)
    a2.set_ylabel(f"{mem_label} (MiB)")
    for ax in (a1, a2):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
