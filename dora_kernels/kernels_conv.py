"""Triton kernels for DoRA's combination on convolutions (``dora_kernels.conv``) and its backward.

Every (N, C, *S) tensor is read as (N, C, S), spatial positions flattened (``conv._view3``), with
its own three strides: batch, channel, position; NCHW and channels_last are both such views, and
the JIT's specialisation of a unit stride lets each layout vectorise along its own inner dim.
Names: ``result`` the running output PEFT hands the DoRA adapter, ``lora`` l = lora_B(lora_A(x))
(l̃ with dropout), ``base`` b̃ = conv(x̃, W0) (the dropout form only), ``u`` the tensor saved for
dm, ``mag``, ``norm`` (C,) m and ‖W0 + s·L‖, ``g = m / n`` (0 where n = 0: ``kernels._gate``),
``dy = dL/dy``, ``d<name>`` the gradient of input ``name``, ``*_part`` per-program fp32 partials.

    y = g ⊙ (result − bias + s·lora) + bias,  u = result − bias + s·lora      (bias taken out
        of result only with HAS_BIAS_IN_RESULT; added back only with HAS_BIAS)
    y = result + (g − 1) ⊙ base + g ⊙ s·lora, u = base + s·lora               (HAS_BASE: dropout)

Conventions as in ``kernels``: output pointers first, each input pointer followed by its
strides, then sizes, then ``tl.constexpr`` meta-parameters; launched by keyword through
``runtime.launch``. Every value is upcast to fp32 right after its load (the interpreter's bf16
arithmetic is wrong) and rounded once where it is stored (``kernels._rounded``). The reductions
over (n, s) (dm, dbias) are per-program fp32 partials that ``_conv_sum_kernel`` sums in a fixed
order: deterministic, no atomics. N and the tile counts only bound loops: not specialised.
"""

import triton
import triton.language as tl

from .kernels import _gate, _rounded


@triton.jit
def _tile(ptr, n, o_c, o_s, stride_n, stride_c, stride_s):
    # The (BLOCK_C, BLOCK_S) pointers of batch n's channels o_c × positions o_s in one tensor: n
    # (int64) moves the base, the offsets within one batch element are 32-bit (the launcher sends
    # a batch element of 2**31 elements or more to the torch path). 64-bit offsets for every element
    # of every tensor took 200-255 registers where the loads do not vectorise (odd sizes).
    return (ptr + n * stride_n) + (o_c[:, None] * stride_c + o_s[None, :] * stride_s)


