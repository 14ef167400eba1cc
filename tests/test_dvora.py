"""DVoRA (DoRA over VeRA): the reference against float64, the fused function against the
reference (both backends), and the PEFT method ``dora_kernels.DVoRAConfig`` against PEFT's VeRA and
PEFT's own round trips.

Parity cases run the fused function, ``reference.dvora_linear`` in the same dtypes and the
reference on float64 copies of the same (already rounded) inputs, and hold the output and the
gradients of x, λ_d, λ_b, m (and bias) to ``tolerance.assert_close_to_f64``. λ_b is never zero in
them (VeRA's init, λ_b = 0, hides the λ_d gradient and the whole update). The PEFT tests need
peft (and transformers for GPT-2 and Llama) and skip without them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import dora_kernels
import reference
from dora_kernels import dvora_ops, ops
from dora_kernels.testing import DEVICE
from tolerance import assert_close_to_f64, term_scales

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
P_DROP = 0.3
GRADS = ("x", "lambda_d", "lambda_b", "magnitude", "bias")


# ---------------------------------------------------------------------------------------------
# cases

@dataclass(frozen=True)
class Case:
    lead: tuple  # leading dims of x
    i: int  # in features
    o: int  # out features
    r: int  # rank
    dtype: str = "f32"  # "base" or "base+adapter"
    bias: str = "none"  # none | frozen | grad
    drop: str = "none"  # none | train | eval
    layout: str = "contig"  # contig | w-T (GPT-2 Conv1D: the op gets the transpose of an (in, out) weight)

    @property
    def id(self) -> str:
        lead = f"N{self.lead[0]}" if len(self.lead) == 1 else "B" + "x".join(map(str, self.lead))
        parts = [lead, f"in{self.i}", f"out{self.o}", f"r{self.r}", self.dtype.replace("+", "-ad")]
        parts += [f"bias_{self.bias}"] if self.bias != "none" else []
        parts += [f"drop_{self.drop}"] if self.drop != "none" else []
        parts += [self.layout] if self.layout != "contig" else []
        return "-".join(parts)

    @property
    def dtypes(self):
        base, _, adapter = self.dtype.partition("+")
        return DTYPES[base], DTYPES[adapter or base]


CASES = [
    Case((7,), 13, 11, 4, "f32", "frozen"),
    Case((2, 3), 20, 16, 8, "f32", "grad", "train"),
    Case((9,), 17, 5, 12, "f32", "none", "train", "w-T"),  # r above in and out
    Case((6,), 5, 1, 8, "bf16+f32", "frozen"),  # PEFT's 5 -> 1 test layer
    Case((6,), 10, 7, 1, "f32"),  # r = 1
    Case((6,), 10, 7, 1, "f16", "frozen", "train"),
    Case((5,), 12, 9, 256, "f32", "frozen", "none", "w-T"),
    Case((5,), 12, 9, 256, "bf16+f32", "none", "train"),
    Case((3,), 8, 6, 1024, "f32", "grad"),
    Case((3,), 8, 6, 1024, "bf16+f32", "frozen", "eval"),
    Case((8,), 24, 18, 16, "f16"),
    Case((8,), 24, 18, 16, "bf16", "frozen", "none", "w-T"),
    Case((8,), 24, 18, 16, "bf16+f32", "grad", "train"),
    Case((8,), 24, 18, 16, "f16+f32", "frozen", "eval"),
    Case((1,), 33, 19, 6, "bf16+f32"),  # one token
    Case((5,), 12, 9, 17, "bf16", "none", "train"),  # 16-bit λs, r not a power of two
    Case((4,), 10, 5, 256, "f16", "frozen"),
]


def _values(case: Case, seed: int) -> dict:
    """Inputs rounded to their dtypes (the float64 copies are the same numbers). A and B are
    slices of larger projections, as a layer gets them (strided views); λ_b ≠ 0 and m is not ‖V‖,
    so g ≠ 1 and every term counts."""
    gen = torch.Generator().manual_seed(seed)
    i, o, r = case.i, case.o, case.r
    base, adapter = case.dtypes
    x = torch.randn(*case.lead, i, generator=gen)
    w = torch.randn(o, i, generator=gen) / math.sqrt(i)
    A_full, B_full = dora_kernels.vera_projections(r, i + 5, o + 3, seed)
    A, B = A_full[:, :i], B_full[:o, :]
    ld = torch.randn(r, generator=gen) * 0.5
    lb = torch.randn(o, generator=gen)
    norm = torch.linalg.vector_norm(w.double() + (lb[:, None] * B * ld).double() @ A.double(), dim=1)
    m = norm * (0.5 + torch.rand(o, generator=gen, dtype=torch.float64))
    bias = torch.randn(o, generator=gen) * 0.1
    G = torch.randn(*case.lead, o, generator=gen)
    return {"x": x.to(base), "weight": w.to(base), "vera_A": A.to(adapter), "vera_B": B.to(adapter),
            "lambda_d": ld.to(adapter), "lambda_b": lb.to(adapter), "magnitude": m.to(adapter),
            "bias": bias.to(base) if case.bias != "none" else None, "G": G.to(base)}


def _tensors(case: Case, v: dict, device, dtype=None, layout="contig") -> dict:
    """Leaves on ``device``, in the case's dtypes or all in ``dtype``; the projections stay the
    (strided) slices they are."""
    def cast(t):
        t = t.to(device)
        return t.to(dtype) if dtype is not None else t

    t = {k: (None if val is None else cast(val)) for k, val in v.items()}
    if layout == "w-T":
        t["weight"] = t["weight"].T.contiguous().T
    for k in ("x", "lambda_d", "lambda_b", "magnitude"):
        t[k] = t[k].detach().requires_grad_(True)
    if t["bias"] is not None:
        t["bias"] = t["bias"].detach().requires_grad_(case.bias == "grad")
    return t


def _run(fn, t: dict, **kwargs):
    y = fn(t["x"], t["weight"], t["vera_A"], t["vera_B"], t["lambda_d"], t["lambda_b"], t["magnitude"], t["bias"],
           **kwargs)
    y.backward(t["G"].to(y.dtype))
    return y.detach(), {k: t[k].grad for k in GRADS if t[k] is not None and t[k].requires_grad}


def _scales(v64: dict, keep, p) -> dict:
    """``Σ|terms|`` of y and each gradient (the rule's ``scale=``): DoRA's with
    ``lora_B = diag(λ_b)·B·diag(λ_d)``, carried through ``dλ_b = Σ_r (B ⊙ λ_d) ⊙ dB′`` and
    ``dλ_d = Σ_out (λ_b ⊙ B) ⊙ dB′``."""
    A, B, ld, lb = v64["vera_A"], v64["vera_B"], v64["lambda_d"], v64["lambda_b"]
    s = term_scales(v64["x"], v64["weight"], A, lb[:, None] * B * ld, v64["magnitude"], 1.0, v64["bias"], v64["G"],
                    keep=keep, p=p)
    dB = s["lora_B"]
    return {"y": s["y"], "x": s["x"], "magnitude": s["magnitude"], "bias": s["bias"],
            "lambda_b": ((B * ld).abs() * dB).sum(1), "lambda_d": ((lb[:, None] * B).abs() * dB).sum(0)}


def check_parity(case: Case, device, seed: int = 0):
    v = _values(case, seed)
    op_kw, ref_kw = {}, {}
    if case.drop != "none":
        op_kw = {"dropout_p": P_DROP, "training": case.drop == "train"}
        ref_kw = dict(op_kw)
    if case.drop == "train":
        op_kw["dropout_seed"] = 1000 + seed
        ref_kw["dropout_mask"] = dora_kernels.dropout_mask(1000 + seed, v["x"].shape, P_DROP, device)

    y, grads = _run(dora_kernels.dvora_linear, _tensors(case, v, device, layout=case.layout), **op_kw)
    y_ref, grads_ref = _run(reference.dvora_linear, _tensors(case, v, device), **ref_kw)
    y64, grads64 = _run(reference.dvora_linear, _tensors(case, v, device, torch.float64), **ref_kw)

    base, adapter = case.dtypes
    assert y.dtype == base and y.shape == (*case.lead, case.o)
    assert grads.keys() == grads_ref.keys()
    want = {"x": base, "bias": base, "lambda_d": adapter, "lambda_b": adapter, "magnitude": adapter}
    for k, g in grads.items():
        assert g is not None and g.dtype == want[k], f"d{k}: {None if g is None else g.dtype}, want {want[k]}"

    v64 = {k: (None if val is None else val.double()) for k, val in v.items()}
    keep = ref_kw.get("dropout_mask")
    scales = _scales(v64, None if keep is None else keep.cpu(), P_DROP)
    assert_close_to_f64(y, y_ref, y64, name="y", scale=scales["y"].to(y64.device))
    for k in grads_ref:
        # dm is built on u read back from a tensor in x's dtype (test_ops explains): its ulps are
        # x's, as there; without dropout only.
        ulp_dtype = base if (k == "magnitude" and case.drop != "train") else None
        assert_close_to_f64(grads[k], grads_ref[k], grads64[k], name=f"d{k}", dtype=ulp_dtype,
                            scale=scales[k].to(grads64[k].device))


# ---------------------------------------------------------------------------------------------
# the reference against float64 autograd of the formula

def _formula(x, W, A, B, ld, lb, m, bias, keep=None, p=0.0):
    """y straight from the issue's formula (float64 leaves): V = W0 + diag(λ_b)·B·diag(λ_d)·A."""
    V = W + (lb[:, None] * B * ld) @ A
    g = m / torch.linalg.vector_norm(V, dim=1).detach()
    lora = ((x @ A.T) * ld) @ (lb[:, None] * B).T
    b = 0 if bias is None else bias
    if keep is None:
        return g * (x @ W.T + lora) + b
    xd = x * keep / (1 - p)
    return x @ W.T + b + (g - 1) * (xd @ W.T) + g * (((xd @ A.T) * ld) @ (lb[:, None] * B).T)


@pytest.mark.parametrize("drop", ["none", "train", "eval"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_reference_matches_the_formula_in_float64(drop, bias):
    case = Case((4, 3), 11, 9, 6, "f32", "grad" if bias else "none")
    v = _values(case, 3)
    t = _tensors(case, v, "cpu", torch.float64)
    keep = torch.rand(t["x"].shape, generator=torch.Generator().manual_seed(5)) > P_DROP
    kw = {} if drop == "none" else {"dropout_p": P_DROP, "training": drop == "train", "dropout_mask": keep}
    y, grads = _run(reference.dvora_linear, t, **kw)

    f = _tensors(case, v, "cpu", torch.float64)
    y_f = _formula(f["x"], f["weight"], f["vera_A"], f["vera_B"], f["lambda_d"], f["lambda_b"], f["magnitude"],
                   f["bias"], keep.double() if drop == "train" else None, P_DROP)
    y_f.backward(f["G"])
    torch.testing.assert_close(y, y_f.detach(), rtol=1e-12, atol=1e-12)
    for k, g in grads.items():
        torch.testing.assert_close(g, f[k].grad, rtol=1e-11, atol=1e-12, msg=f"d{k}")


def test_reference_norm_is_detached():
    """The norm carries no gradient: with m = ‖V‖ (g = 1) the λ gradients are VeRA's."""
    case = Case((5,), 9, 7, 4)
    v = _values(case, 1)
    t = _tensors(case, v, "cpu", torch.float64)
    with torch.no_grad():
        V = t["weight"] + reference.dvora_delta_weight(t["vera_A"], t["vera_B"], t["lambda_d"], t["lambda_b"])
        t["magnitude"].copy_(torch.linalg.vector_norm(V, dim=1))
    _, grads = _run(reference.dvora_linear, t)
    vera = _tensors(case, v, "cpu", torch.float64)
    y = vera["x"] @ vera["weight"].T + vera["lambda_b"] * (((vera["x"] @ vera["vera_A"].T) * vera["lambda_d"])
                                                         @ vera["vera_B"].T)
    y.backward(vera["G"])
    for k in ("x", "lambda_d", "lambda_b"):
        torch.testing.assert_close(grads[k], vera[k].grad, rtol=1e-11, atol=1e-12, msg=f"d{k}")


# ---------------------------------------------------------------------------------------------
# the fused function against the reference

@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_fused_matches_reference(case, backend):
    check_parity(case, backend)


def test_fused_runs_the_dora_op_with_a_frozen_A(monkeypatch):
    """One dora_linear call with scaling 1, lora_A = A (no grad, the strided slice itself, not a
    copy) and lora_B = diag(λ_b)·B·diag(λ_d)."""
    calls = []
    real = ops.dora_linear

    def spy(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, **kw):
        calls.append((lora_A, lora_B, scaling))
        return real(x, weight, lora_A, lora_B, magnitude, scaling, bias, **kw)

    monkeypatch.setattr(dvora_ops, "dora_linear", spy)
    case = Case((4,), 12, 9, 5)
    v = _values(case, 0)
    t = _tensors(case, v, DEVICE)
    _run(dora_kernels.dvora_linear, t)
    (lora_A, lora_B, scaling), = calls
    assert scaling == 1.0 and not lora_A.requires_grad and lora_A.data_ptr() == t["vera_A"].data_ptr()
    assert lora_A.stride() == t["vera_A"].stride()
    torch.testing.assert_close(lora_B.detach(), (t["lambda_b"][:, None] * t["vera_B"] * t["lambda_d"]).detach())


def test_fused_rejects_mismatched_shapes():
    case = Case((3,), 8, 6, 4)
    t = _tensors(case, _values(case, 0), DEVICE)
    with pytest.raises(ValueError, match="lambda_d"):
        dora_kernels.dvora_linear(t["x"], t["weight"], t["vera_A"], t["vera_B"], t["lambda_d"][:3], t["lambda_b"],
                                  t["magnitude"])
    with pytest.raises(ValueError, match="vera_B"):
        dora_kernels.dvora_linear(t["x"], t["weight"], t["vera_A"], t["vera_B"][:5], t["lambda_d"], t["lambda_b"],
                                  t["magnitude"])


def test_trainable_base_weight_gets_its_gradient():
    """The fused op has no W0 gradient; a base weight that trains takes plain autograd instead."""
    case = Case((5,), 9, 7, 4)
    v = _values(case, 2)
    t = _tensors(case, v, DEVICE)
    t["weight"] = t["weight"].detach().requires_grad_(True)
    y, grads = _run(dora_kernels.dvora_linear, t)
    r = _tensors(case, v, DEVICE, torch.float64)
    r["weight"] = r["weight"].detach().requires_grad_(True)
    y64, grads64 = _run(reference.dvora_linear, r)
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t["weight"].grad, r["weight"].grad.float(), rtol=1e-5, atol=1e-5)
    for k in grads:
        torch.testing.assert_close(grads[k], grads64[k].float(), rtol=1e-5, atol=1e-5, msg=f"d{k}")


# ---------------------------------------------------------------------------------------------
# the PEFT method

IN, HID, OUT = 10, 14, 6


class Tiny(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(IN, HID, bias=bias)
        self.lin1 = nn.Linear(HID, OUT, bias=bias)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


@pytest.fixture
def transformers():
    pytest.importorskip("peft")
    return pytest.importorskip("transformers")


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Tiny(**kw).to(DEVICE)


def _dvora(peft, base, adapter="default", **kw):
    kw.setdefault("r", 8)
    kw.setdefault("target_modules", ["lin0", "lin1"])
    return peft.get_peft_model(base, dora_kernels.DVoRAConfig(**kw), adapter_name=adapter)


def _dvora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, dora_kernels.DVoRALinear)}


@torch.no_grad()
def _perturb(model, seed=1):
    """λ_b, λ_d random and m away from ‖V‖, so that every part of the update counts."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "dvora_" in name:
            noise = torch.randn(p.shape, generator=gen).to(p)
            p.copy_(p * (1 + 0.3 * noise) if "magnitude" in name else 0.5 * noise)


def _layer_reference(layer, adapter, x):
    """``reference.dvora_linear`` on a DVoRA layer's own tensors, float64."""
    base = layer.get_base_layer()
    w = base.weight.T if layer.fan_in_fan_out else base.weight
    A, B = layer._projections(adapter)

    def d(t):
        return None if t is None else t.detach().double()

    return reference.dvora_linear(d(x), d(w), d(A), d(B), d(layer.dvora_lambda_d[adapter]),
                                  d(layer.dvora_lambda_b[adapter]), d(layer.dvora_magnitude[adapter]), d(base.bias))


def test_import_needs_no_peft():
    """``import dora_kernels`` imports no PEFT; without PEFT, DVoRAConfig raises a clear ImportError."""
    code = ("import sys; import dora_kernels; assert 'peft' not in sys.modules, 'peft imported'; "
            "sys.modules['peft'] = None\n"
            "try:\n    dora_kernels.DVoRAConfig\nexcept ImportError as e:\n    assert 'pip install' in str(e), e\n"
            "else:\n    raise SystemExit('no ImportError')\n"
            "dora_kernels.dvora_linear")
    env = dict(os.environ, DORA_KERNELS_BACKEND="torch")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_registered_with_peft(peft):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    cfg = dora_kernels.DVoRAConfig(target_modules=["lin0"])
    assert cfg.peft_type == "DVORA" and peft.PeftType("DVORA") is cfg.peft_type
    assert PEFT_TYPE_TO_CONFIG_MAPPING[cfg.peft_type] is dora_kernels.DVoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[cfg.peft_type] is dora_kernels.DVoRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[cfg.peft_type] == "dvora_"
    assert cfg.r == 256 and cfg.d_initial == 0.1 and cfg.projection_prng_key == 0 and cfg.save_projection


def test_projections_and_init_are_veras(peft):
    """Same key and shapes: VeRA's very projections; each layer slices them; VeRA's λ init; m = ‖W0‖
    rows; the model starts as the base model."""
    key = 1234
    vera = peft.get_peft_model(_tiny(), peft.VeraConfig(r=8, target_modules=["lin0", "lin1"],
                                                        projection_prng_key=key))
    model = _dvora(peft, _tiny(), projection_prng_key=key)
    A, B = model.base_model.vera_A["default"], model.base_model.vera_B["default"]
    assert A.shape == (8, HID) and B.shape == (HID, 8)  # the largest in and out among lin0, lin1
    assert torch.equal(A, vera.base_model.vera_A["default"]) and torch.equal(B, vera.base_model.vera_B["default"])
    A2, B2 = dora_kernels.vera_projections(8, HID, HID, key)
    assert torch.equal(A.cpu(), A2) and torch.equal(B.cpu(), B2)
    x = torch.randn(5, IN, device=DEVICE)
    base = _tiny()
    for name, layer in _dvora_layers(model).items():
        a, b = layer._projections("default")
        assert torch.equal(a, A[:, : layer.in_features]) and torch.equal(b, B[: layer.out_features, :])
        assert torch.all(layer.dvora_lambda_d["default"] == 0.1) and torch.all(layer.dvora_lambda_b["default"] == 0)
        w = layer.get_base_layer().weight
        torch.testing.assert_close(layer.dvora_magnitude["default"], torch.linalg.vector_norm(w, dim=1).detach())
    torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-6)


