"""Names of ``dora_kernels`` that load on first use (PEP 562), so that ``import dora_kernels``
neither needs PEFT nor pays for importing it: ``dora_kernels.DVoRAConfig`` imports
``dora_kernels.dvora`` (which registers DVoRA with PEFT) when it is first read."""

from __future__ import annotations

import importlib

LAZY = {
    "DVoRAConfig": "dvora",
    "DVoRALayer": "dvora",
    "DVoRALinear": "dvora",
    "DVoRAModel": "dvora",
    "dvora_linear": "dvora_ops",
    "vera_projections": "dvora_ops",
}


def __getattr__(name: str):
    module = LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dora_kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dora_kernels.{module}"), name)
