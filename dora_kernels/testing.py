"""What the tests and ``dora_kernels.selftest`` share: the device, the case builder, the rule.

The rule (``_tolerance``): an implementation may be at most ``k`` times as far from float64 as
the oracle in the same dtype is, plus a few ulps of the magnitudes of the terms it sums. The
case builder makes one layer's inputs (``Case``, ``values``), already rounded to their dtypes
(so the float64 copies are the same numbers), runs the fused op, the oracle in the same dtypes
and the oracle in float64 (``check_case``), and judges the output and every gradient. The tests
pass ``reference.dora_linear`` (PEFT's arithmetic) as the oracle; the self-test, which runs from
a wheel, ``dora_kernels.naive.dora_linear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._tolerance import EPS, Verdict, assert_close_to_f64, check_close_to_f64, max_err, term_scales

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16}
GRAD_NAMES = ("x", "lora_A", "lora_B", "magnitude", "bias")
P_DROP = 0.3

__all__ = ["DEVICE", "DTYPES", "EPS", "GRAD_NAMES", "P_DROP", "Case", "Verdict", "assert_close_to_f64",
           "check_case", "check_close_to_f64", "forward_backward", "max_err", "op_tensors", "ref_tensors",
           "shrink_some_magnitudes", "term_scales", "values", "zero_some_magnitudes"]


@dataclass(frozen=True)
class Case:
    """One layer: x of shape ``(*lead, i)``, W0 ``(o, i)``, rank ``r``."""

    lead: tuple  # leading dims of x; N is their product
    i: int  # in features
    o: int  # out features
    r: int  # rank
    dtype: str = "f32"  # "base" or "base+adapter": x/weight/bias dtype, then the adapters' if wider
    bias: str = "none"  # none | frozen | grad
    drop: str = "none"  # none | train (p = 0.3, seeded) | eval (p = 0.3, training=False)
    layout: str = "contig"  # contig | x-rowpad | x-step2 | x-T | w-T | w-rowpad
    scaling: float = 2.0

    @property
    def id(self) -> str:
        lead = f"N{self.lead[0]}" if len(self.lead) == 1 else "B" + "x".join(map(str, self.lead))
        parts = [lead, f"in{self.i}", f"out{self.o}", f"r{self.r}", self.dtype.replace("+", "-ad")]
        if self.bias != "none":
            parts.append(f"bias_{self.bias}")
        if self.drop != "none":
            parts.append(f"drop_{self.drop}")
        if self.layout != "contig":
            parts.append(self.layout)
        if self.scaling != 2.0:
            parts.append(f"s{self.scaling:g}")
        return "-".join(parts)

    @property
    def dtypes(self):
        base, _, adapter = self.dtype.partition("+")
        return DTYPES[base], DTYPES[adapter or base]


def values(case: Case, seed: int) -> dict:
    """The case's inputs on the CPU, already rounded to their dtypes (so the float64 copies are
    the very same numbers). B is never zero and m is not ‖V‖, so g ≠ 1 and every term counts.
    ``G`` is dL/dy."""
    gen = torch.Generator().manual_seed(seed)
    i, o, r, s = case.i, case.o, case.r, case.scaling
    base, adapter = case.dtypes
    x = torch.randn(*case.lead, i, generator=gen)
    w = torch.randn(o, i, generator=gen) / math.sqrt(i)
    A = torch.randn(r, i, generator=gen) / math.sqrt(i)
    B = torch.randn(o, r, generator=gen) * 0.1
    norm = torch.linalg.vector_norm(w.double() + s * B.double() @ A.double(), dim=1)
    m = norm * (0.5 + torch.rand(o, generator=gen, dtype=torch.float64))
    bias = torch.randn(o, generator=gen) * 0.1
    G = torch.randn(*case.lead, o, generator=gen)
    return {"x": x.to(base), "weight": w.to(base), "lora_A": A.to(adapter), "lora_B": B.to(adapter),
            "magnitude": m.to(adapter), "bias": bias.to(base) if case.bias != "none" else None, "G": G.to(base)}


def zero_some_magnitudes(v: dict) -> None:
    """m = 0 on three rows (an ``edit`` for ``check_case``)."""
    m = v["magnitude"].clone()
    m[[0, 3, -1]] = 0
    v["magnitude"] = m


def shrink_some_magnitudes(v: dict) -> None:
    """m = 0 on three rows, |m| ≪ n on two more (one negative), and a bias that dominates y: the
    rows whose dm the backward that read y makes again."""
    zero_some_magnitudes(v)
    m = v["magnitude"]
    m[1] *= 1e-6  # y = g·u in fp16 subnormals: needs the row made again too
    m[4] *= -0.2
    if v.get("bias") is not None:
        v["bias"] = v["bias"] * 30


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


def x_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x as the strided view ``layout`` names; the bytes the view skips are NaN."""
    *lead, i = x.shape
    if layout == "x-rowpad":  # unit last stride, rows further apart than `in`
        big = torch.full((*lead, i + 7), float("nan"), dtype=x.dtype, device=x.device)
        big[..., :i] = x
        return big[..., :i]
    if layout == "x-step2":  # every other column of a wider tensor
        big = torch.full((*lead, 2 * i), float("nan"), dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "x-T":  # the transpose of a contiguous (in, ...) tensor
        return x.movedim(-1, 0).contiguous().movedim(0, -1)
    return x


def w_layout(w: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "w-T":  # GPT-2 Conv1D stores (in, out) and hands the op its transpose
        return w.T.contiguous().T
    if layout == "w-rowpad":
        big = torch.full((w.shape[0], w.shape[1] + 5), float("nan"), dtype=w.dtype, device=w.device)
        big[:, : w.shape[1]] = w
        return big[:, : w.shape[1]]
    return w


def op_tensors(case: Case, v: dict, device) -> dict:
    """The fused op's leaves on ``device``, in the case's layout."""
    t = {k: (None if val is None else val.to(device)) for k, val in v.items()}
    return {
        "x": _leaf(x_layout(t["x"], case.layout), True),
        "weight": w_layout(t["weight"], case.layout),
        "lora_A": _leaf(t["lora_A"], True),
        "lora_B": _leaf(t["lora_B"], True),
        "magnitude": _leaf(t["magnitude"], True),
        "bias": None if t["bias"] is None else _leaf(t["bias"], case.bias == "grad"),
        "G": t["G"],
    }


def ref_tensors(case: Case, v: dict, device, dtype=None) -> dict:
    """Contiguous leaves for the oracle, in the case's dtypes or all in ``dtype``."""
    def cast(t):
        t = t.to(device)
        return t.to(dtype) if dtype is not None else t

    out = {k: (None if val is None else cast(val)) for k, val in v.items()}
    for k in ("x", "lora_A", "lora_B", "magnitude"):
        out[k] = _leaf(out[k], True)
    if out["bias"] is not None:
        out["bias"] = _leaf(out["bias"], case.bias == "grad")
    return out


def forward_backward(fn, t: dict, scaling: float, **kwargs):
    """(y, {name: grad}) of ``fn`` (the op or an oracle) on leaves ``t``, backward from ``t["G"]``."""
    y = fn(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], scaling, t["bias"], **kwargs)
    y.backward(t["G"].to(y.dtype))
    grads = {k: t[k].grad for k in GRAD_NAMES if t[k] is not None and t[k].requires_grad}
    return y.detach(), grads


def drop_kwargs(case: Case, seed: int):
    """(kwargs for the op, kwargs for the oracle); with ``train`` the caller adds the mask."""
    if case.drop == "train":
        return {"dropout_p": P_DROP, "training": True, "dropout_seed": seed}, {"dropout_p": P_DROP, "training": True}
    if case.drop == "eval":
        return {"dropout_p": P_DROP, "training": False}, {"dropout_p": P_DROP, "training": False}
    return {}, {}


def check_case(case: Case, device, seed: int = 0, *, oracle, norm_grad: str = "detached", edit=None,
               save_output: bool = True):
    """Run the fused op, ``oracle`` in the same dtypes and ``oracle`` in float64 on ``case``;
    return ``(y, grads, grads_oracle, verdicts)``: one ``Verdict`` for y and each gradient.
    ``edit(v)`` changes the inputs in place first."""
    import dora_kernels

    v = values(case, seed)
    if edit is not None:
        edit(v)
    op_kw, ref_kw = drop_kwargs(case, 1000 + seed)
    if case.drop == "train":
        ref_kw["dropout_mask"] = dora_kernels.dropout_mask(op_kw["dropout_seed"], v["x"].shape, P_DROP, device)
    if norm_grad == "exact":
        op_kw["norm_grad"] = "exact"
        ref_kw["detach_norm"] = False

    y, grads = forward_backward(dora_kernels.dora_linear, op_tensors(case, v, device), case.scaling,
                                save_output=save_output, **op_kw)
    y_ref, grads_ref = forward_backward(oracle, ref_tensors(case, v, device), case.scaling, **ref_kw)
    y64, grads64 = forward_backward(oracle, ref_tensors(case, v, device, torch.float64), case.scaling, **ref_kw)

    v64 = {k: (None if val is None else val.double()) for k, val in v.items()}
    keep = ref_kw.get("dropout_mask")
    scales = term_scales(v64["x"], v64["weight"], v64["lora_A"], v64["lora_B"], v64["magnitude"], case.scaling,
                         v64["bias"], v64["G"], keep=None if keep is None else keep.cpu(), p=P_DROP,
                         exact=norm_grad == "exact")
    verdicts = [check_close_to_f64(y, y_ref, y64, name="y", scale=scales["y"].to(y64.device))]
    # Without dropout the backward reads u from a tensor stored in x's dtype: the output y (no
    # bias: u = y/g) or u itself (the memory design: one (N, out) tensor saved). So the gradients
    # built on u (dm, and with the exact norm gradient dA and dB through c = −m/n² · dm) carry one
    # rounding of x's dtype per element even when they are fp32 (wider adapters), and under the
    # interpreter that rounding is a truncation. PEFT's dm carries a rounding of the same size,
    # but of x·W0ᵀ + bias, not of y or u, so k alone does not bound the ratio on small problems:
    # those gradients get their few ulps in x's dtype. With dropout ũ is saved in the adapters'
    # dtype: no allowance there.
    base, _ = case.dtypes
    via_y = {"magnitude"} | ({"lora_A", "lora_B"} if norm_grad == "exact" else set())
    for k in grads_ref:
        if grads.get(k) is None:
            verdicts.append(Verdict(f"d{k}", False, float("nan"), float("nan"), float("nan"), f"d{k}: no gradient"))
            continue
        ulp_dtype = base if (k in via_y and case.drop != "train") else None
        verdicts.append(check_close_to_f64(grads[k], grads_ref[k], grads64[k], name=f"d{k}", dtype=ulp_dtype,
                                           scale=scales[k].to(grads64[k].device)))
    return y, grads, grads_ref, verdicts
