"""dora_kernels: fused Triton kernels for DoRA (arXiv 2402.09353), forward and backward.

    y = (m / ‖W0 + s·B·A‖) ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias

``dora_linear`` is the differentiable op (a ``torch.library`` op, so ``torch.compile`` keeps it
in one graph); ``DoRALinear`` the module; ``fuse(model)`` moves the DoRA layers of a PEFT (or
``reference``) model onto the op in place, ``unfuse`` undoes it. CUDA tensors run the
compiled kernels; CPU tensors run them through Triton's interpreter when
``TRITON_INTERPRET=1`` was set before import, and a pure-torch path otherwise;
``use_backend("torch" | "triton" | "auto")`` (or ``DORA_KERNELS_BACKEND``) chooses explicitly.
"""

from .backend import get_backend, use_backend
from .fuse import FuseReport, fuse, fuse_report, fused_layers, unfuse
from .modules import DoRALinear
from .ops import dora_linear, dropout_mask, weight_norm
from ._lazy import __getattr__  # noqa: F401  DVoRAConfig, DVoRAModel, dvora_linear, ... on first use

__all__ = ["DoRALinear", "FuseReport", "dora_linear", "dropout_mask", "fuse", "fuse_report", "fused_layers",
           "get_backend", "unfuse", "use_backend", "weight_norm"]
__version__ = "0.1.0"
