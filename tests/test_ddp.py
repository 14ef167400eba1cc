"""DDP over fused layers: two CPU processes (gloo), each on half the batch, get the gradients
one process gets on the whole batch.

The worker lives in this module, which imports neither PEFT nor transformers (slow to import
in each spawned process): the model is ``reference.DoRALinear`` layers converted by ``fuse``.
Every process runs the op's torch path on the CPU (the children get ``DORA_KERNELS_BACKEND=torch``:
the interpreter's first launch costs seconds per process).
"""

from __future__ import annotations


import torch
import torch.multiprocessing as mp
from torch import nn

import dora_kernels
import reference
from gloo import free_port, init_gloo

IN, HID, OUT = 16, 24, 12


def fused_model():
    torch.manual_seed(0)
    model = nn.Sequential(reference.DoRALinear(IN, HID, r=4), nn.ReLU(), reference.DoRALinear(HID, OUT, r=4))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(std=0.2)
            layer.magnitude.mul_(1.1)
    return dora_kernels.fuse(model)


def batch():
    gen = torch.Generator().manual_seed(4)
    return torch.randn(8, IN, generator=gen), torch.randn(8, OUT, generator=gen)


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_gloo(rank, world, port)
    try:
        assert dora_kernels.get_backend() == "torch"  # from DORA_KERNELS_BACKEND
        model = fused_model()
        assert dora_kernels.fused_layers(model) == ["0", "2"]
        ddp = DDP(model)
        x, t = batch()
        n = x.shape[0] // world
        loss = nn.functional.mse_loss(ddp(x[rank * n:(rank + 1) * n]), t[rank * n:(rank + 1) * n])
        loss.backward()
        torch.save(grads_of(model), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def test_ddp_gradients_equal_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("DORA_KERNELS_BACKEND", "torch")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model = fused_model()
    x, t = batch()
    with dora_kernels.use_backend("torch"):
        nn.functional.mse_loss(model(x), t).backward()
    single = grads_of(model)
    assert len(single) == 6
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == single.keys()
        for k in single:
            torch.testing.assert_close(got[k], single[k], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {k}")
