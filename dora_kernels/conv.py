"""DoRA on convolutions, with PEFT's semantics (``lora.Conv1d`` / ``Conv2d`` / ``Conv3d``, PEFT 0.21).

Shapes: x (N, in, *S); W0 (out, in/groups, *k); PEFT's rank path is ``lora_A``, a full
convolution (r, in, *k) with W0's stride and padding (but no dilation and zero padding),
then ``lora_B``, a grouped 1×1 convolution (out, r/groups, 1, …); the magnitude m is
(1, out, 1, …); the output (N, out, *S').

    n_j = ‖W0_j + s·L_j‖            rows of the flattened (out, in/groups·k…) weights, fp32
    L   = (B.view(−1, r) · A.view(r, −1)).reshape(W0.shape)            (PEFT's reading of B·A)
    g   = m / n
    y   = g ⊙ (result − bias + s·l) + bias,   l = lora_B(lora_A(x))         (no dropout)
    y   = result + (g − 1) ⊙ b̃ + g ⊙ s·l̃,    b̃ = conv(x̃, W0), l̃ = lora_B(lora_A(x̃))  (dropout)

``result`` is the running output PEFT hands each DoRA adapter: the base layer's output (bias
included), with the deltas of earlier active adapters in it.

For groups = 1, L is the rank path's own weight. For groups > 1 it is not: PEFT reads B's memory
as (out/groups, r) rows, so row j of L is ``Σ_ρ B.view(−1, r)[j // groups, ρ] · A[ρ, c·in/groups
+ i, κ]`` (c = j mod groups) over W0_j's (i, κ). ``conv_weight_norm`` reproduces that: the rows
c, c + groups, … are the rows of ``W0[c::groups] + s·B.view(−1, r)·A_c`` with A_c the c-th block
of input channels of A, one ``weight_norm`` call per group on strided views: W0 read once,
B·A never formed.

The base convolution and the rank path run as PEFT runs them (torch's convolutions, through
autograd); ``dora_conv_scale`` / ``dora_conv_dropout`` are the DoRA combination and its
backward, ``torch.autograd.Function``s that keep one (N, out, *S') tensor for dm: u = result −
bias + s·l (ũ = b̃ + s·l̃ with dropout), in the wider of the dtypes of its two terms. With fp32
adapters on a 16-bit base that is fp32: result is already the base convolution's rounded output,
and a 16-bit u would round it a second time, which PEFT does not. The output y is not kept
(it would need u back from y / g, and code may then modify y in place). Together with what
autograd keeps for the convolutions (x, x cast to the adapters' dtype where it differs, or x̃ and
the dropout mask, and lora_A's output) that is what PEFT's LoRA conv keeps, plus u; PEFT's DoRA
keeps several more (N, out, *S') tensors and forms B·A and W0 + s·B·A.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import recip
from .ops import weight_norm

__all__ = ["conv_weight_norm", "dora_conv_dropout", "dora_conv_scale"]


def compute_dtype(*tensors):
    """fp32, or fp64 where any input is fp64: the combination is never computed in 16 bits."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _flat_rows(weight: Tensor) -> tuple[Tensor, tuple]:
    """``weight`` (out, *rest) as (out, prod(rest)) without a copy where its memory allows
    (channels_last included), and the order of the ``rest`` dims its columns follow: a row
    norm does not depend on the order of the columns, as long as A's follow the same order."""
    dims = range(1, weight.dim())
    order = tuple(sorted(dims, key=lambda d: -weight.stride(d)))
    permuted = weight.permute(0, *order)
    if not permuted.is_contiguous():
        order, permuted = tuple(dims), weight.contiguous()
    return permuted.reshape(weight.shape[0], -1), order


