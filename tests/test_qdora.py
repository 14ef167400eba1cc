"""QDoRA: the fused op over bitsandbytes 4-bit (nf4/fp4) and 8-bit (int8) base weights.

The descriptor (``dora_kernels.quant.QuantWeight``) is held to bitsandbytes' own dequantisation
bit for bit; the op and ``fuse`` to PEFT's QDoRA (the unfused layer, same dtypes) and to float64
on the dequantised weight by the shared rule (``tolerance.assert_close_to_f64``), output and every
gradient. Shapes are small and odd: ``in`` is no multiple of the blocksize, so rows begin inside
blocks. bitsandbytes' CPU 4-bit kernel (AVX-512) is wrong where ``in`` is a multiple of 16 but
not of the blocksize (blocks across rows): parity cases avoid those shapes, and one test shows
the descriptor matching bitsandbytes' reference dequantisation there. Layers keep
``support_avx512bf16_for_cpu = False`` (bitsandbytes' CPU repacking; its own test below).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import dora_kernels
import reference
from dora_kernels import ops, quant
from dora_kernels.quant import QuantWeight, dequantize, dequantize_rows
from dora_kernels.testing import DEVICE
from tolerance import assert_close_to_f64, term_scales

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
import bitsandbytes.functional as bnbF  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from peft.utils.integrations import dequantize_module_weight  # noqa: E402

IN, OUT, R = 40, 12, 4
SEED = 1234
LIN = "base_model.model.lin"


# ---------------------------------------------------------------------------------------------
# bitsandbytes layers and PEFT models over them

@dataclass(frozen=True)
class Fmt:
    quant_type: str  # "nf4", "fp4" or "int8"
    nested: bool = True
    blocksize: int = 64
    storage: torch.dtype = torch.uint8

    def __str__(self):
        if self.quant_type == "int8":
            return "int8"
        store = {torch.uint8: "u8", torch.bfloat16: "bf16store", torch.float32: "f32store"}[self.storage]
        return f"{self.quant_type}-{'nested' if self.nested else 'plain'}-bs{self.blocksize}-{store}"


def quantised(fmt: Fmt, in_=IN, out=OUT, *, bias=True, dtype=torch.float32, compute_dtype=None, seed=0):
    """A bitsandbytes layer quantised from a random ``nn.Linear`` in ``dtype`` (the quant state's dtype)."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_, out, bias=bias).to(dtype)
    if fmt.quant_type == "int8":
        q = bnb.nn.Linear8bitLt(in_, out, bias=bias, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(in_, out, bias=bias, compute_dtype=compute_dtype or dtype, quant_type=fmt.quant_type,
                              compress_statistics=fmt.nested, quant_storage=fmt.storage)
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=fmt.blocksize,
                                     compress_statistics=fmt.nested, quant_type=fmt.quant_type,
                                     quant_storage=fmt.storage, module=q)
    if bias:
        q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    q = q.to(DEVICE)  # bitsandbytes quantises here
    if fmt.quant_type != "int8":
        q.support_avx512bf16_for_cpu = False
    return q


class One(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def qdora_model(fmt: Fmt, form: str, *, in_=IN, bias=True, dtype=torch.float32, compute_dtype=None, dropout=0.0):
    """A PEFT DoRA model over one bitsandbytes layer. ``form``: "bnb" (the model flagged as loaded in
    4/8 bits, as transformers does: PEFT's ``lora.bnb`` classes) or "generic" (``lora.Linear``)."""
    model = One(quantised(fmt, in_, bias=bias, dtype=dtype, compute_dtype=compute_dtype))
    if form == "bnb":
        setattr(model, "is_loaded_in_8bit" if fmt.quant_type == "int8" else "is_loaded_in_4bit", True)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=8, target_modules=["lin"], use_dora=True,
                                             lora_dropout=dropout, init_lora_weights=False))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # PEFT starts at m = ‖W0 + s·B·A‖ (g = 1): move m so that g ≠ 1 is tested
        m = model.base_model.model.lin.lora_magnitude_vector["default"].weight
        m.mul_(1 + 0.2 * torch.randn(m.shape, generator=gen).to(m))
    expected = {"bnb": lora_bnb.Linear8bitLt if fmt.quant_type == "int8" else lora_bnb.Linear4bit,
                "generic": lora_layer.Linear}[form]
    assert type(model.base_model.model.lin) is expected
    return model


class FixedMask(nn.Module):
    """PEFT's dropout with a given keep-mask (the one the fused op's seed makes)."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * (self.mask.to(x.dtype) * (1.0 / (1.0 - self.p)))


def run(model, x, grad_out):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(grad_out.to(y))
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def f64_reference(layer, x, grad_out, mask, p):
    """Output, dx and the adapter gradients of PEFT's DoRA on the dequantised weight, in float64."""
    base = layer.get_base_layer()
    W = dequantize_module_weight(base).detach().double()
    A, B = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    m = layer.lora_magnitude_vector["default"].weight
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B, m)]
    bias = base.bias.detach().double() if base.bias is not None else None
    y = reference.dora_linear(*leaves[:1], W, *leaves[1:], layer.scaling["default"], bias, dropout_p=p,
                              training=p > 0, dropout_mask=mask)
    y.backward(grad_out.double())
    scales = term_scales(leaves[0], W, *leaves[1:], layer.scaling["default"], bias, grad_out.double(), keep=mask,
                         p=p)
    return y.detach(), [t.grad for t in leaves], scales


