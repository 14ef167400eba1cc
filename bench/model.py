"""The model-level figure: one training step of a small Llama-shaped model with adapters.

A ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` (random weights, nothing
downloaded), adapters on q/k/v/o/gate/up/down through ``peft.get_peft_model`` (no dropout;
adapters in fp32 on a bf16/fp16 model, PEFT's default). Variants (``default_variants``; any
subset in any order, ``python -m bench --model-variants``):

- ``peft_dora``: PEFT's DoRA as it comes, r = ``Preset.r`` (16), alpha = 2r;
- ``fused``: the same model after ``dora_kernels.fuse(model)``;
- ``peft_lora``: PEFT's plain LoRA of the same rank;
- ``fused_dvora``: ``dora_kernels.DVoRAConfig`` at r = ``Preset.dvora_r`` (``bench.trace.DVORA_R``,
  256: the trace's DVoRA rank) — DoRA over VeRA's frozen shared projections on the fused op;
- ``peft_vera``: PEFT's ``VeraConfig`` at the same r (one shared ``vera_A (r, max in)`` /
  ``vera_B (max out, r)`` for the model, sliced per layer);
- ``fused_r<R>``: fused DoRA at rank R (``fused_r256`` in the default list: DoRA at DVoRA's r).

Trainable parameters per adapted layer (in → out): LoRA r·(in + out), DoRA r·(in + out) + out,
DVoRA r + 2·out (λ_d, λ_b, m), VeRA r + out (λ_d, λ_b); each variant reports the model's total.

A step is ``model(input_ids, labels=input_ids).loss.backward()`` (embedding, attention, MLP,
LM head and cross-entropy included), batch × seq tokens. Reported: step time, and memory —
the GPU's peak above what the model held before the step, or on a CPU the saved-for-backward
bytes of the forward (see ``bench.timing``).
"""

from __future__ import annotations

import gc
import re
import warnings
from dataclasses import dataclass

import torch

from .timing import bench, peak_bytes, saved_bytes
from .trace import DVORA_R

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_VARIANTS = ("fused", "peft_dora", "peft_lora")  # at Preset.r
DVORA_VARIANTS = ("fused_dvora", "peft_vera")  # at Preset.dvora_r
_FUSED_R = re.compile(r"fused_r([1-9][0-9]*)")


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq: int
    batch: int = 1
    r: int = 16  # LoRA / DoRA rank of fused, peft_dora, peft_lora
    dvora_r: int = DVORA_R  # rank of fused_dvora, peft_vera

    @property
    def name(self) -> str:
        return f"llama-h{self.hidden}-L{self.layers}-s{self.seq}"


PRESETS = {
    "tiny": Preset(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2, vocab=512, seq=128),
    "mini": Preset(hidden=1024, intermediate=2816, layers=2, heads=8, kv_heads=2, vocab=32000, seq=1024),
    "small": Preset(hidden=2048, intermediate=5632, layers=4, heads=16, kv_heads=4, vocab=32000, seq=2048),
}


def default_variants(preset: Preset) -> tuple:
    """The variants a run measures unless told: the three at r, DVoRA and VeRA at dvora_r, and
    fused DoRA at dvora_r."""
    return LORA_VARIANTS + DVORA_VARIANTS + (f"fused_r{preset.dvora_r}",)


def rank(preset: Preset, variant: str) -> int:
    """The adapter rank of ``variant``; ValueError if it is no variant."""
    if variant in LORA_VARIANTS:
        return preset.r
    if variant in DVORA_VARIANTS:
        return preset.dvora_r
    m = _FUSED_R.fullmatch(variant)
    if m:
        return int(m.group(1))
    raise ValueError(f"unknown model variant {variant!r}: one of {', '.join(LORA_VARIANTS + DVORA_VARIANTS)} "
                     "or fused_r<R> (fused DoRA at rank R)")


def build(preset: Preset, variant: str, dtype: torch.dtype, device: str):
    """(model, note): the PEFT model of ``variant``; note says how many layers were fused."""
    from peft import LoraConfig, VeraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import dora_kernels

    config = LlamaConfig(hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                         num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                         num_key_value_heads=preset.kv_heads, vocab_size=preset.vocab,
                         max_position_embeddings=preset.seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    r = rank(preset, variant)
    if variant == "fused_dvora":
        adapters = dora_kernels.DVoRAConfig(r=r, target_modules=TARGETS)
    elif variant == "peft_vera":
        adapters = VeraConfig(r=r, target_modules=TARGETS, vera_dropout=0.0)
    else:
        adapters = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS,
                              use_dora=variant != "peft_lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, met inside PEFT
        model = get_peft_model(model, adapters)
    model.train()
    note = ""
    if variant == "fused_dvora":
        n = sum(isinstance(m, dora_kernels.DVoRALinear) for m in model.modules())
        note = f"{n} DVoRA layers (fused op)"
    elif variant.startswith("fused"):
        dora_kernels.fuse(model)
        note = f"{len(dora_kernels.fused_layers(model))} layers fused"
    return model, note


def run(preset: Preset, variants, dtype: torch.dtype, device: str, *, warmup_ms: float, rep_ms: float,
        min_reps: int, on_note=print) -> dict:
    """{variant: {"time": (median, p20, p80) ms, "peak": bytes or None, "saved": bytes, "r": rank,
    "trainable": trainable parameters}}."""
    results = {}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, preset.vocab, (preset.batch, preset.seq), generator=gen).to(device)
    timing = dict(warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=min_reps)
    for variant in variants:
        try:
            res = _run_variant(preset, variant, dtype, device, ids, timing, on_note)
        except ImportError as e:  # peft or transformers not installed
            on_note(f"model: {variant} skipped: {e}")
            continue
        except torch.cuda.OutOfMemoryError as e:
            on_note(f"model: {variant} ran out of memory: {str(e).splitlines()[0]}")
            res = None
        except Exception as e:  # noqa: BLE001  (one variant failing to build or run: the others go on)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            on_note(f"model: {variant} failed: {type(e).__name__}: {msg}")
            res = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if res is not None:
            results[variant] = res
    return results


def _run_variant(preset, variant, dtype, device, ids, timing, on_note) -> dict:
    model, note = build(preset, variant, dtype, device)
    if note:
        on_note(f"model: {variant}: {note}")
    params = [p for p in model.parameters() if p.requires_grad]
    res = {"r": rank(preset, variant), "trainable": sum(p.numel() for p in params)}

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    def forward():
        out = model(input_ids=ids, labels=ids)
        return out.loss, out.logits

    try:
        res["time"] = bench(step, device, grad_to_none=params, **timing)
        res["peak"] = peak_bytes(step, grad_to_none=params) if device == "cuda" else None
        res["saved"] = saved_bytes(forward, held=list(model.parameters()) + list(model.buffers()))
    finally:
        for p in params:
            p.grad = None
    return res
