"""``reference`` is PEFT's DoRA: bit-for-bit against ``peft.tuners.lora.Linear`` on CPU, and
against an independent float64 transcription of DORA_SPEC.md's formulas.

Why exact: ``reference.dora_linear`` runs the same ATen ops as PEFT (``DoraLinearVariant.forward``
and ``DoraLinearLayer.forward``), in the same order, on the same dtypes. CPU kernels are
deterministic for a given op sequence and shape, so output and every gradient must be equal,
not merely close; any difference means the op sequence drifted from PEFT's.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import reference
from tolerance import EPS, assert_close_to_f64, max_err

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# (leading dims of x, in, out, r, bias)
SHAPES = [
    pytest.param((1,), 16, 8, 4, True, id="N1-in16-out8-r4"),
    pytest.param((37,), 100, 72, 8, True, id="N37-in100-out72-r8"),
    pytest.param((13,), 31, 17, 3, False, id="N13-in31-out17-r3-nobias"),
    pytest.param((2, 3), 24, 40, 5, True, id="B2x3-in24-out40-r5"),
    pytest.param((7,), 9, 11, 1, True, id="N7-in9-out11-r1"),
    pytest.param((5,), 5, 1, 8, True, id="N5-in5-out1-r8"),
    pytest.param((11,), 33, 65, 6, False, id="N11-in33-out65-r6-nobias"),
]

# (base dtype of x/weight/bias, adapter dtype); fp32 adapters on a half base are PEFT's default
DTYPES = [
    pytest.param(F32, F32, id="fp32"),
    pytest.param(F16, F16, id="fp16"),
    pytest.param(BF16, BF16, id="bf16"),
    pytest.param(BF16, F32, id="bf16-fp32adapters"),
    pytest.param(F16, F32, id="fp16-fp32adapters"),
]

NAMES = ("x", "lora_A", "lora_B", "magnitude")


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second intra-op thread only adds OpenMP barriers, which cost tens
    of milliseconds per op when the cores are busy with something else."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny(nn.Module):
    def __init__(self, in_features, out_features, bias, dtype):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


class MaskDropout(nn.Module):
    """Dropout with a fixed boolean keep-mask, to stand in for PEFT's ``lora_dropout``.

    ``noise = mask / (1 − p)`` first, then ``x · noise``: torch's own dropout groups it so,
    and so does ``reference.dora_linear(dropout_mask=...)``; ``(x · mask) / (1 − p)`` rounds
    differently in half precision."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * (self.mask.to(x.dtype) * (1.0 / (1.0 - self.p)))


def make_peft(in_f, out_f, r, *, bias, base_dtype, adapter_dtype, alpha=None, dropout=0.0, rslora=False, seed=0):
    """A PEFT DoRA layer on a one-``nn.Linear`` model, adapter moved off its init (B ≠ 0, m ≠ ‖V‖)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, use_dora=True,
                             target_modules=["proj"], lora_dropout=dropout, use_rslora=rslora)
    # autocast_adapter_dtype=True (PEFT's default) upcasts half adapters to fp32; False keeps the base dtype.
    model = peft.get_peft_model(Tiny(in_f, out_f, bias, base_dtype), config,
                                autocast_adapter_dtype=adapter_dtype != base_dtype)
    layer = model.base_model.model.proj
    assert isinstance(layer, peft.tuners.lora.layer.Linear)
    assert layer.base_layer.weight.dtype == base_dtype
    for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight):
        assert t.dtype == adapter_dtype, f"PEFT made a {t.dtype} adapter, expected {adapter_dtype}"
    with torch.no_grad():
        B = layer.lora_B["default"].weight
        B.copy_(torch.randn(B.shape) * 0.1)
        m = layer.lora_magnitude_vector["default"].weight
        m.copy_(m.float() * (1 + 0.1 * torch.randn(m.shape)))
    return model, layer


def peft_tensors(layer):
    """PEFT's parameters as fresh leaves for the reference (trainable ones require grad)."""
    base = layer.base_layer
    return {
        "weight": base.weight.detach().clone(),
        "bias": None if base.bias is None else base.bias.detach().clone(),
        "lora_A": layer.lora_A["default"].weight.detach().clone().requires_grad_(),
        "lora_B": layer.lora_B["default"].weight.detach().clone().requires_grad_(),
        "magnitude": layer.lora_magnitude_vector["default"].weight.detach().clone().requires_grad_(),
        "scaling": layer.scaling["default"],
    }


