"""Counted FLOPs of one layer call, from which the benchmark reports achieved TFLOP/s.

With ``N`` tokens, ``in → out`` features and rank ``r``, the DoRA (and LoRA) layer runs three
GEMMs forward — the frozen ``x·W0ᵀ`` and the adapter's ``x·Aᵀ`` and ``(x·Aᵀ)·Bᵀ``:

    forward  F = 2·N·in·out + 2·N·r·(in + out)

Backward computes both gradients of every forward GEMM (input and weight) except the frozen
weight's own (no dW0): dx through W0, dxa and dB through B, dx and dA through A:

    backward = 2·F − 2·N·in·out = 2·N·in·out + 4·N·r·(in + out)
    step     = forward + backward = 4·N·in·out + 6·N·r·(in + out)
    eval     = forward

The floor, a frozen ``nn.Linear`` (provider ``linear``), counts only its own GEMMs:
forward ``2·N·in·out``, backward (the input gradient) ``2·N·in·out``, step ``4·N·in·out``.

Not counted: the weight norm ``‖W0 + s·B·A‖`` (``2·r·in·out + 3·in·out`` FLOPs, memory-bound:
one read of W0) and the element-wise work (``O(N·out)``). Every DoRA/LoRA provider is charged
the same count for a shape, so their TFLOP/s compare like their times; PEFT's DoRA does more
arithmetic than counted (it forms B·A through an identity matrix), which shows as lower TFLOP/s.
"""

from __future__ import annotations

from .tables import MODES  # noqa: F401  (bench.flops.MODES: the layer modes)


def layer_flops(mode: str, tokens: int, in_features: int, out_features: int, r: int, *, floor: bool = False) -> int:
    """FLOPs of one call of ``mode`` (see the module docstring); ``floor``: the frozen nn.Linear."""
    base = 2 * tokens * in_features * out_features
    lora = 0 if floor else 2 * tokens * r * (in_features + out_features)
    fwd = base + lora
    bwd = base + 2 * lora
    return {"fwd": fwd, "eval": fwd, "bwd": bwd, "step": fwd + bwd}[mode]
