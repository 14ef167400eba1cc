"""QDoRA: DoRA over a bitsandbytes 4-bit (nf4/fp4) or 8-bit (int8) base weight.

``QuantWeight`` describes a quantised weight W0 (out, in) by its tensors and metadata, read
from a bitsandbytes module when the layer runs (``QuantWeight.from_module``), and stands where
``weight`` goes in ``dora_linear`` and ``weight_norm``. The formats, as bitsandbytes 0.50
stores them:

- 4-bit: the flattened weight packed two codes a byte, element 2i in the high nibble;
  ``value = code[nibble] · absmax[flat_index // blocksize]`` in fp32, then cast to ``dtype``.
  Blocks run over the flattened weight: a row may begin inside a block, the last may be partial.
  With double quantisation (``nested``) absmax is uint8 and
  ``absmax = code2[absmax_u8] · absmax2[i // blocksize2] + offset`` in fp32.
- int8: ``value = (int8 · SCB) · (1/127)`` in fp32 (bitsandbytes' constant), row scales SCB (out,).

The op on a ``QuantWeight`` computes what it computes on ``dequantize(qw)`` cast to x's dtype
(bitsandbytes' 4-bit matmul, and its 8-bit one where it dequantises; the int8 matmul's own
quantisation of x is not copied), with the norm ``‖dequantize(qw) + s·B·A‖`` taken in fp32.
Where the Triton kernels run, they read W0 as ``packed(qw)`` (``launchers.PackedWeight``: the codes
as stored, the nested absmax decoded to fp32 first, as bitsandbytes does) and dequantise it in
registers: the norm always (one pass over the codes), the forward and dx GEMMs up to
``heuristics.DEQUANT_IN_KERNEL_TOKENS`` tokens without dropout; otherwise those dequantise it once
into a transient dense W0, as QLoRA's matmul does. The torch path dequantises blocks of rows
(``dequantize_rows``, ``dequantize``, ``weight_norm``). Nothing saved for the backward is a
dequantised weight (the backward dequantises again).

``is_bnb_layer`` / ``why_not`` / ``fused_args`` / ``more_adapters``: what ``fuse`` needs for PEFT
layers over a bitsandbytes base, read from classes and attributes only (never from weights, which
may be on the meta device at fuse time).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import launchers, ops, torch_path
from .common import FLOATS, gate, recip, redo_rows, rows_packed, u_dtype, xa_dtype

__all__ = ["NestedAbsmax", "QuantWeight", "dequantize", "dequantize_rows", "dora_linear", "weight_norm"]

FOUR_BIT = ("nf4", "fp4")
QUANT_TYPES = FOUR_BIT + ("int8",)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT8_SCALE = 7.874015718698502e-3  # bitsandbytes' 1/127, as it multiplies (not divides)

# Elements dequantised (or reduced over tokens) at a time: fp32 transients of at most BLOCK_ELEMS
# elements. A full W0 for a GEMM is filled in at least _FILL_CHUNKS blocks of rows (it is live then,
# so its fill transient must stay a few percent of it); the norm, which never holds W0, in at
# least _NORM_CHUNKS; the fp32 work over tokens in at least _MIN_CHUNKS.
BLOCK_ELEMS = 1 << 20
_FILL_CHUNKS = 64
_NORM_CHUNKS = 8
_MIN_CHUNKS = 8

# bitsandbytes' CPU layout (``_convert_weight_packed_for_cpu``, block_n = 32): rows in groups of 32.
_CPU_BLOCK_N = 32


@dataclass(frozen=True, eq=False)
class NestedAbsmax:
    """A 4-bit weight's absmax quantised again: ``absmax = code[q] · absmax[i // blocksize] + offset``.

    code: (256,) fp32; absmax: (ceil(n_blocks / blocksize),) fp32; offset: () fp32 tensor."""

    code: Tensor
    absmax: Tensor
    blocksize: int
    offset: Tensor


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A quantised weight W0 of ``shape`` (out, in), dequantised as bitsandbytes does.

    - ``quant_type`` "nf4" / "fp4": ``data`` uint8 (ceil(out·in / 2),) the packed codes (element 2i
      in the high nibble of byte i), ``code`` (16,) fp32, ``absmax`` (ceil(out·in / blocksize),)
      floating, or uint8 with ``nested`` (``NestedAbsmax``), ``blocksize`` 32 … 4096.
    - ``quant_type`` "int8": ``data`` int8 (out, in), ``scb`` (out,) fp32 row scales.

    ``dtype``: the dequantised weight's (bitsandbytes' ``quant_state.dtype``; fp32 for int8).
    Built by ``from_module`` or directly; inconsistent fields raise a ValueError naming them.
    """

    quant_type: str
    data: Tensor
    shape: torch.Size
    dtype: torch.dtype
    absmax: Optional[Tensor] = None
    code: Optional[Tensor] = None
    blocksize: int = 0
    nested: Optional[NestedAbsmax] = None
    scb: Optional[Tensor] = None

    def __post_init__(self):
        object.__setattr__(self, "shape", torch.Size(self.shape))
        _validate(self)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __repr__(self) -> str:
        extra = f", blocksize={self.blocksize}, nested={self.nested is not None}" if self.quant_type in FOUR_BIT else ""
        return (f"QuantWeight({self.quant_type}, shape={tuple(self.shape)}, dtype={self.dtype}{extra}, "
                f"device={self.device})")

    @classmethod
    def from_module(cls, module) -> "QuantWeight":
        """The descriptor of a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (``has_fp16_weights=False``).

        4-bit: the quant state is ``module.weight.quant_state``, else ``module.quant_state`` (a weight
        gathered by FSDP2 has none); a weight bitsandbytes has rewritten into its CPU layout
        (``packing_format_for_cpu``) is read back into the flat layout, absmax as stored (bf16).
        int8: the row scales are ``weight.SCB``, else ``module.state.SCB`` (where the first forward
        moves them). Reads the tensors as they are now: call it when the layer runs.
        """
        kind = bnb_kind(module)
        if kind == "4bit":
            return _from_linear4bit(module)
        if kind == "8bit":
            return _from_linear8bit(module)
        raise TypeError(f"QuantWeight.from_module: {type(module).__module__}.{type(module).__qualname__} is not a "
                        "bitsandbytes Linear4bit or Linear8bitLt")


