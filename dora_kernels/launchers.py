"""The Triton bodies of the op: launchers that take and return tensors.

Each launcher plans its launches with ``heuristics`` and issues them through
``runtime.launch`` by keyword; ``torch_path`` holds the same functions, with the same
arguments, in pure torch. Shapes: ``x (N, K)``, ``weight (M, K)``, ``lora_A (R, K)``,
``lora_B (M, R)``, ``magnitude, norm, bias (M,)``, ``dy = dL/dy (N, M)``. ``weight`` is a tensor
or a quantised W0 as the kernels read it (``PackedWeight``, QDoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import heuristics as H
from . import kernels as K_
from .backend import INTERPRET
from .common import G_REDO, HALF, rows_packed, u_dtype, xa_dtype
from .runtime import launch, target
from .torch_path import dm_redo as dm_redo_torch

# ---------------------------------------------------------------------------------------------
# numerics switches


def _prec() -> str:
    # The GPU's fp32 tl.dot defaults to tf32; follow torch's switch for fp32 matmuls instead.
    # Without tf32, "tf32x3" (three tf32 products) keeps fp32 accuracy on the tensor cores
    # (the "ieee" FMA path spills registers in these kernels).
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _epi_prec() -> str:
    # The forward's one rank-r dot per tile: plain fp32 FMAs fit its registers best.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _split(x_dtype) -> bool:
    # bf16 dy and x are exact as bf16 dot operands: the fp32 rank-r operands are split into
    # three bf16 parts instead (kernels._dot_exact_bf16). Not under the interpreter, whose
    # bf16 dots are wrong (tests/test_split_dots.py patches it to check this path).
    return x_dtype == torch.bfloat16 and not INTERPRET


def _upcast(dtype) -> bool:
    # The interpreter computes bf16 arithmetic and bf16 dots wrongly: upcast after the load.
    return INTERPRET and dtype in HALF


def _lora_f32(x_dtype, a_dtype, b_dtype=None) -> bool:
    # (B in another dtype than A: the B·A dots take fp32 operands, as tl.dot needs one dtype)
    return INTERPRET or x_dtype not in HALF or a_dtype != x_dtype or (b_dtype is not None and b_dtype != a_dtype)


def _fp32_dots(x_dtype, a_dtype) -> bool:
    # The rank-r products run as fp32 dots: fp32 x, or adapters of another dtype than a 16-bit x.
    return x_dtype not in HALF or a_dtype != x_dtype


def offsets_fit_int32(t: torch.Tensor) -> bool:
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0) < 2**31


# ---------------------------------------------------------------------------------------------
# W0: a tensor, or quantised (QDoRA)

_QDT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A quantised W0 (M, K) as the kernels read it (``kernels._w0``), dequantised in registers.

    ``wq`` 4: ``codes`` the 4-bit codes packed two a byte over the flattened weight (uint8,
    (⌈M·K/2⌉,)), ``qmap`` (16,) fp32 their values, ``qscale`` the fp32 absmax of each block of
    2**``qshift`` elements. ``wq`` 8: ``w`` int8 (M, K), ``qscale`` (M,) fp32 row scales. ``dtype``:
    the dequantised weight's (values are rounded to it, then to x's dtype)."""

    shape: torch.Size
    dtype: torch.dtype
    wq: int
    qscale: torch.Tensor
    codes: Optional[torch.Tensor] = None
    qmap: Optional[torch.Tensor] = None
    w: Optional[torch.Tensor] = None
    qshift: int = 0

    def __post_init__(self):
        M, K = self.shape
        if self.wq == 4 and M * K >= 2**31:  # (kernels._w0's 32-bit flat index; quant takes the torch path)
            raise ValueError(f"PackedWeight: a 4-bit W0 of {M}×{K} elements is over the kernels' 2**31")

    @property
    def device(self) -> torch.device:
        return self.qscale.device

    def reads(self) -> list:
        return [t for t in (self.codes, self.qmap, self.w, self.qscale) if t is not None]


