"""Self-test: the fused op against a plain-autograd baseline on the machine at hand.

    python -m dora_kernels.selftest [--device cuda|cpu] [--backend interpreter|torch] [--quick]

On a GPU it runs the compiled Triton kernels; on a CPU the same kernels through Triton's
interpreter (``--backend interpreter``, the default there) or the pure-torch path
(``--backend torch``). For a handful of odd shapes, in fp32, fp16, bf16 and bf16/fp16 bases
with fp32 adapters, with and without bias and dropout, and once with the exact norm
gradient, it checks the output and every gradient (x, A, B, m, and bias where it trains)
against ``dora_kernels.naive.dora_linear`` (PEFT's arithmetic in plain autograd, shipped with
the package so the self-test runs from a wheel) by the rule the test suite uses
(``dora_kernels._tolerance``): ``err(op) <= k * err(baseline, same dtype) + ulps``, errors
taken against the baseline in float64 on the same inputs. The dropout mask is rebuilt from
the op's seed (``dropout_mask``) and handed to the baseline.

Prints one line per check and a summary; exits 1 on any failure, 2 if it cannot run (no
CUDA for ``--device cuda``). About 30 s on a GPU (compiling
included), a few minutes on a CPU through the interpreter, seconds with ``--quick``.

Triton reads ``TRITON_INTERPRET`` when the kernels are defined, i.e. when ``dora_kernels`` is
imported (``python -m`` imports it before this module runs): if the interpreter is wanted and
was not on at import, the self-test runs itself again in a child process with it set.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from . import backend as _backend
from ._tolerance import check_close_to_f64, term_scales

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRADS = ("x", "lora_A", "lora_B", "magnitude", "bias")
P_DROP = 0.3
_CHILD = "DORA_KERNELS_SELFTEST_CHILD"


@dataclass(frozen=True)
class Case:
    n: int  # tokens
    i: int  # in features
    o: int  # out features
    r: int
    dtype: str  # "bf16" or "bf16+fp32" (base, then the adapters' dtype if wider)
    bias: str = "none"  # none | frozen | grad
    dropout: bool = False
    norm_grad: str = "detached"
    scaling: float = 2.0
    small_m: bool = False  # |m| ≪ n on a few rows, m = 0 on some (the backward makes u again there)

    @property
    def id(self):
        s = f"N{self.n}-in{self.i}-out{self.o}-r{self.r}-{self.dtype}"
        if self.bias != "none":
            s += f"-bias_{self.bias}"
        if self.dropout:
            s += "-drop"
        if self.norm_grad != "detached":
            s += f"-{self.norm_grad}"
        if self.small_m:
            s += "-small_m"
        return s

    @property
    def dtypes(self):
        base, _, adapter = self.dtype.partition("+")
        return DTYPES[base], DTYPES[adapter or base]


DTYPE_SET = ("fp32", "fp16", "bf16", "bf16+fp32", "fp16+fp32")
# (tokens, in, out, r): one token; primes and odd sizes; r > in and out (PEFT's 5 -> 1 test
# layer); on a GPU also sizes that reach the 64- and 128-token tiles and several rank chunks.
SHAPES_CPU = [(1, 40, 24, 4), (37, 48, 40, 8), (9, 17, 5, 12), (6, 5, 1, 8)]
SHAPES_CPU_QUICK = [(13, 24, 20, 4), (6, 5, 1, 8)]
SHAPES_GPU = [(1, 100, 72, 8), (37, 100, 72, 8), (130, 96, 80, 16), (300, 520, 1000, 24), (257, 1000, 376, 40),
              (6, 5, 1, 8)]


def cases(device: str, quick: bool) -> list:
    if device == "cuda":
        shapes = SHAPES_GPU[:3] if quick else SHAPES_GPU
    else:
        shapes = SHAPES_CPU_QUICK if quick else SHAPES_CPU
    out = []
    for j, shape in enumerate(shapes):
        for d in DTYPE_SET:
            out.append(Case(*shape, d))
            out.append(Case(*shape, d, bias="grad" if j % 2 else "frozen", dropout=True))
            if j == 0:
                out.append(Case(*shape, d, bias="frozen", norm_grad="exact"))
                out.append(Case(*shape, d, small_m=True))
    return out


# ---------------------------------------------------------------------------------------------
# one case

def _values(case: Case, seed: int) -> dict:
    """Inputs on the CPU, already rounded to their dtypes (the float64 copies are the same
    numbers). B is never zero and m is not ‖V‖, so every term of the op counts."""
    gen = torch.Generator().manual_seed(seed)
    i, o, r, s = case.i, case.o, case.r, case.scaling
    base, adapter = case.dtypes
    x = torch.randn(case.n, i, generator=gen)
    w = torch.randn(o, i, generator=gen) / math.sqrt(i)
    A = torch.randn(r, i, generator=gen) / math.sqrt(i)
    B = torch.randn(o, r, generator=gen) * 0.1
    norm = torch.linalg.vector_norm(w.double() + s * B.double() @ A.double(), dim=1)
    m = norm * (0.5 + torch.rand(o, generator=gen, dtype=torch.float64))
    bias = torch.randn(o, generator=gen) * 0.1
    if case.small_m:
        m[::7] = 0
        m[3::7] *= -0.05
    G = torch.randn(case.n, o, generator=gen)
    return {"x": x.to(base), "weight": w.to(base), "lora_A": A.to(adapter), "lora_B": B.to(adapter),
            "magnitude": m.to(adapter), "bias": bias.to(base) if case.bias != "none" else None, "G": G.to(base)}


def _leaves(case, v, device, dtype=None):
    out = {}
    for k, t in v.items():
        if t is None:
            out[k] = None
            continue
        t = t.to(device)
        if dtype is not None:
            t = t.to(dtype)
        grad = k in ("x", "lora_A", "lora_B", "magnitude") or (k == "bias" and case.bias == "grad")
        out[k] = t.detach().requires_grad_(grad) if k != "G" else t
    return out


def _run(fn, t, scaling, **kw):
    y = fn(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], scaling, t["bias"], **kw)
    y.backward(t["G"].to(y.dtype))
    return y.detach(), {k: t[k].grad for k in GRADS if t[k] is not None and t[k].requires_grad}


def check_case(case: Case, device: str, seed: int = 0) -> list:
    """[Verdict] for the output and every gradient of one case."""
    import dora_kernels
    from dora_kernels import naive

    v = _values(case, seed)
    op_kw, ref_kw = {}, {}
    if case.dropout:
        op_kw = {"dropout_p": P_DROP, "training": True, "dropout_seed": 1000 + seed}
        mask = dora_kernels.dropout_mask(1000 + seed, v["x"].shape, P_DROP, device)
        ref_kw = {"dropout_p": P_DROP, "training": True, "dropout_mask": mask}
    if case.norm_grad == "exact":
        op_kw["norm_grad"] = "exact"
        ref_kw["detach_norm"] = False
    y, g = _run(dora_kernels.dora_linear, _leaves(case, v, device), case.scaling, **op_kw)
    y_ref, g_ref = _run(naive.dora_linear, _leaves(case, v, device), case.scaling, **ref_kw)
    y64, g64 = _run(naive.dora_linear, _leaves(case, v, device, torch.float64), case.scaling, **ref_kw)
    base, _ = case.dtypes
    # The ulps are taken of Σ|terms| (a result that cancels carries the rounding of its terms).
    t64 = {k: (None if t is None else t.double()) for k, t in v.items()}
    scales = term_scales(t64["x"], t64["weight"], t64["lora_A"], t64["lora_B"], t64["magnitude"], case.scaling,
                         t64["bias"], t64["G"], keep=ref_kw["dropout_mask"].cpu() if case.dropout else None,
                         p=P_DROP, exact=case.norm_grad == "exact")
    out = [check_close_to_f64(y, y_ref, y64, name="y", scale=scales["y"].to(y64.device))]
    # As in tests/test_ops.py: without dropout the backward recovers u from y (stored in x's
    # dtype), so dm (and, with the exact norm gradient, dA and dB) get their ulps in x's dtype.
    via_y = {"magnitude"} | ({"lora_A", "lora_B"} if case.norm_grad == "exact" else set())
    for k in g_ref:
        if k not in g or g[k] is None:
            out.append(_missing(f"d{k}"))
            continue
        ulp_dtype = base if (k in via_y and not case.dropout) else None
        out.append(check_close_to_f64(g[k], g_ref[k], g64[k], name=f"d{k}", dtype=ulp_dtype,
                                      scale=scales[k].to(g64[k].device)))
    return out


def _missing(name):
    from ._tolerance import Verdict

    return Verdict(name, False, float("nan"), float("nan"), float("nan"), f"{name}: no gradient")


# ---------------------------------------------------------------------------------------------
# the command

def _backend_name(device: str) -> str:
    if not _backend.uses_triton(torch.empty(0, device=device)):
        return "pure torch path"
    if device == "cuda":
        cap = torch.cuda.get_device_capability()
        return f"triton compiled for sm_{cap[0]}{cap[1]} ({torch.cuda.get_device_name()})"
    return "triton interpreter"


def _rerun(argv, interpret: bool) -> int:
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0", **{_CHILD: "1"})
    return subprocess.call([sys.executable, "-m", "dora_kernels.selftest", *argv], env=env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m dora_kernels.selftest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    ap.add_argument("--backend", choices=("interpreter", "torch"), default="interpreter",
                    help="the Triton kernels (through the interpreter on a CPU), or the pure-torch path")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a CPU run in seconds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="run only the cases whose id contains this text")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per check, passing ones too")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("selftest: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device == "cuda" and _backend.INTERPRET:
        if os.environ.get(_CHILD):
            print("selftest: TRITON_INTERPRET=1 is set; unset it to test the compiled kernels", file=sys.stderr)
            return 2
        return _rerun(argv, interpret=False)
    if device == "cpu" and args.backend == "interpreter" and not _backend.INTERPRET:
        if os.environ.get(_CHILD):
            print("selftest: could not turn the interpreter on", file=sys.stderr)
            return 2
        return _rerun(argv, interpret=True)
    with _backend.use_backend("torch" if args.backend == "torch" else "auto"):
        return _run_cases(args, device)


def _run_cases(args, device) -> int:
    import dora_kernels

    cs = [c for c in cases(device, args.quick) if args.only is None or args.only in c.id]
    if not cs:
        print(f"selftest: no case matches --only {args.only!r}", file=sys.stderr)
        return 2
    print(f"dora_kernels {dora_kernels.__version__} self-test on {device}: {_backend_name(device)}; "
          f"torch {torch.__version__}" + (f", triton {_triton_version()}" if _triton_version() else ""))
    print(f"{len(cs)} cases; rule: err(op) <= 3 * err(baseline, same dtype) + 2 ulps, errors vs float64")
    print(f"{'case':42s} {'check':11s} {'err':>10s} {'bound':>10s}  result")
    t0 = time.perf_counter()
    failed = checks = 0
    for c in cs:
        try:
            verdicts = check_case(c, device, args.seed)
        except Exception as e:  # a crash is a failure of that case, not of the whole run
            failed += 1
            checks += 1
            print(f"{c.id:42s} {'(run)':11s} {'':>10s} {'':>10s}  ERROR {type(e).__name__}: {e}")
            continue
        for v in verdicts:
            checks += 1
            failed += not v.ok
            if args.verbose or not v.ok:
                print(f"{c.id:42s} {v.name:11s} {v.err:10.3e} {v.bound:10.3e}  {'ok' if v.ok else 'FAIL'}")
                if not v.ok:
                    print(f"    {v.message}")
        if not args.verbose:
            worst = max(verdicts, key=lambda v: v.err / v.bound if v.bound > 0 else 0.0)
            if all(v.ok for v in verdicts):
                ratio = worst.err / worst.bound if worst.bound > 0 else 0.0
                print(f"{c.id:42s} {'all ' + str(len(verdicts)):11s} {worst.err:10.3e} {worst.bound:10.3e}  ok "
                      f"(tightest {worst.name}: {ratio:.2f} of its bound)")
    dt = time.perf_counter() - t0
    print(f"\n{checks - failed}/{checks} checks passed, {failed} failed, {len(cs)} cases in {dt:.1f} s")
    return 1 if failed else 0


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