def run_peft(model, layer, x):
    """PEFT's output and gradients, for a random upstream gradient (returned too)."""
    x = x.clone().requires_grad_()
    y = model(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    grads = {
        "x": x.grad,
        "lora_A": layer.lora_A["default"].weight.grad,
        "lora_B": layer.lora_B["default"].weight.grad,
        "magnitude": layer.lora_magnitude_vector["default"].weight.grad,
    }
    return y.detach(), grads, grad_out


def run_reference(t, x, grad_out, **kw):
    x = x.clone().requires_grad_()
    y = reference.dora_linear(x, t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], t["scaling"], t["bias"], **kw)
    y.backward(grad_out)
    return y.detach(), {"x": x.grad, "lora_A": t["lora_A"].grad, "lora_B": t["lora_B"].grad,
                        "magnitude": t["magnitude"].grad}


def assert_identical(actual, expected, name):
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != PEFT's {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != PEFT's {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        raise AssertionError(f"{name}: differs from PEFT, max |diff| = {max_err(actual, expected):.3e}")


def assert_matches_peft(model, layer, x, **ref_kw):
    y_peft, g_peft, grad_out = run_peft(model, layer, x)
    y_ref, g_ref = run_reference(peft_tensors(layer), x, grad_out, **ref_kw)
    assert y_ref.dtype == x.dtype
    assert_identical(y_ref, y_peft, "output")
    for name in NAMES:
        assert_identical(g_ref[name], g_peft[name], f"d{name}")


def dora_f64(x, W, A, B, m, s, bias=None, *, mask=None, p=0.0, detach_norm=True):
    """DORA_SPEC.md's forward, transcribed independently of ``reference`` (meant for float64)."""
    V = W + s * (B @ A)
    if detach_norm:
        with torch.no_grad():
            n = torch.linalg.vector_norm(V, dim=1)
    else:
        n = torch.linalg.vector_norm(V, dim=1)
    g = m / n
    if mask is None:
        y = g * (x @ W.T + s * ((x @ A.T) @ B.T))
    else:
        xt = x * mask / (1 - p)
        y = x @ W.T + (g - 1) * (xt @ W.T) + g * s * ((xt @ A.T) @ B.T)
    return y if bias is None else y + bias


def random_problem(lead, in_f, out_f, r, *, bias=True, base_dtype=F32, adapter_dtype=F32, s=1.5, seed=0):
    """Random DoRA inputs in the given dtypes, with m ≠ ‖V‖ and B ≠ 0."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
    A = torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)
    B = torch.randn(out_f, r, generator=gen) * 0.1
    m = torch.linalg.vector_norm(W + s * B @ A, dim=1) * (1 + 0.1 * torch.randn(out_f, generator=gen))
    b = torch.randn(out_f, generator=gen) * 0.1 if bias else None
    x = torch.randn(*lead, in_f, generator=gen)
    grad_out = torch.randn(*lead, out_f, generator=gen)
    base = {"x": x, "weight": W, "bias": b, "grad_out": grad_out}
    t = {k: None if v is None else v.to(base_dtype) for k, v in base.items()}
    t.update(lora_A=A.to(adapter_dtype), lora_B=B.to(adapter_dtype), magnitude=m.to(adapter_dtype), scaling=s)
    return t


def reference_run(t, dtype=None, **kw):
    """Output and gradients of ``reference.dora_linear`` on ``t`` (cast to ``dtype`` if given)."""
    t = {k: v.to(dtype) if dtype is not None and torch.is_tensor(v) else v for k, v in t.items()}
    leaves = {k: t[k].detach().clone().requires_grad_() for k in NAMES}
    y = reference.dora_linear(leaves["x"], t["weight"], leaves["lora_A"], leaves["lora_B"], leaves["magnitude"],
                              t["scaling"], t["bias"], **kw)
    y.backward(t["grad_out"])
    return y.detach(), {k: leaves[k].grad for k in NAMES}


def formula_run(t, **kw):
    """Output and gradients of ``dora_f64`` on ``t`` upcast to float64."""
    t = {k: v.double() if torch.is_tensor(v) else v for k, v in t.items()}
    leaves = {k: t[k].detach().clone().requires_grad_() for k in NAMES}
    if kw.get("mask") is not None:
        kw["mask"] = kw["mask"].double()
    y = dora_f64(leaves["x"], t["weight"], leaves["lora_A"], leaves["lora_B"], leaves["magnitude"], t["scaling"],
                 t["bias"], **kw)
    y.backward(t["grad_out"])
    return y.detach(), {k: leaves[k].grad for k in NAMES}


def assert_f64_equal(actual, expected, name, rtol=1e-12):
    scale = expected.abs().max().item()
    err = max_err(actual, expected)
    assert err <= rtol * max(scale, 1e-300), f"{name}: max |diff| = {err:.3e} at scale {scale:.3e}"


# ---------------------------------------------------------------------------------------------
# reference == PEFT, bit for bit


@pytest.mark.parametrize("base_dtype, adapter_dtype", DTYPES)
@pytest.mark.parametrize("lead, in_f, out_f, r, bias", SHAPES)
def test_matches_peft(lead, in_f, out_f, r, bias, base_dtype, adapter_dtype):
    model, layer = make_peft(in_f, out_f, r, bias=bias, base_dtype=base_dtype, adapter_dtype=adapter_dtype)
    x = torch.randn(*lead, in_f, dtype=base_dtype)
    assert_matches_peft(model, layer, x)


def test_matches_peft_unbatched_input():
    """A 1-D x: PEFT's DoRA returns (1, out) (its (1, out) scale broadcasts the base output), and so does the
    reference."""
    model, layer = make_peft(16, 8, 4, bias=True, base_dtype=F32, adapter_dtype=F32)
    assert_matches_peft(model, layer, torch.randn(16))


@pytest.mark.parametrize("base_dtype, adapter_dtype", DTYPES)
def test_weight_norm_matches_peft(base_dtype, adapter_dtype):
    """``reference.dora_weight_norm`` in the adapters' dtype is the norm PEFT's forward divides by."""
    _, layer = make_peft(29, 23, 6, bias=False, base_dtype=base_dtype, adapter_dtype=adapter_dtype)
    dora = layer.lora_magnitude_vector["default"]
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    with torch.no_grad():
        lora_weight = dora.get_lora_weight(lora_A=A, lora_B=B).to(adapter_dtype)
        want = dora.get_weight_norm(layer.base_layer.weight.to(adapter_dtype), lora_weight, layer.scaling["default"])
        got = reference.dora_weight_norm(layer.base_layer.weight, A.weight, B.weight, layer.scaling["default"],
                                         dtype=adapter_dtype)
    assert_identical(got, want, "weight norm")


@pytest.mark.parametrize("base_dtype, adapter_dtype", DTYPES)
def test_matches_peft_rslora(base_dtype, adapter_dtype):
    model, layer = make_peft(24, 20, 9, alpha=5, bias=True, base_dtype=base_dtype, adapter_dtype=adapter_dtype,
                             rslora=True)
    assert layer.scaling["default"] == pytest.approx(5 / 3, rel=1e-15)
    assert reference.DoRALinear(24, 20, r=9, alpha=5, use_rslora=True).scaling == layer.scaling["default"]
    assert_matches_peft(model, layer, torch.randn(6, 24, dtype=base_dtype))


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("base_dtype, adapter_dtype", DTYPES)
@pytest.mark.parametrize("lead, in_f, out_f, r, bias", [SHAPES[1], SHAPES[3], SHAPES[5]])
def test_matches_peft_dropout_training(lead, in_f, out_f, r, bias, base_dtype, adapter_dtype, p):
    model, layer = make_peft(in_f, out_f, r, bias=bias, base_dtype=base_dtype, adapter_dtype=adapter_dtype,
                             dropout=p)
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    mask = torch.rand(*lead, in_f) >= p
    mask.view(-1)[0] = False  # at least one dropped element, even at 5 inputs
    layer.lora_dropout["default"] = MaskDropout(mask, p)
    model.train()
    x = torch.randn(*lead, in_f, dtype=base_dtype)
    assert_matches_peft(model, layer, x, dropout_p=p, training=True, dropout_mask=mask)


@pytest.mark.parametrize("base_dtype, adapter_dtype", DTYPES)
def test_matches_peft_eval_with_dropout(base_dtype, adapter_dtype):
    """In eval PEFT skips its dropout and reuses the base output: so must the reference."""
    model, layer = make_peft(30, 14, 4, bias=True, base_dtype=base_dtype, adapter_dtype=adapter_dtype, dropout=0.3)
    model.eval()
    x = torch.randn(2, 5, 30, dtype=base_dtype)
    assert_matches_peft(model, layer, x, dropout_p=0.3, training=False)
    # ... which is the p = 0 function, op for op
    t = peft_tensors(layer)
    grad_out = torch.randn(2, 5, 14, dtype=base_dtype)
    y_eval, g_eval = run_reference(t, x, grad_out, dropout_p=0.3, training=False)
    t = peft_tensors(layer)
    y_p0, g_p0 = run_reference(t, x, grad_out, dropout_p=0.0, training=True)
    assert_identical(y_eval, y_p0, "output")
    for name in NAMES:
        assert_identical(g_eval[name], g_p0[name], f"d{name}")


# ---------------------------------------------------------------------------------------------
# reference == the spec's formula in float64


@pytest.mark.parametrize("dropout", [False, True], ids=["p0", "p0.25-mask"])
@pytest.mark.parametrize("lead, in_f, out_f, r, bias", SHAPES)
def test_float64_matches_formula(lead, in_f, out_f, r, bias, dropout):
    t = random_problem(lead, in_f, out_f, r, bias=bias, base_dtype=F64, adapter_dtype=F64)
    kw, fkw = {}, {}
    if dropout:
        mask = torch.rand(*lead, in_f, generator=torch.Generator().manual_seed(1)) >= 0.25
        kw = {"dropout_p": 0.25, "training": True, "dropout_mask": mask}
        fkw = {"mask": mask, "p": 0.25}
    y, grads = reference_run(t, **kw)
    y64, grads64 = formula_run(t, **fkw)
    assert y.dtype == F64
    assert_f64_equal(y, y64, "output")
    for name in NAMES:
        assert_f64_equal(grads[name], grads64[name], f"d{name}")


# largest error of the reference in low precision, in units of the base dtype's epsilon times the
# float64 tensor's largest magnitude (measured worst ≈ 2.3 over these shapes; bound with headroom)
LOWP_REL_ERR_EPS = 16.0


@pytest.mark.parametrize("base_dtype, adapter_dtype", DTYPES)
@pytest.mark.parametrize("lead, in_f, out_f, r, bias", SHAPES)
def test_low_precision_near_float64(lead, in_f, out_f, r, bias, base_dtype, adapter_dtype):
    t = random_problem(lead, in_f, out_f, r, bias=bias, base_dtype=base_dtype, adapter_dtype=adapter_dtype)
    y, grads = reference_run(t)
    y64, grads64 = formula_run(t)
    got = {"output": y, **{f"d{k}": v for k, v in grads.items()}}
    want = {"output": y64, **{f"d{k}": v for k, v in grads64.items()}}
    assert y.dtype == base_dtype and grads["x"].dtype == base_dtype
    for name in ("dlora_A", "dlora_B", "dmagnitude"):
        assert got[name].dtype == adapter_dtype, f"{name}: {got[name].dtype}"
    for name, ref in got.items():
        exact = want[name]
        # the sane bound: a few epsilons of the base dtype (half-precision GEMMs feed even fp32 adapter grads)
        rel = max_err(ref, exact) / max(exact.abs().max().item(), 1e-30)
        assert rel <= LOWP_REL_ERR_EPS * EPS[base_dtype], f"{name}: relative error {rel:.3e}"
        # the tolerance rule accepts the reference itself and a correctly rounded result ...
        assert_close_to_f64(ref, ref, exact, name=name)
        assert_close_to_f64(exact.to(ref.dtype), ref, exact, name=name)
        # ... and rejects one ten times as far off as the reference (plus a few ulps)
        scale = exact.abs().max().item()
        wrong = exact + 10 * max_err(ref, exact) + 4 * EPS[ref.dtype] * scale
        with pytest.raises(AssertionError, match=name):
            assert_close_to_f64(wrong.to(ref.dtype), ref, exact, name=name)


# ---------------------------------------------------------------------------------------------
# the detached norm, and the spec's backward formulas


def _grads_f64(detach_norm, seed=0):
    t = random_problem((9,), 12, 10, 3, bias=True, base_dtype=F64, adapter_dtype=F64, seed=seed)
    return t, reference_run(t, detach_norm=detach_norm), formula_run(t, detach_norm=detach_norm)


def test_detached_norm_is_detached():
    t, (y_det, g_det), (y64_det, g64_det) = _grads_f64(detach_norm=True)
    _, (y_full, g_full), (y64_full, g64_full) = _grads_f64(detach_norm=False)
    # detach_norm=True: A and B get the gradients of the formula with n a constant
    for name in NAMES:
        assert_f64_equal(g_det[name], g64_det[name], f"d{name} (detached)")
        assert_f64_equal(g_full[name], g64_full[name], f"d{name} (through the norm)")
    # the norm only changes dA and dB; the output, dx and dm are the same function
    assert_f64_equal(y_full, y_det, "output")
    for name in ("x", "magnitude"):
        assert_f64_equal(g_full[name], g_det[name], f"d{name}")
    # ... and it changes them by a clearly nonzero amount, so this test can fail
    for name in ("lora_A", "lora_B"):
        rel = max_err(g_full[name], g_det[name]) / g_det[name].abs().max().item()
        assert rel > 1e-2, f"d{name}: detached and undetached gradients differ by only {rel:.2e} (relative)"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_spec_backward_formulas(bias):
    """DORA_SPEC.md's closed-form backward (detached, and the exact-norm extra terms) equals autograd."""
    t = random_problem((4, 3), 14, 11, 5, bias=bias, base_dtype=F64, adapter_dtype=F64, seed=3)
    x, W, A, B, m, s = (t[k] for k in ("x", "weight", "lora_A", "lora_B", "magnitude", "scaling"))
    G = t["grad_out"]
    _, auto = formula_run(t, detach_norm=True)
    _, auto_full = formula_run(t, detach_norm=False)

    xs, Gs2 = x.reshape(-1, x.shape[-1]), G.reshape(-1, G.shape[-1])
    V = W + s * B @ A
    n = torch.linalg.vector_norm(V, dim=1)
    g = m / n
    u = xs @ W.T + s * (xs @ A.T) @ B.T
    xa = xs @ A.T
    Gs = Gs2 * g
    gb = Gs @ B
    closed = {
        "magnitude": (Gs2 * u).sum(0) / n,
        "lora_B": s * Gs.T @ xa,
        "lora_A": s * gb.T @ xs,
        "x": (Gs @ W + s * gb @ A).reshape(x.shape),
    }
    for name in NAMES:
        assert_f64_equal(closed[name], auto[name], f"d{name}")

    c = -(m / n**3) * (Gs2 * u).sum(0)
    extra_B = s * (c[:, None] * (W @ A.T + s * B @ (A @ A.T)))
    extra_A = s * ((c[:, None] * B).T @ W + s * (B.T @ (c[:, None] * B)) @ A)
    assert_f64_equal(closed["lora_B"] + extra_B, auto_full["lora_B"], "dlora_B (exact norm)")
    assert_f64_equal(closed["lora_A"] + extra_A, auto_full["lora_A"], "dlora_A (exact norm)")


# ---------------------------------------------------------------------------------------------
# reference.DoRALinear


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_from_linear_shares_weight_and_inits_like_peft(bias):
    linear = nn.Linear(64, 48, bias=bias)
    layer = reference.DoRALinear.from_linear(linear, r=32, alpha=16)
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert not layer.weight.requires_grad
    if bias:
        assert layer.bias.data_ptr() == linear.bias.data_ptr()
        assert not layer.bias.requires_grad
    else:
        assert layer.bias is None

    assert layer.scaling == 16 / 32
    assert torch.equal(layer.lora_B, torch.zeros(48, 32))
    torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(linear.weight, dim=1), rtol=1e-6, atol=0)
    # Kaiming-uniform with a = √5 is uniform on ±1/√in
    bound = 1 / math.sqrt(64)
    A = layer.lora_A.detach()
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.95 * bound
    assert abs(A.std().item() / (bound / math.sqrt(3)) - 1) < 0.1

    keys = ["weight", "bias", "lora_A", "lora_B", "magnitude"] if bias else ["weight", "lora_A", "lora_B", "magnitude"]
    assert list(layer.state_dict()) == keys
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B", "magnitude"}

    with torch.no_grad():
        linear.weight[0, 0] += 1.0
    assert layer.weight[0, 0] == linear.weight[0, 0], "from_linear copied the weight"


