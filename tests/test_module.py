"""``dora_kernels.DoRALinear``: eval-mode norm caching, merge/unmerge, and state_dict
compatibility with ``reference.DoRALinear`` (PEFT's arithmetic)."""

from __future__ import annotations

import pytest
import torch

import dora_kernels
import reference
from tolerance import assert_close_to_f64, term_scales

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _perturb(layer, seed=0):
    """Move the adapter away from its init: B ≠ 0 and m ≠ ‖V‖ (so g ≠ 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        B = torch.randn(layer.lora_B.shape, generator=gen) * 0.1
        layer.lora_B.copy_(B.to(layer.lora_B))
        scale = 0.5 + torch.rand(layer.magnitude.shape, generator=gen)
        layer.magnitude.mul_(scale.to(layer.magnitude))
    return layer


def _layer(device, dtype="f32", adapter=None, *, bias=True, seed=0, cls=dora_kernels.DoRALinear, **kw):
    torch.manual_seed(seed)
    layer = cls(40, 24, r=4, alpha=8.0, bias=bias, device=device, dtype=DTYPES[dtype],
                adapter_dtype=DTYPES[adapter] if adapter else None, **kw)
    return _perturb(layer, seed)


def _uncached(layer, x):
    """The functional op on the layer's current weights, norm computed afresh (and handed to the op, so
    that the same forward kernel runs as with the cached norm: without one, a few tokens take the
    forward that makes the norm in its own pass, another rounding)."""
    norm = dora_kernels.weight_norm(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)[0]
    return dora_kernels.dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling,
                                    layer.bias, training=False, weight_norm=norm)


# ---------------------------------------------------------------------------------------------
# eval caching

@pytest.fixture
def norm_calls(monkeypatch):
    """Every norm computation, whether the module or the op makes it."""
    calls = []
    for mod in (dora_kernels.modules, dora_kernels.ops):
        real = mod.weight_norm

        def counting(*args, _real=real, **kwargs):
            calls.append(args[0].shape)
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, "weight_norm", counting)
    return calls


def test_eval_caches_norm_until_weights_change(device, norm_calls):
    layer = _layer(device).eval()
    x = torch.randn(5, 40, device=device)

    def forward():
        """The layer's output and how many norms that forward computed."""
        n = len(norm_calls)
        y = layer(x)
        return y, len(norm_calls) - n

    with torch.no_grad():
        y1, computed = forward()
        assert computed == 1, f"the first eval forward computed the norm {computed} times"
        y2, computed = forward()
        assert computed == 0, "the second eval forward recomputed the norm"
        torch.testing.assert_close(y2, y1, rtol=0, atol=0)
        torch.testing.assert_close(y1, _uncached(layer, x), rtol=0, atol=0)

        # An optimizer-style in-place step on lora_B (or lora_A, or the frozen weight)
        # invalidates the cache: the next forward recomputes, the one after reuses.
        for t in (layer.lora_B, layer.lora_A, layer.weight):
            t.add_(0.1 * torch.randn_like(t))
            y3, computed = forward()
            assert computed == 1, f"{tuple(t.shape)}: norm not recomputed after an in-place change"
            assert not torch.equal(y3, y1)
            torch.testing.assert_close(y3, _uncached(layer, x), rtol=0, atol=0)
            _, computed = forward()
            assert computed == 0

        # magnitude is not in the norm: changing it needs no recomputation, but is seen.
        layer.magnitude.mul_(1.5)
        y5, computed = forward()
        assert computed == 0
        torch.testing.assert_close(y5, _uncached(layer, x), rtol=0, atol=0)

    # train() drops the cache; back in eval the norm is computed once more, then reused.
    layer.train()
    layer(x)
    layer.eval()
    with torch.no_grad():
        y6, computed = forward()
        assert computed == 1
        _, computed = forward()
        assert computed == 0
        torch.testing.assert_close(y6, _uncached(layer, x), rtol=0, atol=0)


def test_eval_cache_follows_load_state_dict(device):
    layer = _layer(device).eval()
    other = _layer(device, seed=1)
    x = torch.randn(5, 40, device=device)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), _uncached(other, x), rtol=0, atol=0)


@pytest.mark.parametrize("optim", ["sgd", "adamw-foreach", "adamw-fused"])
def test_eval_mode_training_sees_optimizer_steps(device, optim):
    """Training with the layer in eval mode (dropout off): every forward must see the weights
    the last optimizer step wrote, whichever kind of step it was."""
    layer = _layer(device).eval()
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    if optim == "sgd":
        opt = torch.optim.SGD(params, lr=0.1)
    else:
        opt = torch.optim.AdamW(params, lr=0.05, foreach=optim == "adamw-foreach", fused=optim == "adamw-fused")
    x = torch.randn(5, 40, device=device)
    G = torch.randn(5, 24, device=device)
    for _ in range(2):
        y = layer(x)
        with torch.no_grad():
            torch.testing.assert_close(y, _uncached(layer, x), rtol=0, atol=0)
        opt.zero_grad()
        y.backward(G)
        opt.step()


# ---------------------------------------------------------------------------------------------
# merge / unmerge

