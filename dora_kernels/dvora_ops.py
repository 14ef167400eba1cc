"""DVoRA (DoRA over VeRA) on the fused DoRA op, without PEFT.

Shapes (``nn.Linear`` convention): ``x (..., in)``, ``weight`` W0 ``(out, in)``, ``bias (out,)``;
the layer's slices of the shared frozen projections ``vera_A`` A ``(r, in)`` and ``vera_B`` B
``(out, r)``; trainable ``lambda_d`` λ_d ``(r,)``, ``lambda_b`` λ_b ``(out,)``, ``magnitude`` m
``(out,)``::

    ΔW = diag(λ_b)·B·diag(λ_d)·A,  V = W0 + ΔW,  n = ‖V‖ rows (fp32, detached),  g = m / n
    y  = g ⊙ (x·W0ᵀ + ((x·Aᵀ) ⊙ λ_d)·(diag(λ_b)·B)ᵀ) + bias                     (no dropout)
    y  = x·W0ᵀ + bias + (g − 1) ⊙ (x̃·W0ᵀ) + g ⊙ ((x̃·Aᵀ) ⊙ λ_d)·(diag(λ_b)·B)ᵀ   (dropout, PEFT's form)

That is the DoRA op with ``lora_A = A`` (frozen), ``lora_B = diag(λ_b)·B·diag(λ_d)`` (an
``(out, r)`` expression autograd differentiates) and ``scaling = 1``: torch turns the op's dB′
into ``dλ_b = Σ_r (B ⊙ λ_d) ⊙ dB′`` and ``dλ_d = Σ_out (λ_b ⊙ B) ⊙ dB′``, and no ``(r, in)``
gradient is returned for A.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import dora_linear, weight_norm

__all__ = ["dvora_delta_weight", "dvora_factors", "dvora_linear", "dvora_weight_norm", "vera_projections"]


def _kaiming_uniform(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    # PEFT's VeRA ``_kaiming_init``, operation for operation (fan_in of a 2-D tensor is its
    # second dim; gain √2): the bound must round the same way for the draws to be VeRA's.
    tensor = torch.empty(shape)
    fan = shape[1]
    std = math.sqrt(2) / math.sqrt(fan)
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared frozen projections: ``A (r, max_in)``, ``B (max_out, r)``, fp32 on the CPU.

    Kaiming-uniform from ``torch.Generator("cpu").manual_seed(key)``, A drawn first, so the same
    key and shapes give PEFT VeRA's very tensors. A layer uses ``A[:r, :in]`` and ``B[:out, :r]``.
    """
    if r < 1 or max_in < 1 or max_out < 1:
        raise ValueError(f"vera_projections: r, max_in and max_out must be positive, got {r}, {max_in}, {max_out}")
    generator = torch.Generator(device="cpu").manual_seed(int(key))
    A = _kaiming_uniform((r, max_in), generator)
    B = _kaiming_uniform((max_out, r), generator)
    return A, B


def _check(weight, vera_A, vera_B, lambda_d, lambda_b, magnitude):
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    M, K = weight.shape
    if vera_A.dim() != 2 or vera_A.shape[1] != K:
        raise ValueError(f"vera_A must be the layer's slice (r, in={K}), got {tuple(vera_A.shape)}")
    R = vera_A.shape[0]
    if vera_B.shape != (M, R):
        raise ValueError(f"vera_B must be the layer's slice (out={M}, r={R}), got {tuple(vera_B.shape)}")
    if lambda_d.shape != (R,):
        raise ValueError(f"lambda_d must have shape (r={R},), got {tuple(lambda_d.shape)}")
    if lambda_b.shape != (M,):
        raise ValueError(f"lambda_b must have shape (out={M},), got {tuple(lambda_b.shape)}")
    if magnitude.shape != (M,):
        raise ValueError(f"magnitude must have shape (out={M},), got {tuple(magnitude.shape)}")


