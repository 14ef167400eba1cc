"""The wheel ships the ``dora_kernels`` package only, and its self-test runs from that install
outside the repository (no ``reference``, ``bench`` or ``tests`` on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("dora_kernels-*.whl")
    return whl


def test_wheel_holds_the_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"dora_kernels", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "dora_kernels/kernels.py" in names and "dora_kernels/naive.py" in names
    assert not any(n.startswith(("reference/", "bench/", "tests/")) for n in names)


def test_selftest_runs_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(site)
    code = ("import sys, dora_kernels; assert dora_kernels.__file__.startswith(sys.argv[1]), dora_kernels.__file__; "
            "import importlib.util as u; assert u.find_spec('reference') is None and u.find_spec('bench') is None; "
            "from dora_kernels import selftest; sys.exit(selftest.main(['--quick', '--backend', 'torch']))")
    run = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "checks passed, 0 failed" in run.stdout
