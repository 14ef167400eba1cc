"""Triton kernels for DoRA.

Names (``nn.Linear`` convention): ``x (N, K)`` tokens × in, ``W (M, K)`` out × in (``w_ptr``:
``weight``), ``A (R, K)`` (``a_ptr``: ``lora_A``), ``B (M, R)`` (``b_ptr``: ``lora_B``), ``m, n (M,)``
(``mag_ptr``: ``magnitude``, ``norm_ptr``: the row norms of W0 + s·B·A); ``s`` the scaling;
``g = m / n`` (0 where n = 0, ``_gate``); ``dy = dL/dy (N, M)``; ``xa = x̃·Aᵀ (N, R)``;
``gb = (dy ⊙ g)·B (N, R)``; ``u = x̃·W0ᵀ + s·xa·Bᵀ (N, M)``.

Conventions: output pointers first, each input pointer followed by its strides, then sizes,
then ``tl.constexpr`` meta-parameters. Kernels are launched by keyword through
``dora_kernels.launch.launch``: a tensor passed as ``name`` fills ``name_ptr`` and the
``stride_*`` parameters right after it; an optional tensor that is absent is ``None`` (pointer
and strides), and its ``HAS_<NAME>`` flag is derived there. Every optional input or mode flag
is ``HAS_*``; every block size ``BLOCK_*``. Values are upcast to fp32 right after the load
wherever they enter arithmetic; GEMM operands stay in their storage dtype so the tensor
cores see bf16/fp16, except under the interpreter (``UPCAST``), whose bf16 arithmetic is
wrong. ``LORA_F32`` runs the rank-r products in fp32 (adapters wider than x, or fp32 x).
A quantised W0 (QDoRA, ``WQ``; see ``_w0``) is dequantised in registers where a tile of it
is loaded: bitsandbytes' 4-bit codes (``WQ = 4``) or int8 rows (``WQ = 8``).
Reductions over tokens write per-program fp32 partials that a second kernel sums:
deterministic, no atomics. Arguments that only bound loops or address the small operands
(tokens N, rank R, B's row stride, the dropout seed, counts of partials and token blocks) are not
specialised by the JIT, so a layer compiles once whatever the batch size, rank or seed (R = 1 as a constant also
crashed the compiler in the dropout ``_dx_kernel``, triton 3.9).
"""

import triton
import triton.language as tl

from .backend import INTERPRET


@triton.jit
def _dot_exact_bf16(a, v, acc, A_FIRST: tl.constexpr):
    # acc + a·v (A_FIRST) or acc + v·a, for a exact in bf16 (G, x) and v fp32: v is split into
    # three bf16 parts (hi + mid + lo = v to ~2⁻²⁴ relative), so three bf16 tensor-core dots
    # give an fp32-accurate product without an fp32 copy of the large operand.
    hi = v.to(tl.bfloat16)
    r = v - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    if A_FIRST:
        acc = tl.dot(a, hi, acc)
        acc = tl.dot(a, mid, acc)
        acc = tl.dot(a, lo, acc)
    else:
        acc = tl.dot(hi, a, acc)
        acc = tl.dot(mid, a, acc)
        acc = tl.dot(lo, a, acc)
    return acc


# The interpreter truncates fp32 → bf16 (the GPU rounds to nearest even). Whether the kernels
# are interpreted is fixed when they are decorated, i.e. when this module is imported.
_INTERPRET = tl.constexpr(INTERPRET)


@triton.jit
def _rounded(v, ptr):
    # v in ptr's element type, rounded to nearest even as the GPU does; under the interpreter
    # the bf16 rounding is done on the bits, so a sum of many stored values carries no bias.
    ty: tl.constexpr = ptr.dtype.element_ty
    if ty == tl.float32:
        return v
    if _INTERPRET and ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return v.to(ty)


@triton.jit
def _keep_mask(dropout_seed, o_n, o_k, K, dropout_p):
    # The dropout keep-mask of x[o_n, o_k]: one Philox draw per element of x, keyed by its
    # flat index (wrapping at 2**32), so every kernel that needs x̃ rebuilds the same mask.
    offs = (o_n[:, None] * K + o_k[None, :]).to(tl.uint32)
    return tl.rand(dropout_seed, offs) >= dropout_p


@triton.jit
def _gate(mag_ptr, norm_ptr, o_m, m_m):
    # g = m / n for the rows o_m, in fp32; 0 where n = 0 (a zero row of V: y = bias there).
    b_mag = tl.load(mag_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)
    b_nrm = tl.load(norm_ptr + o_m, mask=m_m, other=1.0)
    return tl.where(b_nrm > 0, b_mag / tl.where(b_nrm > 0, b_nrm, 1.0), 0.0)


@triton.jit
def _recip(v):
    # 1 / v, 0 where v = 0 (no division by zero on the masked lanes).
    return tl.where(v != 0, 1.0 / tl.where(v != 0, v, 1.0), 0.0)