def _w0_operands(weight):
    """(kernel arguments, constexprs, tensors read) of a W0 tensor or ``PackedWeight``."""
    if isinstance(weight, PackedWeight):
        return ({"w": weight.w, "codes": weight.codes, "qmap": weight.qmap, "qscale": weight.qscale,
                 "qshift": weight.qshift}, {"WQ": weight.wq, "QDT": _QDT[weight.dtype]}, weight.reads())
    return {"w": weight, "codes": None, "qmap": None, "qscale": None, "qshift": 0}, {"WQ": 0, "QDT": None}, [weight]


def _wq(weight) -> int:
    return weight.wq if isinstance(weight, PackedWeight) else 0


def nested_absmax(q, code, absmax, offset, block: int) -> torch.Tensor:
    """A 4-bit weight's absmax (n,) fp32 from its double quantisation: ``code[q] · absmax[i // block]
    + offset`` (q (n,) uint8, code (256,), absmax, offset fp32), rounded as bitsandbytes rounds it."""
    n = q.numel()
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    if n:
        cfg = H.absmax_config(n=n)
        launch(K_._absmax_kernel, cfg.grid, dict(cfg.meta, enable_fp_fusion=False), flops=2 * n, unit="vector",
               reads=[q, code, absmax, offset], writes=[out], out=out, q=q, code=code, absmax=absmax,
               offset=offset.reshape(1), n=n, block=int(block))
    return out


def dequantize(weight: PackedWeight, dtype) -> torch.Tensor:
    """The dense W0 (M, K) in ``dtype`` of a ``PackedWeight``: one pass over its codes."""
    M, K = weight.shape
    out = torch.empty((M, K), dtype=dtype, device=weight.device)
    if M and K:
        cfg = H.dequant_config(M=M, K=K)
        args, meta, reads = _w0_operands(weight)
        launch(K_._dequant_kernel, cfg.grid, dict(cfg.meta, **meta), flops=H.DEQUANT_OPS[weight.wq] * M * K,
               unit="vector", reads=reads, writes=[out], out=out, M=M, K=K, **args)
    return out


def _gemm_weight(weight, N: int, dtype, dropout_p: float):
    """W0 as the GEMM kernels over N tokens read it: a tensor as it is; a ``PackedWeight`` in place
    (dequantised in their registers) up to ``heuristics.DEQUANT_IN_KERNEL_TOKENS`` tokens without
    dropout, else dequantised once into a dense transient."""
    if isinstance(weight, PackedWeight) and not H.dequant_in_kernel(N=N, has_dropout=dropout_p > 0):
        return dequantize(weight, dtype)
    return weight


def _dequant_flops(weight, N: int, block_n: int) -> int:
    """The dequantising work of a GEMM over ``weight`` in place: every token block dequantises W0."""
    if not isinstance(weight, PackedWeight):
        return 0
    M, K = weight.shape
    return H.DEQUANT_OPS[weight.wq] * M * K * H.cdiv(N, block_n)


# ---------------------------------------------------------------------------------------------
# dropout mask, weight norm

def dropout_mask(dropout_seed: int, N: int, K: int, dropout_p: float, device) -> torch.Tensor:
    """The (N, K) bool keep-mask the kernels build from ``dropout_seed``."""
    mask = torch.empty((N, K), dtype=torch.int8, device=device)
    if N and K:
        cfg = H.mask_config(N=N, K=K)
        launch(K_._mask_kernel, cfg.grid, cfg.meta, flops=N * K, unit="vector", writes=[mask],
               mask=mask, N=N, K=K, dropout_p=float(dropout_p), dropout_seed=int(dropout_seed))
    return mask.bool()