@triton.jit(do_not_specialize=["N"])
def _conv_fwd_kernel(
    y_ptr, stride_yn, stride_yc, stride_ys,  # out (N, C, S): y in the output dtype
    u_ptr, stride_un, stride_uc, stride_us,  # out (N, C, S): u, the backward's dm (HAS_U; else None)
    result_ptr, stride_rn, stride_rc, stride_rs,  # the running result: batch, channel, position
    base_ptr, stride_bsn, stride_bsc, stride_bss,  # b̃ (HAS_BASE: the dropout form; else None)
    lora_ptr, stride_ln, stride_lc, stride_ls,  # l (l̃ with dropout)
    mag_ptr, norm_ptr,  # (C,) each, contiguous
    bias_ptr,  # (C,), contiguous (HAS_BIAS: no dropout, a bias; else None)
    N, C, S, scaling,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_U: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_IN_RESULT: tl.constexpr,
):
    # One BLOCK_C × BLOCK_S tile of one batch element: program (n · ⌈S / BLOCK_S⌉ + s block, c block).
    pid = tl.program_id(0)
    n_sb = tl.cdiv(S, BLOCK_S)
    n = (pid // n_sb).to(tl.int64)
    o_s = (pid % n_sb) * BLOCK_S + tl.arange(0, BLOCK_S)
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    m_cs = m_c[:, None] & (o_s < S)[None, :]
    b_g = _gate(mag_ptr, norm_ptr, o_c, m_c)[:, None]
    b_r = tl.load(_tile(result_ptr, n, o_c, o_s, stride_rn, stride_rc, stride_rs), mask=m_cs,
                  other=0.0).to(tl.float32)
    b_l = tl.load(_tile(lora_ptr, n, o_c, o_s, stride_ln, stride_lc, stride_ls), mask=m_cs,
                  other=0.0).to(tl.float32)
    if HAS_BASE:
        b_b = tl.load(_tile(base_ptr, n, o_c, o_s, stride_bsn, stride_bsc, stride_bss), mask=m_cs,
                      other=0.0).to(tl.float32)
        # (the torch path's order: result + (g − 1)·b̃ first, then g·s·l̃)
        b_y = b_r + (b_g - 1.0) * b_b + (b_g * scaling) * b_l
        b_u = b_b + scaling * b_l
    else:
        b_u = b_r + scaling * b_l
        if HAS_BIAS:
            b_bias = tl.load(bias_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)[:, None]
            if HAS_BIAS_IN_RESULT:
                b_u -= b_bias
            b_y = b_u * b_g + b_bias
        else:
            b_y = b_u * b_g
    tl.store(_tile(y_ptr, n, o_c, o_s, stride_yn, stride_yc, stride_ys), _rounded(b_y, y_ptr), mask=m_cs)
    if HAS_U:
        tl.store(_tile(u_ptr, n, o_c, o_s, stride_un, stride_uc, stride_us), _rounded(b_u, u_ptr), mask=m_cs)


@triton.jit(do_not_specialize=["N", "TILES", "TILES_PER_PROG"])
def _conv_bwd_kernel(
    dresult_ptr, stride_drn, stride_drc, stride_drs,  # out (N, C, S): dy ⊙ g, or dy (HAS_DROPOUT) (HAS_DRESULT)
    dbase_ptr, stride_dbsn, stride_dbsc, stride_dbss,  # out: dy ⊙ (g − 1) (HAS_DBASE: dropout form)
    dlora_ptr, stride_dln, stride_dlc, stride_dls,  # out: s·dy ⊙ g (HAS_DLORA)
    dm_part_ptr,  # out (T, C) fp32: Σ dy ⊙ u over the program's tiles (HAS_DM_PART)
    dbias_part_ptr,  # out (T, C) fp32: Σ dy over the program's tiles (HAS_DBIAS_PART)
    dy_ptr, stride_dyn, stride_dyc, stride_dys,  # dy = dL/dy: batch, channel, position
    u_ptr, stride_un, stride_uc, stride_us,  # u saved by the forward (with HAS_DM_PART; else None)
    mag_ptr, norm_ptr,  # (C,) each, contiguous
    N, C, S, scaling, TILES, TILES_PER_PROG,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_DRESULT: tl.constexpr, HAS_DBASE: tl.constexpr, HAS_DLORA: tl.constexpr, HAS_DM_PART: tl.constexpr,
    HAS_DBIAS_PART: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    # One pass over dy (and u). Program (t, c block) takes the tiles [t·TILES_PER_PROG, …) of the
    # TILES = N · ⌈S / BLOCK_S⌉ tiles of its channels and owns row t of the partials.
    pid_t = tl.program_id(0)
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    b_g = _gate(mag_ptr, norm_ptr, o_c, m_c)[:, None]
    n_sb = tl.cdiv(S, BLOCK_S)
    b_dm = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    b_db = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    t0 = pid_t * TILES_PER_PROG
    for i in range(t0, tl.minimum(t0 + TILES_PER_PROG, TILES)):
        n = (i // n_sb).to(tl.int64)
        o_s = (i % n_sb) * BLOCK_S + tl.arange(0, BLOCK_S)
        m_cs = m_c[:, None] & (o_s < S)[None, :]
        b_dy = tl.load(_tile(dy_ptr, n, o_c, o_s, stride_dyn, stride_dyc, stride_dys), mask=m_cs,
                       other=0.0).to(tl.float32)
        # (the torch path's products: (dy·g)·s without dropout, dy·(g·s) with it)
        b_gs = b_dy * b_g
        if HAS_DRESULT:
            p_dr = _tile(dresult_ptr, n, o_c, o_s, stride_drn, stride_drc, stride_drs)
            if HAS_DROPOUT:
                tl.store(p_dr, _rounded(b_dy, dresult_ptr), mask=m_cs)
            else:
                tl.store(p_dr, _rounded(b_gs, dresult_ptr), mask=m_cs)
        if HAS_DBASE:
            tl.store(_tile(dbase_ptr, n, o_c, o_s, stride_dbsn, stride_dbsc, stride_dbss),
                     _rounded(b_dy * (b_g - 1.0), dbase_ptr), mask=m_cs)
        if HAS_DLORA:
            p_dl = _tile(dlora_ptr, n, o_c, o_s, stride_dln, stride_dlc, stride_dls)
            if HAS_DROPOUT:
                tl.store(p_dl, _rounded(b_dy * (b_g * scaling), dlora_ptr), mask=m_cs)
            else:
                tl.store(p_dl, _rounded(b_gs * scaling, dlora_ptr), mask=m_cs)
        if HAS_DM_PART:
            b_u = tl.load(_tile(u_ptr, n, o_c, o_s, stride_un, stride_uc, stride_us), mask=m_cs,
                          other=0.0).to(tl.float32)
            b_dm += b_dy * b_u
        if HAS_DBIAS_PART:
            b_db += b_dy
    if HAS_DM_PART:
        tl.store(dm_part_ptr + pid_t * C + o_c, tl.sum(b_dm, axis=1), mask=m_c)
    if HAS_DBIAS_PART:
        tl.store(dbias_part_ptr + pid_t * C + o_c, tl.sum(b_db, axis=1), mask=m_c)


@triton.jit(do_not_specialize=["T"])
def _conv_sum_kernel(
    dm_ptr,  # out (C,): Σ_t dm_part[t] / n, 0 where n = 0 (HAS_DM; else None)
    dbias_ptr,  # out (C,): Σ_t dbias_part[t], times 1 − g where result held the bias (HAS_DBIAS; else None)
    dm_part_ptr, dbias_part_ptr,  # (T, C) fp32 each, contiguous (None where their output is)
    mag_ptr, norm_ptr,  # (C,) each, contiguous
    T, C,
    BLOCK: tl.constexpr, HAS_DM: tl.constexpr, HAS_DBIAS: tl.constexpr, HAS_BIAS_IN_RESULT: tl.constexpr,
):
    # The partials of _conv_bwd_kernel summed over t in order, BLOCK channels a program.
    o_c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_c = o_c < C
    b_dm = tl.zeros((BLOCK,), dtype=tl.float32)
    b_db = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, T):
        if HAS_DM:
            b_dm += tl.load(dm_part_ptr + t * C + o_c, mask=m_c, other=0.0)
        if HAS_DBIAS:
            b_db += tl.load(dbias_part_ptr + t * C + o_c, mask=m_c, other=0.0)
    if HAS_DM:
        b_nrm = tl.load(norm_ptr + o_c, mask=m_c, other=1.0)
        b_dm = tl.where(b_nrm > 0, b_dm / tl.where(b_nrm > 0, b_nrm, 1.0), 0.0)
        tl.store(dm_ptr + o_c, _rounded(b_dm, dm_ptr), mask=m_c)
    if HAS_DBIAS:
        if HAS_BIAS_IN_RESULT:  # y = g·(result − bias + s·l) + bias: ∂y/∂bias = 1 − g
            b_db = b_db * (1.0 - _gate(mag_ptr, norm_ptr, o_c, m_c))
        tl.store(dbias_ptr + o_c, _rounded(b_db, dbias_ptr), mask=m_c)
