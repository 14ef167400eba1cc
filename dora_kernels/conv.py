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
the dropout mask, and lora_A's output) that is what PEFT's LoRA conv keeps, plus u (only where
the magnitude trains: u serves dm alone); PEFT's DoRA keeps several more (N, out, *S') tensors
and forms B·A and W0 + s·B·A.

Where the Triton kernels run (``ops._run``: CUDA tensors, or the interpreter; fp32/fp16/bf16), the
combination is one pass of ``kernels_conv._conv_fwd_kernel`` (reads result, l and b̃, writes y
and u), and its backward one pass of ``_conv_bwd_kernel`` (reads dy and u, writes dL/dresult,
dL/dl and dL/db̃ and per-program fp32 partial sums over (batch, positions) of dy ⊙ u and dy) and
``_conv_sum_kernel``, which sums those partials in a fixed order into dm = Σ dy ⊙ u / n and
dbias: deterministic, no atomics. Every tensor is read as (N, C, S) with its own strides
(NCHW, channels_last, or any layout whose spatial dims flatten; others are copied), computed
in fp32. The torch path (below, ``_scale_torch`` …) computes the same in torch's elementwise ops,
and fp64 always takes it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import heuristics as H
from . import kernels_conv as KC
from .common import recip
from .ops import _run, weight_norm
from .runtime import launch, target

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


# ---------------------------------------------------------------------------------------------
# the combination and its backward: the Triton kernels (``kernels_conv``) or torch

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _spatial(t: Tensor) -> int:
    return math.prod(t.shape[2:])


def _view3(t: Tensor) -> Tensor:
    """(N, C, *S) as (N, C, S): a view where the spatial dims flatten (NCHW, channels_last), else a copy."""
    shape = (t.shape[0], t.shape[1], _spatial(t))
    try:
        return t.view(shape)
    except RuntimeError:
        return t.reshape(shape)


def _like(t: Tensor, dtype) -> Tensor:
    """A new tensor of ``t``'s shape in its memory layout (NCHW, channels_last, …) where that layout
    flattens to (N, C, S), else contiguous."""
    out = torch.empty_like(t, dtype=dtype)
    try:
        out.view(t.shape[0], t.shape[1], _spatial(t))
        return out
    except RuntimeError:
        return torch.empty(t.shape, dtype=dtype, device=t.device)


def _channels_inner(t3: Tensor) -> bool:
    """A (N, C, S) view whose channels are its unit-stride dim (channels_last), not its positions."""
    return t3.stride(1) == 1 and (t3.shape[2] == 1 or t3.stride(2) != 1)


def _per_channel(magnitude: Tensor, result: Tensor) -> bool:
    """``magnitude`` holds one value per channel of ``result`` (N, C, *S), as PEFT's (1, C, 1, …)."""
    C = result.shape[1]
    if magnitude.dim() > result.dim() or magnitude.numel() != C:
        return False
    shape = (1,) * (result.dim() - magnitude.dim()) + tuple(magnitude.shape)
    return all(s == 1 for i, s in enumerate(shape) if i != 1)


