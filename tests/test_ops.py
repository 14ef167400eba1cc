"""Parity of the functional op ``dora_kernels.dora_linear`` with ``reference.dora_linear``.

Every case runs the op, the reference in the same dtypes and the reference on float64 copies
of the same (already rounded) inputs, then holds the output and every gradient to the shared
rule of ``tolerance.assert_close_to_f64``. Each case runs on both backends: the Triton kernels
(compiled on a GPU, interpreted on a CPU) and the pure-torch path.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import dora_kernels
import reference
from dora_kernels import launchers, runtime
from dora_kernels.testing import (P_DROP, Case, check_case, drop_kwargs, forward_backward, op_tensors, ref_tensors,
                                  shrink_some_magnitudes, values, w_layout, zero_some_magnitudes)
from tolerance import assert_close_to_f64



# ---------------------------------------------------------------------------------------------
# backends (the ``backend`` fixture is conftest's)

def test_backend_fixture_picks_the_path(backend, request, monkeypatch):
    """The ``triton`` backend launches kernels and the ``torch`` backend launches none, so the
    parity tests below really test two implementations."""
    launches = []
    real = runtime.launch

    def counting(kernel, *args, **kwargs):
        launches.append(kernel)
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(launchers, "launch", counting)
    case = Case((5,), 12, 7, 3)
    t = op_tensors(case, values(case, 0), backend)
    y = dora_kernels.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], 2.0)
    y.sum().backward()
    if request.node.callspec.params["backend"] == "triton":
        assert launches, "the triton backend launched no kernel"
    else:
        assert not launches, f"the torch backend launched {[getattr(k, '__name__', k) for k in launches]}"


# ---------------------------------------------------------------------------------------------
# cases

CASES = [
    # 1 token and 0 tokens
    Case((1,), 100, 72, 8, "f32", "frozen"),
    Case((1,), 100, 72, 8, "bf16", "grad", "train", "x-step2"),
    Case((0,), 100, 72, 8, "f32", "grad"),
    Case((0,), 17, 5, 12, "bf16+f32", "frozen", "train", "w-T"),
    # odd sizes, not multiples of any block
    Case((37,), 100, 72, 8, "f32", "none", "train", "w-T"),
    Case((37,), 100, 72, 8, "bf16", "frozen", "none", "x-rowpad"),
    Case((37,), 100, 72, 8, "f16+f32", "grad", "eval", "contig", 0.5),
    Case((13,), 130, 150, 5, "f16", "frozen", "train", "x-T"),
    Case((13,), 130, 150, 5, "bf16+f32", "none", "none", "w-rowpad"),
    Case((9,), 17, 5, 12, "f32", "grad", "train", "x-rowpad"),
    Case((9,), 17, 5, 12, "bf16", "none", "eval", "w-T"),
    # leading batch dims
    Case((2, 3), 40, 24, 4, "f32", "frozen", "eval", "x-step2"),
    Case((2, 3), 40, 24, 4, "bf16+f32", "grad", "train", "x-T"),
    Case((3, 5), 17, 33, 5, "f16+f32", "none", "train", "x-step2"),
    # r = 1
    Case((7,), 33, 19, 1, "f16", "none", "none", "w-T"),
    Case((7,), 33, 19, 1, "bf16+f32", "frozen", "train", "contig", 0.25),
    # r larger than in and out (PEFT's 5 -> 1 test layer)
    Case((6,), 5, 1, 8, "f32", "frozen"),
    Case((6,), 5, 1, 8, "bf16", "grad", "train", "x-T"),
    # r > 64: more than one rank chunk
    Case((11,), 70, 40, 80, "f32", "none", "train", "x-step2"),
    Case((11,), 70, 40, 80, "bf16+f32", "frozen", "none", "w-T"),
    Case((5,), 70, 40, 80, "f16", "grad", "eval", "x-rowpad"),
    # token counts that reach the 64- and 128-token tiles
    Case((70,), 48, 36, 12, "f16+f32", "frozen", "train", "w-rowpad"),
    Case((130,), 24, 20, 4, "bf16", "frozen", "train"),
    Case((130,), 24, 20, 4, "f32", "grad", "none", "x-T"),
    # aligned control
    Case((20,), 64, 64, 16, "f16", "frozen"),
]


# ---------------------------------------------------------------------------------------------
# inputs and runs

def check_parity(case: Case, device, seed: int = 0, *, norm_grad: str = "detached", edit=None, save_output=True):
    """Run the op, the same-dtype reference and the float64 reference (``testing.check_case``);
    hold the dtypes and every comparison. ``edit(v)`` changes the inputs in place first."""
    y, grads, grads_ref, verdicts = check_case(case, device, seed, oracle=reference.dora_linear, norm_grad=norm_grad,
                                               edit=edit, save_output=save_output)
    base, adapter = case.dtypes
    assert y.dtype == base and y.shape == (*case.lead, case.o)
    want_dtype = {"x": base, "bias": base, "lora_A": adapter, "lora_B": adapter, "magnitude": adapter}
    assert grads.keys() == grads_ref.keys()
    for k, g in grads.items():
        assert g is not None, f"d{k} is None"
        assert g.dtype == want_dtype[k], f"d{k} has dtype {g.dtype}, want {want_dtype[k]}"
    failed = [v.message for v in verdicts if not v.ok]
    assert not failed, "\n".join(failed)
    return y, grads


# ---------------------------------------------------------------------------------------------
# the table

@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_parity(case, backend):
    y, grads = check_parity(case, backend)
    if math.prod(case.lead) == 0:
        assert y.numel() == 0
        for k in ("lora_A", "lora_B", "magnitude"):
            assert torch.count_nonzero(grads[k]) == 0, f"d{k} of an empty batch is not zero"
        if "bias" in grads:
            assert torch.count_nonzero(grads["bias"]) == 0


# No shrinking: under the interpreter it would cost minutes; the failing example is printed as is.
@settings(max_examples=25, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    n=st.integers(0, 40),
    i=st.integers(1, 70),
    o=st.integers(1, 70),
    r=st.integers(1, 20),
    dtype=st.sampled_from(["f32", "f16", "bf16", "bf16+f32", "f16+f32"]),
    bias=st.sampled_from(["none", "frozen", "grad"]),
    drop=st.sampled_from(["none", "train", "eval"]),
    layout=st.sampled_from(["contig", "x-rowpad", "x-step2", "x-T", "w-T", "w-rowpad"]),
    seed=st.integers(0, 2**16),
)
def test_parity_random_shapes(backend, n, i, o, r, dtype, bias, drop, layout, seed):
    check_parity(Case((n,), i, o, r, dtype, bias, drop, layout), backend, seed)


def test_strided_bias_and_magnitude(backend):
    """bias and magnitude given as strided views (every other element of a longer tensor, the
    skipped elements NaN) give the results of their contiguous copies."""
    case = Case((9,), 30, 20, 4, "f32", "grad")
    v = values(case, 0)

    def every_other(t):
        big = torch.full((2 * t.shape[0],), float("nan"), dtype=t.dtype, device=backend)
        big[::2] = t.to(backend)
        return big[::2]

    t = op_tensors(case, v, backend)
    t["bias"] = every_other(v["bias"]).detach().requires_grad_(True)
    t["magnitude"] = every_other(v["magnitude"]).detach().requires_grad_(True)
    y, grads = forward_backward(dora_kernels.dora_linear, t, case.scaling)
    y_ref, grads_ref = forward_backward(reference.dora_linear, ref_tensors(case, v, backend), case.scaling)
    y64, grads64 = forward_backward(reference.dora_linear, ref_tensors(case, v, backend, torch.float64),
                                     case.scaling)
    assert_close_to_f64(y, y_ref, y64, name="y")
    for k in grads_ref:
        assert_close_to_f64(grads[k], grads_ref[k], grads64[k], name=f"d{k}")


# ---------------------------------------------------------------------------------------------
# exact norm gradient

EXACT_CASES = [
    Case((13,), 40, 24, 5, "f32", "frozen"),
    Case((9,), 17, 5, 12, "f32", "grad", "train", "x-step2"),
    Case((11,), 70, 40, 80, "f32", "none", "none", "w-T"),
    Case((2, 3), 33, 19, 1, "f32", "frozen", "eval"),
    Case((37,), 100, 72, 8, "bf16+f32", "frozen", "none", "x-rowpad"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in EXACT_CASES])
def test_exact_norm_grad(case, backend):
    """norm_grad="exact" equals autograd through the undetached reference norm."""
    check_parity(case, backend, norm_grad="exact")


def test_exact_and_detached_gradients_differ(backend):
    case = Case((13,), 40, 24, 5, "f32", "frozen")
    _, exact = check_parity(case, backend, norm_grad="exact")
    _, detached = check_parity(case, backend)
    for k in ("lora_A", "lora_B"):
        gap = (exact[k] - detached[k]).abs().max().item()
        assert gap > 1e-2 * detached[k].abs().max().item(), f"d{k}: exact and detached differ by only {gap:.3e}"
    # The norm's gradient reaches neither x nor m directly.
    torch.testing.assert_close(exact["x"], detached["x"])
    torch.testing.assert_close(exact["magnitude"], detached["magnitude"])


# ---------------------------------------------------------------------------------------------
# weight norm

@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in [
    Case((1,), 100, 72, 8, "f32"),
    Case((1,), 130, 150, 5, "bf16", layout="w-T"),
    Case((1,), 5, 1, 8, "f16+f32"),
    Case((1,), 70, 40, 80, "bf16+f32", layout="w-rowpad"),
]])
def test_weight_norm(case, backend):
    v = values(case, 0)
    w = w_layout(v["weight"].to(backend), case.layout)
    A, B = v["lora_A"].to(backend), v["lora_B"].to(backend)
    norm, wa = dora_kernels.weight_norm(w, A, B, case.scaling)
    assert wa is None and norm.dtype == torch.float32 and norm.shape == (case.o,)
    # The kernel keeps the norm in fp32 whatever the inputs: judge it as an fp32 computation.
    ref = reference.dora_weight_norm(w, A, B, case.scaling, dtype=torch.float32)
    ref64 = reference.dora_weight_norm(w.double(), A.double(), B.double(), case.scaling)
    assert_close_to_f64(norm, ref, ref64, name="norm")


# ---------------------------------------------------------------------------------------------
# zero norms

@pytest.mark.parametrize("drop", ["none", "train"])
@pytest.mark.parametrize("norm_grad", ["detached", "exact"])
def test_zero_norm_row(backend, drop, norm_grad):
    """A row of W0 + s·B·A that is exactly zero: g = 0 there, so y = bias and dm = dB = 0 in that
    row, everything finite, and the other rows are the layer without that row."""
    case = Case((9,), 20, 7, 3, "f32", "grad", drop)
    j = 4
    v = values(case, 0)
    v["weight"][j] = 0
    v["lora_B"][j] = 0
    op_kw, ref_kw = drop_kwargs(case, 77)
    op_kw["norm_grad"] = norm_grad
    if drop == "train":
        ref_kw["dropout_mask"] = dora_kernels.dropout_mask(77, v["x"].shape, P_DROP, backend)
    t = op_tensors(case, v, backend)
    y, grads = forward_backward(dora_kernels.dora_linear, t, case.scaling, **op_kw)

    assert torch.isfinite(y).all()
    for k, g in grads.items():
        assert torch.isfinite(g).all(), f"d{k} is not finite"
    torch.testing.assert_close(y[:, j], t["bias"].detach()[j].expand(9), rtol=0, atol=0)
    assert grads["magnitude"][j] == 0
    assert torch.count_nonzero(grads["lora_B"][j]) == 0

    # The other rows: the reference on the layer with row j removed.
    keep = [k for k in range(case.o) if k != j]
    vr = dict(v)
    for k in ("weight", "lora_B", "magnitude", "bias"):
        vr[k] = v[k][keep]
    vr["G"] = v["G"][:, keep]
    if norm_grad == "exact":
        ref_kw["detach_norm"] = False
    y_ref, g_ref = forward_backward(reference.dora_linear, ref_tensors(case, vr, backend), case.scaling, **ref_kw)
    y64, g64 = forward_backward(reference.dora_linear, ref_tensors(case, vr, backend, torch.float64),
                                 case.scaling, **ref_kw)
    assert_close_to_f64(y[:, keep], y_ref, y64, name="y")
    for k in ("x", "lora_A"):
        assert_close_to_f64(grads[k], g_ref[k], g64[k], name=f"d{k}")
    for k in ("lora_B", "magnitude", "bias"):
        assert_close_to_f64(grads[k][keep], g_ref[k], g64[k], name=f"d{k}")


# ---------------------------------------------------------------------------------------------
# what the backward reads: the output y (p = 0), or u

@pytest.mark.parametrize("norm_grad", ["detached", "exact"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in [
    Case((37,), 45, 70, 5, "f32", "none"),
    Case((37,), 45, 70, 5, "f16", "none", "none", "w-T"),
    Case((70,), 45, 36, 20, "bf16", "none", "none", "x-T"),
    Case((9,), 33, 40, 3, "bf16+f32", "none"),
    Case((13,), 33, 40, 3, "f16", "none", "eval"),
    Case((37,), 45, 70, 5, "bf16", "grad"),  # a bias: u is saved, not y
    Case((13,), 33, 40, 3, "f16", "frozen", "eval"),
]])
def test_small_magnitude_rows(case, backend, norm_grad):
    """Rows with |m| ≪ n: the saved output y = g·u carries u there not at all (m = 0) or too
    coarsely, so the backward makes u again for those rows; dm (and the exact norm gradient
    built on it) must match. With a (large) bias the op saves u: the same rows must match too."""
    y, grads = check_parity(case, backend, norm_grad=norm_grad, edit=shrink_some_magnitudes)
    assert torch.count_nonzero(grads["magnitude"][[0, 3, -1]]) == 3, "dm of a zero-magnitude row is not made"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in [
    Case((37,), 45, 70, 5, "f16", "none", "none", "w-T"),
    Case((70,), 45, 36, 20, "bf16", "none", "none", "x-rowpad"),
]])
def test_small_magnitude_rows_past_32_bit_offsets(case, backend, monkeypatch):
    """Where an operand's offsets would pass 31 bits the kernel does not make those rows and the
    launcher makes them with torch (forced here): the same dm."""
    monkeypatch.setattr(launchers, "offsets_fit_int32", lambda t: False)
    check_parity(case, backend, edit=shrink_some_magnitudes)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in [
    Case((37,), 100, 72, 8, "bf16", "grad", "none", "x-rowpad"),
    Case((13,), 130, 150, 5, "f16+f32", "frozen", "eval"),
    Case((9,), 17, 5, 12, "f32", "none", "none", "w-T"),
]])
def test_parity_save_output_false(case, backend):
    check_parity(case, backend, save_output=False)
    check_parity(case, backend, save_output=False, norm_grad="exact", edit=zero_some_magnitudes)


def _saved_during(fn):
    """(result of fn(), the tensors autograd packed while it ran)."""
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = fn()
    return out, packed


@pytest.mark.parametrize("drop, bias, save_output, saves", [
    ("none", "none", True, "y"), ("eval", "none", True, "y"), ("none", "none", False, "u"),
    ("none", "frozen", True, "u"), ("eval", "grad", True, "u"), ("train", "none", True, "u"),
    ("train", "frozen", False, "u"),
])
def test_backward_saves_one_tokens_by_out_tensor(backend, drop, bias, save_output, saves):
    """Without dropout and bias the op keeps its output for the backward and no other (N, out)
    tensor; with dropout, a bias or save_output=False, u (ũ) and not the output."""
    case = Case((11,), 20, 13, 3, "bf16", bias, drop)
    v = values(case, 0)
    t = op_tensors(case, v, backend)
    op_kw, _ = drop_kwargs(case, 5)
    y, packed = _saved_during(lambda: dora_kernels.dora_linear(
        t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], 2.0, t["bias"], save_output=save_output,
        **op_kw))
    big = [p for p in packed if p.shape == y.shape]
    assert len(big) == 1, [tuple(p.shape) for p in packed]
    is_y = big[0].untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    assert is_y == (saves == "y")
    # Besides the inputs and that tensor: xa (N, r), the norm (out,) and the seed.
    inputs = {t[k].untyped_storage().data_ptr() for k in ("x", "weight", "lora_A", "lora_B", "magnitude", "bias")
              if t[k] is not None}
    rest = [p for p in packed if p is not None and p is not big[0] and p.untyped_storage().data_ptr() not in inputs]
    assert sum(p.numel() for p in rest) <= 11 * 3 + 13 + 1, [tuple(p.shape) for p in rest]
    y.backward(t["G"].to(y.dtype))  # and the backward runs on what was saved
    assert torch.isfinite(t["magnitude"].grad).all()


def test_nan_magnitude_rows(backend):
    """dm = Σ G ⊙ u / n does not depend on m: a NaN magnitude (its output column is NaN) still
    gets PEFT's finite dm, read from y or from u alike, and never an unwritten value."""
    case = Case((9,), 20, 40, 3, "f32", "none")
    v = values(case, 0)
    v["magnitude"] = v["magnitude"].clone()
    v["magnitude"][[2, 33]] = float("nan")
    dms = []
    for save_output in (True, False):
        t = op_tensors(case, v, backend)
        y = dora_kernels.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], 2.0,
                                     save_output=save_output)
        assert torch.isnan(y[:, [2, 33]]).all()
        y.backward(t["G"])
        dms.append(t["magnitude"].grad)
    assert torch.isfinite(dms[0]).all() and torch.isfinite(dms[1]).all(), dms
    torch.testing.assert_close(dms[0], dms[1])
    ref = ref_tensors(case, v, backend)
    y_ref = reference.dora_linear(ref["x"], ref["weight"], ref["lora_A"], ref["lora_B"], ref["magnitude"], 2.0)
    y_ref.backward(ref["G"])
    torch.testing.assert_close(dms[0], ref["magnitude"].grad)


