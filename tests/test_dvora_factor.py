"""DVoRA's factor ``B′ = diag(λ_b)·B·diag(λ_d)`` (``dvora_ops.dvora_factor``) and its λ gradients:
the Triton kernels (``kernels_dvora``; interpreted on a CPU) against the torch path and float64,
their launch counts, and ``frozen_cast`` (the frozen A cast once to the adapters' dtype), alone and
in a DVoRA layer, through in-place changes and replacement of A.

λs are random and never zero (λ_b = 0, VeRA's init, hides the λ_d gradient and B′ itself).
"""

from __future__ import annotations

import gc

import pytest
import torch

import dora_kernels
from dora_kernels import dvora_ops
from dora_kernels.testing import DEVICE
from tolerance import EPS, assert_close_to_f64

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
NAMES = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64"}

# (out M, rank R, λ_d dtype, λ_b dtype, vera_B dtype, B a slice of a wider projection)
FACTOR_CASES = [
    (37, 1, F32, F32, F32, False),  # r = 1, odd out
    (37, 17, BF16, BF16, F32, True),  # r not a power of two, B strided
    (5, 256, F16, F16, F32, False),
    (3, 1024, BF16, F32, F32, True),  # mixed λ dtypes: B′ in fp32
    (131, 24, F32, BF16, BF16, False),  # a 16-bit vera_B (the trace's)
    (64, 64, F16, F16, F16, True),
    (2100, 3, F32, F32, F32, False),  # more than 32 dλ_d partials: the sum kernel loops
    (7, 5, F64, F64, F64, False),  # float64 takes the torch path
]


def _id(c):
    M, R, ld, lb, vb, strided = c
    return f"out{M}-r{R}-ld_{NAMES[ld]}-lb_{NAMES[lb]}-B_{NAMES[vb]}" + ("-strided" if strided else "")


def _inputs(M, R, ld_dtype, lb_dtype, vb_dtype, strided, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = R + 3 if strided else R
    vb = (torch.rand(M + 2, width, generator=gen) * 2 - 1)[:M, :R]
    # |λ| in [0.25, 1.75] with random signs: no zeros
    sign = lambda n: torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)  # noqa: E731
    ld = (0.25 + 1.5 * torch.rand(R, generator=gen)) * sign(R)
    lb = (0.25 + 1.5 * torch.rand(M, generator=gen)) * sign(M)
    dtype = torch.promote_types(ld_dtype, lb_dtype)
    G = torch.randn(M, R, generator=gen).to(dtype)
    return vb.to(vb_dtype).to(DEVICE), ld.to(ld_dtype).to(DEVICE), lb.to(lb_dtype).to(DEVICE), G.to(DEVICE)


def _factor(backend, vb, ld, lb, G):
    ld, lb = ld.detach().clone().requires_grad_(True), lb.detach().clone().requires_grad_(True)
    with dora_kernels.use_backend(backend):
        b = dvora_ops.dvora_factor(vb, ld, lb)
        b.backward(G)
    return b.detach(), ld.grad, lb.grad


def _count_launches(monkeypatch):
    names = []
    real = dvora_ops.launch

    def spy(kernel, *args, **kwargs):
        names.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(dvora_ops, "launch", spy)
    return names