def weight_norm(weight, lora_A, lora_B, scaling: float, *, with_wa: bool = False):
    """``(norm, wa)``: ``‖W0 + s·B·A‖`` (M,) fp32 in one pass over W0, never forming B·A; with
    ``with_wa`` also ``W0·Aᵀ`` (M, R) fp32 (the exact norm gradient needs it), else None."""
    M, K = weight.shape
    R = lora_A.shape[0]
    norm = torch.empty(M, dtype=torch.float32, device=weight.device)
    wa = torch.empty((M, R), dtype=torch.float32, device=weight.device) if with_wa else None
    if M == 0:
        return norm, wa
    arch, _ = target(lora_A)
    cfg = H.norm_config(M=M, dtype=weight.dtype, arch=arch, has_wa=with_wa, wq=_wq(weight))
    w_args, w_meta, w_reads = _w0_operands(weight)
    meta = dict(cfg.meta, UPCAST=_upcast(weight.dtype) or _upcast(lora_A.dtype),
                LORA_F32=_lora_f32(weight.dtype, lora_A.dtype, lora_B.dtype), PREC=_prec(), **w_meta)
    launch(K_._norm_kernel, cfg.grid, meta, flops=2 * M * K * R * (2 if with_wa else 1) + 3 * M * K,
           vector_flops=_dequant_flops(weight, 1, 1), reads=w_reads + [lora_A, lora_B],
           writes=[norm] + ([wa] if with_wa else []),
           norm=norm, wa=wa, a=lora_A, b=lora_B, M=M, K=K, R=R, scaling=float(scaling), **w_args)
    return norm, wa


# ---------------------------------------------------------------------------------------------
# forward

def _xa(x, lora_A, *, dropout_p, dropout_seed):
    """xa = x̃·Aᵀ (N, R) in ``xa_dtype``. Without dropout, with A in x's dtype, it is a plain GEMM with
    nothing to fuse: torch's (cuBLAS; fp32 in tf32 where torch's switch allows it, as the kernels'
    dots); otherwise the kernel, which applies the dropout mask in registers (x̃ is never stored) or
    runs the fp32 dots of adapters of another dtype."""
    N, K = x.shape
    R = lora_A.shape[0]
    if dropout_p == 0 and lora_A.dtype == x.dtype:
        return torch.mm(rows_packed(x), lora_A.T)
    xa = torch.empty((N, R), dtype=xa_dtype(lora_A.dtype), device=x.device)
    if N == 0:
        return xa
    arch, _ = target(x)
    split = _split(x.dtype) and lora_A.dtype != x.dtype
    # fp32 dots (tf32x3) unless x and A are the same 16-bit dtype or the split path runs
    fp32_dots = _fp32_dots(x.dtype, lora_A.dtype) and not split
    cfg = H.xa_config(N=N, R=R, dtype=x.dtype, arch=arch, fp32_dots=fp32_dots)
    meta = dict(cfg.meta, HAS_DROPOUT=dropout_p > 0, UPCAST=_upcast(x.dtype) or _upcast(lora_A.dtype),
                LORA_F32=_lora_f32(x.dtype, lora_A.dtype), SPLIT=split, PREC=_prec())
    launch(K_._xa_kernel, cfg.grid, meta, flops=2 * N * K * R, reads=[x, lora_A], writes=[xa],
           xa=xa, x=x, a=lora_A, N=N, K=K, R=R, dropout_p=float(dropout_p), dropout_seed=int(dropout_seed),
           inv_keep=1.0 / (1.0 - dropout_p))
    return xa


