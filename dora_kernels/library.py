"""The fused op registered with ``torch.library``, so ``torch.compile`` sees one node per layer.

Two opaque custom ops wrap the launchers (Triton kernels, the interpreter or the torch path,
chosen at run time on real tensors exactly as in eager mode):

- ``dora_kernels::dora_fwd(x, weight, lora_A, lora_B, magnitude, bias?, norm?, seed?, scaling,
  p, with_wa, need_u, save_y) -> (y, xa, u, norm, wa)``: x (N, K) 2-D; y (N, M) in x's dtype; xa (N, R)
  (``ops.xa_dtype``); u = x̃·W0ᵀ + s·xa·Bᵀ (N, M) when ``need_u`` (x's dtype; with dropout the wider of x's
  and the adapters'), else empty;
  norm (M,) fp32; wa = W0·Aᵀ (M, R) fp32 for the exact norm gradient, else empty. ``save_y``
  (p = 0 and no bias, instead of ``need_u``): the backward reads y, u = y/g. ``seed``
  is a CPU int64 tensor of one element (None without dropout), so a compiled graph keeps the
  dropout draw inside the graph.
- ``dora_kernels::dora_bwd(...) -> (dx, dA, dB, dm, dbias)``, empty where not needed.

``register_fake`` gives the shapes to the compiler; ``register_autograd`` ties them together
and saves what ``DoRAFunction`` saves. Only y carries a gradient; the other outputs are
intermediates kept for the backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops

_F32 = torch.float32


def _seed(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


@torch.library.custom_op("dora_kernels::dora_fwd", mutates_args=())
def dora_fwd(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, bias: Optional[Tensor],
             norm: Optional[Tensor], seed: Optional[Tensor], scaling: float, p: float,
             with_wa: bool, need_u: bool, save_y: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, xa, ud, n, wa = ops.fused_forward(x, weight, lora_A, lora_B, magnitude, bias, scaling, p, _seed(seed), with_wa,
                                         norm, need_u)
    if n is norm:  # a custom op's outputs may not alias its inputs: the given norm is not returned
        n = n.new_empty(0)
    return (y, xa, ud if ud is not None else x.new_empty(0), n, wa if wa is not None else n.new_empty(0))


@dora_fwd.register_fake
def _(x, weight, lora_A, lora_B, magnitude, bias, norm, seed, scaling, p, with_wa, need_u, save_y):
    N, M, R = x.shape[0], weight.shape[0], lora_A.shape[0]
    u = x.new_empty((N, M), dtype=ops._u_dtype(x.dtype, lora_A.dtype, p)) if need_u else x.new_empty(0)
    n = (M,) if (norm is None or with_wa) else (0,)
    return (x.new_empty((N, M)), x.new_empty((N, R), dtype=ops.xa_dtype(lora_A.dtype)), u,
            x.new_empty(n, dtype=_F32), x.new_empty((M, R) if with_wa else (0,), dtype=_F32))


@torch.library.custom_op("dora_kernels::dora_bwd", mutates_args=())
def dora_bwd(grad: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
             bias: Optional[Tensor], norm: Tensor, xa: Tensor, u: Tensor, wa: Optional[Tensor], seed: Optional[Tensor],
             scaling: float, p: float, exact: bool, need_dx: bool, need_a: bool, need_b: bool, need_m: bool,
             need_bias: bool, from_y: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = ops.fused_backward(grad, x, weight, lora_A, lora_B, magnitude, bias, norm, xa, u, wa, scaling, p,
                               _seed(seed), exact=exact, need_dx=need_dx, need_a=need_a, need_b=need_b,
                               need_m=need_m, need_bias=need_bias, from_y=from_y)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@dora_bwd.register_fake
def _(grad, x, weight, lora_A, lora_B, magnitude, bias, norm, xa, u, wa, seed, scaling, p, exact, need_dx, need_a,
      need_b, need_m, need_bias, from_y):
    def like(t, need):
        return torch.empty_like(t) if need else x.new_empty(0)

    return (like(x, need_dx), like(lora_A, need_a), like(lora_B, need_b), like(magnitude, need_m),
            like(bias, need_bias) if bias is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, magnitude, bias, norm_in, seed, scaling, p, with_wa, _need_u, save_y = inputs
    y, xa, u, norm, wa = output
    if norm_in is not None and not with_wa:
        norm = norm_in
    # Only y carries a gradient: no zero tensors for the others.
    ctx.set_materialize_grads(False)
    ctx.scaling, ctx.p, ctx.exact, ctx.from_y = scaling, p, with_wa, save_y
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, bias, norm, xa, y if save_y else u,
                          wa if with_wa else None, seed)


def _backward(ctx, grad, *_):
    x, weight, lora_A, lora_B, magnitude, bias, norm, xa, u, wa, seed = ops.saved_or_hint(ctx)
    need_dx, _, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:6]
    need_bias = need_bias and bias is not None
    dx, dA, dB, dm, dbias = dora_bwd(grad, x, weight, lora_A, lora_B, magnitude, bias, norm, xa, u, wa, seed,
                                     ctx.scaling, ctx.p, ctx.exact, need_dx, need_a, need_b, need_m, need_bias,
                                     ctx.from_y)
    return (dx if need_dx else None, None, dA if need_a else None, dB if need_b else None, dm if need_m else None,
            dbias if need_bias else None, None, None, None, None, None, None, None)


dora_fwd.register_autograd(_backward, setup_context=_setup_context)
