"""The bf16 split-dot path (kernels._dot_exact_bf16 / SPLIT) that the GPU takes for bf16 inputs.

The interpreter multiplies bf16 dot operands as raw integers, so by default the package
upcasts there and never runs this path on a CPU. These tests teach the interpreter's dot to
read bf16 (a test-only patch) and force SPLIT on, so the split arithmetic itself is checked
here, not only on a GPU.
"""

import numpy as np
import pytest
import torch

import dora_kernels
import reference
from dora_kernels import backend, launchers
from tolerance import assert_close_to_f64

interpreter = pytest.importorskip("triton.runtime.interpreter")
pytestmark = pytest.mark.skipif(not backend.INTERPRET, reason="patches Triton's interpreter")


@pytest.fixture
def split_path(monkeypatch):
    tl = interpreter.tl
    orig = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def f32(h):
            if h.dtype.scalar == tl.bfloat16:
                return interpreter.TensorHandle(
                    interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
            return h
        return orig(self, f32(a), f32(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(launchers, "_split", lambda dtype: dtype == torch.bfloat16)
    monkeypatch.setattr(launchers, "_upcast", lambda dtype: False)


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=["fp32-adapters", "bf16-adapters"])
@pytest.mark.parametrize("N,K,M,r", [pytest.param(70, 48, 80, 5, id="N70-in48-out80-r5"),
                                     pytest.param(130, 33, 17, 12, id="N130-in33-out17-r12")])
def test_split_parity(split_path, N, K, M, r, adapter_dtype, p):
    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(N, K, generator=g).bfloat16()
    W = (torch.randn(M, K, generator=g) / K**0.5).bfloat16()
    bias = torch.randn(M, generator=g).bfloat16()
    A = (torch.randn(r, K, generator=g) / K**0.5).to(adapter_dtype)
    B = (torch.randn(M, r, generator=g) * 0.2).to(adapter_dtype)
    m = (torch.rand(M, generator=g) + 0.5).to(adapter_dtype)
    G = torch.randn(N, M, generator=g).bfloat16()
    s, seed = 1.5, 77
    mask = dora_kernels.dropout_mask(seed, (N, K), p) if p > 0 else None

    def run(fn, dt_x, dt_a, **kw):
        ts = [x.to(dt_x), A.to(dt_a), B.to(dt_a), m.to(dt_a)]
        ts = [t.clone().requires_grad_() for t in ts]
        y = fn(ts[0], W.to(dt_x), ts[1], ts[2], ts[3], s, bias.to(dt_x), dropout_p=p, **kw)
        y.backward(G.to(dt_x))
        return [y] + [t.grad for t in ts]

    fused = run(dora_kernels.dora_linear, torch.bfloat16, adapter_dtype, dropout_seed=seed)
    ref = run(reference.dora_linear, torch.bfloat16, adapter_dtype, dropout_mask=mask)
    ref64 = run(reference.dora_linear, torch.float64, torch.float64, dropout_mask=mask)
    for name, a, b, c in zip(["y", "dx", "dA", "dB", "dm"], fused, ref, ref64):
        assert_close_to_f64(a, b, c, name=name, k=3.0, ulps=2.0, dtype=b.dtype)
