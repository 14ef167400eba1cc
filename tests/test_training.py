"""A fused PEFT model in the training set-ups users wrap it in: autocast and activation
checkpointing (torch's and transformers'). DDP: ``test_ddp.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import dora_kernels

from conftest import DEVICE

peft = pytest.importorskip("peft")

IN, HID, OUT, R = 16, 24, 12, 4


def tiny_peft(dropout=0.0, dtype=torch.float32, device=DEVICE):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT, bias=False)).to(device=device, dtype=dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=8, target_modules=["0", "2"], use_dora=True,
                                                      lora_dropout=dropout, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
    return model


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# autocast

@pytest.mark.parametrize("device, dtype", [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    pytest.param("cuda", torch.float16, id="cuda-f16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_autocast_dtypes_match_peft(device, dtype):
    """Under autocast the fused layer returns what nn.Linear + PEFT's DoRA return: the output in
    the autocast dtype, dx in x's dtype, adapter gradients in the adapters' dtype."""
    model = tiny_peft(device=device)
    ref = copy.deepcopy(model)
    dora_kernels.fuse(model)
    x = torch.randn(4, 3, IN, device=device)
    out = {}
    for name, m in (("fused", model), ("peft", ref)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast(device, dtype=dtype):
            y = m(xi)
        y.float().square().sum().backward()
        out[name] = (y, xi.grad, grads_of(m))
    (y, dx, g), (y_ref, dx_ref, g_ref) = out["fused"], out["peft"]
    assert y.dtype == y_ref.dtype == dtype
    assert dx.dtype == dx_ref.dtype == torch.float32
    assert {k: v.dtype for k, v in g.items()} == {k: v.dtype for k, v in g_ref.items()}
    # both round through the autocast dtype: compare at its precision, relative to the scale
    for a, b in [(y, y_ref), (dx, dx_ref)] + [(g[k], g_ref[k]) for k in g]:
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=4e-2 * scale)


# ---------------------------------------------------------------------------------------------
# activation checkpointing

@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_checkpoint_replays_dropout(reentrant):
    """torch.utils.checkpoint restores the RNG before recomputing: the op draws the same seed,
    so the gradients equal a plain run's bit for bit."""
    model = dora_kernels.fuse(tiny_peft(dropout=0.3))
    x = torch.randn(5, IN, device=DEVICE)
    results = []
    for use_ckpt in (False, True):
        xi = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        y = checkpoint(model, xi, use_reentrant=reentrant) if use_ckpt else model(xi)
        y.square().sum().backward()
        results.append((y.detach(), xi.grad, grads_of(model)))
    (y0, dx0, g0), (y1, dx1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(dx1, dx0, rtol=0, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=0, atol=0, msg=k)


def test_transformers_gradient_checkpointing_llama():
    """transformers' gradient_checkpointing_enable() on a fused tiny Llama with DoRA dropout."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(cfg).to(DEVICE)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=R, lora_alpha=8, lora_dropout=0.1, use_dora=True, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    dora_kernels.fuse(model)
    assert len(dora_kernels.fused_layers(model)) == 7
    model.train()
    ids = torch.randint(0, 64, (2, 6), device=DEVICE)
    results = []
    for ckpt in (False, True):
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.base_model.model.model.gradient_checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), grads_of(model)))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert len(g0) == 21
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7, msg=k)