def assert_matches_peft_and_f64(model, x, *, dropout=0.0, monkeypatch=None, k=3.0):
    """The fused model against an unfused copy (PEFT's QDoRA, same dtypes) and float64."""
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    assert dora_kernels.fused_layers(model) == [LIN]
    mask = None
    if dropout:
        monkeypatch.setattr(ops, "draw_seed", lambda: torch.tensor([SEED]))
        mask = dora_kernels.dropout_mask(SEED, x.shape, dropout, x.device)
        ref.get_submodule(LIN).lora_dropout["default"] = FixedMask(mask, dropout)
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn((*x.shape[:-1], OUT), generator=gen).to(DEVICE)
    y, dx, grads = run(model, x, grad_out)
    y_ref, dx_ref, grads_ref = run(ref, x, grad_out)
    y64, (dx64, dA64, dB64, dm64), sc = f64_reference(ref.get_submodule(LIN), x, grad_out, mask, dropout)
    assert y.dtype == y_ref.dtype == x.dtype and dx.dtype == dx_ref.dtype
    assert_close_to_f64(y, y_ref, y64, name="output", k=k, scale=sc["y"])
    assert_close_to_f64(dx, dx_ref, dx64, name="dx", k=k, scale=sc["x"])
    for part, g64, s in (("lora_A", dA64, sc["lora_A"]), ("lora_B", dB64, sc["lora_B"]),
                         ("lora_magnitude_vector", dm64, sc["magnitude"])):
        name = f"{LIN}.{part}.default.weight"
        assert grads[name].dtype == grads_ref[name].dtype, name
        assert_close_to_f64(grads[name], grads_ref[name], g64, name=name, k=k, scale=s)
    assert grads.keys() == grads_ref.keys()


# ---------------------------------------------------------------------------------------------
# the descriptor: bitsandbytes' dequantisation bit for bit

def _bytes_fit(fmt, shape) -> bool:
    """bitsandbytes stores the packed bytes in whole ``quant_storage`` elements."""
    return (shape[0] * shape[1] + 1) // 2 % torch.tensor([], dtype=fmt.storage).element_size() == 0


FOUR_BIT = [pytest.param(f, shape, id=f"{f}-{shape[0]}x{shape[1]}")
            for f in (Fmt(qt, nested, bs, st) for qt in ("nf4", "fp4") for nested in (False, True)
                      for bs in (32, 64, 256, 4096) for st in (torch.uint8, torch.bfloat16, torch.float32))
            for shape in ((40, 260), (12, 37), (5, 7)) if _bytes_fit(f, shape)]


@pytest.mark.parametrize("fmt, shape", FOUR_BIT)
def test_4bit_dequantisation_is_bitsandbytes(fmt, shape):
    """Rows beginning inside blocks, a partial last block, an odd element count (a half byte),
    several nested-absmax blocks (40×260 at blocksize 32); every storage and weight dtype."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = quantised(fmt, shape[1], shape[0], dtype=dtype)
        qw = QuantWeight.from_module(q)
        want = bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state)
        assert qw.dtype == dtype and qw.blocksize == fmt.blocksize and (qw.nested is not None) == fmt.nested
        assert torch.equal(dequantize(qw), want), dtype
        M, K = shape
        for start, stop in ((0, M), (1, min(3, M)), (M - 1, M), (M // 2, M // 2)):
            assert torch.equal(dequantize_rows(qw, start, stop), want[start:stop]), (dtype, start, stop)
        assert torch.equal(dequantize_rows(qw, 1, M, torch.float32), want[1:].float())


def test_4bit_dequantisation_across_rows_is_bitsandbytes_reference():
    """in = 96 at blocksize 64: blocks cross rows where bitsandbytes' AVX-512 CPU kernel assumes
    they do not; the descriptor matches bitsandbytes' reference (default-backend) dequantisation."""
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    compute = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    for qt in ("nf4", "fp4"):
        q = quantised(Fmt(qt, nested=False, blocksize=64), 96, 16)
        qs = q.weight.quant_state
        want = compute(q.weight.data.reshape(-1), qs.absmax, qs.code, 64, qs.shape, qs.dtype)
        assert torch.equal(dequantize(QuantWeight.from_module(q)), want)


def test_int8_dequantisation_is_bitsandbytes():
    q = quantised(Fmt("int8"), 37, 12)
    qw = QuantWeight.from_module(q)
    want = bnbF.int8_vectorwise_dequant(q.weight.data, q.weight.SCB)
    assert qw.quant_type == "int8" and qw.dtype == torch.float32
    assert torch.equal(dequantize(qw), want) and torch.equal(dequantize_rows(qw, 3, 7), want[3:7])
    assert torch.equal(dequantize(qw, torch.bfloat16), want.to(torch.bfloat16))


def test_fsdp2_gathered_weight_takes_the_modules_quant_state():
    """FSDP2 gathers a 16-bit-storage weight without quant_state; bitsandbytes reads module.quant_state."""
    q = quantised(Fmt("nf4", blocksize=64, storage=torch.bfloat16))
    want = dequantize(QuantWeight.from_module(q))
    q.weight = nn.Parameter(q.weight.data.clone(), requires_grad=False)  # a plain gathered tensor
    assert getattr(q.weight, "quant_state", None) is None and q.quant_state is not None
    assert torch.equal(dequantize(QuantWeight.from_module(q)), want)


# ---------------------------------------------------------------------------------------------
# the traps

def _cpu_layout_absmax(qs):
    """The absmax bitsandbytes' CPU layout keeps: the real one (nested ones dequantised) in bf16."""
    real = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    return real.float().to(torch.bfloat16).float()


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_cpu_repacked_layout_is_read_back(nested):
    """bitsandbytes' CPU repacking (``packing_format_for_cpu``) is read into the flat layout,
    with its bf16 absmax; the layer itself is left as bitsandbytes made it."""
    q = quantised(Fmt("nf4", nested=nested, blocksize=64), 128, 32, dtype=torch.bfloat16)
    before = QuantWeight.from_module(q)
    absmax = _cpu_layout_absmax(q.weight.quant_state)
    q.weight.data, q.weight.quant_state = bnbF._convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    assert q.weight.quant_state.packing_format_for_cpu and q.weight.data.shape == (32, 64)
    layout = (q.weight.data.clone(), q.weight.quant_state.absmax.clone())
    after = QuantWeight.from_module(q)
    assert torch.equal(after.data, before.data) and after.nested is None and after.dtype == torch.bfloat16
    assert torch.equal(after.absmax, absmax)
    nibbles = (before.data[:, None] >> torch.tensor([4, 0], dtype=torch.uint8)) & 0xF  # high nibble first
    want = (before.code[nibbles.long()].reshape(-1)
            * absmax.repeat_interleave(64)).reshape(32, 128).to(torch.bfloat16)
    assert torch.equal(dequantize(after), want)
    assert torch.equal(q.weight.data, layout[0]) and torch.equal(q.weight.quant_state.absmax, layout[1])


