"""Block sizes, warps and stages for every kernel, chosen without a GPU.

Each function takes the problem size, the dtype and the target (``arch``: a CUDA compute
capability such as ``(9, 0)``, or ``None`` under the interpreter) and returns a plain dict
of meta-parameters. The rules, in short:

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
  ``tests/test_compile_report.py`` holds them to it; triton 3.6's ptxas spills 12 bytes in a
  few). Some rules below exist only to dodge a spill that ptxas makes in one corner.
* Token reductions (the backward pass over G) size their programs so that about two waves
  of the GPU's SMs are busy; partials are then summed by a second, tiny kernel.

``DORA_KERNELS_AUTOTUNE=1`` lets Triton's autotuner pick among a few neighbours of these
configs on a GPU instead (see ``autotune_candidates``).
"""

from __future__ import annotations

import os

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


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, 1 << max(0, int(n) - 1).bit_length())
    return min(p, hi) if hi is not None else p


def _elsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _stages(per_stage: int, reserve: int, arch) -> int:
    if arch is None:
        return 1
    budget = shared_limit(arch) - reserve
    return int(max(2, min(4, budget // per_stage)))


def _gemm_tile(tokens: int, cols: int, dtype) -> tuple[int, int, int, int]:
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


def _elbytes(dtype, arch) -> int:
    return 4 if (arch is None or dtype == torch.float32) else 2


def fwd_config(tokens: int, out_f: int, in_f: int, r: int, dtype, arch, *, dropout: bool = False) -> dict:
    """``_fwd_kernel``: tokens × out tile, reducing over in. With dropout the kernel carries
    two accumulators (x and x̃), so the out tile is halved."""
    bn, bm, bk, warps = _gemm_tile(tokens, out_f, dtype)
    if dropout:
        # The in-loop Philox mask and the second accumulator need the registers of a wider tile.
        bm = 32
    stages = _stages((bn * bk + bk * bm) * _elbytes(dtype, arch), bn * bm * 2, arch)
    return {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_R": 16, "GROUP_N": 8,
            "num_warps": warps, "num_stages": stages}


def dx_config(tokens: int, in_f: int, out_f: int, r: int, dtype, arch, *, dropout: bool = False,
              need_dx: bool = True) -> dict:
    """``_dx_kernel``: tokens × in tile (BLOCK_K), reducing over out (BLOCK_M). The main loop
    scales G by g in registers and the tile also builds the dA partial, so it is narrower than
    the forward's: 64 in-columns, or 128 on sm_90 for bf16 without dropout."""
    bn, bk, bm, warps = _gemm_tile(tokens, in_f, dtype)
    if dtype == torch.float32:
        if dropout:
            bk = 32
        elif tokens < 64:
            bm = 16  # (with 2 stages, below) 32-deep steps spill a few bytes on sm_80 with 16-bit adapters
    else:
        wide = dtype == torch.bfloat16 and not dropout and tokens >= 128 and arch is not None and tuple(arch) >= (9, 0)
        bk = 128 if wide else 64
        if tokens >= 64:
            bm = 32 if (dropout or dtype != torch.bfloat16) else 64
        elif dropout and bn == 32:
            bm = 32  # 128-deep steps with two accumulators spill (64-deep ones on sm_80 with tf32)
        elif bn == 64 and (dropout or (arch is not None and tuple(arch) < (9, 0))):
            bm = 64  # 128-deep steps with two accumulators (or on sm_80 with the split dA) spill
    if not need_dx:
        bn, bm, warps = min(bn, 64), 16, 4
    stages = _stages((bn * bm + bm * bk) * _elbytes(dtype, arch), bn * bk * 2, arch)
    if dtype == torch.float32:
        stages = min(stages, 2 if (tokens < 64 and not dropout) else 3)
    return {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "BLOCK_R": 16, "GROUP_N": 8,
            "num_warps": warps, "num_stages": stages}


def norm_config(rows: int, k: int, r: int, dtype, arch, *, with_wa: bool = False) -> dict:
    half = dtype in (torch.float16, torch.bfloat16)
    return {"BLOCK_M": 32, "BLOCK_K": 32 if with_wa else (128 if half else 64), "BLOCK_R": 16,
            "num_warps": 4, "num_stages": 1 if arch is None else 3}


def xa_config(tokens: int, k: int, r: int, dtype, arch, *, fp32_dots: bool = False) -> dict:
    """``_xa_kernel``; ``fp32_dots``: the product runs as fp32 dots (fp32 x, or adapters of another
    dtype than a 16-bit x that cannot take the split bf16 path). Those run as tf32x3 (three
    products per step; tf32 with ``allow_tf32``), so their steps are 32 deep (64 spills on sm_80)."""
    bn = 64 if tokens >= 16384 else (32 if tokens >= 32 else 16)
    return {"BLOCK_N": bn, "BLOCK_K": 32 if (fp32_dots or dtype == torch.float32) else 64, "BLOCK_R": _pow2(r, 16, 32),
            "num_warps": 4, "num_stages": 1 if arch is None else 3}


def bwd_g_config(tokens: int, cols: int, r: int, dtype, arch, num_sms: int) -> dict:
    """Programs of TOK_PER_PROG tokens × COL_PER_PROG columns × one rank chunk, ~2 waves.

    Rank chunks of 16, or 32 for bf16 with r > 16 (each chunk re-reads its G tiles); 64×32
    tiles for chunks of 16 with bf16 on sm_90 and later, else 32×32 (larger tiles spill)."""
    br = 32 if (r > 16 and dtype == torch.bfloat16 and tokens >= 64) else 16
    bn = (64 if br == 16 else 32) if tokens >= 64 else _pow2(tokens, 16, 32)
    if dtype != torch.bfloat16 or (arch is not None and tuple(arch) < (9, 0)):
        bn = min(bn, 32)  # 64-token tiles spill but for bf16 on sm_90+
    bm = 32
    chunks = -(-r // br)
    col_per = min(-(-cols // bm) * bm, 512)
    splits = -(-cols // col_per)
    want_t = max(1, -(-2 * num_sms // (splits * chunks)))
    tok_per = max(bn, -(-(-(-tokens // want_t)) // bn) * bn)
    return {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_R": br, "TOK_PER_PROG": tok_per, "COL_PER_PROG": col_per,
            "T": -(-tokens // tok_per), "S": splits, "RC": chunks,
            "num_warps": 4, "num_stages": 1 if arch is None else 2}


def autotune_candidates(base: dict) -> list[dict]:
    """Neighbours of a GEMM config for ``DORA_KERNELS_AUTOTUNE=1`` (GPU only)."""
    out = [base]
    for bn, bc, warps in ((128, 256, 8), (64, 128, 4), (128, 64, 4), (64, 64, 4)):
        if bn <= max(base["BLOCK_N"], 64):
            out.append({**base, "BLOCK_N": bn, "BLOCK_M": bc, "num_warps": warps})
    for st in (2, 3, 4):
        if st != base["num_stages"]:
            out.append({**base, "num_stages": st})
    seen, uniq = set(), []
    for c in out:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq
