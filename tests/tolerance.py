"""The shared numerical rule (flash-attention's): judge an implementation against float64.

    err(impl) <= k * err(reference in the same dtype) + atol

where ``err`` is the largest absolute difference from a float64 computation of the same
function and ``atol`` is a few units in the last place of the float64 result's scale.

The rule lives in ``dora_kernels._tolerance`` so that ``python -m dora_kernels.selftest`` holds
the op to the same bound as these tests; this module re-exports it.
"""

from __future__ import annotations

from dora_kernels._tolerance import EPS, Verdict, assert_close_to_f64, check_close_to_f64, max_err

__all__ = ["EPS", "Verdict", "assert_close_to_f64", "check_close_to_f64", "max_err"]
