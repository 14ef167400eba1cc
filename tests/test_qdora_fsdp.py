"""QDoRA under FSDP2: a fused PEFT model over bitsandbytes ``Linear4bit`` layers with 16-bit
``quant_storage``, sharded by ``torch.distributed.fsdp.fully_shard`` over two CPU processes
(gloo), each on half the batch, gets the loss and the adapter gradients one process gets on the
whole batch.

``fully_shard`` turns every parameter into a DTensor shard and, before a sharded module runs,
sets the gathered (unsharded) parameters on it: for the bf16-storage weight a plain
``nn.Parameter`` that has lost ``Params4bit``'s ``quant_state``. bitsandbytes then reads
``module.quant_state`` (``fix_4bit_weight_quant_state_from_module``); the fused path reads it the
same way (``QuantWeight.from_module``). The children record, at each call, what the fused path
was handed (the gathered weight, no quant_state on it) and that it ran.

The model: three PEFT DoRA layers (37 → 40 → 36 → 28, the middle one without bias; ``in`` no
multiple of the blocksize 64, nor of 16: bitsandbytes' CPU kernel is wrong there, see
test_qdora.py), nf4 with double quantisation, lora_B random and the magnitudes moved off
``‖W0 + s·B·A‖`` (g ≠ 1). Each layer and the root are sharded (``reshard_after_forward``: the
backward gathers the weights again). Cases: an fp32 model in PEFT's two forms (``lora.bnb`` and
the generic ``lora.Linear``) and a bf16 model (x and the base weight's dtype bf16, the adapters
fp32 as PEFT keeps them). One spawn runs these cases (PEFT and bitsandbytes take seconds to import
in each process). Every process runs the op's torch path (``DORA_KERNELS_BACKEND=torch``): the
FSDP2 part (the descriptor read from the gathered weight) is the same on both backends, and the
interpreter's first launches cost seconds per process. ``fuse`` comes before ``fully_shard``
(``fully_shard`` swaps each sharded layer's class for a subclass, ``FSDPLinear4bit``, which a later
``fuse`` does not recognise: it leaves such layers on PEFT's path and reports them).

A fourth case, in a spawn of its own, modifies two fused layers' outputs in place (the model
fused with ``save_output=False``, as the package asks for that): the fused op returns a view of
its output (``y.reshape(*lead, out)`` in ``dora_linear``), FSDP2 warns that an in-place op on a
sharded module's view output drops its pre-backward hook, and it does: the layer's weights are
not gathered again for the backward, which reads the freed storage of its saved unsharded
parameters (a SIGSEGV on a CPU), and its gradients are never reduce-scattered. PEFT's own layers
(whose output is no view) run that model under FSDP2 correctly.

Tolerances: FSDP2 changes only how the same fp32 sums are associated (each rank's GEMMs and
token reductions over half the tokens, then the two halves averaged), so its gradients are held
to the single process's (a) by the shared rule against float64 (PEFT's DoRA on the dequantised
weights: err ≤ 3·err(single process) + 2 ulps of the result's scale) and (b) directly, to 16 fp32
ulps of each gradient's largest entry (2 bf16 ulps for the bf16 model). The single process is held
to PEFT's own QDoRA by the same rule.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import dora_kernels
import reference
from dora_kernels import quant
from dora_kernels.quant import QuantWeight, dequantize
from gloo import free_port, init_gloo
from tolerance import EPS, assert_close_to_f64

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
_fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(_fsdp, "fully_shard"):
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available", allow_module_level=True)

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402

WORLD = 2
LAYERS = (("l0", 37, 40, True), ("l1", 40, 36, False), ("l2", 36, 28, True))  # name, in, out, bias
IN, OUT = LAYERS[0][1], LAYERS[-1][2]
NAMES = [f"base_model.model.{name}" for name, *_ in LAYERS]
R = 4
BATCH = (4, 3)  # x (4, 3, IN): each rank takes two of the four sequences
STORAGE = torch.bfloat16


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype  # x's, the base weight's (quant_state.dtype) and its bias's; the adapters fp32
    form: str  # "bnb": PEFT's lora.bnb.Linear4bit (the model flagged as loaded in 4 bits); "generic": lora.Linear
    in_place: bool = False  # the model scales l0's and l1's outputs in place (fused with save_output=False)

    def __str__(self):
        return f"{'f32' if self.dtype == torch.float32 else 'bf16'}-{self.form}{'-inplace' if self.in_place else ''}"


CASES = (Case(torch.float32, "bnb"), Case(torch.float32, "generic"), Case(torch.bfloat16, "bnb"))
IN_PLACE = Case(torch.float32, "bnb", in_place=True)


# ---------------------------------------------------------------------------------------------
# the model (built the same in every process)

def _linear4bit(in_, out, bias, dtype):
    lin = nn.Linear(in_, out, bias=bias).to(dtype)
    q = bnb.nn.Linear4bit(in_, out, bias=bias, compute_dtype=dtype, quant_type="nf4", compress_statistics=True,
                          quant_storage=STORAGE)
    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=64, compress_statistics=True,
                                 quant_type="nf4", quant_storage=STORAGE, module=q)
    if bias:
        q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    q = q.to("cpu")  # bitsandbytes quantises here (and sets q.quant_state: module=q)
    q.support_avx512bf16_for_cpu = False  # no CPU repacking (test_qdora.py)
    return q


class Net(nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        for name, in_, out, bias in LAYERS:
            setattr(self, name, _linear4bit(in_, out, bias, case.dtype))
        self.in_place = case.in_place

    def forward(self, x):  # tanh: smooth (a ReLU's kinks flip with bf16 rounding, away from float64)
        h = self.l0(x)
        if self.in_place:
            h.mul_(1.25)
        h = self.l1(torch.tanh(h))
        if self.in_place:
            h.add_(0.1)
        return self.l2(torch.tanh(h))


def qdora_net(case: Case):
    """The fused PEFT DoRA model of ``case``."""
    torch.manual_seed(0)
    net = Net(case)
    if case.form == "bnb":
        net.is_loaded_in_4bit = True
    torch.manual_seed(1)
    model = get_peft_model(net, LoraConfig(r=R, lora_alpha=8, target_modules=[n for n, *_ in LAYERS],
                                           use_dora=True, init_lora_weights=False))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in NAMES:
            layer = model.get_submodule(name)
            B = layer.lora_B["default"].weight
            B.copy_(0.3 * torch.randn(B.shape, generator=gen))  # B = 0 would hide half the gradients
            m = layer.lora_magnitude_vector["default"].weight
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=gen))  # g = m/n ≠ 1
    assert dora_kernels.fuse(model, save_output=False if case.in_place else None) is model
    report = dora_kernels.fuse_report(model)
    assert report.fused == NAMES and not report.skipped
    want = lora_bnb.Linear4bit if case.form == "bnb" else lora_layer.Linear
    assert all(type(model.get_submodule(n))._dora_kernels_base is want for n in NAMES)
    return model


def batch(case: Case):
    gen = torch.Generator().manual_seed(4)
    return torch.randn(*BATCH, IN, generator=gen).to(case.dtype), torch.randn(*BATCH, OUT, generator=gen)


def loss_of(model, x, t):
    return nn.functional.mse_loss(model(x).float(), t)


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# the children

@contextlib.contextmanager
def _spies(seen: list, ops_calls: list):
    """Record what ``QuantWeight.from_module`` is handed, and count the fused op's calls."""
    from torch.distributed.tensor import DTensor

    real_from_module = QuantWeight.from_module.__func__
    real_op = quant.dora_linear

    def from_module(cls, module):
        w = module.weight
        seen.append({"type": type(w).__name__, "dtensor": isinstance(w, DTensor),
                     "weight_quant_state": getattr(w, "quant_state", None) is not None,
                     "module_quant_state": getattr(module, "quant_state", None) is not None,
                     "shape": tuple(w.shape), "dtype": w.dtype})
        return real_from_module(cls, module)

    QuantWeight.from_module = classmethod(from_module)
    quant.dora_linear = lambda *a, **k: ops_calls.append(1) or real_op(*a, **k)
    try:
        yield
    finally:
        QuantWeight.from_module = classmethod(real_from_module)
        quant.dora_linear = real_op


