"""The shared numerical rule (flash-attention's): judge an implementation against float64.

    err(impl) <= k * err(reference in the same dtype) + atol

where ``err`` is the largest absolute difference from a float64 computation of the same
function and ``atol`` is ``ulps`` units in the last place of ``dtype`` times the float64
result's largest magnitude. The tests (``tests/tolerance.py``) and ``dora_kernels.selftest`` both
use it, so a user's self-test holds the op to exactly what CI holds it to.
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


def check_close_to_f64(actual, ref_same_dtype, ref64, *, name="output", k=3.0, ulps=2.0, dtype=None) -> Verdict:
    """The rule as a value: ``actual`` may be at most ``k`` times as far from ``ref64`` as
    ``ref_same_dtype`` is, plus ``ulps`` units of ``dtype``'s epsilon times ``max|ref64|``."""
    if actual.shape != ref64.shape:
        return Verdict(name, False, float("inf"), float("nan"), float("nan"),
                       f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}")
    if ref64.numel() == 0:
        return Verdict(name, True, 0.0, 0.0, 0.0)
    dtype = dtype or ref_same_dtype.dtype
    scale = ref64.double().abs().max().item()
    atol = ulps * EPS[dtype] * max(scale, 1e-30)
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


def assert_close_to_f64(actual, ref_same_dtype, ref64, *, name="output", k=3.0, ulps=2.0, dtype=None):
    """Fail unless ``actual`` is at most ``k`` times as far from ``ref64`` as ``ref_same_dtype`` is,
    plus ``ulps`` units of ``dtype``'s epsilon times the float64 tensor's largest magnitude."""
    v = check_close_to_f64(actual, ref_same_dtype, ref64, name=name, k=k, ulps=ulps, dtype=dtype)
    if not v.ok:
        raise AssertionError(v.message)
