"""Timing and memory measurements.

Time: on a GPU ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (CUDA events, L2
flushed before each call); on a CPU wall-clock ``time.perf_counter`` around each call after a
warm-up, garbage collection off while timing. Either way the gradients in ``grad_to_none``
are reset before each timed call, outside the timed region. A call with an untimed ``setup``
(the backward mode re-runs the forward before each timed backward) uses the same method with
a loop of its own on a GPU. Results in milliseconds.

Memory, two measures:

- ``peak`` (GPU only): ``torch.cuda.max_memory_allocated()`` during one call, after
  ``reset_peak_memory_stats``, minus the memory allocated before it (weights, input, the
  upstream gradient). For a training step this includes the parameter gradients it creates.
- ``saved`` (any device): the bytes of the distinct storages that autograd saves for backward
  during the forward (seen through ``torch.autograd.graph.saved_tensors_hooks``) and still
  holds when the forward returns, plus the output, leaving out the storages of the layer's
  parameters (held whatever the method). The input counts when it is saved: in a network, a
  layer that saves its input keeps it alive (a frozen ``nn.Linear`` does not save it). This is
  what a layer adds to a training step's activation memory; on a CPU it stands in for the
  peak, which the CPU allocator does not report.
"""

from __future__ import annotations

import gc
import time
import weakref

import torch

QUANTILES = (0.5, 0.2, 0.8)


def _clear(grad_to_none):
    for t in grad_to_none or ():
        t.grad = None


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def bench(fn, device: str, *, setup=None, grad_to_none=None, warmup_ms: float = 25.0, rep_ms: float = 100.0,
          min_reps: int = 5, max_reps: int = 10_000) -> tuple[float, float, float]:
    """(median, p20, p80) of ``fn``'s run time in ms; see the module docstring.

    With ``setup``, each call is ``fn(setup())`` and only ``fn`` is timed (the backward mode:
    ``setup`` runs the forward, ``fn`` the backward).
    """
    if device == "cuda":
        if setup is None:
            import triton.testing

            return tuple(float(v) for v in triton.testing.do_bench(
                fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES)))
        return _cuda_bench_setup(fn, setup, grad_to_none, warmup_ms, rep_ms)
    return _cpu_bench(fn, setup, grad_to_none, warmup_ms, rep_ms, min_reps, max_reps)


def _quantiles(times_ms):
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(v) for v in q)


def _cuda_bench_setup(fn, setup, grad_to_none, warmup_ms, rep_ms):
    """do_bench's method (CUDA events, L2 flushed before each timed call) with an untimed
    ``setup`` before each call."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def once(timed):
        _clear(grad_to_none)
        arg = setup()
        flush.zero_()
        if timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            return start, end
        fn(arg)
        return None

    once(False)
    torch.cuda.synchronize()
    est = [once(True) for _ in range(5)]
    torch.cuda.synchronize()
    est_ms = max(sum(s.elapsed_time(e) for s, e in est) / len(est), 1e-4)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        once(False)
    events = [once(True) for _ in range(max(1, int(rep_ms / est_ms)))]
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in events])


def _cpu_bench(fn, setup, grad_to_none, warmup_ms, rep_ms, min_reps, max_reps):
    def once():
        _clear(grad_to_none)
        if setup is None:
            t0 = time.perf_counter()
            fn()
        else:
            arg = setup()
            t0 = time.perf_counter()
            fn(arg)
        return time.perf_counter() - t0

    once()
    est = max(once(), 1e-7)
    for _ in range(max(0, int(warmup_ms / 1e3 / est) - 1)):
        once()
    n = min(max_reps, max(min_reps, int(rep_ms / 1e3 / est)))
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        times = [once() * 1e3 for _ in range(n)]
    finally:
        if enabled:
            gc.enable()
    return _quantiles(times)


def peak_bytes(fn, *, grad_to_none=None) -> int:
    """GPU: the most memory allocated while ``fn`` runs, above what was allocated before."""
    _clear(grad_to_none)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    # meta storages have no address (data_ptr 0): the storage object names them
    return (t.device, s._cdata if t.device.type == "meta" else s.data_ptr()), s.nbytes()


def saved_bytes(forward, held=(), *, return_output=False):
    """Bytes autograd saves during ``forward()`` and still holds when it returns, plus its
    output's, leaving out ``held`` tensors' storages (the parameters); each storage counted
    once. Tensors saved by a part of the graph that the forward already dropped (a detached
    norm's, say) are freed by then and not counted. Works on meta tensors too (the dry-run
    trace counts with it). ``return_output``: ``(bytes, forward's result)`` instead of bytes."""
    exclude = {_storage_key(t)[0] for t in held}
    saved = []

    def pack(t):
        if isinstance(t, torch.Tensor):
            saved.append((weakref.ref(t), *_storage_key(t)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    live = {key: nbytes for ref, key, nbytes in saved if ref() is not None}
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor):
            key, nbytes = _storage_key(t)
            live[key] = nbytes
    total = sum(n for k, n in live.items() if k not in exclude)
    if return_output:
        return total, out
    del out
    return total
