"""The conv DoRA combination (``dora_kernels.conv``): the Triton kernels of ``kernels_conv`` and the
torch path, each held to float64 by the shared rule of ``tolerance.assert_close_to_f64``.

Every case runs ``dora_conv_scale`` / ``dora_conv_dropout`` on the backend under test, the torch
path in the same dtypes (the reference in the same dtype) and the torch path on float64 copies of
the same rounded inputs, and checks the output and every gradient (result, lora or b̃ and l̃,
magnitude, bias). Inputs are random and non-zero; channel 1 has n = 0 (g = 0 and dm = 0 there).
Shapes are odd (spatial sizes that are no multiple of any block, one batch element, odd channel
counts), in NCHW, channels_last, mixed and non-flattening layouts, for Conv1d/2d/3d outputs.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

import dora_kernels
from dora_kernels import conv as dora_conv
from dora_kernels import runtime
from dora_kernels.testing import DEVICE
from tolerance import assert_close_to_f64

SCALING = 0.7
KERNELS = ["_conv_fwd_kernel", "_conv_bwd_kernel", "_conv_sum_kernel"]

SHAPES = [
    pytest.param((2, 7, 9, 11), "nchw", id="2d-N2-C7-9x11"),
    pytest.param((2, 7, 9, 11), "channels_last", id="2d-N2-C7-9x11-cl"),
    pytest.param((1, 67, 5, 3), "channels_last", id="2d-N1-C67-5x3-cl"),  # two channel blocks of 64
    pytest.param((1, 3, 17, 19), "nchw", id="2d-N1-C3-17x19"),  # 323 positions: two blocks of 256
    pytest.param((3, 5, 13), "nchw", id="1d-N3-C5-L13"),
    pytest.param((2, 3, 5, 4, 3), "channels_last", id="3d-N2-C3-5x4x3-cl"),
    pytest.param((40, 3, 4, 4), "nchw", id="2d-N40-C3-4x4"),  # several tiles a backward program
    pytest.param((2, 5, 6, 4), "mixed", id="2d-N2-C5-6x4-mixed"),  # result channels_last, the rest NCHW
    pytest.param((2, 5, 6, 4), "transposed", id="2d-N2-C5-6x4-transposed"),  # spatial dims that do not flatten
]

# result (base) dtype, adapter dtype (lora, magnitude), output dtype (None: the promoted one)
DTYPES = {
    "f32": (torch.float32, torch.float32, None),
    "f16": (torch.float16, torch.float16, None),
    "bf16": (torch.bfloat16, torch.bfloat16, None),
    "f16+f32": (torch.float16, torch.float32, None),
    "bf16+f32->bf16": (torch.bfloat16, torch.float32, torch.bfloat16),  # the last adapter of a fused layer
}
FORMS = ["bias-in-result", "bias-added", "no-bias", "dropout"]


def laid_out(t: torch.Tensor, layout: str, role: str) -> torch.Tensor:
    if t.dim() < 3:
        return t
    if layout == "channels_last" or (layout == "mixed" and role == "result"):  # channels innermost
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "transposed":  # (N, C, H, W) with H and W swapped in memory
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


def make_inputs(shape, layout, dtypes, form, seed=0):
    """Leaf tensors of the case in its dtypes and layout (float64 values, rounded to them)."""
    base_dt, ad_dt, _ = DTYPES[dtypes]
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    mag_shape = (1, C) + (1,) * (len(shape) - 2)
    norm = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    norm[1] = 0.0  # a zero row of V: g = 0
    v = {"result": (torch.randn(shape, generator=gen, dtype=torch.float64), base_dt),
         "lora": (torch.randn(shape, generator=gen, dtype=torch.float64), ad_dt),
         "magnitude": ((torch.rand(mag_shape, generator=gen, dtype=torch.float64) + 0.5)
                       * torch.where(torch.rand(mag_shape, generator=gen) < 0.2, -1.0, 1.0).double(), ad_dt)}
    if form == "dropout":
        v["base"] = (torch.randn(shape, generator=gen, dtype=torch.float64), base_dt)
    elif form != "no-bias":
        v["bias"] = (torch.randn(C, generator=gen, dtype=torch.float64), base_dt)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = {k: laid_out(x.to(dt), layout, k).to(DEVICE) for k, (x, dt) in v.items()}
    return t, norm.float().to(DEVICE), dy


def call(form, t, norm, out_dtype):
    if form == "dropout":
        return dora_conv.dora_conv_dropout(t["result"], t["base"], t["lora"], t["magnitude"], norm, SCALING,
                                           out_dtype=out_dtype)
    return dora_conv.dora_conv_scale(t["result"], t["lora"], t["magnitude"], norm, SCALING, t.get("bias"),
                                     bias_in_result=form == "bias-in-result", out_dtype=out_dtype)


def forward_backward(form, t, norm, dy, out_dtype, trains=None):
    """(y, {name: gradient}) with every input in ``trains`` (default: all) requiring grad."""
    leaves = {k: x.detach().clone().requires_grad_(trains is None or k in trains) for k, x in t.items()}
    y = call(form, leaves, norm, out_dtype)
    y.backward(dy.to(y))
    return y.detach(), {k: x.grad for k, x in leaves.items() if x.requires_grad}


def term_scales(form, t, norm, dy):
    """Σ|terms| in float64 of y, dm and dbias (the sums of many products; ulps are taken of these)."""
    a = {k: x.double().abs() for k, x in t.items()}
    n = norm.double().reshape(a["magnitude"].shape)
    g = torch.where(n > 0, a["magnitude"] / n.clamp(min=1e-30), torch.zeros_like(n))
    bias = a["bias"].reshape(a["magnitude"].shape) if "bias" in a else 0.0
    if form == "dropout":
        u = a["base"] + SCALING * a["lora"]
        y = a["result"] + (g + 1) * a["base"] + g * SCALING * a["lora"]
    else:
        u = a["result"] + bias + SCALING * a["lora"]
        y = g * u + bias
    inv_n = torch.where(norm.double() > 0, 1 / norm.double(), torch.zeros_like(norm.double()))
    dims = [0] + list(range(2, dy.dim()))
    dm = (dy.abs() * u).sum(dims, keepdim=True) * inv_n.reshape(g.shape)
    return {"y": y, "magnitude": dm, "bias": (dy.abs() * (1 + g)).sum(dims).reshape(-1)}


@pytest.fixture
def launched(monkeypatch):
    """The names of the kernels ``dora_kernels.conv`` launches."""
    names = []
    real = dora_conv.launch

    def spy(kernel, *args, **kwargs):
        names.append(runtime.kernel_name(kernel))
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(dora_conv, "launch", spy)
    return names


def check_case(shape, layout, dtypes, form, backend_name, launched):
    t, norm, dy = make_inputs(shape, layout, dtypes, form)
    out_dtype = DTYPES[dtypes][2]
    y_dtype = out_dtype or functools.reduce(torch.promote_types, (x.dtype for k, x in t.items() if k != "bias"))
    dy = dy.to(y_dtype).double()  # the float64 reference gets the same (rounded) dy
    with dora_kernels.use_backend(backend_name):
        y, grads = forward_backward(form, t, norm, dy, out_dtype)
    with dora_kernels.use_backend("torch"):
        y_ref, grads_ref = forward_backward(form, t, norm, dy, out_dtype)
        t64 = {k: x.double() for k, x in t.items()}
        y64, grads64 = forward_backward(form, t64, norm, dy, torch.float64)
    assert launched == (KERNELS if backend_name == "triton" else []), launched
    scales = term_scales(form, t, norm, dy)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert_close_to_f64(y, y_ref, y64, name="y", scale=scales["y"])
    assert grads.keys() == grads_ref.keys() == t.keys()
    for k, g in grads.items():
        assert g.dtype == t[k].dtype and g.shape == t[k].shape, k
        assert_close_to_f64(g, grads_ref[k], grads64[k], name=f"d{k}", scale=scales.get(k))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape, layout", SHAPES)
def test_matches_float64_every_shape(shape, layout, form, launched):
    check_case(shape, layout, "bf16+f32->bf16" if form != "dropout" else "bf16", form, "triton", launched)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("shape, layout", [SHAPES[1], SHAPES[4]])
def test_matches_float64_every_dtype(shape, layout, dtypes, form, backend_name, launched):
    check_case(shape, layout, dtypes, form, backend_name, launched)


@pytest.fixture
def meta_of(monkeypatch):
    """{kernel name: its constexprs} of the launches ``dora_kernels.conv`` makes."""
    metas = {}
    real = dora_conv.launch

    def spy(kernel, grid, meta, **kwargs):
        full = dict(meta)
        runtime.bind(kernel, full, {k: v for k, v in kwargs.items()
                                    if k not in ("flops", "unit", "vector_flops", "reads", "writes")})
        metas[runtime.kernel_name(kernel)] = full
        return real(kernel, grid, meta, **kwargs)

    monkeypatch.setattr(dora_conv, "launch", spy)
    return metas


@pytest.mark.parametrize("form, trains, want", [
    ("bias-in-result", {"magnitude"}, dict(HAS_U=True, HAS_DRESULT=False, HAS_DLORA=False, HAS_DM_PART=True,
                                           HAS_DBIAS_PART=False)),
    ("bias-in-result", {"lora", "bias"}, dict(HAS_U=False, HAS_DRESULT=False, HAS_DLORA=True, HAS_DM_PART=False,
                                              HAS_DBIAS_PART=True)),
    ("no-bias", {"result"}, dict(HAS_U=False, HAS_DRESULT=True, HAS_DLORA=False, HAS_DM_PART=False)),
    ("dropout", {"base", "magnitude"}, dict(HAS_U=True, HAS_DRESULT=False, HAS_DBASE=True, HAS_DLORA=False,
                                            HAS_DM_PART=True)),
])
def test_only_needed_outputs_are_written(form, trains, want, meta_of):
    """u is kept only where m trains; the backward writes only the gradients autograd asks for, and
    sums partials only for dm and dbias; what it writes still matches the torch path."""
    t, norm, dy = make_inputs((2, 5, 6, 4), "nchw", "f32", form)
    with dora_kernels.use_backend("triton"):
        y, grads = forward_backward(form, t, norm, dy, None, trains)
    got = {**meta_of.get("_conv_fwd_kernel", {}), **meta_of.get("_conv_bwd_kernel", {})}
    assert {k: got[k] for k in want} == want
    assert ("_conv_sum_kernel" in meta_of) == bool(trains & {"magnitude", "bias"})
    with dora_kernels.use_backend("torch"):
        y_ref, grads_ref = forward_backward(form, t, norm, dy, None, trains)
    # fp32 both ways, sums taken in other orders: a few fp32 ulps of the summed terms' magnitudes
    scales = term_scales(form, t, norm, dy.double())
    eps = 2.0**-23
    torch.testing.assert_close(y, y_ref, rtol=4 * eps, atol=4 * eps * scales["y"].max().item())
    assert grads.keys() == grads_ref.keys() == trains
    for k in trains:
        scale = scales[k].max().item() if k in scales else dy.abs().max().item()  # (elementwise grads)
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=4 * eps, atol=8 * eps * scale, msg=k)


def test_dropout_result_gradient_is_dy(launched):
    """dL/dresult of the dropout form is dy itself where the dtypes agree (no pass writes it), and
    dy in result's dtype where they do not."""
    t, norm, dy = make_inputs((2, 5, 6, 4), "nchw", "bf16", "dropout")
    dy = dy.to(torch.bfloat16)
    with dora_kernels.use_backend("triton"):
        leaves = {k: x.detach().clone().requires_grad_() for k, x in t.items()}
        y = call("dropout", leaves, norm, None)
        y.backward(dy)
        assert torch.equal(leaves["result"].grad, dy)
        leaves = {k: x.detach().clone().requires_grad_() for k, x in t.items()}
        y = call("dropout", leaves, norm, torch.float32)
        y.backward(dy.float() / 3)
        assert leaves["result"].grad.dtype == torch.bfloat16
        assert torch.equal(leaves["result"].grad, (dy.float() / 3).bfloat16())


