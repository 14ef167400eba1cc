"""Block sizes, warps and stages for every kernel, chosen without a GPU.

Each ``*_config`` function takes, by keyword only, the sizes it uses (``N`` tokens, ``M`` out,
``K`` in, ``R`` rank, as in the kernels), the dtype, the flags and the target (``arch``: a CUDA
compute capability such as ``(9, 0)``, or ``None`` under the interpreter) and returns a
``Config``: the kernel's meta-parameters (constexprs, ``num_warps``, ``num_stages``), its grid,
and the other sizes its launcher needs (partial buffers, per-program counts). The rules, in
short:

* GEMMs (forward ``x·W0ᵀ`` and backward ``dx``): 128×128 tiles with 8 warps once there are
  ≥ 128 tokens (the shape that reaches wgmma on sm_90 and mma.sync on sm_80); 64-token tiles
  for 64–127 tokens; for fewer tokens the problem is a pass over W0, so the tile is as tall as
  the tokens (≥ 16, what ``tl.dot`` needs) and 32 wide in the output dim so that enough
  programs stream W0. K steps are 64 wide for 16-bit inputs (128 for few tokens). fp32
  inputs (tf32x3 dots) take 64×64×32 tiles.
  Stages fill the arch's shared memory (see ``SHARED_LIMIT``), 2 to 4.
* With dropout the forward carries two accumulators and builds the Philox mask in its loop,
  so its output tile is 32 wide; the ``dx`` tile is narrower than the forward's (see
  ``dx_config``).
* Rank-r operands are padded to a power of two ≥ 16 and processed in chunks of 16 or 32.
* Every config these functions return compiles without register spills and within the
  shared memory of sm_80 and sm_90, with wgmma for the 16-bit GEMM tiles on sm_90, with
  triton 3.9's ptxas (``bench/compile_report.py`` compiles them all;
  ``tests/test_compile_report.py`` holds them to it; triton 3.6's ptxas spills 12-20 bytes in
  a few). The consumer archs (sm_86, sm_89, sm_120: mma.sync and 99 KB of shared memory) take
  sm_80's tile rules (``_big_tiles``, ``_small_shared``) and, where those spill, other tiles,
  warps or stages for their small-token fp16/fp32 backward tiles; every config compiles without
  spills there too. Some rules below exist only to dodge a spill that ptxas makes in one corner.
* Token reductions (the backward pass over G) size their programs so that about two waves
  of the GPU's SMs are busy; partials are then summed by a second, tiny kernel.

``DORA_KERNELS_AUTOTUNE=1`` lets Triton's autotuner pick among a few neighbours of the two
GEMM configs on a GPU instead (``AUTOTUNED``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

# Shared memory a block may use, by compute capability (bytes). The compiler does not refuse
# an oversized config, so the heuristics and the compile report check against this table.
SHARED_LIMIT = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
                (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024}


def shared_limit(arch) -> int:
    if arch is None:
        return 227 * 1024
    return SHARED_LIMIT.get(tuple(arch), 99 * 1024)


def autotune_enabled() -> bool:
    return os.environ.get("DORA_KERNELS_AUTOTUNE", "0") == "1"


@dataclass(frozen=True)
class Config:
    """A launch plan: ``meta`` goes to the kernel (constexprs, ``num_warps``, ``num_stages``),
    ``grid`` to the launch, ``sizes`` to the launcher (buffer sizes, per-program counts)."""

    meta: dict
    grid: tuple
    sizes: dict = field(default_factory=dict)


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, 1 << max(0, int(n) - 1).bit_length())
    return min(p, hi) if hi is not None else p


def _stages(per_stage: int, reserve: int, arch) -> int:
    if arch is None:
        return 1
    budget = shared_limit(arch) - reserve
    return int(max(2, min(4, budget // per_stage)))


def _gemm_tile(tokens: int, dtype) -> tuple[int, int, int, int]:
    """(token rows, output columns, reduction step, warps) of a GEMM tile."""
    if dtype == torch.float32:
        # fp32 operands run as tf32x3 (three tf32 products): register-heavy, so smaller tiles.
        if tokens >= 64:
            return 64, 64, 32, 4
        return _pow2(tokens, 16, 32), 32, 32, 4
    if tokens >= 128:
        return 128, 128, 64, 8
    if tokens >= 64:
        return 64, 128, 64, 4
    # Few tokens: a pass over W0; narrow column tiles give enough programs to stream it.
    return _pow2(tokens, 16, 64), 32, 128, 4


def _big_tiles(arch) -> bool:
    """sm_90 / sm_100 (wgmma-class datacenter GPUs): the 128-wide tiles and 64-token bwd tiles
    fit their registers. The consumer archs (sm_86, sm_89, sm_120) run mma.sync like sm_80 and
    have 99 KB of shared memory: they take sm_80's smaller tiles."""
    return arch is not None and (9, 0) <= tuple(arch) < (12, 0)


