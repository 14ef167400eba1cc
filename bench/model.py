"""The model-level figure: one training step of a small Llama-shaped model with adapters.

A ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` (random weights, nothing
downloaded), adapters on q/k/v/o/gate/up/down through ``peft.get_peft_model`` (r = 16,
alpha = 32, no dropout; adapters in fp32 on a bf16/fp16 model, PEFT's default). Variants:

- ``peft_dora``: PEFT's DoRA as it comes;
- ``fused``: the same model after ``dora_kernels.fuse(model)``;
- ``peft_lora``: PEFT's plain LoRA of the same rank.

A step is ``model(input_ids, labels=input_ids).loss.backward()`` (embedding, attention, MLP,
LM head and cross-entropy included), batch × seq tokens. Reported: step time, and memory —
the GPU's peak above what the model held before the step, or on a CPU the saved-for-backward
bytes of the forward (see ``bench.timing``).
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass

import torch

from .timing import bench, peak_bytes, saved_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("fused", "peft_dora", "peft_lora")


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
    r: int = 16

    @property
    def name(self) -> str:
        return f"llama-h{self.hidden}-L{self.layers}-s{self.seq}"


PRESETS = {
    "tiny": Preset(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2, vocab=512, seq=128),
    "mini": Preset(hidden=1024, intermediate=2816, layers=2, heads=8, kv_heads=2, vocab=32000, seq=1024),
    "small": Preset(hidden=2048, intermediate=5632, layers=4, heads=16, kv_heads=4, vocab=32000, seq=2048),
}


def build(preset: Preset, variant: str, dtype: torch.dtype, device: str):
    """(model, note): the PEFT model of ``variant``; note says how many layers were fused."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                         num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                         num_key_value_heads=preset.kv_heads, vocab_size=preset.vocab,
                         max_position_embeddings=preset.seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=preset.r, lora_alpha=2 * preset.r, lora_dropout=0.0, target_modules=TARGETS,
                      use_dora=variant != "peft_lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, met inside PEFT
        model = get_peft_model(model, lora)
    model.train()
    note = ""
    if variant == "fused":
        import dora_kernels

        dora_kernels.fuse(model)
        note = f"{len(dora_kernels.fused_layers(model))} layers fused"
    return model, note


def run(preset: Preset, variants, dtype: torch.dtype, device: str, *, warmup_ms: float, rep_ms: float,
        min_reps: int, on_note=print) -> dict:
    """{variant: {"time": (median, p20, p80) ms, "peak": bytes or None, "saved": bytes}}."""
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

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    def forward():
        out = model(input_ids=ids, labels=ids)
        return out.loss, out.logits

    try:
        res = {"time": bench(step, device, grad_to_none=params, **timing)}
        res["peak"] = peak_bytes(step, grad_to_none=params) if device == "cuda" else None
        res["saved"] = saved_bytes(forward, held=list(model.parameters()) + list(model.buffers()))
    finally:
        for p in params:
            p.grad = None
    return res