def dvora_factors(vera_A, vera_B, lambda_d, lambda_b):
    """The DoRA factors of a DVoRA layer: ``(lora_A, lora_B) = (A, diag(λ_b)·B·diag(λ_d))``.

    vera_A (r, in), vera_B (out, r), lambda_d (r,), lambda_b (out,). Both come in the wider of
    the λ dtypes; lora_B is differentiable in the λs. The product is formed in fp32 and rounded
    once, so 16-bit λs lose no more than one rounding.
    """
    dtype = torch.promote_types(lambda_d.dtype, lambda_b.dtype)
    lora_B = (lambda_b.float()[:, None] * vera_B.float() * lambda_d.float()[None, :]).to(dtype)
    return vera_A.to(device=lora_B.device, dtype=dtype), lora_B


@torch.no_grad()
def dvora_delta_weight(vera_A, vera_B, lambda_d, lambda_b) -> torch.Tensor:
    """``ΔW = diag(λ_b)·B·diag(λ_d)·A`` (out, in) in fp32 (merging only; the forward never forms it)."""
    return (lambda_b.float()[:, None] * vera_B.float()) @ (lambda_d.float()[:, None] * vera_A.float())


@torch.no_grad()
def dvora_weight_norm(weight, vera_A, vera_B, lambda_d, lambda_b) -> torch.Tensor:
    """``‖W0 + diag(λ_b)·B·diag(λ_d)·A‖`` per row (out,), fp32, computed as the op computes it
    (the same kernel), so a magnitude set to it gives g = 1 exactly. weight (out, in) any view."""
    _check(weight, vera_A, vera_B, lambda_d, lambda_b, lambda_b)
    lora_A, lora_B = dvora_factors(vera_A, vera_B, lambda_d, lambda_b)
    return weight_norm(weight, lora_A, lora_B, 1.0)[0]


def _plain_dvora(x, weight, lora_A, lora_B, magnitude, bias, p):
    """The same function in plain torch autograd, for a base weight that itself trains (the fused
    op returns no gradient for W0). Dropout from torch's generator."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    w = weight.to(lora_B.dtype)
    with torch.no_grad():
        n = torch.linalg.vector_norm(w.float() + lora_B.float() @ lora_A.float(), dim=1)
    g = (magnitude.float() * torch.where(n > 0, 1.0 / n, torch.zeros_like(n))).to(lora_B.dtype)
    result = F.linear(x, weight, bias)
    xd = F.dropout(x.to(lora_B.dtype), p=p, training=True) if p > 0 else x.to(lora_B.dtype)
    base = F.linear(xd, w)
    delta = (g - 1) * base + g * F.linear(F.linear(xd, lora_A), lora_B)
    return (result + delta).to(result.dtype).reshape(*lead, weight.shape[0])


def dvora_linear(x, weight, vera_A, vera_B, lambda_d, lambda_b, magnitude, bias=None, *, dropout_p=0.0,
                 training=True, dropout_seed=None, save_output=True):
    """Fused DVoRA linear (see the module docstring), differentiable in x, λ_d, λ_b, m (and bias).

    x: (..., in); weight: (out, in), any strided view (GPT-2 Conv1D passes ``w.T``); bias (out,)
    or None; vera_A: (r, in) and vera_B: (out, r), slices of the shared projections (strided views
    are not copied); lambda_d: (r,); lambda_b: (out,); magnitude: (out,). Returns (..., out) in
    x's dtype. ``dropout_p``, ``training``, ``dropout_seed`` and ``save_output`` are ``dora_linear``'s.
    """
    _check(weight, vera_A, vera_B, lambda_d, lambda_b, magnitude)
    lora_A, lora_B = dvora_factors(vera_A, vera_B, lambda_d, lambda_b)
    if weight.requires_grad and torch.is_grad_enabled():
        return _plain_dvora(x, weight, lora_A, lora_B, magnitude, bias, float(dropout_p) if training else 0.0)
    return dora_linear(x, weight, lora_A, lora_B, magnitude, 1.0, bias, dropout_p=dropout_p, training=training,
                       dropout_seed=dropout_seed, save_output=save_output)