@pytest.mark.parametrize("dtype, adapter, tol", [
    pytest.param("f32", None, 2e-6, id="f32"),
    pytest.param("bf16", None, 3e-2, id="bf16"),
    pytest.param("bf16", "f32", 3e-2, id="bf16-adf32"),
])
def test_merge_unmerge(device, dtype, adapter, tol):
    layer = _layer(device, dtype, adapter).eval()
    x = torch.randn(7, 40, device=device).to(DTYPES[dtype])
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        y_merged = layer(x)
        scale = y.abs().max().item()
        torch.testing.assert_close(y_merged.float(), y.float(), rtol=tol, atol=tol * scale)

        w_merged = layer.weight.detach().clone()
        layer.merge()  # a no-op
        torch.testing.assert_close(layer.weight, w_merged, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="merged"):
            layer.weight_norm()

        layer.unmerge()
        assert not layer.merged
        if dtype == "f32":
            err = (layer.weight - w0).abs().max().item()
            assert err <= 1e-6 * w0.abs().max().item(), f"unmerge restored W0 only to {err:.3e}"
        else:
            torch.testing.assert_close(layer.weight.float(), w0.float(), rtol=tol, atol=tol * w0.abs().max().item())
        w_unmerged = layer.weight.detach().clone()
        layer.unmerge()  # a no-op
        torch.testing.assert_close(layer.weight, w_unmerged, rtol=0, atol=0)
        y_back = layer(x)
        torch.testing.assert_close(y_back.float(), y.float(), rtol=tol, atol=tol * scale)


# ---------------------------------------------------------------------------------------------
# state_dict compatibility with the reference (PEFT's arithmetic)

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_r", "rslora"])
def test_state_dict_round_trip_with_reference(device, bias, use_rslora):
    ours = _layer(device, bias=bias, use_rslora=use_rslora, seed=0)
    ref = _layer(device, bias=bias, use_rslora=use_rslora, seed=1, cls=reference.DoRALinear)
    assert ours.state_dict().keys() == ref.state_dict().keys()

    ours_from_ref = _layer(device, bias=bias, use_rslora=use_rslora, seed=2)
    ours_from_ref.load_state_dict(ref.state_dict())
    ref_from_ours = _layer(device, bias=bias, use_rslora=use_rslora, seed=3, cls=reference.DoRALinear)
    ref_from_ours.load_state_dict(ours.state_dict())

    x = torch.randn(2, 3, 40, device=device)
    G = torch.randn(2, 3, 24, device=device)
    for mine, theirs in ((ours, ref_from_ours), (ours_from_ref, ref)):
        _module_parity(mine, theirs, x, G)


def _module_parity(mine, theirs, x, G):
    """Forward and the adapters' and x's gradients of ``mine`` against ``theirs`` (a
    reference.DoRALinear with the same state) in fp32 and in float64."""
    theirs64 = reference.DoRALinear(theirs.in_features, theirs.out_features, theirs.r, theirs.alpha,
                                    bias=theirs.bias is not None, use_rslora=theirs.use_rslora,
                                    device=x.device, dtype=torch.float64)
    theirs64.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    results = []
    for layer, dtype in ((mine, x.dtype), (theirs, x.dtype), (theirs64, torch.float64)):
        layer.zero_grad()
        xi = x.detach().to(dtype).requires_grad_()
        y = layer(xi)
        y.backward(G.to(dtype))
        results.append({"y": y.detach(), "x": xi.grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad,
                        "magnitude": layer.magnitude.grad})
    t = theirs64
    scales = term_scales(x.double(), t.weight, t.lora_A, t.lora_B, t.magnitude, t.scaling, t.bias, G.double())
    for k in results[0]:
        assert_close_to_f64(results[0][k], results[1][k], results[2][k], name=k, scale=scales[k])


def test_from_linear_matches_reference(device):
    lin = torch.nn.Linear(40, 24, device=device)
    torch.manual_seed(5)
    ours = dora_kernels.DoRALinear.from_linear(lin, r=4, alpha=8.0)
    torch.manual_seed(5)
    ref = reference.DoRALinear.from_linear(lin, r=4, alpha=8.0)
    assert ours.weight.data_ptr() == lin.weight.data_ptr(), "from_linear copied the weight"
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert sd_ours.keys() == sd_ref.keys()
    for k in sd_ours:
        torch.testing.assert_close(sd_ours[k], sd_ref[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    _perturb(ours)
    _perturb(ref)
    _module_parity(ours, ref, torch.randn(6, 40, device=device), torch.randn(6, 24, device=device))


@pytest.mark.parametrize("kwargs, name", [
    pytest.param({"r": 0}, "r", id="r0"),
    pytest.param({"dropout": 1.0}, "dropout", id="dropout1"),
    pytest.param({"norm_grad": "bogus"}, "norm_grad", id="norm_grad"),
    pytest.param({"save_output": "no"}, "save_output", id="save_output"),
])
def test_constructor_rejects_bad_arguments(kwargs, name):
    args = {"r": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        dora_kernels.DoRALinear(8, 4, **args)


def test_inplace_op_on_output_raises_with_a_hint_by_default():
    # Without dropout and bias the op saves its output for the backward (u = y/g): an in-place
    # op on it afterwards is caught by autograd, and the error names the way out.
    layer = dora_kernels.DoRALinear(8, 5, r=3, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="save_output=False"):
        layer(x).relu_().sum().backward()
    # With a bias it saves u: the output is free.
    layer = dora_kernels.DoRALinear(8, 5, r=3, bias=True)
    layer(x).relu_().sum().backward()
    assert x.grad is not None and layer.magnitude.grad is not None


def test_inplace_op_on_output_keeps_gradients_with_save_output_false():
    # save_output=False saves u instead: an in-place op downstream (ReLU(inplace=True)) is fine.
    torch.manual_seed(3)
    layer = dora_kernels.DoRALinear(8, 5, r=3, bias=False, save_output=False)
    assert not layer.save_output
    with torch.no_grad():
        layer.lora_B.normal_()
    ref = reference.DoRALinear(8, 5, r=3, bias=False)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 8)
    grads = []
    for mod in (layer, ref):
        xi = x.clone().requires_grad_()
        mod(xi).relu_().sum().backward()
        grads.append([xi.grad, mod.lora_A.grad, mod.lora_B.grad, mod.magnitude.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