def _fwd_norm(x, weight, lora_A, lora_B, magnitude, scaling, bias, xa):
    """``(y, norm)`` from one pass over W0 (``heuristics.use_fwd_norm``: no dropout, no u); without
    ``xa`` the GEMM reads V = W0 + s·B·A (in x's dtype) and makes the rank-r term with the base."""
    N, K = x.shape
    M = weight.shape[0]
    R = lora_A.shape[0]
    norm = torch.empty(M, dtype=torch.float32, device=x.device)
    y = torch.empty((N, M), dtype=x.dtype, device=x.device)
    arch, sms = target(x)
    cfg = H.fwd_norm_config(N=N, M=M, dtype=x.dtype, arch=arch, num_sms=sms, wq=_wq(weight),
                            fp32_dots=_fp32_dots(x.dtype, lora_A.dtype))
    T = cfg.sizes["T"]  # (token blocks: each makes the norm of its rows again)
    w_args, w_meta, w_reads = _w0_operands(weight)
    meta = dict(cfg.meta, UPCAST=_upcast(x.dtype) or _upcast(lora_A.dtype),
                LORA_F32=_lora_f32(x.dtype, lora_A.dtype, lora_B.dtype), PREC=_prec(), EPI_PREC=_epi_prec(), **w_meta)
    launch(K_._fwd_norm_kernel, cfg.grid, meta,
           flops=T * (2 * M * K * R + 3 * M * K) + 2 * N * M * K + 3 * N * M + (2 * N * M * R if xa is not None else 0),
           vector_flops=_dequant_flops(weight, N, cfg.meta["BLOCK_N"]),
           reads=[x] + w_reads + [lora_A, lora_B] + ([xa] if xa is not None else []) + [magnitude]
           + ([bias] if bias is not None else []),
           writes=[y, norm], y=y, norm=norm, x=x, a=lora_A, b=lora_B, xa=xa, mag=magnitude, bias=bias,
           N=N, M=M, K=K, R=R, scaling=float(scaling), **w_args)
    return y, norm


def dora_forward(x, weight, lora_A, lora_B, magnitude, scaling, bias, *, norm=None, dropout_p=0.0, dropout_seed=0,
                 with_wa=False, need_u=True, need_xa=True):
    """``(y, xa, u, norm, wa)`` of the op on 2-D x (unit last stride).

    y = g ⊙ (x·W0ᵀ + s·xa·Bᵀ) + bias, g = m / n (PEFT's dropout form when dropout_p > 0), in x's
    dtype; xa = x̃·Aᵀ (N, R) in ``xa_dtype``; with ``need_u`` u = x̃·W0ᵀ + s·xa·Bᵀ (N, M) in
    ``u_dtype``, the one (N, M) tensor the backward needs (else None); ``norm`` (M,) fp32 is
    reused when given, unless ``with_wa`` (the exact norm gradient also needs wa = W0·Aᵀ (M, R)
    fp32, from the same pass as the norm; else wa is None). Without dropout, u and a given norm, few
    tokens (and a quantised W0 read in place) take the norm and y from one pass over W0
    (``heuristics.use_fwd_norm``, ``_fwd_norm``); there, without ``need_xa`` (no backward) and with
    adapters in x's dtype, xa is not made (the returned one is unset).
    """
    N, K = x.shape
    M = weight.shape[0]
    R = lora_A.shape[0]
    # The kernels index the (M,) vectors with unit stride; copies of views are tiny.
    magnitude = magnitude.contiguous()
    bias = bias.contiguous() if bias is not None else None
    wa = None
    if M and H.use_fwd_norm(N=N, wq=_wq(weight), has_dropout=dropout_p > 0, need_u=need_u, has_norm=norm is not None,
                            with_wa=with_wa, fp32_dots=_fp32_dots(x.dtype, lora_A.dtype)):
        xa = _xa(x, lora_A, dropout_p=0.0, dropout_seed=0) if need_xa or lora_A.dtype != x.dtype else None
        y, norm = _fwd_norm(x, weight, lora_A, lora_B, magnitude, scaling, bias, xa)
        if xa is None:  # (unset: nothing reads it)
            xa = torch.empty((N, R), dtype=xa_dtype(lora_A.dtype), device=x.device)
        return y, xa, None, norm, None
    if norm is None or with_wa:
        norm, wa = weight_norm(weight, lora_A, lora_B, scaling, with_wa=with_wa)
    y = torch.empty((N, M), dtype=x.dtype, device=x.device)
    u = torch.empty((N, M), dtype=u_dtype(x.dtype, lora_A.dtype, dropout_p), device=x.device) if need_u else None
    xa = _xa(x, lora_A, dropout_p=dropout_p, dropout_seed=dropout_seed)
    if N == 0 or M == 0:
        return y, xa, u, norm, wa
    arch, _ = target(x)
    weight = _gemm_weight(weight, N, x.dtype, dropout_p)
    cfg = H.fwd_config(N=N, M=M, dtype=x.dtype, arch=arch, has_dropout=dropout_p > 0, wq=_wq(weight))
    w_args, w_meta, w_reads = _w0_operands(weight)
    meta = dict(cfg.meta, HAS_DROPOUT=dropout_p > 0, UPCAST=_upcast(x.dtype), PREC=_prec(), EPI_PREC=_epi_prec(),
                **w_meta)
    launch(K_._fwd_kernel, cfg.grid, meta,
           flops=2 * N * M * K * (2 if dropout_p > 0 else 1) + 2 * N * M * R + 4 * N * M,
           vector_flops=_dequant_flops(weight, N, cfg.meta["BLOCK_N"]),
           reads=[x] + w_reads + [lora_B, xa, magnitude, norm] + ([bias] if bias is not None else []),
           writes=[y] + ([u] if u is not None else []),
           y=y, u=u, x=x, b=lora_B, xa=xa, mag=magnitude, norm=norm, bias=bias, N=N, M=M, K=K, R=R,
           scaling=float(scaling), dropout_p=float(dropout_p), dropout_seed=int(dropout_seed),
           inv_keep=1.0 / (1.0 - dropout_p), **w_args)
    return y, xa, u, norm, wa


