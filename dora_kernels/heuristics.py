"""Block sizes, warps and stages for every kernel, chosen without a GPU.

Each function takes the problem size, the dtype and the target (``arch``: a CUDA compute
capability such as ``(9, 0)``, or ``None`` under the interpreter) and returns a plain dict
of meta-parameters. The rules, in short:

* GEMMs (forward ``x·W0ᵀ`` and backward ``dx``): 128×128 tiles with 8 warps once there are
  ≥ 128 tokens (the shape that reaches wgmma on sm_90 and mma.sync on sm_80); 64-token tiles
  for 64–127 tokens; for fewer tokens the problem is a pass over W0, so the tile is as tall as
  the tokens (≥ 16, what ``tl.dot`` needs) and narrow in the output dim (32 or 64) so that
  enough programs stream W0. K steps are 64 wide for 16-bit inputs and 32 for fp32.
  Stages fill the arch's shared memory (see ``SHARED_LIMIT``), 2 to 4.
* With dropout the forward carries two accumulators, so its output tile is halved.
* Rank-r operands are padded to a power of two ≥ 16 and processed in chunks of at most 64.
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

MAX_BLOCK_R = 64


def shared_limit(arch) -> int:
    if arch is None:
        return 227 * 1024
    return SHARED_LIMIT.get(tuple(arch), 99 * 1024)


def autotune_enabled() -> bool:
    return os.environ.get("DORA_KERNELS_AUTOTUNE", "0") == "1"


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, 1 << max(0, int(n) - 1).bit_length())
    return min(p, hi) if hi is not None else p


def block_r(r: int) -> int:
    return _pow2(r, 16, MAX_BLOCK_R)


def _elsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _stages(per_stage: int, reserve: int, arch) -> int:
    if arch is None:
        return 1
    budget = shared_limit(arch) - reserve
    return int(max(2, min(4, budget // per_stage)))


def gemm_config(tokens: int, cols: int, red: int, dtype, arch, *, dual: bool = False) -> dict:
    """Tile for a GEMM with ``tokens`` rows, ``cols`` output columns and reduction ``red``.

    ``dual``: two fp32 accumulators (dropout), so the column tile is halved.
    """
    half = dtype in (torch.float16, torch.bfloat16)
    if tokens >= 128:
        bn, bc, warps = 128, 128, 8
    elif tokens >= 64:
        bn, bc, warps = 64, 128, 4
    else:
        bn, bc, warps = _pow2(tokens, 16, 64), (64 if cols >= 4096 else 32), 4
    if dual:
        bc = max(32, bc // 2)
    bk = (64 if half else 32) if tokens >= 64 else (128 if half else 64)
    es = 4 if (arch is None or not half) else 2
    per_stage = (bn * bk + bk * bc) * es
    stages = _stages(per_stage, bn * bc * 4 // 2, arch)
    return {"BLOCK_N": bn, "BLOCK_M": bc, "BLOCK_K": bk, "GROUP_N": 8, "num_warps": warps, "num_stages": stages}


def norm_config(rows: int, k: int, r: int, dtype, arch) -> dict:
    half = dtype in (torch.float16, torch.bfloat16)
    return {"BLOCK_M": 32 if rows <= 4096 else 64, "BLOCK_K": 128 if half else 64, "BLOCK_R": block_r(r),
            "num_warps": 4, "num_stages": 1 if arch is None else 3}


def xa_config(tokens: int, k: int, r: int, dtype, arch) -> dict:
    half = dtype in (torch.float16, torch.bfloat16)
    bn = 64 if tokens >= 16384 else (32 if tokens >= 32 else 16)
    return {"BLOCK_N": bn, "BLOCK_K": 128 if half else 64, "BLOCK_R": block_r(r),
            "num_warps": 4, "num_stages": 1 if arch is None else 3}


def bwd_g_config(tokens: int, cols: int, r: int, dtype, arch, num_sms: int) -> dict:
    """Programs of TOK_PER_PROG tokens × COL_PER_PROG columns × one rank chunk, ~2 waves."""
    bn = 64 if tokens >= 64 else _pow2(tokens, 16, 64)
    bm = 64 if cols >= 64 else 32
    br = block_r(r)
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