def test_create_graph_backward_runs_torch_ops(launched):
    """A backward with create_graph records its ops for a second derivative: it takes the torch path."""
    t, norm, dy = make_inputs((2, 5, 6, 4), "nchw", "f32", "no-bias")
    leaves = {k: x.detach().clone().requires_grad_() for k, x in t.items()}
    with dora_kernels.use_backend("triton"):
        y = call("no-bias", leaves, norm, None)
        (dl,) = torch.autograd.grad(y, leaves["lora"], dy.float().requires_grad_(), create_graph=True)
    assert launched == ["_conv_fwd_kernel"] and dl.requires_grad


def test_backward_is_deterministic():
    t, norm, dy = make_inputs((40, 3, 4, 4), "nchw", "bf16+f32->bf16", "bias-in-result")
    with dora_kernels.use_backend("triton"):
        runs = [forward_backward("bias-in-result", t, norm, dy, torch.bfloat16) for _ in range(2)]
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k


def test_empty_batch(launched):
    t, norm, dy = make_inputs((0, 5, 6, 4), "nchw", "f32", "bias-in-result")
    with dora_kernels.use_backend("triton"):
        y, grads = forward_backward("bias-in-result", t, norm, dy, None)
    assert y.shape == (0, 5, 6, 4) and launched == []
    assert torch.equal(grads["magnitude"], torch.zeros_like(t["magnitude"]))
    assert torch.equal(grads["bias"], torch.zeros_like(t["bias"]))


