"""The launch point (``dora_kernels.runtime``) and the backend switch (``dora_kernels.backend``):
binding by name, the device a launch runs on, the torch fallback for kernels that cannot run."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings

import pytest
import torch

import dora_kernels
from dora_kernels import backend, kernels, kernels_conv, kernels_dvora, runtime
from dora_kernels.testing import DEVICE


class FakeKernel:
    """A stand-in JIT function: its parameters by name, and a launch that records its arguments."""

    __name__ = "_fake_kernel"

    def __init__(self, arg_names):
        self.arg_names = arg_names
        self.calls = []

    def __getitem__(self, grid):
        def run(**kwargs):
            self.calls.append((grid, kwargs, list(_FakeCudaDevice.active)))
        return run


class _FakeCudaDevice:
    """A stand-in ``torch.cuda.device``: which devices were entered, which are active now."""

    entered = []
    active = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _FakeCudaDevice.entered.append(self.device)
        _FakeCudaDevice.active.append(self.device)

    def __exit__(self, *exc):
        _FakeCudaDevice.active.pop()
        return False


# ---------------------------------------------------------------------------------------------
# binding by name

def test_bind_fills_pointers_strides_and_flags():
    k = FakeKernel(["y_ptr", "stride_yn", "stride_ym", "bias_ptr", "N", "BLOCK_N", "HAS_BIAS"])
    y = torch.empty(4, 6)[:, ::2]
    meta = {"BLOCK_N": 16}
    bound = runtime.bind(k, meta, {"y": y, "bias": None, "N": 4})
    assert bound == {"y_ptr": y, "stride_yn": 6, "stride_ym": 2, "bias_ptr": None, "N": 4}
    assert meta["HAS_BIAS"] is False
    meta = {"BLOCK_N": 16}
    runtime.bind(k, meta, {"y": y, "bias": torch.zeros(3), "N": 4})
    assert meta["HAS_BIAS"] is True


@pytest.mark.parametrize("args,meta,msg", [
    ({"bias": None, "N": 4}, {"BLOCK_N": 16}, "no tensor 'y'"),
    ({"y": torch.empty(2, 2), "bias": None}, {"BLOCK_N": 16}, "no value given for N"),
    ({"y": torch.empty(2, 2), "bias": None, "N": 4, "M": 3}, {"BLOCK_N": 16}, "unknown arguments"),
    ({"y": torch.empty(2, 2), "bias": None, "N": 4}, {}, "no value given for BLOCK_N"),
    ({"y": torch.empty(2, 2), "bias": None, "N": 4}, {"BLOCK_N": 16, "HAS_BIAS": True}, "derived"),
    ({"y": torch.empty(2), "bias": None, "N": 4}, {"BLOCK_N": 16}, "1 dims"),
])
def test_bind_errors_name_the_argument(args, meta, msg):
    k = FakeKernel(["y_ptr", "stride_yn", "stride_ym", "bias_ptr", "N", "BLOCK_N", "HAS_BIAS"])
    with pytest.raises((TypeError, ValueError), match=msg):
        runtime.bind(k, dict(meta), args)


def test_every_kernel_takes_its_flags_from_its_tensors():
    """Each optional tensor of a kernel has its HAS_ flag and vice versa, except the mode flags."""
    modes = {"HAS_DROPOUT", "HAS_BIAS_IN_RESULT"}  # (the conv combination whose result holds the bias)
    for module, name in [(m, n) for m in (kernels, kernels_conv, kernels_dvora) for n in dir(m)]:
        k = getattr(module, name)
        if not name.endswith("_kernel"):
            continue
        names = list(k.arg_names)
        tensors = {n[:-4].upper() for n in names if n.endswith("_ptr")}
        flags = {n[4:] for n in names if n.startswith("HAS_") and n not in modes}
        assert flags <= tensors, (name, flags - tensors)
        # (WQ: the format of a quantised W0, QDT: its dtype)
        assert all(n.startswith(("BLOCK", "HAS_", "UPCAST", "LORA_F32", "SPLIT", "PREC", "EPI_PREC", "GROUP_N",
                                 "G_REDO", "WQ", "QDT")) for n in names if n.isupper() and n not in
                   {"N", "M", "K", "R", "S", "TA", "TB", "RK", "MR", "TOK_PER_PROG", "COL_PER_PROG",
                    "C", "T", "TILES", "TILES_PER_PROG"}), name


# ---------------------------------------------------------------------------------------------
# the device a launch runs on

def test_launch_runs_on_the_tensors_device(monkeypatch):
    """A tensor on cuda:1 launches under ``torch.cuda.device(cuda:1)`` (a stand-in here)."""
    _FakeCudaDevice.entered = []
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    monkeypatch.setattr(runtime, "_cuda_device", lambda bound: torch.device("cuda", 1))
    k = FakeKernel(["y_ptr", "stride_yn", "N", "BLOCK"])
    runtime.launch(k, (3,), {"BLOCK": 8}, y=torch.empty(2), N=2)
    assert _FakeCudaDevice.entered == [torch.device("cuda", 1)]
    assert len(k.calls) == 1 and k.calls[0][0] == (3,)
    assert k.calls[0][2] == [torch.device("cuda", 1)], "the kernel ran outside its device's guard"


def test_cpu_launch_enters_no_cuda_device(monkeypatch):
    _FakeCudaDevice.entered = []
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    k = FakeKernel(["y_ptr", "stride_yn", "N", "BLOCK"])
    runtime.launch(k, (1,), {"BLOCK": 8}, y=torch.empty(2), N=2)
    assert _FakeCudaDevice.entered == [] and len(k.calls) == 1


def test_tensors_on_different_devices_raise():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="lora_A is on meta but x is on cpu"):
        dora_kernels.dora_linear(x, torch.randn(5, 4), torch.randn(2, 4, device="meta"), torch.randn(5, 2),
                                 torch.rand(5), 2.0)


# ---------------------------------------------------------------------------------------------
# backends

def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="use_backend: name must be one of"):
        with dora_kernels.use_backend("cuda"):
            pass


def test_backend_env_variable_is_read_and_checked():
    code = "import dora_kernels; print(dora_kernels.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env={"DORA_KERNELS_BACKEND": "torch", "PATH": ""},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "torch", out.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", code], env={"DORA_KERNELS_BACKEND": "gpu", "PATH": ""},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "DORA_KERNELS_BACKEND must be one of" in bad.stderr


def test_triton_backend_on_cpu_without_the_interpreter_says_so(monkeypatch):
    monkeypatch.setattr(backend, "INTERPRET", False)
    with dora_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dora_kernels.dora_linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2),
                                 torch.rand(5), 2.0)


def test_torch_backend_launches_no_kernel(monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(dora_kernels.launchers, "launch", no_launch)
    x = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    with dora_kernels.use_backend("torch"):
        y = dora_kernels.dora_linear(x, torch.randn(5, 4, device=DEVICE), torch.randn(2, 4, device=DEVICE),
                                     torch.randn(5, 2, device=DEVICE), torch.rand(5, device=DEVICE), 2.0)
        y.sum().backward()
    assert x.grad is not None


# ---------------------------------------------------------------------------------------------
# a kernel that cannot run here: the torch path, once warned

def _inputs():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(17, 20, generator=gen)  # (over 16 tokens: the forward is _fwd_kernel, not _fwd_norm_kernel)
    w = torch.randn(12, 20, generator=gen) / 5
    A = torch.randn(3, 20, generator=gen) / 5
    B = torch.randn(12, 3, generator=gen) / 5
    m = torch.rand(12, generator=gen) + 0.5
    return [t.to(DEVICE) for t in (x, w, A, B, m)]


def _step(ts):
    ts = [t.clone().requires_grad_(i != 1) for i, t in enumerate(ts)]
    y = dora_kernels.dora_linear(*ts, 2.0)
    y.backward(torch.ones_like(y))
    return [y.detach()] + [t.grad for i, t in enumerate(ts) if i != 1]


@pytest.fixture
def failing_fwd_kernel(monkeypatch):
    """``_fwd_kernel`` fails as a config beyond the GPU's shared memory does; counts its tries."""
    from triton.runtime.errors import OutOfResources

    tries = []
    real = runtime._run

    def run(kernel, grid, bound, meta):
        if runtime.kernel_name(kernel) == "_fwd_kernel":
            tries.append(1)
            raise OutOfResources(300000, 232448, "shared memory")
        return real(kernel, grid, bound, meta)

    monkeypatch.setattr(runtime, "_run", run)
    monkeypatch.setattr(runtime, "_FAILED", {})
    monkeypatch.setattr(dora_kernels.ops, "_WARNED", set())
    return tries


