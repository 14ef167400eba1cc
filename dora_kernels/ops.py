"""Launchers, the autograd Function and the functional op ``dora_linear``.

Every launcher takes and returns tensors and has two bodies: the Triton kernels (CUDA, or
CPU through the interpreter) and a pure-torch path with the same memory-lean math (CPU
without the interpreter, and float64). Shapes: ``x (N, K)``, ``W (M, K)``, ``A (R, K)``,
``B (M, R)``, ``m, n, bias (M,)``.
"""

from __future__ import annotations

import math

import torch

from . import heuristics as H
from . import kernels as K_
from ._launch import INTERPRET, launch, target, uses_triton

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# helpers

def _prec() -> str:
    # The GPU's fp32 tl.dot defaults to tf32; follow torch's switch for fp32 matmuls instead.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _upcast(dtype) -> bool:
    # The interpreter computes bf16 arithmetic and bf16 dots wrongly: upcast after the load.
    return INTERPRET and dtype in _HALF


def _lora_f32(x_dtype, a_dtype) -> bool:
    return INTERPRET or x_dtype not in _HALF or a_dtype != x_dtype


def _g(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """g = m / n in fp32, 0 where n = 0 (a zero row of V gives u = 0, so y = bias there)."""
    m = magnitude.float()
    return torch.where(norm > 0, m / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(m))


def _torch_keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


def dropout_mask(seed: int, shape, p: float, device="cpu") -> torch.Tensor:
    """The boolean keep-mask that the op builds for an ``x`` of ``shape`` from ``seed``.

    The fused op never stores it; tests hand it to ``reference.dora_linear(dropout_mask=)``.
    ``device`` selects the path exactly as the op does (CUDA or interpreter: Philox in-kernel;
    plain CPU: torch's generator).
    """
    shape = tuple(shape)
    k = shape[-1] if shape else 1
    n = math.prod(shape[:-1]) if len(shape) > 1 else 1
    probe = torch.empty(0, device=device)
    if not uses_triton(probe):
        return _torch_keep_mask(seed, (n, k), p, probe.device).reshape(shape)
    out = torch.empty((n, k), dtype=torch.int8, device=device)
    if n and k:
        grid = (triton_cdiv(n, 32), triton_cdiv(k, 64))
        launch(K_._mask_kernel, grid, (out, n, k, float(p), int(seed)), {"BLOCK_N": 32, "BLOCK_K": 64},
               writes=[out])
    return out.bool().reshape(shape)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# weight norm

def weight_norm(weight, lora_A, lora_B, scaling: float, *, with_wa: bool = False):
    """Row norms ``n = ‖W0 + s·B·A‖`` (M,) in fp32, in one pass over W0, never forming B·A.

    With ``with_wa`` also returns ``W0·Aᵀ`` (M, R) fp32 (the exact norm gradient needs it),
    else None.
    """
    M, K = weight.shape
    R = lora_A.shape[0]
    dev = weight.device
    norm = torch.empty(M, dtype=torch.float32, device=dev)
    wa = torch.empty((M, R), dtype=torch.float32, device=dev) if with_wa else None
    if M == 0:
        return norm, wa
    if not uses_triton(weight):
        A32, B32 = lora_A.float(), lora_B.float()
        rows = max(1, (1 << 22) // max(K, 1))
        for i in range(0, M, rows):
            w = weight[i:i + rows].float()
            v = torch.addmm(w, B32[i:i + rows], A32, alpha=scaling)
            norm[i:i + rows] = torch.linalg.vector_norm(v, dim=1)
            if with_wa:
                wa[i:i + rows] = w @ A32.T
        return norm, wa
    arch, _ = target(weight)
    cfg = H.norm_config(M, K, R, weight.dtype, arch)
    meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_K", "BLOCK_R", "num_warps", "num_stages")}
    meta.update(WITH_WA=with_wa, UPCAST=_upcast(weight.dtype) or _upcast(lora_A.dtype),
                LORA_F32=_lora_f32(weight.dtype, lora_A.dtype), PREC=_prec())
    wa_arg = wa if with_wa else norm
    launch(K_._norm_kernel, (triton_cdiv(M, cfg["BLOCK_M"]),),
           (norm, wa_arg, wa.stride(0) if with_wa else 0, weight, *weight.stride(), lora_A, *lora_A.stride(),
            lora_B, *lora_B.stride(), M, K, R, float(scaling)), meta,
           flops=2 * M * K * R * (2 if with_wa else 1) + 3 * M * K,
           reads=[weight, lora_A, lora_B], writes=[norm] + ([wa] if with_wa else []))
    return norm, wa


# ---------------------------------------------------------------------------------------------
# forward

def _xa(x, lora_A, p, seed, inv_keep):
    N, K = x.shape
    R = lora_A.shape[0]
    xa = torch.empty((N, R), dtype=torch.float32, device=x.device)
    if N == 0:
        return xa
    arch, _ = target(x)
    cfg = H.xa_config(N, K, R, x.dtype, arch)
    meta = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_K", "BLOCK_R", "num_warps", "num_stages")}
    meta.update(HAS_DROPOUT=p > 0, UPCAST=_upcast(x.dtype) or _upcast(lora_A.dtype),
                LORA_F32=_lora_f32(x.dtype, lora_A.dtype), PREC=_prec())
    launch(K_._xa_kernel, (triton_cdiv(N, cfg["BLOCK_N"]), triton_cdiv(R, cfg["BLOCK_R"])),
           (xa, x, *x.stride(), lora_A, *lora_A.stride(), N, K, R, float(p), int(seed), float(inv_keep)), meta,
           flops=2 * N * K * R, reads=[x, lora_A], writes=[xa])
    return xa


def dora_forward(x, weight, lora_A, lora_B, magnitude, scaling, bias, norm, *, p=0.0, seed=0):
    """y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias, g = m / n; PEFT's dropout form when p > 0.

    x: (N, K) with unit last stride; norm: (M,) fp32. Returns ``(y, xa, ud)``: y (N, M) in x's
    dtype, xa = x̃·Aᵀ (N, R) fp32, and with dropout ũ = x̃·W0ᵀ + s·xa·Bᵀ (N, M) (else None).
    """
    N, K = x.shape
    M = weight.shape[0]
    R = lora_A.shape[0]
    inv_keep = 1.0 / (1.0 - p)
    dev = x.device
    if not uses_triton(x):
        xd = x
        if p > 0:
            xd = x * _torch_keep_mask(seed, (N, K), p, dev).to(x.dtype)
        xa = (xd.to(torch.promote_types(x.dtype, lora_A.dtype)) @ lora_A.T.to(
            torch.promote_types(x.dtype, lora_A.dtype))).float() * inv_keep
        g = _g(magnitude, norm)
        lora = xa @ lora_B.float().T
        base = (x @ weight.T).float()
        if p > 0:
            basd = (xd @ weight.T).float() * inv_keep
            ud = basd + scaling * lora
            y = base + g * ud - basd
            ud = ud.to(x.dtype)
        else:
            ud = None
            y = g * (base + scaling * lora)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype), xa, ud

    y = torch.empty((N, M), dtype=x.dtype, device=dev)
    ud = torch.empty((N, M), dtype=x.dtype, device=dev) if p > 0 else None
    xa = _xa(x, lora_A, p, seed, inv_keep)
    if N == 0 or M == 0:
        return y, xa, ud
    arch, _ = target(x)
    cfg = H.gemm_config(N, M, K, x.dtype, arch, dual=p > 0)
    meta = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "GROUP_N", "num_warps", "num_stages")}
    meta.update(BLOCK_R=H.block_r(R), HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0,
                UPCAST=_upcast(x.dtype), PREC=_prec())
    grid = (triton_cdiv(N, cfg["BLOCK_N"]) * triton_cdiv(M, cfg["BLOCK_M"]),)
    ud_arg = ud if ud is not None else y
    launch(K_._fwd_kernel, grid,
           (y, *y.stride(), ud_arg, *ud_arg.stride(), x, *x.stride(), weight, *weight.stride(),
            lora_B, *lora_B.stride(), xa, magnitude, norm, bias if bias is not None else norm,
            N, M, K, R, float(scaling), float(p), int(seed), float(inv_keep)), meta,
           flops=2 * N * M * K * (2 if p > 0 else 1) + 2 * N * M * R + 4 * N * M,
           reads=[x, weight, lora_B, xa, magnitude, norm] + ([bias] if bias is not None else []),
           writes=[y] + ([ud] if ud is not None else []))
    return y, xa, ud