@pytest.mark.parametrize("drop", ["none", "train"])
def test_padded_output_gradient(backend, drop):
    """G as a view with padded rows (as torch.cat's backward hands it over), bf16, 37 tokens:
    the same gradients as from its contiguous copy; the skipped bytes (NaN) are never read."""
    case = Case((37,), 33, 40, 3, "bf16", "frozen", drop)
    v = values(case, 0)
    got = []
    for padded in (False, True):
        t = op_tensors(case, v, backend)
        op_kw, _ = drop_kwargs(case, 7)
        y = dora_kernels.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], 2.0, t["bias"],
                                     **op_kw)
        G = t["G"]
        if padded:
            big = torch.full((37, 47), float("nan"), dtype=G.dtype, device=G.device)
            big[:, :40] = G
            G = big[:, :40]
        y.backward(G)
        got.append([t[k].grad for k in ("x", "lora_A", "lora_B", "magnitude")])
    for a, b in zip(*got):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_only_the_bias_needs_a_gradient(backend):
    case = Case((6,), 20, 13, 3, "f32", "grad")
    t = op_tensors(case, values(case, 0), backend)
    for k in ("x", "lora_A", "lora_B", "magnitude"):
        t[k] = t[k].detach()
    y = dora_kernels.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], 2.0, t["bias"])
    y.backward(t["G"])
    torch.testing.assert_close(t["bias"].grad, t["G"].sum(0))


