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
    # Without tf32, "tf32x3" (three tf32 products) keeps fp32 accuracy on the tensor cores
    # (the "ieee" FMA path spills registers in these kernels).
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _epi_prec() -> str:
    # The forward's one rank-r dot per tile: plain fp32 FMAs fit its registers best.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _split(x_dtype) -> bool:
    # bf16 G and x are exact as bf16 dot operands: the fp32 rank-r operands are split into
    # three bf16 parts instead (kernels._dot_exact_bf16). Not under the interpreter, whose
    # bf16 dots are wrong (tests/test_split_dots.py patches it to check this path).
    return x_dtype == torch.bfloat16 and not INTERPRET


def _upcast(dtype) -> bool:
    # The interpreter computes bf16 arithmetic and bf16 dots wrongly: upcast after the load.
    return INTERPRET and dtype in _HALF


def _lora_f32(x_dtype, a_dtype) -> bool:
    return INTERPRET or x_dtype not in _HALF or a_dtype != x_dtype


def _recip(v: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """1 / v where ``ok``, else 0 (no division by the other entries)."""
    return torch.where(ok, 1.0 / torch.where(ok, v, torch.ones_like(v)), torch.zeros_like(v))


def _g(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """g = m / n in fp32, 0 where n = 0 (a zero row of V gives u = 0, so y = bias there)."""
    m = magnitude.float()
    return torch.where(norm > 0, m / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(m))


def _torch_keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


def _rows_packed(x: torch.Tensor) -> torch.Tensor:
    """x (N, K) as the left operand of torch's own GEMMs: a bf16 CPU matmul (oneDNN, on CPUs with
    AMX) reads past the end of each row of a view whose rows lie further apart than K, so such an
    x is copied."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[0] > 1 and x.stride(0) != x.shape[1]:
        return x.contiguous()
    return x


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
    cfg = H.norm_config(M, K, R, weight.dtype, arch, with_wa=with_wa)
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
    xa = torch.empty((N, R), dtype=xa_dtype(lora_A.dtype), device=x.device)
    if N == 0:
        return xa
    arch, _ = target(x)
    split = _split(x.dtype) and lora_A.dtype != x.dtype
    lora_f32 = _lora_f32(x.dtype, lora_A.dtype)
    # fp32 dots (tf32x3) unless x and A are the same 16-bit dtype or the split path runs
    cfg = H.xa_config(N, K, R, x.dtype, arch, fp32_dots=(x.dtype not in _HALF or lora_A.dtype != x.dtype) and not split)
    meta = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_K", "BLOCK_R", "num_warps", "num_stages")}
    meta.update(HAS_DROPOUT=p > 0, UPCAST=_upcast(x.dtype) or _upcast(lora_A.dtype), LORA_F32=lora_f32, SPLIT=split,
                PREC=_prec())
    launch(K_._xa_kernel, (triton_cdiv(N, cfg["BLOCK_N"]), triton_cdiv(R, cfg["BLOCK_R"])),
           (xa, x, *x.stride(), lora_A, *lora_A.stride(), N, K, R, float(p), int(seed), float(inv_keep)), meta,
           flops=2 * N * K * R, reads=[x, lora_A], writes=[xa])
    return xa


def xa_dtype(a_dtype):
    """x·Aᵀ is kept in the adapters' dtype (as PEFT's lora_A output), but never below fp32 for
    fp32 adapters."""
    return a_dtype if a_dtype in _HALF else torch.float32


def _u_dtype(x_dtype, a_dtype, p):
    # u is saved in x's dtype; with dropout, ũ in the dtype PEFT computes the dropped branch in
    # (x cast to the adapters'), which keeps dm as accurate as PEFT's.
    return torch.promote_types(x_dtype, a_dtype) if p > 0 else x_dtype


def dora_forward(x, weight, lora_A, lora_B, magnitude, scaling, bias, norm, *, p=0.0, seed=0, need_u=True):
    """y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias, g = m / n; PEFT's dropout form when p > 0.

    x: (N, K) with unit last stride; norm: (M,) fp32. Returns ``(y, xa, u)``: y (N, M) in x's
    dtype, xa = x̃·Aᵀ (N, R) in ``xa_dtype``, and with ``need_u`` u = x̃·W0ᵀ + s·xa·Bᵀ (N, M), the one
    (N, M) tensor the backward needs (``_u_dtype``; else None).
    """
    N, K = x.shape
    M = weight.shape[0]
    R = lora_A.shape[0]
    inv_keep = 1.0 / (1.0 - p)
    dev = x.device
    udt = _u_dtype(x.dtype, lora_A.dtype, p)
    # The kernels index the (M,) vectors with unit stride; copies of views are tiny.
    magnitude = magnitude.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if not uses_triton(x):
        x = _rows_packed(x)
        xd = x
        if p > 0:
            xd = x * _torch_keep_mask(seed, (N, K), p, dev).to(x.dtype)
        ct = torch.promote_types(x.dtype, lora_A.dtype)
        xa = ((xd.to(ct) @ lora_A.T.to(ct)).float() * inv_keep).to(xa_dtype(lora_A.dtype)).float()
        g = _g(magnitude, norm)
        lora = xa @ lora_B.float().T
        base = (x @ weight.T).float()
        if p > 0:
            basd = (xd.to(ct) @ weight.to(ct).T).float() * inv_keep
            u = basd + scaling * lora
            y = base + g * u - basd
        else:
            u = base + scaling * lora
            y = g * u
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype), xa.to(xa_dtype(lora_A.dtype)), (u.to(udt) if need_u else None)

    y = torch.empty((N, M), dtype=x.dtype, device=dev)
    u = torch.empty((N, M), dtype=udt, device=dev) if need_u else None
    xa = _xa(x, lora_A, p, seed, inv_keep)
    if N == 0 or M == 0:
        return y, xa, u
    arch, _ = target(x)
    cfg = H.fwd_config(N, M, K, R, x.dtype, arch, dropout=p > 0)
    meta = dict(cfg)
    meta.update(HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, STORE_U=need_u,
                UPCAST=_upcast(x.dtype), PREC=_prec(), EPI_PREC=_epi_prec())
    grid = (triton_cdiv(N, cfg["BLOCK_N"]) * triton_cdiv(M, cfg["BLOCK_M"]),)
    u_arg = u if u is not None else y
    launch(K_._fwd_kernel, grid,
           (y, *y.stride(), u_arg, *u_arg.stride(), x, *x.stride(), weight, *weight.stride(),
            lora_B, *lora_B.stride(), xa, magnitude, norm, bias if bias is not None else norm,
            N, M, K, R, float(scaling), float(p), int(seed), float(inv_keep)), meta,
           flops=2 * N * M * K * (2 if p > 0 else 1) + 2 * N * M * R + 4 * N * M,
           reads=[x, weight, lora_B, xa, magnitude, norm] + ([bias] if bias is not None else []),
           writes=[y] + ([u] if u is not None else []))
    return y, xa, u


# ---------------------------------------------------------------------------------------------
# backward

# With the output y saved (no bias), the backward makes u = x·W0ᵀ + s·xa·Bᵀ again instead of
# y / g for the rows with |m| < G_REDO · n: y = g·u holds no u where m = 0, and a small g takes
# y below fp16's normal range sooner than u.
G_REDO = 0.25


def _offsets_fit_int32(t: torch.Tensor) -> bool:
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0) < 2**31


def _redo_rows_torch(dm, G, x, weight, lora_B, magnitude, norm, xa, scaling):
    """dm of the rows with |m| < G_REDO · n (or NaN m), n > 0, from u = x·W0ᵀ + s·xa·Bᵀ made again
    for those rows only (the output y holds them too coarsely), in place."""
    redo = ~(magnitude.float().abs() >= G_REDO * norm) & (norm > 0)
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        uz = (_rows_packed(x) @ weight[rows].T).float() + scaling * (xa.float() @ lora_B[rows].float().T)
        dm[rows] = ((G[:, rows].float() * uz).sum(0) / norm[rows]).to(dm.dtype)


def dora_backward(grad, x, weight, lora_A, lora_B, magnitude, scaling, norm, xa, u, *, p=0.0, seed=0,
                  need_dx=True, from_y=False):
    """Gradients of the detached-norm DoRA linear from G = dL/dy (N, M) and the forward's u.

    With ``from_y`` (p = 0 and no bias only) ``u`` is the forward's output y: u = y / g, made
    again from x and W0 instead for the rows with |m| < G_REDO · n, n > 0 (see ``G_REDO``).
    With a bias, y − bias would lose u's low bits wherever the bias dominates y, so the op saves u.
    Returns ``(dx or None, dA, dB, dm)``: dx in x's dtype, dA, dB and dm (= Σ_tokens G ⊙ u / n,
    0 where n = 0) in the dtypes of lora_A, lora_B and magnitude.
    """
    if from_y and p > 0:
        raise ValueError("dora_backward: from_y needs p = 0 (with dropout y does not determine ũ)")
    N, K = x.shape
    M = weight.shape[0]
    R = lora_A.shape[0]
    dev = x.device
    inv_keep = 1.0 / (1.0 - p)
    magnitude = magnitude.contiguous()
    if norm.shape != (M,) or xa.shape != (N, R) or u.shape != (N, M) or grad.shape != (N, M):
        raise ValueError(f"dora_backward: norm {tuple(norm.shape)}, xa {tuple(xa.shape)}, u {tuple(u.shape)} and "
                         f"grad {tuple(grad.shape)} must be ({M},), ({N}, {R}), ({N}, {M}) and ({N}, {M})")
    if not uses_triton(x):
        x, grad = _rows_packed(x), _rows_packed(grad)
        g = _g(magnitude, norm)
        G = grad.float()
        inv_n = _recip(norm, norm > 0)
        dm = (G * u.float()).sum(0) * inv_n
        if from_y:  # u = y / g per column; the rows where y carries u too coarsely are made again
            dm *= _recip(g, g != 0)
            _redo_rows_torch(dm, G, x, weight, lora_B, magnitude, norm, xa, scaling)
        dm = dm.to(magnitude.dtype)
        gs = G * g
        gb = gs @ lora_B.float()
        dB = (scaling * (gs.T @ xa.float())).to(lora_B.dtype)
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
        return dx, dA, dB, dm

    arch, sms = target(x)
    if N == 0 or M == 0:
        return (torch.zeros_like(x) if need_dx else None, torch.zeros_like(lora_A), torch.zeros_like(lora_B),
                torch.zeros_like(magnitude))
    cfg = H.bwd_g_config(N, M, R, x.dtype, arch, sms)
    T, S, RC = cfg["T"], cfg["S"], cfg["RC"]
    gb = torch.empty((S, N, R), dtype=torch.float32, device=dev)
    dm_part = torch.empty((T, M), dtype=torch.float32, device=dev)
    db_part = torch.empty((T, M, R), dtype=torch.float32, device=dev)
    meta = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_R", "num_warps", "num_stages")}
    meta.update(FROM_Y=from_y, SPLIT=_split(x.dtype), PREC=_prec())
    launch(K_._bwd_g_kernel, (T, S, RC),
           (gb, dm_part, db_part, grad, *grad.stride(), u, *u.stride(), xa, lora_B, *lora_B.stride(),
            magnitude, norm, N, M, R, cfg["TOK_PER_PROG"], cfg["COL_PER_PROG"]),
           meta, flops=4 * N * M * R + (6 if from_y else 5) * N * M,
           reads=[grad, u, xa, lora_B, magnitude, norm], writes=[gb, dm_part, db_part])

    meta = H.dx_config(N, K, M, R, x.dtype, arch, dropout=p > 0, need_dx=need_dx)
    dx = torch.empty((N, K), dtype=x.dtype, device=dev) if need_dx else None
    tn = triton_cdiv(N, meta["BLOCK_N"])
    da_part = torch.empty((tn, R, K), dtype=torch.float32, device=dev)
    # Without need_dx the M loop compiles out: only the dA partials (a pass over x).
    flops = (2 * N * M * K * (2 if p > 0 else 1) + 4 * N * K * R) if need_dx else 2 * N * K * R
    meta.update(HAS_DROPOUT=p > 0, WITH_DX=need_dx, UPCAST=_upcast(x.dtype), SPLIT=_split(x.dtype), PREC=_prec())
    dx_arg = dx if dx is not None else x
    grid = (tn * triton_cdiv(K, meta["BLOCK_K"]),)
    launch(K_._dx_kernel, grid,
           (dx_arg, *dx_arg.stride(), da_part, grad, *grad.stride(), weight, *weight.stride(), lora_A,
            *lora_A.stride(), x, *x.stride(), gb, magnitude, norm, N, M, K, R, S, float(scaling), float(p),
            int(seed), float(inv_keep)), meta, flops=flops,
           reads=([grad, weight] if need_dx else []) + [lora_A, x, gb, magnitude, norm],
           writes=([dx] if need_dx else []) + [da_part])

    dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
    dB = torch.empty_like(lora_B, memory_format=torch.contiguous_format)
    dm = torch.empty_like(magnitude)
    block = 512
    # With from_y, dm of the rows with |m| < G_REDO · n (none, in DoRA as trained) is made again
    # from x and W0 in this launch by cdiv(M, FB) more programs (fp32 dots by FMA: exact, and no
    # register spills; their cost is not counted), or by torch where an operand's offsets pass
    # the 31 bits those programs use.
    redo_in_kernel = from_y and all(_offsets_fit_int32(t) for t in (x, grad, weight, xa, lora_B))
    fin = {"BLOCK": block, "REDO_ROWS": redo_in_kernel, "FB": 16, "BT": 16, "BK": 32, "BR": 16,
           "UPCAST": _upcast(x.dtype), "PREC": "ieee", "G_REDO": G_REDO, "num_warps": 4}
    grid = (triton_cdiv(R * K, block) + triton_cdiv(M * R, block) + triton_cdiv(M, block)
            + (triton_cdiv(M, fin["FB"]) if redo_in_kernel else 0),)
    launch(K_._finalize_kernel, grid,
           (dA, dB, dm, da_part, db_part, dm_part, norm, magnitude, grad, *grad.stride(), x, *x.stride(), weight,
            *weight.stride(), xa, lora_B, *lora_B.stride(), tn, T, R * K, M * R, M, float(scaling * inv_keep),
            float(scaling), N, K, R, float(scaling)), fin,
           flops=tn * R * K + T * M * R + T * M,
           reads=[da_part, db_part, dm_part, norm] + ([magnitude] if redo_in_kernel else []), writes=[dA, dB, dm])
    if from_y and not redo_in_kernel:
        _redo_rows_torch(dm, grad, x, weight, lora_B, magnitude, norm, xa, scaling)
    return dx, dA, dB, dm


# ---------------------------------------------------------------------------------------------
# autograd

NORM_GRADS = ("detached", "exact")


def fused_forward(x, weight, lora_A, lora_B, magnitude, bias, scaling, p, seed, with_wa, norm, need_u=True):
    """The forward of the op on 2-D x: ``(y, xa, u, norm, wa)``.

    ``norm`` (M,) fp32 is reused when given, unless ``with_wa`` (the exact norm gradient needs
    ``wa = W0·Aᵀ`` (M, R) fp32, computed in the same pass as the norm); ``u`` (N, M) is what
    the backward needs (None without ``need_u``). Shared by ``DoRAFunction`` and the
    ``torch.library`` op.
    """
    wa = None
    if norm is None or with_wa:
        norm, wa = weight_norm(weight, lora_A, lora_B, scaling, with_wa=with_wa)
    y, xa, u = dora_forward(x, weight, lora_A, lora_B, magnitude, scaling, bias, norm, p=p, seed=seed,
                            need_u=need_u)
    return y, xa, u, norm, wa


def fused_backward(grad, x, weight, lora_A, lora_B, magnitude, bias, norm, xa, u, wa, scaling, p, seed, *,
                   exact, need_dx, need_a, need_b, need_m, need_bias, from_y=False):
    """Gradients ``(dx, dA, dB, dm, dbias)`` (None where not needed) from what the forward saved:
    ``u`` (ũ with dropout; the output y with ``from_y``, which needs p = 0 and no bias); ``wa`` =
    W0·Aᵀ when ``exact`` (the norm is differentiated)."""
    if from_y and bias is not None:
        raise ValueError("fused_backward: from_y needs no bias (the forward saves u where there is one)")
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    dbias = grad.sum(0).to(bias.dtype) if (need_bias and bias is not None) else None
    if not (need_dx or need_a or need_b or need_m):  # only the bias: the forward kept no u
        return None, None, None, None, dbias
    dx, dA, dB, dm = dora_backward(grad, x, weight, lora_A, lora_B, magnitude, scaling, norm, xa, u, p=p,
                                   seed=seed, need_dx=need_dx, from_y=from_y)
    s = scaling
    if exact and (need_a or need_b):
        # n depends on A and B: dn_j = −(m_j / n_j) · dm_j; with V = W0 + s·B·A,
        # dB += s·diag(c)·V·Aᵀ and dA += s·Bᵀ·diag(c)·V, c = −(m / n²) ⊙ dm (spec).
        inv_n = _recip(norm, norm > 0)
        c = -magnitude.float() * inv_n * inv_n * dm.float()
        A32, B32 = lora_A.float(), lora_B.float()
        cB = c[:, None] * B32
        dB = (dB.float() + s * (c[:, None] * wa + s * cB @ (A32 @ A32.T))).to(lora_B.dtype)
        cBW = (cB.T.to(weight.dtype) @ weight).float() if weight.dtype != torch.float64 else cB.T @ weight
        dA = (dA.float() + s * (cBW + s * (B32.T @ cB) @ A32)).to(lora_A.dtype)
    return (dx if need_dx else None, dA if need_a else None, dB if need_b else None,
            dm if need_m else None, dbias)


INPLACE_HINT = ("the output of dora_linear was modified in place before the backward. The fused op keeps its "
                "output for the backward instead of another (tokens, out) tensor; where the output is modified in "
                "place, pass save_output=False (dora_linear, DoRALinear, DoRAFunction.apply, or "
                "dora_kernels.fuse(model, save_output=False)).")


def saved_or_hint(ctx):
    """``ctx.saved_tensors``, with a hint at ``save_output=False`` when the saved output was
    modified in place."""
    try:
        return ctx.saved_tensors
    except RuntimeError as e:
        if getattr(ctx, "from_y", False) and "inplace operation" in str(e):
            raise RuntimeError(f"{INPLACE_HINT} ({e})") from e
        raise


class DoRAFunction(torch.autograd.Function):
    """Fused DoRA linear on 2-D x, as a plain ``autograd.Function`` (eager only; ``dora_linear``
    goes through the ``torch.library`` op instead, which ``torch.compile`` sees as one node).

    Saves x, xa (N, R), the norm (M,) fp32 and, without dropout or bias, the output y (u = y/g
    stands in for u = x·W0ᵀ + s·xa·Bᵀ, so the step keeps no (N, M) tensor besides its output);
    with dropout, a bias or ``save_output=False``, u (ũ) instead, and y stays free for in-place use."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, p, seed, norm_grad, norm,
                save_output=True):
        with_wa = norm_grad == "exact" and (lora_A.requires_grad or lora_B.requires_grad)
        from_y = bool(save_output) and p == 0 and bias is None
        y, xa, u, norm, wa = fused_forward(x, weight, lora_A, lora_B, magnitude, bias, scaling, p, seed, with_wa,
                                           norm, need_u=not from_y)
        ctx.scaling, ctx.p, ctx.seed, ctx.exact, ctx.from_y = scaling, p, seed, with_wa, from_y
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, bias, norm, xa, y if from_y else u, wa)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_A, lora_B, magnitude, bias, norm, xa, u, wa = saved_or_hint(ctx)
        need_dx, _, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:6]
        grads = fused_backward(grad, x, weight, lora_A, lora_B, magnitude, bias, norm, xa, u, wa, ctx.scaling, ctx.p,
                               ctx.seed, exact=ctx.exact, need_dx=need_dx, need_a=need_a, need_b=need_b,
                               need_m=need_m, need_bias=need_bias, from_y=ctx.from_y)
        dx, dA, dB, dm, dbias = grads
        return dx, None, dA, dB, dm, dbias, None, None, None, None, None, None


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
    ``save_output``: without dropout and bias the backward reads the output y (its memory is held
    anyway wherever the next op keeps it), not a second (…, out) tensor; pass False where y is then
    modified in place (the backward would otherwise raise): u = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ is saved
    instead. With a bias u is always saved (y − bias would lose u's low bits where the bias
    dominates y).
    """
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
    with_wa = (norm_grad == "exact" and torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad))
    with torch.autocast(x.device.type, enabled=False) if x.device.type in ("cuda", "cpu") else _null():
        need = torch.is_grad_enabled() and any(t.requires_grad for t in (x2, lora_A, lora_B, magnitude))
        save_y = need and save_output and p == 0 and bias is None
        y = _library.dora_fwd(x2, weight, lora_A, lora_B, magnitude, bias, weight_norm, seed, scaling, p, with_wa,
                              need and not save_y, save_y)[0]
    return y.reshape(*lead, weight.shape[0])


def draw_seed() -> torch.Tensor:
    """The dropout seed ``dora_linear`` draws when none is given: one int64 from torch's default
    CPU generator, so ``torch.manual_seed`` and checkpointing's RNG restore replay it."""
    return torch.randint(0, 2**31 - 1, (1,))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


from . import library as _library  # noqa: E402  (library builds its ops on the functions above)