@pytest.mark.skipif(not bnbF.has_avx512bf16(), reason="bitsandbytes repacks only on CPUs with AVX-512 BF16")
def test_fused_eval_after_bitsandbytes_repacks():
    """PEFT's path (adapters disabled) runs the base layer in eval without grad: bitsandbytes
    repacks its weight there; the fused layer then still computes DoRA on that weight."""
    torch.manual_seed(0)
    model = One(quantised(Fmt("nf4", blocksize=64), 128, 32, dtype=torch.bfloat16))
    model = dora_kernels.fuse(get_peft_model(model, LoraConfig(r=R, target_modules=["lin"], use_dora=True,
                                                               init_lora_weights=False))).eval()
    layer = model.get_submodule(LIN)
    base = layer.get_base_layer()
    base.support_avx512bf16_for_cpu = True
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x)
        with model.disable_adapter():
            model(x)
        assert base.weight.quant_state.packing_format_for_cpu
        y_repacked = model(x)
        W = dequantize(QuantWeight.from_module(base))  # the weight bitsandbytes now computes with
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        m = layer.lora_magnitude_vector["default"].weight
        args = (layer.scaling["default"],)
        ref = reference.dora_linear(x, W, A, B, m, *args, base.bias, training=False)
        want = reference.dora_linear(x.double(), W.double(), A.double(), B.double(), m.double(), *args,
                                     base.bias.double(), training=False)
    assert not torch.equal(y_repacked, y)  # the repacked absmax is bf16
    assert_close_to_f64(y_repacked, ref, want, name="output after repacking")


def test_int8_scales_moved_to_the_layer_state():
    """bitsandbytes' first forward moves SCB from the weight to ``layer.state``: read from either."""
    model = qdora_model(Fmt("int8"), "bnb")
    dora_kernels.fuse(model)
    base = model.get_submodule(LIN).get_base_layer()
    x = torch.randn(4, IN)
    with torch.no_grad():
        y = model(x)
        assert base.weight.SCB is not None  # (PEFT's DoRA set-up also copied it to the state)
        base(x)  # bitsandbytes' own forward
        assert base.weight.SCB is None and base.state.SCB is not None
        assert torch.equal(model(x), y)


# ---------------------------------------------------------------------------------------------
# bad descriptors

def _broken(change):
    q = quantised(Fmt("nf4", nested=True, blocksize=64))
    qs = q.weight.quant_state
    change(q, qs)
    return q


@pytest.mark.parametrize("change, match", [
    (lambda q, qs: (setattr(q.weight, "quant_state", None), setattr(q, "quant_state", None)), "no quant_state"),
    (lambda q, qs: setattr(qs, "shape", torch.Size([OUT, IN + 2])), "quant_state.shape"),
    (lambda q, qs: setattr(qs, "blocksize", 48), "blocksize must be one of"),
    (lambda q, qs: setattr(qs, "absmax", qs.absmax[:-1]), "absmax must have shape"),
    (lambda q, qs: setattr(qs, "quant_type", "int4"), "quant_type must be 'nf4' or 'fp4'"),
    (lambda q, qs: setattr(qs, "code", bnbF.get_4bit_type("fp4", device="cpu")), "not bitsandbytes' nf4 table"),
    (lambda q, qs: setattr(qs, "packing_format_for_cpu", "amx"), "unknown packing"),
    (lambda q, qs: setattr(qs, "packing_format_for_cpu", True), "unknown packing"),
    (lambda q, qs: setattr(qs, "state2", None), "state2 or offset is missing"),
    (lambda q, qs: setattr(qs.state2, "absmax", qs.state2.absmax.double()), "nested absmax must be float32"),
    (lambda q, qs: setattr(q.weight, "data", q.weight.data[:-1]), "data must be uint8 of shape"),
], ids=["no-state", "shape", "blocksize", "absmax-length", "quant-type", "code-table", "unknown-packing",
        "bad-cpu-layout", "nested-no-state2", "nested-absmax-dtype", "data-length"])
def test_bad_4bit_quant_state_is_named(change, match):
    with pytest.raises(ValueError, match=match):
        QuantWeight.from_module(_broken(change))


def test_bad_int8_state_is_named():
    q = quantised(Fmt("int8"))
    q.weight.SCB, q.state.SCB = None, None
    with pytest.raises(ValueError, match="no SCB"):
        QuantWeight.from_module(q)
    q = quantised(Fmt("int8"))
    q.weight.SCB = q.weight.SCB[:-1]
    with pytest.raises(ValueError, match=r"SCB \(row scales\) must be a float tensor of shape \(12,\)"):
        QuantWeight.from_module(q)
    with pytest.raises(ValueError, match="not quantised yet"):
        QuantWeight.from_module(bnb.nn.Linear4bit(IN, OUT))
    with pytest.raises(TypeError, match="not a bitsandbytes Linear4bit or Linear8bitLt"):
        QuantWeight.from_module(nn.Linear(IN, OUT))


def test_bad_descriptor_built_directly_is_named():
    good = QuantWeight.from_module(quantised(Fmt("fp4", nested=False)))
    kw = dict(quant_type="fp4", data=good.data, shape=good.shape, dtype=good.dtype, absmax=good.absmax,
              code=good.code, blocksize=good.blocksize)
    for change, match in ((dict(shape=(OUT, IN, 1)), "shape must be"), (dict(dtype=torch.int8), "dtype must be"),
                          (dict(code=good.code[:8]), "code must be"), (dict(absmax=good.absmax.int()), "floating"),
                          (dict(quant_type="int8"), "int8 of shape")):
        with pytest.raises(ValueError, match=match):
            QuantWeight(**{**kw, **change})


