"""The shared numerical rule (flash-attention's): judge an implementation against float64.

    err(impl) <= k * err(reference in the same dtype) + atol

where ``err`` is the largest absolute difference from a float64 computation of the same
function and ``atol`` is ``ulps`` units in the last place of ``dtype`` times the float64
result's largest magnitude. The tests (``tests/tolerance.py``) and ``dora_kernels.selftest`` both
use it, so a user's self-test holds the op to exactly what CI holds it to.

A result that is a near-cancellation of larger terms (``dx = g·G·W0 + s·gb·A``) carries
rounding errors of the size of those terms, not of the result, and how large they are
depends on the BLAS's summation order (it differs between CPUs). ``scale=`` hands the rule
``Σ|terms|`` per element (``term_scales`` computes it for the op), and the ulps are taken of that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


@dataclass
class Verdict:
    """One comparison: ``ok`` iff ``err <= bound`` (NaN fails); ``message`` names the worst element."""

    name: str
    ok: bool
    err: float
    err_ref: float
    bound: float
    message: str = ""


def check_close_to_f64(actual, ref_same_dtype, ref64, *, name="output", k=3.0, ulps=2.0, dtype=None,
                       scale=None) -> Verdict:
    """The rule as a value: ``actual`` may be at most ``k`` times as far from ``ref64`` as
    ``ref_same_dtype`` is, plus ``ulps`` units of ``dtype``'s epsilon times ``max|ref64|``.

    ``scale``: ``Σ|terms|`` of each element in float64 (a tensor broadcastable to ``ref64``, or
    a float); the ulps are then taken of ``max(scale)`` (never less than ``max|ref64|``)."""
    if actual.shape != ref64.shape:
        return Verdict(name, False, float("inf"), float("nan"), float("nan"),
                       f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}")
    if ref64.numel() == 0:
        return Verdict(name, True, 0.0, 0.0, 0.0)
    dtype = dtype or ref_same_dtype.dtype
    magnitude = ref64.double().abs().max().item()
    if scale is not None:  # |result| <= Σ|terms|: the max only guards a scale computed off by rounding
        scale = torch.as_tensor(scale, dtype=torch.float64)
        magnitude = max(magnitude, scale.abs().max().item() if scale.numel() else 0.0)
    atol = ulps * EPS[dtype] * max(magnitude, 1e-30)
    err_impl = max_err(actual, ref64)
    err_ref = max_err(ref_same_dtype, ref64)
    bound = k * err_ref + atol
    if err_impl <= bound:  # False for NaN
        return Verdict(name, True, err_impl, err_ref, bound)
    diff = (actual.double() - ref64.double()).abs().flatten()
    diff = torch.nan_to_num(diff, nan=float("inf"))
    i = int(diff.argmax())
    msg = (f"{name}: max |impl - f64| = {err_impl:.3e} > {k} * {err_ref:.3e} (reference, same dtype) + {atol:.3e}; "
           f"worst element flat[{i}]: impl={actual.flatten()[i].item():.6g} f64={ref64.flatten()[i].item():.6g} "
           f"ref={ref_same_dtype.flatten()[i].item():.6g}")
    return Verdict(name, False, err_impl, err_ref, bound, msg)


def assert_close_to_f64(actual, ref_same_dtype, ref64, *, name="output", k=3.0, ulps=2.0, dtype=None, scale=None):
    """Fail unless ``actual`` is at most ``k`` times as far from ``ref64`` as ``ref_same_dtype`` is,
    plus ``ulps`` units of ``dtype``'s epsilon times the float64 tensor's largest magnitude (or
    ``max(scale)``, the largest ``Σ|terms|``, when given)."""
    v = check_close_to_f64(actual, ref_same_dtype, ref64, name=name, k=k, ulps=ulps, dtype=dtype, scale=scale)
    if not v.ok:
        raise AssertionError(v.message)


@torch.no_grad()
def term_scales(x, weight, lora_A, lora_B, magnitude, scaling, bias, dy, *, keep=None, p=0.0, exact=False) -> dict:
    """``Σ|terms|`` of every element of DoRA's output and gradients, in float64: the spec's formulas
    applied to absolute values (``scale=`` for the rule).

    x (..., in), dy (..., out), weight (out, in), lora_A (r, in), lora_B (out, r), magnitude and
    bias (out,) (bias may be None), all float64; ``keep``: the boolean dropout keep-mask of x's
    shape (training with ``p > 0``) or None; ``exact``: the gradient goes through the norm.
    Returns {"y": (..., out), "x": (..., in), "lora_A": (r, in), "lora_B": (out, r),
    "magnitude": (out,), "bias": (out,)}.
    """
    lead = x.shape[:-1]
    x, dy = x.reshape(-1, x.shape[-1]).double(), dy.reshape(-1, dy.shape[-1]).double()
    W, A, B, m = (t.double() for t in (weight, lora_A, lora_B, magnitude))
    s = abs(float(scaling))
    n = torch.linalg.vector_norm(W + scaling * B @ A, dim=1)
    inv_n = torch.where(n > 0, 1 / n, torch.zeros_like(n))  # g = 0 where n = 0 (the op's rule)
    g = (m * inv_n).abs()
    aW, aA, aB, ady = W.abs(), A.abs(), B.abs(), dy.abs()
    drop = keep is not None and p > 0
    kp = keep.reshape(x.shape).double() / (1 - p) if drop else None  # x̃ = x·kp
    ax = x.abs() * kp if drop else x.abs()  # |x̃|
    xa = ax @ aA.T  # |x̃|·|A|ᵀ  (N, r)
    base, lora = ax @ aW.T, s * xa @ aB.T  # the two parts of u  (N, out)
    u = base + lora
    ab = 0.0 if bias is None else bias.double().abs()
    if drop:  # y = x·W0ᵀ + bias + (g − 1)·x̃·W0ᵀ + g·s·x̃·Aᵀ·Bᵀ
        y = x.abs() @ aW.T + ab + (m * inv_n - 1).abs() * base + g * lora
    else:
        y = g * u + ab
    gs = ady * g  # |G ⊙ g|  (N, out)
    gb = gs @ aB  # |gb|  (N, r)
    dm = (ady * u).sum(0) * inv_n
    dB = s * gs.T @ xa
    dA = s * gb.T @ ax
    if drop:  # dx = G·W0 + kp ⊙ ((g − 1)·G·W0 + s·gb·A)
        dx = ady @ aW + kp * ((ady * (m * inv_n - 1).abs()) @ aW + s * gb @ aA)
    else:
        dx = gs @ aW + s * gb @ aA
    if exact:  # c = −m/n³ · Σ_tokens G ⊙ u adds s·diag(c)·V·Aᵀ to dB and s·Bᵀ·diag(c)·V to dA
        c = (m.abs() * inv_n**3 * (ady * u).sum(0))[:, None]
        dB = dB + s * c * (aW @ aA.T + s * aB @ (aA @ aA.T))
        dA = dA + s * (c * aB).T @ aW + s * s * (aB.T @ (c * aB)) @ aA
    return {"y": y.reshape(*lead, W.shape[0]), "x": dx.reshape(*lead, W.shape[1]), "lora_A": dA, "lora_B": dB,
            "magnitude": dm, "bias": ady.sum(0)}
