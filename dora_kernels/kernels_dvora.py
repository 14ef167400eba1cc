"""Triton kernels for DVoRA's factor ``B′ = diag(λ_b)·B·diag(λ_d)`` and its gradients.

Names: ``B (M, R)`` the layer's slice of the frozen ``vera_B`` (``vb_ptr``), ``λ_b (M,)``
(``lb_ptr``), ``λ_d (R,)`` (``ld_ptr``), ``B′ (M, R)`` (``b_ptr``: the DoRA op's ``lora_B``),
``dB′ = dL/dB′ (M, R)`` (``db_ptr``: what the op's backward returns for lora_B). Conventions as
in ``kernels``: output pointers first, each input pointer followed by its strides, then sizes,
then ``tl.constexpr`` meta-parameters; launched by keyword through ``runtime.launch``. Every
value is upcast to fp32 right after its load (the interpreter's bf16 arithmetic is wrong) and
rounded once where it is stored (``kernels._rounded``: to nearest even, the interpreter too).
The λ_d gradient, a reduction over rows, is written as per-program fp32 partials that a second
kernel sums in a fixed order: deterministic, no atomics. M and R only bound loops and masks:
not specialised, so a layer compiles once whatever its rank.
"""

import triton
import triton.language as tl

from .kernels import _rounded


@triton.jit(do_not_specialize=["M", "R"])
def _dvora_b_kernel(
    b_ptr, stride_bm, stride_br,  # out (M, R): B′ = (λ_b ⊙ B) ⊙ λ_d in the op's dtype; row, rank
    vb_ptr, stride_vbm, stride_vbr,  # B: row, rank
    lb_ptr, stride_lbm,  # λ_b (M,)
    ld_ptr, stride_ldr,  # λ_d (R,)
    M, R,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One BLOCK_M × BLOCK_R tile of B′, multiplied in fp32 in torch's order ((λ_b·B)·λ_d) and
    # rounded once, so it equals dvora_factors' torch expression bit for bit.
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_r = o_r < R
    m_mr = m_m[:, None] & m_r[None, :]
    b_vb = tl.load(vb_ptr + o_m[:, None] * stride_vbm + o_r[None, :] * stride_vbr, mask=m_mr, other=0.0)
    b_lb = tl.load(lb_ptr + o_m * stride_lbm, mask=m_m, other=0.0).to(tl.float32)
    b_ld = tl.load(ld_ptr + o_r * stride_ldr, mask=m_r, other=0.0).to(tl.float32)
    b_b = (b_lb[:, None] * b_vb.to(tl.float32)) * b_ld[None, :]
    tl.store(b_ptr + o_m[:, None] * stride_bm + o_r[None, :] * stride_br, _rounded(b_b, b_ptr), mask=m_mr)


@triton.jit(do_not_specialize=["M", "R"])
def _dvora_dlambda_kernel(
    dlb_ptr,  # out (M,): dλ_b = Σ_r (dB′ ⊙ λ_d) ⊙ B, in λ_b's dtype
    dld_part_ptr,  # out (cdiv(M, BLOCK_M), R) fp32, contiguous: Σ over this program's rows of dB′ ⊙ (λ_b ⊙ B)
    db_ptr, stride_dbm, stride_dbr,  # dB′: row, rank
    vb_ptr, stride_vbm, stride_vbr,  # B: row, rank
    lb_ptr, stride_lbm,  # λ_b (M,)
    ld_ptr, stride_ldr,  # λ_d (R,)
    M, R,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One pass over dB′: the program's BLOCK_M rows, all of R in BLOCK_R steps. dλ_b of those rows
    # is complete here; dλ_d gets one partial row per program (_dvora_sum_kernel adds them).
    pid = tl.program_id(0)
    o_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    i_r = tl.arange(0, BLOCK_R)
    p_db = db_ptr + o_m[:, None] * stride_dbm + i_r[None, :] * stride_dbr
    p_vb = vb_ptr + o_m[:, None] * stride_vbm + i_r[None, :] * stride_vbr
    p_part = dld_part_ptr + pid.to(tl.int64) * R + i_r
    b_lb = tl.load(lb_ptr + o_m * stride_lbm, mask=m_m, other=0.0).to(tl.float32)
    b_dlb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        m_r = (r0 + i_r) < R
        m_mr = m_m[:, None] & m_r[None, :]
        b_db = tl.load(p_db, mask=m_mr, other=0.0).to(tl.float32)
        b_vb = tl.load(p_vb, mask=m_mr, other=0.0).to(tl.float32)
        b_ld = tl.load(ld_ptr + (r0 + i_r) * stride_ldr, mask=m_r, other=0.0).to(tl.float32)
        # the products in the order torch's autograd of ((λ_b·B)·λ_d) forms them
        b_dlb += tl.sum((b_db * b_ld[None, :]) * b_vb, axis=1)
        tl.store(p_part + r0, tl.sum(b_db * (b_lb[:, None] * b_vb), axis=0), mask=m_r)
        p_db += BLOCK_R * stride_dbr
        p_vb += BLOCK_R * stride_vbr
    tl.store(dlb_ptr + o_m, _rounded(b_dlb, dlb_ptr), mask=m_m)


@triton.jit(do_not_specialize=["M", "R"])
def _dvora_sum_kernel(
    dld_ptr,  # out (R,): dλ_d = Σ_t dld_part[t], in λ_d's dtype
    dld_part_ptr,  # (cdiv(M, BLOCK_M), R) fp32, contiguous: _dvora_dlambda_kernel's partials
    M, R,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # BLOCK_R ranks a program; the partials (one per BLOCK_M rows of B′) in BLOCK_T-row steps.
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    i_t = tl.arange(0, BLOCK_T)
    n_part = tl.cdiv(M, BLOCK_M)
    b_acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for t0 in range(0, n_part, BLOCK_T):
        o_t = (t0 + i_t).to(tl.int64)
        b_acc += tl.load(dld_part_ptr + o_t[:, None] * R + o_r[None, :], mask=(o_t < n_part)[:, None] & m_r[None, :],
                         other=0.0)
    tl.store(dld_ptr + o_r, _rounded(tl.sum(b_acc, axis=0), dld_ptr), mask=m_r)
