"""DoRA on embeddings, with PEFT's semantics (``lora.Embedding``, PEFT 0.21).

Shapes: ids (...); W0 (vocab, dim); ``lora_embedding_A`` A_e (r, vocab);
``lora_embedding_B`` B_e (dim, r); magnitude m (dim,); output (..., dim).

PEFT builds the layer with ``fan_in_fan_out=True``: the magnitude is per embedding dimension d,
and the norm is that of column d of W0 + s·(B_e·A_e)ᵀ, i.e. the rows of W0ᵀ + s·B_e·A_e:

    n_d = ‖W0[:, d] + s·(B_e·A_e)[d, :]‖          (dim,) fp32; PEFT forms the (dim, vocab) product
    g   = m / n
    y   = g ⊙ result + g ⊙ (s·es)·(xa·B_eᵀ),   xa = A_eᵀ[ids]  (PEFT's lookup, ``_embed``)

``result`` is the running output (the base layer's lookup, scaled by the base's own
``embed_scale`` where it has one, with the deltas of earlier active adapters in it): PEFT
scales all of it by g. ``es`` is the base layer's ``embed_scale`` (Gemma 3), applied after the
norm, as PEFT applies it; PEFT has no dropout on embeddings.

``embedding_weight_norm`` is ``weight_norm`` on W0ᵀ as a strided view (W0 read once, the
product never formed). ``dora_embedding`` is the combination and its backward
(a ``torch.autograd.Function``): it keeps ``result`` as it came (for the first adapter the base
lookup, exact in its dtype: a u rounded to a 16-bit base's dtype would lose what PEFT's fp32
adapters keep), xa (..., r) and B_e, and makes xa·B_eᵀ again in the backward instead of keeping
a second (..., dim) tensor; dm, dB_e and dxa come from (..., dim) and (..., r) products only, and
the lookup's own backward turns dxa into dA_e (r, vocab): no (vocab, dim) tensor in either pass.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .conv import compute_dtype, gate_and_recip
from .ops import weight_norm

__all__ = ["dora_embedding", "embedding_weight_norm"]


@torch.no_grad()
def embedding_weight_norm(weight: Tensor, lora_embedding_A: Tensor, lora_embedding_B: Tensor,
                          scaling: float) -> Tensor:
    """‖W0ᵀ + s·B_e·A_e‖ per row (dim,) fp32: weight (vocab, dim), lora_embedding_A (r, vocab),
    lora_embedding_B (dim, r)."""
    return weight_norm(weight.T, lora_embedding_A, lora_embedding_B, scaling)[0]


def _no_autocast(t):
    """The products below run in the dtype chosen here, under autocast or not: the backward
    makes xa·B_eᵀ again and must get the forward's numbers."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else contextlib.nullcontext()


def _rank_term(xa2, lora_B, cd):
    """xa·B_eᵀ (N, dim) in ``cd``: the same product in the forward and the backward."""
    return xa2.to(cd) @ lora_B.to(cd).T


class _Embedding(torch.autograd.Function):
    """y = g ⊙ (result + c·xa·B_eᵀ), c = s·es."""

    @staticmethod
    def forward(ctx, result, xa, lora_B, magnitude, norm, scale, out_dtype):
        with _no_autocast(result):
            return _Embedding._forward(ctx, result, xa, lora_B, magnitude, norm, scale, out_dtype)

    @staticmethod
    def _forward(ctx, result, xa, lora_B, magnitude, norm, scale, out_dtype):
        cd = compute_dtype(result, xa, lora_B, magnitude)
        g, _ = gate_and_recip(magnitude, norm, cd)
        xa2 = xa.reshape(-1, xa.shape[-1])
        u = _rank_term(xa2, lora_B, cd).mul_(scale.to(cd)).reshape(result.shape).add_(result.to(cd))
        ctx.save_for_backward(result, xa, lora_B, magnitude, norm, scale)
        return (u * g).to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        with _no_autocast(dy):
            return _Embedding._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        result, xa, lora_B, magnitude, norm, scale = ctx.saved_tensors
        need_r, need_xa, need_b, need_m = ctx.needs_input_grad[:4]
        cd = compute_dtype(dy, result, xa, lora_B, magnitude)
        g, inv_n = gate_and_recip(magnitude, norm, cd)
        c = scale.to(cd)
        dim, r = lora_B.shape
        dy2 = dy.reshape(-1, dim).to(cd)
        xa2 = xa.reshape(-1, r)
        gs = dy2 * g
        dr = gs.reshape(result.shape).to(result.dtype) if need_r else None
        gl = gs * c  # dL/d(xa·B_eᵀ)
        dxa = (gl @ lora_B.to(cd)).reshape(xa.shape).to(xa.dtype) if need_xa else None
        db = (gl.T @ xa2.to(cd)).to(lora_B.dtype) if need_b else None
        dm = None
        if need_m:
            u = _rank_term(xa2, lora_B, cd).mul_(c).add_(result.reshape(-1, dim).to(cd))
            dm = ((dy2 * u).sum(0) * inv_n).to(magnitude.dtype)
        return dr, dxa, db, dm, None, None, None


def dora_embedding(result: Tensor, xa: Tensor, lora_embedding_B: Tensor, magnitude: Tensor, norm: Tensor,
                   scaling: float, embed_scale: Tensor | None = None, *, out_dtype=None) -> Tensor:
    """PEFT's embedding DoRA: ``g ⊙ result + g ⊙ (s·es)·(xa·B_eᵀ)``, differentiable in result, xa,
    lora_embedding_B and magnitude (n is a constant: PEFT's detached norm).

    result: (..., dim); xa: (..., r) the looked-up rows of A_eᵀ; lora_embedding_B: (dim, r);
    magnitude: (dim,); norm: (dim,) fp32; embed_scale: a one-element tensor or None. Returns
    ``out_dtype`` (default: the promoted dtype of result, xa, lora_embedding_B and magnitude).
    """
    if out_dtype is None:
        out_dtype = result.dtype
        for t in (xa, lora_embedding_B, magnitude):
            out_dtype = torch.promote_types(out_dtype, t.dtype)
    scale = torch.as_tensor(float(scaling), dtype=torch.float64, device=result.device)
    if embed_scale is not None:
        scale = scale * embed_scale.reshape(()).to(device=result.device, dtype=torch.float64)
    return _Embedding.apply(result, xa, lora_embedding_B, magnitude, norm, scale, out_dtype)