@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in FACTOR_CASES])
def test_factor_and_lambda_grads_match_torch_and_float64(case, monkeypatch):
    vb, ld, lb, G = _inputs(*case)
    launched = _count_launches(monkeypatch)
    b, dld, dlb = _factor("triton", vb, ld, lb, G)
    kernels = ld.dtype != F64
    assert launched == (["_dvora_b_kernel", "_dvora_dlambda_kernel", "_dvora_sum_kernel"] if kernels else [])
    b_t, dld_t, dlb_t = _factor("torch", vb, ld, lb, G)

    dtype = torch.promote_types(ld.dtype, lb.dtype)
    assert b.dtype == dtype and dld.dtype == ld.dtype and dlb.dtype == lb.dtype
    # B′: the same fp32 products rounded once (to nearest even, the interpreter too): bit for bit
    assert torch.equal(b, b_t), (b - b_t).abs().max()

    B, D, L, G64 = vb.double(), ld.double(), lb.double(), G.double()
    b64 = L[:, None] * B * D[None, :]
    # two fp32 products, then one rounding to B′'s dtype
    bound = (0.5 * EPS[dtype] + 2 * EPS[F32]) * b64.abs()
    assert ((b.double() - b64).abs() <= bound).all(), ((b.double() - b64).abs() - bound).max()
    dld64, dlb64 = (G64 * L[:, None] * B).sum(0), (G64 * D[None, :] * B).sum(1)
    scale_d = (G64 * L[:, None] * B).abs().sum(0)
    scale_b = (G64 * D[None, :] * B).abs().sum(1)
    assert_close_to_f64(dld, dld_t, dld64, name="dλ_d", scale=scale_d)
    assert_close_to_f64(dlb, dlb_t, dlb64, name="dλ_b", scale=scale_b)
    if kernels and ld.dtype == F32 and lb.dtype == F32:
        # fp32 results: a few fp32 ulps of the terms' magnitude, whatever the torch path's error
        assert (dld.double() - dld64).abs().max() <= 8 * EPS[F32] * scale_d.max()
        assert (dlb.double() - dlb64).abs().max() <= 8 * EPS[F32] * scale_b.max()


def test_factor_gives_a_trainable_B_its_gradient():
    """VeRA freezes B; one that trains gets dB = diag(λ_b)·dB′·diag(λ_d) from the op too."""
    vb, ld, lb, G = _inputs(9, 6, F32, F32, F32, True)
    vb = vb.clone().requires_grad_(True)
    with dora_kernels.use_backend("triton"):
        dvora_ops.dvora_factor(vb, ld, lb).backward(G)
    torch.testing.assert_close(vb.grad, lb[:, None] * G * ld[None, :], rtol=1e-6, atol=1e-7)


def test_factor_in_the_layer_step_is_three_launches():
    """The dry-run trace of a DVoRA step: no torch ops besides the kernels and x·Aᵀ (a plain GEMM
    without dropout: torch's); B′ one launch, its backward two (14 small torch ops before)."""
    from bench import trace as T
    from bench.shapes import Shape

    events = T.trace_layer("fused_dvora", Shape("t", 96, 80), 64, r=256).mode("step").events
    names = [e.name for e in events]
    assert [e.name for e in events if e.source != "triton"] == ["mm"]
    assert [n for n in names if n.startswith("_dvora")] == ["_dvora_b_kernel", "_dvora_dlambda_kernel",
                                                           "_dvora_sum_kernel"]


