"""The forward with the norm in its pass over W0 (``launchers._fwd_norm`` / ``kernels._fwd_norm_kernel``):
without dropout, u or a given norm, for a few tokens (or a quantised W0 read in place; those cases
are in test_qdora's kernel paths), the norm and y come from one pass over W0. Which calls take it,
and that it computes what the two-pass kernels (norm, then forward) compute, against float64."""

from __future__ import annotations

import pytest
import torch

import dora_kernels
from dora_kernels import heuristics, launchers, torch_path
from dora_kernels.testing import DEVICE
from tolerance import assert_close_to_f64, term_scales

M, K = 37, 203  # not multiples of any block; K spans several 64/128-deep steps


def _tensors(N, R, dt, adt, bias, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dtype=dt):
        return (scale * torch.randn(*shape, generator=g)).to(device=DEVICE, dtype=dtype)

    x = rnd(N, K)
    w = rnd(M, K, scale=K ** -0.5)
    A = rnd(R, K, scale=K ** -0.5, dtype=adt)
    B = rnd(M, R, scale=0.3, dtype=adt)
    m = (1 + torch.rand(M, generator=g)).to(DEVICE)
    m[::5] *= -1
    b = rnd(M) if bias else None
    return x, w, A, B, m, b


@pytest.fixture
def launched(monkeypatch):
    """The kernels launched, and "xa" where x·Aᵀ is made (a kernel, or torch's GEMM)."""
    names = []
    real, real_xa = launchers.launch, launchers._xa
    monkeypatch.setattr(launchers, "launch", lambda k, *a, **kw: names.append(k.__name__) or real(k, *a, **kw))
    monkeypatch.setattr(launchers, "_xa", lambda *a, **kw: names.append("xa") or real_xa(*a, **kw))
    return names


@pytest.mark.parametrize("how, tokens, fused", [
    ("eval", 1, True), ("eval", 16, True), ("eval", 17, False), ("eval-16-bit", 7, True),
    ("train-save-output", 16, True),  # no dropout, no bias: the backward reads y, not u
    ("train-bias", 5, False),  # the backward needs u
    ("train-dropout", 5, False),
    ("eval-given-norm", 5, False),  # only the forward kernel runs
    ("train-exact-norm", 5, False),  # W0·Aᵀ comes from the norm kernel
])
def test_which_calls_take_it(how, tokens, fused, launched):
    dt = torch.bfloat16 if how == "eval-16-bit" else torch.float32
    x, w, A, B, m, b = _tensors(tokens, 3, dt, dt, how == "train-bias")
    train = how.startswith("train")
    A.requires_grad_(train)
    kw = dict(training=train, dropout_p=0.3 if how == "train-dropout" else 0.0)
    if how == "eval-given-norm":
        kw["weight_norm"] = launchers.weight_norm(w, A, B, 2.0)[0]
    if how == "train-exact-norm":
        kw["norm_grad"] = "exact"
    with dora_kernels.use_backend("triton"):
        launched.clear()
        dora_kernels.dora_linear(x, w, A, B, m, 2.0, b, **kw)
    assert ("_fwd_norm_kernel" in launched) == fused, launched
    if fused:
        assert "_norm_kernel" not in launched and "_fwd_kernel" not in launched, launched
        # x·Aᵀ only for the backward: the eval forward reads V = W0 + s·B·A instead
        assert ("xa" in launched) == train, launched


@pytest.mark.parametrize("N", [1, 7, 16])
@pytest.mark.parametrize("R", [1, 17])
@pytest.mark.parametrize("dt, adt", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                     (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "fp16", "bf16", "bf16+fp32"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("need_xa", [True, False], ids=["xa", "no-xa"])
def test_it_computes_the_op(N, R, dt, adt, bias, need_xa, launched):
    """y and the norm of the kernel: the two-pass kernels' to their rounding (with xa: the same
    operands), and within the shared rule of float64 (against the torch path in the same dtypes).
    Without ``need_xa`` and adapters in x's dtype the GEMM reads V = W0 + s·B·A in x's dtype."""
    x, w, A, B, m, b = _tensors(N, R, dt, adt, bias, seed=N * 100 + R)
    s = 1.7
    via_v = not need_xa and adt == dt
    assert heuristics.use_fwd_norm(N=N, wq=0, has_dropout=False, need_u=False, has_norm=False, with_wa=False,
                                   fp32_dots=adt != dt or dt == torch.float32)
    with dora_kernels.use_backend("triton"):
        y, xa, u, norm, wa = launchers.dora_forward(x, w, A, B, m, s, b, need_u=False, need_xa=need_xa)
        assert "_fwd_norm_kernel" in launched and "_norm_kernel" not in launched, launched
        y2, _, u2, norm2, _ = launchers.dora_forward(x, w, A, B, m, s, b, need_u=True)  # norm, xa, fwd kernels
    assert u is None and wa is None and u2 is not None
    d = [t.double() if t is not None else None for t in (x, w, A, B, m, b)]
    scale = term_scales(*d[:5], s, d[5], torch.zeros(N, M, dtype=torch.float64))["y"]  # Σ|terms| of y
    # The two kernels step over K in other blocks: the fp32 sums differ by their rounding, bounded by
    # K·2⁻²⁴ of a sum of squares (the norm) and by a few fp32 ulps of Σ|terms| (y; then y's own rounding).
    torch.testing.assert_close(norm, norm2, rtol=K * 2.0**-24, atol=0)
    ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dt]
    if not via_v:
        torch.testing.assert_close(y.float(), y2.float(), rtol=2 * ulp,
                                   atol=2 * ulp * y2.float().abs().max().item() + 8 * 2.0**-23 * scale.max().item())

    ref = torch_path.dora_forward(x, w, A, B, m, s, b, need_u=False)[0]
    n64 = torch.linalg.vector_norm(d[1] + s * d[3] @ d[2], dim=1)
    y64 = (m.double() / n64) * (d[0] @ d[1].T + s * (d[0] @ d[2].T) @ d[3].T) + (d[5] if bias else 0)
    assert_close_to_f64(y, ref, y64, name="y", scale=scale)
    assert_close_to_f64(norm, torch_path.weight_norm(w, A, B, s)[0], n64, name="norm", dtype=torch.float32)


def test_zero_norm_rows_give_the_bias():
    """g = 0 where n = 0 (the op's rule), from the norm in the kernel's registers."""
    x, w, A, B, m, b = _tensors(4, 2, torch.float32, torch.float32, True)
    w[3] = 0
    B[3] = 0
    with dora_kernels.use_backend("triton"):
        y, _, _, norm, _ = launchers.dora_forward(x, w, A, B, m, 1.0, b, need_u=False)
    assert norm[3] == 0 and torch.equal(y[:, 3], b[3].expand(4))
    assert torch.isfinite(y).all()
