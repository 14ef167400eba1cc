"""``torch.compile`` sees the fused op as one node: no graph break, eager's numbers.

The op is a ``torch.library.custom_op`` (opaque to the compiler: the launchers run on real
tensors at run time), so these tests run on a CPU on either backend; the compiled Triton path
on a GPU is tested where one is present. ``torch.library.opcheck`` holds the fake (meta)
functions to the real ones.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dora_kernels

M_, K_, R_ = 12, 16, 4

# opcheck's schema test goes through torch.jit, which warns that it is deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def two_layers(device, dropout=0.0, norm_grad="detached"):
    torch.manual_seed(0)
    model = nn.Sequential(dora_kernels.DoRALinear(K_, 24, r=R_, dropout=dropout, norm_grad=norm_grad), nn.GELU(),
                          dora_kernels.DoRALinear(24, M_, r=R_, bias=False, dropout=dropout, norm_grad=norm_grad))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(std=0.2)
            layer.magnitude.mul_(1.1)
    return model.to(device)


def step(model, x, seed=0):
    """Output and the gradients of x and every trainable parameter."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    y.square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


def assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, msg=f"item {i}", **tol)


# ---------------------------------------------------------------------------------------------
# the registered ops

def _fwd_args(device, *, p, bias, exact, norm, dtype=torch.float32, save_output=False):
    torch.manual_seed(0)
    x = torch.randn(9, K_, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(M_, K_, device=device, dtype=dtype) / 4
    A = (torch.randn(R_, K_, device=device) / 4).requires_grad_(True)
    B = (torch.randn(M_, R_, device=device) / 4).requires_grad_(True)
    m = (torch.rand(M_, device=device) + 0.5).requires_grad_(True)
    b = torch.randn(M_, device=device, dtype=dtype) if bias else None
    n = dora_kernels.weight_norm(w, A.detach(), B.detach(), 2.0)[0] if norm else None
    seed = torch.tensor([7]) if p > 0 else None
    return (x, w, A, B, m, 2.0, b, n, p, seed, "exact" if exact else "detached", not save_output, save_output)


@pytest.mark.parametrize("case", [
    dict(p=0.0, bias=True, exact=False, norm=False),
    dict(p=0.3, bias=False, exact=False, norm=False),
    dict(p=0.0, bias=False, exact=True, norm=False),
    dict(p=0.0, bias=True, exact=False, norm=True),
    dict(p=0.3, bias=True, exact=False, norm=False, dtype=torch.bfloat16),
    dict(p=0.0, bias=False, exact=False, norm=False, save_output=True),
    dict(p=0.0, bias=False, exact=True, norm=False, save_output=True),
], ids=["p0-bias", "p0.3", "exact", "given-norm", "p0.3-bf16-f32adapters", "p0-save_output", "exact-save_output"])
def test_opcheck(case, backend):
    args = _fwd_args(backend, **case)
    torch.library.opcheck(torch.ops.dora_kernels.dora_forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))
    x, w, A, B, m, s, b, n, p, seed, norm_grad, need_u, save_output = args
    y, xa, u, norm, wa = torch.ops.dora_kernels.dora_forward(*args)
    exact = norm_grad == "exact"
    if n is not None and not exact:
        norm = n  # a given norm is used, not returned
    dy = torch.randn_like(y)
    bwd_args = (dy, x.detach(), w, A.detach(), B.detach(), m.detach(), s, b, norm, xa,
                y.detach() if save_output else u, wa if exact else None, p, seed, norm_grad, save_output,
                True, True, True, True, b is not None)
    torch.library.opcheck(torch.ops.dora_kernels.dora_backward.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# no graph break, eager's numbers

def test_two_layers_no_graph_break(backend):
    model = two_layers(backend)
    x = torch.randn(2, 5, K_, device=backend)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_all_close(step(compiled, x), step(model, x), rtol=1e-6, atol=1e-6)


def test_inductor_fullgraph_matches_eager(torch_backend):
    model = two_layers(torch_backend)
    x = torch.randn(2, 5, K_)
    compiled = torch.compile(model, fullgraph=True)
    assert_all_close(step(compiled, x), step(model, x), rtol=1e-5, atol=1e-5)


def test_exact_norm_grad_compiles(torch_backend):
    model = two_layers(torch_backend, norm_grad="exact")
    x = torch.randn(6, K_)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_all_close(step(compiled, x), step(model, x), rtol=1e-6, atol=1e-6)


def test_dropout_compiles_without_graph_break(torch_backend):
    """The seed is a tensor drawn inside the graph: no ``.item()`` break. With a fixed seed the
    compiled op equals eager."""
    model = two_layers(torch_backend, dropout=0.3)
    x = torch.randn(6, K_)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons

    layer = model[0]

    def f(x):
        return dora_kernels.dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling,
                                        layer.bias, dropout_p=0.3, dropout_seed=11)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x), rtol=1e-6, atol=1e-6)


def test_fused_peft_model_no_graph_break(torch_backend):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(K_, 24), nn.ReLU(), nn.Linear(24, M_))
    model = peft.get_peft_model(base, peft.LoraConfig(r=R_, target_modules=["0", "2"], use_dora=True,
                                                      init_lora_weights=False))
    dora_kernels.fuse(model)
    x = torch.randn(3, K_)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    ops_in_graph = [str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("dora_forward" in t for t in ops_in_graph) == 2, ops_in_graph
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_all_close(step(compiled, x), step(model, x), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling the Triton path needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_inductor_matches_eager(dtype):
    model = two_layers("cuda")
    for layer in (model[0], model[2]):
        layer.weight.data = layer.weight.data.to(dtype)
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(4, 33, K_, device="cuda", dtype=dtype)
    compiled = torch.compile(model, fullgraph=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_all_close(step(compiled, x), step(model, x), **tol)


def test_fused_peft_conv_and_embedding_compile_without_graph_break(backend):
    """A PEFT model with DoRA Conv2d and Embedding layers, fused: ``torch.compile`` traces it whole
    (fullgraph; traced code takes the torch ops of the combination and the norm, which the compiler
    can trace and fuse, instead of the kernels' launches) and gives eager's numbers, which on the
    Triton backend come from the kernels."""
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 10, 3, padding=1)
            self.emb = nn.Embedding(50, 12)

        def forward(self, x):
            return self.conv(x).mean((2, 3)).sum(1, keepdim=True) + self.emb(torch.arange(5, device=x.device)).sum()

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, target_modules=["conv", "emb"], use_dora=True,
                                                       init_lora_weights=False)).to(backend)
    dora_kernels.fuse(model)
    assert len(dora_kernels.fused_layers(model)) == 2
    x = torch.randn(2, 6, 9, 9, device=backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for i, (a, b) in enumerate(zip(step(compiled, x), step(model, x))):  # (fp32 roundings of two paths)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * b.abs().max().item(), msg=f"item {i}")