@pytest.mark.skipif(not backend.uses_triton(torch.empty(0, device=DEVICE)), reason="needs the Triton path")
def test_unavailable_kernel_falls_back_to_torch_once(failing_fwd_kernel):
    ts = _inputs()
    with dora_kernels.use_backend("torch"):
        want = _step(ts)
    with pytest.warns(RuntimeWarning, match=r"_fwd_kernel \[.*BLOCK_N=.*\] cannot run on .*OutOfResources.*torch path"):
        got = _step(ts)
    # the forward ran on the torch path; the backward's kernels ran (another rounding)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        again = _step(ts)
    assert len(failing_fwd_kernel) == 1, "the failed config was compiled again"
    for a, b in zip(again, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not backend.uses_triton(torch.empty(0, device=DEVICE)), reason="needs the Triton path")
@pytest.mark.parametrize("how", ["strict", "triton"])
def test_unavailable_kernel_raises_when_strict(failing_fwd_kernel, monkeypatch, how):
    if how == "strict":
        monkeypatch.setenv("DORA_KERNELS_STRICT", "1")
    with dora_kernels.use_backend("triton") if how == "triton" else contextlib.nullcontext():
        with pytest.raises(runtime.KernelUnavailable, match="_fwd_kernel .*OutOfResources"):
            _step(_inputs())


@pytest.mark.skipif(not backend.uses_triton(torch.empty(0, device=DEVICE)), reason="needs the Triton path")
def test_a_device_fault_is_not_a_fallback(monkeypatch):
    def run(kernel, grid, bound, meta):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runtime, "_run", run)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _step(_inputs())
