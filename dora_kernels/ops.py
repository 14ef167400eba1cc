"""The public op: input checks, autocast, the ``torch.library`` ops and their autograd, ``dora_linear``.

Two opaque custom ops wrap the bodies (``launchers``: the Triton kernels, compiled or
interpreted; ``torch_path``: pure torch), chosen at run time on real tensors by
``backend.uses_triton``, exactly as in eager mode, so ``torch.compile`` sees one node per layer:

- ``dora_kernels::dora_forward(x, weight, lora_A, lora_B, magnitude, scaling, bias?, norm?,
  dropout_p, dropout_seed?, norm_grad, need_u, save_output) -> (y, xa, u, norm, wa)``: x (N, K)
  2-D; y (N, M) in x's dtype; xa = x̃·Aᵀ (N, R) (``common.xa_dtype``); u = x̃·W0ᵀ + s·xa·Bᵀ (N, M)
  when ``need_u`` (``common.u_dtype``), else empty; norm (M,) fp32 (empty when the given norm is
  reused); wa = W0·Aᵀ (M, R) fp32 when ``norm_grad == "exact"``, else empty. ``save_output``
  (no dropout, no bias, instead of ``need_u``): the backward reads y. ``dropout_seed`` is a CPU
  int64 tensor of one element (None without dropout), so a compiled graph keeps the draw inside.
- ``dora_kernels::dora_backward(...) -> (dx, dA, dB, dm, dbias)``, empty where not needed.

``register_fake`` gives the shapes to the compiler; ``register_autograd`` ties them together.
Only y carries a gradient; the other outputs are intermediates kept for the backward.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import launchers, torch_path
from .backend import get_backend, uses_triton
from .common import FLOATS, NORM_GRADS, recip, u_dtype, xa_dtype
from .runtime import KernelUnavailable, is_recording

_F32 = torch.float32
_WARNED: set = set()


def _call(fn: str, t: Tensor, *args, **kwargs):
    """``launchers.<fn>`` where the Triton kernels run on tensors like ``t``, else ``torch_path.<fn>``
    (see ``_run``)."""
    return _run(t, lambda: getattr(launchers, fn)(*args, **kwargs), lambda: getattr(torch_path, fn)(*args, **kwargs))


def _run(t: Tensor, on_triton, on_torch):
    """``on_triton()`` where the Triton kernels run on tensors like ``t``, else ``on_torch()``.

    In the ``auto`` backend a kernel that cannot compile or launch on this GPU
    (``runtime.KernelUnavailable``) sends the step to the torch path, with one warning per
    kernel, config and device; ``DORA_KERNELS_STRICT=1`` or the ``triton`` backend raise instead.
    """
    if (t.device.type == "meta" and is_recording()) or uses_triton(t):
        try:
            return on_triton()
        except KernelUnavailable as e:
            if get_backend() == "triton" or os.environ.get("DORA_KERNELS_STRICT", "0") == "1":
                raise
            key = (e.kernel, e.config, e.device)
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(f"dora_kernels: {e}; running the pure-torch path instead (DORA_KERNELS_STRICT=1 "
                              "raises)", RuntimeWarning, stacklevel=4)
    return on_torch()


# ---------------------------------------------------------------------------------------------
# public helpers

def weight_norm(weight, lora_A, lora_B, scaling: float, *, with_wa: bool = False):
    """Row norms ``n = ‖W0 + s·B·A‖`` (M,) in fp32, in one pass over W0, never forming B·A.

    With ``with_wa`` also returns ``W0·Aᵀ`` (M, R) fp32 (the exact norm gradient needs it),
    else None.
    """
    if not isinstance(weight, torch.Tensor):
        from . import quant

        if isinstance(weight, quant.QuantWeight):
            return quant.weight_norm(weight, lora_A, lora_B, scaling, with_wa=with_wa)
    if torch.compiler.is_compiling():  # (traced by torch.compile: the torch path, which it can trace)
        with torch.no_grad():  # (a constant, as the kernels' norm)
            return torch_path.weight_norm(weight, lora_A, lora_B, scaling, with_wa=with_wa)
    return _call("weight_norm", weight, weight, lora_A, lora_B, scaling, with_wa=with_wa)


def dropout_mask(seed: int, shape, p: float, device="cpu") -> torch.Tensor:
    """The boolean keep-mask that the op builds for an ``x`` of ``shape`` from ``seed``.

    The fused op never stores it; tests hand it to ``reference.dora_linear(dropout_mask=)``.
    ``device`` selects the path exactly as the op does (the kernels: Philox in-kernel; the torch
    path: torch's generator).
    """
    shape = tuple(shape)
    K = shape[-1] if shape else 1
    N = math.prod(shape[:-1]) if len(shape) > 1 else 1
    probe = torch.empty(0, device=device)
    return _call("dropout_mask", probe, seed, N, K, p, probe.device).reshape(shape)


def draw_seed() -> torch.Tensor:
    """The dropout seed ``dora_linear`` draws when none is given: one int64 from torch's default
    CPU generator, so ``torch.manual_seed`` and checkpointing's RNG restore replay it."""
    return torch.randint(0, 2**31 - 1, (1,))


def _seed(dropout_seed: Optional[Tensor]) -> int:
    return int(dropout_seed.item()) if dropout_seed is not None else 0


# ---------------------------------------------------------------------------------------------
# the torch.library ops

@torch.library.custom_op("dora_kernels::dora_forward", mutates_args=())
def dora_forward(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                 bias: Optional[Tensor], norm: Optional[Tensor], dropout_p: float, dropout_seed: Optional[Tensor],
                 norm_grad: str, need_u: bool, save_output: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, xa, u, n, wa = _call("dora_forward", x, x, weight, lora_A, lora_B, magnitude, scaling, bias, norm=norm,
                            dropout_p=dropout_p, dropout_seed=_seed(dropout_seed), with_wa=norm_grad == "exact",
                            need_u=need_u, need_xa=need_u or save_output)
    if n is norm:  # a custom op's outputs may not alias its inputs: the given norm is not returned
        n = n.new_empty(0)
    return y, xa, u if u is not None else x.new_empty(0), n, wa if wa is not None else n.new_empty(0)


@dora_forward.register_fake
def _(x, weight, lora_A, lora_B, magnitude, scaling, bias, norm, dropout_p, dropout_seed, norm_grad, need_u,
      save_output):
    N, M, R = x.shape[0], weight.shape[0], lora_A.shape[0]
    exact = norm_grad == "exact"
    u = x.new_empty((N, M), dtype=u_dtype(x.dtype, lora_A.dtype, dropout_p)) if need_u else x.new_empty(0)
    n = (M,) if (norm is None or exact) else (0,)
    return (x.new_empty((N, M)), x.new_empty((N, R), dtype=xa_dtype(lora_A.dtype)), u,
            x.new_empty(n, dtype=_F32), x.new_empty((M, R) if exact else (0,), dtype=_F32))


@torch.library.custom_op("dora_kernels::dora_backward", mutates_args=())
def dora_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                  scaling: float, bias: Optional[Tensor], norm: Tensor, xa: Tensor, saved: Tensor, wa: Optional[Tensor],
                  dropout_p: float, dropout_seed: Optional[Tensor], norm_grad: str, save_output: bool, need_dx: bool,
                  need_a: bool, need_b: bool, need_m: bool, need_bias: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backward(dy, x, weight, lora_A, lora_B, magnitude, scaling, bias, norm, xa, saved, wa,
                      dropout_p=dropout_p, dropout_seed=_seed(dropout_seed), norm_grad=norm_grad,
                      save_output=save_output, need_dx=need_dx, need_a=need_a, need_b=need_b, need_m=need_m,
                      need_bias=need_bias)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@dora_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, scaling, bias, norm, xa, saved, wa, dropout_p, dropout_seed, norm_grad,
      save_output, need_dx, need_a, need_b, need_m, need_bias):
    def like(t, need):
        return torch.empty_like(t) if need else x.new_empty(0)

    return (like(x, need_dx), like(lora_A, need_a), like(lora_B, need_b), like(magnitude, need_m),
            like(bias, need_bias) if bias is not None else x.new_empty(0))


def _backward(dy, x, weight, lora_A, lora_B, magnitude, scaling, bias, norm, xa, saved, wa, *, dropout_p, dropout_seed,
              norm_grad, save_output, need_dx, need_a, need_b, need_m, need_bias):
    """``(dx, dA, dB, dm, dbias)`` (None where not needed) from what the forward saved: ``saved``
    is u (ũ with dropout), or the output y with ``save_output`` (no dropout, no bias); ``wa`` =
    W0·Aᵀ when ``norm_grad == "exact"`` (the norm is differentiated)."""
    N, M, R = x.shape[0], weight.shape[0], lora_A.shape[0]
    if save_output and (dropout_p > 0 or bias is not None):
        raise ValueError("dora_backward: save_output needs no dropout and no bias (the forward saves u then)")
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dbias = dy.sum(0).to(bias.dtype) if (need_bias and bias is not None) else None
    if not (need_dx or need_a or need_b or need_m):  # only the bias: the forward kept no u
        return None, None, None, None, dbias
    if norm.shape != (M,) or xa.shape != (N, R) or saved.shape != (N, M) or dy.shape != (N, M):
        raise ValueError(f"dora_backward: norm {tuple(norm.shape)}, xa {tuple(xa.shape)}, saved {tuple(saved.shape)} "
                         f"and dy {tuple(dy.shape)} must be ({M},), ({N}, {R}), ({N}, {M}) and ({N}, {M})")
    u, y = (None, saved) if save_output else (saved, None)
    # dA is needed by the exact norm gradient's correction only when A itself trains
    dx, dA, dB, dm = _call("dora_backward", x, dy, x, weight, lora_A, lora_B, magnitude, scaling, norm, xa, u=u, y=y,
                           dropout_p=dropout_p, dropout_seed=dropout_seed, need_dx=need_dx, need_a=need_a)
    if norm_grad == "exact" and (need_a or need_b):
        dA, dB = _exact_norm_grad(dA, dB, dm, weight, lora_A, lora_B, magnitude, scaling, norm, wa)
    return (dx if need_dx else None, dA if need_a else None, dB if need_b else None,
            dm if need_m else None, dbias)


def _exact_norm_grad(dA, dB, dm, weight, lora_A, lora_B, magnitude, scaling, norm, wa):
    """dA, dB with the gradient through the norm added. n depends on A and B: dn_j = −(m_j / n_j)·dm_j;
    with V = W0 + s·B·A, dB += s·diag(c)·V·Aᵀ and dA += s·Bᵀ·diag(c)·V, c = −(m / n²) ⊙ dm (spec),
    from wa = W0·Aᵀ and one more pass over W0."""
    s = scaling
    inv_n = recip(norm, norm > 0)
    c = -magnitude.float() * inv_n * inv_n * dm.float()
    A32, B32 = lora_A.float(), lora_B.float()
    cB = c[:, None] * B32
    dB = (dB.float() + s * (c[:, None] * wa + s * cB @ (A32 @ A32.T))).to(lora_B.dtype)
    if dA is not None:  # (a frozen A needs neither this nor its pass over W0)
        cBW = (cB.T.to(weight.dtype) @ weight).float() if weight.dtype != torch.float64 else cB.T @ weight
        dA = (dA.float() + s * (cBW + s * (B32.T @ cB) @ A32)).to(lora_A.dtype)
    return dA, dB


INPLACE_HINT = ("the output of dora_linear was modified in place before the backward. The fused op keeps its "
                "output for the backward instead of another (tokens, out) tensor; where the output is modified in "
                "place, pass save_output=False (dora_linear, DoRALinear, or "
                "dora_kernels.fuse(model, save_output=False)).")


def _setup_context(ctx, inputs, output):
    (x, weight, lora_A, lora_B, magnitude, scaling, bias, norm_in, dropout_p, dropout_seed, norm_grad, _need_u,
     save_output) = inputs
    y, xa, u, norm, wa = output
    exact = norm_grad == "exact"
    if norm_in is not None and not exact:
        norm = norm_in
    # Only y carries a gradient: no zero tensors for the others.
    ctx.set_materialize_grads(False)
    ctx.scaling, ctx.dropout_p, ctx.norm_grad, ctx.save_output = scaling, dropout_p, norm_grad, save_output
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, bias, norm, xa, y if save_output else u,
                          wa if exact else None, dropout_seed)


