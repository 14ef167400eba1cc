"""The rule's ``scale=``: ulps of ``Σ|terms|`` for results that cancel, and ``term_scales``.

A result that is a near-cancellation of larger terms (``dx = g·G·W0 + s·gb·A``) carries rounding
errors of the size of its terms; how large depends on the summation order of the machine's
BLAS, so ulps of the result alone fail on some CPUs and pass on others.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import reference
from tolerance import EPS, assert_close_to_f64, check_close_to_f64, term_scales

F32, F64 = torch.float32, torch.float64
NAMES = ("y", "x", "lora_A", "lora_B", "magnitude", "bias")


def _layer(n=9, i=8, o=6, r=10, s=0.5, seed=0, cancel=False, nonneg=False):
    """float64 inputs of one layer; ``cancel``: B·A ≈ −W0/s, so that V = W0 + s·B·A is ~1e-3 of
    its terms (r ≥ in lets B·A reach any W0); ``nonneg``: every input ≥ 0 and m = 2n (g = 2)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, i, generator=gen, dtype=F64)
    w = torch.randn(o, i, generator=gen, dtype=F64) / math.sqrt(i)
    A = torch.randn(r, i, generator=gen, dtype=F64) / math.sqrt(i)
    B = torch.randn(o, r, generator=gen, dtype=F64) * 0.1
    bias = torch.randn(o, generator=gen, dtype=F64) * 0.1
    G = torch.randn(n, o, generator=gen, dtype=F64)
    if cancel:
        B = -(w @ torch.linalg.pinv(A)) / s + 1e-3 * B
    if nonneg:
        x, w, A, B, bias, G = (t.abs() for t in (x, w, A, B, bias, G))
    norm = torch.linalg.vector_norm(w + s * B @ A, dim=1)
    m = 2 * norm if nonneg else norm * (0.5 + torch.rand(o, generator=gen, dtype=F64))
    return {"x": x, "weight": w, "lora_A": A, "lora_B": B, "magnitude": m, "scaling": s, "bias": bias, "G": G}


def _f64_results(L, *, keep=None, p=0.0, exact=False):
    """y and every gradient from the float64 reference (autograd)."""
    leaves = {k: L[k].detach().clone().requires_grad_() for k in ("x", "lora_A", "lora_B", "magnitude", "bias")}
    kw = {"dropout_p": p, "training": True, "dropout_mask": keep} if keep is not None else {}
    y = reference.dora_linear(leaves["x"], L["weight"], leaves["lora_A"], leaves["lora_B"], leaves["magnitude"],
                              L["scaling"], leaves["bias"], detach_norm=not exact, **kw)
    y.backward(L["G"])
    return {"y": y.detach(), **{k: t.grad for k, t in leaves.items()}}


def _scales(L, **kw):
    return term_scales(L["x"], L["weight"], L["lora_A"], L["lora_B"], L["magnitude"], L["scaling"], L["bias"],
                       L["G"], **kw)


def _dx_terms(L):
    """dx's two terms, g·G·W0 and s·gb·A, in float64 (p = 0)."""
    g = L["magnitude"] / torch.linalg.vector_norm(L["weight"] + L["scaling"] * L["lora_B"] @ L["lora_A"], dim=1)
    gs = L["G"] * g
    return gs @ L["weight"], L["scaling"] * (gs @ L["lora_B"]) @ L["lora_A"]


# ---------------------------------------------------------------------------------------------
# the rule with scale=