def test_save_output_modes_give_the_same_gradients(backend):
    """Both save modes (the output y, or u) give the same output and gradients."""
    case = Case((7,), 21, 9, 3, "f32", "frozen")
    v = values(case, 1)
    want = None
    for save_output in (True, False):
        t = op_tensors(case, v, backend)
        y = dora_kernels.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], 2.0,
                                     save_output=save_output)  # no bias: the op saves y only then
        y.backward(t["G"])
        got = [y.detach()] + [t[k].grad for k in ("x", "lora_A", "lora_B", "magnitude")]
        if want is None:
            want = got
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# dropout: seeds and replay

def _drop_inputs(device):
    case = Case((16,), 32, 24, 4, "f32", "frozen")
    t = op_tensors(case, values(case, 3), device)
    return [t[k] for k in ("x", "weight", "lora_A", "lora_B", "magnitude")], t["bias"]


def _drop_call(args, bias, **kw):
    return dora_kernels.dora_linear(*args, 2.0, bias, dropout_p=P_DROP, training=True, **kw)


def test_dropout_seed_is_deterministic(backend):
    args, bias = _drop_inputs(backend)
    y1 = _drop_call(args, bias, dropout_seed=11)
    y2 = _drop_call(args, bias, dropout_seed=11)
    y3 = _drop_call(args, bias, dropout_seed=12)
    y0 = dora_kernels.dora_linear(*args, 2.0, bias)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.equal(y1, y3), "different dropout seeds gave the same output"
    assert not torch.equal(y1, y0), "dropout p=0.3 gave the output of p=0"


