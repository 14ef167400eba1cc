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
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from . import backend as _backend
from .testing import Case, shrink_some_magnitudes
from .testing import check_case as check_shared

_CHILD = "DORA_KERNELS_SELFTEST_CHILD"


@dataclass(frozen=True)
class SelfCase:
    """One self-test case: a ``testing.Case``, the norm gradient, and whether a few rows get
    |m| ≪ n or m = 0 (the backward makes u again there)."""

    case: Case
    norm_grad: str = "detached"
    small_m: bool = False

    @property
    def id(self):
        s = self.case.id
        if self.norm_grad != "detached":
            s += f"-{self.norm_grad}"
        if self.small_m:
            s += "-small_m"
        return s


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
    for j, (n, i, o, r) in enumerate(shapes):
        for d in DTYPE_SET:
            out.append(SelfCase(Case((n,), i, o, r, d)))
            out.append(SelfCase(Case((n,), i, o, r, d, bias="grad" if j % 2 else "frozen", drop="train")))
            if j == 0:
                out.append(SelfCase(Case((n,), i, o, r, d, bias="frozen"), norm_grad="exact"))
                out.append(SelfCase(Case((n,), i, o, r, d), small_m=True))
    return out


def check_case(case: SelfCase, device: str, seed: int = 0) -> list:
    """[Verdict] for the output and every gradient of one case (``testing.check_case`` with the
    package's own baseline, ``naive.dora_linear``, as the oracle)."""
    from . import naive

    return check_shared(case.case, device, seed, oracle=naive.dora_linear, norm_grad=case.norm_grad,
                        edit=shrink_some_magnitudes if case.small_m else None)[3]


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