def test_init_weights_false_equals_vera_at_init(peft):
    """With VeRA's non-default init (λ_b = 1, λ_d random, drawn in VeRA's order) m = ‖V‖ makes
    g = 1: output and λ gradients are VeRA's."""
    torch.manual_seed(7)
    vera = peft.get_peft_model(_tiny(), peft.VeraConfig(r=8, target_modules=["lin0", "lin1"], init_weights=False))
    torch.manual_seed(7)
    model = _dvora(peft, _tiny(), init_weights=False)
    x = torch.randn(6, IN, device=DEVICE)
    for name, layer in _dvora_layers(model).items():
        assert torch.all(layer.dvora_lambda_b["default"] == 1)
    y_vera, y = vera(x), model(x)
    torch.testing.assert_close(y, y_vera, rtol=1e-5, atol=1e-5)
    y_vera.square().sum().backward()
    y.square().sum().backward()
    vera_grads = {n.replace("vera_lambda_", "dvora_lambda_"): p.grad for n, p in vera.named_parameters()
                  if p.requires_grad}
    for n, p in model.named_parameters():
        if "lambda" in n:
            torch.testing.assert_close(p.grad, vera_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_layers_run_on_the_fused_op(peft, monkeypatch):
    calls = []
    real = dvora_ops.dora_linear
    monkeypatch.setattr(dvora_ops, "dora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _dvora(peft, _tiny())
    model(torch.randn(3, IN, device=DEVICE))
    assert len(calls) == 2


def test_only_adapter_parameters_train(peft):
    model = _dvora(peft, _tiny(), init_weights=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{lin}.dvora_{p}.default" for lin in ("lin0", "lin1")
                         for p in ("lambda_b", "lambda_d", "magnitude")}
    assert model.get_nb_trainable_parameters()[0] == (HID + 8 + HID) + (OUT + 8 + OUT)
    model(torch.randn(4, IN, device=DEVICE)).sum().backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    assert all(not b.requires_grad for n, b in model.named_buffers() if "vera_" in n)


@pytest.mark.parametrize("save_projection", [True, False], ids=["saved", "rebuilt"])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["", "low_mem"])
def test_save_and_load(peft, tmp_path, save_projection, low_cpu_mem_usage):
    from safetensors.torch import load_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False warns, as VeRA does
        model = _dvora(peft, _tiny(), save_projection=save_projection, init_weights=False)
    _perturb(model)
    x = torch.randn(5, IN, device=DEVICE)
    with torch.no_grad():  # as the loaded model runs (frozen): the same kernels, so the same roundings
        y = model(x)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    want = {f"base_model.model.{lin}.dvora_{p}" for lin in ("lin0", "lin1") for p in ("lambda_b", "lambda_d",
                                                                                       "magnitude")}
    if save_projection:
        want |= {"base_model.vera_A", "base_model.vera_B"}
    assert set(saved) == want

    base = _tiny()  # the same base weights; the adapter comes from the files alone
    torch.manual_seed(99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert isinstance(loaded.peft_config["default"], dora_kernels.DVoRAConfig)
    assert torch.equal(loaded.base_model.vera_A["default"], model.base_model.vera_A["default"])
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def _merge_model(peft, seed=0):
    model = _dvora(peft, _tiny(seed), init_weights=False)
    _perturb(model)
    return model.eval()


@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
def test_merge_unmerge_and_unload(peft, safe_merge):
    model = _merge_model(peft)
    x = torch.randn(7, IN, device=DEVICE)
    weights = {n: l.get_base_layer().weight.detach().clone() for n, l in _dvora_layers(model).items()}
    with torch.no_grad():
        y = model(x)
        model.merge_adapter(safe_merge=safe_merge)
        assert all(layer.merged for layer in _dvora_layers(model).values())
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        # the merged weight is g ⊙ (W0 + ΔW)
        for name, layer in _dvora_layers(model).items():
            w64 = weights[name].double() + layer._delta32("default", DEVICE).double()
            g = layer.dvora_magnitude["default"].double() / torch.linalg.vector_norm(w64, dim=1)
            torch.testing.assert_close(layer.get_base_layer().weight.double(), g[:, None] * w64, rtol=1e-5,
                                       atol=1e-6)
        model.unmerge_adapter()
        for name, layer in _dvora_layers(model).items():
            torch.testing.assert_close(layer.get_base_layer().weight, weights[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        merged = model.merge_and_unload(safe_merge=safe_merge)
        assert type(merged.lin0) is nn.Linear and type(merged.lin1) is nn.Linear
        torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-5)


def test_safe_merge_refuses_nan(peft):
    model = _merge_model(peft)
    with torch.no_grad():
        model.base_model.model.lin0.dvora_lambda_b["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert not model.base_model.model.lin0.merged


def test_disable_adapter(peft):
    model = _merge_model(peft)
    x = torch.randn(4, IN, device=DEVICE)
    y_base, y = _tiny()(x), model(x)
    assert (y - y_base).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(model(x), y_base, rtol=0, atol=0)
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    model.merge_adapter()
    with model.disable_adapter():  # unmerges, as PEFT's layers do
        torch.testing.assert_close(model(x), y_base, rtol=1e-5, atol=1e-6)


def test_two_adapters(peft):
    """add_adapter shares the projections; set_adapter switches; both active add their deltas,
    each taken on W0; merging both keeps that sum; unmerging restores W0."""
    model = _dvora(peft, _tiny(), init_weights=False)
    model.add_adapter("other", dora_kernels.DVoRAConfig(r=8, target_modules=["lin0", "lin1"], init_weights=False))
    _perturb(model)
    tuner = model.base_model
    assert tuner.vera_A["other"] is tuner.vera_A["default"]
    x = torch.randn(5, IN, device=DEVICE)
    lin0 = tuner.model.lin0
    base_out = lin0.get_base_layer()(x).double()
    y_default = _layer_reference(lin0, "default", x)
    y_other = _layer_reference(lin0, "other", x)

    torch.testing.assert_close(lin0(x).double(), y_default, rtol=1e-5, atol=1e-5)
    model.set_adapter("other")
    assert lin0.active_adapters == ["other"] and lin0.dvora_lambda_b["other"].requires_grad
    assert not lin0.dvora_lambda_b["default"].requires_grad
    torch.testing.assert_close(lin0(x).double(), y_other, rtol=1e-5, atol=1e-5)

    tuner.set_adapter(["default", "other"])
    both = y_default + y_other - base_out
    torch.testing.assert_close(lin0(x).double(), both, rtol=1e-5, atol=1e-5)
    w0 = lin0.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        y = model(x)
        model.merge_adapter()
        assert lin0.merged_adapters == ["default", "other"]
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(lin0.get_base_layer().weight, w0, rtol=1e-5, atol=1e-6)
        # merging one after the other recovers W0 for the second
        model.merge_adapter(["default"])
        with pytest.warns(UserWarning, match="Already following adapters were merged"):
            model.merge_adapter(["other"])
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
    torch.testing.assert_close(lin0.get_base_layer().weight, w0, rtol=1e-5, atol=1e-6)

    model.delete_adapter("other")
    assert set(lin0.dvora_lambda_b) == {"default"} and "other" not in tuner.vera_A


def test_gpt2_conv1d_fan_in_fan_out(transformers):
    import peft

    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).to(DEVICE)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = peft.get_peft_model(base, dora_kernels.DVoRAConfig(r=16, target_modules=["c_attn", "c_fc"],
                                                                   init_weights=False))
    assert model.peft_config["default"].fan_in_fan_out
    _perturb(model)
    model.eval()
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, dora_kernels.DVoRALinear) and c_attn.fan_in_fan_out
    assert (c_attn.in_features, c_attn.out_features) == (16, 48)
    x = torch.randn(3, 16, device=DEVICE)
    torch.testing.assert_close(c_attn(x).double(), _layer_reference(c_attn, "default", x), rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 32, (2, 8), device=DEVICE)
    with torch.no_grad():
        logits = model(ids).logits
        model.merge_adapter()
        assert c_attn.get_base_layer().weight.shape == (16, 48)
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_fan_in_fan_out_on_linear_is_corrected(peft):
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = _dvora(peft, _tiny(), fan_in_fan_out=True)
    assert not model.base_model.model.lin0.fan_in_fan_out


def test_bf16_model_keeps_fp32_adapters(peft, backend):
    """PEFT's default on a bf16 model: fp32 λs and m; the layer agrees with the float64 reference
    on its own tensors."""
    model = _dvora(peft, _tiny().to(torch.bfloat16), init_weights=False)
    _perturb(model)
    lin0 = model.base_model.model.lin0
    assert lin0.dvora_lambda_b["default"].dtype == torch.float32
    assert lin0.dvora_magnitude["default"].dtype == torch.float32
    assert model.base_model.vera_A["default"].dtype == torch.float32
    x = torch.randn(4, IN, device=backend).to(torch.bfloat16)
    y = lin0(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _layer_reference(lin0, "default", x), rtol=2e-2, atol=2e-2)


def test_bias_dvora_only_trains_the_targeted_biases(peft):
    model = _dvora(peft, _tiny(), bias="dvora_only", target_modules=["lin0"])
    assert model.base_model.model.lin0.base_layer.bias.requires_grad
    assert not model.base_model.model.lin1.bias.requires_grad
    model(torch.randn(3, IN, device=DEVICE)).sum().backward()
    assert model.base_model.model.lin0.base_layer.bias.grad is not None


def test_llama_trains(transformers, torch_backend):
    """A tiny Llama with DVoRA on every projection: 20 Adam steps on one batch lower the loss."""
    import peft

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(torch_backend)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(base, dora_kernels.DVoRAConfig(r=32, target_modules=targets))
    assert len(_dvora_layers(model)) == 14
    ids = torch.randint(0, 64, (4, 16), device=torch_backend)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # λ and m alone (r + 2·out numbers a layer) move a random tiny model's loss from ≈ ln 64 by ≈ 0.4
    assert losses[-1] < losses[0] - 0.25 and sum(b < a for a, b in zip(losses, losses[1:])) >= 17, losses


def test_llama_step_same_on_both_backends(transformers):
    """One forward and backward of the tiny Llama through the Triton kernels gives the torch
    path's loss and λ / m gradients."""
    import peft

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(DEVICE)
    model = peft.get_peft_model(base, dora_kernels.DVoRAConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                               init_weights=False))
    _perturb(model)
    ids = torch.randint(0, 32, (2, 6), device=DEVICE)
    results = {}
    for name in ("torch", "triton"):
        model.zero_grad()
        with dora_kernels.use_backend(name):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for n, g in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][n], g, rtol=1e-3, atol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------
