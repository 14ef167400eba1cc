"""The shared numerical rule (flash-attention's): judge an implementation against float64.

    err(impl) <= k * err(reference in the same dtype) + atol

where ``err`` is the largest absolute difference from a float64 computation of the same
function and ``atol`` is a few units in the last place of the float64 result's scale.

The rule lives in ``dora_kernels._tolerance`` so that ``python -m dora_kernels.selftest`` holds
the op to the same bound as these tests; this module re-exports it.
"""

from __future__ import annotations

from dora_kernels._tolerance import EPS, Verdict, assert_close_to_f64, check_close_to_f64, max_err, term_scales

__all__ = ["EPS", "Verdict", "assert_close_to_f64", "check_close_to_f64", "max_err", "peft_term_scales",
           "term_scales"]


def peft_term_scales(layer, x, dy, adapter="default"):
    """``term_scales`` of a PEFT DoRA layer (``lora.Linear``; a Conv1D base with
    ``fan_in_fan_out``) that receives ``x`` and the output gradient ``dy``. Dropout counts when the
    layer trains with a ``p > 0`` module carrying a fixed ``mask`` (test_fuse's ``FixedMask``)."""
    base = layer.get_base_layer()
    weight = base.weight.T if layer.fan_in_fan_out else base.weight
    drop = layer.lora_dropout[adapter]
    mask = getattr(drop, "mask", None) if layer.training else None
    p = getattr(drop, "p", 0.0) if mask is not None else 0.0
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    m = layer.lora_magnitude_vector[adapter].weight
    return term_scales(x, weight, A, B, m, layer.scaling[adapter], base.bias, dy, keep=mask, p=p)
