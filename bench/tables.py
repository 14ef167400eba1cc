"""The benchmarks' tables, in one place: dtypes, providers and modes, shapes and token counts, GPUs,
and where results go by default.

The timed benchmark (``bench/run.py``, ``bench/shapes.py``, ``bench/providers.py``), the dry-run
trace (``bench/trace.py``), the compile report (``bench/compile_report.py``) and the GPU
acceptance run (``bench/acceptance.py``) all read them from here; nothing else in ``bench/``
declares a dtype, a provider list, a model shape or a GPU figure of its own.
"""

from __future__ import annotations

import os

import torch

# ---------------------------------------------------------------------------------------------
# dtypes

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHORT = {v: k for k, v in DTYPES.items()}
HALF = (torch.float16, torch.bfloat16)  # the tensor-core dtypes (the matmul peak of ``GPUS``)
# (x / weight / bias dtype, adapters' dtype): same dtype, and 16-bit bases with fp32 adapters (PEFT's
# default on a half-precision model)
DTYPE_PAIRS = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp32")]
# every pair the op accepts on the Triton path (x/weight/bias share a dtype; the adapters may differ)
ALL_PAIRS = [(d, a) for d in ("fp32", "fp16", "bf16") for a in ("fp32", "fp16", "bf16")]


def dtype_of(name: str) -> torch.dtype:
    """``"bf16"`` → ``torch.bfloat16`` (``DTYPES``); ValueError naming the choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: one of {', '.join(DTYPES)}")
    return DTYPES[name]


def short_dtype(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bf16"``; any other dtype as torch prints it."""
    return SHORT.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------------
# providers and modes (bench/providers.py builds them; bench/README.md says what each runs)

PROVIDERS = ("fused", "fused_peft", "reference", "compiled", "peft_dora", "peft_lora", "linear")
# DVoRA (DoRA over VeRA) on the fused op and PEFT's VeRA: asked for by name (``--providers``)
DVORA_PROVIDERS = ("fused_dvora", "peft_vera")
FLOOR = "linear"  # a frozen nn.Linear: forward and input gradient, the floor no DoRA layer can beat
RATIO_PROVIDERS = ("fused", "fused_peft")  # the providers whose ratios to the floor and the peers are reported
# the dry-run trace runs every provider but torch.compile (which does not run on meta tensors)
TRACE_PROVIDERS = tuple(p for p in PROVIDERS if p != "compiled")
# QDoRA over a bitsandbytes 4-bit base (``QDORA_FORMAT``): PEFT's DoRA layer (what PEFT runs today),
# the same after ``dora_kernels.fuse``, PEFT's LoRA (QLoRA) and the frozen ``Linear4bit`` (forward and
# input gradient: the floor); asked for by name (``--providers``) or all four (``--qdora``)
QDORA_PROVIDERS = ("peft_qdora", "fused_qdora", "peft_qlora", "qlora_floor")
QDORA_FLOOR = "qlora_floor"
# each QDoRA provider's place among the DoRA providers (the ratio columns and report.ratios use the latter)
QDORA_ROLES = {"fused_qdora": "fused", "peft_qdora": "peft_dora", "peft_qlora": "peft_lora", "qlora_floor": FLOOR}
# the 4-bit format: nf4, double quantisation (absmax in uint8, bitsandbytes' nested blocks of 256),
# blocksize 64, uint8 storage; the compute dtype is the run's dtype (bf16 on a GPU and in the trace)
QDORA_FORMAT = dict(quant_type="nf4", compress_statistics=True, blocksize=64, quant_storage=torch.uint8)
QDORA_STEP_TOKENS = (4096,)  # the trace's --qdora step target
QDORA_EVAL_TOKENS = (1, 16, 64, 256)  # and its eval-forward target
ALL_PROVIDERS = PROVIDERS + DVORA_PROVIDERS + QDORA_PROVIDERS
MODES = ("fwd", "bwd", "step", "eval")