def _saved_or_hint(ctx):
    """``ctx.saved_tensors``, with a hint at ``save_output=False`` when the saved output was
    modified in place."""
    try:
        return ctx.saved_tensors
    except RuntimeError as e:
        if ctx.save_output and "inplace operation" in str(e):
            raise RuntimeError(f"{INPLACE_HINT} ({e})") from e
        raise


def _autograd_backward(ctx, dy, *_):
    x, weight, lora_A, lora_B, magnitude, bias, norm, xa, saved, wa, dropout_seed = _saved_or_hint(ctx)
    need_dx, _, need_a, need_b, need_m, _, need_bias = ctx.needs_input_grad[:7]
    need_bias = need_bias and bias is not None
    dx, dA, dB, dm, dbias = dora_backward(dy, x, weight, lora_A, lora_B, magnitude, ctx.scaling, bias, norm, xa, saved,
                                          wa, ctx.dropout_p, dropout_seed, ctx.norm_grad, ctx.save_output, need_dx,
                                          need_a, need_b, need_m, need_bias)
    return (dx if need_dx else None, None, dA if need_a else None, dB if need_b else None, dm if need_m else None,
            None, dbias if need_bias else None, None, None, None, None, None, None)


dora_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# the functional op

def _name_of(t):
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_inputs(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, norm_grad):
    """Raise a ValueError/TypeError naming the offending argument; return scaling as a float."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    M, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., in={K}) to match weight (out={M}, in={K}), got {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape (r, in={K}), got {tuple(lora_A.shape)}")
    R = lora_A.shape[0]
    if R < 1:
        raise ValueError("lora_A has rank r = 0: the rank must be at least 1")
    if lora_B.dim() != 2 or lora_B.shape != (M, R):
        raise ValueError(f"lora_B must have shape (out={M}, r={R}) to match weight and lora_A (rank), "
                         f"got {tuple(lora_B.shape)}")
    if magnitude.shape != (M,):
        raise ValueError(f"magnitude must have shape (out={M},), got {tuple(magnitude.shape)}")
    if bias is not None and bias.shape != (M,):
        raise ValueError(f"bias must have shape (out={M},), got {tuple(bias.shape)}")
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share a device")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype} (x, weight and bias share "
                        "one dtype; the adapters may be wider)")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1:
            raise ValueError(f"scaling must be a number, got a tensor of shape {tuple(scaling.shape)}")
        scaling = scaling.item()
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    scaling = float(scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if norm_grad not in NORM_GRADS:
        raise ValueError(f"norm_grad must be one of {NORM_GRADS}, got {norm_grad!r}")
    return scaling


_AUTOCASTABLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast(x, weight, bias):
    """Under autocast, x/weight/bias take the autocast dtype as nn.Linear's would; the adapters
    keep theirs (the op accepts wider adapters)."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if x.dtype in _AUTOCASTABLE and weight.dtype in _AUTOCASTABLE:
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if isinstance(bias, torch.Tensor) and bias.dtype in _AUTOCASTABLE else bias
    return x, weight, bias