# bad configs

@pytest.mark.parametrize("kw, match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -3}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"d_initial": float("nan")}, "d_initial must be a finite number"),
    ({"d_initial": float("inf")}, "d_initial must be a finite number"),
    ({"dvora_dropout": 1.0}, "dvora_dropout"),
    ({"bias": "lora_only"}, "bias must be one of"),
    ({"projection_prng_key": "seven"}, "projection_prng_key"),
], ids=["r0", "r-neg", "r-float", "d-nan", "d-inf", "dropout1", "bias", "key-str"])
def test_bad_config_raises(peft, kw, match):
    with pytest.raises(ValueError, match=match):
        dora_kernels.DVoRAConfig(target_modules=["lin0"], **kw)


def test_config_changed_after_creation_is_checked(peft):
    cfg = dora_kernels.DVoRAConfig(r=4, target_modules=["lin0"])
    cfg.d_initial = float("nan")
    with pytest.raises(ValueError, match="d_initial"):
        peft.get_peft_model(_tiny(), cfg)


def test_adapters_with_different_projection_keys_raise(peft):
    model = _dvora(peft, _tiny(), projection_prng_key=1)
    with pytest.raises(ValueError, match="projection_prng_key must be the same"):
        model.add_adapter("other", dora_kernels.DVoRAConfig(r=8, target_modules=["lin0", "lin1"],
                                                            projection_prng_key=2))
    assert "other" not in model.peft_config


def test_later_adapter_larger_than_the_projections_raises(peft):
    model = _dvora(peft, _tiny(), target_modules=["lin1"])  # projections (8, 14), (6, 8)
    with pytest.raises(ValueError, match="needs"):
        model.add_adapter("big", dora_kernels.DVoRAConfig(r=16, target_modules=["lin1"]))


def test_quantized_base_is_refused(peft):
    bnb = pytest.importorskip("bitsandbytes")
    base = _tiny().cpu()
    base.lin0 = bnb.nn.Linear8bitLt(IN, HID, has_fp16_weights=False)
    with pytest.raises(TypeError, match="quantized"):
        _dvora(peft, base, target_modules=["lin0"])


def test_no_matching_layer_raises(peft):
    with pytest.raises(ValueError, match="target_modules"):
        _dvora(peft, _tiny(), target_modules=["nothing_here"])