# layers other than Linear (``--layers``): a PEFT Conv2d / Embedding DoRA layer after
# ``dora_kernels.fuse`` (``fused``), unfused (``peft_dora``), PEFT's LoRA (``peft_lora``) and the
# frozen base layer, the floor (``base``: a frozen nn.Conv2d takes forward and input gradient; a
# frozen nn.Embedding has no backward at all, its step is the lookup)
LAYER_KINDS = ("linear", "conv", "embedding")
KIND_PROVIDERS = ("fused", "peft_dora", "peft_lora", "base")
KIND_FLOOR = "base"
# (name, kind, sizes): conv: batch, in channels, out channels, kernel, padding, height = width;
# embedding: batch, sequence, vocab, dim. "tokens" in the tables: output positions (batch·H·W) or ids.
KIND_SHAPES = {
    "conv": ("sd-unet.conv3x3", dict(batch=2, in_ch=320, out_ch=320, kernel=3, padding=1, size=64)),
    "embedding": ("llama3.embed", dict(batch=1, seq=4096, vocab=128256, dim=4096)),
}
KIND_CPU_SHAPES = {  # what a CPU run of the timed benchmark uses (it checks the suite runs)
    "conv": ("conv3x3-tiny", dict(batch=2, in_ch=16, out_ch=16, kernel=3, padding=1, size=8)),
    "embedding": ("embed-tiny", dict(batch=1, seq=64, vocab=512, dim=64)),
}


# ---------------------------------------------------------------------------------------------
# shapes (``in → out`` of the projections of the models people fine-tune) and token counts

def _model(hidden, intermediate, heads, kv_heads, head_dim):
    q = heads * head_dim
    kv = kv_heads * head_dim
    return {"q": (hidden, q), "k": (hidden, kv), "v": (hidden, kv), "o": (q, hidden),
            "gate": (hidden, intermediate), "up": (hidden, intermediate), "down": (intermediate, hidden)}


MODELS = {
    "llama3-8b": _model(4096, 14336, 32, 8, 128),  # Llama-3-8B
    "qwen2.5-7b": _model(3584, 18944, 28, 4, 128),  # Qwen2.5-7B
    "70b": {"up": (8192, 28672)},  # the Llama-3-70B up-projection
}

# CPU-sized stand-ins: an up-like and a down-like projection (CPU bf16 matmuls are slow; fp32).
CPU_SHAPES = {"cpu.up": (256, 512), "cpu.down": (512, 256), "cpu.square": (1024, 1024)}


def projections(model: str) -> list:
    """[(joined projection names, in, out)]: the distinct ``in → out`` of a model, in order
    (``[("q/o", 4096, 4096), ("k/v", 4096, 1024), ...]`` for ``llama3-8b``)."""
    by_shape: dict = {}
    for proj, dims in MODELS[model].items():
        by_shape.setdefault(dims, []).append(proj)
    return [("/".join(projs), i, o) for (i, o), projs in by_shape.items()]


# the dry-run trace's layers, (name, in, out): Llama-3-8B's projections and the 70B up-projection
TRACE_SHAPES = ([(f"8B-{p}", i, o) for p, i, o in projections("llama3-8b")]
                + [(f"70B-{p}", i, o) for p, i, o in projections("70b")])
TRACE_QUICK_SHAPES = [s for s in TRACE_SHAPES if s[0] in ("8B-q/o", "70B-up")]

TOKENS = (1, 16, 256, 4096, 16384)  # the GPU sweep and the trace: decode, small and large batches
GPU_QUICK_TOKENS = (256, 4096)
TRACE_QUICK_TOKENS = (1, 256, 4096, 16384)
CPU_TOKENS = (64, 512, 2048)
CPU_QUICK_TOKENS = (64, 512)
# the compile report's benchmark cases: the trace's layers at the sweep's token counts and 64
# (one more tile bucket)
COMPILE_SHAPES = [(i, o) for _, i, o in TRACE_SHAPES]
COMPILE_TOKENS = tuple(sorted(set(TOKENS) | {64}))


# ---------------------------------------------------------------------------------------------
# GPUs

LAUNCH_S = 4e-6  # the overhead the trace charges per launch (launch latency and tail), every GPU

