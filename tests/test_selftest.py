"""``python -m dora_kernels.selftest`` runs, judges, and reports through its exit status."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dora_kernels
from dora_kernels import selftest
from dora_kernels.backend import INTERPRET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU paths (a GPU runs test_ops on CUDA)")
@pytest.mark.parametrize("backend", ["interpreter", "torch"])
def test_quick_selftest_passes_on_cpu(backend, capsys):
    assert INTERPRET, "conftest turns the interpreter on for a CPU run"
    rc = selftest.main(["--quick", "--device", "cpu", "--backend", backend])
    out = capsys.readouterr().out
    assert rc == 0, out[-4000:]
    assert ("triton interpreter" if backend == "interpreter" else "pure torch path") in out
    assert " 0 failed" in out
    assert dora_kernels.get_backend() == "auto", "the torch backend must not stay switched on"


def test_a_failure_exits_nonzero(monkeypatch, capsys):
    from dora_kernels._tolerance import Verdict

    monkeypatch.setattr(selftest, "check_case",
                        lambda case, device, seed=0: [Verdict("dx", False, 1.0, 0.1, 0.5, "dx: too far")])
    rc = selftest.main(["--quick", "--device", "cpu", "--backend", "torch", "--only", "N6-in5-out1-r8-fp32"])
    assert rc == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_cuda_without_a_gpu_is_refused():
    assert selftest.main(["--device", "cuda"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU run tests the compiled kernels instead")
def test_command_line_turns_the_interpreter_on():
    """``python -m`` imports dora_kernels before the self-test runs: with TRITON_INTERPRET unset
    it must rerun itself with the interpreter on (the kernels are defined at import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "dora_kernels.selftest", "--device", "cpu", "--quick", "--only",
                           "N6-in5-out1-r8-bf16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "triton interpreter" in proc.stdout
    assert "0 failed" in proc.stdout