# ---------------------------------------------------------------------------------------------
# backward

def _sum_partials(part, out_dtype, scale, colscale=None):
    """scale · colscale · Σ_t part[t] for part (T, ...) fp32, in out_dtype."""
    T = part.shape[0]
    shape = part.shape[1:]
    L = math.prod(shape)
    out = torch.empty(shape, dtype=out_dtype, device=part.device)
    if L == 0:
        return out
    C = colscale.numel() if colscale is not None else 1
    launch(K_._sum_partials_kernel, (triton_cdiv(L, 1024),),
           (out, part, colscale if colscale is not None else part, T, L, C, float(scale)),
           {"BLOCK": 1024, "HAS_COLSCALE": colscale is not None, "num_warps": 4},
           flops=T * L, reads=[part] + ([colscale] if colscale is not None else []), writes=[out])
    return out


def dora_backward(grad, x, weight, lora_A, lora_B, magnitude, scaling, bias, norm, xa, u, *, u_is_y,
                  p=0.0, seed=0, need_dx=True):
    """Gradients of the detached-norm DoRA linear.

    grad: (N, M) = dL/dy; u: y (``u_is_y``: u = (y − bias)/g is recovered) or ũ (dropout).
    Returns ``(dx or None, dA, dB, dm_raw)`` where ``dm_raw = Σ_tokens G ⊙ u`` (M,) fp32
    (dm = dm_raw / n) and dA, dB are in the adapters' dtypes.
    """
    N, K = x.shape
    M = weight.shape[0]
    R = lora_A.shape[0]
    dev = x.device
    inv_keep = 1.0 / (1.0 - p)
    if not uses_triton(x):
        g = _g(magnitude, norm)
        G = grad.float()
        if u_is_y:
            yb = u.float() - (bias.float() if bias is not None else 0.0)
            inv = torch.where(g != 0, 1.0 / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(g))
            uu = yb * inv
        else:
            uu = u.float()
        dm_raw = (G * uu).sum(0)
        gs = G * g
        gb = gs @ lora_B.float()
        dB = (scaling * (gs.T @ xa)).to(lora_B.dtype)
        keep = _torch_keep_mask(seed, (N, K), p, dev) if p > 0 else None
        xd = x.float() if keep is None else x.float() * keep
        dA = (scaling * inv_keep * (gb.T @ xd)).to(lora_A.dtype)
        dx = None
        if need_dx:
            if p > 0:
                dxd = ((G * (g - 1)).to(x.dtype) @ weight).float() + scaling * (gb @ lora_A.float())
                dx = (grad @ weight).float() + dxd * keep * inv_keep
            else:
                dx = (gs.to(x.dtype) @ weight).float() + scaling * (gb @ lora_A.float())
            dx = dx.to(x.dtype)
        return dx, dA, dB, dm_raw

    arch, sms = target(x)
    if N == 0 or M == 0:
        return (torch.zeros_like(x) if need_dx else None, torch.zeros_like(lora_A), torch.zeros_like(lora_B),
                torch.zeros(M, dtype=torch.float32, device=dev))
    cfg = H.bwd_g_config(N, M, R, x.dtype, arch, sms)
    T, S, RC = cfg["T"], cfg["S"], cfg["RC"]
    gb = torch.empty((S, N, R), dtype=torch.float32, device=dev)
    dm_part = torch.empty((T, M), dtype=torch.float32, device=dev)
    db_part = torch.empty((T, M, R), dtype=torch.float32, device=dev)
    meta = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_R", "num_warps", "num_stages")}
    meta.update(HAS_BIAS=bias is not None, U_IS_Y=u_is_y, PREC=_prec())
    launch(K_._bwd_g_kernel, (T, S, RC),
           (gb, dm_part, db_part, grad, *grad.stride(), u, *u.stride(), xa, lora_B, *lora_B.stride(),
            magnitude, norm, bias if bias is not None else norm, N, M, R, cfg["TOK_PER_PROG"], cfg["COL_PER_PROG"]),
           meta, flops=4 * N * M * R + 5 * N * M,
           reads=[grad, u, xa, lora_B, magnitude, norm], writes=[gb, dm_part, db_part])

    dcfg = H.gemm_config(N, K, M, x.dtype, arch, dual=p > 0)
    dx = torch.empty((N, K), dtype=x.dtype, device=dev) if need_dx else None
    tn = triton_cdiv(N, dcfg["BLOCK_N"])
    da_part = torch.empty((tn, R, K), dtype=torch.float32, device=dev)
    if need_dx:
        meta = {k: dcfg[k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "GROUP_N", "num_warps", "num_stages")}
        grid = (tn * triton_cdiv(K, dcfg["BLOCK_K"]),)
        flops = 2 * N * M * K * (2 if p > 0 else 1) + 4 * N * K * R
    else:
        # Only dA: the same kernel with the M loop compiled out, tiles sized for the x pass.
        meta = {"BLOCK_N": dcfg["BLOCK_N"], "BLOCK_M": 16, "BLOCK_K": dcfg["BLOCK_K"], "GROUP_N": 8,
                "num_warps": 4, "num_stages": 1 if arch is None else 2}
        grid = (tn * triton_cdiv(K, dcfg["BLOCK_K"]),)
        flops = 2 * N * K * R
    meta.update(BLOCK_R=H.block_r(R), HAS_DROPOUT=p > 0, WITH_DX=need_dx,
                UPCAST=_upcast(x.dtype), PREC=_prec())
    dx_arg = dx if dx is not None else x
    launch(K_._dx_kernel, grid,
           (dx_arg, *dx_arg.stride(), da_part, grad, *grad.stride(), weight, *weight.stride(), lora_A,
            *lora_A.stride(), x, *x.stride(), gb, magnitude, norm, N, M, K, R, S, float(scaling), float(p),
            int(seed), float(inv_keep)), meta, flops=flops,
           reads=([grad, weight] if need_dx else []) + [lora_A, x, gb, magnitude, norm],
           writes=([dx] if need_dx else []) + [da_part])
    dA = _sum_partials(da_part, lora_A.dtype, scaling * inv_keep)
    dB = _sum_partials(db_part, lora_B.dtype, scaling)
    dm_raw = _sum_partials(dm_part, torch.float32, 1.0)
    return dx, dA, dB, dm_raw


