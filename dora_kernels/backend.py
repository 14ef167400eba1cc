"""Which implementation runs the op: the Triton kernels or the pure-torch path.

    with dora_kernels.use_backend("torch"):   # or "triton", or "auto" (the default)
        y = dora_kernels.dora_linear(...)

``DORA_KERNELS_BACKEND=auto|triton|torch`` sets the default (read when ``dora_kernels`` is
imported); ``use_backend`` overrides it for the code inside the block, process-wide (the
autograd engine runs backward passes on its own threads, which a context variable would miss).

- ``auto``: CUDA tensors run the compiled kernels; CPU tensors run them through Triton's
  interpreter when ``TRITON_INTERPRET=1`` was set before ``dora_kernels`` was imported, and the
  torch path otherwise.
- ``triton``: the kernels on any device; on CPU tensors that needs the interpreter, so without
  ``TRITON_INTERPRET=1`` at import it is an error that says so.
- ``torch``: the pure-torch path on any device (same math, same memory-lean saved tensors).

float64 always takes the torch path (the kernels compute in fp32). Meta tensors run the
launchers only inside ``runtime.recording`` (the dry-run trace and the compile report; ``ops``
checks that).
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch")

# Triton reads TRITON_INTERPRET when a kernel is decorated: this is the value the kernels were
# built with, fixed for the life of the process.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _checked(name, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _checked(os.environ.get("DORA_KERNELS_BACKEND", "auto") or "auto", "DORA_KERNELS_BACKEND")


def get_backend() -> str:
    """The backend in force: ``"auto"``, ``"triton"`` or ``"torch"``."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Run the op on backend ``name`` (``"auto"``, ``"triton"``, ``"torch"``) inside the block."""
    global _backend
    prev, _backend = _backend, _checked(name, "use_backend: name")
    try:
        yield name
    finally:
        _backend = prev


def uses_triton(t: torch.Tensor) -> bool:
    """True if the op runs the Triton kernels on tensors like ``t`` under the backend in force."""
    if t.device.type == "meta":
        return False  # (the op runs the launchers on meta tensors inside runtime.recording)
    if t.dtype == torch.float64 or _backend == "torch":
        return False
    if t.is_cuda:
        return True
    if t.device.type == "cpu":
        if _backend == "triton" and not INTERPRET:
            raise RuntimeError("dora_kernels: backend 'triton' on CPU tensors runs the kernels through Triton's "
                               "interpreter, which needs TRITON_INTERPRET=1 in the environment before dora_kernels "
                               "is imported; use backend 'torch' (or 'auto') for the pure-torch path")
        return INTERPRET
    return False