def _mid_shared(arch) -> bool:
    """sm_80 / sm_87: mma.sync with 163 KB of shared memory (deeper pipelines than the consumer archs)."""
    return arch is not None and not _big_tiles(arch) and not _small_shared(arch)


def _small_shared(arch) -> bool:
    return arch is not None and shared_limit(arch) < 128 * 1024


def _elbytes(dtype, arch) -> int:
    return 4 if (arch is None or dtype == torch.float32) else 2


def fwd_config(*, N: int, M: int, dtype, arch, has_dropout: bool, wq: int = 0) -> Config:
    """``_fwd_kernel``: N × M tiles, reducing over K. With dropout the kernel carries two
    accumulators (x and x̃), so the M tile is narrower. A W0 dequantised in the kernel (``wq``: few
    tokens, no dropout) takes 32 × 32 steps (its indices and scales take registers: wider tiles
    spill 12-600 bytes)."""
    bn, bm, bk, warps = _gemm_tile(N, dtype)
    if wq:
        bm, bk = 32, 32
    if has_dropout:
        # The in-loop Philox mask and the second accumulator need the registers of a wider tile.
        bm = 32
        if bn == 64 and bk == 128 and _small_shared(arch):
            bk = 64  # 128-deep steps spill 56-80 bytes on sm_86/89/120
    stages = _stages((bn * bk + bk * bm) * _elbytes(dtype, arch), bn * bm * 2, arch)
    if wq and bn == 128 and _mid_shared(arch):
        stages = min(stages, 3)  # 4 stages spill 8 bytes on sm_80 (int8 W0, fp32 adapters)
    meta = {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_R": 16, "GROUP_N": 8,
            "num_warps": warps, "num_stages": stages}
    return Config(meta, (cdiv(N, bn) * cdiv(M, bm),))


def dx_config(*, N: int, K: int, dtype, arch, has_dropout: bool, has_dx: bool, wq: int = 0) -> Config:
    """``_dx_kernel``: N × K tiles (BLOCK_K), reducing over M (BLOCK_M). The main loop scales dy
    by g in registers and the tile also builds the dA partial, so it is narrower than the
    forward's: 64 in-columns, or 128 on sm_90 for bf16 without dropout; a W0 dequantised in the
    kernel (``wq``: few tokens, no dropout) takes 32 in-columns and 32-deep steps over M (16-deep on
    sm_80 and in 128-token tiles).
    ``sizes["T"]``: token blocks, one dA partial each."""
    bn, bk, bm, warps = _gemm_tile(N, dtype)
    if dtype == torch.float32:
        if has_dropout:
            bk = 32
            if _small_shared(arch):
                bm = 16  # (with 2 stages, below) 32-deep steps spill 8-20 bytes on sm_86/89
        elif N < 64:
            bm = 16  # (with 2 stages, below) 32-deep steps spill a few bytes on sm_80 with 16-bit adapters
    else:
        wide = dtype == torch.bfloat16 and not has_dropout and N >= 128 and _big_tiles(arch)
        bk = 128 if wide else 64
        if N >= 64:
            bm = 32 if (has_dropout or dtype != torch.bfloat16) else 64
        elif has_dropout and bn == 32:
            bm = 32  # 128-deep steps with two accumulators spill (64-deep ones on sm_80 with tf32)
        elif bn == 64 and (has_dropout or (arch is not None and not _big_tiles(arch))):
            bm = 64  # 128-deep steps with two accumulators (or on sm_80 with the split dA) spill
    if wq and has_dx:
        # wider tiles spill 4-400 bytes; 32-deep steps 4-28 on sm_80 (and in 128-token tiles), 16-deep
        # ones 4-8 bytes in the 17-64-token tiles of the other archs
        bm, bk = (16 if (bn == 128 or _mid_shared(arch) or arch is None) else 32), 32
    if not has_dx:
        bn, bm, warps = min(bn, 64), 16, 4
    stages = _stages((bn * bm + bm * bk) * _elbytes(dtype, arch), bn * bk * 2, arch)
    if dtype == torch.float32:
        stages = min(stages, 2 if (N < 64 and (not has_dropout or _small_shared(arch))) else 3)
    if _small_shared(arch) and N >= 64 and bm == 32:
        stages = min(stages, 2)  # 32-deep steps with fp32 operands spill 4-8 bytes on sm_120 at 3-4 stages
    if _small_shared(arch) and dtype == torch.float32 and has_dropout and has_dx and bn == 32:
        stages = 1  # 17-63 tokens: 2 stages spill 4 bytes on sm_86/89 (8 warps instead spill on sm_120)
    meta = {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "BLOCK_R": 16, "GROUP_N": 8,
            "num_warps": warps, "num_stages": stages}
    return Config(meta, (cdiv(N, bn) * cdiv(K, bk),), {"T": cdiv(N, bn)})


