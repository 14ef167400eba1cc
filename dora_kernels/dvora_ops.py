"""DVoRA (DoRA over VeRA) on the fused DoRA op, without PEFT.

Shapes (``nn.Linear`` convention): ``x (..., in)``, ``weight`` W0 ``(out, in)``, ``bias (out,)``;
the layer's slices of the shared frozen projections ``vera_A`` A ``(r, in)`` and ``vera_B`` B
``(out, r)``; trainable ``lambda_d`` λ_d ``(r,)``, ``lambda_b`` λ_b ``(out,)``, ``magnitude`` m
``(out,)``::

    ΔW = diag(λ_b)·B·diag(λ_d)·A,  V = W0 + ΔW,  n = ‖V‖ rows (fp32, detached),  g = m / n
    y  = g ⊙ (x·W0ᵀ + ((x·Aᵀ) ⊙ λ_d)·(diag(λ_b)·B)ᵀ) + bias                     (no dropout)
    y  = x·W0ᵀ + bias + (g − 1) ⊙ (x̃·W0ᵀ) + g ⊙ ((x̃·Aᵀ) ⊙ λ_d)·(diag(λ_b)·B)ᵀ   (dropout, PEFT's form)

That is the DoRA op with ``lora_A = A`` (frozen), ``lora_B = B′ = diag(λ_b)·B·diag(λ_d)`` and
``scaling = 1``; no ``(r, in)`` gradient is returned for A. B′ is the ``torch.library`` op
``dora_kernels::dvora_factor(vera_B, lambda_d, lambda_b) -> B′`` (one Triton launch:
``kernels_dvora``), whose backward ``dora_kernels::dvora_factor_backward`` turns the op's dB′ into
``dλ_b = Σ_r (dB′ ⊙ λ_d) ⊙ B`` and ``dλ_d = Σ_out dB′ ⊙ (λ_b ⊙ B)`` in one pass over dB′ and a sum
of per-program partials (two launches); both run the pure-torch path where the kernels do not
(``ops._run``). ``frozen_cast`` keeps a frozen A cast to the adapters' dtype across steps.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from . import heuristics as H
from . import kernels_dvora as KD
from .ops import _run, dora_linear, weight_norm
from .runtime import launch, target

__all__ = ["dvora_delta_weight", "dvora_factors", "dvora_linear", "dvora_weight_norm", "frozen_cast",
           "vera_projections"]


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


# ---------------------------------------------------------------------------------------------
# the factor B′ = diag(λ_b)·B·diag(λ_d): Triton launchers, the torch path, the op

def _factor_dtype(lambda_d, lambda_b) -> torch.dtype:
    return torch.promote_types(lambda_d.dtype, lambda_b.dtype)


def factor_forward(vera_B, lambda_d, lambda_b):
    """``B′ = (λ_b ⊙ B) ⊙ λ_d`` (M, R) in the wider λ dtype: fp32 products rounded once, one launch.
    vera_B (M, R) any strides; lambda_d (R,); lambda_b (M,)."""
    M, R = vera_B.shape
    b = torch.empty((M, R), dtype=_factor_dtype(lambda_d, lambda_b), device=vera_B.device)
    if M and R:
        cfg = H.dvora_b_config(M=M, R=R)
        launch(KD._dvora_b_kernel, cfg.grid, cfg.meta, flops=2 * M * R, unit="vector",
               reads=[vera_B, lambda_b, lambda_d], writes=[b], b=b, vb=vera_B, lb=lambda_b, ld=lambda_d, M=M, R=R)
    return b


def factor_backward(db, vera_B, lambda_d, lambda_b):
    """``(dλ_d (R,), dλ_b (M,))`` in the λs' dtypes from ``db = dL/dB′ (M, R)``: one pass over dB′
    (dλ_b, and fp32 dλ_d partials per block of rows), then the partials' sum."""
    M, R = vera_B.shape
    dev = vera_B.device
    dlb = torch.empty(M, dtype=lambda_b.dtype, device=dev)
    dld = torch.empty(R, dtype=lambda_d.dtype, device=dev)
    if M == 0 or R == 0:
        return dld.zero_(), dlb
    _, sms = target(vera_B)
    cfg = H.dvora_dlambda_config(M=M, R=R, num_sms=sms)
    dld_part = torch.empty((cfg.sizes["T"], R), dtype=torch.float32, device=dev)
    launch(KD._dvora_dlambda_kernel, cfg.grid, cfg.meta, flops=5 * M * R, unit="vector",
           reads=[db, vera_B, lambda_b, lambda_d], writes=[dlb, dld_part],
           dlb=dlb, dld_part=dld_part, db=db, vb=vera_B, lb=lambda_b, ld=lambda_d, M=M, R=R)
    cfg = H.dvora_sum_config(M=M, R=R, block_m=cfg.meta["BLOCK_M"])
    launch(KD._dvora_sum_kernel, cfg.grid, cfg.meta, flops=dld_part.numel(), unit="vector", reads=[dld_part],
           writes=[dld], dld=dld, dld_part=dld_part, M=M, R=R)
    return dld, dlb


def factor_forward_torch(vera_B, lambda_d, lambda_b):
    """As ``factor_forward``, in torch (the same fp32 products, rounded once)."""
    dtype = _factor_dtype(lambda_d, lambda_b)
    return (lambda_b.float()[:, None] * vera_B.float() * lambda_d.float()[None, :]).to(dtype)