def test_cancelling_dx_passes_with_scale_and_fails_without():
    """dx summed from its two terms, each rounded to fp32 (IEEE-exact, no BLAS involved): its error
    is ulps of the terms, ~1e3 times ulps of dx. Against a reference that happens to be exact it
    fails the rule without scale and passes with it."""
    L = _layer(cancel=True)
    dx64 = _f64_results(L)["x"]
    t1, t2 = _dx_terms(L)
    torch.testing.assert_close(t1 + t2, dx64, rtol=0, atol=1e-12)
    scale = _scales(L)["x"]
    assert scale.max() > 300 * dx64.abs().max()  # the case really cancels
    impl = t1.float() + t2.float()
    lucky_ref = dx64.float()
    with pytest.raises(AssertionError, match="dx"):
        assert_close_to_f64(impl, lucky_ref, dx64, name="dx")
    assert_close_to_f64(impl, lucky_ref, dx64, name="dx", scale=scale)


def test_real_errors_fail_with_scale():
    """scale admits rounding, not mistakes: a wrong sign on one term fails, on a layer whose dx
    cancels (by ~5e4) too; there an error of 3 ulps of the terms fails; on a layer that does not
    cancel dx 1e-3 off fails, and so does every result 1e-5 off."""
    for cancel in (True, False):
        L = _layer(cancel=cancel)
        dx64 = _f64_results(L)["x"]
        t1, t2 = _dx_terms(L)
        scale = _scales(L)["x"]
        with pytest.raises(AssertionError):
            assert_close_to_f64((t1 - t2).float(), dx64.float(), dx64, name="dx", scale=scale)
        if cancel:
            off = dx64 + 3 * EPS[F32] * scale.max() * torch.sign(dx64)
            with pytest.raises(AssertionError):
                assert_close_to_f64(off, dx64.float(), dx64, name="dx", scale=scale)
    L = _layer()
    res = _f64_results(L)
    with pytest.raises(AssertionError):
        assert_close_to_f64((res["x"] * (1 + 1e-3)).float(), res["x"].float(), res["x"], name="dx",
                            scale=_scales(L)["x"])
    for k, scale in _scales(L).items():
        with pytest.raises(AssertionError):
            assert_close_to_f64((res[k] * (1 + 1e-5)).float(), res[k].float(), res[k], name=k, scale=scale)


def test_scale_never_tightens_and_broadcasts():
    ref64 = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    actual = ref64 + 1.5 * EPS[F32] * ref64.abs().max()
    exact = ref64.float()  # the reference in the same dtype, as exact as it can be
    base = check_close_to_f64(actual, exact, ref64)
    assert base.ok
    for tiny in (0.0, 1e-9, torch.zeros(5, 4, dtype=F64), torch.zeros(4, dtype=F64)):
        v = check_close_to_f64(actual, exact, ref64, scale=tiny)
        assert v.ok and v.bound == base.bound
    far = ref64 + 10 * EPS[F32] * ref64.abs().max()
    assert not check_close_to_f64(far, exact, ref64).ok
    assert check_close_to_f64(far, exact, ref64, scale=10.0 * ref64.abs().max().item()).ok
    assert check_close_to_f64(far, exact, ref64, scale=torch.full((4,), 10.0 * ref64.abs().max().item())).ok


# ---------------------------------------------------------------------------------------------
# term_scales

CONFIGS = [{}, {"drop": True}, {"exact": True}, {"drop": True, "exact": True}]


