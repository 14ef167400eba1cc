"""``fuse`` on PEFT's DoRA Embedding and Conv1d/Conv2d/Conv3d layers: PEFT's numbers and bookkeeping.

Parity cases run the fused model, an unfused deep copy in the same dtypes and an unfused float64
copy, and hold the output, dx (convolutions) and every adapter gradient to the shared rule of
``tolerance.assert_close_to_f64``. Dropout cases give the three models one fixed mask: PEFT's
dropout module is replaced by one applying it, and the fused layer calls the layer's dropout
module as PEFT does. Adapters start random (``init_lora_weights=False``) and the magnitudes are
moved off their initial norms, so g ≠ 1 and B ≠ 0.
"""

from __future__ import annotations

import copy
import importlib
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dora_kernels
from dora_kernels import conv as dora_conv
from dora_kernels import embedding as dora_embedding
from dora_kernels.testing import DEVICE
from tolerance import assert_close_to_f64

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from peft.tuners.lora import variants as lora_variants  # noqa: E402
from peft.tuners.lora.dora import DoraConv2dLayer  # noqa: E402

FUSE = importlib.import_module("dora_kernels.fuse")  # the module (dora_kernels.fuse is the function)

# base dtype, adapter dtype (PEFT's autocast_adapter_dtype keeps 16-bit models' adapters in fp32)
DTYPES = {
    "f32": (torch.float32, torch.float32),
    "f16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "f16base-f32adapters": (torch.float16, torch.float32),
    "bf16base-f32adapters": (torch.bfloat16, torch.float32),
}


# ---------------------------------------------------------------------------------------------
# models and helpers

class ConvNet(nn.Module):
    def __init__(self, dim, cin, cout, k, **kw):
        super().__init__()
        self.conv = getattr(nn, f"Conv{dim}d")(cin, cout, k, **kw)

    def forward(self, x):
        return self.conv(x)


class EmbNet(nn.Module):
    def __init__(self, vocab, dim, embed_scale=None, **kw):
        super().__init__()
        if embed_scale is None:
            self.emb = nn.Embedding(vocab, dim, **kw)
        else:  # Gemma 3's embedding: the lookup times embed_scale (a buffer)
            gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
            self.emb = gemma3.Gemma3TextScaledWordEmbedding(vocab, dim, kw.pop("padding_idx", None),
                                                            embed_scale=embed_scale)

    def forward(self, ids):
        return self.emb(ids)


class Both(nn.Module):
    """An embedding feeding a Conv1d (channels = embedding dims)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(31, 6)
        self.conv = nn.Conv1d(6, 5, 3, padding=1)

    def forward(self, ids):
        return self.conv(self.emb(ids).transpose(1, 2))


BOTH = ("base_model.model.emb", "base_model.model.conv")


class FixedMask(nn.Module):
    """A dropout module applying a given keep-mask."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * (self.mask.to(x.dtype) * (1.0 / (1.0 - self.p)))


def perturb_magnitudes(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen).to(p))


