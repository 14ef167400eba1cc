"""pytest-benchmark entry point: ``pytest bench/ --benchmark-only`` (add ``-k fused`` etc. to filter).

CPU-sized cases (256 → 512, r = 16, fp32 on a CPU; bf16 on a GPU) for every provider and mode,
grouped by mode and token count so pytest-benchmark puts the providers side by side. Not part
of the default test run (``setup.cfg``: ``testpaths = tests``). ``python -m bench`` is the full
suite; this file is for pytest-benchmark's history and comparison tools (``--benchmark-save``,
``--benchmark-compare``).
"""

import os

if "dora_kernels" not in __import__("sys").modules:
    # Time the op's torch path on a CPU, never the Triton interpreter (read at import).
    os.environ["TRITON_INTERPRET"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import providers as P  # noqa: E402
from bench.flops import MODES, layer_flops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
IN, OUT, R = 256, 512, 16
TOKENS = (64, 512)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    if DEVICE == "cpu":
        prev = torch.get_num_threads()
        torch.set_num_threads(1)  # steady timings on a shared machine, as python -m bench does
        yield
        torch.set_num_threads(prev)
    else:
        yield


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", P.PROVIDERS)
@pytest.mark.parametrize("tokens", TOKENS, ids=[f"N{n}" for n in TOKENS])
def test_layer(benchmark, provider, mode, tokens):
    if provider == "compiled" and DEVICE == "cpu":
        pytest.skip("torch.compile on a CPU spends its time compiling; python -m bench --providers compiled times it")
    why = P.check_installed(provider)
    if why:
        pytest.skip(why)
    t = P.make_tensors(tokens, IN, OUT, R, DTYPE, torch.float32, DEVICE)
    try:
        module = P.build(provider, t)
    except P.Unavailable as e:
        pytest.skip(str(e))
    params = P.trainable(module) + [t.x]
    benchmark.group = f"{mode} N={tokens} {IN}x{OUT} r{R} {P.short_dtype(DTYPE)}"
    benchmark.extra_info.update(provider=provider, mode=mode, tokens=tokens, in_features=IN, out_features=OUT, r=R,
                                fused_path=P.fused_path(DEVICE),
                                flops=layer_flops(mode, tokens, IN, OUT, R, floor=provider == "linear"))

    def clear():
        for p in params:
            p.grad = None

    if mode == "bwd":
        module.train()

        def setup():
            clear()
            y = module(t.x)
            _sync()
            return (y,), {}

        def backward(y):
            y.backward(t.grad)
            _sync()

        benchmark.pedantic(backward, setup=setup, rounds=30, warmup_rounds=3)
        return
    if mode == "eval":
        module.eval()

        def fn():
            with torch.no_grad():
                module(t.x)
            _sync()
    elif mode == "fwd":
        module.train()

        def fn():
            module(t.x)
            _sync()
    else:
        module.train()

        def fn():
            clear()
            module(t.x).backward(t.grad)
            _sync()
    benchmark(fn)