def _run_config(L, cfg):
    kw = {"exact": cfg.get("exact", False)}
    if cfg.get("drop"):
        keep = torch.rand(L["x"].shape, generator=torch.Generator().manual_seed(3)) > 0.3
        kw.update(keep=keep, p=0.3)
    return _f64_results(L, **kw), _scales(L, **kw), kw


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(c) or "plain")
def test_term_scales_bound_every_result(cfg):
    """|result| <= Σ|terms| element by element, with the shapes of the results."""
    for seed, cancel in ((0, False), (1, True)):
        L = _layer(seed=seed, cancel=cancel)
        res, sc, _ = _run_config(L, cfg)
        assert sc.keys() == set(NAMES)
        for k in NAMES:
            assert sc[k].shape == res[k].shape and sc[k].dtype == F64, k
            assert (res[k].abs() <= sc[k] * (1 + 1e-9) + 1e-12).all(), k


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if not c.get("exact")], ids=lambda c: "-".join(c) or "plain")
def test_term_scales_are_the_result_when_nothing_cancels(cfg):
    """Every input >= 0 and g >= 1: every term is >= 0, so Σ|terms| is the result itself."""
    L = _layer(nonneg=True)
    res, sc, _ = _run_config(L, cfg)
    for k in NAMES:
        torch.testing.assert_close(sc[k], res[k], rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize("drop", [False, True], ids=["p0", "drop"])
def test_exact_norm_terms(drop):
    """Inputs >= 0: the exact norm gradient's extra terms in dA and dB are all <= 0 (c < 0), so
    they add to the scale exactly what they take from the gradient; x, m and bias are unchanged."""
    L = _layer(nonneg=True)
    det, sc_det, _ = _run_config(L, {"drop": drop})
    ex, sc_ex, _ = _run_config(L, {"drop": drop, "exact": True})
    for k in ("lora_A", "lora_B"):
        assert (ex[k] < det[k]).any(), k
        torch.testing.assert_close(sc_ex[k] - sc_det[k], det[k] - ex[k], rtol=1e-10, atol=1e-14, msg=k)
    for k in ("y", "x", "magnitude", "bias"):
        torch.testing.assert_close(sc_ex[k], sc_det[k], rtol=0, atol=0, msg=k)


def test_term_scales_zero_norm_row_and_leading_dims():
    """A row with n = 0 has g = 0 (the op's rule): finite scales, dm's and dB's row 0; x may
    carry leading dims."""
    L = _layer()
    L["weight"][2] = 0
    L["lora_B"][2] = 0
    L["x"], L["G"] = L["x"][:8].reshape(2, 4, -1), L["G"][:8].reshape(2, 4, -1)
    sc = _scales(L, exact=True)
    assert sc["y"].shape == (2, 4, 6) and sc["x"].shape == (2, 4, 8)
    assert all(torch.isfinite(t).all() for t in sc.values())
    assert sc["magnitude"][2] == 0 and torch.count_nonzero(sc["lora_B"][2]) == 0


# ---------------------------------------------------------------------------------------------
# the configuration that failed on an AMD EPYC (no AMX): dx cancels, and the CPU BLAS's
# rounding of its terms is larger than ulps of dx

AMD_DX = dict(dims=(1, 1), r=20, alpha=20, rslora=False, bias=False, dtypes="f32", lead=(2, 5), dropout=0.0,
              training=False, conv1d=False, save_output=False, seed=0)


@pytest.mark.parametrize("suite", ["torch_path", "kernels"])
def test_random_config_with_cancelling_dx(suite, device, monkeypatch):
    pytest.importorskip("peft")
    import test_fuse

    test = getattr(test_fuse, f"test_random_configs_match_peft_{suite}").hypothesis.inner_test
    kw = {"device": device} if "device" in inspect.signature(test).parameters else {}
    test(monkeypatch=monkeypatch, **kw, **AMD_DX)


# A configuration whose norm the torch path once took with addmm(W0, B, A): MKL on an AMD EPYC
# accumulated the rank terms into W0 and rounded each at W0's magnitude (2.5 ulps off the norm).
AMD_NORM = dict(dims=(1, 1), r=41, alpha=1, rslora=False, bias=True, dtypes="f32", lead=(7,), dropout=0.25,
                training=False, conv1d=False, save_output=True, seed=216)


@pytest.mark.parametrize("suite", ["torch_path", "kernels"])
def test_random_config_with_rank_terms_below_the_weight(suite, device, monkeypatch):
    pytest.importorskip("peft")
    import test_fuse

    test = getattr(test_fuse, f"test_random_configs_match_peft_{suite}").hypothesis.inner_test
    kw = {"device": device} if "device" in inspect.signature(test).parameters else {}
    test(monkeypatch=monkeypatch, **kw, **AMD_NORM)