def dora_peft(net, targets, *, r, dtypes="f32", device=DEVICE, use_dora=True, **cfg):
    base_dtype, adapter_dtype = DTYPES[dtypes]
    torch.manual_seed(0)
    net = net.to(device=device, dtype=base_dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=list(targets), use_dora=use_dora,
                        init_lora_weights=False, **cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LoRA adapter added to ConvNd layer with groups > 1")
        model = get_peft_model(net, config, autocast_adapter_dtype=adapter_dtype != base_dtype)
    perturb_magnitudes(model)
    return model


def copies(model):
    """An unfused copy in the same dtypes and one in float64."""
    return copy.deepcopy(model), copy.deepcopy(model).double()


def run(model, x):
    """Output, dL/dx and every trainable parameter's gradient for L = Σ y ⊙ G, G drawn from a fixed seed."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    model.zero_grad(set_to_none=True)
    y = model(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(y)
    y.backward(grad_out)
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_matches_peft(fused, ref, ref64, x, *, k=3.0):
    """fused vs unfused PEFT (same dtypes) vs unfused PEFT in float64: output, dx, every gradient."""
    y, dx, grads = run(fused, x)
    y_ref, dx_ref, grads_ref = run(ref, x)
    y64, dx64, grads64 = run(ref64, x.double() if x.is_floating_point() else x)
    assert y.dtype == y_ref.dtype
    assert_close_to_f64(y, y_ref, y64, name="output", k=k)
    if dx_ref is not None:
        assert dx.dtype == dx_ref.dtype
        assert_close_to_f64(dx, dx_ref, dx64, name="dx", k=k)
    assert grads and grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert g is not None and g.dtype == grads_ref[name].dtype, name
        assert_close_to_f64(g, grads_ref[name], grads64[name], name=name, k=k)


def count_calls(monkeypatch, *names):
    """A list that gets the name of each call of the fused functions ``names`` of ``fuse``."""
    calls = []
    for name in names:
        real = getattr(FUSE, name)
        monkeypatch.setattr(FUSE, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    return calls


def set_masks(models, layer, x_shape, p, adapter="default", seed=3):
    """Give ``layer`` of every model one fixed dropout mask of shape ``x_shape``."""
    mask = torch.rand(x_shape, generator=torch.Generator().manual_seed(seed)) >= p
    for model in models:
        model.get_submodule(layer).lora_dropout[adapter] = FixedMask(mask.to(DEVICE), p)


CONV = "base_model.model.conv"
EMB = "base_model.model.emb"


# ---------------------------------------------------------------------------------------------
# convolutions: parity with PEFT

CONV_CASES = [
    pytest.param(dict(dim=1, cin=3, cout=5, k=1), (2, 3, 7), 2, id="1d-k1-r2"),
    pytest.param(dict(dim=1, cin=4, cout=6, k=5, stride=2, padding=2, groups=2, bias=False), (2, 4, 11), 4,
                 id="1d-k5-s2-g2-nobias"),
    pytest.param(dict(dim=2, cin=3, cout=5, k=3, padding=1), (2, 3, 6, 5), 3, id="2d-k3"),
    pytest.param(dict(dim=2, cin=6, cout=9, k=3, stride=2, padding=1, groups=3), (2, 6, 7, 5), 6, id="2d-k3-s2-g3"),
    pytest.param(dict(dim=2, cin=4, cout=4, k=3, padding=1, groups=4, bias=False), (1, 4, 5, 5), 4,
                 id="2d-depthwise"),
    pytest.param(dict(dim=2, cin=3, cout=4, k=5, stride=2, padding=2, padding_mode="reflect"), (2, 3, 9, 7), 5,
                 id="2d-k5-s2-reflect"),
    pytest.param(dict(dim=3, cin=2, cout=3, k=3, stride=2, padding=1), (2, 2, 5, 4, 3), 3, id="3d-k3-s2"),
    pytest.param(dict(dim=3, cin=4, cout=6, k=1, groups=2), (2, 4, 3, 2, 3), 2, id="3d-k1-g2"),
]


def conv_case(spec, x_shape, r, dtypes, device, **cfg):
    model = dora_peft(ConvNet(**spec), ["conv"], r=r, dtypes=dtypes, device=device, **cfg)
    x = torch.randn(x_shape, device=device, dtype=DTYPES[dtypes][0])
    return model, x


@pytest.mark.parametrize("dtypes", ["f32", "bf16base-f32adapters"])
@pytest.mark.parametrize("spec, x_shape, r", CONV_CASES)
def test_conv_matches_peft(spec, x_shape, r, dtypes, backend, monkeypatch):
    model, x = conv_case(spec, x_shape, r, dtypes, backend)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == [CONV]
    calls = count_calls(monkeypatch, "dora_conv_scale", "conv_weight_norm")
    assert_matches_peft(model, ref, ref64, x)
    assert calls == ["conv_weight_norm", "dora_conv_scale"]


@pytest.mark.parametrize("dtypes", ["f16", "bf16", "f16base-f32adapters", "bf16base-f32adapters"])
@pytest.mark.parametrize("spec, x_shape, r", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[6]])
def test_conv_half_dtypes_match_peft(spec, x_shape, r, dtypes, backend):
    model, x = conv_case(spec, x_shape, r, dtypes, backend)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    assert_matches_peft(model, ref, ref64, x)


@pytest.mark.parametrize("dtypes", ["f32", "bf16"])
@pytest.mark.parametrize("spec, x_shape, r", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[5], CONV_CASES[6]])
def test_conv_dropout_matches_peft(spec, x_shape, r, dtypes, backend, monkeypatch):
    """Training with dropout: PEFT recomputes the base from x̃ with the plain (zero-padded)
    convolution; the undropped base keeps the layer's padding_mode."""
    model, x = conv_case(spec, x_shape, r, dtypes, backend, lora_dropout=0.3)
    ref, ref64 = copies(model)
    set_masks([model, ref, ref64], CONV, x_shape, 0.3)
    dora_kernels.fuse(model)
    calls = count_calls(monkeypatch, "dora_conv_dropout")
    assert_matches_peft(model, ref, ref64, x)
    assert calls == ["dora_conv_dropout"]


def test_conv_peft_dropout_module_draws_peft_mask():
    """PEFT's own nn.Dropout: the fused layer calls it where PEFT does, so a seed gives both one mask."""
    model, x = conv_case(*CONV_CASES[3].values, "f32", DEVICE, lora_dropout=0.3)
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    outs = []
    for m in (model, ref):
        torch.manual_seed(7)
        outs.append(run(m, x))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = outs
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_conv_dropout_in_eval_is_ignored(backend):
    model, x = conv_case(*CONV_CASES[2].values, "f32", backend, lora_dropout=0.3)
    ref, ref64 = copies(model)
    for m in (model, ref, ref64):
        m.eval()
    dora_kernels.fuse(model)
    assert_matches_peft(model, ref, ref64, x)


def test_conv_dropout_with_wider_adapters_fails_as_peft():
    """bf16 base, fp32 adapters, dropout: PEFT convolves the fp32 x̃ with the bf16 weight and fails."""
    model, x = conv_case(*CONV_CASES[2].values, "bf16base-f32adapters", DEVICE, lora_dropout=0.3)
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        model(x)
    assert str(got.value) == str(want.value)


def test_conv_rslora_and_unfrozen_base(backend):
    """rsLoRA scaling; a trainable base weight and bias get PEFT's gradients (through the base
    convolution only: the norm is detached)."""
    model, x = conv_case(*CONV_CASES[3].values, "f32", backend, use_rslora=True)
    base = model.get_submodule(CONV).base_layer
    base.weight.requires_grad_(True)
    base.bias.requires_grad_(True)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    assert_matches_peft(model, ref, ref64, x)


def test_conv_channels_last(backend, monkeypatch):
    """A channels_last base (the norm reads W0 in its memory order, no copy) matches PEFT; a
    channels_last lora_A, which PEFT's norm cannot view as (r, -1), fails as PEFT fails."""
    spec, x_shape, r = CONV_CASES[3].values
    model = dora_peft(ConvNet(**spec).to(memory_format=torch.channels_last), ["conv"], r=r, device=backend)
    x = torch.randn(x_shape, device=backend).to(memory_format=torch.channels_last)
    assert not model.get_submodule(CONV).base_layer.weight.is_contiguous()
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    calls = count_calls(monkeypatch, "dora_conv_scale")
    assert_matches_peft(model, ref, ref64, x)
    assert calls == ["dora_conv_scale"]
    for m in (model, ref):
        m.to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        model(x)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_weight_norm_is_peft_norm(dim, groups, backend):
    """PEFT's norm, groups > 1 included (its B.view(−1, r)·A.view(r, −1) reading, not the rank
    path's weight), in fp32 against PEFT's own formula in float64; a channels_last weight too."""
    gen = torch.Generator().manual_seed(dim * 10 + groups)
    cin, cout, r, k = 2 * groups, 3 * groups, 2 * groups, (3, 2, 1)[:dim]
    W = torch.randn((cout, cin // groups) + k, generator=gen, dtype=torch.float64)
    A = torch.randn((r, cin) + k, generator=gen, dtype=torch.float64)
    B = torch.randn((cout, r // groups) + (1,) * dim, generator=gen, dtype=torch.float64)
    lora_weight = torch.mm(B.view(-1, r), A.view(r, -1)).reshape(W.shape)
    want = DoraConv2dLayer(fan_in_fan_out=False).get_weight_norm(W, lora_weight, 0.7).reshape(-1)
    weights = [W.float().to(backend)]
    if dim == 2:
        weights.append(weights[0].to(memory_format=torch.channels_last))
    for w in weights:
        got = dora_conv.conv_weight_norm(w, A.float().to(backend), B.float().to(backend), 0.7, groups)
        assert got.dtype == torch.float32 and got.shape == (cout,)
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
    if groups > 1:  # not the norm of the rank path's weight
        A_b = A.reshape(groups, r // groups, cin, -1)  # lora_B's group j·groups // cout reads these ranks
        rank_path = torch.stack([torch.einsum("p,pck->ck", B.reshape(cout, -1)[j], A_b[j * groups // cout])
                                 for j in range(cout)])
        assert not torch.allclose(torch.linalg.vector_norm(rank_path, dim=(1, 2)), want)


def test_conv_norm_reads_weight_views_never_ba(monkeypatch):
    """The norm runs on views of W0 (one weight_norm call per group), never on a formed B·A."""
    seen = []
    real = dora_conv.weight_norm

    def spy(weight, lora_A, lora_B, scaling, **kw):
        seen.append((weight.untyped_storage().data_ptr(), tuple(weight.shape), tuple(lora_A.shape),
                     tuple(lora_B.shape)))
        return real(weight, lora_A, lora_B, scaling, **kw)

    monkeypatch.setattr(dora_conv, "weight_norm", spy)
    model, x = conv_case(*CONV_CASES[3].values, "f32", DEVICE)
    dora_kernels.fuse(model)
    model(x)
    w = model.get_submodule(CONV).base_layer.weight
    assert seen == [(w.untyped_storage().data_ptr(), (3, 2 * 9), (6, 2 * 9), (3, 6))] * 3


# ---------------------------------------------------------------------------------------------
# convolutions: PEFT's quirks

def test_conv_dilation_fails_as_peft():
    """PEFT's lora_A has no dilation: with a dilated kernel its forward adds tensors of two
    shapes and fails; the fused layer runs PEFT's arithmetic there and fails the same way."""
    model, x = conv_case(dict(dim=2, cin=3, cout=4, k=3, dilation=2, padding=1), (1, 3, 8, 8), 2, "f32", DEVICE)
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        model(x)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("spec, x_shape, fused", [
    pytest.param(dict(dim=2, cin=3, cout=4, k=1, dilation=2), (2, 3, 5, 4), True, id="k1-dilation2"),
    pytest.param(dict(dim=1, cin=3, cout=4, k=3, dilation=2, padding="same"), (2, 3, 9), True,
                 id="same-dilation2"),
    pytest.param(dict(dim=1, cin=3, cout=4, k=3, dilation=2), (2, 3, 5), False, id="broadcast"),
])
def test_conv_dilation_where_peft_runs(spec, x_shape, fused, monkeypatch):
    """Where PEFT's shapes agree (kernel 1, padding='same'; its rank path is then undilated) the
    fused layer matches it; where they broadcast (PEFT's output then has the rank path's size),
    it runs PEFT's arithmetic."""
    model, x = conv_case(spec, x_shape, 2, "f32", DEVICE)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    calls = count_calls(monkeypatch, "dora_conv_scale")
    assert_matches_peft(model, ref, ref64, x)
    assert calls == (["dora_conv_scale"] if fused else [])


def test_conv_unbatched_input_as_peft():
    """An unbatched input runs PEFT's arithmetic: without a bias PEFT broadcasts the (1, out, 1, 1)
    magnitude over it (its output gains a batch dim); with one it fails taking the bias out."""
    model, x = conv_case(*CONV_CASES[4].values, "f32", DEVICE)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    assert_matches_peft(model, ref, ref64, x[0])
    assert model(x[0]).shape == (1,) + x.shape[1:]
    model, x = conv_case(*CONV_CASES[2].values, "f32", DEVICE)
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    with pytest.raises(RuntimeError) as want:
        ref(x[0])
    with pytest.raises(RuntimeError) as got:
        model(x[0])
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
def test_conv_merge_unmerge_and_unload(safe_merge):
    model, x = conv_case(*CONV_CASES[2].values, "f32", DEVICE)
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    with torch.no_grad():
        y = model(x)
        for m in (model, ref):
            m.merge_adapter(safe_merge=safe_merge)
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        for m in (model, ref):
            m.unmerge_adapter()
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)
        merged = model.merge_and_unload(safe_merge=safe_merge)
        assert type(merged.conv) is nn.Conv2d
        torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-5)


def test_conv_groups_merge_raises_as_peft():
    model, x = conv_case(*CONV_CASES[3].values, "f32", DEVICE)
    dora_kernels.fuse(model)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        model.merge_adapter()
    assert not model.get_submodule(CONV).merged


# ---------------------------------------------------------------------------------------------
# embeddings: parity with PEFT

EMB_CASES = [
    pytest.param(dict(vocab=37, dim=12), 4, id="V37-D12-r4"),
    pytest.param(dict(vocab=50, dim=7, padding_idx=3), 8, id="V50-D7-r8-pad3"),
    pytest.param(dict(vocab=29, dim=10, max_norm=1.5), 3, id="V29-D10-r3-maxnorm"),
    pytest.param(dict(vocab=41, dim=9, embed_scale=3.0, padding_idx=0), 5, id="V41-D9-r5-gemma3scale"),
    pytest.param(dict(vocab=23, dim=6, scale_grad_by_freq=True), 1, id="V23-D6-r1-gradfreq"),
]


def emb_case(spec, r, dtypes, device, **cfg):
    model = dora_peft(EmbNet(**spec), ["emb"], r=r, dtypes=dtypes, device=device, **cfg)
    ids = torch.randint(0, spec["vocab"], (3, 7), generator=torch.Generator().manual_seed(2)).to(device)
    ids[0, :3] = spec.get("padding_idx") or 0
    ids[1, 2:5] = 1  # repeats
    return model, ids


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("spec, r", EMB_CASES)
def test_embedding_matches_peft(spec, r, dtypes, backend, monkeypatch):
    model, ids = emb_case(spec, r, dtypes, backend)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == [EMB]
    calls = count_calls(monkeypatch, "dora_embedding", "embedding_weight_norm")
    assert_matches_peft(model, ref, ref64, ids)
    assert calls == ["embedding_weight_norm", "dora_embedding"]


def test_embedding_max_norm_renormalises_in_place_as_peft():
    """max_norm: the base lookup renormalises W0's rows and PEFT's lookup of the rank path A's
    columns, in place; the norm takes A before that renormalisation, as PEFT's does."""
    model, ids = emb_case(*EMB_CASES[2].values, "f32", DEVICE)
    ref = copy.deepcopy(model)
    layer = model.get_submodule(EMB)
    A0 = layer.lora_embedding_A["default"].detach().clone()
    dora_kernels.fuse(model)
    y, y_ref = model(ids), ref(ids)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(layer.lora_embedding_A["default"], A0)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0, msg=name)


def test_embedding_sparse_fails_as_peft():
    """A sparse base embedding: PEFT's lookup of A_eᵀ gives a sparse gradient that its
    transpose cannot take; the fused layer does the same lookup and fails the same way."""
    model, ids = emb_case(dict(vocab=37, dim=12, sparse=True), 4, "f32", DEVICE)
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    with pytest.raises(RuntimeError) as want:
        ref(ids).sum().backward()
    with pytest.raises(RuntimeError) as got:
        model(ids).sum().backward()
    assert str(got.value) == str(want.value)


class ShapeLog(TorchDispatchMode):
    """The shapes of the tensors every dispatched op makes."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_embedding_never_makes_a_vocab_by_dim_tensor(backend, monkeypatch):
    """The norm runs on W0ᵀ as a strided view of W0 (the norm kernel, or the torch path's row
    blocks, never the whole product), and the backward makes no (vocab, dim)-sized tensor;
    PEFT's forward makes the (dim, vocab) product."""
    V, D = 301, 8
    model, ids = emb_case(dict(vocab=V, dim=D), 4, "f32", backend)
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    seen = []
    real = dora_embedding.weight_norm
    monkeypatch.setattr(dora_embedding, "weight_norm", lambda w, *a, **k: seen.append(w) or real(w, *a, **k))
    W = model.get_submodule(EMB).base_layer.weight
    shapes = {}
    for name, m in (("fused", model), ("peft", ref)):
        with ShapeLog() as fwd:
            y = m(ids)
        with ShapeLog() as bwd:
            y.backward(torch.ones_like(y))
        shapes[name] = (fwd.shapes, bwd.shapes)
    assert [(w.data_ptr(), w.shape, w.stride()) for w in seen] == [(W.data_ptr(), (D, V), (1, D))]
    big = [s for s in shapes["fused"][1] if torch.Size(s).numel() >= V * D]
    assert not big, big
    assert (D, V) in shapes["peft"][0]


# ---------------------------------------------------------------------------------------------
# several adapters, disabled, adapter_names

def _three_adapters(model, targets, dropout_second=0.0):
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LoRA adapter added to ConvNd layer with groups > 1")
        model.add_adapter("second", LoraConfig(r=3, lora_alpha=4, target_modules=targets, use_dora=True,
                                               init_lora_weights=False, lora_dropout=dropout_second))
        model.add_adapter("plain", LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False))
    perturb_magnitudes(model, seed=2)
    return model


ORDERS = [["default", "second"], ["second", "default"], ["default", "plain"], ["plain", "default"],
          ["default", "plain", "second"]]


@pytest.mark.parametrize("active", ORDERS, ids=lambda a: "+".join(a))
@pytest.mark.parametrize("kind", ["conv", "emb"])
def test_several_active_adapters(kind, active, monkeypatch):
    """PEFT hands each DoRA adapter the running result (a conv adapter takes the bias out of it
    and scales the rest by g; an embedding adapter scales all of it by g): the same numbers, in
    PEFT's order, every DoRA adapter fused."""
    if kind == "conv":
        model, x = conv_case(*CONV_CASES[3].values, "f32", DEVICE)
    else:
        model, x = emb_case(*EMB_CASES[3].values, "f32", DEVICE)
    _three_adapters(model, [kind]).base_model.set_adapter(active)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    calls = count_calls(monkeypatch, "dora_conv_scale", "dora_embedding")
    assert_matches_peft(model, ref, ref64, x)
    assert len(calls) == len([a for a in active if a != "plain"])


def test_several_conv_adapters_with_dropout():
    """The second DoRA adapter with dropout recomputes its base from x̃ (on the running result)."""
    model, x = conv_case(*CONV_CASES[3].values, "f32", DEVICE)
    _three_adapters(model, ["conv"], dropout_second=0.25).base_model.set_adapter(["default", "plain", "second"])
    ref, ref64 = copies(model)
    set_masks([model, ref, ref64], CONV, x.shape, 0.25, adapter="second")
    dora_kernels.fuse(model)
    assert_matches_peft(model, ref, ref64, x)


def test_a_peft_variant_fallback_keeps_the_order(monkeypatch):
    """An adapter the fused arithmetic cannot serve (here: a DTensor-like weight stand-in) runs
    PEFT's variant on the running result, between fused ones."""
    model, x = conv_case(*CONV_CASES[3].values, "f32", DEVICE)
    _three_adapters(model, ["conv"]).base_model.set_adapter(["default", "second"])
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    real = FUSE._conv_dora_ok
    monkeypatch.setattr(FUSE, "_conv_dora_ok", lambda m, name, *a: name != "second" and real(m, name, *a))
    calls = count_calls(monkeypatch, "dora_conv_scale")
    assert_matches_peft(model, ref, ref64, x)
    assert calls == ["dora_conv_scale"]


def test_disable_adapter_and_adapter_names():
    torch.manual_seed(0)
    model = dora_kernels.fuse(dora_peft(Both(), ["emb", "conv"], r=2))
    base = copy.deepcopy(model.base_model.model)
    base.emb, base.conv = base.emb.base_layer, base.conv.base_layer
    ids = torch.randint(0, 31, (2, 9), device=DEVICE)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)
    assert not torch.allclose(model(ids), base(ids))
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        model.eval()(ids, adapter_names=["default", "default"])


def test_embedding_merge_unmerge_and_unload():
    model, ids = emb_case(*EMB_CASES[1].values, "f32", DEVICE)
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    with torch.no_grad():
        y = model(ids)
        for m in (model, ref):
            m.merge_adapter()
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)
        torch.testing.assert_close(model(ids), y, rtol=1e-4, atol=1e-5)
        for m in (model, ref):
            m.unmerge_adapter()
        torch.testing.assert_close(model(ids), y, rtol=1e-4, atol=1e-5)
        merged = model.merge_and_unload()
        assert type(merged.emb) is nn.Embedding
        torch.testing.assert_close(merged(ids), y, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# memory: what the backward keeps

def saved_activation_bytes(model, x):
    """Bytes of the distinct storages autograd keeps for the backward, parameters and buffers aside."""
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    return sum(kept.values()), y


@pytest.mark.parametrize("kind, dropout", [("conv", 0.0), ("conv", 0.3), ("emb", 0.0)],
                         ids=["conv-p0", "conv-p0.3", "emb"])  # (PEFT has no dropout on embeddings)
def test_keeps_peft_loras_tensors_plus_one(kind, dropout):
    """The fused DoRA layer keeps what PEFT's LoRA layer keeps plus one (batch, out, spatial…)
    tensor (u for a conv, the running result for an embedding), and less than PEFT's DoRA."""

    def build(use_dora):
        if kind == "conv":
            model, x = conv_case(*CONV_CASES[3].values, "bf16base-f32adapters" if not dropout else "bf16", DEVICE,
                                 use_dora=use_dora, lora_dropout=dropout)
            x = x.requires_grad_()
        else:
            model, x = emb_case(*EMB_CASES[0].values, "bf16base-f32adapters", DEVICE, use_dora=use_dora)
        return model, x

    lora_model, x = build(False)
    lora_bytes, y = saved_activation_bytes(lora_model, x)
    dora_model, x = build(True)
    peft_bytes, _ = saved_activation_bytes(dora_model, x)
    fused_bytes, _ = saved_activation_bytes(dora_kernels.fuse(dora_model), x)
    out = y.shape[1] if kind == "conv" else y.shape[-1]
    # u is kept in the wider of the base's and the adapters' dtypes (fp32 here, for the bf16 base
    # with fp32 adapters), an embedding's running result in its own; the fp32 norm (out,) besides
    one = y.numel() * (4 if kind == "conv" and not dropout else y.element_size())
    assert fused_bytes <= lora_bytes + one + 4 * out + 8, (fused_bytes, lora_bytes)
    assert fused_bytes < peft_bytes


# ---------------------------------------------------------------------------------------------
# PEFT's bookkeeping stays PEFT's

def test_state_dict_classes_and_saved_files_unchanged(tmp_path):
    model = dora_peft(Both(), ["emb", "conv"], r=2)
    before = model.state_dict(keep_vars=True)
    model.save_pretrained(tmp_path / "plain")
    dora_kernels.fuse(model)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    emb, conv = (model.get_submodule(n) for n in BOTH)
    assert isinstance(emb, lora_layer.Embedding) and type(emb) is not lora_layer.Embedding
    assert isinstance(conv, lora_layer.Conv1d) and type(conv) is not lora_layer.Conv1d
    assert type(emb.lora_variant["default"]) is lora_variants.DoraEmbeddingVariant
    assert type(conv.lora_variant["default"]) is lora_variants.DoraConv1dVariant
    assert repr(emb).startswith("lora.Embedding(") and repr(conv).startswith("lora.Conv1d(")
    model.save_pretrained(tmp_path / "fused")
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "fused").iterdir()) and "adapter_model.safetensors" in files
    for name in files:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "fused" / name).read_bytes(), name

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Both().to(DEVICE), tmp_path / "fused", is_trainable=True)
    ref, ref64 = copies(loaded)
    dora_kernels.fuse(loaded)
    assert dora_kernels.fused_layers(loaded) == list(BOTH)
    assert_matches_peft(loaded, ref, ref64, torch.randint(0, 31, (2, 9), device=DEVICE))