@triton.jit
def _grouped(pid, num_n, num_c, GROUP_N: tl.constexpr):
    # (token block, column block) of program pid in grouped order: GROUP_N token blocks share
    # each W0 panel while it sits in L2.
    group = pid // (GROUP_N * num_c)
    first_n = group * GROUP_N
    size_n = min(num_n - first_n, GROUP_N)
    pid_n = (first_n + (pid % (GROUP_N * num_c)) % size_n).to(tl.int64)
    pid_c = ((pid % (GROUP_N * num_c)) // size_n).to(tl.int64)
    return pid_n, pid_c


@triton.jit
def _rounded_as(v, DT: tl.constexpr):
    # fp32 v rounded to DT ("fp32", "fp16", "bf16") to nearest even, kept in fp32 (exact in DT);
    # on the bits under the interpreter, which truncates to bf16.
    if DT == "bf16":
        if _INTERPRET:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return v.to(tl.bfloat16).to(tl.float32)
    elif DT == "fp16":
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _w0(w_ptr, stride_wm, stride_wk, codes_ptr, qmap_ptr, qscale_ptr, qshift, o_m, o_k, mask, K, out_ptr,
        WQ: tl.constexpr, QDT: tl.constexpr):
    # W0[o_m, o_k] (broadcastable row / column indices; 0 on masked lanes) in out_ptr's element type.
    # WQ = 0: loaded as stored. A quantised W0 is dequantised as bitsandbytes does, in fp32, then
    # rounded to its dtype QDT, then to out_ptr's (``_rounded``): WQ = 4, 4-bit codes packed two
    # a byte over the flattened weight (element 2i in the high nibble), value = qmap[code] ·
    # qscale[flat index >> qshift] (absmax blocks of 2**qshift elements, fp32); WQ = 8, int8 w,
    # value = (w · qscale[row]) · (1/127) (the row scales SCB). The flat index is 32-bit (the
    # launchers send a 4-bit W0 of 2**31 elements or more to the torch path).
    if WQ == 4:
        f = o_m.to(tl.int32) * K + o_k.to(tl.int32)
        byte = tl.load(codes_ptr + (f >> 1), mask=mask, other=0).to(tl.int32)
        code = (byte >> (4 - 4 * (f & 1))) & 15
        v = tl.load(qmap_ptr + code) * tl.load(qscale_ptr + (f >> qshift), mask=mask, other=0.0)
        return _rounded(_rounded_as(v, QDT), out_ptr)
    elif WQ == 8:
        q = tl.load(w_ptr + o_m * stride_wm + o_k * stride_wk, mask=mask, other=0)
        sc = tl.load(qscale_ptr + (o_m + o_k * 0), mask=mask, other=0.0)
        v = (q.to(tl.float32) * sc) * 7.874015718698502e-3  # bitsandbytes multiplies by 1/127
        return _rounded(_rounded_as(v, QDT), out_ptr)
    else:
        return tl.load(w_ptr + o_m * stride_wm + o_k * stride_wk, mask=mask, other=0.0)


@triton.jit(do_not_specialize=["n"])
def _absmax_kernel(
    out_ptr,  # out (n,) fp32: the absmax of each block of a 4-bit W0
    q_ptr,  # (n,) uint8: those absmax as codes of the nested table
    code_ptr,  # (256,) fp32: the nested table
    absmax_ptr,  # (⌈n / block⌉,) fp32: the nested absmax, one per block of codes
    offset_ptr,  # (1,) fp32
    n, block,
    BLOCK: tl.constexpr,
):
    # Double quantisation undone: absmax = code[q] · absmax2[i // block] + offset, the product rounded
    # before the sum as bitsandbytes forms it (the launcher turns off FMA contraction).
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    q = tl.load(q_ptr + o, mask=m, other=0).to(tl.int32)
    v = tl.load(code_ptr + q) * tl.load(absmax_ptr + o // block, mask=m, other=0.0)
    tl.store(out_ptr + o, v + tl.load(offset_ptr), mask=m)


@triton.jit(do_not_specialize=["N", "qshift"])
def _dequant_kernel(
    out_ptr, stride_om, stride_ok,  # out (M, K): W0 dequantised
    w_ptr, stride_wm, stride_wk,  # int8 W0 (WQ = 8; else None): row, column
    codes_ptr, qmap_ptr, qscale_ptr,  # the quantised W0 (see _w0)
    qshift, M, K,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WQ: tl.constexpr, QDT: tl.constexpr,
):
    # A quantised W0 made dense for the many-token GEMMs (one pass: its codes read, W0 written).
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = (o_m < M)[:, None] & (o_k < K)[None, :]
    b_w = _w0(w_ptr, stride_wm, stride_wk, codes_ptr, qmap_ptr, qscale_ptr, qshift, o_m[:, None], o_k[None, :], m,
              K, out_ptr, WQ, QDT)
    tl.store(out_ptr + o_m[:, None] * stride_om + o_k[None, :] * stride_ok, b_w, mask=m)


@triton.jit(do_not_specialize=["R", "stride_bm", "stride_wam", "qshift"])
def _norm_kernel(
    norm_ptr,  # out (M,) fp32: ‖W0 + s·B·A‖ per row
    wa_ptr, stride_wam, stride_war,  # out (M, R) fp32: W0·Aᵀ (norm_grad="exact" only; else None): row, rank
    w_ptr, stride_wm, stride_wk,  # W0: row, column (int8 for WQ = 8; None for WQ = 4)
    codes_ptr, qmap_ptr, qscale_ptr,  # a quantised W0 (WQ = 4, 8; see _w0), else None
    a_ptr, stride_ar, stride_ak,  # A: rank, column
    b_ptr, stride_bm, stride_br,  # B: row, rank
    M, K, R, scaling, qshift,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_WA: tl.constexpr, UPCAST: tl.constexpr, LORA_F32: tl.constexpr, PREC: tl.constexpr,
    WQ: tl.constexpr, QDT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_r = tl.arange(0, BLOCK_R)
    b_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_w = _w0(w_ptr, stride_wm, stride_wk, codes_ptr, qmap_ptr, qscale_ptr, qshift, o_m[:, None], o_k[None, :],
                  m_m[:, None] & m_k[None, :], K, norm_ptr, WQ, QDT)
        b_ba = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            m_r = (r0 + o_r) < R
            b_b = tl.load(b_ptr + o_m[:, None] * stride_bm + (r0 + o_r)[None, :] * stride_br,
                          mask=m_m[:, None] & m_r[None, :], other=0.0)
            b_a = tl.load(a_ptr + (r0 + o_r)[:, None] * stride_ar + o_k[None, :] * stride_ak,
                          mask=m_r[:, None] & m_k[None, :], other=0.0)
            if LORA_F32 or UPCAST:
                b_b = b_b.to(tl.float32)
                b_a = b_a.to(tl.float32)
            b_ba = tl.dot(b_b, b_a, b_ba, input_precision=PREC)
            if HAS_WA:
                p_wa = wa_ptr + o_m[:, None] * stride_wam + (r0 + o_r)[None, :] * stride_war
                m_wa = m_m[:, None] & m_r[None, :]
                b_wa = tl.dot(b_w.to(tl.float32), tl.trans(b_a.to(tl.float32)), input_precision=PREC)
                if k0 > 0:
                    b_wa += tl.load(p_wa, mask=m_wa, other=0.0)
                tl.store(p_wa, b_wa, mask=m_wa)
        b_v = b_w.to(tl.float32) + scaling * b_ba
        b_sq += tl.sum(b_v * b_v, axis=1)
    tl.store(norm_ptr + o_m, tl.sqrt(b_sq), mask=m_m)


@triton.jit(do_not_specialize=["N", "R", "dropout_seed"])
def _xa_kernel(
    xa_ptr,  # out (N, R), contiguous: x̃·Aᵀ (fp32, or the adapters' 16-bit dtype)
    x_ptr, stride_xn, stride_xk,  # x: token, column
    a_ptr, stride_ar, stride_ak,  # A: rank, column
    N, K, R, dropout_p, dropout_seed, inv_keep,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, LORA_F32: tl.constexpr, SPLIT: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_n = o_n < N
    m_r = o_r < R
    b_acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = tl.load(x_ptr + o_n[:, None] * stride_xn + o_k[None, :] * stride_xk,
                      mask=m_n[:, None] & m_k[None, :], other=0.0)
        if HAS_DROPOUT:
            b_x = tl.where(_keep_mask(dropout_seed, o_n, o_k, K, dropout_p), b_x, 0.0)
        b_at = tl.load(a_ptr + o_r[None, :] * stride_ar + o_k[:, None] * stride_ak,
                       mask=m_r[None, :] & m_k[:, None], other=0.0)
        if SPLIT:
            b_acc = _dot_exact_bf16(b_x, b_at.to(tl.float32), b_acc, True)
        elif LORA_F32 or UPCAST:
            b_acc = tl.dot(b_x.to(tl.float32), b_at.to(tl.float32), b_acc, input_precision=PREC)
        else:
            b_acc = tl.dot(b_x.to(b_at.dtype), b_at, b_acc)
    if HAS_DROPOUT:
        b_acc = b_acc * inv_keep
    tl.store(xa_ptr + o_n[:, None] * R + o_r[None, :], _rounded(b_acc, xa_ptr), mask=m_n[:, None] & m_r[None, :])


@triton.jit(do_not_specialize=["N", "R", "dropout_seed", "stride_bm", "qshift"])
def _fwd_kernel(
    y_ptr, stride_yn, stride_ym,  # out (N, M): y
    u_ptr, stride_un, stride_um,  # out (N, M): u = x̃·W0ᵀ + s·xa·Bᵀ for the backward (HAS_U; else None)
    x_ptr, stride_xn, stride_xk,  # x: token, column
    w_ptr, stride_wm, stride_wk,  # W0: row, column (int8 for WQ = 8; None for WQ = 4)
    codes_ptr, qmap_ptr, qscale_ptr,  # a quantised W0 (WQ = 4, 8; see _w0), else None
    b_ptr, stride_bm, stride_br,  # B: row, rank
    xa_ptr,  # (N, R), contiguous
    mag_ptr, norm_ptr,  # (M,) each
    bias_ptr,  # (M,) (HAS_BIAS; else None)
    N, M, K, R, scaling, dropout_p, dropout_seed, inv_keep, qshift,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_N: tl.constexpr, HAS_U: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, EPI_PREC: tl.constexpr, WQ: tl.constexpr, QDT: tl.constexpr,
):
    # y = g ⊙ (x·W0ᵀ + s·xa·Bᵀ) + bias                                   (no dropout)
    # y = x·W0ᵀ + bias + (g − 1) ⊙ (x̃·W0ᵀ) + g ⊙ s·xa·Bᵀ, xa = x̃·Aᵀ    (dropout; PEFT's order)
    pid_n, pid_m = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
    i_n = tl.arange(0, BLOCK_N)
    i_m = tl.arange(0, BLOCK_M)
    i_k = tl.arange(0, BLOCK_K)
    o_n = pid_n * BLOCK_N + i_n
    o_m = pid_m * BLOCK_M + i_m
    m_n = o_n < N
    m_m = o_m < M
    # 64-bit tile bases, 32-bit offsets inside the tile (fewer registers in the main loop).
    p_x = x_ptr + pid_n * BLOCK_N * stride_xn + (i_n[:, None] * stride_xn + i_k[None, :] * stride_xk)
    if WQ == 0:
        p_wt = w_ptr + pid_m * BLOCK_M * stride_wm + (i_m[None, :] * stride_wm + i_k[:, None] * stride_wk)
    b_acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if HAS_DROPOUT:
        b_accd = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        m_k = (k0 + i_k) < K
        b_x = tl.load(p_x, mask=m_n[:, None] & m_k[None, :], other=0.0)
        if WQ == 0:
            b_wt = tl.load(p_wt, mask=m_m[None, :] & m_k[:, None], other=0.0)
            p_wt += BLOCK_K * stride_wk
        else:
            b_wt = _w0(w_ptr, stride_wm, stride_wk, codes_ptr, qmap_ptr, qscale_ptr, qshift, o_m[None, :],
                       (k0 + i_k)[:, None], m_m[None, :] & m_k[:, None], K, x_ptr, WQ, QDT)
        if UPCAST:
            b_x = b_x.to(tl.float32)
            b_wt = b_wt.to(tl.float32)
        b_acc = tl.dot(b_x, b_wt, b_acc, input_precision=PREC)
        if HAS_DROPOUT:
            # x·keep is exact in x's dtype; 1/(1 − p) is applied to the fp32 sum.
            b_xd = tl.where(_keep_mask(dropout_seed, o_n, k0 + i_k, K, dropout_p), b_x, 0.0).to(b_x.dtype)
            b_accd = tl.dot(b_xd, b_wt, b_accd, input_precision=PREC)
        p_x += BLOCK_K * stride_xk
    # The rank-r term joins the x·W0ᵀ accumulator (a third 128×128 fp32 tile would spill);
    # with dropout it stays apart (those tiles are half as wide). Its fp32 dot runs once per
    # tile at EPI_PREC.
    o_r = tl.arange(0, BLOCK_R)
    if HAS_DROPOUT:
        b_lora = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        m_r = (r0 + o_r) < R
        b_xa = tl.load(xa_ptr + o_n[:, None] * R + (r0 + o_r)[None, :], mask=m_n[:, None] & m_r[None, :],
                       other=0.0).to(tl.float32)
        b_bt = tl.load(b_ptr + o_m[None, :] * stride_bm + (r0 + o_r)[:, None] * stride_br,
                       mask=m_m[None, :] & m_r[:, None], other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            b_lora = tl.dot(b_xa, b_bt, b_lora, input_precision=EPI_PREC)
        else:
            b_acc = tl.dot(b_xa * scaling, b_bt, b_acc, input_precision=EPI_PREC)
    b_g = _gate(mag_ptr, norm_ptr, o_m, m_m)
    if HAS_DROPOUT:
        b_u = b_accd * inv_keep + scaling * b_lora
        b_y = b_acc + b_g[None, :] * b_u - b_accd * inv_keep
    else:
        b_u = b_acc
        b_y = b_g[None, :] * b_acc
    if HAS_U:
        tl.store(u_ptr + o_n[:, None] * stride_un + o_m[None, :] * stride_um,
                 _rounded(b_u, u_ptr), mask=m_n[:, None] & m_m[None, :])
    if HAS_BIAS:
        b_y += tl.load(bias_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + o_n[:, None] * stride_yn + o_m[None, :] * stride_ym,
             _rounded(b_y, y_ptr), mask=m_n[:, None] & m_m[None, :])


@triton.jit(do_not_specialize=["N", "R", "stride_bm"])
def _bwd_dy_kernel(
    gb_part_ptr,  # out (S, N, R) fp32: per column split, (dy ⊙ g)·B
    dm_part_ptr,  # out (T, M) fp32: per token group, Σ_tokens dy ⊙ u
    db_part_ptr,  # out (T, M, R) fp32: per token group, (dy ⊙ g)ᵀ·xa
    dy_ptr, stride_dyn, stride_dym,  # dy = dL/dy: token, column
    u_ptr, stride_un, stride_um,  # u (ũ with dropout) saved by the forward (HAS_U), or None
    y_ptr, stride_yn, stride_ym,  # or the output y instead (HAS_Y: save_output, no dropout, no bias)
    xa_ptr,  # (N, R), contiguous
    b_ptr, stride_bm, stride_br,  # B: row, rank
    mag_ptr, norm_ptr,  # (M,) each
    N, M, R, TOK_PER_PROG, COL_PER_PROG,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_U: tl.constexpr, HAS_Y: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
):
    # One pass over dy. Program (t, s, c) covers TOK_PER_PROG tokens × COL_PER_PROG columns ×
    # one rank chunk; it owns its slices of the dm/dB partials (read-modify-write, no races).
    pid_t = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    o_r = pid_c * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    tok0 = pid_t * TOK_PER_PROG
    col0 = pid_s * COL_PER_PROG
    for n0 in range(tok0, tl.minimum(tok0 + TOK_PER_PROG, N), BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_xa = tl.load(xa_ptr + o_n[:, None] * R + o_r[None, :], mask=m_n[:, None] & m_r[None, :],
                       other=0.0).to(tl.float32)
        b_gb = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for m0 in range(col0, tl.minimum(col0 + COL_PER_PROG, M), BLOCK_M):
            o_m = m0 + tl.arange(0, BLOCK_M)
            m_m = o_m < M
            m_nm = m_n[:, None] & m_m[None, :]
            b_g = _gate(mag_ptr, norm_ptr, o_m, m_m)
            b_dy = tl.load(dy_ptr + o_n[:, None] * stride_dyn + o_m[None, :] * stride_dym, mask=m_nm, other=0.0)
            b_bm = tl.load(b_ptr + o_m[:, None] * stride_bm + o_r[None, :] * stride_br,
                           mask=m_m[:, None] & m_r[None, :], other=0.0).to(tl.float32)
            # g scales B's rows and dB's rows instead of dy, so dy enters the dots as loaded:
            # gb = dy·(g ⊙ B), dB = g ⊙ (dyᵀ·xa).
            b_c = b_bm * b_g[:, None]
            if SPLIT:
                b_gb = _dot_exact_bf16(b_dy, b_c, b_gb, True)
                b_dyx = _dot_exact_bf16(tl.trans(b_dy), b_xa, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), True)
            else:
                b_dyf = b_dy.to(tl.float32)
                b_gb = tl.dot(b_dyf, b_c, b_gb, input_precision=PREC)
                b_dyx = tl.dot(tl.trans(b_dyf), b_xa, input_precision=PREC)
            # The first token block of the program starts the partials; later ones add to them.
            m_prev = (o_m * 0 + n0) > tok0
            p_db = db_part_ptr + (pid_t * M + o_m[:, None]) * R + o_r[None, :]
            m_db = m_m[:, None] & m_r[None, :]
            b_db = b_dyx * b_g[:, None] + tl.load(p_db, mask=m_db & m_prev[:, None], other=0.0)
            tl.store(p_db, b_db, mask=m_db)
            if pid_c == 0:
                if HAS_Y:
                    # No bias (the op saves y only then): u = y / g, so Σ dy ⊙ u = Σ dy ⊙ y / g per
                    # column. Columns with g = 0 add nothing: dm is 0 where n = 0, and
                    # _dm_redo_kernel makes the rows with |m| < G_REDO · n again from x and W0.
                    b_u = tl.load(y_ptr + o_n[:, None] * stride_yn + o_m[None, :] * stride_ym, mask=m_nm,
                                  other=0.0).to(tl.float32)
                    b_dm = tl.sum(b_dy.to(tl.float32) * b_u, axis=0) * _recip(b_g)
                else:
                    b_u = tl.load(u_ptr + o_n[:, None] * stride_un + o_m[None, :] * stride_um, mask=m_nm,
                                  other=0.0).to(tl.float32)
                    b_dm = tl.sum(b_dy.to(tl.float32) * b_u, axis=0)
                p_dm = dm_part_ptr + pid_t * M + o_m
                b_dm += tl.load(p_dm, mask=m_m & m_prev, other=0.0)
                tl.store(p_dm, b_dm, mask=m_m)
        tl.store(gb_part_ptr + (pid_s * N + o_n[:, None]) * R + o_r[None, :], b_gb, mask=m_n[:, None] & m_r[None, :])


@triton.jit
def _sum_gb(gb_part_ptr, o_n, m_n, o_r, R, N, S):
    # gb rows o_n, ranks o_r: the sum of the S column-split partials (N, R) fp32.
    m = m_n[:, None] & (o_r < R)[None, :]
    b_gb = tl.load(gb_part_ptr + o_n[:, None] * R + o_r[None, :], mask=m, other=0.0)
    for s in range(1, S):
        b_gb += tl.load(gb_part_ptr + (s * N + o_n[:, None]) * R + o_r[None, :], mask=m, other=0.0)
    return b_gb


@triton.jit(do_not_specialize=["N", "R", "S", "dropout_seed", "qshift"])
def _dx_kernel(
    dx_ptr, stride_dxn, stride_dxk,  # out (N, K): dx (HAS_DX: x needs a gradient; else None)
    da_part_ptr,  # out (T, R, K) fp32: per token block, gbᵀ·(x ⊙ keep) (HAS_DA_PART: A trains; else None)
    dy_ptr, stride_dyn, stride_dym,  # dy: token, column
    w_ptr, stride_wm, stride_wk,  # W0: row, column (int8 for WQ = 8; None for WQ = 4)
    codes_ptr, qmap_ptr, qscale_ptr,  # a quantised W0 (WQ = 4, 8; see _w0), else None
    a_ptr, stride_ar, stride_ak,  # A: rank, column
    x_ptr, stride_xn, stride_xk,  # x: token, column
    gb_part_ptr,  # (S, N, R) fp32 partials of gb = (dy ⊙ g)·B
    mag_ptr, norm_ptr,  # (M,) each
    N, M, K, R, S, scaling, dropout_p, dropout_seed, inv_keep, qshift,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_N: tl.constexpr, HAS_DX: tl.constexpr, HAS_DA_PART: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, WQ: tl.constexpr, QDT: tl.constexpr,
):
    # Without HAS_DX only the dA partials are made; without HAS_DA_PART (a frozen A) only dx.
    # dx = (dy ⊙ g)·W0 + s·gb·A                                            (no dropout)
    # dx = dy·W0 + keep/(1 − p) ⊙ [((g − 1) ⊙ dy)·W0 + s·gb·A]              (dropout)
    pid_n, pid_k = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_n = o_n < N
    m_k = o_k < K
    b_acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if HAS_DROPOUT:
        b_accd = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if HAS_DX:
        for m0 in range(0, M, BLOCK_M):
            o_m = m0 + tl.arange(0, BLOCK_M)
            m_m = o_m < M
            b_dy = tl.load(dy_ptr + o_n[:, None] * stride_dyn + o_m[None, :] * stride_dym,
                           mask=m_n[:, None] & m_m[None, :], other=0.0)
            b_w = _w0(w_ptr, stride_wm, stride_wk, codes_ptr, qmap_ptr, qscale_ptr, qshift, o_m[:, None],
                      o_k[None, :], m_m[:, None] & m_k[None, :], K, dx_ptr, WQ, QDT)
            b_g = _gate(mag_ptr, norm_ptr, o_m, m_m)
            if UPCAST:
                b_w = b_w.to(tl.float32)
            if HAS_DROPOUT:
                b_acc = tl.dot(b_dy.to(b_w.dtype), b_w, b_acc, input_precision=PREC)
                b_dyd = (b_dy.to(tl.float32) * (b_g - 1.0)[None, :]).to(b_w.dtype)
                b_accd = tl.dot(b_dyd, b_w, b_accd, input_precision=PREC)
            else:
                b_dys = (b_dy.to(tl.float32) * b_g[None, :]).to(b_w.dtype)
                b_acc = tl.dot(b_dys, b_w, b_acc, input_precision=PREC)
    if HAS_DROPOUT:
        m_keep = _keep_mask(dropout_seed, o_n, o_k, K, dropout_p)
    o_r = tl.arange(0, BLOCK_R)
    if HAS_DX:
        for r0 in range(0, R, BLOCK_R):
            b_gb = _sum_gb(gb_part_ptr, o_n, m_n, r0 + o_r, R, N, S)
            b_a = tl.load(a_ptr + (r0 + o_r)[:, None] * stride_ar + o_k[None, :] * stride_ak,
                          mask=((r0 + o_r) < R)[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            # s·gb·A joins the accumulator of the dropped path (or the only one).
            if HAS_DROPOUT:
                b_accd = tl.dot(b_gb * scaling, b_a, b_accd, input_precision=PREC)
            else:
                b_acc = tl.dot(b_gb * scaling, b_a, b_acc, input_precision=PREC)
        if HAS_DROPOUT:
            b_acc += tl.where(m_keep, b_accd * inv_keep, 0.0)
        tl.store(dx_ptr + o_n[:, None] * stride_dxn + o_k[None, :] * stride_dxk,
                 _rounded(b_acc, dx_ptr), mask=m_n[:, None] & m_k[None, :])
    if HAS_DA_PART:
        # dA partial after dx is stored, so its x tile does not compete with the accumulator.
        b_x = tl.load(x_ptr + o_n[:, None] * stride_xn + o_k[None, :] * stride_xk,
                      mask=m_n[:, None] & m_k[None, :], other=0.0)
        if HAS_DROPOUT:
            b_x = tl.where(m_keep, b_x, 0.0).to(b_x.dtype)
        if not SPLIT:
            b_x = b_x.to(tl.float32)
        for r0 in range(0, R, BLOCK_R):
            b_gb = _sum_gb(gb_part_ptr, o_n, m_n, r0 + o_r, R, N, S)
            if SPLIT:
                b_da = _dot_exact_bf16(b_x, tl.trans(b_gb), tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), False)
            else:
                b_da = tl.dot(tl.trans(b_gb), b_x, input_precision=PREC)
            tl.store(da_part_ptr + (pid_n * R + (r0 + o_r)[:, None]) * K + o_k[None, :], b_da,
                     mask=((r0 + o_r) < R)[:, None] & m_k[None, :])


@triton.jit
def _sum_rows(out_ptr, part_ptr, T, L, pid, scale, BLOCK: tl.constexpr):
    # out[j] = scale · Σ_t part[t, j] for the BLOCK columns of program pid.
    o_l = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_l = o_l < L
    b_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, T):
        b_acc += tl.load(part_ptr + t * L + o_l, mask=m_l, other=0.0)
    tl.store(out_ptr + o_l, _rounded((b_acc * scale), out_ptr), mask=m_l)


@triton.jit(do_not_specialize=["TA", "TB"])
def _sum_partials_kernel(
    da_ptr,  # out (R, K): dA = s/(1 − p) · Σ_t da_part[t] (HAS_DA: A trains; else None, RK = 0)
    db_ptr,  # out (M, R): dB = s · Σ_t db_part[t]
    dm_ptr,  # out (M,): dm = Σ_t dm_part[t] / n (0 where n = 0)
    da_part_ptr, db_part_ptr, dm_part_ptr,  # (TA, R·K), (TB, M·R), (TB, M) fp32
    norm_ptr,  # (M,)
    TA, TB, RK, MR, M, scale_a, scale_b,
    BLOCK: tl.constexpr, HAS_DA: tl.constexpr,
):
    # One launch sums every token-reduction partial of the backward: programs [0, na) make dA,
    # [na, na + nb) dB, the rest dm.
    pid = tl.program_id(0)
    na = tl.cdiv(RK, BLOCK)
    nb = tl.cdiv(MR, BLOCK)
    if pid < na:
        if HAS_DA:
            _sum_rows(da_ptr, da_part_ptr, TA, RK, pid, scale_a, BLOCK)
    elif pid < na + nb:
        _sum_rows(db_ptr, db_part_ptr, TB, MR, pid - na, scale_b, BLOCK)
    else:
        o_m = (pid - na - nb).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m_m = o_m < M
        b_acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in range(0, TB):
            b_acc += tl.load(dm_part_ptr + t * M + o_m, mask=m_m, other=0.0)
        b_nrm = tl.load(norm_ptr + o_m, mask=m_m, other=1.0)
        tl.store(dm_ptr + o_m, _rounded(tl.where(b_nrm > 0, b_acc / tl.where(b_nrm > 0, b_nrm, 1.0), 0.0), dm_ptr),
                 mask=m_m)


@triton.jit(do_not_specialize=["N", "R", "qshift"])
def _dm_redo_kernel(
    dm_ptr,  # out (M,): dm of the rows with |m| < G_REDO · n (or NaN m), n > 0; other rows untouched
    dy_ptr, stride_dyn, stride_dym,  # dy: token, column
    x_ptr, stride_xn, stride_xk,  # x: token, column
    w_ptr, stride_wm, stride_wk,  # W0: row, column (int8 for WQ = 8; None for WQ = 4)
    codes_ptr, qmap_ptr, qscale_ptr,  # a quantised W0 (WQ = 4, 8; see _w0), else None
    xa_ptr,  # (N, R), contiguous
    b_ptr, stride_bm, stride_br,  # B: row, rank
    mag_ptr, norm_ptr,  # (M,) each
    N, M, K, R, scaling, qshift,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, G_REDO: tl.constexpr, WQ: tl.constexpr, QDT: tl.constexpr,
):
    # After a backward that read the output y (save_output): dm = Σ_tokens dy ⊙ u / n for the
    # rows where y = g·u carries u too coarsely (not at all where m = 0; below fp16's normal
    # range sooner than u): u = x·W0ᵀ + s·xa·Bᵀ is made again for those rows (rare: DoRA starts
    # at m = n and stays near it); a program whose BLOCK_M rows have none returns at once. It
    # runs after _sum_partials_kernel on the same stream and overwrites those rows. The loops
    # are not software-pipelined and the offsets are 32-bit (either made ptxas spill): where an
    # operand's offsets do not fit in 31 bits the launcher makes these rows with torch instead.
    o_j = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_j = o_j < M
    b_nrm = tl.load(norm_ptr + o_j, mask=m_j, other=1.0)
    b_mag = tl.abs(tl.load(mag_ptr + o_j, mask=m_j, other=1.0).to(tl.float32))
    b_redo = ~(b_mag >= G_REDO * b_nrm) & (b_nrm > 0) & m_j
    if tl.sum(b_redo.to(tl.int32), axis=0) > 0:
        i_t = tl.arange(0, BLOCK_N)
        i_k = tl.arange(0, BLOCK_K)
        i_r = tl.arange(0, BLOCK_R)
        b_dm = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t0 in tl.range(0, N, BLOCK_N, num_stages=1):
            o_t = t0 + i_t
            m_t = o_t < N
            b_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=1):
                m_k = (k0 + i_k) < K
                b_x = tl.load(x_ptr + o_t[:, None] * stride_xn + (k0 + i_k)[None, :] * stride_xk,
                              mask=m_t[:, None] & m_k[None, :], other=0.0)
                b_wt = _w0(w_ptr, stride_wm, stride_wk, codes_ptr, qmap_ptr, qscale_ptr, qshift, o_j[None, :],
                           (k0 + i_k)[:, None], b_redo[None, :] & m_k[:, None], K, x_ptr, WQ, QDT)
                if UPCAST:
                    b_x = b_x.to(tl.float32)
                    b_wt = b_wt.to(tl.float32)
                b_u = tl.dot(b_x, b_wt, b_u, input_precision=PREC)
            for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
                m_r = (r0 + i_r) < R
                b_xa = tl.load(xa_ptr + o_t[:, None] * R + (r0 + i_r)[None, :], mask=m_t[:, None] & m_r[None, :],
                               other=0.0).to(tl.float32)
                b_bt = tl.load(b_ptr + o_j[None, :] * stride_bm + (r0 + i_r)[:, None] * stride_br,
                               mask=b_redo[None, :] & m_r[:, None], other=0.0).to(tl.float32)
                b_u = tl.dot(b_xa * scaling, b_bt, b_u, input_precision=PREC)
            b_dy = tl.load(dy_ptr + o_t[:, None] * stride_dyn + o_j[None, :] * stride_dym,
                           mask=m_t[:, None] & b_redo[None, :], other=0.0)
            b_dm += tl.sum(b_dy.to(tl.float32) * b_u, axis=0)
        tl.store(dm_ptr + o_j, _rounded(b_dm / b_nrm, dm_ptr), mask=b_redo)


@triton.jit(do_not_specialize=["N", "dropout_seed"])
def _mask_kernel(
    mask_ptr,  # out (N, K) int8, contiguous: the keep-mask the other kernels build from dropout_seed
    N, K, dropout_p, dropout_seed,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = (o_n < N)[:, None] & (o_k < K)[None, :]
    b_keep = _keep_mask(dropout_seed, o_n, o_k, K, dropout_p)
    tl.store(mask_ptr + o_n[:, None] * K + o_k[None, :], b_keep.to(tl.int8), mask=m)



@triton.jit(do_not_specialize=["N", "R", "stride_bm", "qshift"])
def _fwd_norm_kernel(
    y_ptr, stride_yn, stride_ym,  # out (N, M): y
    norm_ptr,  # out (M,) fp32: ‖W0 + s·B·A‖ per row
    x_ptr, stride_xn, stride_xk,  # x: token, column
    w_ptr, stride_wm, stride_wk,  # W0: row, column (int8 for WQ = 8; None for WQ = 4)
    codes_ptr, qmap_ptr, qscale_ptr,  # a quantised W0 (WQ = 4, 8; see _w0), else None
    a_ptr, stride_ar, stride_ak,  # A: rank, column
    b_ptr, stride_bm, stride_br,  # B: row, rank
    xa_ptr,  # (N, R), contiguous (HAS_XA; else None: the GEMM reads V = W0 + s·B·A in x's dtype)
    mag_ptr,  # (M,)
    bias_ptr,  # (M,) (HAS_BIAS; else None)
    N, M, K, R, scaling, qshift,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_XA: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, LORA_F32: tl.constexpr,
    PREC: tl.constexpr, EPI_PREC: tl.constexpr, WQ: tl.constexpr, QDT: tl.constexpr,
):
    # y = g ⊙ (x·W0ᵀ + s·xa·Bᵀ) + bias with the norm made in the same pass over W0 (no dropout, no u):
    # each tile of W0 is loaded (a quantised one dequantised) once for ‖W0 + s·B·A‖, as in
    # _norm_kernel, and for x·W0ᵀ, as in _fwd_kernel (the same roundings). Each token block makes the
    # norm of its rows again (the same operations: the same values), the first one stores it.
    # Consecutive programs share a tile of W0 (the token blocks are few). Without xa (eval with
    # adapters in x's dtype) the GEMM reads the tile of V = W0 + s·B·A that the norm made, in x's
    # dtype: x·Vᵀ is u, and the rank-r term needs no x·Aᵀ (nor its launch).
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % num_n
    pid_m = (tl.program_id(0) // num_n).to(tl.int64)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_r = tl.arange(0, BLOCK_R)
    b_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_w = _w0(w_ptr, stride_wm, stride_wk, codes_ptr, qmap_ptr, qscale_ptr, qshift, o_m[:, None], o_k[None, :],
                  m_m[:, None] & m_k[None, :], K, norm_ptr, WQ, QDT)
        b_ba = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            m_r = (r0 + o_r) < R
            b_b = tl.load(b_ptr + o_m[:, None] * stride_bm + (r0 + o_r)[None, :] * stride_br,
                          mask=m_m[:, None] & m_r[None, :], other=0.0)
            b_a = tl.load(a_ptr + (r0 + o_r)[:, None] * stride_ar + o_k[None, :] * stride_ak,
                          mask=m_r[:, None] & m_k[None, :], other=0.0)
            if LORA_F32 or UPCAST:
                b_b = b_b.to(tl.float32)
                b_a = b_a.to(tl.float32)
            b_ba = tl.dot(b_b, b_a, b_ba, input_precision=PREC)
        b_v = b_w.to(tl.float32) + scaling * b_ba
        b_sq += tl.sum(b_v * b_v, axis=1)
        b_x = tl.load(x_ptr + o_n[:, None] * stride_xn + o_k[None, :] * stride_xk, mask=m_n[:, None] & m_k[None, :],
                      other=0.0)
        if not HAS_XA:
            b_wx = _rounded(b_v, x_ptr)
        elif WQ == 0:
            b_wx = b_w
        else:
            b_wx = _rounded(b_w, x_ptr)  # (W0 in its dtype, then in x's: as _fwd_kernel reads it)
        if UPCAST:
            b_x = b_x.to(tl.float32)
            b_wx = b_wx.to(tl.float32)
        b_acc = tl.dot(b_x, tl.trans(b_wx), b_acc, input_precision=PREC)
    if HAS_XA:
        for r0 in range(0, R, BLOCK_R):
            m_r = (r0 + o_r) < R
            b_xa = tl.load(xa_ptr + o_n[:, None] * R + (r0 + o_r)[None, :], mask=m_n[:, None] & m_r[None, :],
                           other=0.0).to(tl.float32)
            b_bt = tl.load(b_ptr + o_m[None, :] * stride_bm + (r0 + o_r)[:, None] * stride_br,
                           mask=m_m[None, :] & m_r[:, None], other=0.0).to(tl.float32)
            b_acc = tl.dot(b_xa * scaling, b_bt, b_acc, input_precision=EPI_PREC)
    b_nrm = tl.sqrt(b_sq)
    if pid_n == 0:
        tl.store(norm_ptr + o_m, b_nrm, mask=m_m)
    b_mag = tl.load(mag_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)
    b_g = tl.where(b_nrm > 0, b_mag / tl.where(b_nrm > 0, b_nrm, 1.0), 0.0)  # (_gate's rule)
    b_y = b_g[None, :] * b_acc
    if HAS_BIAS:
        b_y += tl.load(bias_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + o_n[:, None] * stride_yn + o_m[None, :] * stride_ym, _rounded(b_y, y_ptr),
             mask=m_n[:, None] & m_m[None, :])
