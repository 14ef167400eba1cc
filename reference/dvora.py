"""Reference DVoRA (DoRA over VeRA): PEFT's VeRA update under PEFT's DoRA normalisation.

Shapes (``nn.Linear`` convention): ``x (..., in)``, ``weight`` W0 ``(out, in)``, ``bias (out,)``;
``vera_A`` A ``(r, in)`` and ``vera_B`` B ``(out, r)``, the layer's slices of VeRA's shared frozen
projections; trainable ``lambda_d`` λ_d ``(r,)``, ``lambda_b`` λ_b ``(out,)``, ``magnitude`` m
``(out,)``.

    ΔW = diag(λ_b)·B·diag(λ_d)·A,  V = W0 + ΔW,  n = ‖V‖ row-wise (detached),  g = m / n
    y = x·W0ᵀ + bias + (g − 1) ⊙ (x̃·W0ᵀ) + g ⊙ λ_b ⊙ (((x̃·Aᵀ) ⊙ λ_d)·Bᵀ),  x̃ = dropout(x)

Op for op what PEFT's ``DoraLinearLayer`` does with VeRA's delta in place of ``B·A``: the adapter
branch runs in the λs' dtype, the norm is taken in that dtype and detached, the update is VeRA's
``λ_b · linear(λ_d · linear(x̃, A), B)``; without dropout (or in eval) the base output stands in
for ``x̃·W0ᵀ``. No alpha/r scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dvora_delta_weight", "dvora_linear"]


def dvora_delta_weight(vera_A, vera_B, lambda_d, lambda_b):
    """``ΔW = diag(λ_b)·B·diag(λ_d)·A`` (out, in), VeRA's ``get_delta_weight``, in the λs' dtype."""
    return (lambda_b[:, None] * vera_B.to(lambda_b.dtype)) @ (lambda_d[:, None] * vera_A.to(lambda_d.dtype))


def dvora_linear(
    x,
    weight,
    vera_A,
    vera_B,
    lambda_d,
    lambda_b,
    magnitude,
    bias=None,
    *,
    dropout_p=0.0,
    training=True,
    dropout_mask=None,
    detach_norm=True,
):
    """One DVoRA adapter. x: (..., in); weight: (out, in); bias: (out,) or None; vera_A: (r, in);
    vera_B: (out, r); lambda_d: (r,); lambda_b: (out,); magnitude: (out,). Returns (..., out) in
    x's dtype.

    ``dropout_mask``: a boolean keep-mask of x's shape; when given (and ``dropout_p > 0`` in
    training) it replaces a fresh ``nn.Dropout`` draw: ``x̃ = x · mask / (1 − p)``.
    ``detach_norm=False`` lets the gradient flow through the norm.
    """
    result = F.linear(x, weight, bias)
    result_dtype = result.dtype
    x = x.to(lambda_d.dtype)
    if training and dropout_p > 0:
        if dropout_mask is not None:
            x = x * (dropout_mask.to(x.dtype) * (1.0 / (1.0 - dropout_p)))
        else:
            x = F.dropout(x, p=dropout_p, training=True)
        base_result = None
    else:
        base_result = result

    A, B = vera_A.to(x.dtype), vera_B.to(x.dtype)
    w = weight.to(x.dtype)
    delta = dvora_delta_weight(A, B, lambda_d, lambda_b)
    norm = torch.linalg.norm(w + (delta.detach() if detach_norm else delta), dim=1).to(w.dtype)
    if detach_norm:
        norm = norm.detach()
    g = (magnitude / norm).view(1, -1)

    update = lambda_b * F.linear(lambda_d * F.linear(x, A), B)
    if base_result is not None:
        if bias is not None:
            base_result = base_result - bias
    else:
        base_result = F.linear(x, w)
    return (result + (g - 1) * base_result + g * update).to(result_dtype)