def _run_case(case: Case, rank: int, world: int):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = qdora_net(case)
    for name in NAMES:
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    assert dora_kernels.fused_layers(model) == NAMES  # (FSDP2's class swap keeps the fused forward)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    x, t = batch(case)
    n = x.shape[0] // world
    seen, ops_calls = [], []
    with _spies(seen, ops_calls), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = loss_of(model, x[rank * n:(rank + 1) * n], t[rank * n:(rank + 1) * n])
        # resharded after forward: the backward gathers the weights again
        resharded = [isinstance(model.get_submodule(name).get_base_layer().weight, DTensor) for name in NAMES]
        forward_calls = len(ops_calls)
        loss.backward()
    # FSDP2 leaves each gradient a DTensor shard, reduce-scattered (averaged) over the ranks; one
    # that is not was never reduced (its post-backward did not run): kept as it is, and named.
    grads, unreduced = {}, []
    for name, p in trainable(model):
        if isinstance(p.grad, DTensor):
            grads[name] = p.grad.full_tensor().detach().clone()
        else:
            unreduced.append(f"{name} ({type(p).__name__}, grad {type(p.grad).__name__})")
            grads[name] = p.grad.detach().clone().reshape(p.shape)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return {"loss": total / world, "grads": grads, "unreduced": unreduced, "seen": seen, "ops_calls": len(ops_calls),
            "forward_calls": forward_calls, "resharded": resharded,
            "warnings": sorted({str(w.message).split(".")[0] for w in caught})}


