"""``dora_kernels.fuse``: a fused PEFT (or reference) model computes what PEFT computes.

Every parity case runs the fused model, an unfused deep copy in the same dtypes and an unfused
float64 copy, and holds the output, ``dx`` and every adapter gradient to the shared rule of
``tolerance.assert_close_to_f64``. Dropout cases share the mask: the fused op is handed fixed
seeds and PEFT's dropout modules are replaced by modules applying the masks those seeds make.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import pickle
import warnings

import pytest
import torch
import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dora_kernels
import reference
from dora_kernels import ops
from dora_kernels.testing import DEVICE
from tolerance import assert_close_to_f64, peft_term_scales

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from peft.tuners.lora.variants import DoraLinearVariant  # noqa: E402

FUSE = importlib.import_module("dora_kernels.fuse")  # the module (dora_kernels.fuse is the function)
IN, HID, OUT, R = 16, 24, 12, 4
LIN0, LIN1 = "base_model.model.lin0", "base_model.model.lin1"


# ---------------------------------------------------------------------------------------------
# models and helpers

class Tiny(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(IN, HID, bias=bias)
        self.lin1 = nn.Linear(HID, OUT, bias=bias)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def perturb_magnitudes(model, seed=1):
    """PEFT starts with m = ‖W0 + s·B·A‖ (g = 1); move m so that g ≠ 1 is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen).to(p))


def dora_config(targets=("lin0", "lin1"), dropout=0.0, **kw):
    kw.setdefault("init_lora_weights", False)
    return LoraConfig(r=R, lora_alpha=8, target_modules=list(targets), use_dora=True, lora_dropout=dropout, **kw)


def tiny_peft(*, bias=True, dtype=torch.float32, device=DEVICE, dropout=0.0, **cfg):
    torch.manual_seed(0)
    model = get_peft_model(Tiny(bias=bias).to(device=device, dtype=dtype), dora_config(dropout=dropout, **cfg))
    perturb_magnitudes(model)
    return model


