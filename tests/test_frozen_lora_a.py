"""A frozen ``lora_A`` (DVoRA's shared projection): the op's gradients without dA, and no
(token blocks, r, in) partial of dA is ever made."""

from __future__ import annotations

import math

import pytest
import torch

import dora_kernels
import reference
from dora_kernels import runtime
from tolerance import assert_close_to_f64

DTYPES = {"f32": (torch.float32, torch.float32), "f16": (torch.float16, torch.float16),
          "bf16": (torch.bfloat16, torch.bfloat16), "f16+f32": (torch.float16, torch.float32)}


def _run(fn, x, w, A, B, m, G, bias, **kw):
    x, B, m = (t.detach().clone().requires_grad_(True) for t in (x, B, m))
    y = fn(x, w, A, B, m, 1.5, bias, **kw)
    y.backward(G.to(y.dtype))
    return [y.detach(), x.grad, B.grad, m.grad]


@pytest.mark.parametrize("drop", [False, True], ids=["p0", "p0.3"])
@pytest.mark.parametrize("norm_grad", ["detached", "exact"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_frozen_lora_a_matches_the_reference(backend, dt, norm_grad, drop):
    base, adapter = DTYPES[dt]
    gen = torch.Generator().manual_seed(7)
    N, K, M, R = 11, 37, 23, 6
    x = torch.randn(N, K, generator=gen)
    w = torch.randn(M, K, generator=gen) / math.sqrt(K)
    A = torch.randn(R, K, generator=gen) / math.sqrt(K)
    B = torch.randn(M, R, generator=gen) * 0.2
    m = torch.rand(M, generator=gen) + 0.5
    bias = torch.randn(M, generator=gen) * 0.1
    G = torch.randn(N, M, generator=gen)
    op_kw, ref_kw = {"norm_grad": norm_grad}, {"detach_norm": norm_grad == "detached"}
    if drop:
        op_kw.update(dropout_p=0.3, dropout_seed=9)
        ref_kw.update(dropout_p=0.3, dropout_mask=dora_kernels.dropout_mask(9, (N, K), 0.3, backend))

    def args(bd, ad):
        return [t.to(backend, d) for t, d in ((x, bd), (w, bd), (A, ad), (B, ad), (m, ad), (G, bd))] + \
            [bias.to(backend, bd)]

    xs, ws, As, Bs, ms, Gs, bs = args(base, adapter)
    got = _run(dora_kernels.dora_linear, xs, ws, As, Bs, ms, Gs, bs, **op_kw)
    ref = _run(reference.dora_linear, xs, ws, As, Bs, ms, Gs, bs, **ref_kw)
    ref64 = _run(reference.dora_linear, *args(torch.float64, torch.float64), **ref_kw)
    for name, a, b, c in zip(["y", "dx", "dB", "dm"], got, ref, ref64):
        assert_close_to_f64(a, b, c, name=name, dtype=base if name == "dm" and not drop else None)


def test_frozen_lora_a_makes_no_da_partials():
    """The launchers on meta tensors (a dry run), r = 1024 at 4096 tokens: no dA partials."""
    from dora_kernels import launchers

    N, K, M, R = 4096, 4096, 4096, 1024

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)

    launches = []
    with runtime.recording(launches.append):
        dx, dA, dB, dm = launchers.dora_backward(meta(N, M), meta(N, K), meta(M, K), meta(R, K), meta(M, R), meta(M),
                                                 1.0, meta(M, dtype=torch.float32), meta(N, R), y=meta(N, M),
                                                 need_a=False)
    assert dA is None and dB.shape == (M, R) and dx.shape == (N, K)
    (dxk,) = [lc for lc in launches if lc.name == "_dx_kernel"]
    assert dxk.args["da_part_ptr"] is None and dxk.meta["HAS_DA_PART"] is False
    assert not any(len(shape) == 3 and shape[1:] == (R, K) for lc in launches for shape, _ in lc.writes)
    (sums,) = [lc for lc in launches if lc.name == "_sum_partials_kernel"]
    assert sums.args["RK"] == 0 and sums.meta["HAS_DA"] is False