def _worker(rank, world, port, out_dir, cases):
    import torch.distributed as dist

    init_gloo(rank, world, port)
    try:
        assert dora_kernels.get_backend() == "torch"  # from DORA_KERNELS_BACKEND
        torch.save({str(case): _run_case(case, rank, world) for case in cases}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def spawn(out, cases):
    """{rank: {str(case): the child's results}}: one spawn of two processes for ``cases``."""
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("DORA_KERNELS_BACKEND", "torch")
        mp.spawn(_worker, args=(WORLD, free_port(), str(out), list(cases)), nprocs=WORLD, join=True)
    return {rank: torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    return spawn(tmp_path_factory.mktemp("qdora_fsdp"), CASES)


# ---------------------------------------------------------------------------------------------
# the references: one process on the whole batch, and float64

def single_process(case: Case, *, fused=True):
    """The model, loss and adapter gradients of one process on the whole batch: the fused model,
    or (``fused=False``) PEFT's own QDoRA on the same model."""
    model = qdora_net(case)
    if not fused:
        dora_kernels.unfuse(model)
    x, t = batch(case)
    calls = []
    real = quant.dora_linear
    quant.dora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with dora_kernels.use_backend("torch"):
            loss = loss_of(model, x, t)
            loss.backward()
    finally:
        quant.dora_linear = real
    assert len(calls) == (len(NAMES) if fused else 0)
    return model, loss.detach(), {name: p.grad.detach().clone() for name, p in trainable(model)}


def f64_reference(model, case: Case):
    """Loss and adapter gradients of PEFT's DoRA on the dequantised weights, in float64."""
    x, t = batch(case)
    h = x.double()
    leaves = {}
    for i, name in enumerate(NAMES):
        layer = model.get_submodule(name)
        base = layer.get_base_layer()
        W = dequantize(QuantWeight.from_module(base)).double()
        parts = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
                 "lora_magnitude_vector": layer.lora_magnitude_vector["default"].weight}
        for part, p in parts.items():
            leaves[f"{name}.{part}.default.weight"] = p.detach().double().requires_grad_()
        A, B, m = (leaves[f"{name}.{part}.default.weight"] for part in parts)
        bias = base.bias.detach().double() if base.bias is not None else None
        h = reference.dora_linear(h, W, A, B, m, layer.scaling["default"], bias, training=False)
        if case.in_place and i < 2:
            h = h * 1.25 if i == 0 else h + 0.1
        if i < len(NAMES) - 1:
            h = torch.tanh(h)
    loss = nn.functional.mse_loss(h, t.double())
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


# ---------------------------------------------------------------------------------------------
# the tests

def assert_gradients_equal_single_process(case, fsdp_runs):
    model, loss, single = single_process(case)
    _, loss_peft, peft = single_process(case, fused=False)
    loss64, g64 = f64_reference(model, case)
    assert len(single) == 3 * len(NAMES) and single.keys() == peft.keys() == g64.keys()
    assert all(g.dtype == torch.float32 and g.abs().max() > 0 for g in single.values())
    # The single process itself: the fused model against PEFT's QDoRA (same dtypes) and float64.
    assert_close_to_f64(loss, loss_peft, loss64, name="single-process loss")
    for name, g in single.items():
        assert_close_to_f64(g, peft[name], g64[name], name=f"single process: {name}")
    # FSDP2: the same per-token arithmetic, the fp32 sums over tokens split in two and averaged.
    # fp32 direct: 16 ulps of each gradient's largest entry (the reassociation of a 12-token sum);
    # bf16: a 16-bit GEMM may round a row differently at another token count, so 2 bf16 ulps.
    eps = 16 * EPS[torch.float32] if case.dtype == torch.float32 else 2 * EPS[torch.bfloat16]
    for rank in range(WORLD):
        got = fsdp_runs[rank][str(case)]
        assert got["grads"].keys() == single.keys()
        assert not got["unreduced"], (
            f"rank {rank}: FSDP2 never reduce-scattered {got['unreduced']}: the pre-backward hook it puts on a "
            "sharded layer's output was lost (an in-place op on a view output drops it; FSDP2's warnings: "
            f"{got['warnings']})")
        assert_close_to_f64(got["loss"], loss, loss64, name=f"rank {rank}: loss")
        torch.testing.assert_close(got["loss"], loss, rtol=eps, atol=0, msg=f"rank {rank}: loss")
        for name, g in single.items():
            assert got["grads"][name].dtype == g.dtype, name
            assert_close_to_f64(got["grads"][name], g, g64[name], name=f"rank {rank}: {name}")
            torch.testing.assert_close(got["grads"][name], g, rtol=0, atol=eps * g64[name].abs().max().item(),
                                       msg=f"rank {rank}: {name}")
    for name in single:  # both ranks hold the same full gradient
        assert torch.equal(fsdp_runs[0][str(case)]["grads"][name], fsdp_runs[1][str(case)]["grads"][name]), name


def assert_fused_path_on_the_gathered_weight(case, fsdp_runs):
    """Each layer's forward ran the fused op once, handed the gathered bf16-storage weight: a plain
    Parameter (no DTensor, no Params4bit) of the whole weight, without quant_state; the layer's
    own quant_state is what it read. The weights were sharded again before the backward."""
    want_shapes = [((in_ * out + 1) // 2 // STORAGE.itemsize, 1) for _, in_, out, _ in LAYERS]
    for rank in range(WORLD):
        got = fsdp_runs[rank][str(case)]
        assert got["forward_calls"] == got["ops_calls"] == len(NAMES)  # none from the backward
        assert [s["shape"] for s in got["seen"]] == want_shapes
        for s in got["seen"]:
            assert s == {"type": "Parameter", "dtensor": False, "weight_quant_state": False,
                         "module_quant_state": True, "shape": s["shape"], "dtype": STORAGE}
        assert got["resharded"] == [True] * len(NAMES)


def test_single_process_weight_keeps_its_quant_state():
    """The contrast: unsharded, the weight is bitsandbytes' Params4bit carrying quant_state."""
    model = qdora_net(CASES[0])
    for name in NAMES:
        w = model.get_submodule(name).get_base_layer().weight
        assert isinstance(w, bnb.nn.Params4bit) and w.quant_state is not None and w.dtype == STORAGE


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fsdp2_gradients_equal_single_process(case, fsdp_runs):
    assert_gradients_equal_single_process(case, fsdp_runs)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fsdp2_runs_the_fused_path_on_the_gathered_weight(case, fsdp_runs):
    assert_fused_path_on_the_gathered_weight(case, fsdp_runs)


def test_fsdp2_in_place_on_a_fused_output(tmp_path):
    """A model that scales l0's and l1's outputs in place (fused with ``save_output=False``) gets
    the single process's gradients under FSDP2, as PEFT's own layers do. Fails while the fused op
    returns a view (see the module doc): FSDP2 then loses its pre-backward hook on the layer."""
    try:
        runs = spawn(tmp_path, [IN_PLACE])
    except mp.ProcessExitedException as e:
        pytest.fail(f"a child died under FSDP2 ({e}): the in-place op on the fused layer's output (a view) dropped "
                    "FSDP2's pre-backward hook, so the backward read the freed storage of the layer's unsharded "
                    "parameters", pytrace=False)
    assert_fused_path_on_the_gathered_weight(IN_PLACE, runs)
    assert_gradients_equal_single_process(IN_PLACE, runs)