class FixedMask(nn.Module):
    """PEFT's dropout with a given keep-mask (the one a seed handed to the fused op makes)."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * (self.mask.to(x.dtype) * (1.0 / (1.0 - self.p)))


def share_masks(monkeypatch, layers, refs, p, device, adapter="default"):
    """Make the fused op draw seed 1000 + i for the i-th of ``layers`` ((name, input shape) in
    call order, every forward) and give the same layers of ``refs`` PEFT dropout modules that
    apply the masks those seeds make."""
    seeds = itertools.cycle([1000 + i for i in range(len(layers))])
    monkeypatch.setattr(ops, "draw_seed", lambda: torch.tensor([next(seeds)]))
    for i, (name, shape) in enumerate(layers):
        mask = dora_kernels.dropout_mask(1000 + i, shape, p, device)
        for ref in refs:
            ref.get_submodule(name).lora_dropout[adapter] = FixedMask(mask, p)


def run(model, x, grad_out):
    """Output, dL/dx and the gradients of every trainable parameter for L = Σ y ⊙ grad_out."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    model.zero_grad(set_to_none=True)
    y = model(x)
    y = y.logits if hasattr(y, "logits") else y
    y.backward(grad_out.to(y))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def assert_matches_peft(fused, ref, ref64, x, *, k=3.0, ulp_dtypes=None, layer=None, reject_broken_reference=False):
    """fused vs unfused PEFT (same dtypes) vs unfused PEFT in float64: output, dx, grads.
    ``ulp_dtypes``: parameter name -> the dtype whose ulps its gradient may carry (else its own).
    ``layer``: the name of the model's one DoRA layer when it maps the model's input straight to
    its output; the ulps are then taken of the magnitudes of the terms each result sums.
    ``reject_broken_reference`` (hypothesis draws): a draw where PEFT's own same-dtype numbers are
    not finite while float64's are (its 16-bit norm of a row rounds to 0) has no reference error
    to judge by, and is rejected."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = ref(x)
    out = out.logits if hasattr(out, "logits") else out
    grad_out = torch.randn(out.shape, generator=gen).to(out.device)
    y, dx, grads = run(fused, x, grad_out)
    y_ref, dx_ref, grads_ref = run(ref, x, grad_out)
    y64, dx64, grads64 = run(ref64, x.double() if x.is_floating_point() else x, grad_out.double())
    if reject_broken_reference:
        pairs = [(y_ref, y64), (dx_ref, dx64)] + [(grads_ref[n], grads64[n]) for n in grads_ref]
        if any(a is not None and not bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()) for a, b in pairs):
            hypothesis.reject()
    scales = {}
    if layer is not None:
        sc = peft_term_scales(ref64.get_submodule(layer), x.double(), grad_out.double())
        scales = {"output": sc["y"], "dx": sc["x"], f"{layer}.lora_A.default.weight": sc["lora_A"],
                  f"{layer}.lora_B.default.weight": sc["lora_B"],
                  f"{layer}.lora_magnitude_vector.default.weight": sc["magnitude"]}
    assert y.dtype == y_ref.dtype
    assert_close_to_f64(y, y_ref, y64, name="output", k=k, scale=scales.get("output"))
    if dx_ref is not None:
        assert dx.dtype == dx_ref.dtype
        assert_close_to_f64(dx, dx_ref, dx64, name="dx", k=k, scale=scales.get("dx"))
    assert grads and grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert g is not None and g.dtype == grads_ref[name].dtype, name
        assert_close_to_f64(g, grads_ref[name], grads64[name], name=name, k=k,
                            dtype=(ulp_dtypes or {}).get(name), scale=scales.get(name))


def copies(model):
    """An unfused copy in the same dtypes and one in float64."""
    return copy.deepcopy(model), copy.deepcopy(model).double()


class OpLog(TorchDispatchMode):
    """The ops that reach the dispatcher (a custom op shows as one entry)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def count_fused_calls(monkeypatch):
    """A list that gets one entry per call of the fused op from a fused PEFT layer."""
    calls = []
    real = ops.dora_linear

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(FUSE, "dora_linear", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# parity with PEFT

@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16base-f32adapters"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_peft(bias, dtype, dropout, backend, monkeypatch):
    model = tiny_peft(bias=bias, dtype=dtype, dropout=dropout, device=backend)
    if dtype == torch.bfloat16:  # PEFT's default autocast_adapter_dtype keeps the adapters in fp32
        assert model.base_model.model.lin0.lora_A["default"].weight.dtype == torch.float32
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    x = torch.randn(3, 5, IN, dtype=dtype, device=backend)
    if dropout:
        share_masks(monkeypatch, [(LIN0, (3, 5, IN)), (LIN1, (3, 5, HID))], [ref, ref64], dropout, backend)
    calls = count_fused_calls(monkeypatch)
    assert_matches_peft(model, ref, ref64, x)
    assert len(calls) == 2


def test_bf16_adapters_match_peft(backend):
    """autocast_adapter_dtype=False keeps the adapters bf16 (PEFT then computes DoRA in bf16;
    the op keeps the norm and its accumulations in fp32)."""
    torch.manual_seed(0)
    base = Tiny().to(device=backend, dtype=torch.bfloat16)
    model = get_peft_model(base, dora_config(), autocast_adapter_dtype=False)
    perturb_magnitudes(model)
    assert model.base_model.model.lin0.lora_A["default"].weight.dtype == torch.bfloat16
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    x = torch.randn(3, 5, IN, dtype=torch.bfloat16, device=backend)
    assert_matches_peft(model, ref, ref64, x)


def test_eval_mode_ignores_dropout(backend):
    model = tiny_peft(dropout=0.3, device=backend)
    ref, ref64 = copies(model)
    for m in (model, ref, ref64):
        m.eval()
    dora_kernels.fuse(model)
    assert not model.base_model.model.lin0.training
    assert_matches_peft(model, ref, ref64, torch.randn(7, IN, device=backend))


def test_one_fused_call_per_layer():
    """The fast path: one op call yields the whole output, no separate base-layer GEMM."""
    model = dora_kernels.fuse(tiny_peft())
    x = torch.randn(4, IN, device=DEVICE)
    with torch.no_grad(), OpLog() as log:
        model(x)
    assert sum("dora_kernels.dora_forward" in op for op in log.ops) == 2
    assert not [op for op in log.ops if any(k in op for k in ("mm", "linear", "matmul", "addmm"))], log.ops


def test_rslora_and_rank_above_features():
    """rsLoRA scaling; r larger than in and out (PEFT's own tests use r = 8 on 5 -> 1)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 1)).to(DEVICE)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=3, target_modules=["0"], use_dora=True, use_rslora=True,
                                            init_lora_weights=False))
    perturb_magnitudes(model)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == ["base_model.model.0"]
    assert_matches_peft(model, ref, ref64, torch.randn(6, 5, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# several adapters, disabled, merged, adapter_names

def _three_adapters(dropout_second=0.0):
    model = tiny_peft()
    torch.manual_seed(1)
    model.add_adapter("second", dora_config(dropout=dropout_second))
    model.add_adapter("plain", LoraConfig(r=R, lora_alpha=8, target_modules=["lin0", "lin1"],
                                          init_lora_weights=False))
    perturb_magnitudes(model, seed=2)
    return model


@pytest.mark.parametrize("active", [["default", "second"], ["second", "default"], ["default", "plain"],
                                    ["plain", "default"], ["default", "plain", "second"]],
                         ids=lambda a: "+".join(a))
def test_several_active_adapters(active, monkeypatch):
    """PEFT hands each DoRA adapter the running result (earlier deltas included): same numbers.
    A DoRA adapter first runs the fused op, the others PEFT's arithmetic on its result."""
    model = _three_adapters()
    model.base_model.set_adapter(active)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    assert model.base_model.model.lin0.active_adapters == active
    calls = count_fused_calls(monkeypatch)
    assert_matches_peft(model, ref, ref64, torch.randn(3, 4, IN, device=DEVICE))
    assert len(calls) == (2 if active[0] != "plain" else 0)


def test_several_active_adapters_with_dropout_recompute_the_base():
    """With dropout, a later DoRA adapter recomputes its base from x̃ (PEFT's path, its RNG)."""
    model = _three_adapters(dropout_second=0.25)
    model.base_model.set_adapter(["default", "second"])
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    x = torch.randn(3, 4, IN, device=DEVICE)
    grad_out = torch.randn(3, 4, OUT, device=DEVICE)
    outs = []
    for m in (model, ref):
        torch.manual_seed(7)
        outs.append(run(m, x, grad_out))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = outs
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_disable_adapter():
    model = tiny_peft()
    base = copy.deepcopy(model.base_model.model)
    for name in ("lin0", "lin1"):
        setattr(base, name, getattr(base, name).base_layer)
    dora_kernels.fuse(model)
    x = torch.randn(5, IN, device=DEVICE)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    assert not torch.allclose(model(x), base(x))


def test_adapter_names_with_dora_raises_as_peft():
    model = dora_kernels.fuse(tiny_peft()).eval()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        model(torch.randn(2, IN, device=DEVICE), adapter_names=["default", "default"])


@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
def test_merge_unmerge_and_unload(safe_merge):
    model = tiny_peft()
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    x = torch.randn(5, IN, device=DEVICE)
    with torch.no_grad():
        y_unmerged = model(x)
        for m in (model, ref):
            m.merge_adapter(safe_merge=safe_merge)
        assert model.base_model.model.lin0.merged
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)  # PEFT's own merged path
        torch.testing.assert_close(model(x), y_unmerged, rtol=1e-4, atol=1e-5)
        for m in (model, ref):
            m.unmerge_adapter()
        torch.testing.assert_close(model(x), y_unmerged, rtol=1e-4, atol=1e-5)
        merged = model.merge_and_unload(safe_merge=safe_merge)
        assert type(merged.lin0) is nn.Linear and type(merged.lin1) is nn.Linear
        torch.testing.assert_close(merged(x), ref.merge_and_unload(safe_merge=safe_merge)(x), rtol=0, atol=0)
        torch.testing.assert_close(merged(x), y_unmerged, rtol=1e-4, atol=1e-5)


