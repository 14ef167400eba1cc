"""Test set-up: run the real Triton kernels through the interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it must be set before
``dora_kernels`` is imported; pytest imports this file first.

Fixtures: ``device`` (cuda if present, else cpu) and ``backend`` (the device, with the op's
backend set by ``dora_kernels.use_backend`` to the param: ``triton`` runs the kernels, compiled
on CUDA and interpreted on a CPU; ``torch`` the pure-torch path, on the same device).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dora_kernels  # noqa: E402  (after TRITON_INTERPRET is set)
from dora_kernels.testing import DEVICE  # noqa: E402


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    with dora_kernels.use_backend(request.param):
        assert dora_kernels.backend.uses_triton(torch.empty(0, device=DEVICE)) == (request.param == "triton"), (
            f"backend {request.param!r} does not run on {DEVICE} (TRITON_INTERPRET must be 1 at import to test the "
            "kernels on a CPU)")
        yield DEVICE


@pytest.fixture
def torch_backend():
    """The pure-torch path on the test device."""
    with dora_kernels.use_backend("torch"):
        yield DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