# Every GPU the suite knows, by name. ``match``: substrings of ``torch.cuda.get_device_name()``
# (the longest that matches names the device: "H100 PCIe" before "H100"); ``arch``, ``sms``: what
# the dry runs plan for; ``bw_nominal``: data-sheet HBM bytes/s (the norm mode's fraction where the
# driver reports no memory clock). Rows with peaks are the ones the trace predicts for, in this
# order: ``mm`` dense bf16/fp16 tensor-core matmul FLOP/s, ``fp32`` the CUDA cores (fp32 matmuls
# without tf32 and every other FLOP), ``bw`` HBM bytes/s; ``*_nominal`` is the data sheet, the
# plain key the reachable figure the prediction uses (DORA_SPEC.md's 700 TFLOP/s and 2.8 TB/s on an
# H100), ``launch_s`` the per-launch overhead. A row without peaks is predicted with the peaks of
# its ``predict_as`` row (``predict_key``).
GPUS = {
    "H100-SXM": {"match": ("H100",), "arch": (9, 0), "sms": 132, "mm_nominal": 989e12, "mm": 700e12,
                 "fp32_nominal": 67e12, "fp32": 50e12, "bw_nominal": 3.35e12, "bw": 2.8e12, "launch_s": LAUNCH_S},
    "H200": {"match": ("H200",), "arch": (9, 0), "sms": 132, "mm_nominal": 989e12, "mm": 700e12,
             "fp32_nominal": 67e12, "fp32": 50e12, "bw_nominal": 4.8e12, "bw": 4.0e12, "launch_s": LAUNCH_S},
    "A100-SXM": {"match": ("A100-SXM4-80GB",), "arch": (8, 0), "sms": 108, "mm_nominal": 312e12, "mm": 230e12,
                 "fp32_nominal": 19.5e12, "fp32": 15e12, "bw_nominal": 2.039e12, "bw": 1.6e12, "launch_s": LAUNCH_S},
    "H100-NVL": {"match": ("H100 NVL",), "arch": (9, 0), "sms": 132, "bw_nominal": 3.9e12, "predict_as": "H100-SXM"},
    "H100-PCIe": {"match": ("H100 PCIe",), "arch": (9, 0), "sms": 114, "bw_nominal": 2.0e12,
                  "predict_as": "H100-SXM"},
    "A100-PCIe-80GB": {"match": ("A100 80GB PCIe",), "arch": (8, 0), "sms": 108, "bw_nominal": 1.935e12,
                       "predict_as": "A100-SXM"},
    "A100-40GB": {"match": ("A100",), "arch": (8, 0), "sms": 108, "bw_nominal": 1.555e12, "predict_as": "A100-SXM"},
    "L40S": {"match": ("L40S",), "arch": (8, 9), "sms": 142, "bw_nominal": 0.864e12},
}
PREDICTED_GPUS = tuple(k for k, v in GPUS.items() if "mm" in v)

# The SM count the compile report plans an sm_<arch> compile for (a typical part of that arch:
# 80 A100, 86 A40, 89 RTX 4090, 90 H100 SXM / H200, 100 B200, 120 RTX 5080).
ARCH_SMS = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 84}


def gpu_key(device_name: str) -> str | None:
    """The ``GPUS`` row of a ``torch.cuda.get_device_name()``, or None (no row matches)."""
    hits = [(len(m), k) for k, v in GPUS.items() for m in v["match"] if m in device_name]
    return max(hits)[1] if hits else None


def predict_key(device_name: str) -> str:
    """The ``PREDICTED_GPUS`` row whose peaks predict for this device (the first one when no row
    names it or its row has no peaks and no ``predict_as``)."""
    key = gpu_key(device_name)
    if key is not None and key in PREDICTED_GPUS:
        return key
    return GPUS.get(key, {}).get("predict_as") or PREDICTED_GPUS[0]


def nominal_bandwidth(device_name: str) -> float | None:
    """The data-sheet HBM bandwidth (bytes/s) of the device's ``GPUS`` row, or None."""
    key = gpu_key(device_name)
    return GPUS[key]["bw_nominal"] if key is not None else None


# ---------------------------------------------------------------------------------------------
# output

# Every tool in bench/ writes where ``--out`` says; without it, under this folder of the current
# working directory, never next to its own source (which an install puts in site-packages). The
# committed results under bench/results/ are made by passing ``--out bench/results/...``.
RESULTS_ROOT = "bench_results"
_ROOT_GITIGNORE = "# default output of python -m bench and its tools; not committed (--out bench/results/... is)\n*\n"


def default_out(name: str) -> str:
    """``./bench_results/<name>`` (absolute, under the current working directory). The root gets a
    ``.gitignore`` of ``*`` the first time, so default runs inside a checkout stay out of git."""
    root = os.path.abspath(RESULTS_ROOT)
    os.makedirs(root, exist_ok=True)
    ignore = os.path.join(root, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w") as f:
            f.write(_ROOT_GITIGNORE)
    return os.path.join(root, name)