def test_dry_run_records_the_kernels():
    """On meta tensors inside ``runtime.recording`` (the trace, the compile report) the combination
    records its three launches with the bytes they move (no (N, C, S) tensor but the ones named)."""
    rec = []
    shape = (2, 8, 16, 16)
    t = {k: torch.empty(shape, device="meta", dtype=torch.bfloat16, requires_grad=True) for k in ("result", "lora")}
    mag = torch.empty((1, 8, 1, 1), device="meta", requires_grad=True)
    bias = torch.empty(8, device="meta", dtype=torch.bfloat16)
    with runtime.recording(rec.append):
        y = dora_conv.dora_conv_scale(t["result"], t["lora"], mag, torch.empty(8, device="meta"), 2.0, bias,
                                      out_dtype=torch.bfloat16)
        y.backward(torch.empty_like(y))
    assert [lc.name for lc in rec] == KERNELS
    big = 2 * 8 * 16 * 16 * 2  # one (N, C, S) bf16 tensor
    fwd, bwd, _ = rec
    assert big * 4 <= fwd.bytes < big * 4 + 200  # result, lora → y, u
    assert big * 4 <= bwd.bytes < big * 4 + 2000  # dy, u → dresult, dlora (+ partials)


def test_batch_elements_past_32_bits_take_the_torch_path():
    """The kernels address one batch element with 32-bit offsets: a larger one runs on torch."""
    rec = []
    r = torch.empty((1, 3, 2**30), device="meta")
    with runtime.recording(rec.append):
        y = dora_conv.dora_conv_scale(r, torch.empty_like(r), torch.empty((1, 3, 1), device="meta"),
                                      torch.empty(3, device="meta"), 2.0)
    assert y.shape == r.shape and rec == []
    with runtime.recording(rec.append):
        r = torch.empty((1, 3, 2**29), device="meta")
        dora_conv.dora_conv_scale(r, torch.empty_like(r), torch.empty((1, 3, 1), device="meta"),
                                  torch.empty(3, device="meta"), 2.0)
    assert [lc.name for lc in rec] == ["_conv_fwd_kernel"]