def factor_backward_torch(db, vera_B, lambda_d, lambda_b):
    """As ``factor_backward``, in torch: autograd's formulas for ``factor_forward_torch``."""
    g = db.float()
    dld = (g * (lambda_b.float()[:, None] * vera_B.float())).sum(0)
    dlb = ((g * lambda_d.float()[None, :]) * vera_B.float()).sum(1)
    return dld.to(lambda_d.dtype), dlb.to(lambda_b.dtype)


def _probe(lambda_d, lambda_b) -> Tensor:
    # The wider λ: its dtype and device choose the path (float64: torch); vera_B is read in its own dtype.
    return lambda_d if lambda_d.dtype == _factor_dtype(lambda_d, lambda_b) else lambda_b


@torch.library.custom_op("dora_kernels::dvora_factor", mutates_args=())
def dvora_factor(vera_B: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> Tensor:
    """``B′ = diag(λ_b)·B·diag(λ_d)`` (M, R) in the wider λ dtype, differentiable in λ_d, λ_b (and B)."""
    return _run(_probe(lambda_d, lambda_b), lambda: factor_forward(vera_B, lambda_d, lambda_b),
                lambda: factor_forward_torch(vera_B, lambda_d, lambda_b))


@dvora_factor.register_fake
def _(vera_B, lambda_d, lambda_b):
    return vera_B.new_empty(vera_B.shape, dtype=_factor_dtype(lambda_d, lambda_b))


@torch.library.custom_op("dora_kernels::dvora_factor_backward", mutates_args=())
def dvora_factor_backward(db: Tensor, vera_B: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> tuple[Tensor, Tensor]:
    """``(dλ_d, dλ_b)`` from ``db = dL/dB′`` (M, R)."""
    return _run(_probe(lambda_d, lambda_b), lambda: factor_backward(db, vera_B, lambda_d, lambda_b),
                lambda: factor_backward_torch(db, vera_B, lambda_d, lambda_b))


@dvora_factor_backward.register_fake
def _(db, vera_B, lambda_d, lambda_b):
    return lambda_d.new_empty(lambda_d.shape), lambda_b.new_empty(lambda_b.shape)


def _factor_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _factor_autograd_backward(ctx, db):
    vera_B, lambda_d, lambda_b = ctx.saved_tensors
    need_vb, need_d, need_b = ctx.needs_input_grad
    dld = dlb = dvb = None
    if need_d or need_b:
        dld, dlb = dvora_factor_backward(db, vera_B, lambda_d, lambda_b)
    if need_vb:  # (VeRA freezes B; a B that trains gets dB = diag(λ_b)·dB′·diag(λ_d))
        dvb = ((lambda_b.float()[:, None] * db.float()) * lambda_d.float()[None, :]).to(vera_B.dtype)
    return dvb, dld if need_d else None, dlb if need_b else None


dvora_factor.register_autograd(_factor_autograd_backward, setup_context=_factor_setup_context)


# ---------------------------------------------------------------------------------------------
# a frozen A in the adapters' dtype, kept across steps

_FROZEN_CASTS: dict = {}  # (id(src), dtype, device) -> (stamp of src, its copy)


def _stamp(src: Tensor) -> tuple:
    # What a change to src changes: its version counter (in-place writes), storage and layout
    # (``.data =``, ``set_``).
    return src._version, src.data_ptr(), tuple(src.shape), src.stride(), src.dtype, src.device


def frozen_cast(src: Tensor, dtype=None, device=None) -> Tensor:
    """``src.to(device, dtype)`` of a frozen tensor (no grad), copied once and reused while ``src``
    is the same tensor, unchanged: a write to it in place (its ``_version``), new storage, or a new
    tensor in its place makes a new copy; the copy is dropped with ``src``. A tensor that requires
    grad, one already in that dtype and device, and traced code (``torch.compile``) get plain ``.to``.
    The DVoRA layer casts the model's shared ``vera_A`` (r, max_in) with it, so one copy serves
    every layer."""
    dtype = src.dtype if dtype is None else dtype
    device = src.device if device is None else torch.device(device)
    if (src.requires_grad or (src.dtype == dtype and src.device == device) or src.is_inference()
            or torch.is_inference_mode_enabled() or torch.compiler.is_compiling()):
        # (a copy made under inference mode is an inference tensor: kept, training could not save it)
        return src.to(device=device, dtype=dtype)
    key = (id(src), dtype, device)
    stamp = _stamp(src)
    hit = _FROZEN_CASTS.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    copy = src.detach().to(device=device, dtype=dtype)
    if hit is None:  # (id(src) is not reused before src is freed, and with it this entry)
        weakref.finalize(src, _FROZEN_CASTS.pop, key, None)
    _FROZEN_CASTS[key] = (stamp, copy)
    return copy


def dvora_factors(vera_A, vera_B, lambda_d, lambda_b):
    """The DoRA factors of a DVoRA layer: ``(lora_A, lora_B) = (A, diag(λ_b)·B·diag(λ_d))``.

    vera_A (r, in), vera_B (out, r), lambda_d (r,), lambda_b (out,). Both come in the wider of
    the λ dtypes (A as given when it already is: pass ``frozen_cast`` copies to cast it once);
    lora_B is ``dvora_factor``, differentiable in the λs: formed in fp32 and rounded once, so
    16-bit λs lose no more than one rounding.
    """
    for name, t in (("vera_B", vera_B), ("lambda_d", lambda_d)):
        if t.device != lambda_b.device:
            raise ValueError(f"{name} is on {t.device} but lambda_b is on {lambda_b.device}: the factors must "
                             "share a device")
    lora_B = dvora_factor(vera_B, lambda_d, lambda_b)
    return vera_A.to(device=lora_B.device, dtype=lora_B.dtype), lora_B


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