@torch.no_grad()
def conv_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, groups: int = 1) -> Tensor:
    """PEFT's conv DoRA norm (out,) fp32, without forming B·A (see module doc).

    weight: (out, in/groups, *k); lora_A: (r, in, *k); lora_B: (out, r/groups, 1, …);
    r divisible by groups (PEFT requires it).
    """
    out, r = weight.shape[0], lora_A.shape[0]
    w2, order = _flat_rows(weight)
    # A viewed (r, groups, in/groups, *k): the c-th block of input channels pairs with W0's rows c::groups
    a = lora_A.reshape(r, groups, *weight.shape[1:]).permute(0, 1, *(d + 1 for d in order))
    a = a.reshape(r, groups, -1)
    b = lora_B.reshape(out // groups, r)  # PEFT's B.view(-1, r)
    if groups == 1:
        return weight_norm(w2, a[:, 0], b, scaling)[0]
    w3 = w2.view(out // groups, groups, -1)
    norm = torch.empty(out, dtype=torch.float32, device=weight.device)
    for c in range(groups):
        norm[c::groups] = weight_norm(w3[:, c], a[:, c], b, scaling)[0]
    return norm


def gate_and_recip(magnitude, norm, dtype):
    """g = m / n and 1/n in ``dtype`` (0 where n = 0, the op's rule), both in m's shape."""
    n = norm.reshape(magnitude.shape).to(dtype)
    ok = n > 0
    return torch.where(ok, magnitude.to(dtype) / torch.where(ok, n, torch.ones_like(n)), torch.zeros_like(n)), \
        recip(n, ok)


class _Scale(torch.autograd.Function):
    """y = g ⊙ (result − bias + s·l) + bias (bias subtracted only when ``result`` holds it)."""

    @staticmethod
    def forward(ctx, result, lora, magnitude, norm, scaling, bias, bias_in_result, out_dtype):
        cd = compute_dtype(result, lora, magnitude)
        g, _ = gate_and_recip(magnitude, norm, cd)
        u = torch.add(result.to(cd), lora.to(cd), alpha=scaling)
        if bias is not None and bias_in_result:
            u -= bias.reshape(magnitude.shape).to(cd)
        y = u * g
        if bias is not None:
            y += bias.reshape(magnitude.shape).to(cd)
        ctx.scaling, ctx.bias_in_result = scaling, bias_in_result
        ctx.dtypes = (result.dtype, lora.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(u.to(torch.promote_types(result.dtype, lora.dtype)), magnitude, norm)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        u, magnitude, norm = ctx.saved_tensors
        need_r, need_l, need_m, _, _, need_bias = ctx.needs_input_grad[:6]
        result_dtype, lora_dtype, bias_dtype = ctx.dtypes
        cd = compute_dtype(dy, u, magnitude)
        g, inv_n = gate_and_recip(magnitude, norm, cd)
        dy = dy.to(cd)
        gs = dy * g
        dr = gs.to(result_dtype) if need_r else None
        dl = (gs * ctx.scaling).to(lora_dtype) if need_l else None
        dm = ((dy * u).sum_to_size(magnitude.shape) * inv_n).to(magnitude.dtype) if need_m else None
        dbias = None
        if need_bias and bias_dtype is not None:
            direct = dy - gs if ctx.bias_in_result else dy  # y = g·(r − bias + s·l) + bias: ∂y/∂bias = 1 − g
            dbias = direct.sum_to_size(magnitude.shape).reshape(-1).to(bias_dtype)
        return dr, dl, dm, None, None, dbias, None, None


class _Dropout(torch.autograd.Function):
    """y = result + (g − 1) ⊙ b̃ + g ⊙ s·l̃."""

    @staticmethod
    def forward(ctx, result, base_dropped, lora_dropped, magnitude, norm, scaling, out_dtype):
        cd = compute_dtype(result, base_dropped, lora_dropped, magnitude)
        g, _ = gate_and_recip(magnitude, norm, cd)
        b, l = base_dropped.to(cd), lora_dropped.to(cd)
        y = result.to(cd) + (g - 1) * b + (g * scaling) * l
        ctx.scaling = scaling
        ctx.dtypes = (result.dtype, base_dropped.dtype, lora_dropped.dtype)
        u_dtype = torch.promote_types(base_dropped.dtype, lora_dropped.dtype)
        ctx.save_for_backward(torch.add(b, l, alpha=scaling).to(u_dtype), magnitude, norm)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        u, magnitude, norm = ctx.saved_tensors
        need_r, need_b, need_l, need_m = ctx.needs_input_grad[:4]
        result_dtype, base_dtype, lora_dtype = ctx.dtypes
        cd = compute_dtype(dy, u, magnitude)
        g, inv_n = gate_and_recip(magnitude, norm, cd)
        dy32 = dy.to(cd)
        dr = dy.to(result_dtype) if need_r else None
        db = (dy32 * (g - 1)).to(base_dtype) if need_b else None
        dl = (dy32 * (g * ctx.scaling)).to(lora_dtype) if need_l else None
        dm = ((dy32 * u).sum_to_size(magnitude.shape) * inv_n).to(magnitude.dtype) if need_m else None
        return dr, db, dl, dm, None, None, None


def dora_conv_scale(result: Tensor, lora: Tensor, magnitude: Tensor, norm: Tensor, scaling: float,
                    bias: Tensor | None = None, *, bias_in_result: bool = True, out_dtype=None) -> Tensor:
    """PEFT's conv DoRA without dropout: ``g ⊙ (result − bias + s·lora) + bias``, differentiable in
    result, lora, magnitude and bias (n is a constant: PEFT's detached norm).

    result, lora: (N, out, *S'); magnitude: (1, out, 1, …) (PEFT's shape; any shape that
    broadcasts over result along its channels); norm: (out,) fp32; bias: (out,) or None;
    ``bias_in_result``: result holds the bias (PEFT's running result) and it is taken out first.
    Returns ``out_dtype`` (default: the promoted dtype of result, lora and magnitude).
    """
    out_dtype = out_dtype or torch.promote_types(torch.promote_types(result.dtype, lora.dtype), magnitude.dtype)
    return _Scale.apply(result, lora, magnitude, norm, float(scaling), bias, bias_in_result, out_dtype)


def dora_conv_dropout(result: Tensor, base_dropped: Tensor, lora_dropped: Tensor, magnitude: Tensor, norm: Tensor,
                      scaling: float, *, out_dtype=None) -> Tensor:
    """PEFT's conv DoRA with dropout: ``result + (g − 1) ⊙ b̃ + g ⊙ s·l̃``, differentiable in result,
    b̃, l̃ and magnitude.

    result: (N, out, *S') (the running result, bias included); base_dropped b̃ = conv(x̃, W0)
    without bias; lora_dropped l̃ = lora_B(lora_A(x̃)); shapes as ``dora_conv_scale``.
    """
    out_dtype = out_dtype or torch.promote_types(
        torch.promote_types(result.dtype, base_dropped.dtype),
        torch.promote_types(lora_dropped.dtype, magnitude.dtype))
    return _Dropout.apply(result, base_dropped, lora_dropped, magnitude, norm, float(scaling), out_dtype)