def test_rslora_scaling():
    assert reference.DoRALinear(8, 8, r=16, alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)
    assert reference.DoRALinear(8, 8, r=16, alpha=8).scaling == 8 / 16
    layer = reference.DoRALinear.from_linear(nn.Linear(8, 8), r=9, alpha=6, use_rslora=True)
    assert layer.scaling == 2.0


def test_reset_adapter():
    layer = reference.DoRALinear(20, 12, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(3)
    layer.reset_adapter()
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(layer.weight, dim=1), rtol=1e-6, atol=0)


def _peft_and_module(base_dtype, adapter_dtype, dropout=0.0):
    """A PEFT DoRA model and a ``reference.DoRALinear.from_linear`` on the same weights, both freshly made."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Tiny(23, 19, True, base_dtype)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["proj"], lora_dropout=dropout)
    model = peft.get_peft_model(base, config, autocast_adapter_dtype=adapter_dtype != base_dtype)
    pl = model.base_model.model.proj
    layer = reference.DoRALinear.from_linear(pl.base_layer, r=4, alpha=8, dropout=dropout, adapter_dtype=adapter_dtype)
    return model, pl, layer


@pytest.mark.parametrize("base_dtype, adapter_dtype", DTYPES)
def test_module_forward_matches_peft(base_dtype, adapter_dtype):
    model, pl, layer = _peft_and_module(base_dtype, adapter_dtype, dropout=0.2)
    assert layer.scaling == pl.scaling["default"]
    with torch.no_grad():
        pl.lora_B["default"].weight.normal_(0, 0.1)
        pl.lora_magnitude_vector["default"].weight.mul_(1.1)
        layer.lora_A.copy_(pl.lora_A["default"].weight)
        layer.lora_B.copy_(pl.lora_B["default"].weight)
        layer.magnitude.copy_(pl.lora_magnitude_vector["default"].weight)
    x = torch.randn(3, 4, 23, dtype=base_dtype)
    mask = torch.rand(3, 4, 23) >= 0.2
    pl.lora_dropout["default"] = MaskDropout(mask, 0.2)
    with torch.no_grad():
        assert_identical(layer(x, dropout_mask=mask), model(x), "output (training)")
        model.eval()
        layer.eval()
        assert_identical(layer(x), model(x), "output (eval)")


@pytest.mark.parametrize("base_dtype, adapter_dtype", [
    pytest.param(F32, F32, id="fp32"),
    pytest.param(BF16, BF16, id="bf16"),
    pytest.param(F16, F16, id="fp16"),
    pytest.param(BF16, F32, id="bf16-fp32adapters"),
    pytest.param(F16, F32, id="fp16-fp32adapters"),
])
def test_module_init_magnitude_matches_peft(base_dtype, adapter_dtype):
    _, pl, layer = _peft_and_module(base_dtype, adapter_dtype)
    assert layer.magnitude.dtype == adapter_dtype
    assert_identical(layer.magnitude.detach(), pl.lora_magnitude_vector["default"].weight.detach(),
                     "magnitude at init")


# ---------------------------------------------------------------------------------------------
# tests/tolerance.py itself


def _synthetic(dtype=F32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ref64 = torch.randn(50, generator=gen, dtype=F64)
    delta = 1e-3 * torch.randn(50, generator=gen, dtype=F64)
    return ref64, (ref64 + delta).to(dtype), delta


def test_tolerance_passes_on_equal_error():
    ref64, ref, delta = _synthetic()
    assert_close_to_f64(ref.clone(), ref, ref64)
    assert_close_to_f64((ref64 - delta).float(), ref, ref64)  # same size, other sign
    assert_close_to_f64((ref64 + 2.5 * delta).float(), ref, ref64)  # within k = 3


def test_tolerance_fails_on_larger_error():
    ref64, ref, delta = _synthetic()
    with pytest.raises(AssertionError, match=r"dx: max \|impl - f64\|.*worst element"):
        assert_close_to_f64((ref64 + 10 * delta).float(), ref, ref64, name="dx")
    with pytest.raises(AssertionError):
        assert_close_to_f64((ref64 + 2 * delta).float(), ref, ref64, k=1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_tolerance_fails_on_nonfinite(bad):
    ref64, ref, _ = _synthetic()
    actual = ref.clone()
    actual[7] = bad
    with pytest.raises(AssertionError, match=r"flat\[7\]"):
        assert_close_to_f64(actual, ref, ref64)


def test_tolerance_atol_floor_and_shapes():
    ref64 = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=F64)
    rounded = ref64.to(BF16)
    assert max_err(rounded, ref64) > 0
    # a reference that is (nearly) exact leaves only the ulp floor to admit a correctly rounded result
    assert_close_to_f64(rounded, ref64.float(), ref64, dtype=BF16)
    with pytest.raises(AssertionError):
        assert_close_to_f64(rounded, ref64.float(), ref64)  # fp32's floor is too tight for a bf16 result
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_f64(ref64[:-1], ref64, ref64)
    empty = torch.empty(0, 3)
    assert_close_to_f64(empty, empty, empty.double())