def test_merge_several_dora_adapters():
    """PEFT merges several DoRA adapters each on the unmerged weight; unmerging restores W0."""
    model = _three_adapters()
    model.base_model.set_adapter(["default", "second"])
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    x = torch.randn(5, IN, device=DEVICE)
    w0 = model.base_model.model.lin0.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = model(x)
        model.merge_adapter()
        ref.merge_adapter()
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model.base_model.model.lin0.base_layer.weight, w0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# PEFT's bookkeeping stays PEFT's

def test_state_dict_and_parameters_untouched():
    model = tiny_peft()
    before = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters())
    dora_kernels.fuse(model)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)
    assert all(p is params[n] for n, p in model.named_parameters())
    layer = model.base_model.model.lin0
    assert isinstance(layer, lora_layer.Linear) and type(layer) is not lora_layer.Linear
    assert type(layer.lora_variant["default"]) is DoraLinearVariant
    assert repr(layer).startswith("lora.Linear(")


def test_save_pretrained_identical_files_and_reload(tmp_path):
    model = tiny_peft()
    model.save_pretrained(tmp_path / "plain")
    dora_kernels.fuse(model)
    model.save_pretrained(tmp_path / "fused")
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "fused").iterdir()) and "adapter_model.safetensors" in files
    for name in files:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "fused" / name).read_bytes(), name

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Tiny().to(DEVICE), tmp_path / "fused", is_trainable=True)
    ref, ref64 = copies(loaded)
    dora_kernels.fuse(loaded)
    assert dora_kernels.fused_layers(loaded) == [LIN0, LIN1]
    assert_matches_peft(loaded, ref, ref64, torch.randn(4, IN, device=DEVICE))