# ---------------------------------------------------------------------------------------------
# autograd

NORM_GRADS = ("detached", "exact")


class DoRAFunction(torch.autograd.Function):
    """Fused DoRA linear on 2-D x. Saves x, xa (N, R) fp32, the norm (M,) fp32 and one
    (N, M) tensor: the output y (u is recovered as (y − bias)/g) or, with dropout, ũ."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, p, seed, norm_grad, norm):
        with_wa = norm_grad == "exact" and (lora_A.requires_grad or lora_B.requires_grad)
        wa = None
        if norm is None or with_wa:
            norm, wa = weight_norm(weight, lora_A, lora_B, scaling, with_wa=with_wa)
        y, xa, ud = dora_forward(x, weight, lora_A, lora_B, magnitude, scaling, bias, norm, p=p, seed=seed)
        ctx.scaling, ctx.p, ctx.seed, ctx.norm_grad = scaling, p, seed, norm_grad
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, bias, norm, xa, y if ud is None else ud, wa)
        ctx.u_is_y = ud is None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_A, lora_B, magnitude, bias, norm, xa, u, wa = ctx.saved_tensors
        s = ctx.scaling
        need_dx, _, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:6]
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        dx, dA, dB, dm_raw = dora_backward(grad, x, weight, lora_A, lora_B, magnitude, s, bias, norm, xa, u,
                                           u_is_y=ctx.u_is_y, p=ctx.p, seed=ctx.seed, need_dx=need_dx)
        inv_n = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, torch.ones_like(norm)),
                            torch.zeros_like(norm))
        dm = dm_raw * inv_n
        if ctx.norm_grad == "exact" and (need_a or need_b):
            # n depends on A and B: dn_j = −(m_j / n_j) · dm_j; with V = W0 + s·B·A,
            # dB += s·diag(c)·V·Aᵀ and dA += s·Bᵀ·diag(c)·V, c = −(m / n²) ⊙ dm (spec).
            c = -magnitude.float() * inv_n * inv_n * dm
            A32, B32 = lora_A.float(), lora_B.float()
            cB = c[:, None] * B32
            dB = (dB.float() + s * (c[:, None] * wa + s * cB @ (A32 @ A32.T))).to(lora_B.dtype)
            cBW = (cB.T.to(weight.dtype) @ weight).float() if weight.dtype != torch.float64 else cB.T @ weight
            dA = (dA.float() + s * (cBW + s * (B32.T @ cB) @ A32)).to(lora_A.dtype)
        dbias = grad.sum(0).to(bias.dtype) if (need_bias and bias is not None) else None
        return (dx, None, dA if need_a else None, dB if need_b else None,
                dm.to(magnitude.dtype) if need_m else None, dbias, None, None, None, None, None)


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
        if t.dtype not in _FLOATS:
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


def _autocast(x, weight, bias):
    """Under autocast, x/weight/bias take the autocast dtype as nn.Linear's would; the adapters
    keep theirs (the op accepts wider adapters)."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
    return x, weight, bias


def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, *, dropout_p=0.0, training=True,
                norm_grad="detached", dropout_seed=None, weight_norm=None):
    """Fused DoRA linear, differentiable in x, lora_A, lora_B, magnitude (and bias).

    x: (..., in); weight: (out, in), any strided view (not copied); bias: (out,) or None;
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
    """
    scaling = check_inputs(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p, norm_grad)
    x, weight, bias = _autocast(x, weight, bias)
    p = float(dropout_p) if training else 0.0
    seed = 0
    if p > 0:
        seed = int(dropout_seed) if dropout_seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight_norm is not None and (weight_norm.dtype != torch.float32 or weight_norm.shape != magnitude.shape):
        raise ValueError(f"weight_norm must be a float32 tensor of shape {tuple(magnitude.shape)}, "
                         f"got {_name_of(weight_norm)}")
    with torch.autocast(x.device.type, enabled=False) if x.device.type in ("cuda", "cpu") else _null():
        y = DoRAFunction.apply(x2, weight, lora_A, lora_B, magnitude, bias, scaling, p, seed, norm_grad,
                               weight_norm)
    return y.reshape(*lead, weight.shape[0])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