def norm_config(*, M: int, dtype, arch, has_wa: bool, wq: int = 0) -> Config:
    """``_norm_kernel``: 32 rows a program (16 with W0·Aᵀ of a quantised W0), the whole of K in steps;
    32-deep steps with W0·Aᵀ, 64-deep ones over 4-bit codes (``wq`` 4: their element indices take
    registers)."""
    half = dtype in (torch.float16, torch.bfloat16)
    bk = 32 if has_wa else (64 if (wq == 4 or not half) else 128)
    bm = 16 if (has_wa and wq) else 32  # (32-row ones spill 24 bytes with an int8 W0 and fp32 adapters)
    meta = {"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_R": 16,
            "num_warps": 4, "num_stages": 1 if arch is None else 3}
    return Config(meta, (cdiv(M, bm),))


# The forward with the norm in its own pass over W0 (``_fwd_norm_kernel``) instead of the norm kernel's
# pass and the forward's second one, without dropout, u or a given norm (eval, decoding, and training
# that saves y): for up to FWD_NORM_TOKENS tokens (one tile: the GEMM of so few tokens streams W0
# as the norm does), and for a quantised W0 read in place (up to DEQUANT_IN_KERNEL_TOKENS, at most a
# few token blocks): each block dequantises its tiles anyway, and makes the norm's B·A again instead
# of a second dequantising pass.
FWD_NORM_TOKENS = 16


def use_fwd_norm(*, N: int, wq: int, has_dropout: bool, need_u: bool, has_norm: bool, with_wa: bool,
                 fp32_dots: bool) -> bool:
    """``fp32_dots``: the norm's B·A runs as fp32 dots (fp32 x, or adapters of another dtype than a
    16-bit x): then only a single 16-token tile (with wider ones the three-product fp32 dots of the
    norm and the GEMM's tile spill 12-370 bytes)."""
    if N == 0 or has_dropout or need_u or has_norm or with_wa:
        return False
    if wq and not dequant_in_kernel(N=N, has_dropout=False):
        return False
    return N <= FWD_NORM_TOKENS or (wq != 0 and not fp32_dots)


def fwd_norm_config(*, N: int, M: int, dtype, arch, num_sms: int, fp32_dots: bool, wq: int = 0) -> Config:
    """``_fwd_norm_kernel``: up to 16 tokens, one 16-token tile and the norm kernel's steps over K
    (``norm_config``), 32 rows a program, or 16 where 32-row programs would not fill the GPU's SMs;
    16 rows and 32-deep steps with ``fp32_dots`` (wider ones spill 8-250 bytes); more tokens (a
    quantised W0, 16-bit dots), the forward's tiles (``fwd_config``)."""
    if N <= FWD_NORM_TOKENS:
        meta = dict(norm_config(M=M, dtype=dtype, arch=arch, has_wa=False, wq=wq).meta, BLOCK_N=16,
                    BLOCK_M=32 if cdiv(M, 32) >= num_sms else 16)
        if fp32_dots:
            meta.update(BLOCK_M=16, BLOCK_K=32)
    else:
        fwd = fwd_config(N=N, M=M, dtype=dtype, arch=arch, has_dropout=False, wq=wq).meta
        meta = {k: fwd[k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "BLOCK_R", "num_warps", "num_stages")}
    return Config(meta, (cdiv(N, meta["BLOCK_N"]) * cdiv(M, meta["BLOCK_M"]),), {"T": cdiv(N, meta["BLOCK_N"])})


