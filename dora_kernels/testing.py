"""What the tests and ``dora_kernels.selftest`` share: the device, the case builder, the rule.

The rule (``_tolerance``): an implementation may be at most ``k`` times as far from float64 as
the reference in the same dtype is, plus a few ulps. The case builder makes one layer's inputs,
already rounded to their dtypes (so the float64 copies are the same numbers), runs the fused op,
the same-dtype reference and the float64 reference, and judges the output and every gradient.
``reference`` is imported only when a case runs (it is the repository's, not the wheel's).
"""

from __future__ import annotations

import torch

from ._tolerance import EPS, Verdict, assert_close_to_f64, check_close_to_f64, max_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

__all__ = ["DEVICE", "EPS", "Verdict", "assert_close_to_f64", "check_close_to_f64", "max_err"]