def test_fuse_is_idempotent_reports_and_unfuses(tmp_path):
    model = dora_peft(Both(), ["emb"], r=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dora_kernels.fuse(model)
    cls = type(model.get_submodule(BOTH[0]))
    dora_kernels.fuse(model)
    assert type(model.get_submodule(BOTH[0])) is cls and cls.__bases__ == (lora_layer.Embedding,)
    assert dora_kernels.fused_layers(model) == [BOTH[0]]
    model.add_adapter("more", LoraConfig(r=2, target_modules=["conv"], use_dora=True, init_lora_weights=False))
    assert dora_kernels.fuse_report(model).skipped == {BOTH[1]: "peft lora.Conv1d not fused yet: call fuse(model)"}
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == list(BOTH)
    again = pickle.loads(pickle.dumps(model))
    ids = torch.randint(0, 31, (2, 9), device=DEVICE)
    torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    y = model(ids)
    assert dora_kernels.unfuse(model) is model
    assert type(model.get_submodule(BOTH[0])) is lora_layer.Embedding
    assert type(model.get_submodule(BOTH[1])) is lora_layer.Conv1d
    assert dora_kernels.fused_layers(model) == []
    torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-6)


def test_meta_device_at_fuse_time():
    """PEFT's low_cpu_mem_usage: adapters on the meta device when fuse runs, loaded after."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    src = dora_peft(Both(), ["emb", "conv"], r=2)
    sd = get_peft_model_state_dict(src)
    torch.manual_seed(0)
    model = get_peft_model(Both().to(DEVICE), LoraConfig(r=2, lora_alpha=5, target_modules=["emb", "conv"],
                                                         use_dora=True), low_cpu_mem_usage=True)
    assert model.get_submodule(BOTH[1]).lora_A["default"].weight.device.type == "meta"
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == list(BOTH)
    set_peft_model_state_dict(model, sd, low_cpu_mem_usage=True)
    assert all(p.device.type != "meta" for p in model.parameters())
    ref, ref64 = copies(src)
    assert_matches_peft(model, ref, ref64, torch.randint(0, 31, (2, 9), device=DEVICE))


def test_peft_dora_caching():
    """DoraCaching (eval): the fused norm goes into PEFT's DoRA cache and is reused; outputs equal
    PEFT's cached ones; an uncached call clears the cache as PEFT's does."""
    from peft.helpers import DoraCaching

    model = dora_peft(Both(), ["emb", "conv"], r=2)
    ref = copy.deepcopy(model).eval()
    model = dora_kernels.fuse(model).eval()
    caches = [model.get_submodule(n).lora_magnitude_vector["default"]._dora_cache for n in BOTH]
    ids = torch.randint(0, 31, (2, 9), device=DEVICE)
    try:
        with DoraCaching():
            want, got = ref(ids), model(ids)
            assert all(any(k.startswith("dora_kernels") for k in c) for c in caches)
            cached = [dict(c) for c in caches]
            again = model(ids)
            assert all(c.keys() == k.keys() and all(c[n] is k[n] for n in c) for c, k in zip(caches, cached))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, got, rtol=0, atol=0)
        model(ids)
        assert not any(caches)
    finally:
        DoraCaching()(enabled=False)


@pytest.mark.parametrize("kind", ["conv", "emb"])
def test_autocast_matches_peft(kind, backend):
    """Under autocast (bf16) the convolutions and the rank-path products autocast as PEFT's do;
    the norm and the DoRA combination stay in fp32."""
    if kind == "conv":
        model, x = conv_case(*CONV_CASES[3].values, "f32", backend)
    else:
        model, x = emb_case(*EMB_CASES[3].values, "f32", backend)
    ref, ref64 = copies(model)
    dora_kernels.fuse(model)
    device_type = torch.device(backend).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y, dx, grads = run(model, x)
        y_ref, dx_ref, grads_ref = run(ref, x)
    y64, dx64, grads64 = run(ref64, x.double() if x.is_floating_point() else x)
    assert y.dtype == y_ref.dtype == (torch.bfloat16 if kind == "conv" else torch.float32)
    assert_close_to_f64(y, y_ref, y64, name="output")
    if dx is not None:
        assert_close_to_f64(dx, dx_ref, dx64, name="dx")
    for name, g in grads.items():
        assert_close_to_f64(g, grads_ref[name], grads64[name], name=name)


def test_inference_mode():
    model = dora_kernels.fuse(dora_peft(Both(), ["emb", "conv"], r=2)).eval()
    ref = dora_kernels.unfuse(copy.deepcopy(model))
    ids = torch.randint(0, 31, (2, 9), device=DEVICE)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-5, atol=1e-6)