# QDoRA: a quantised W0 is dequantised in the GEMM kernels' registers (each token block again)
# up to DEQUANT_IN_KERNEL_TOKENS tokens without dropout (eval and decoding: the GEMM streams W0, and
# reading a quarter of its bytes wins); otherwise it is dequantised once into a transient dense W0
# (``_dequant_kernel``) that the dense GEMMs read, as bitsandbytes does: the dequantising work would
# repeat per token block, and its registers would crowd the wide tiles (the dropout tiles carry two
# accumulators). The norm always reads the codes. Operations per element dequantised (the trace's
# count of that work): 4-bit codes (index, byte, nibble, table and absmax loads, product, two
# roundings), int8 rows.
DEQUANT_IN_KERNEL_TOKENS = 256
DEQUANT_OPS = {4: 16, 8: 6}


def dequant_in_kernel(*, N: int, has_dropout: bool) -> bool:
    return N <= DEQUANT_IN_KERNEL_TOKENS and not has_dropout


def dequant_config(*, M: int, K: int) -> Config:
    """``_dequant_kernel``: 32 × 128 tiles of W0."""
    return Config({"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4}, (cdiv(M, 32), cdiv(K, 128)))


def absmax_config(*, n: int) -> Config:
    """``_absmax_kernel``: 1024 absmax a program."""
    return Config({"BLOCK": 1024, "num_warps": 4}, (cdiv(n, 1024),))


def xa_config(*, N: int, R: int, dtype, arch, fp32_dots: bool) -> Config:
    """``_xa_kernel``; ``fp32_dots``: the product runs as fp32 dots (fp32 x, or adapters of another
    dtype than a 16-bit x that cannot take the split bf16 path). Those run as tf32x3 (three
    products per step; tf32 with ``allow_tf32``), so their steps are 32 deep (64 spills on sm_80)."""
    bn = 64 if (N >= 16384 and not _small_shared(arch)) else (32 if N >= 32 else 16)
    br = _pow2(R, 16, 32)
    meta = {"BLOCK_N": bn, "BLOCK_K": 32 if (fp32_dots or dtype == torch.float32) else 64, "BLOCK_R": br,
            "num_warps": 4, "num_stages": 1 if arch is None else 3}
    return Config(meta, (cdiv(N, bn), cdiv(R, br)))


def bwd_dy_config(*, N: int, M: int, R: int, dtype, arch, num_sms: int) -> Config:
    """``_bwd_dy_kernel``: programs of TOK_PER_PROG tokens × COL_PER_PROG columns × one rank
    chunk, about two waves of the GPU's SMs.

    Rank chunks of 16, or 32 for bf16 with R > 16 (each chunk re-reads its dy tiles); 64×32
    tiles for chunks of 16 with bf16 on sm_90 and later, else 32×32 (larger tiles spill).
    ``sizes``: ``T`` token groups (dm/dB partials), ``S`` column splits (gb partials), and the
    kernel's ``TOK_PER_PROG`` / ``COL_PER_PROG``."""
    br = 32 if (R > 16 and dtype == torch.bfloat16 and N >= 64) else 16
    bn = (64 if br == 16 else 32) if N >= 64 else _pow2(N, 16, 32)
    if dtype != torch.bfloat16 or (arch is not None and not _big_tiles(arch)):
        bn = min(bn, 32)  # 64-token tiles spill but for bf16 on sm_90/sm_100
    bm, warps, stages = 32, 4, 1 if arch is None else 2
    if _small_shared(arch) and N < 64 and dtype != torch.bfloat16:
        # fp32 dots in small-token tiles spill on sm_86/89/120: 32-column tiles 4-20 bytes, 16-column
        # ones at 4 warps and 2 stages 4-8 bytes; 32-token tiles take 8 warps, 16-token ones 1 stage
        # (the other choice spills 8-16 bytes in some of them)
        bm = 16
        warps, stages = (8, stages) if bn == 32 else (4, 1)
    chunks = cdiv(R, br)
    col_per = min(cdiv(M, bm) * bm, 512)
    splits = cdiv(M, col_per)
    want_t = max(1, cdiv(2 * num_sms, splits * chunks))
    tok_per = max(bn, cdiv(cdiv(N, want_t), bn) * bn)
    T = cdiv(N, tok_per)
    meta = {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_R": br, "num_warps": warps, "num_stages": stages}
    return Config(meta, (T, splits, chunks), {"T": T, "S": splits, "TOK_PER_PROG": tok_per, "COL_PER_PROG": col_per})


def sum_partials_config(*, RK: int, MR: int, M: int) -> Config:
    """``_sum_partials_kernel``: 512 sums a program over dA (R·K), dB (M·R) and dm (M)."""
    block = 512
    return Config({"BLOCK": block, "num_warps": 4}, (cdiv(RK, block) + cdiv(MR, block) + cdiv(M, block),))


def dm_redo_config(*, M: int, wq: int = 0) -> Config:
    """``_dm_redo_kernel``: 16 rows a program (most return at once), 16-token × 16-deep steps
    (32-deep ones spill 8 bytes on sm_80 with 16-bit inputs); 2 warps over 4-bit codes (4 spill 4
    bytes on sm_80 with fp32 x)."""
    return Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_R": 16, "num_warps": 2 if wq == 4 else 4},
                  (cdiv(M, 16),))


def mask_config(*, N: int, K: int) -> Config:
    """``_mask_kernel``: 32 × 64 tiles of the keep-mask."""
    return Config({"BLOCK_N": 32, "BLOCK_K": 64}, (cdiv(N, 32), cdiv(K, 64)))


# ---------------------------------------------------------------------------------------------
# DORA_KERNELS_AUTOTUNE=1: neighbours of the two GEMM configs

def _unique(configs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for c in configs:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def fwd_autotune_candidates(base: dict) -> list[dict]:
    """Neighbours of a ``fwd_config`` meta (the first is ``base`` itself)."""
    out = [base]
    for bn, bc, warps in ((128, 256, 8), (64, 128, 4), (128, 64, 4), (64, 64, 4)):
        if bn <= max(base["BLOCK_N"], 64):
            out.append({**base, "BLOCK_N": bn, "BLOCK_M": bc, "num_warps": warps})
    for st in (2, 3, 4):
        if st != base["num_stages"]:
            out.append({**base, "num_stages": st})
    return _unique(out)


def dx_autotune_candidates(base: dict) -> list[dict]:
    """Neighbours of a ``dx_config`` meta. BLOCK_N stays: the launcher sizes the dA partials (one
    slice per token block) from it."""
    out = [base]
    if base["BLOCK_N"] >= 64:
        for bk, bm, warps in ((128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 32, 4)):
            out.append({**base, "BLOCK_K": bk, "BLOCK_M": bm, "num_warps": warps})
    for st in (2, 3, 4):
        out.append({**base, "num_stages": st})
    return _unique(out)


@dataclass(frozen=True)
class Autotuned:
    """What the autotuner may change in one kernel's launch: ``owned`` meta keys, the
    ``candidates`` around a heuristic meta, the ``grid`` from the bound arguments, the
    autotune ``key``, and ``applies(meta)``: whether this launch is tuned at all."""

    owned: tuple
    candidates: Callable
    grid: Callable
    key: tuple
    applies: Callable = lambda meta: True


AUTOTUNED = {
    "_fwd_kernel": Autotuned(("BLOCK_N", "BLOCK_M", "BLOCK_K", "num_warps", "num_stages"), fwd_autotune_candidates,
                             lambda a: (cdiv(a["N"], a["BLOCK_N"]) * cdiv(a["M"], a["BLOCK_M"]),),
                             ("N", "M", "K", "R", "HAS_BIAS", "HAS_DROPOUT")),
    # no GEMM in a launch without HAS_DX: only the dA pass over x
    "_dx_kernel": Autotuned(("BLOCK_K", "BLOCK_M", "num_warps", "num_stages"), dx_autotune_candidates,
                            lambda a: (cdiv(a["N"], a["BLOCK_N"]) * cdiv(a["K"], a["BLOCK_K"]),),
                            ("N", "M", "K", "R", "HAS_DROPOUT", "HAS_DX"), lambda meta: meta.get("HAS_DX", True)),
}


# ---------------------------------------------------------------------------------------------
# DVoRA's factor B′ = diag(λ_b)·B·diag(λ_d) (``kernels_dvora``): elementwise passes over (M, R)

def dvora_b_config(*, M: int, R: int) -> Config:
    """``_dvora_b_kernel``: tiles of up to 128 ranks × 16-64 rows, about 2048 elements (4096 spill
    4-16 bytes with fp16 on sm_80/90/120)."""
    br = _pow2(R, 16, 128)
    bm = max(16, min(64, 2048 // br))
    return Config({"BLOCK_M": bm, "BLOCK_R": br, "num_warps": 4}, (cdiv(M, bm), cdiv(R, br)))


def dvora_dlambda_config(*, M: int, R: int, num_sms: int) -> Config:
    """``_dvora_dlambda_kernel``: 16 or 32 rows a program (about two waves of the SMs; 64-row tiles
    take up to 211 registers), all ranks in steps of up to 64. ``sizes["T"]``: programs, one dλ_d
    partial row each."""
    br = _pow2(R, 16, 64)
    bm = _pow2(cdiv(M, 2 * num_sms), 16, 32)
    T = cdiv(M, bm)
    return Config({"BLOCK_M": bm, "BLOCK_R": br, "num_warps": 4}, (T,), {"T": T})


def dvora_sum_config(*, M: int, R: int, block_m: int) -> Config:
    """``_dvora_sum_kernel``: 64 ranks a program over the partials of ``dvora_dlambda_config``
    (``block_m``: its rows a partial), 32 partials a step."""
    br = _pow2(R, 16, 64)
    return Config({"BLOCK_M": block_m, "BLOCK_T": 32, "BLOCK_R": br, "num_warps": 4}, (cdiv(R, br),))


# ---------------------------------------------------------------------------------------------
# DoRA's combination on convolutions (``kernels_conv``): elementwise passes over (N, C, S) views

# elements of one tile: 4 a thread at 16 warps (16 a thread at 4 warps took 150-255 registers, 8 at 8 warps
# spilled 8-16 bytes on sm_90/sm_120 where odd sizes keep the fp16 loads from vectorising)
CONV_TILE = 2048


def conv_config(*, N: int, C: int, S: int, channels_inner: bool, num_sms: int, reduce: bool = False) -> Config:
    """``_conv_fwd_kernel`` and (``reduce``) ``_conv_bwd_kernel``: tiles of ``CONV_TILE`` elements,
    BLOCK_C channels × BLOCK_S positions of one batch element, wide along the unit-stride dim
    (``channels_inner``: channels_last; else positions): 256 positions (64 for S < 192, 16 for
    S < 48), or 64 channels (16 for C < 48). The forward takes one tile a program; the backward's
    programs take TILES_PER_PROG consecutive tiles of a channel block each, about 8 programs an SM
    over all channel blocks (two waves of 16-warp programs), and each writes one row of the (T, C) partials.
    ``sizes``: ``TILES`` (N · ⌈S / BLOCK_S⌉), and with ``reduce`` ``T`` and ``TILES_PER_PROG``."""
    if channels_inner:
        bc = 64 if C >= 48 else 16
        bs = CONV_TILE // bc
    else:
        bs = 256 if S >= 192 else (64 if S >= 48 else 16)
        bc = CONV_TILE // bs
    meta = {"BLOCK_C": bc, "BLOCK_S": bs, "num_warps": 16, "num_stages": 1}
    tiles = N * cdiv(S, bs)
    blocks_c = cdiv(C, bc)
    if not reduce:
        return Config(meta, (tiles, blocks_c), {"TILES": tiles})
    per_prog = max(1, cdiv(tiles, max(1, min(tiles, cdiv(8 * num_sms, blocks_c)))))
    T = cdiv(tiles, per_prog)
    return Config(meta, (T, blocks_c), {"TILES": tiles, "T": T, "TILES_PER_PROG": per_prog})


def conv_sum_config(*, C: int) -> Config:
    """``_conv_sum_kernel``: 256 channels a program."""
    return Config({"BLOCK": 256, "num_warps": 4}, (cdiv(C, 256),))