def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, *, dropout_p=0.0, training=True,
                norm_grad="detached", dropout_seed=None, weight_norm=None, save_output=True):
    """Fused DoRA linear, differentiable in x, lora_A, lora_B, magnitude (and bias).

    x: (..., in); weight: (out, in), any strided view (not copied), or a ``quant.QuantWeight``
    (a bitsandbytes 4-bit / int8 W0, dequantised where it is read: QDoRA); bias: (out,) or None;
    lora_A: (r, in); lora_B: (out, r); magnitude: (out,); scaling: float. Returns (..., out)
    in x's dtype::

        n = ‖W0 + s·B·A‖ (rows, fp32),  g = m / n
        y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias                               (no dropout)
        y = x·W0ᵀ + bias + (g − 1) ⊙ (x̃·W0ᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ             (dropout, training)

    ``norm_grad="detached"`` (PEFT's default, paper §4.3) treats n as a constant; ``"exact"``
    also differentiates it. A row whose ‖V_j‖ is 0 gets g_j = 0 (y_j = bias_j) and dm_j = 0.
    ``dropout_seed`` fixes the in-kernel dropout mask (see ``dropout_mask``); by default it is
    drawn from torch's CPU generator, so checkpointing's RNG restore replays it.
    ``weight_norm`` (out,) fp32: a norm computed earlier for these weights (eval caching).
    ``save_output``: without dropout and bias the backward reads the output y (its memory is held
    anyway wherever the next op keeps it), not a second (…, out) tensor; pass False where y is then
    modified in place (the backward would otherwise raise): u = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ is saved
    instead. With a bias u is always saved (y − bias would lose u's low bits where the bias
    dominates y).
    """
    if not isinstance(weight, torch.Tensor):
        from . import quant  # a quantised W0 (quant.QuantWeight): the same op, W0 dequantised where it is read

        if isinstance(weight, quant.QuantWeight):
            return quant.dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p=dropout_p,
                                     training=training, norm_grad=norm_grad, dropout_seed=dropout_seed,
                                     weight_norm=weight_norm, save_output=save_output)
    if not isinstance(save_output, bool):
        raise TypeError(f"dora_linear: save_output must be a bool, got {type(save_output).__name__}")
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        x, weight, bias = _autocast(x, weight, bias)
    scaling = check_inputs(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, norm_grad)
    p = float(dropout_p) if training else 0.0
    seed = None
    if p > 0:
        # A CPU int64 tensor, not a Python int: torch.compile keeps it in the graph (no .item()).
        seed = torch.tensor([int(dropout_seed)]) if dropout_seed is not None else draw_seed()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight_norm is not None and (weight_norm.dtype != torch.float32 or weight_norm.shape != magnitude.shape):
        raise ValueError(f"weight_norm must be a float32 tensor of shape {tuple(magnitude.shape)}, "
                         f"got {_name_of(weight_norm)}")
    grad = torch.is_grad_enabled()
    if norm_grad == "exact" and not (grad and (lora_A.requires_grad or lora_B.requires_grad)):
        norm_grad = "detached"  # no gradient reaches the norm: W0·Aᵀ is not needed
    no_autocast = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cuda", "cpu") \
        else contextlib.nullcontext()
    with no_autocast:
        need = grad and any(t.requires_grad for t in (x2, lora_A, lora_B, magnitude))
        save_output = need and save_output and p == 0 and bias is None
        y = dora_forward(x2, weight, lora_A, lora_B, magnitude, scaling, bias, weight_norm, p, seed, norm_grad,
                         need and not save_output, save_output)[0]
    return _shaped(y, (*lead, weight.shape[0]), save_output)


def _shaped(y: Tensor, shape, saved: bool) -> Tensor:
    """The op's 2-D output y in the input's leading shape. Not a view where nothing saved aliases y:
    FSDP2 drops its pre-backward hook from a module output that is a view modified in place. A saved
    y stays a view, whose shared version counter makes autograd refuse an in-place change to it."""
    if y.shape == shape:
        return y
    return y.view(shape) if saved else torch.ops.aten._unsafe_view(y, shape)