# ---------------------------------------------------------------------------------------------
# backward

def dora_backward(dy, x, weight, lora_A, lora_B, magnitude, scaling, norm, xa, *, u=None, y=None, dropout_p=0.0,
                  dropout_seed=0, need_dx=True, need_a=True):
    """``(dx or None, dA or None, dB, dm)`` of the detached-norm op from dy = dL/dy (N, M).

    The forward saved either ``u`` (ũ with dropout) or, with ``save_output`` (no dropout, no
    bias), its output ``y``: then u = y / g, made again from x and W0 instead for the rows with
    |m| < G_REDO · n, n > 0 (``common.G_REDO``). dx in x's dtype; dA, dB and dm (= Σ_tokens
    dy ⊙ u / n, 0 where n = 0) in the dtypes of lora_A, lora_B and magnitude.
    """
    N, K = x.shape
    M = weight.shape[0]
    R = lora_A.shape[0]
    dev = x.device
    magnitude = magnitude.contiguous()
    if N == 0 or M == 0:
        return (torch.zeros_like(x) if need_dx else None, torch.zeros_like(lora_A) if need_a else None,
                torch.zeros_like(lora_B), torch.zeros_like(magnitude))
    arch, sms = target(x)
    cfg = H.bwd_dy_config(N=N, M=M, R=R, dtype=x.dtype, arch=arch, num_sms=sms)
    T, S = cfg.sizes["T"], cfg.sizes["S"]
    gb_part = torch.empty((S, N, R), dtype=torch.float32, device=dev)
    dm_part = torch.empty((T, M), dtype=torch.float32, device=dev)
    db_part = torch.empty((T, M, R), dtype=torch.float32, device=dev)
    saved = y if y is not None else u
    launch(K_._bwd_dy_kernel, cfg.grid, dict(cfg.meta, SPLIT=_split(x.dtype), PREC=_prec()),
           flops=4 * N * M * R + (6 if y is not None else 5) * N * M,
           reads=[dy, saved, xa, lora_B, magnitude, norm], writes=[gb_part, dm_part, db_part],
           gb_part=gb_part, dm_part=dm_part, db_part=db_part, dy=dy, u=u, y=y, xa=xa, b=lora_B, mag=magnitude,
           norm=norm, N=N, M=M, R=R, TOK_PER_PROG=cfg.sizes["TOK_PER_PROG"], COL_PER_PROG=cfg.sizes["COL_PER_PROG"])

    if need_dx:  # (the dm redo, which rarely reads W0, takes a quantised one in place)
        weight = _gemm_weight(weight, N, x.dtype, dropout_p)
    w_args, w_meta, w_reads = _w0_operands(weight)
    # without dx the kernel reads no W0
    dx_w_args, dx_w_meta = (w_args, w_meta) if need_dx else _w0_operands(None)[:2]
    cfg = H.dx_config(N=N, K=K, dtype=x.dtype, arch=arch, has_dropout=dropout_p > 0, has_dx=need_dx,
                      wq=_wq(weight) if need_dx else 0)
    dx = torch.empty((N, K), dtype=x.dtype, device=dev) if need_dx else None
    TA = cfg.sizes["T"] if need_a else 0
    da_part = torch.empty((TA, R, K), dtype=torch.float32, device=dev) if need_a else None
    # Without dx the M loop compiles out: only the dA partials (a pass over x); without dA, only dx.
    flops = (2 * N * M * K * (2 if dropout_p > 0 else 1) + 2 * N * K * R) if need_dx else 0
    flops += 2 * N * K * R if need_a else 0
    inv_keep = 1.0 / (1.0 - dropout_p)
    if need_dx or need_a:
        launch(K_._dx_kernel, cfg.grid,
               dict(cfg.meta, HAS_DROPOUT=dropout_p > 0, UPCAST=_upcast(x.dtype), SPLIT=_split(x.dtype),
                    PREC=_prec(), **dx_w_meta),
               flops=flops, vector_flops=_dequant_flops(weight, N, cfg.meta["BLOCK_N"]) if need_dx else 0,
               reads=([dy] + w_reads + [lora_A] if need_dx else []) + ([x] if need_a else [])
               + [gb_part, magnitude, norm],
               writes=([dx] if need_dx else []) + ([da_part] if need_a else []),
               dx=dx, da_part=da_part, dy=dy, a=lora_A, x=x, gb_part=gb_part, mag=magnitude, norm=norm,
               N=N, M=M, K=K, R=R, S=S, scaling=float(scaling), dropout_p=float(dropout_p),
               dropout_seed=int(dropout_seed), inv_keep=inv_keep, **dx_w_args)

    dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format) if need_a else None
    dB = torch.empty_like(lora_B, memory_format=torch.contiguous_format)
    dm = torch.empty_like(magnitude)
    RK = R * K if need_a else 0
    cfg = H.sum_partials_config(RK=RK, MR=M * R, M=M)
    launch(K_._sum_partials_kernel, cfg.grid, cfg.meta, flops=TA * RK + T * M * R + T * M, unit="vector",
           reads=([da_part] if need_a else []) + [db_part, dm_part, norm], writes=([dA] if need_a else []) + [dB, dm],
           da=dA, db=dB, dm=dm, da_part=da_part, db_part=db_part, dm_part=dm_part, norm=norm,
           TA=TA, TB=T, RK=RK, MR=M * R, M=M, scale_a=float(scaling * inv_keep), scale_b=float(scaling))
    if y is not None:
        # dm of the rows with |m| < G_REDO · n (none, in DoRA as trained) made again from x and W0
        # (fp32 dots by FMA: exact, and no register spills; their FLOPs are not counted), or by
        # torch where an operand's offsets pass the 31 bits that kernel uses.
        if all(offsets_fit_int32(t) for t in (x, dy, xa, lora_B) + tuple(w_reads)):
            cfg = H.dm_redo_config(M=M, wq=_wq(weight))
            launch(K_._dm_redo_kernel, cfg.grid,
                   dict(cfg.meta, UPCAST=_upcast(x.dtype), PREC="ieee", G_REDO=G_REDO, **w_meta),
                   unit="vector", reads=[magnitude, norm], writes=[],
                   dm=dm, dy=dy, x=x, xa=xa, b=lora_B, mag=magnitude, norm=norm, N=N, M=M, K=K, R=R,
                   scaling=float(scaling), **w_args)
        else:
            dense = dequantize(weight, x.dtype) if isinstance(weight, PackedWeight) else weight
            dm_redo_torch(dm, dy, x, dense, lora_B, magnitude, norm, xa, scaling)
    return dx, dA, dB, dm
