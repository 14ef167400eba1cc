"""A naive DoRA linear in plain torch autograd: the self-test's same-dtype baseline.

It ships with the package so that ``python -m dora_kernels.selftest`` runs from a wheel; the
tests use the repository's ``reference`` (PEFT's exact arithmetic) instead. It computes what
PEFT computes, in PEFT's dtypes (the DoRA branch in the adapters' dtype, the norm detached),
but forms ``B·A`` directly rather than through an identity matrix:

    V = W0 + s·B·A,  n = ‖V‖ rows,  g = m / n
    y = x·W0ᵀ + bias + (g − 1) ⊙ (x̃·W0ᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ,  x̃ = x·mask/(1 − p) (or x)

Shapes: ``x (..., in)``, ``weight (out, in)``, ``lora_A (r, in)``, ``lora_B (out, r)``,
``magnitude, bias (out,)``; ``dropout_mask`` a boolean keep-mask of x's shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, *, dropout_p=0.0, training=True,
                dropout_mask=None, detach_norm=True):
    result = F.linear(x, weight, bias)
    xd = x.to(lora_A.dtype)
    dropped = training and dropout_p > 0
    if dropped:
        xd = xd * (dropout_mask.to(xd.dtype) * (1.0 / (1.0 - dropout_p)))
    w = weight.to(xd.dtype)
    ba = lora_B @ lora_A
    norm = torch.linalg.vector_norm(w + scaling * (ba.detach() if detach_norm else ba).to(xd.dtype), dim=1)
    if detach_norm:
        norm = norm.detach()
    g = magnitude / norm
    if dropped:
        base = F.linear(xd, w)
    else:
        base = result - bias if bias is not None else result
    lora = F.linear(F.linear(xd, lora_A), lora_B)
    return (result + (g - 1) * base + g * lora * scaling).to(result.dtype)