def test_fuse_is_idempotent_and_picks_up_new_adapters(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(Tiny().to(DEVICE), dora_config(targets=("lin0",)))
    assert dora_kernels.fuse(model) is model
    cls = type(model.base_model.model.lin0)
    dora_kernels.fuse(model)
    assert type(model.base_model.model.lin0) is cls and cls.__bases__ == (lora_layer.Linear,)
    assert dora_kernels.fused_layers(model) == [LIN0]

    model.add_adapter("more", dora_config(targets=("lin1",)))  # a new layer
    assert dora_kernels.fuse_report(model).skipped == {LIN1: "peft lora.Linear not fused yet: call fuse(model)"}
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == [LIN0, LIN1]
    assert type(model.base_model.model.lin1) is cls

    other = get_peft_model(Tiny().to(DEVICE), dora_config(targets=("lin0", "lin1"), init_lora_weights=False))
    other.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="loaded")
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == [LIN0, LIN1]
    model.base_model.set_adapter("loaded")
    ref = copy.deepcopy(model)
    dora_kernels.unfuse(ref)
    x = torch.randn(3, IN, device=DEVICE)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


def test_fuse_on_a_model_without_dora_is_a_no_op():
    torch.manual_seed(0)
    plain = Tiny()
    lora = get_peft_model(Tiny(), LoraConfig(r=R, target_modules=["lin0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dora_kernels.fuse(plain) is plain
        dora_kernels.fuse(lora)
    assert dora_kernels.fused_layers(lora) == [] and type(lora.base_model.model.lin0) is lora_layer.Linear


def test_meta_device_at_fuse_time():
    """PEFT's low_cpu_mem_usage: adapters on the meta device when fuse runs, loaded after."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    src = tiny_peft()
    sd = get_peft_model_state_dict(src)
    torch.manual_seed(0)
    model = get_peft_model(Tiny().to(DEVICE), dora_config(), low_cpu_mem_usage=True)
    assert model.base_model.model.lin0.lora_A["default"].weight.device.type == "meta"
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == [LIN0, LIN1]
    set_peft_model_state_dict(model, sd, low_cpu_mem_usage=True)
    assert all(p.device.type != "meta" for p in model.parameters())
    ref, ref64 = copies(src)
    assert_matches_peft(model, ref, ref64, torch.randn(4, IN, device=DEVICE))


def test_unfuse_restores_classes():
    model = tiny_peft()
    dora_kernels.fuse(model)
    assert dora_kernels.unfuse(model) is model
    assert type(model.base_model.model.lin0) is lora_layer.Linear
    assert type(model.base_model.model.lin1) is lora_layer.Linear
    assert dora_kernels.fused_layers(model) == []


def test_pickle_round_trip():
    model = dora_kernels.fuse(tiny_peft())
    again = pickle.loads(pickle.dumps(model))
    assert type(again.base_model.model.lin0) is type(model.base_model.model.lin0)
    x = torch.randn(3, IN, device=DEVICE)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# GPT-2 (fan_in_fan_out Conv1D), layers left alone

def test_gpt2_fan_in_fan_out(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0)
    base = transformers.GPT2LMHeadModel(cfg).to(DEVICE)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = get_peft_model(base, LoraConfig(r=R, lora_alpha=8, target_modules=["c_attn"], use_dora=True,
                                                init_lora_weights=False))
    perturb_magnitudes(model)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and dora_kernels.fused_layers(model) == ["base_model.model.transformer.h.0.attn.c_attn"]

    seen = []
    real = ops.dora_linear

    def spy(x, weight, *args, **kwargs):
        seen.append(weight)
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(FUSE, "dora_linear", spy)
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    assert_matches_peft(model, ref, ref64, ids)
    w = layer.base_layer.weight
    assert seen and all(s.data_ptr() == w.data_ptr() and s.shape == w.T.shape and s.stride() == w.T.stride()
                        for s in seen)


@pytest.mark.parametrize("kind", ["two_dora_adapters", "gpt2_conv1d"])
def test_peft_dora_caching_matches_peft(kind):
    """DoraCaching with two active DoRA adapters (the second runs PEFT's arithmetic and cache)
    and on GPT-2's fan_in_fan_out Conv1D: the cached fused outputs equal PEFT's cached ones."""
    from peft.helpers import DoraCaching

    if kind == "two_dora_adapters":
        model = _three_adapters()
        model.base_model.set_adapter(["default", "second"])
        x = torch.randn(3, 4, IN, device=DEVICE)
    else:
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
        with pytest.warns(UserWarning, match="fan_in_fan_out"):
            model = get_peft_model(transformers.GPT2LMHeadModel(cfg).to(DEVICE),
                                   LoraConfig(r=R, lora_alpha=8, target_modules=["c_attn"], use_dora=True,
                                              init_lora_weights=False))
        perturb_magnitudes(model)
        x = torch.randint(0, 64, (2, 7), device=DEVICE)
    ref = copy.deepcopy(model).eval()
    model = dora_kernels.fuse(model).eval()
    assert dora_kernels.fused_layers(model)

    def out(m):
        y = m(x)
        return y.logits if hasattr(y, "logits") else y

    try:
        with DoraCaching():
            want, got, again = out(ref), out(model), out(model)
            assert any(k.startswith("dora_kernels") for m in model.modules() for k in getattr(m, "_dora_cache", {}))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, got, rtol=0, atol=0)
    finally:
        DoraCaching()(enabled=False)


class Mixed(nn.Module):
    """DoRA on an Embedding, a Conv2d, a fake-quantised linear and a plain Linear."""

    class QuantLinear(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, self.weight.to(torch.bfloat16).to(x.dtype), self.bias)

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, IN)
        self.conv = nn.Conv2d(2, 4, 3)
        self.quant = self.QuantLinear(IN, IN)
        self.lin = nn.Linear(IN, OUT)

    def forward(self, ids, img):
        return self.lin(self.quant(self.emb(ids))).sum() + self.conv(img).sum()


def test_unservable_layers_left_on_peft_path_and_reported():
    torch.manual_seed(0)
    model = get_peft_model(Mixed().to(DEVICE), dora_config(targets=("emb", "conv", "quant", "lin")))
    perturb_magnitudes(model)
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="left 1 DoRA layer") as w:
        dora_kernels.fuse(model)
    msg = str(w[0].message)
    assert "base_model.model.quant" in msg and "QuantLinear" in msg and "base_model.model.emb" not in msg
    report = dora_kernels.fuse_report(model)
    assert report.fused == ["base_model.model.emb", "base_model.model.conv", "base_model.model.lin"]
    assert set(report.skipped) == {"base_model.model.quant"}
    ids = torch.randint(0, 20, (2, 3), device=DEVICE)
    img = torch.randn(1, 2, 5, 5, device=DEVICE)
    torch.testing.assert_close(model(ids, img), ref(ids, img), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# reference.DoRALinear

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_layers(training):
    torch.manual_seed(0)
    model = nn.Sequential(reference.DoRALinear(IN, HID, dropout=0.2), nn.ReLU(),
                          reference.DoRALinear(HID, OUT, bias=False)).to(DEVICE)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
            layer.magnitude.mul_(1.1)
    model.train(training)
    params = list(model.parameters())
    ref = copy.deepcopy(model)
    assert dora_kernels.fuse(model) is model
    assert all(type(layer) is dora_kernels.DoRALinear for layer in (model[0], model[2]))
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model[0].training == training and model[0].dropout_p == 0.2 and model[0].scaling == ref[0].scaling
    assert dora_kernels.fused_layers(model) == ["0", "2"]

    x = torch.randn(6, IN, device=DEVICE)
    y = model[0](x, dropout_seed=3)
    mask = dora_kernels.dropout_mask(3, x.shape, 0.2, DEVICE)
    torch.testing.assert_close(y, ref[0](x, dropout_mask=mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[2](x.new_ones(2, HID)), ref[2](x.new_ones(2, HID)), rtol=1e-5, atol=1e-5)

    dora_kernels.unfuse(model)
    assert all(type(layer) is reference.DoRALinear for layer in (model[0], model[2]))
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert not hasattr(model[0], "norm_grad") and model[0].training == training


def test_reference_layer_as_the_model():
    layer = reference.DoRALinear(IN, OUT).to(DEVICE)
    assert dora_kernels.fuse(layer) is layer and type(layer) is dora_kernels.DoRALinear
    assert dora_kernels.fused_layers(layer) == [""]


# ---------------------------------------------------------------------------------------------
# PEFT's own DoRA behaviours, on a fused model

def test_dora_identity_init_matches_base():
    """init_lora_weights=True: B = 0 and m = ‖W0‖, so the output is the base model's."""
    torch.manual_seed(0)
    base = Tiny().to(DEVICE)
    expected = base(torch.ones(2, IN, device=DEVICE)).detach()
    model = dora_kernels.fuse(get_peft_model(base, dora_config(init_lora_weights=True)))
    torch.testing.assert_close(model(torch.ones(2, IN, device=DEVICE)), expected, rtol=1e-5, atol=1e-6)


def test_dora_only_adapter_params_train_and_all_get_grads():
    model = dora_kernels.fuse(tiny_peft())
    model(torch.randn(3, IN, device=DEVICE)).sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_dora_training_steps_match_peft():
    """A few optimiser steps: the fused model follows PEFT's trajectory."""
    model = tiny_peft()
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    torch.manual_seed(3)
    data = [(torch.randn(8, IN, device=DEVICE), torch.randn(8, OUT, device=DEVICE)) for _ in range(4)]
    losses = []
    for m in (model, ref):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for x, t in data:
            loss = nn.functional.mse_loss(m(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses.append(curve)
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-6)


def test_dora_inference_mode_no_grad():
    model = dora_kernels.fuse(tiny_peft())
    model.eval()
    ref = copy.deepcopy(model)
    dora_kernels.unfuse(ref)
    x = torch.randn(3, IN, device=DEVICE)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


def test_unfrozen_base_weight_takes_peft_path():
    """A trainable base weight needs PEFT's path (the op gives no W0 gradient)."""
    model = dora_kernels.fuse(tiny_peft())
    w = model.base_model.model.lin0.base_layer.weight
    w.requires_grad_(True)
    model(torch.randn(3, IN, device=DEVICE)).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_peft_dora_caching_is_honoured(monkeypatch):
    """``peft.helpers.DoraCaching`` in eval: the fused op's norm goes into PEFT's DoRA cache on the
    first call and is reused; an uncached call clears the caches, as PEFT's does; train mode
    stays uncached. Outputs equal PEFT's throughout."""
    from peft.helpers import DoraCaching

    calls = count_fused_calls(monkeypatch)
    given = []  # the weight_norm each fused call received
    counting = FUSE.dora_linear
    monkeypatch.setattr(FUSE, "dora_linear", lambda *a, **k: given.append(k.get("weight_norm")) or counting(*a, **k))
    norms = []
    real_norm = FUSE.weight_norm
    monkeypatch.setattr(FUSE, "weight_norm", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    model = dora_kernels.fuse(tiny_peft()).eval()
    ref = dora_kernels.unfuse(copy.deepcopy(model))
    caches = [model.get_submodule(n).lora_magnitude_vector["default"]._dora_cache for n in (LIN0, LIN1)]
    x = torch.randn(3, IN, device=DEVICE)
    expected = ref(x)
    try:
        with DoraCaching():
            y = model(x)
            assert len(calls) == 2 and len(norms) == 2 and all(caches)
            y2 = model(x)
            assert len(calls) == 4 and len(norms) == 2  # the cached norms, not new ones
            cached = [next(iter(c.values())) for c in caches]
            assert all(n is not None for n in given) and [id(n) for n in given] == [id(n) for n in cached] * 2
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y2, y, rtol=0, atol=0)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        assert len(calls) == 6 and len(norms) == 2 and not any(caches) and given[-2:] == [None, None]
        model.train()
        with DoraCaching():
            model(x)
            assert len(calls) == 8 and len(norms) == 2 and not any(caches)
    finally:
        DoraCaching()(enabled=False)


# ---------------------------------------------------------------------------------------------
# save_output: models that modify a DoRA layer's output in place

class InplaceTiny(Tiny):
    def forward(self, x):
        return self.lin1(self.lin0(x).relu_())


@pytest.mark.parametrize("kind", ["peft", "reference"])
def test_fuse_save_output_false_for_inplace_models(kind):
    """A model that runs relu_ on a DoRA layer's output: fused with the default the backward
    raises naming save_output; fuse(model, save_output=False) matches PEFT; unfuse clears it."""
    torch.manual_seed(0)
    if kind == "peft":
        ref = get_peft_model(InplaceTiny(bias=False).to(DEVICE), dora_config())  # with a bias u is saved
        perturb_magnitudes(ref)
        layers = [LIN0, LIN1]
    else:
        ref = nn.Sequential(reference.DoRALinear(IN, HID, bias=False), nn.ReLU(inplace=True),
                            reference.DoRALinear(HID, OUT, bias=False))
        ref = ref.to(DEVICE)
        with torch.no_grad():
            for m in (ref[0], ref[2]):
                m.lora_B.normal_()
        layers = ["0", "2"]
    model = copy.deepcopy(ref)
    x = torch.randn(6, IN, device=DEVICE)
    grad_out = torch.randn(6, OUT, device=DEVICE)
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == layers
    with pytest.raises(RuntimeError, match="save_output=False"):
        run(model, x, grad_out)
    model.zero_grad(set_to_none=True)
    dora_kernels.fuse(model, save_output=False)  # on a fused model: sets the switch on every fused layer
    y, dx, grads = run(model, x, grad_out)
    y_ref, dx_ref, grads_ref = run(ref, x, grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    dora_kernels.unfuse(model)
    assert not any("_dora_kernels_save_output" in vars(m) or "save_output" in vars(m) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# configurations no other test names: random PEFT configs, fused against PEFT

class Proj(nn.Module):
    """One projection: nn.Linear, or GPT-2's Conv1D (weight kept as (in, out), always a bias).

    One layer, so that the fused layer, PEFT's and PEFT's float64 all get the same input and
    the same output gradient: behind a second layer, the fused output's last-bit differences
    would reach this layer's gradients through that layer's backward, where a reduction that
    cancels can make them as large as the values, for PEFT's own bf16 layer too. Two layers
    are tested with fixed shapes above."""

    def __init__(self, i, o, bias, conv1d):
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D
            self.lin0 = Conv1D(o, i)
            with torch.no_grad():  # Conv1D starts with a zero bias
                self.lin0.bias.normal_()
        else:
            self.lin0 = nn.Linear(i, o, bias=bias)

    def forward(self, x):
        return self.lin0(x)


_DTYPE_PAIRS = {  # base dtype, PEFT's autocast_adapter_dtype
    "f32": (torch.float32, True), "bf16+f32": (torch.bfloat16, True), "f16+f32": (torch.float16, True),
    "bf16": (torch.bfloat16, False), "f16": (torch.float16, False),
}


def check_random_config(backend, monkeypatch, *, dims, r, alpha, rslora, bias, dtypes, lead, dropout, training,
                        conv1d, save_output, seed):
    i, o = dims
    dtype, autocast_adapters = _DTYPE_PAIRS[dtypes]
    torch.manual_seed(seed)
    base = Proj(i, o, bias, conv1d).to(device=backend, dtype=dtype)
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["lin0"], use_dora=True,
                     lora_dropout=dropout, init_lora_weights=False, fan_in_fan_out=conv1d)
    model = get_peft_model(base, cfg, autocast_adapter_dtype=autocast_adapters)
    perturb_magnitudes(model, seed=seed + 1)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model, save_output=save_output)
    assert dora_kernels.fused_layers(model) == [LIN0]
    for m in (model, ref, ref64):
        m.train(training)
    x = torch.randn(*lead, i, generator=torch.Generator().manual_seed(seed)).to(device=backend, dtype=dtype)
    if dropout and training:
        share_masks(monkeypatch, [(LIN0, (*lead, i))], [ref, ref64], dropout, backend)
    # Without dropout the op reads dm's u back from a tensor in x's dtype (its output y, or u),
    # where PEFT reads x·W0ᵀ + bias (rounded the same way): the same size of error, but not the
    # same errors, so on a few tokens k alone does not bound the ratio; dm gets ulps of x's dtype
    # (as in test_ops.check_parity).
    via_y = {} if dropout and training else {f"{LIN0}.lora_magnitude_vector.default.weight": dtype}
    calls = count_fused_calls(monkeypatch)
    assert_matches_peft(model, ref, ref64, x, ulp_dtypes=via_y, layer=LIN0, reject_broken_reference=True)
    assert len(calls) == 1


_config = dict(
    dims=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    r=st.integers(1, 48), alpha=st.integers(1, 64), rslora=st.booleans(), bias=st.booleans(),
    dtypes=st.sampled_from(sorted(_DTYPE_PAIRS)), lead=st.sampled_from([(0,), (1,), (7,), (2, 5), (3, 1, 4)]),
    dropout=st.sampled_from([0.0, 0.25]), training=st.booleans(),
    conv1d=st.booleans() if importlib.util.find_spec("transformers") else st.just(False),
    save_output=st.booleans(), seed=st.integers(0, 2**16),
)
_settings = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=200, **_settings)
@given(**_config)
def test_random_configs_match_peft_torch_path(monkeypatch, **kw):
    """The torch path on 200 random PEFT DoRA configurations."""
    with dora_kernels.use_backend("torch"):
        check_random_config(DEVICE, monkeypatch, **kw)


@settings(max_examples=40, **_settings)
@given(**_config)
def test_random_configs_match_peft_kernels(device, monkeypatch, **kw):
    """The Triton kernels (interpreted on a CPU) on 40 random PEFT DoRA configurations."""
    check_random_config(device, monkeypatch, **kw)


def test_later_adapter_adding_in_place_to_the_result():
    """PEFT's BD-LoRA adds to the running result in place: a DoRA adapter before it must not
    have saved that result for its backward."""
    from peft.tuners.lora.config import BdLoraConfig as bd  # peft >= 0.19 (the test extra's floor)

    torch.manual_seed(0)
    model = get_peft_model(Tiny(bias=False).to(DEVICE), dora_config(), adapter_name="dora")
    model.add_adapter("bd", LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False,
                                      use_bdlora=bd(target_modules_bd_b=["lin0", "lin1"], nblocks=2)))
    model.base_model.set_adapter(["dora", "bd"])
    perturb_magnitudes(model)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == [LIN0, LIN1]
    assert_matches_peft(model, ref, ref64, torch.randn(5, IN, device=DEVICE))


@pytest.mark.parametrize("value", ["no", 0, 1.0])
def test_fuse_rejects_a_save_output_that_is_not_a_bool(value):
    with pytest.raises(TypeError, match="save_output"):
        dora_kernels.fuse(tiny_peft(), save_output=value)


def test_fuse_keeps_each_layers_save_output_unless_told():
    layer = dora_kernels.DoRALinear(IN, HID, r=2, bias=False, save_output=False)
    model = nn.Sequential(layer, nn.ReLU(inplace=True), reference.DoRALinear(HID, OUT, bias=False))
    dora_kernels.fuse(model)
    assert model[0].save_output is False and model[2].save_output is True
    model(torch.randn(3, IN, device=DEVICE)).sum().backward()  # the in-place ReLU after layer 0 is fine
    dora_kernels.fuse(model, save_output=True)
    assert model[0].save_output is True
    dora_kernels.fuse(model, save_output=False)
    dora_kernels.fuse(model)  # idempotent: leaves the earlier choice
    assert model[0].save_output is False and model[2].save_output is False