def test_fused_layer_raises_on_a_broken_quant_state():
    """A quant state that became inconsistent is an error naming it, not PEFT's garbage."""
    model = dora_kernels.fuse(qdora_model(Fmt("nf4"), "bnb"))
    model.get_submodule(LIN).get_base_layer().weight.quant_state.blocksize = 128
    with pytest.raises(ValueError, match="absmax must have shape"):
        model(torch.randn(2, IN))


# ---------------------------------------------------------------------------------------------
# the op: the unquantised op on the dequantised weight, and float64

@pytest.mark.parametrize("norm_grad", ["detached", "exact"])
@pytest.mark.parametrize("dropout, bias, save_output", [(0.0, False, True), (0.0, True, True), (0.0, False, False),
                                                        (0.3, True, True)], ids=["y", "bias", "u", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16x-f32adapters"])
def test_op_matches_f64_and_the_unquantised_op(dtype, dropout, bias, save_output, norm_grad, backend):
    q = quantised(Fmt("nf4", nested=True, blocksize=64), dtype=dtype)
    qw = QuantWeight.from_module(q)
    W = dequantize(qw, dtype)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, IN, generator=gen).to(backend, dtype)
    A = (0.2 * torch.randn(R, IN, generator=gen)).to(backend)
    B = (0.2 * torch.randn(OUT, R, generator=gen)).to(backend)
    m = (W.float().norm(dim=1) * (1 + 0.2 * torch.randn(OUT, generator=gen).to(backend)))
    b = q.bias.detach().to(dtype) if bias else None
    dy = torch.randn(2, 3, OUT, generator=gen).to(backend)
    mask = dora_kernels.dropout_mask(SEED, x.shape, dropout, backend) if dropout else None
    outs = []
    for weight in (qw, W):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
        y = dora_kernels.dora_linear(leaves[0], weight, *leaves[1:], 2.0, b, dropout_p=dropout, dropout_seed=SEED,
                                     norm_grad=norm_grad, save_output=save_output)
        y.backward(dy.to(y.dtype))
        outs.append((y.detach(), [t.grad for t in leaves]))
    refs = []  # PEFT's arithmetic (reference/) on the dequantised weight: in x's dtype, and in float64
    W64, b64 = dequantize(qw).double(), b.double() if b is not None else None
    for xr, Wr, br, adapters in ((x, W, b, (A, B, m)), (x.double(), W64, b64, (A.double(), B.double(), m.double()))):
        leaves = [t.detach().clone().requires_grad_() for t in (xr, *adapters)]
        y = reference.dora_linear(leaves[0], Wr, *leaves[1:], 2.0, br, dropout_p=dropout, dropout_mask=mask,
                                  detach_norm=norm_grad == "detached")
        y.backward(dy.to(y.dtype))
        refs.append((y.detach(), [t.grad for t in leaves]))
    sc = term_scales(x.double(), W64, A.double(), B.double(), m.double(), 2.0, b64, dy.double(), keep=mask,
                     p=dropout, exact=norm_grad == "exact")
    names = ("x", "lora_A", "lora_B", "magnitude")
    (yq, gq), (yw, gw), (yr, gr), (y64, g64) = outs[0], outs[1], refs[0], refs[1]
    assert_close_to_f64(yq, yr, y64, name="output", scale=sc["y"])
    for name, a, r, r64 in zip(names, gq, gr, g64):
        assert a.dtype == r.dtype, name
        assert_close_to_f64(a, r, r64, name=name, scale=sc[name])
    # The unquantised op on the dequantised weight: the same function, to rounding.
    for name, a, w, r64 in zip(("output",) + names, [yq] + gq, [yw] + gw, [y64] + g64):
        assert_close_to_f64(a, w, r64, name=f"{name} vs the unquantised op", k=2.0, ulps=4.0,
                            scale=sc["y" if name == "output" else name])


def test_norm_goes_over_row_blocks(monkeypatch, torch_backend):
    """The torch path's norm dequantises blocks of rows (never the whole weight), and equals the
    norm of the dequantised weight."""
    q = quantised(Fmt("fp4", nested=True, blocksize=32), 37, 24)
    qw = QuantWeight.from_module(q)
    A, B = 0.3 * torch.randn(R, 37, device=DEVICE), 0.3 * torch.randn(24, R, device=DEVICE)
    want = torch.linalg.vector_norm(dequantize(qw).float() + 0.5 * B @ A, dim=1)
    monkeypatch.setattr(quant, "BLOCK_ELEMS", 3 * 37)
    spans = []
    real = quant.dequantize_rows

    def spy(qw_, start, stop, dtype=None, **kw):
        spans.append((start, stop))
        return real(qw_, start, stop, dtype, **kw)

    monkeypatch.setattr(quant, "dequantize_rows", spy)
    norm, wa = dora_kernels.weight_norm(qw, A, B, 0.5, with_wa=True)
    assert spans == [(i, i + 3) for i in range(0, 24, 3)]
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(wa, dequantize(qw).float() @ A.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", [Fmt("nf4"), Fmt("int8")], ids=str)
@pytest.mark.parametrize("dropout, bias", [(0.0, False), (0.2, True)], ids=["y", "u-dropout"])
def test_saves_no_dequantised_weight_and_dequantises_again(fmt, dropout, bias, backend, monkeypatch):
    """What autograd keeps is what the unquantised op keeps (x, xa, norm, y or u, the adapters):
    no (out, in) float tensor; the backward dequantises W0 again."""
    q = quantised(fmt, bias=bias)
    qw = QuantWeight.from_module(q)
    x = torch.randn(5, IN, device=backend, requires_grad=True)
    A = (0.1 * torch.randn(R, IN, device=backend)).requires_grad_()
    B = (0.1 * torch.randn(OUT, R, device=backend)).requires_grad_()
    m = (dequantize(qw).norm(dim=1) + 0.1).requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    calls = []
    # what reads W0: the kernels' operands (``packed``) on the Triton path, ``dequantize`` on torch's
    read = "packed" if dora_kernels.backend.uses_triton(x) else "dequantize"
    real = getattr(quant, read)
    monkeypatch.setattr(quant, read, lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dora_kernels.dora_linear(x, qw, A, B, m, 2.0, q.bias.detach() if bias else None, dropout_p=dropout)
    forward_calls = len(calls)
    assert (OUT, IN) not in [s for s, dt in saved if dt.is_floating_point]
    assert sorted(saved) == sorted([((5, IN), x.dtype), ((R, IN), A.dtype), ((OUT, R), B.dtype), ((OUT,), m.dtype),
                                    ((OUT,), torch.float32), ((5, R), torch.float32), ((5, OUT), torch.float32)]
                                   + ([((OUT,), q.bias.dtype)] if bias else []))
    y.backward(torch.randn_like(y))
    assert forward_calls >= 1 and len(calls) > forward_calls


# (tokens, DEQUANT_IN_KERNEL_TOKENS, dropout, x dtype, W0 dtype, dense transients made, x trains, some m small)
KERNEL_PATHS = {
    "few-tokens": (5, 256, 0.0, torch.bfloat16, torch.bfloat16, 0, True, False),
    "few-tokens-fp16-x-W0-bf16": (5, 256, 0.0, torch.float16, torch.bfloat16, 0, True, False),
    "in-kernel": (40, 256, 0.0, torch.float32, torch.float32, 0, True, False),
    "in-kernel-bf16-128-token-tiles": (130, 256, 0.0, torch.bfloat16, torch.bfloat16, 0, True, False),
    "in-kernel-W0-bf16-x-fp16": (40, 256, 0.0, torch.float16, torch.bfloat16, 0, True, False),
    "transient": (40, 4, 0.0, torch.float32, torch.float32, 2, True, False),
    "few-tokens-transient": (5, 4, 0.0, torch.bfloat16, torch.bfloat16, 2, True, False),
    "transient-dropout": (5, 256, 0.2, torch.float32, torch.float32, 2, True, False),
    "frozen-x-dm-redo": (40, 256, 0.0, torch.float32, torch.float32, 0, False, True),
}


@pytest.mark.parametrize("fmt", [Fmt("nf4"), Fmt("fp4", False, 32), Fmt("int8")], ids=str)
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_kernels_dequantise_in_registers_or_once_per_gemm(fmt, path, monkeypatch):
    """On the Triton path the norm always reads the codes in registers, and so do the forward and dx
    GEMMs up to ``DEQUANT_IN_KERNEL_TOKENS`` tokens without dropout; with more, or with dropout,
    each of the two GEMMs dequantises W0 once into a dense transient. Either way: the unquantised kernels' result on the dequantised weight,
    to the GEMMs' rounding (with the same dropout mask: the kernels' own), also where W0's dtype is
    not x's, without dx (the dx kernel then reads no W0) and where dm is made again from W0 (rows
    with |m| < n/4: the redo kernel reads the codes)."""
    from dora_kernels import heuristics, launchers

    tokens, threshold, dropout, dt, wdt, transients, x_trains, small_m = KERNEL_PATHS[path]
    q = quantised(fmt, dtype=wdt, compute_dtype=dt)
    qw = QuantWeight.from_module(q)
    x = torch.randn(tokens, IN, device=DEVICE, dtype=dt, requires_grad=x_trains)
    A = (0.1 * torch.randn(R, IN, device=DEVICE)).requires_grad_()
    B = (0.1 * torch.randn(OUT, R, device=DEVICE)).requires_grad_()
    m = dequantize(qw).float().norm(dim=1) + 0.1
    if small_m:
        m[::3] *= 0.05
    m.requires_grad_()
    dy = torch.randn(tokens, OUT, device=DEVICE, dtype=dt)
    tiles = []
    real_dx = heuristics.dx_config
    monkeypatch.setattr(heuristics, "dx_config", lambda **kw: tiles.append(real_dx(**kw).meta) or real_dx(**kw))

    def step(w):
        leaves = tuple(t for t in (x, A, B, m) if t.requires_grad)
        y = dora_kernels.dora_linear(x, w, A, B, m, 2.0, dropout_p=dropout, dropout_seed=7)
        return (y.detach(),) + torch.autograd.grad(y, leaves, dy)

    with dora_kernels.use_backend("triton"):
        want = step(dequantize(qw, dt))
    made = []
    real = launchers.dequantize
    monkeypatch.setattr(launchers, "dequantize", lambda *a, **k: made.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(heuristics, "DEQUANT_IN_KERNEL_TOKENS", threshold)
    monkeypatch.setattr(quant, "dequantize_rows", None)  # the torch path's dequantisation: not used
    tiles.clear()
    with dora_kernels.use_backend("triton"):
        got = step(qw)
    assert made == [torch.Size((OUT, IN))] * transients
    if path == "in-kernel-bf16-128-token-tiles":
        assert (tiles[-1]["BLOCK_N"], tiles[-1]["BLOCK_M"]) == (128, 16), tiles
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dt]
    for name, a, b in zip(("y", "dx", "dA", "dB", "dm") if x_trains else ("y", "dA", "dB", "dm"), got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("fmt", [Fmt("nf4"), Fmt("fp4", False, 32), Fmt("int8")], ids=str)
@pytest.mark.parametrize("tokens", [5, 40, 130])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("need_xa", [True, False], ids=["xa", "no-xa"])
def test_forward_makes_the_norm_in_its_pass_over_the_codes(fmt, tokens, dt, need_xa, monkeypatch):
    """Without u (eval, or training that saves y) the forward kernel makes the norm in its own pass over
    the codes (``_fwd_norm_kernel``), also over several token blocks (130 tokens: two 128-token
    tiles, each making the norm again): the two-pass kernels' norm and y (norm, then the forward, both
    over the codes), to the GEMMs' rounding; 16-bit adapters in x's dtype (the fp32-dot cases stay
    two-pass above 16 tokens). Without ``need_xa`` (eval) the GEMM reads V = W0 + s·B·A in x's dtype."""
    from dora_kernels import heuristics, launchers

    qw = QuantWeight.from_module(quantised(fmt, dtype=dt, compute_dtype=dt))
    x = torch.randn(tokens, IN, device=DEVICE, dtype=dt)
    A = (0.1 * torch.randn(R, IN, device=DEVICE)).to(dt)
    B = (0.1 * torch.randn(OUT, R, device=DEVICE)).to(dt)
    m = dequantize(qw).float().norm(dim=1) + 0.1
    m[::4] *= -1
    bias = torch.randn(OUT, device=DEVICE, dtype=dt)
    names, cfgs = [], []
    real, real_cfg, real_xa = launchers.launch, heuristics.fwd_norm_config, launchers._xa
    monkeypatch.setattr(launchers, "launch", lambda k, *a, **kw: names.append(k.__name__) or real(k, *a, **kw))
    monkeypatch.setattr(launchers, "_xa", lambda *a, **kw: names.append("xa") or real_xa(*a, **kw))
    monkeypatch.setattr(heuristics, "fwd_norm_config", lambda **kw: cfgs.append(real_cfg(**kw)) or cfgs[-1])
    with dora_kernels.use_backend("triton"):
        y, _, u, norm, _ = launchers.dora_forward(x, quant.packed(qw), A, B, m, 1.5, bias, need_u=False,
                                                  need_xa=need_xa)
        assert "_fwd_norm_kernel" in names and "_norm_kernel" not in names and u is None, names
        assert ("xa" in names) == need_xa, names
        assert cfgs[-1].sizes["T"] == (2 if tokens == 130 else 1), cfgs[-1]
        y2, _, _, norm2, _ = launchers.dora_forward(x, quant.packed(qw), A, B, m, 1.5, bias, need_u=True)
    assert "_norm_kernel" in names and "_fwd_kernel" in names
    torch.testing.assert_close(norm, norm2, rtol=IN * 2.0**-24, atol=0)  # (other K steps: a reordered sum of squares)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dt]
    torch.testing.assert_close(y, y2, rtol=tol, atol=tol)


@pytest.mark.parametrize("fmt", [Fmt("nf4", True, 64), Fmt("fp4", False, 32), Fmt("nf4", True, 128, torch.bfloat16),
                                 Fmt("int8")], ids=str)
@pytest.mark.parametrize("wdt, dt", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                     (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16)],
                         ids=["f32", "f16", "bf16", "W0-bf16-as-f16"])
def test_dequantising_kernels_are_bitsandbytes_bit_for_bit(fmt, wdt, dt):
    """``_dequant_kernel`` (and ``_absmax_kernel`` for a nested absmax) through the interpreter: the
    very values of bitsandbytes' own dequantisation, cast to x's dtype, at an odd shape whose rows
    start inside blocks and bytes (in = 37)."""
    from dora_kernels import launchers

    # 28 rows: bitsandbytes packs a 16-bit quant_storage in whole elements
    q = quantised(fmt, 37, 28, dtype=wdt, compute_dtype=dt)
    qw = QuantWeight.from_module(q)
    want = dequantize_module_weight(q).to(dt) if fmt.quant_type != "int8" else dequantize(qw, dt)
    with dora_kernels.use_backend("triton"):
        got = launchers.dequantize(quant.packed(qw), dt)
    assert got.dtype == dt and torch.equal(got, dequantize(qw, dt))
    assert torch.equal(got, want)


def test_kernel_norm_over_rows_that_start_mid_block(backend):
    """The norm kernel (and the torch path) on a 4-bit W0 whose rows start inside an absmax block
    and inside a byte (in = 37, blocksize 32): the norm of the dequantised weight."""
    q = quantised(Fmt("fp4", nested=True, blocksize=32), 37, 24)
    qw = QuantWeight.from_module(q)
    A, B = 0.3 * torch.randn(R, 37, device=DEVICE), 0.3 * torch.randn(24, R, device=DEVICE)
    want = torch.linalg.vector_norm(dequantize(qw).double() + 0.5 * B.double() @ A.double(), dim=1)
    norm, wa = dora_kernels.weight_norm(qw, A, B, 0.5, with_wa=True)
    torch.testing.assert_close(norm.double(), want, rtol=2e-6, atol=0)
    torch.testing.assert_close(wa.double(), dequantize(qw).double() @ A.double().T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# fuse: PEFT's QDoRA in both of PEFT's forms

PARITY = [
    pytest.param(Fmt("nf4", True, 64), torch.float32, None, True, 0.0, IN, id="nf4-nested-bs64-f32-bias"),
    pytest.param(Fmt("fp4", False, 64), torch.float32, None, False, 0.0, IN, id="fp4-plain-bs64-f32"),
    pytest.param(Fmt("nf4", True, 4096, torch.bfloat16), torch.bfloat16, None, True, 0.0, IN,
                 id="nf4-nested-bs4096-bf16store-bf16x-bias"),
    pytest.param(Fmt("fp4", True, 32), torch.bfloat16, None, False, 0.2, IN, id="fp4-nested-bs32-bf16x-p0.2"),
    pytest.param(Fmt("nf4", False, 128, torch.float32), torch.float32, None, True, 0.2, IN,
                 id="nf4-plain-bs128-f32store-f32-bias-p0.2"),
    pytest.param(Fmt("nf4", True, 256, torch.bfloat16), torch.float16, None, True, 0.0, IN,
                 id="nf4-nested-bs256-bf16store-f16x-bias"),
    pytest.param(Fmt("nf4", True, 64), torch.float32, None, True, 0.0, 37, id="nf4-nested-bs64-f32-bias-in37"),
    pytest.param(Fmt("nf4", True, 64), torch.bfloat16, torch.float32, True, 0.0, IN,
                 id="nf4-nested-bs64-bf16x-compute32-bias"),
    pytest.param(Fmt("int8"), torch.float32, None, True, 0.0, 37, id="int8-f32-bias-in37"),
    pytest.param(Fmt("int8"), torch.bfloat16, None, False, 0.2, IN, id="int8-bf16x-p0.2"),
]


@pytest.mark.parametrize("form", ["bnb", "generic"])
@pytest.mark.parametrize("fmt, dtype, compute_dtype, bias, dropout, in_", PARITY)
def test_fuse_matches_peft_qdora(fmt, dtype, compute_dtype, bias, dropout, in_, form, backend, monkeypatch):
    model = qdora_model(fmt, form, in_=in_, bias=bias, dtype=dtype, compute_dtype=compute_dtype, dropout=dropout)
    if dtype != torch.float32:  # PEFT's default keeps the adapters in fp32 on a 16-bit model
        assert model.get_submodule(LIN).lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(2, 3, in_, dtype=dtype, device=backend)
    assert_matches_peft_and_f64(model, x, dropout=dropout, monkeypatch=monkeypatch)


@pytest.mark.parametrize("fmt", [Fmt("nf4"), Fmt("fp4", False), Fmt("int8")], ids=str)
def test_fused_eval_matches_peft(fmt):
    """Eval without grad: bitsandbytes' int8 matmul then also quantises x (not copied: the fused
    op is closer to float64 than PEFT is)."""
    model = qdora_model(fmt, "bnb", dropout=0.2).eval()
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    x = torch.randn(4, IN)
    with torch.no_grad():
        y, y_ref = model(x), ref(x)
    layer = ref.get_submodule(LIN)
    base = layer.get_base_layer()
    args = [t.detach().double() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                          layer.lora_magnitude_vector["default"].weight)]
    y64 = reference.dora_linear(x.double(), dequantize_module_weight(base).double(), *args, layer.scaling["default"],
                                base.bias.double(), training=False)
    assert_close_to_f64(y, y_ref, y64, name="eval output")


def test_peft_dora_caching(monkeypatch):
    """PEFT's DoraCaching (eval): the fused layer keeps its fp32 norm of the quantised weight in
    PEFT's cache and reuses it."""
    from peft.helpers import DoraCaching

    model = qdora_model(Fmt("nf4"), "bnb").eval()
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    x = torch.randn(3, IN)
    norms = []
    real = quant.weight_norm
    monkeypatch.setattr(quant, "weight_norm", lambda *a, **k: norms.append(1) or real(*a, **k))
    try:
        with DoraCaching(), torch.no_grad():
            want, got, again = ref(x), model(x), model(x)
            assert any(k.startswith("dora_kernels") for k in model.get_submodule(LIN).lora_magnitude_vector[
                "default"]._dora_cache)
    finally:
        DoraCaching()(enabled=False)
    assert len(norms) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, got)


def test_fuse_reads_no_weight_and_reports(monkeypatch):
    """fuse reads classes only (the weights may be on the meta device); the descriptor is built at
    each call. A bitsandbytes base it cannot serve stays on PEFT's path, reported."""
    calls = []
    real = QuantWeight.from_module.__func__
    monkeypatch.setattr(QuantWeight, "from_module", classmethod(lambda cls, mod: calls.append(1) or real(cls, mod)))
    model = qdora_model(Fmt("nf4"), "bnb")
    other = qdora_model(Fmt("int8"), "generic")
    other.get_submodule(LIN).get_base_layer().state.has_fp16_weights = True
    dora_kernels.fuse(model)
    assert calls == [] and dora_kernels.fused_layers(model) == [LIN]
    model(torch.randn(2, IN))
    model(torch.randn(2, IN))
    assert len(calls) == 2
    with pytest.warns(UserWarning, match="left 1 DoRA layer"):
        dora_kernels.fuse(other)
    assert "has_fp16_weights=True" in dora_kernels.fuse_report(other).skipped[LIN]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16x-f32adapters"])
def test_several_adapters_and_disabled(dtype, monkeypatch):
    """PEFT's lora.bnb loop after the fused first adapter (its casts included: in bf16 the result
    is rounded after each adapter, so the fused first result's last bit carries on), and the
    disabled path (the base layer's own forward)."""
    model = qdora_model(Fmt("nf4"), "bnb", dtype=dtype)
    torch.manual_seed(3)
    model.add_adapter("plain", LoraConfig(r=R, target_modules=["lin"], init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=R, target_modules=["lin"], use_dora=True, init_lora_weights=False))
    model.base_model.set_adapter(["default", "plain", "second"])
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    calls = []
    real = quant.dora_linear
    monkeypatch.setattr(quant, "dora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 3, IN, dtype=dtype)
    grad_out = torch.randn(2, 3, OUT)
    y, dx, grads = run(model, x, grad_out)
    y_ref, dx_ref, grads_ref = run(ref, x, grad_out)
    assert len(calls) == 1 and y.dtype == y_ref.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=4 * 2**-8)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():  # relative to each gradient's largest entry (sums over tokens of bf16 terms)
        scale = grads_ref[name].abs().max().item()
        torch.testing.assert_close(g / scale, grads_ref[name] / scale, rtol=0, atol=10 * tol["atol"], msg=name)
    with torch.no_grad(), model.disable_adapter(), ref.disable_adapter():
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("fmt", [Fmt("nf4"), Fmt("int8")], ids=str)
def test_merge_unmerge_and_unload_as_peft(fmt):
    """PEFT's lora.bnb layers dequantise, merge and quantise again (lossy, with PEFT's warning);
    merged, a fused layer runs PEFT's merged path (the same numbers), unmerged the fused op again."""
    model = qdora_model(fmt, "bnb")
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    x = torch.randn(5, IN)
    with torch.no_grad():
        for m in (model, ref):
            with pytest.warns(UserWarning, match="Merge lora module to .-bit linear"):
                m.merge_adapter()
        assert model.get_submodule(LIN).merged
        assert torch.equal(model(x), ref(x))
        for m in (model, ref):
            with pytest.warns(UserWarning, match="Unmerge lora module to .-bit linear"):
                m.unmerge_adapter()
        assert not model.get_submodule(LIN).merged
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
        with pytest.warns(UserWarning, match="Merge lora module"):
            merged = model.merge_and_unload()
        with pytest.warns(UserWarning, match="Merge lora module"):
            merged_ref = ref.merge_and_unload()
        assert type(merged.lin) is type(merged_ref.lin) and type(merged.lin).__module__.startswith("bitsandbytes")
        assert torch.equal(merged(x), merged_ref(x))


@pytest.mark.parametrize("fmt", [Fmt("nf4"), Fmt("int8")], ids=str)
def test_merge_of_generic_layer_as_peft(fmt):
    """PEFT's generic lora.Linear does not merge into a bitsandbytes weight: over 4 bits it raises
    (shape mismatch); over int8 it casts the merged weight back to int8 without a word. Fused or
    not, the same happens (merging is PEFT's code)."""
    model = qdora_model(fmt, "generic")
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    outcomes = []
    for m in (ref, model):
        try:
            m.merge_adapter()
            outcomes.append(None)
        except Exception as e:  # noqa: BLE001  (whatever PEFT raises)
            outcomes.append((type(e), str(e)))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0] is not None) == (fmt.quant_type != "int8")
    if outcomes[0] is None:
        w, w_ref = (m.get_submodule(LIN).get_base_layer().weight for m in (model, ref))
        assert w.dtype == torch.int8 and torch.equal(w, w_ref)
        x = torch.randn(3, IN)
        with torch.no_grad():
            assert torch.equal(model(x), ref(x))


