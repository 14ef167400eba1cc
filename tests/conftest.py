"""Test set-up: run the real Triton kernels through the interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it must be set before
``dora_kernels`` is imported; pytest imports this file first.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
