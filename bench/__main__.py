"""``python -m bench``: the benchmark suite (``bench.run``), or with ``--trace`` the dry-run
launch/traffic trace (``bench.trace``)."""

import os
import sys


def _trace(argv) -> int:
    try:
        from bench import trace
    except ModuleNotFoundError as e:
        if e.name != "bench.trace":
            raise
        print("python -m bench --trace: bench/trace.py is not there yet (the dry-run trace is another issue)",
              file=sys.stderr)
        return 2
    return trace.main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--trace" in argv:
        return _trace(argv)
    # The Triton interpreter's timings mean nothing: a CPU run times the op's torch path. The
    # variable is read when dora_kernels defines its kernels, so this must precede its import.
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        print("note: TRITON_INTERPRET was set; unset for the benchmark (CPU runs time the torch path)")
    os.environ["TRITON_INTERPRET"] = "0"
    from bench.run import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