def _sample_fits_int32(t: Tensor) -> bool:
    """The offsets within one batch element of ``t`` fit the kernels' 32 bits."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]) if n > 0) < 2**31


def _kernels_fit(result: Tensor, same_shape, magnitude: Tensor, norm: Tensor, dtypes) -> bool:
    """The kernels compute this call: (N, C, *S) tensors of one shape, a per-channel magnitude and
    norm, fp32/fp16/bf16 everywhere (fp64 stays on the torch path), batch elements of < 2**31."""
    return (result.dim() >= 2 and all(t.shape == result.shape for t in same_shape)
            and _per_channel(magnitude, result) and norm.numel() == result.shape[1]
            and all(d in _KERNEL_DTYPES for d in dtypes)
            and all(_sample_fits_int32(t) for t in (result, *same_shape)))


def _choose(fits: bool, t: Tensor, on_triton, on_torch):
    # (a backward with create_graph records its torch ops: the kernels' launches would not be; code
    # that torch.compile traces takes the torch ops too, which it can trace and fuse)
    if not fits or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return on_torch()
    return _run(t, on_triton, on_torch)


def _channel_vectors(magnitude, norm, bias=None):
    """m, n (fp32) and bias as the (C,) contiguous vectors the kernels index."""
    return (magnitude.reshape(-1).contiguous(), norm.reshape(-1).to(torch.float32).contiguous(),
            bias.reshape(-1).contiguous() if bias is not None else None)


def _combine_triton(result, base, lora, magnitude, norm, scaling, bias, bias_in_result, out_dtype, u_dtype, need_u):
    """``(y, u or None)`` by ``_conv_fwd_kernel`` (``base``: the dropout form, else None)."""
    y = _like(result, out_dtype)
    u = _like(result, u_dtype) if need_u else None
    if y.numel() == 0:
        return y, u
    N, C, S = result.shape[0], result.shape[1], _spatial(result)
    r3 = _view3(result)
    mag, nrm, bias = _channel_vectors(magnitude, norm, bias if base is None else None)
    _, sms = target(result)
    cfg = H.conv_config(N=N, C=C, S=S, channels_inner=_channels_inner(r3), num_sms=sms)
    ins = [t for t in (result, base, lora) if t is not None]
    launch(KC._conv_fwd_kernel, cfg.grid, dict(cfg.meta, HAS_BIAS_IN_RESULT=bias is not None and bias_in_result),
           flops=(7 if base is not None else 5) * y.numel(), unit="vector",
           reads=ins + [magnitude, norm] + ([bias] if bias is not None else []),
           writes=[y] + ([u] if u is not None else []),
           y=_view3(y), u=_view3(u) if u is not None else None, result=r3,
           base=_view3(base) if base is not None else None, lora=_view3(lora), mag=mag, norm=nrm, bias=bias,
           N=N, C=C, S=S, scaling=float(scaling))
    return y, u


def _grads_triton(dy, u, magnitude, norm, scaling, *, dropout, bias_in_result, dtypes, needs):
    """``(dresult, dbase, dlora, dm, dbias)`` (None where not needed) by ``_conv_bwd_kernel`` and
    ``_conv_sum_kernel``; ``dtypes``/``needs``: those of result, base, lora, magnitude, bias."""
    need_r, need_b, need_l, need_m, need_bias = needs
    result_dtype, base_dtype, lora_dtype, bias_dtype = dtypes
    # dL/dresult of the dropout form is dy itself, in result's dtype (no pass where it is that already)
    write_r = need_r and not (dropout and dy.dtype == result_dtype)
    dr = _like(dy, result_dtype) if write_r else (dy if need_r else None)
    db = _like(dy, base_dtype) if need_b else None
    dl = _like(dy, lora_dtype) if need_l else None
    N, C, S = dy.shape[0], dy.shape[1], _spatial(dy)
    new = torch.zeros if dy.numel() == 0 else torch.empty  # (no positions: the sums are 0)
    dm = new(C, dtype=magnitude.dtype, device=dy.device) if need_m else None
    dbias = new(C, dtype=bias_dtype, device=dy.device) if need_bias else None
    if dy.numel() == 0 or not (write_r or need_b or need_l or need_m or need_bias):
        return dr, db, dl, dm.reshape(magnitude.shape) if need_m else None, dbias
    dy3 = _view3(dy)
    mag, nrm, _ = _channel_vectors(magnitude, norm)
    _, sms = target(dy)
    cfg = H.conv_config(N=N, C=C, S=S, channels_inner=_channels_inner(dy3), num_sms=sms, reduce=True)
    T = cfg.sizes["T"]
    dm_part = torch.empty((T, C), dtype=torch.float32, device=dy.device) if need_m else None
    dbias_part = torch.empty((T, C), dtype=torch.float32, device=dy.device) if need_bias else None
    outs = [t for t in (dr if write_r else None, db, dl, dm_part, dbias_part) if t is not None]
    launch(KC._conv_bwd_kernel, cfg.grid, dict(cfg.meta, HAS_DROPOUT=dropout),
           flops=(2 + 2 * need_m + need_bias) * dy.numel(), unit="vector",
           reads=[dy] + ([u] if need_m else []) + [magnitude, norm], writes=outs,
           dresult=_view3(dr) if write_r else None, dbase=_view3(db) if need_b else None,
           dlora=_view3(dl) if need_l else None, dm_part=dm_part, dbias_part=dbias_part, dy=dy3,
           u=_view3(u) if need_m else None, mag=mag, norm=nrm, N=N, C=C, S=S, scaling=float(scaling),
           TILES=cfg.sizes["TILES"], TILES_PER_PROG=cfg.sizes["TILES_PER_PROG"])
    if need_m or need_bias:
        cfg = H.conv_sum_config(C=C)
        launch(KC._conv_sum_kernel, cfg.grid, dict(cfg.meta, HAS_BIAS_IN_RESULT=need_bias and bias_in_result),
               flops=T * C * (need_m + need_bias), unit="vector",
               reads=[t for t in (dm_part, dbias_part) if t is not None] + [magnitude, norm],
               writes=[t for t in (dm, dbias) if t is not None],
               dm=dm, dbias=dbias, dm_part=dm_part, dbias_part=dbias_part, mag=mag, norm=nrm, T=T, C=C)
    return dr, db, dl, dm.reshape(magnitude.shape) if need_m else None, dbias


def _scale_torch(result, lora, magnitude, norm, scaling, bias, bias_in_result, out_dtype, u_dtype, need_u):
    cd = compute_dtype(result, lora, magnitude)
    g, _ = gate_and_recip(magnitude, norm, cd)
    u = torch.add(result.to(cd), lora.to(cd), alpha=scaling)
    if bias is not None and bias_in_result:
        u -= bias.reshape(magnitude.shape).to(cd)
    y = u * g
    if bias is not None:
        y += bias.reshape(magnitude.shape).to(cd)
    return y.to(out_dtype), u.to(u_dtype) if need_u else None


def _scale_grads_torch(dy, u, magnitude, norm, scaling, *, bias_in_result, dtypes, needs):
    need_r, _, need_l, need_m, need_bias = needs
    result_dtype, _, lora_dtype, bias_dtype = dtypes
    cd = compute_dtype(dy, u if u is not None else dy, magnitude)
    g, inv_n = gate_and_recip(magnitude, norm, cd)
    dy = dy.to(cd)
    gs = dy * g
    dr = gs.to(result_dtype) if need_r else None
    dl = (gs * scaling).to(lora_dtype) if need_l else None
    dm = ((dy * u).sum_to_size(magnitude.shape) * inv_n).to(magnitude.dtype) if need_m else None
    dbias = None
    if need_bias:
        direct = dy - gs if bias_in_result else dy  # y = g·(r − bias + s·l) + bias: ∂y/∂bias = 1 − g
        dbias = direct.sum_to_size(magnitude.shape).reshape(-1).to(bias_dtype)
    return dr, None, dl, dm, dbias


def _dropout_torch(result, base, lora, magnitude, norm, scaling, out_dtype, u_dtype, need_u):
    cd = compute_dtype(result, base, lora, magnitude)
    g, _ = gate_and_recip(magnitude, norm, cd)
    b, l = base.to(cd), lora.to(cd)
    y = result.to(cd) + (g - 1) * b + (g * scaling) * l
    return y.to(out_dtype), torch.add(b, l, alpha=scaling).to(u_dtype) if need_u else None


def _dropout_grads_torch(dy, u, magnitude, norm, scaling, *, dtypes, needs):
    need_r, need_b, need_l, need_m, _ = needs
    result_dtype, base_dtype, lora_dtype, _ = dtypes
    cd = compute_dtype(dy, u if u is not None else dy, magnitude)
    g, inv_n = gate_and_recip(magnitude, norm, cd)
    dy32 = dy.to(cd)
    dr = dy.to(result_dtype) if need_r else None
    db = (dy32 * (g - 1)).to(base_dtype) if need_b else None
    dl = (dy32 * (g * scaling)).to(lora_dtype) if need_l else None
    dm = ((dy32 * u).sum_to_size(magnitude.shape) * inv_n).to(magnitude.dtype) if need_m else None
    return dr, db, dl, dm, None


class _Scale(torch.autograd.Function):
    """y = g ⊙ (result − bias + s·l) + bias (bias subtracted only when ``result`` holds it)."""

    @staticmethod
    def forward(ctx, result, lora, magnitude, norm, scaling, bias, bias_in_result, out_dtype, need_u):
        u_dtype = torch.promote_types(result.dtype, lora.dtype)
        args = (result, lora, magnitude, norm, scaling, bias, bias_in_result, out_dtype, u_dtype, need_u)
        dtypes = (result.dtype, lora.dtype, magnitude.dtype, out_dtype, u_dtype) \
            + ((bias.dtype,) if bias is not None else ())
        fits = _kernels_fit(result, (lora,), magnitude, norm, dtypes) and (bias is None or bias.numel() ==
                                                                           result.shape[1])
        y, u = _choose(fits, result, lambda: _combine_triton(result, None, lora, *args[2:]),
                       lambda: _scale_torch(*args))
        ctx.scaling, ctx.bias_in_result = scaling, bias_in_result
        ctx.dtypes = (result.dtype, None, lora.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(u, magnitude, norm)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, magnitude, norm = ctx.saved_tensors
        need_r, need_l, need_m, _, _, need_bias = ctx.needs_input_grad[:6]
        needs = (need_r, False, need_l, need_m, need_bias and ctx.dtypes[3] is not None)
        kw = dict(bias_in_result=ctx.bias_in_result, dtypes=ctx.dtypes, needs=needs)
        fits = _kernels_fit(dy, (u,) if u is not None else (), magnitude, norm,
                            (dy.dtype, magnitude.dtype) + tuple(d for d in ctx.dtypes if d is not None)
                            + ((u.dtype,) if u is not None else ()))
        dr, _, dl, dm, dbias = _choose(
            fits, dy, lambda: _grads_triton(dy, u, magnitude, norm, ctx.scaling, dropout=False, **kw),
            lambda: _scale_grads_torch(dy, u, magnitude, norm, ctx.scaling, **kw))
        return dr, dl, dm, None, None, dbias, None, None, None


class _Dropout(torch.autograd.Function):
    """y = result + (g − 1) ⊙ b̃ + g ⊙ s·l̃."""

    @staticmethod
    def forward(ctx, result, base_dropped, lora_dropped, magnitude, norm, scaling, out_dtype, need_u):
        u_dtype = torch.promote_types(base_dropped.dtype, lora_dropped.dtype)
        dtypes = (result.dtype, base_dropped.dtype, lora_dropped.dtype, magnitude.dtype, out_dtype, u_dtype)
        fits = _kernels_fit(result, (base_dropped, lora_dropped), magnitude, norm, dtypes)
        y, u = _choose(fits, result,
                       lambda: _combine_triton(result, base_dropped, lora_dropped, magnitude, norm, scaling, None,
                                               False, out_dtype, u_dtype, need_u),
                       lambda: _dropout_torch(result, base_dropped, lora_dropped, magnitude, norm, scaling, out_dtype,
                                              u_dtype, need_u))
        ctx.scaling = scaling
        ctx.dtypes = (result.dtype, base_dropped.dtype, lora_dropped.dtype, None)
        ctx.save_for_backward(u, magnitude, norm)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, magnitude, norm = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4]) + (False,)
        fits = _kernels_fit(dy, (u,) if u is not None else (), magnitude, norm,
                            (dy.dtype, magnitude.dtype) + ctx.dtypes[:3] + ((u.dtype,) if u is not None else ()))
        dr, db, dl, dm, _ = _choose(
            fits, dy,
            lambda: _grads_triton(dy, u, magnitude, norm, ctx.scaling, dropout=True, bias_in_result=False,
                                  dtypes=ctx.dtypes, needs=needs),
            lambda: _dropout_grads_torch(dy, u, magnitude, norm, ctx.scaling, dtypes=ctx.dtypes, needs=needs))
        return dr, db, dl, dm, None, None, None, None


def _needs_u(magnitude: Tensor) -> bool:
    """u is kept for dm only: where m trains and autograd records the call."""
    return torch.is_grad_enabled() and magnitude.requires_grad


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
    return _Scale.apply(result, lora, magnitude, norm, float(scaling), bias, bias_in_result, out_dtype,
                        _needs_u(magnitude))


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
    return _Dropout.apply(result, base_dropped, lora_dropped, magnitude, norm, float(scaling), out_dtype,
                          _needs_u(magnitude))