def test_dvora_compiles_to_one_graph(backend):
    """``dvora_factor`` and its backward are ``torch.library`` ops: ``torch.compile`` keeps the
    whole DVoRA function in one graph (no break), with eager's numbers."""
    torch.manual_seed(0)
    w = torch.randn(9, 12, device=backend)
    A, B = (t.to(backend) for t in dora_kernels.vera_projections(6, 12, 9, 0))
    leaves = [torch.randn(5, 12, device=backend), torch.randn(6, device=backend) + 0.5,
              torch.randn(9, device=backend) + 0.5, torch.rand(9, device=backend) + 1]

    def step(fn):
        ts = [t.detach().clone().requires_grad_(True) for t in leaves]
        y = fn(ts[0], w, A, B, *ts[1:])
        y.backward(torch.ones_like(y))
        return [y.detach()] + [t.grad for t in ts]

    compiled = torch.compile(dora_kernels.dvora_linear, fullgraph=True, backend="aot_eager")
    for got, want in zip(step(compiled), step(dora_kernels.dvora_linear)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# frozen_cast: a frozen A in the adapters' dtype, cast once

def test_frozen_cast_reuses_its_copy_until_the_source_changes():
    A = torch.randn(6, 10, device=DEVICE)
    c1 = dvora_ops.frozen_cast(A, BF16)
    assert c1.dtype == BF16 and torch.equal(c1, A.to(BF16))
    assert dvora_ops.frozen_cast(A, BF16) is c1
    c16 = dvora_ops.frozen_cast(A, F16)  # one copy per dtype, kept side by side
    assert c16.dtype == F16 and dvora_ops.frozen_cast(A, BF16) is c1 and dvora_ops.frozen_cast(A, F16) is c16
    assert dvora_ops.frozen_cast(A) is A and dvora_ops.frozen_cast(A, F32, A.device) is A  # nothing to cast

    with torch.no_grad():
        A.mul_(3)  # in place: the version counter moves
    c2 = dvora_ops.frozen_cast(A, BF16)
    assert c2 is not c1 and torch.equal(c2, A.to(BF16))

    A.data = torch.randn(6, 10, device=DEVICE)  # new storage under the same tensor
    c3 = dvora_ops.frozen_cast(A, BF16)
    assert torch.equal(c3, A.to(BF16)) and not torch.equal(c3, c2)

    key = (id(A), BF16, A.device)
    assert key in dvora_ops._FROZEN_CASTS
    del A, c1, c2, c3
    gc.collect()
    assert key not in dvora_ops._FROZEN_CASTS  # the copy goes with its source


def test_frozen_cast_of_a_tensor_that_trains_stays_differentiable():
    A = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    c = dvora_ops.frozen_cast(A, BF16)
    assert c.requires_grad and dvora_ops.frozen_cast(A, BF16) is not c
    c.float().sum().backward()
    assert torch.equal(A.grad, torch.ones_like(A))
    with torch.inference_mode():
        t = torch.randn(3, 3, device=DEVICE)
    assert torch.equal(dvora_ops.frozen_cast(t, BF16), t.to(BF16))


def test_layer_casts_A_once_and_follows_changes_to_it(monkeypatch):
    """bf16 λs over the fp32 shared vera_A: the op gets A in bf16, the same copy every step, a new
    one after A changes in place or is replaced; the output follows A each time."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10)).to(DEVICE, BF16)
    model = peft.get_peft_model(base, dora_kernels.DVoRAConfig(r=8, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name in ("dvora_lambda_b", "dvora_lambda_d"):
            p = getattr(layer, name)["default"]
            p.data = (p.data + 0.5).to(BF16)
    seen = []
    real = dvora_ops.dora_linear

    def spy(x, weight, lora_A, lora_B, *args, **kw):
        seen.append(lora_A)
        return real(x, weight, lora_A, lora_B, *args, **kw)

    monkeypatch.setattr(dvora_ops, "dora_linear", spy)
    x = torch.randn(5, 12, device=DEVICE, dtype=BF16)

    def expected(A_full):
        r, i = 8, 12
        return dora_kernels.dvora_linear(x, layer.base_layer.weight, A_full[:r, :i].to(BF16),
                                         layer.vera_B["default"][:10, :r], layer.dvora_lambda_d["default"],
                                         layer.dvora_lambda_b["default"], layer.dvora_magnitude["default"],
                                         layer.base_layer.bias)

    with dora_kernels.use_backend("triton"):
        A_src = model.base_model.vera_A["default"]
        y1 = layer(x)
        a1 = seen[-1]
        y2 = layer(x)
        a2 = seen[-1]
        assert a1.dtype == BF16 and a1.data_ptr() == a2.data_ptr()  # cast once, not per step
        assert torch.equal(y1, y2) and torch.equal(y1, expected(A_src))

        with torch.no_grad():
            A_src.mul_(-2.0)
        y3 = layer(x)
        a3 = seen[-1]
        assert a3.data_ptr() != a2.data_ptr() and torch.equal(a3, A_src[:8, :12].to(BF16))
        assert not torch.equal(y3, y1) and torch.equal(y3, expected(A_src))

        model.base_model.vera_A["default"] = torch.randn_like(A_src)
        A_new = model.base_model.vera_A["default"]
        y4 = layer(x)
        assert torch.equal(seen[-1], A_new[:8, :12].to(BF16)) and torch.equal(y4, expected(A_new))


def test_frozen_cast_under_inference_mode_keeps_no_inference_copy():
    """A first cast inside ``torch.inference_mode`` (an eval loop before training) is not kept: its
    copy is an inference tensor, which a later training step could not save for backward."""
    A = torch.randn(6, 10, device=DEVICE)
    with torch.inference_mode():
        assert dvora_ops.frozen_cast(A, BF16).is_inference()
    c = dvora_ops.frozen_cast(A, BF16)
    assert not c.is_inference()
    lam = torch.rand(6, device=DEVICE, dtype=BF16, requires_grad=True)
    (c.T @ lam).float().sum().backward()  # saves c for backward
    assert lam.grad is not None
