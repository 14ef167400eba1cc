"""Pure-PyTorch DoRA, the oracle for parity tests and the baseline for benchmarks.

It computes exactly what PEFT's ``lora.Linear(use_dora=True)`` computes, op for op and in the
same dtypes (the norm is cast to the weight's dtype, the LoRA product is built through an
identity matrix, the base path stays undropped). ``dvora`` puts VeRA's update under the same
normalisation (DVoRA). It never imports Triton.
"""

from .dora import DoRALinear, dora_linear, dora_weight_norm
from .dvora import dvora_delta_weight, dvora_linear

__all__ = ["DoRALinear", "dora_linear", "dora_weight_norm", "dvora_delta_weight", "dvora_linear"]
