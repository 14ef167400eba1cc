"""Fine-tune a small Llama-shaped model with PEFT DoRA, plain and after ``dora_kernels.fuse``.

Builds a randomly initialised model from ``transformers.LlamaConfig`` (nothing is downloaded),
wraps it with PEFT LoRA ``use_dora=True`` on q/k/v/o/gate/up/down, and trains it twice from
the same initial weights on the same synthetic tokens: once with PEFT's own DoRA, once after
``dora_kernels.fuse(model)``. Prints both loss curves side by side, their largest difference,
the median step time and the memory each run needs; exits 1 if the curves differ by more
than the tolerance.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the training steps. On every
device, also the bytes of the tensors autograd saves for the backward of one step (each
storage once, parameters excluded), counted with ``torch.autograd.graph.saved_tensors_hooks``:
the activation memory that DoRA's extra (N, out) tensors inflate. (``tracemalloc`` does not
see torch's allocations, so a CPU peak is not reported.)

On a CPU the op runs its pure-torch path (fast); ``--interpret`` runs the real Triton kernels
through Triton's interpreter instead (slow: use few steps and a small model).

    python examples/finetune_llama_dora.py --steps 20
    python examples/finetune_llama_dora.py --device cuda --dtype bfloat16 --hidden 1024 --layers 4
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="base model dtype; the adapters stay fp32 (PEFT's autocast_adapter_dtype)")
    p.add_argument("--interpret", action="store_true", help="CPU: run the Triton kernels in Triton's interpreter")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--tol", type=float, default=None,
                   help="largest allowed |loss difference| / loss (default 1e-4 fp32, 2e-2 half)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before the import
    else:
        os.environ.setdefault("TRITON_INTERPRET", "0")

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    import dora_kernels

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    tol = args.tol if args.tol is not None else (1e-4 if dtype == torch.float32 else 2e-2)

    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 16)
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=heads,
                                   num_key_value_heads=max(1, heads // 2), max_position_embeddings=max(64, args.seq))
    base = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, use_dora=True,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    initial = get_peft_model(base, lora)

    data = synthetic_batches(args, device)

    runs = {}
    for name in ("peft", "fused"):
        model = copy.deepcopy(initial)
        if name == "fused":
            dora_kernels.fuse(model)
            n_fused = len(dora_kernels.fused_layers(model))
        runs[name] = train(model, data, args.lr, device)

    peft_losses, fused_losses = runs["peft"]["losses"], runs["fused"]["losses"]
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(peft_losses, fused_losses)]
    print(f"Llama {args.layers}x{args.hidden}, vocab {args.vocab}, DoRA r={args.rank} on 7 projections "
          f"({n_fused} fused layers), batch {args.batch}x{args.seq}, {dtype}, {device}"
          + (", Triton interpreter" if args.interpret else ", torch path" if device.type == "cpu" else ""))
    print(f"{'step':>4}  {'PEFT loss':>10}  {'fused loss':>10}  {'|diff|':>9}")
    for i, (a, b) in enumerate(zip(peft_losses, fused_losses)):
        print(f"{i:4d}  {a:10.6f}  {b:10.6f}  {abs(a - b):9.2e}")
    print(f"max |diff| / loss: {max(rel):.2e} (tolerance {tol:.0e})")
    for name in ("peft", "fused"):
        r = runs[name]
        mem = f", peak {r['peak'] / 2**20:.1f} MiB allocated" if r["peak"] is not None else ""
        print(f"{name:>5}: median step {r['step_ms']:.1f} ms, saved for backward {r['saved'] / 2**20:.2f} MiB{mem}")
    if device.type == "cpu":
        print("(CPU step times measure the op's torch path or the interpreter, not the GPU kernels)")
    if max(rel) > tol:
        print("FAIL: the fused loss curve departs from PEFT's", file=sys.stderr)
        return 1
    return 0


def synthetic_batches(args, device):
    """Learnable synthetic tokens: each row counts up from a random start by a random stride
    (mod vocab), so the loss falls within a few steps."""
    import torch

    gen = torch.Generator().manual_seed(args.seed + 1)
    pos = torch.arange(args.seq)
    batches = []
    for _ in range(args.steps):
        start = torch.randint(0, args.vocab, (args.batch, 1), generator=gen)
        stride = torch.randint(1, 4, (args.batch, 1), generator=gen)
        batches.append(((start + stride * pos) % args.vocab).to(device))
    return batches


def train(model, data, lr, device):
    import torch

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times, saved = [], [], 0
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for i, ids in enumerate(data):
        sync()
        t0 = time.perf_counter()
        if i == 0:
            storages = {}

            def pack(t):
                s = t.untyped_storage()
                if s.data_ptr() not in params:
                    storages[s.data_ptr()] = s.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
            saved = sum(storages.values())
        else:
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    step_ms = 1e3 * statistics.median(times[2:] if len(times) > 4 else times)
    return {"losses": losses, "step_ms": step_ms, "saved": saved, "peak": peak}


if __name__ == "__main__":
    sys.exit(main())