# ---------------------------------------------------------------------------------------------
# a PEFT conv DoRA model after fuse runs these kernels and matches PEFT

class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 7, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def peft_conv(dtype, adapter_dtype):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = ConvNet().to(device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    cfg = LoraConfig(r=4, lora_alpha=9, target_modules=["conv"], use_dora=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(net, cfg, autocast_adapter_dtype=adapter_dtype != dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p))
    return model


def run_model(model, x, dy):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(dy.to(y))
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
                         ids=["bf16base-f32adapters", "f32"])
def test_fused_peft_conv_runs_the_kernels_and_matches_peft(dtype, adapter_dtype, launched):
    model = peft_conv(dtype, adapter_dtype)
    ref, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    dora_kernels.fuse(model)
    x = torch.randn((2, 3, 9, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    x = x.to(memory_format=torch.channels_last)
    dy = torch.randn((2, 7, 9, 7), generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    with dora_kernels.use_backend("triton"):
        y, dx, grads = run_model(model, x, dy)
    assert launched == KERNELS
    y_ref, dx_ref, grads_ref = run_model(ref, x, dy)
    y64, dx64, grads64 = run_model(ref64, x.double(), dy)
    assert y.dtype == y_ref.dtype
    assert_close_to_f64(y, y_ref, y64, name="output")
    assert_close_to_f64(dx, dx_ref, dx64, name="dx")
    assert grads.keys() == grads_ref.keys() and grads
    for name, g in grads.items():
        assert_close_to_f64(g, grads_ref[name], grads64[name], name=name)