def test_dropout_unseeded_calls_differ(backend):
    args, bias = _drop_inputs(backend)
    assert not torch.equal(_drop_call(args, bias), _drop_call(args, bias))


def test_dropout_seed_follows_torch_manual_seed(backend):
    args, bias = _drop_inputs(backend)
    torch.manual_seed(1234)
    y1 = _drop_call(args, bias)
    torch.manual_seed(1234)
    y2 = _drop_call(args, bias)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_dropout_replays_under_checkpoint(backend):
    """Activation checkpointing restores the RNG before recomputing, so the recomputed forward
    draws the same seed and the gradients equal those of a plain run."""
    from torch.utils.checkpoint import checkpoint

    args, bias = _drop_inputs(backend)
    G = torch.randn(16, 24, device=backend)
    results = []
    for use_ckpt in (False, True):
        for a in args:
            a.grad = None
        torch.manual_seed(99)
        y = checkpoint(_drop_call, args, bias, use_reentrant=False) if use_ckpt else _drop_call(args, bias)
        y.backward(G)
        results.append([y.detach()] + [a.grad.clone() for a in args if a.requires_grad])
    for plain, ckpt in zip(*results):
        torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)


def test_dropout_mask_rate(backend):
    mask = dora_kernels.dropout_mask(5, (64, 64), P_DROP, backend)
    assert mask.dtype == torch.bool and mask.shape == (64, 64)
    assert abs(mask.float().mean().item() - (1 - P_DROP)) < 0.05
    assert not torch.equal(mask, dora_kernels.dropout_mask(6, (64, 64), P_DROP, backend))
    torch.testing.assert_close(mask, dora_kernels.dropout_mask(5, (64, 64), P_DROP, backend), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# bad inputs

def _good(**over):
    t = {"x": torch.randn(3, 8), "weight": torch.randn(6, 8), "lora_A": torch.randn(2, 8),
         "lora_B": torch.randn(6, 2), "magnitude": torch.rand(6) + 0.5, "scaling": 2.0, "bias": torch.randn(6)}
    t.update(over)
    return t


BAD = [
    ("x-in-dim", {"x": torch.randn(3, 9)}, {}, ValueError, "x"),
    ("x-0d", {"x": torch.tensor(1.0)}, {}, ValueError, "x"),
    ("lora_A-in-dim", {"lora_A": torch.randn(2, 9)}, {}, ValueError, "lora_A"),
    ("lora_B-rank", {"lora_B": torch.randn(6, 3)}, {}, ValueError, "lora_B"),
    ("lora_B-out", {"lora_B": torch.randn(7, 2)}, {}, ValueError, "lora_B"),
    ("magnitude-shape", {"magnitude": torch.rand(7)}, {}, ValueError, "magnitude"),
    ("magnitude-2d", {"magnitude": torch.rand(6, 1)}, {}, ValueError, "magnitude"),
    ("bias-shape", {"bias": torch.randn(5)}, {}, ValueError, "bias"),
    ("weight-1d", {"weight": torch.randn(8)}, {}, ValueError, "weight"),
    ("weight-3d", {"weight": torch.randn(1, 6, 8)}, {}, ValueError, "weight"),
    ("x-int", {"x": torch.ones(3, 8, dtype=torch.int64)}, {}, TypeError, "x"),
    ("lora_A-int", {"lora_A": torch.ones(2, 8, dtype=torch.int32)}, {}, TypeError, "lora_A"),
    ("x-not-tensor", {"x": [[0.0] * 8] * 3}, {}, TypeError, "x"),
    ("weight-dtype", {"weight": torch.randn(6, 8, dtype=torch.float16)}, {}, TypeError, "weight"),
    ("bias-dtype", {"bias": torch.randn(6, dtype=torch.float16)}, {}, TypeError, "bias"),
    ("lora_B-device", {"lora_B": torch.randn(6, 2, device="meta")}, {}, (ValueError, TypeError), "lora_B"),
    ("magnitude-device", {"magnitude": torch.rand(6, device="meta")}, {}, (ValueError, TypeError), "magnitude"),
    ("scaling-nan", {"scaling": float("nan")}, {}, ValueError, "scaling"),
    ("scaling-inf", {"scaling": float("inf")}, {}, ValueError, "scaling"),
    ("scaling-str", {"scaling": "2.0"}, {}, TypeError, "scaling"),
    ("dropout-1", {}, {"dropout_p": 1.0}, ValueError, "dropout_p"),
    ("dropout-neg", {}, {"dropout_p": -0.1}, ValueError, "dropout_p"),
    ("norm_grad", {}, {"norm_grad": "bogus"}, ValueError, "norm_grad"),
    ("rank-0", {"lora_A": torch.randn(0, 8), "lora_B": torch.randn(6, 0)}, {}, ValueError, "lora_A|rank"),
    ("weight_norm-dtype", {}, {"weight_norm": torch.ones(6, dtype=torch.float16)}, ValueError, "weight_norm"),
    ("weight_norm-shape", {}, {"weight_norm": torch.ones(5)}, ValueError, "weight_norm"),
    ("save_output-str", {}, {"save_output": "no"}, TypeError, "save_output"),
    ("save_output-none", {}, {"save_output": None}, TypeError, "save_output"),
]


@pytest.mark.parametrize("over, kwargs, exc, name", [pytest.param(*row[1:], id=row[0]) for row in BAD])
def test_bad_inputs_raise(over, kwargs, exc, name):
    t = _good(**over)
    with pytest.raises(exc, match=name):
        dora_kernels.dora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], t["scaling"],
                                 t["bias"], **kwargs)


@pytest.mark.parametrize("i, o, r", [(5, 1, 8), (3, 4, 16)])
def test_rank_larger_than_dims_is_allowed(i, o, r):
    y = dora_kernels.dora_linear(torch.randn(2, i), torch.randn(o, i), torch.randn(r, i), torch.randn(o, r),
                                 torch.rand(o) + 0.5, 1.0)
    assert y.shape == (2, o) and torch.isfinite(y).all()
