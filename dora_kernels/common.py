"""Small pieces of DoRA math shared by the launchers, the torch path, the op and the modules.

Shapes: ``magnitude, norm (M,)``; ``lora_A (R, K)``.
"""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NORM_GRADS = ("detached", "exact")

# With the output y saved (save_output), the backward makes u = x·W0ᵀ + s·xa·Bᵀ again instead
# of y / g for the rows with |m| < G_REDO · n: y = g·u holds no u where m = 0, and a small g
# takes y below fp16's normal range sooner than u.
G_REDO = 0.25


def recip(v: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """1 / v where ``ok``, else 0 (no division by the other entries)."""
    return torch.where(ok, 1.0 / torch.where(ok, v, torch.ones_like(v)), torch.zeros_like(v))


def gate(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """g = m / n (M,) in fp32 (the norm is fp32), 0 where n = 0 (a zero row of V gives u = 0,
    so y = bias there)."""
    m = magnitude.float()
    return torch.where(norm > 0, m / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(m))


def redo_rows(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The rows (M,) bool whose dm a backward that read y makes again: |m| < G_REDO · n (NaN m
    too), n > 0."""
    return ~(magnitude.float().abs() >= G_REDO * norm) & (norm > 0)


def xa_dtype(a_dtype):
    """x·Aᵀ is kept in the adapters' dtype (as PEFT's lora_A output), but never below fp32 for
    fp32 adapters."""
    return a_dtype if a_dtype in HALF else torch.float32


def u_dtype(x_dtype, a_dtype, dropout_p: float):
    """u is saved in x's dtype; with dropout, ũ in the dtype PEFT computes the dropped branch in
    (x cast to the adapters'), which keeps dm as accurate as PEFT's."""
    return torch.promote_types(x_dtype, a_dtype) if dropout_p > 0 else x_dtype


def rows_packed(x: torch.Tensor) -> torch.Tensor:
    """x (N, K) as the left operand of torch's own GEMMs: a bf16 CPU matmul (oneDNN, on CPUs with
    AMX) reads past the end of each row of a view whose rows lie further apart than K, so such an
    x is copied."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[0] > 1 and x.stride(0) != x.shape[1]:
        return x.contiguous()
    return x