def _name(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def _validate(qw: QuantWeight) -> None:
    if qw.quant_type not in QUANT_TYPES:
        raise ValueError(f"QuantWeight: quant_type must be one of {QUANT_TYPES}, got {qw.quant_type!r}")
    if len(qw.shape) != 2 or min(qw.shape) < 1:
        raise ValueError(f"QuantWeight: shape must be (out, in) with both ≥ 1, got {tuple(qw.shape)}")
    if qw.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"QuantWeight: dtype must be one of {WEIGHT_DTYPES}, got {qw.dtype}")
    if not isinstance(qw.data, Tensor):
        raise ValueError(f"QuantWeight: data must be a tensor, got {type(qw.data).__name__}")
    M, K = qw.shape
    n = M * K
    if qw.quant_type == "int8":
        if qw.data.dtype != torch.int8 or tuple(qw.data.shape) != (M, K):
            raise ValueError(f"QuantWeight (int8): data must be int8 of shape ({M}, {K}), got {_name(qw.data)}")
        if not isinstance(qw.scb, Tensor) or qw.scb.dtype not in FLOATS or tuple(qw.scb.shape) != (M,):
            raise ValueError(f"QuantWeight (int8): SCB (row scales) must be a float tensor of shape ({M},), "
                             f"got {_name(qw.scb)}")
        if qw.scb.device != qw.data.device:
            raise ValueError(f"QuantWeight (int8): SCB is on {qw.scb.device} but data on {qw.data.device}")
        return
    if qw.data.dtype != torch.uint8 or qw.data.dim() != 1 or qw.data.numel() != (n + 1) // 2:
        raise ValueError(f"QuantWeight ({qw.quant_type}): data must be uint8 of shape ({(n + 1) // 2},) (two codes a "
                         f"byte of the {M}×{K} weight), got {_name(qw.data)}")
    if qw.blocksize not in BLOCKSIZES:
        raise ValueError(f"QuantWeight ({qw.quant_type}): blocksize must be one of {BLOCKSIZES}, got {qw.blocksize!r}")
    if not isinstance(qw.code, Tensor) or qw.code.dtype != torch.float32 or tuple(qw.code.shape) != (16,):
        raise ValueError(f"QuantWeight ({qw.quant_type}): code must be a float32 table of shape (16,), "
                         f"got {_name(qw.code)}")
    blocks = -(-n // qw.blocksize)
    if not isinstance(qw.absmax, Tensor) or qw.absmax.dim() != 1 or qw.absmax.numel() != blocks:
        raise ValueError(f"QuantWeight ({qw.quant_type}): absmax must have shape ({blocks},) (one per block of "
                         f"{qw.blocksize} of the {M}×{K} weight), got {_name(qw.absmax)}")
    if qw.nested is None:
        if qw.absmax.dtype not in FLOATS:
            raise ValueError(f"QuantWeight ({qw.quant_type}): absmax must be floating (uint8 only with nested), "
                             f"got {qw.absmax.dtype}")
    else:
        nst = qw.nested
        if qw.absmax.dtype != torch.uint8:
            raise ValueError(f"QuantWeight ({qw.quant_type}, nested): absmax must be uint8, got {qw.absmax.dtype}")
        if not isinstance(nst.blocksize, int) or nst.blocksize < 1:
            raise ValueError(f"QuantWeight ({qw.quant_type}, nested): the nested blocksize must be a positive int, "
                             f"got {nst.blocksize!r}")
        if not isinstance(nst.code, Tensor) or nst.code.dtype != torch.float32 or tuple(nst.code.shape) != (256,):
            raise ValueError(f"QuantWeight ({qw.quant_type}, nested): the nested code must be a float32 table of "
                             f"shape (256,), got {_name(nst.code)}")
        blocks2 = -(-blocks // nst.blocksize)
        if not isinstance(nst.absmax, Tensor) or nst.absmax.dtype != torch.float32 or \
                tuple(nst.absmax.shape) != (blocks2,):
            raise ValueError(f"QuantWeight ({qw.quant_type}, nested): the nested absmax must be float32 of shape "
                             f"({blocks2},), got {_name(nst.absmax)}")
        if not isinstance(nst.offset, Tensor) or nst.offset.numel() != 1 or nst.offset.dtype != torch.float32:
            raise ValueError(f"QuantWeight ({qw.quant_type}, nested): offset must be a float32 tensor of one "
                             f"element, got {_name(nst.offset)}")
    parts = {"absmax": qw.absmax, "code": qw.code}
    if qw.nested is not None:
        parts.update({"nested absmax": qw.nested.absmax, "nested code": qw.nested.code, "offset": qw.nested.offset})
    for name, t in parts.items():
        if t.device != qw.data.device:
            raise ValueError(f"QuantWeight ({qw.quant_type}): {name} is on {t.device} but data on {qw.data.device}")


# ---------------------------------------------------------------------------------------------
# reading a bitsandbytes module

def _bnb_nn():
    return sys.modules.get("bitsandbytes.nn.modules")


def bnb_kind(module) -> Optional[str]:
    """"4bit" (bitsandbytes ``Linear4bit`` and subclasses keeping its forward), "8bit"
    (``Linear8bitLt`` likewise), else None. Classes only: bitsandbytes is never imported here."""
    nn_ = _bnb_nn()
    if nn_ is None:
        return None
    cls = type(module)
    if isinstance(module, nn_.Linear4bit) and cls.forward is nn_.Linear4bit.forward:
        return "4bit"
    if isinstance(module, nn_.Linear8bitLt) and cls.forward is nn_.Linear8bitLt.forward:
        return "8bit"
    return None


def _is_bitsandbytes(module) -> bool:
    return type(module).__module__.split(".")[0] == "bitsandbytes"


_CODE_CHECKED: dict = {}  # id(code) -> (weakref to it, its version, quant_type): a table checked once


def _check_code(code: Tensor, quant_type: str, where: str) -> None:
    """The 16-entry table must be bitsandbytes' own for ``quant_type`` (its kernels use that one)."""
    if not isinstance(code, Tensor) or code.numel() != 16:
        raise ValueError(f"{where}: quant_state.code must be the 16-entry {quant_type} table, got {_name(code)}")
    if code.is_meta:
        return  # (a dry run on meta tensors: no values to check)
    seen = _CODE_CHECKED.get(id(code))
    if seen is not None and seen[0]() is code and seen[1:] == (code._version, quant_type):
        return
    from bitsandbytes.functional import get_4bit_type

    if not torch.equal(code.float().cpu(), get_4bit_type(quant_type, device="cpu")):
        raise ValueError(f"{where}: quant_state.code is not bitsandbytes' {quant_type} table (quant_type and code "
                         "disagree)")
    if len(_CODE_CHECKED) > 4096:
        _CODE_CHECKED.clear()
    _CODE_CHECKED[id(code)] = (weakref.ref(code), code._version, quant_type)


def _as_bytes(data: Tensor) -> Tensor:
    """The packed storage (uint8, or a 16/32-bit ``quant_storage``) as its flat uint8 bytes (a view)."""
    data = data.detach()
    if data.dtype != torch.uint8:
        data = data.contiguous().view(torch.uint8)
    return data.reshape(-1)


def _from_linear4bit(module) -> QuantWeight:
    where = f"QuantWeight.from_module({type(module).__name__})"
    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        qs = getattr(module, "quant_state", None)
    if qs is None:
        raise ValueError(f"{where}: the weight has no quant_state (not quantised yet: bitsandbytes quantises a "
                         "Linear4bit when it is moved to a device, e.g. .to('cuda') or .to('cpu'))")
    qt = getattr(qs, "quant_type", None)
    if qt not in FOUR_BIT:
        raise ValueError(f"{where}: quant_state.quant_type must be 'nf4' or 'fp4', got {qt!r}")
    out_in = (module.out_features, module.in_features)
    shape = getattr(qs, "shape", None)
    if shape is None or tuple(shape) != out_in:
        raise ValueError(f"{where}: quant_state.shape {None if shape is None else tuple(shape)} is not the layer's "
                         f"(out, in) = {out_in}")
    M, K = out_in
    packing = getattr(qs, "packing_format_for_cpu", False)
    if packing is not False and packing is not True:
        raise ValueError(f"{where}: unknown packing: quant_state.packing_format_for_cpu = {packing!r}")
    _check_code(qs.code, qt, where)
    code = qs.code.float() if qs.code.dtype != torch.float32 else qs.code
    if packing:
        data, absmax, dtype = _from_cpu_layout(weight.detach(), qs, where)
        return QuantWeight(qt, data, out_in, dtype, absmax=absmax, code=code, blocksize=qs.blocksize)
    nested = None
    if getattr(qs, "nested", False):
        s2 = getattr(qs, "state2", None)
        if s2 is None or getattr(qs, "offset", None) is None:
            raise ValueError(f"{where}: quant_state.nested is set but state2 or offset is missing")
        offset = qs.offset if isinstance(qs.offset, Tensor) else torch.tensor(float(qs.offset), device=s2.absmax.device)
        nested = NestedAbsmax(code=s2.code, absmax=s2.absmax, blocksize=s2.blocksize, offset=offset.float())
    try:
        return QuantWeight(qt, _as_bytes(weight), out_in, qs.dtype, absmax=qs.absmax, code=code,
                           blocksize=qs.blocksize, nested=nested)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _from_cpu_layout(weight: Tensor, qs, where: str):
    """bitsandbytes' CPU layout read back: ``(data (ceil(n/2),) uint8 flat, absmax (n_blocks,), dtype)``.

    That layout (``_convert_weight_packed_for_cpu``) holds the codes as (out, in/2) bytes, each run
    of 32 bytes the low then high nibbles of 64 codes taken down 32 rows in pairs of columns, and
    absmax as bf16 (in / blocksize, out); dtype is set to bf16, the original kept aside."""
    M, K = qs.shape
    bs = qs.blocksize
    dtype = getattr(qs, "original_dtype", None)
    absmax = getattr(qs, "absmax", None)
    ok = (weight.dtype == torch.uint8 and tuple(weight.shape) == (M, K // 2) and M % _CPU_BLOCK_N == 0
          and K % 2 == 0 and isinstance(bs, int) and bs > 0 and K % bs == 0 and isinstance(absmax, Tensor)
          and tuple(absmax.shape) == (K // bs, M) and dtype in WEIGHT_DTYPES and not getattr(qs, "nested", False))
    if not ok:
        raise ValueError(f"{where}: unknown packing: packing_format_for_cpu is set but the weight {_name(weight)}, "
                         f"absmax {_name(absmax)} and original dtype {dtype} are not bitsandbytes' CPU layout of a "
                         f"{M}×{K} weight with blocksize {bs}")
    p = weight.reshape(-1, _CPU_BLOCK_N)
    codes = torch.cat([p & 0xF, p >> 4], dim=1)  # (…, 64): low nibbles first
    codes = codes.reshape(M // _CPU_BLOCK_N, K // 2, _CPU_BLOCK_N, 2).transpose(1, 2).reshape(-1)
    data = (codes[0::2] << 4) | codes[1::2]
    return data, absmax.T.reshape(-1).float(), dtype


def _from_linear8bit(module) -> QuantWeight:
    where = f"QuantWeight.from_module({type(module).__name__})"
    state = getattr(module, "state", None)
    if state is not None and getattr(state, "has_fp16_weights", False):
        raise ValueError(f"{where}: has_fp16_weights=True keeps a 16-bit weight (quantised at each call), not an "
                         "int8 one")
    weight = module.weight
    data = weight.detach()
    out_in = (module.out_features, module.in_features)
    if data.dtype != torch.int8:
        raise ValueError(f"{where}: the weight is {data.dtype}, not int8 (not quantised yet: bitsandbytes quantises a "
                         "Linear8bitLt when it is moved to a device)")
    scb = getattr(weight, "SCB", None)
    if scb is None and state is not None:
        scb = getattr(state, "SCB", None)
    if scb is None:
        raise ValueError(f"{where}: no SCB (row scales) on the weight or in the layer's state")
    try:
        return QuantWeight("int8", data, out_in, torch.float32, scb=scb.detach())
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# dequantisation (pure torch)

def _pair_table(code: Tensor) -> Tensor:
    """(256, 2) fp32: a byte's two values, high nibble first (one gather per byte, no int64 index)."""
    b = torch.arange(256, device=code.device)
    return torch.stack([code[b >> 4], code[b & 0xF]], dim=1)


def _absmax_blocks(qw: QuantWeight, k0: int, k1: int) -> Tensor:
    """The real absmax of blocks k0 … k1−1 (k1 − k0,) in fp32."""
    if qw.nested is None:
        return qw.absmax[k0:k1].float()
    nst = qw.nested
    q = qw.absmax[k0:k1].int()
    idx = torch.arange(k0, k1, device=q.device) // nst.blocksize
    return nst.code[q] * nst.absmax[idx] + nst.offset  # bitsandbytes: product, then the offset added


def _cast_into(vals: Tensor, qw: QuantWeight, dtype, out: Optional[Tensor]) -> Tensor:
    """fp32 values → ``qw.dtype`` (bitsandbytes' result) → ``dtype``, written into ``out`` when given;
    one rounding where that is the same (``dtype`` or fp32 is ``qw.dtype``)."""
    if out is None:
        return vals.to(qw.dtype).to(dtype)
    out.copy_(vals if qw.dtype in (torch.float32, dtype) else vals.to(qw.dtype))
    return out


def dequantize_rows(qw: QuantWeight, start: int, stop: int, dtype: Optional[torch.dtype] = None, *,
                    out: Optional[Tensor] = None) -> Tensor:
    """Rows ``start … stop−1`` of the dequantised weight: (stop − start, in) in ``dtype``
    (default ``qw.dtype``), bit for bit what bitsandbytes' dequantisation gives for those rows
    (cast to ``qw.dtype`` first, then to ``dtype``); written into ``out`` (stop − start, in) when given."""
    M, K = qw.shape
    if not 0 <= start <= stop <= M:
        raise ValueError(f"dequantize_rows: rows [{start}, {stop}) outside the weight's {M} rows")
    dtype = dtype or qw.dtype
    if qw.quant_type == "int8":
        v = qw.data[start:stop] * qw.scb[start:stop, None].float()
        return _cast_into(v.mul_(INT8_SCALE), qw, dtype, out)
    if start == stop:
        return out if out is not None else torch.empty((0, K), dtype=dtype, device=qw.device)
    bs, n = qw.blocksize, M * K
    e0, e1 = start * K, stop * K  # flat elements wanted
    k0, k1 = e0 // bs, -(-e1 // bs)  # the blocks that hold them
    lo, hi = k0 * bs, min(k1 * bs, n)  # lo is even: whole bytes from lo on
    v = _pair_table(qw.code)[qw.data[lo // 2:(hi + 1) // 2].int()].reshape(-1)
    am = _absmax_blocks(qw, k0, k1)
    full = (hi - lo) // bs
    v[:full * bs].view(full, bs).mul_(am[:full, None])
    if full < k1 - k0:  # the weight's last block, partial
        v[full * bs:hi - lo].mul_(am[full])
    return _cast_into(v[e0 - lo:e1 - lo].view(stop - start, K), qw, dtype, out)


def _rows_per_block(M: int, K: int, chunks: int) -> int:
    return max(1, min(BLOCK_ELEMS // K, -(-M // chunks)))


def dequantize(qw: QuantWeight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The whole dequantised weight (out, in) in ``dtype`` (default ``qw.dtype``), filled in blocks
    of rows: the fp32 transient (≈ 6 bytes an element of a block) stays a few percent of it."""
    M, K = qw.shape
    dtype = dtype or qw.dtype
    out = torch.empty((M, K), dtype=dtype, device=qw.device)
    rows = _rows_per_block(M, K, _FILL_CHUNKS)
    for i in range(0, M, rows):
        j = min(i + rows, M)
        dequantize_rows(qw, i, j, dtype, out=out[i:j])
    return out


def packed(qw: QuantWeight) -> launchers.PackedWeight:
    """``qw`` as the kernels read it: the codes (or int8 rows) as stored, the absmax in fp32 (a
    nested one decoded by ``launchers.nested_absmax``: a pass over n / blocksize bytes)."""
    if qw.quant_type == "int8":
        return launchers.PackedWeight(qw.shape, qw.dtype, 8, qscale=qw.scb.float().contiguous(), w=qw.data)
    if qw.nested is None:
        absmax = qw.absmax.float().contiguous()
    else:  # (the kernels index these flat: contiguous copies of strided ones)
        nst = qw.nested
        absmax = launchers.nested_absmax(qw.absmax.contiguous(), nst.code.contiguous(), nst.absmax.contiguous(),
                                         nst.offset, nst.blocksize)
    return launchers.PackedWeight(qw.shape, qw.dtype, 4, qscale=absmax, codes=qw.data.contiguous(),
                                  qmap=qw.code.float().contiguous(),
                                  qshift=qw.blocksize.bit_length() - 1)


def _run(qw: QuantWeight, t: Tensor, on_triton, on_torch):
    """``ops._run``, for ``qw``: the kernels index a 4-bit W0 with 32 bits, so one of 2**31 elements
    or more takes the torch path."""
    M, K = qw.shape
    if qw.quant_type in FOUR_BIT and M * K >= 2**31:
        return on_torch()
    return ops._run(t, on_triton, on_torch)


def _dense(qw: QuantWeight, dtype, t: Tensor) -> Tensor:
    """The whole dequantised W0 in ``dtype``: by the dequantising kernel where the kernels run on
    tensors like ``t``, else in torch."""
    return _run(qw, t, lambda: launchers.dequantize(packed(qw), dtype), lambda: dequantize(qw, dtype))


def weight_norm(qw: QuantWeight, lora_A: Tensor, lora_B: Tensor, scaling: float, *, with_wa: bool = False):
    """``(n, wa)``: row norms ``n = ‖dequantize(qw) + s·B·A‖`` (out,) fp32 and, with ``with_wa``,
    ``W0·Aᵀ`` (out, r) fp32 (else None). In the norm kernel, which dequantises the codes in
    registers, where the kernels run on the adapters' device; else over blocks of rows: a block is
    dequantised, gets s·B·A for its rows and is normed. The whole dequantised weight never exists."""
    return _run(qw, lora_A, lambda: launchers.weight_norm(packed(qw), lora_A, lora_B, scaling, with_wa=with_wa),
                    lambda: _torch_weight_norm(qw, lora_A, lora_B, scaling, with_wa=with_wa))


def _torch_weight_norm(qw: QuantWeight, lora_A: Tensor, lora_B: Tensor, scaling: float, *, with_wa: bool = False):
    M, K = qw.shape
    norm = torch.empty(M, dtype=torch.float32, device=qw.device)
    wa = torch.empty((M, lora_A.shape[0]), dtype=torch.float32, device=qw.device) if with_wa else None
    rows = _rows_per_block(M, K, _NORM_CHUNKS)
    for i in range(0, M, rows):
        j = min(i + rows, M)
        n_i, wa_i = torch_path.weight_norm(dequantize_rows(qw, i, j, torch.float32), lora_A, lora_B[i:j], scaling,
                                           with_wa=with_wa)
        norm[i:j] = n_i
        if with_wa:
            wa[i:j] = wa_i
    return norm, wa


# ---------------------------------------------------------------------------------------------
# the op

def _stand_in(qw: QuantWeight, x: Tensor) -> Tensor:
    """A tensor of W0's shape in x's dtype on x's device with no storage (one element, expanded):
    the unquantised op's input checks apply to it as they are."""
    return torch.empty((), dtype=x.dtype, device=x.device).expand(qw.shape)


def _token_rows(N: int, width: int) -> int:
    """Tokens per chunk of the (N, width) fp32 work: at most BLOCK_ELEMS elements and an eighth of
    the tokens, so no fp32 (N, width) tensor is ever whole."""
    return max(1, min(BLOCK_ELEMS // max(width, 1), -(-N // _MIN_CHUNKS)))


def _rows_of(qw: QuantWeight, rows: Tensor, dtype) -> Tensor:
    """The dequantised rows ``rows`` (k,) of W0: (k, in) in ``dtype``."""
    return torch.cat([dequantize_rows(qw, r, r + 1, dtype) for r in rows.tolist()])


def _matmul_by_rows(x: Tensor, qw: QuantWeight, dtype) -> Tensor:
    """x·W0ᵀ (N, out) in ``dtype`` with W0 dequantised in blocks of rows (a wider copy of W0 is
    never whole)."""
    M, K = qw.shape
    out = torch.empty((x.shape[0], M), dtype=dtype, device=x.device)
    rows = _rows_per_block(M, K, _FILL_CHUNKS)
    for i in range(0, M, rows):
        j = min(i + rows, M)
        out[:, i:j] = x @ dequantize_rows(qw, i, j, dtype).T
    return out


def _torch_forward(x, qw, lora_A, lora_B, magnitude, scaling, bias, norm, dropout_p, dropout_seed, need_u):
    """``torch_path.dora_forward``'s math over a ``QuantWeight``, lean in memory: W0 is dequantised
    for each GEMM and dropped after it, the fp32 epilogue runs over chunks of tokens and writes y
    into the base GEMM's output. Returns ``(y, xa, u or None)``."""
    N, K = x.shape
    M = qw.shape[0]
    D, p, s = x.dtype, dropout_p, scaling
    inv_keep = 1.0 / (1.0 - p)
    x = rows_packed(x)
    xd = x if p == 0 else x * torch_path.dropout_mask(dropout_seed, N, K, p, x.device).to(D)
    ct = torch.promote_types(D, lora_A.dtype)
    xa = ((xd.to(ct) @ lora_A.T.to(ct)).float() * inv_keep).to(xa_dtype(lora_A.dtype))
    xa32, B32 = xa.float(), lora_B.float()
    g = gate(magnitude, norm)
    bias32 = bias.float() if bias is not None else None
    w = dequantize(qw, D)
    y = x @ w.T  # x·W0ᵀ (N, M) in x's dtype, as torch_path's before its upcast; y is written over it
    basd = xd @ w.T if p > 0 and ct == D else None  # x̃·W0ᵀ (before the 1/(1 − p))
    del w
    if p > 0 and ct != D:  # PEFT makes the dropped base in the adapters' dtype: W0 in it too, by rows
        basd = _matmul_by_rows(xd.to(ct), qw, ct)
    del xd
    udt = u_dtype(D, lora_A.dtype, p)
    u = torch.empty((N, M), dtype=udt, device=x.device) if need_u else None
    step = _token_rows(N, M)
    for i in range(0, N, step):
        c = slice(i, i + step)
        if p == 0:  # u = x·W0ᵀ + s·xa·Bᵀ, y = g ⊙ u
            uc = y[c].float().addmm_(xa32[c], B32.T, alpha=s)
            if need_u:
                u[c] = uc
            yc = uc.mul_(g)
        else:  # ũ = x̃·W0ᵀ + s·xa·Bᵀ, y = x·W0ᵀ + g ⊙ ũ − x̃·W0ᵀ
            bd = basd[c].float().mul_(inv_keep)
            uc = torch.addmm(bd, xa32[c], B32.T, alpha=s)
            if need_u:
                u[c] = uc
            yc = uc.mul_(g).sub_(bd).add_(y[c])
        if bias32 is not None:
            yc.add_(bias32)
        y[c] = yc
    return y, xa, u


def _torch_backward(dy, x, qw, lora_A, lora_B, magnitude, scaling, norm, xa, *, u, y, dropout_p, dropout_seed,
                    need_dx):
    """``torch_path.dora_backward``'s math over a ``QuantWeight``, lean in memory: the fp32 work
    over chunks of tokens, W0 dequantised for the dx GEMMs only. Returns ``(dx or None, dA, dB, dm)``."""
    N, K = x.shape
    M = qw.shape[0]
    D, p, s = x.dtype, dropout_p, scaling
    inv_keep = 1.0 / (1.0 - p)
    x, dy = rows_packed(x), rows_packed(dy)
    g = gate(magnitude, norm)
    saved = y if y is not None else u
    B32 = lora_B.float()
    keep = torch_path.dropout_mask(dropout_seed, N, K, p, x.device) if p > 0 else None
    dm = torch.zeros(M, dtype=torch.float32, device=x.device)
    dB = torch.zeros((M, lora_B.shape[1]), dtype=torch.float32, device=x.device)
    gb = torch.empty((N, lora_B.shape[1]), dtype=torch.float32, device=x.device)
    gs = torch.empty((N, M), dtype=D, device=x.device) if need_dx else None  # G ⊙ g (G ⊙ (g − 1) with dropout)
    step = _token_rows(N, M)
    for i in range(0, N, step):
        c = slice(i, i + step)
        G = dy[c].float()
        dm += (G * saved[c].float()).sum(0)
        gsc = G * g  # (dy itself where it is fp32: never written to)
        gb[c] = gsc @ B32
        dB.addmm_(gsc.T, xa[c].float())
        if need_dx:
            gs[c] = gsc if p == 0 else dy[c] * (g - 1)
        del G, gsc
    del B32  # (fp32 copies of the adapters are not kept while W0 is dequantised)
    dm *= recip(norm, norm > 0)
    if y is not None:  # u = y / g per column; the rows where y carries u too coarsely are made again
        dm *= recip(g, g != 0)
        redo = redo_rows(magnitude, norm)
        if bool(redo.any()):
            rows = redo.nonzero().squeeze(1)
            uz = (x @ _rows_of(qw, rows, D).T).float() + s * (xa.float() @ lora_B[rows].float().T)
            dm[rows] = (dy[:, rows].float() * uz).sum(0) / norm[rows]
    dm, dB = dm.to(magnitude.dtype), (dB * s).to(lora_B.dtype)
    dA = torch.zeros(lora_A.shape, dtype=torch.float32, device=x.device)
    step = _token_rows(N, K)
    for i in range(0, N, step):
        c = slice(i, i + step)
        xd = x[c].float() if keep is None else x[c].float() * keep[c]
        dA.addmm_(gb[c].T, xd)
        del xd
    dA = (dA * (s * inv_keep)).to(lora_A.dtype)
    dx = None
    if need_dx:
        w = dequantize(qw, D)
        dx = gs @ w  # (G ⊙ g)·W0, or (G ⊙ (g − 1))·W0 with dropout; dx is written over it
        del gs
        dyw = dy @ w if p > 0 else None
        del w
        A32 = lora_A.float()
        for i in range(0, N, step):
            c = slice(i, i + step)
            dxc = dx[c].float().addmm_(gb[c], A32, alpha=s)
            if p > 0:  # dx = G·W0 + keep/(1 − p) ⊙ ((G ⊙ (g − 1))·W0 + s·gb·A)
                dxc.mul_(keep[c]).mul_(inv_keep).add_(dyw[c].float())
            dx[c] = dxc
    return dx, dA, dB, dm


class _QuantDoRA(torch.autograd.Function):
    """The fused op over a ``QuantWeight``: the launchers on ``packed(qw)`` where the Triton kernels
    run (``ops._run``, with its fallback), elsewhere ``_torch_forward`` / ``_torch_backward``. It
    saves what the unquantised op saves (x, xa, norm, u or y), never a dequantised weight: the
    backward dequantises again."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, bias, qw, scaling, norm, dropout_p, dropout_seed, norm_grad,
                need_u, save_output):
        exact = norm_grad == "exact"

        def on_triton():  # (the launcher makes the norm, and W0·Aᵀ for the exact gradient, unless given)
            return launchers.dora_forward(x, packed(qw), lora_A, lora_B, magnitude, scaling, bias,
                                          norm=None if exact else norm, dropout_p=dropout_p, dropout_seed=dropout_seed,
                                          with_wa=exact, need_u=need_u, need_xa=need_u or save_output)

        def on_torch():
            n, wa = (norm, None) if norm is not None and not exact else _torch_weight_norm(
                qw, lora_A, lora_B, scaling, with_wa=exact)
            y, xa, u = _torch_forward(x, qw, lora_A, lora_B, magnitude, scaling, bias, n, dropout_p, dropout_seed,
                                      need_u)
            return y, xa, u, n, wa

        y, xa, u, norm, wa = _run(qw, x, on_triton, on_torch)
        ctx.set_materialize_grads(False)
        ctx.qw, ctx.scaling, ctx.dropout_p, ctx.dropout_seed = qw, scaling, dropout_p, dropout_seed
        ctx.norm_grad, ctx.save_output = norm_grad, save_output
        ctx.save_for_backward(x, lora_A, lora_B, magnitude, bias, norm, xa, y if save_output else u, wa)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, magnitude, bias, norm, xa, saved, wa = ops._saved_or_hint(ctx)
        need_dx, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:5]
        need_bias = need_bias and bias is not None
        if dy is None:
            return (None,) * 13
        dbias = dy.sum(0).to(bias.dtype) if need_bias else None
        dx = dA = dB = dm = None
        qw, s = ctx.qw, ctx.scaling
        if need_dx or need_a or need_b or need_m:
            u, y = (None, saved) if ctx.save_output else (saved, None)
            dx, dA, dB, dm = _run(
                qw, x, lambda: launchers.dora_backward(dy if dy.stride(-1) == 1 else dy.contiguous(), x, packed(qw), lora_A,
                                                   lora_B, magnitude, s, norm, xa, u=u, y=y, dropout_p=ctx.dropout_p,
                                                   dropout_seed=ctx.dropout_seed, need_dx=need_dx, need_a=need_a),
                lambda: _torch_backward(dy, x, qw, lora_A, lora_B, magnitude, s, norm, xa, u=u, y=y,
                                        dropout_p=ctx.dropout_p, dropout_seed=ctx.dropout_seed, need_dx=need_dx))
            if not need_a:
                dA = None
            if ctx.norm_grad == "exact" and (need_a or need_b):
                w = _dense(qw, x.dtype, x) if dA is not None else None  # (only dA's term reads W0)
                dA, dB = ops._exact_norm_grad(dA, dB, dm, w, lora_A, lora_B, magnitude, s, norm, wa)
                del w
        return (dx if need_dx else None, dA if need_a else None, dB if need_b else None, dm if need_m else None,
                dbias, None, None, None, None, None, None, None, None)


def dora_linear(x, qw: QuantWeight, lora_A, lora_B, magnitude, scaling, bias=None, *, dropout_p=0.0, training=True,
                norm_grad="detached", dropout_seed=None, weight_norm=None, save_output=True):
    """``ops.dora_linear`` with a ``QuantWeight`` for ``weight`` (``ops.dora_linear`` sends it here).

    x: (..., in); returns (..., out) in x's dtype, as the op on ``dequantize(qw)`` cast to x's
    dtype: the GEMMs in x's dtype accumulated in fp32, the norm of ``dequantize(qw) + s·B·A`` in
    fp32. bias (out,) in x's dtype (bitsandbytes casts its bias to x's dtype too). Under autocast
    x and bias take the autocast dtype.
    """
    if not isinstance(save_output, bool):
        raise TypeError(f"dora_linear: save_output must be a bool, got {type(save_output).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and x.dtype in WEIGHT_DTYPES:
        dt = torch.get_autocast_dtype(dev)
        x = x.to(dt)
        bias = bias.to(dt) if isinstance(bias, Tensor) and bias.dtype in WEIGHT_DTYPES else bias
    if qw.device != x.device:
        raise ValueError(f"weight (a QuantWeight) is on {qw.device} but x is on {x.device}: all tensors must share a "
                         "device")
    scaling = ops.check_inputs(x, _stand_in(qw, x), lora_A, lora_B, magnitude, scaling, bias, dropout_p, norm_grad)
    p = float(dropout_p) if training else 0.0
    seed = 0
    if p > 0:
        seed = int(dropout_seed) if dropout_seed is not None else int(ops.draw_seed().item())
    if weight_norm is not None and (weight_norm.dtype != torch.float32 or weight_norm.shape != magnitude.shape):
        raise ValueError(f"weight_norm must be a float32 tensor of shape {tuple(magnitude.shape)}, "
                         f"got {_name(weight_norm)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    grad = torch.is_grad_enabled()
    if norm_grad == "exact" and not (grad and (lora_A.requires_grad or lora_B.requires_grad)):
        norm_grad = "detached"
    no_autocast = torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else contextlib.nullcontext()
    with no_autocast:
        need = grad and any(t.requires_grad for t in (x2, lora_A, lora_B, magnitude))
        save_output = need and save_output and p == 0 and bias is None
        y = _QuantDoRA.apply(x2, lora_A, lora_B, magnitude, bias, qw, scaling, weight_norm, p, seed, norm_grad,
                             need and not save_output, save_output)
    return ops._shaped(y, (*lead, qw.shape[0]), save_output)


# ---------------------------------------------------------------------------------------------
# what fuse needs

def _peft_bnb():
    return sys.modules.get("peft.tuners.lora.bnb")


def _peft_bnb_classes() -> tuple:
    bnb = _peft_bnb()
    return tuple(c for c in (getattr(bnb, "Linear4bit", None), getattr(bnb, "Linear8bitLt", None)) if c is not None)


def is_peft_bnb_layer(module) -> bool:
    """PEFT's ``lora.bnb.Linear4bit`` / ``Linear8bitLt`` (exact classes, or ``fuse``'s subclasses of them)."""
    cls = getattr(type(module), "_dora_kernels_base", type(module))
    return cls in _peft_bnb_classes()


def is_bnb_layer(module) -> bool:
    """A PEFT LoRA layer that ``why_not`` judges: PEFT's bnb classes, or any over a bitsandbytes base."""
    if is_peft_bnb_layer(module):
        return True
    get_base = getattr(module, "get_base_layer", None)
    return get_base is not None and _is_bitsandbytes(get_base())


def why_not(module) -> Optional[str]:
    """None if ``fuse`` serves this PEFT layer over a bitsandbytes base, else the reason."""
    lora = sys.modules.get("peft.tuners.lora.layer")
    cls = type(module)
    if not (is_peft_bnb_layer(module) or (lora is not None and cls is lora.Linear)):
        return f"{cls.__module__}.{cls.__qualname__}: only peft's lora.Linear and lora.bnb.Linear4bit / Linear8bitLt " \
               "are fused over a bitsandbytes base"
    base = module.get_base_layer()
    kind = bnb_kind(base)
    where = f"base layer {type(base).__module__}.{type(base).__qualname__}"
    if kind is None:
        return f"{where} is not a bitsandbytes Linear4bit or Linear8bitLt"
    if kind == "8bit" and getattr(getattr(base, "state", None), "has_fp16_weights", False):
        return f"{where} has has_fp16_weights=True (a 16-bit weight quantised at each call)"
    return None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def fused_args(module, base, x, name, active, p):
    """``fuse``'s plan for a PEFT layer over a bitsandbytes base: ``(name, later adapters,
    (x, QuantWeight, A, B, m, scaling, bias, p))``, or None for PEFT's path. The descriptor is built
    now, from the weights as they are (never at fuse time)."""
    if bnb_kind(base) is None or (torch.is_grad_enabled() and base.weight.requires_grad):
        return None
    qw = QuantWeight.from_module(base)
    A = module.lora_A[name].weight
    B = module.lora_B[name].weight
    m = module.lora_magnitude_vector[name].weight
    bias = base.bias
    if qw.shape != (B.shape[0], A.shape[1]) or x.shape[-1:] != qw.shape[1:] or x.dtype not in WEIGHT_DTYPES:
        return None
    tensors = (x, A, B, m) + ((bias,) if bias is not None else ())
    if qw.device != x.device or any(type(t) not in _PLAIN or t.dtype not in FLOATS or t.device != x.device
                                    for t in tensors):
        return None  # DTensor, ephemeral offload: PEFT's path
    if A.dtype != x.dtype and not getattr(module, "cast_input_dtype_enabled", True):
        return None
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # as bitsandbytes' layer does (it keeps its bias in x's dtype)
    return name, active[1:], (x, qw, A, B, m, module.scaling[name], bias, p)


def more_adapters(module, x, result, first, rest):
    """PEFT's ``lora.bnb`` forward loop for the active adapters after the fused first one ``first``,
    on the running result (its casts included: x to each adapter's dtype, the result back to its
    own after each)."""
    lora = sys.modules["peft.tuners.lora.layer"]
    keys = getattr(_peft_bnb(), "VARIANT_KWARG_KEYS", getattr(lora, "VARIANT_KWARG_KEYS", []))
    if not torch.is_autocast_enabled():
        x = module._cast_input_dtype(x, module.lora_A[first].weight.dtype)
    for active_adapter in rest:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        requires_conversion = not torch.is_autocast_enabled()
        if requires_conversion:
            expected_dtype = result.dtype
            x = module._cast_input_dtype(x, lora_A.weight.dtype)
        if active_adapter not in module.lora_variant:
            output = lora_B(lora_A(dropout(x))) * scaling
            if requires_conversion:
                output = output.to(expected_dtype)
            result = result + output
        else:
            result = module.lora_variant[active_adapter].forward(module, active_adapter=active_adapter, x=x,
                                                                 result=result, **dict.fromkeys(keys))
            if requires_conversion:
                result = result.to(expected_dtype)
    return result