def test_saved_adapter_files_unchanged(tmp_path):
    model = qdora_model(Fmt("nf4"), "bnb")
    model.save_pretrained(tmp_path / "plain")
    dora_kernels.fuse(model)
    model(torch.randn(2, IN)).sum().backward()
    model.zero_grad()
    model.save_pretrained(tmp_path / "fused")
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "fused").iterdir()) and "adapter_model.safetensors" in files
    for name in files:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "fused" / name).read_bytes(), name
    loaded = PeftModel.from_pretrained(One(quantised(Fmt("nf4"))), tmp_path / "fused", is_trainable=True)
    dora_kernels.fuse(loaded)
    assert dora_kernels.fused_layers(loaded) == [LIN]


# ---------------------------------------------------------------------------------------------
# memory: one layer step against PEFT's QLoRA on the same base and r

_GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def _peak_bytes(fn, path) -> int:
    """Peak of the bytes allocated during ``fn()`` above what was allocated before: the running sum
    of the profiler's memory events (``torch.profiler``, ``profile_memory=True``), in order. A GEMM's
    scratch (allocated and freed inside one mm call: oneDNN's workspace, whose size depends on the
    CPU's instruction set) is not counted: it is the library's, not the op's, and differs between
    machines."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())["traceEvents"]
    events = [e for e in trace if e.get("name") == "[memory]"]
    events.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    gemms = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in trace if e.get("ph") == "X" and e.get("name") in _GEMMS]
    scratch, live = set(), {}
    for i, e in enumerate(events):
        if e["args"]["Bytes"] > 0:
            live[e["args"]["Addr"]] = i
        elif e["args"]["Addr"] in live:
            j = live.pop(e["args"]["Addr"])
            if any(a <= events[j]["ts"] and e["ts"] <= b for a, b in gemms):
                scratch.update((i, j))
    now = peak = 0
    for i, e in enumerate(events):
        if i not in scratch:
            now += e["args"]["Bytes"]
            peak = max(peak, now)
    return peak


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=["f32adapters", "bf16adapters"])
@pytest.mark.parametrize("fmt, N, K, M, dropout", [(Fmt("nf4"), 512, 512, 512, 0.0), (Fmt("nf4"), 32, 1024, 1024, 0.0),
                                                   (Fmt("int8"), 512, 512, 512, 0.0), (Fmt("nf4"), 512, 512, 512, 0.1)],
                         ids=["nf4-tokens", "nf4-weight", "int8", "nf4-tokens-p0.1"])
def test_memory_within_qlora(fmt, N, K, M, dropout, adapter_dtype, torch_backend, tmp_path):
    """Peak of one fwd+bwd step ≤ 1.05 × PEFT QLoRA's (plain LoRA, same base, same r = 16, same
    dropout) plus one (tokens, out) tensor in x's dtype; bf16 x requiring grad, a bf16 model
    (quant_state.dtype bf16). The torch path: what a CPU runs (the interpreter's allocations are
    not a GPU's)."""
    dtype = torch.bfloat16
    x = torch.randn(N, K, dtype=dtype, requires_grad=True)
    dy = torch.randn(N, M, dtype=dtype)
    peaks = {}
    for name in ("qlora", "fused"):
        torch.manual_seed(0)
        model = One(quantised(fmt, K, M, bias=False, dtype=dtype))
        setattr(model, "is_loaded_in_8bit" if fmt.quant_type == "int8" else "is_loaded_in_4bit", True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=["lin"], lora_dropout=dropout,
                                                 use_dora=name == "fused", init_lora_weights=False))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(adapter_dtype)
        if name == "fused":
            dora_kernels.fuse(model)

        def step():
            model(x).backward(dy)

        step()  # first call: lazy state (bitsandbytes moves the int8 scales, PEFT casts the bias)
        model.zero_grad(set_to_none=True)
        x.grad = None
        peaks[name] = _peak_bytes(step, tmp_path / f"{name}.json")
    bound = 1.05 * peaks["qlora"] + N * M * dtype.itemsize
    assert peaks["fused"] <= bound, f"fused step peak {peaks['fused'] / 2**20:.2f} MiB > {bound / 2**20:.2f} MiB " \
                                    f"(QLoRA {peaks['qlora'] / 2**20:.2f} MiB)"
