"""The pure-torch path of the op: the launchers' functions, same arguments, same memory-lean math.

Runs where the Triton kernels do not (a CPU without the interpreter, float64, the ``torch``
backend on any device). It never forms B·A or any (M, K) matrix (the norm goes over W0 in row
blocks) and saves what the kernels save. Shapes as in ``launchers``.
"""

from __future__ import annotations

import torch

from .common import gate, recip, redo_rows, rows_packed, u_dtype, xa_dtype


def dropout_mask(dropout_seed: int, N: int, K: int, dropout_p: float, device) -> torch.Tensor:
    """The (N, K) bool keep-mask of the torch path, from torch's generator seeded with ``dropout_seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(dropout_seed))
    return torch.rand((N, K), generator=gen, device=device) >= dropout_p


def weight_norm(weight, lora_A, lora_B, scaling: float, *, with_wa: bool = False):
    """As ``launchers.weight_norm``: row blocks of about 4M elements of W0 + s·B·A at a time."""
    M, K = weight.shape
    R = lora_A.shape[0]
    norm = torch.empty(M, dtype=torch.float32, device=weight.device)
    wa = torch.empty((M, R), dtype=torch.float32, device=weight.device) if with_wa else None
    A32, B32 = lora_A.float(), lora_B.float()
    rows = max(1, (1 << 22) // max(K, 1))
    for i in range(0, M, rows):
        w = weight[i:i + rows].float()
        # W0 + s·(B·A), not addmm(W0, B, A): a BLAS that accumulates the rank terms into W0 (MKL on
        # some AMD CPUs) rounds each at W0's magnitude, ulps off the norm.
        v = (B32[i:i + rows] @ A32).mul_(scaling).add_(w)
        norm[i:i + rows] = torch.linalg.vector_norm(v, dim=1)
        if with_wa:
            wa[i:i + rows] = w @ A32.T
    return norm, wa


def dora_forward(x, weight, lora_A, lora_B, magnitude, scaling, bias, *, norm=None, dropout_p=0.0, dropout_seed=0,
                 with_wa=False, need_u=True, need_xa=True):
    """As ``launchers.dora_forward`` (xa is made whatever ``need_xa``)."""
    wa = None
    if norm is None or with_wa:
        norm, wa = weight_norm(weight, lora_A, lora_B, scaling, with_wa=with_wa)
    N, K = x.shape
    p = dropout_p
    inv_keep = 1.0 / (1.0 - p)
    x = rows_packed(x)
    xd = x
    if p > 0:
        xd = x * dropout_mask(dropout_seed, N, K, p, x.device).to(x.dtype)
    ct = torch.promote_types(x.dtype, lora_A.dtype)
    xa = ((xd.to(ct) @ lora_A.T.to(ct)).float() * inv_keep).to(xa_dtype(lora_A.dtype)).float()
    g = gate(magnitude, norm)
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
    u = u.to(u_dtype(x.dtype, lora_A.dtype, p)) if need_u else None
    return y.to(x.dtype), xa.to(xa_dtype(lora_A.dtype)), u, norm, wa


def dm_redo(dm, dy, x, weight, lora_B, magnitude, norm, xa, scaling):
    """dm of the rows with |m| < G_REDO · n (or NaN m), n > 0, from u = x·W0ᵀ + s·xa·Bᵀ made again
    for those rows only (the output y holds them too coarsely), in place."""
    redo = redo_rows(magnitude, norm)
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        uz = (rows_packed(x) @ weight[rows].T).float() + scaling * (xa.float() @ lora_B[rows].float().T)
        dm[rows] = ((dy[:, rows].float() * uz).sum(0) / norm[rows]).to(dm.dtype)


def dora_backward(dy, x, weight, lora_A, lora_B, magnitude, scaling, norm, xa, *, u=None, y=None, dropout_p=0.0,
                  dropout_seed=0, need_dx=True, need_a=True):
    """As ``launchers.dora_backward``."""
    N, K = x.shape
    p = dropout_p
    inv_keep = 1.0 / (1.0 - p)
    x, dy = rows_packed(x), rows_packed(dy)
    g = gate(magnitude, norm)
    G = dy.float()
    dm = (G * (y if y is not None else u).float()).sum(0) * recip(norm, norm > 0)
    if y is not None:  # u = y / g per column; the rows where y carries u too coarsely are made again
        dm *= recip(g, g != 0)
        dm_redo(dm, G, x, weight, lora_B, magnitude, norm, xa, scaling)
    dm = dm.to(magnitude.dtype)
    gs = G * g
    gb = gs @ lora_B.float()
    dB = (scaling * (gs.T @ xa.float())).to(lora_B.dtype)
    keep = dropout_mask(dropout_seed, N, K, p, x.device) if p > 0 else None
    dA = None
    if need_a:
        xd = x.float() if keep is None else x.float() * keep
        dA = (scaling * inv_keep * (gb.T @ xd)).to(lora_A.dtype)
    dx = None
    if need_dx:
        if p > 0:
            dxd = ((G * (g - 1)).to(x.dtype) @ weight).float() + scaling * (gb @ lora_A.float())
            dx = (dy @ weight).float() + dxd * keep * inv_keep
        else:
            dx = (gs.to(x.dtype) @ weight).float() + scaling * (gb @ lora_A.float())
        dx = dx.to(x.dtype)
    return dx, dA, dB, dm
