"""``fuse(model)``: run the DoRA layers of a model built by PEFT (or ``reference``) on the fused op.

Everything stays where PEFT put it. A PEFT ``lora.Linear`` with a DoRA adapter keeps its
parameters, buffers, adapters, ``lora_variant`` objects and ``state_dict``; only its class is
swapped for a subclass made on the fly whose ``forward`` sends the DoRA arithmetic through
``dora_linear``. ``unfuse(model)`` swaps the class back. Nothing is read at fuse time (the
parameters may still be on the meta device) and no parameter object is held: the layer
reads ``base_layer.weight``, ``lora_A[name].weight``, … each time it runs, so DDP, FSDP2 and
PEFT's loaders may replace them freely.

At run time a fused PEFT layer takes the fused path when its first active adapter is a DoRA
adapter and it is neither merged nor disabled: one call of the fused op gives
``x·W0ᵀ + bias`` plus that adapter's DoRA terms (PEFT's dropout form when its
``lora_dropout`` is an active ``nn.Dropout``). Further active adapters are then applied with
PEFT's own arithmetic, on the running result, as PEFT does. In every other case (merged,
``disable_adapter()``, ``adapter_names=``, a plain LoRA adapter first, extra positional
arguments, hooks on the base layer, an unfrozen base weight, mismatched dtypes or devices)
the layer runs PEFT's own ``forward``. PEFT's DoRA caching (``peft.helpers.DoraCaching``, eval
mode) is kept with PEFT's semantics: the fused op's fp32 norm is stored in the DoRA layer's
``_dora_cache`` on the first cached call and reused until PEFT clears the cache (``train()``, or
an uncached call, which clears it as PEFT's does); under autocast the norm is computed at each
call (of the autocast copy of W0) and not cached.

PEFT's ``lora.Embedding`` and ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d`` get the same treatment:
their forward is PEFT's loop over the active adapters (the base layer's own call first, plain
LoRA adapters and any adapter the fused arithmetic cannot serve on PEFT's code, each on the
running result), with every DoRA adapter's arithmetic replaced: the norm by the norm kernel
(``conv.conv_weight_norm``, ``embedding.embedding_weight_norm``: B·A never formed) and the
combination by a lean autograd Function (``conv.dora_conv_scale`` / ``dora_conv_dropout``,
``embedding.dora_embedding``), while the convolutions, the dropout module and the lookup run
as PEFT runs them. A conv adapter whose rank path would not match the base's output shape
(PEFT's ``lora_A`` ignores the base's dilation) runs PEFT's arithmetic, which fails or broadcasts
as it does unfused.

QDoRA: PEFT's ``lora.bnb.Linear4bit`` / ``Linear8bitLt`` and a ``lora.Linear`` over a bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` run the same fused forward with the weight described by a
``quant.QuantWeight``, built from the base layer at each call (``quant.fused_args``); after the
fused first adapter a ``lora.bnb`` layer runs PEFT's ``lora.bnb`` loop (``quant.more_adapters``).

Layers the op cannot serve (another quantised or otherwise custom base layer of a ``lora.Linear``,
PEFT layer classes other than these) are left alone; ``fuse`` warns about them and
``fuse_report(model)`` lists them.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import quant
from .common import FLOATS as _FLOATS
from .conv import conv_weight_norm, dora_conv_dropout, dora_conv_scale
from .embedding import dora_embedding, embedding_weight_norm
from .modules import DoRALinear
from .ops import dora_linear, weight_norm

__all__ = ["FuseReport", "fuse", "fuse_report", "fused_layers", "unfuse"]

logger = logging.getLogger(__name__)


_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)
_PLAIN = (torch.Tensor, nn.Parameter)


@dataclass
class FuseReport:
    """``fused``: names of the layers that run the fused op; ``skipped``: name -> why a DoRA
    layer stays on PEFT's path. Names as in ``model.named_modules()`` ("" is the model)."""

    fused: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# what a layer is

def _peft_lora():
    """PEFT's ``lora.layer`` module if PEFT is loaded (a model with PEFT layers implies it is)."""
    return sys.modules.get("peft.tuners.lora.layer")


def _is_reference_layer(module) -> bool:
    """``reference.DoRALinear`` (exact class), known without importing ``reference``."""
    ref = sys.modules.get("reference.dora")
    if ref is not None and hasattr(ref, "DoRALinear"):
        return type(module) is ref.DoRALinear
    cls = type(module)
    return (cls.__name__ == "DoRALinear" and cls.__module__.endswith("reference.dora")
            and all(hasattr(module, a) for a in ("weight", "lora_A", "lora_B", "magnitude", "scaling", "dropout_p")))


def _is_fused_peft(module) -> bool:
    return getattr(type(module), "_dora_kernels_base", None) is not None


def _has_dora(module) -> bool:
    mags = getattr(module, "lora_magnitude_vector", None)
    return isinstance(mags, nn.ModuleDict) and len(mags) > 0


def _conv1d_class():
    pu = sys.modules.get("transformers.pytorch_utils")
    return getattr(pu, "Conv1D", None) if pu is not None else None


def _base_kind(base) -> str | None:
    """"linear" (nn.Linear's own forward), "conv1d" (transformers' Conv1D), or None."""
    cls = type(base)
    if isinstance(base, nn.Linear) and cls.forward is nn.Linear.forward:
        return "linear"
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(base, conv1d) and cls.forward is conv1d.forward:
        return "conv1d"
    return None


def _nd_classes(lora) -> tuple:
    """PEFT's Embedding and Conv layer classes, which ``fuse`` serves besides ``lora.Linear``."""
    return (lora.Embedding, lora.Conv1d, lora.Conv2d, lora.Conv3d)


def _why_not(module) -> str | None:
    """None if ``fuse`` can serve this PEFT LoRA layer with a DoRA adapter, else the reason."""
    if quant.is_bnb_layer(module):  # PEFT's lora.bnb layers, or any over a bitsandbytes base
        return quant.why_not(module)
    lora = _peft_lora()
    cls = type(module)
    if lora is not None and cls in _nd_classes(lora):
        return None
    if lora is None or cls is not lora.Linear:
        return (f"{cls.__module__}.{cls.__qualname__}: only peft's lora.Linear, Embedding and Conv1d/Conv2d/Conv3d "
                "are fused")
    base = module.get_base_layer()
    if _base_kind(base) is None:
        return f"base layer {type(base).__module__}.{type(base).__qualname__} is not nn.Linear or Conv1D"
    return None


# ---------------------------------------------------------------------------------------------
# the fused PEFT layer

def _dropout_p(module, dropout) -> float | None:
    """PEFT's rule: no dropout when the module is nn.Identity or the layer is in eval; None
    for a dropout module the op does not know (the layer then runs PEFT's forward)."""
    if isinstance(dropout, nn.Identity) or not module.training:
        return 0.0
    if type(dropout) is nn.Dropout and not dropout.inplace:
        return float(dropout.p) if dropout.training else 0.0
    return None


def _peft_dora_caching(dora_layer) -> bool:
    """PEFT's DoRA caching (``peft.helpers.DoraCaching``) is on for this adapter's DoRA layer:
    the flag read at call time, as PEFT's ``cache_decorator`` reads it (eval mode only)."""
    dora = sys.modules.get("peft.tuners.lora.dora")
    return bool(getattr(dora, "ENABLE_DORA_CACHING", False)) and not dora_layer.training


def _fused_args(module, x, args, kwargs):
    """The arguments of ``dora_linear`` for the first active adapter, or None when this call
    must run PEFT's forward. Reads the parameters now, never at fuse time."""
    if args or module.disable_adapters or module.merged or not isinstance(x, torch.Tensor):
        return None
    lora = _peft_lora()
    # adapter_names= (PEFT raises for DoRA), variant kwargs, base-layer kwargs: PEFT's path.
    if any(v is not None or (k != "adapter_names" and k not in lora.VARIANT_KWARG_KEYS) for k, v in kwargs.items()):
        return None
    active = [a for a in module.active_adapters if a in module.lora_A.keys()]
    if not active:
        return None
    name = active[0]
    variants = sys.modules["peft.tuners.lora.variants"]
    if type(module.lora_variant.get(name)) is not variants.DoraLinearVariant or module.lora_bias.get(name, False):
        return None
    if name not in module.lora_magnitude_vector:
        return None
    p = _dropout_p(module, module.lora_dropout[name])
    if p is None:
        return None
    base = module.get_base_layer()
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return None  # e.g. FSDP2 gathering the weight, accelerate offloading: base_layer(x) must run
    if quant.bnb_kind(base) is not None:  # a quantised W0: its descriptor, read now
        return quant.fused_args(module, base, x, name, active, p)
    weight = base.weight
    if module.fan_in_fan_out:
        weight = weight.T  # Conv1D keeps (in, out): a view, never a copy
    bias = base.bias
    A = module.lora_A[name].weight
    B = module.lora_B[name].weight
    m = module.lora_magnitude_vector[name].weight
    if weight.dim() != 2 or weight.shape != (B.shape[0], A.shape[1]) or x.shape[-1:] != weight.shape[1:]:
        return None
    if torch.is_grad_enabled() and weight.requires_grad:
        return None  # the op gives no gradient for W0
    tensors = (x, weight, A, B, m) + ((bias,) if bias is not None else ())
    if any(type(t) not in _PLAIN or t.dtype not in _FLOATS or t.device != x.device for t in tensors):
        return None  # DTensor, quantised storage, ephemeral offload: PEFT's path
    if weight.dtype != x.dtype and not (torch.is_autocast_enabled(x.device.type) and x.dtype in _CASTABLE
                                        and weight.dtype in _CASTABLE):
        return None  # PEFT's base layer decides (and raises) as it would
    if A.dtype != x.dtype and not getattr(module, "cast_input_dtype_enabled", True):
        return None
    return name, active[1:], (x, weight, A, B, m, module.scaling[name], bias, p)


def _cached_norm(dora_layer, name, weight, A, B, scaling):
    """The fp32 norm kept in PEFT's DoRA cache (``DoraCaching`` on, eval mode), or None: PEFT's
    rule (an uncached call clears the cache)."""
    if not _peft_dora_caching(dora_layer):
        if getattr(dora_layer, "_dora_cache", None):
            dora_layer._cache_clear()
        return None
    if torch.is_autocast_enabled(weight.device.type):
        return None  # the op takes the norm of the autocast copy of W0: not cached
    key = f"dora_kernels-weight-norm-{name}"
    norm = dora_layer._cache_get(key, None)
    if norm is None:
        with torch.no_grad():
            norm = weight_norm(weight, A, B, scaling)[0]
        dora_layer._cache_store(key, norm)
    return norm


def _forward(self, x, *args, **kwargs):
    """PEFT's ``lora.Linear.forward`` with the first active DoRA adapter fused (see module doc)."""
    plan = _fused_args(self, x, args, kwargs)
    if plan is None:
        return type(self)._dora_kernels_base.forward(self, x, *args, **kwargs)
    name, rest, (x, weight, A, B, m, scaling, bias, p) = plan
    norm = _cached_norm(self.lora_magnitude_vector[name], name, weight, A, B, scaling)
    # Later adapters may add to the result in place (PEFT's BD-LoRA, aLoRA): then it is not saved.
    save_output = getattr(self, "_dora_kernels_save_output", True) and not rest
    result = dora_linear(x, weight, A, B, m, scaling, bias, dropout_p=p, training=True, weight_norm=norm,
                         save_output=save_output)
    if not rest:
        return result
    if quant.is_peft_bnb_layer(self):  # PEFT's lora.bnb loop casts after each adapter
        return quant.more_adapters(self, x, result, name, rest)
    # Later adapters: PEFT's loop verbatim, on the running result (x cast as PEFT casts it).
    result_dtype = result.dtype
    x = self._cast_input_dtype(x, A.dtype)
    for active_adapter in rest:
        lora_A = self.lora_A[active_adapter]
        lora_B = self.lora_B[active_adapter]
        dropout = self.lora_dropout[active_adapter]
        scaling = self.scaling[active_adapter]
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
        if active_adapter not in self.lora_variant:
            result = result + lora_B(lora_A(dropout(x))) * scaling
        else:
            result = self.lora_variant[active_adapter].forward(self, active_adapter=active_adapter, x=x, result=result,
                                                               **dict.fromkeys(_peft_lora().VARIANT_KWARG_KEYS))
    return result.to(result_dtype)


# ---------------------------------------------------------------------------------------------
# the fused PEFT Embedding and Conv layers

def _plain(tensors, device) -> bool:
    """Plain float tensors on ``device``: not DTensors, quantised storage or offloaded copies."""
    return all(type(t) in _PLAIN and t.dtype in _FLOATS and t.device == device for t in tensors)


def _runs_loop(module, x, args, kwargs) -> bool:
    """PEFT's forward would run its loop over the active adapters and nothing else: not
    disabled, not merged, no ``adapter_names=`` (PEFT raises for DoRA), no other arguments."""
    if args or module.disable_adapters or module.merged or not isinstance(x, torch.Tensor):
        return False
    return not any(v is not None or (k != "adapter_names" and k not in _peft_lora().VARIANT_KWARG_KEYS)
                   for k, v in kwargs.items())


def _norm(dora_layer, name, compute):
    """The fp32 norm that ``compute()`` gives, under PEFT's caching rule: kept in the DoRA layer's
    ``_dora_cache`` while ``DoraCaching`` is on (eval mode) and reused until PEFT clears it; an
    uncached call clears the cache, as PEFT's does."""
    if not _peft_dora_caching(dora_layer):
        if getattr(dora_layer, "_dora_cache", None):
            dora_layer._cache_clear()
        return compute()
    key = f"dora_kernels-weight-norm-{name}"
    norm = dora_layer._cache_get(key, None)
    if norm is None:
        norm = compute()
        dora_layer._cache_store(key, norm)
    return norm


def _wide_dtype(*tensors):
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def _conv_out_size(conv, size) -> tuple:
    """The spatial output size of ``conv`` (an ``nn.ConvNd``) for an input of spatial ``size``."""
    if conv.padding == "same":
        return tuple(size)
    pad = (0,) * len(size) if conv.padding == "valid" else conv.padding
    return tuple((n + 2 * p - d * (k - 1) - 1) // st + 1
                 for n, p, d, k, st in zip(size, pad, conv.dilation, conv.kernel_size, conv.stride))


def _conv_dora_ok(module, name, x, result) -> bool:
    """This DoRA adapter of a PEFT conv layer can run fused on this call."""
    variants, dora = sys.modules["peft.tuners.lora.variants"], sys.modules["peft.tuners.lora.dora"]
    if type(module.lora_variant.get(name)) not in (variants.DoraConv1dVariant, variants.DoraConv2dVariant,
                                                   variants.DoraConv3dVariant):
        return False
    layer = module.lora_magnitude_vector[name] if name in module.lora_magnitude_vector else None
    if type(layer) not in (dora.DoraConv1dLayer, dora.DoraConv2dLayer, dora.DoraConv3dLayer):
        return False
    base, lora_A = module.get_base_layer(), module.lora_A[name]
    # An unbatched input (PEFT broadcasts the (1, out, 1, …) magnitude over it), or a rank path
    # whose output differs from the base's (lora_A has no dilation): PEFT's arithmetic, which
    # broadcasts or fails as it does unfused.
    if x.dim() != base.weight.dim() or result.dim() != x.dim() \
            or _conv_out_size(lora_A, x.shape[2:]) != tuple(result.shape[2:]):
        return False
    A, B = lora_A.weight, module.lora_B[name].weight
    if not _plain((base.weight, A, B, layer.weight) + ((base.bias,) if base.bias is not None else ()), x.device):
        return False
    try:  # PEFT's norm views B as (-1, r) and A as (r, -1): where that fails (channels_last A), PEFT's error
        B.view(-1, A.shape[0]), A.view(A.shape[0], -1)
    except RuntimeError:
        return False
    return True


def _conv_dora(module, name, x, result, out_dtype):
    """One DoRA adapter of a PEFT conv layer on the running ``result``: PEFT's
    ``_DoraConvNdVariant.forward`` with the norm and the combination fused."""
    base = module.get_base_layer()
    lora_A, lora_B = module.lora_A[name], module.lora_B[name]
    dropout, scaling = module.lora_dropout[name], module.scaling[name]
    layer = module.lora_magnitude_vector[name]
    weight = base.weight
    norm = _norm(layer, name, lambda: conv_weight_norm(weight, lora_A.weight, lora_B.weight, scaling, base.groups))
    if isinstance(dropout, nn.Identity) or not module.training:
        return dora_conv_scale(result, lora_B(lora_A(x)), layer.weight, norm, scaling, base.bias, out_dtype=out_dtype)
    x = dropout(x)
    # PEFT makes the base of x̃ with the plain convolution: zero padding whatever the base's padding_mode.
    dropped = layer.conv_fn(x, weight, bias=None, stride=base.stride, padding=base.padding, dilation=base.dilation,
                            groups=base.groups)
    return dora_conv_dropout(result, dropped, lora_B(lora_A(x)), layer.weight, norm, scaling, out_dtype=out_dtype)


def _conv_forward(self, x, *args, **kwargs):
    """PEFT's ``_ConvNd.forward`` with the DoRA adapters' arithmetic fused (see module doc)."""
    if not _runs_loop(self, x, args, kwargs):
        return type(self)._dora_kernels_base.forward(self, x, *args, **kwargs)
    variant_kwargs = dict.fromkeys(_peft_lora().VARIANT_KWARG_KEYS)
    result = self.base_layer(x)
    torch_result_dtype = result.dtype
    active = [a for a in self.active_adapters if a in self.lora_A.keys()]
    for i, name in enumerate(active):
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
        if name not in self.lora_variant:
            result = result + lora_B(lora_A(dropout(x))) * scaling
        elif _conv_dora_ok(self, name, x, result):
            # The last adapter writes the result's dtype at once (PEFT casts its wider sum at the end).
            result = _conv_dora(self, name, x, result, torch_result_dtype if i == len(active) - 1 else None)
        else:
            result = self.lora_variant[name].forward(self, active_adapter=name, x=x, result=result, **variant_kwargs)
    return result.to(torch_result_dtype)


def _embedding_dora_ok(module, name) -> bool:
    """This DoRA adapter of a PEFT Embedding can run fused on this call."""
    variants, dora = sys.modules["peft.tuners.lora.variants"], sys.modules["peft.tuners.lora.dora"]
    if type(module.lora_variant.get(name)) is not variants.DoraEmbeddingVariant:
        return False
    layer = module.lora_magnitude_vector[name] if name in module.lora_magnitude_vector else None
    if type(layer) is not dora.DoraEmbeddingLayer:
        return False
    weight = module.get_base_layer().weight
    A, B = module.lora_embedding_A[name], module.lora_embedding_B[name]
    if weight.dim() != 2 or A.dim() != 2 or B.dim() != 2 or A.shape[1] != weight.shape[0] \
            or B.shape[0] != weight.shape[1]:
        return False
    return _plain((weight, A, B, layer.weight), weight.device)


def _embedding_dora(module, name, x, result, embed_scale, out_dtype):
    """One DoRA adapter of a PEFT Embedding on the running ``result``: PEFT's
    ``DoraEmbeddingVariant.forward`` with the norm and the combination fused."""
    A, B = module.lora_embedding_A[name], module.lora_embedding_B[name]
    scaling = module.scaling[name]
    layer = module.lora_magnitude_vector[name]
    weight = module.get_base_layer().weight
    # Before the lookup: with max_norm the lookup renormalises A's rows in place, and PEFT's norm
    # takes them as they were.
    norm = _norm(layer, name, lambda: embedding_weight_norm(weight, A, B, scaling))
    xa = module._embed(x, A.T)
    if embed_scale is not None:  # PEFT casts it to the dtype of its DoRA term
        embed_scale = embed_scale.to(_wide_dtype(layer.weight, weight, A, B))
    return dora_embedding(result, xa, B, layer.weight, norm, scaling, embed_scale, out_dtype=out_dtype)


def _embedding_forward(self, x, *args, **kwargs):
    """PEFT's ``Embedding.forward`` with the DoRA adapters' arithmetic fused (see module doc)."""
    if not _runs_loop(self, x, args, kwargs):
        return type(self)._dora_kernels_base.forward(self, x, *args, **kwargs)
    variant_kwargs = dict.fromkeys(_peft_lora().VARIANT_KWARG_KEYS)
    result = self.base_layer(x)
    torch_result_dtype = result.dtype
    embed_scale = self._get_embed_scale()
    active = [a for a in self.active_adapters if a in self.lora_embedding_A]
    for i, name in enumerate(active):
        if name not in self.lora_variant:  # PEFT's plain LoRA, verbatim
            embedding_A = self.lora_embedding_A[name].T
            embedding_B = self.lora_embedding_B[name].T
            scaling = self.scaling[name]
            after_A = self._embed(x, embedding_A, input_fn=self.input_fns.get(name, None),
                                  output_fn=self.output_fns.get(name, None))
            adapter_output = (after_A @ embedding_B) * scaling
            if embed_scale is not None:
                adapter_output = adapter_output * embed_scale.to(adapter_output.dtype)
            result = result + adapter_output
        elif _embedding_dora_ok(self, name):
            result = _embedding_dora(self, name, x, result, embed_scale,
                                     torch_result_dtype if i == len(active) - 1 else None)
        else:
            result = self.lora_variant[name].forward(self, active_adapter=name, x=x, result=result, **variant_kwargs)
    return result.to(torch_result_dtype)


def _forward_of(cls):
    """The fused forward for PEFT layer class ``cls``."""
    lora = _peft_lora()
    if lora is not None and issubclass(cls, lora.Embedding):
        return _embedding_forward
    if lora is not None and issubclass(cls, lora._ConvNd):
        return _conv_forward
    return _forward


_FUSED_CLASSES: dict = {}
_PREFIX = "Fused["


def _class_key(cls) -> str:
    # A name ``pickle`` can look up in this module (see ``__getattr__``): dots would split it.
    return f"{_PREFIX}{cls.__module__.replace('.', '/')}:{cls.__qualname__}]"


def _fused_class(cls):
    """The subclass of PEFT layer class ``cls`` whose forward is the fused one (one per class)."""
    fused = _FUSED_CLASSES.get(cls)
    if fused is None:
        fused = type(cls.__name__, (cls,), {
            "forward": _forward_of(cls), "_dora_kernels_base": cls, "__module__": __name__,
            "__qualname__": _class_key(cls),
            "__doc__": f"{cls.__qualname__} whose DoRA adapters run the fused op (dora_kernels.fuse)."})
        _FUSED_CLASSES[cls] = fused
    return fused


def __getattr__(name):
    """Rebuild a fused class by name, so a pickled fused model loads in a fresh process."""
    if name.startswith(_PREFIX) and name.endswith("]"):
        mod, _, qual = name[len(_PREFIX):-1].partition(":")
        import importlib

        cls = importlib.import_module(mod.replace("/", "."))
        for part in qual.split("."):
            cls = getattr(cls, part)
        return _fused_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# reference.DoRALinear <-> dora_kernels.DoRALinear (same object, same parameters)

def _fuse_reference(module) -> None:
    # The plain attributes DoRALinear sets in __init__ (norm_grad, merged, caches) that the
    # reference layer lacks, with their initial values: taken from a parameterless instance.
    proto = DoRALinear(1, 1, r=1, device="meta")
    added = {k: v for k, v in vars(proto).items() if k not in vars(module) and not isinstance(v, torch.Tensor)}
    vars(module).update(added)
    module._dora_kernels_reference = (type(module), tuple(added))
    module.__class__ = DoRALinear


def _unfuse_reference(module) -> None:
    if module.merged:
        module.unmerge()
    cls, added = vars(module).pop("_dora_kernels_reference")
    for k in added:
        vars(module).pop(k, None)
    module.__class__ = cls


# ---------------------------------------------------------------------------------------------
# public API

def fuse(model: nn.Module, *, verbose: bool = False, save_output: bool | None = None) -> nn.Module:
    """Make the DoRA layers of ``model`` run the fused op, in place; returns ``model``.

    - ``reference.DoRALinear`` layers become ``dora_kernels.DoRALinear`` (the same module
      object and Parameter objects; training mode, dropout and scaling kept).
    - PEFT ``lora.Linear`` layers with a DoRA adapter (nn.Linear or transformers' Conv1D base,
      ``fan_in_fan_out`` included), ``lora.Embedding`` and ``lora.Conv1d`` / ``Conv2d`` /
      ``Conv3d`` layers with one get a subclass of their class whose ``forward`` uses the fused
      op (the fused norm and DoRA combination for Embedding and Conv); PEFT's numbers,
      state_dict, saving/loading and merging are unchanged.
    - the same over bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` bases (QDoRA): PEFT's
      ``lora.bnb`` layers and ``lora.Linear`` (``dora_kernels.quant``).

    Idempotent: a second call fuses nothing twice and picks up layers added since
    (``add_adapter``, ``load_adapter``). DoRA layers it cannot serve (other quantised or custom
    bases of a ``lora.Linear``, other PEFT layer classes) stay on PEFT's path and are reported with a
    warning; ``verbose`` also logs each
    fused layer (logger ``dora_kernels.fuse``, level INFO). ``fuse_report(model)`` lists both.
    ``save_output`` (see ``dora_linear``): False where the model modifies a DoRA layer's output
    in place, True to reset; set on every fused layer when given. None (the default) leaves
    layers as they are (a ``DoRALinear``'s own setting, an earlier ``fuse``'s) and makes newly
    fused layers save their output. (Fused Embedding and Conv layers never keep their output.)
    """
    if save_output is not None and not isinstance(save_output, bool):
        raise TypeError(f"fuse: save_output must be None or a bool, got {type(save_output).__name__}")
    lora = _peft_lora()
    for name, module in model.named_modules():
        if _is_reference_layer(module):
            _fuse_reference(module)
        elif lora is not None and isinstance(module, lora.LoraLayer) and not _is_fused_peft(module) \
                and _has_dora(module) and _why_not(module) is None:
            module.__class__ = _fused_class(type(module))
        else:
            continue
        if verbose:
            logger.info("dora_kernels.fuse: fused %s", name or "<model>")
    if save_output is not None:
        for module in model.modules():
            if isinstance(module, DoRALinear):
                module.save_output = save_output
            elif _is_fused_peft(module):
                module._dora_kernels_save_output = save_output
    report = fuse_report(model)
    if report.skipped:
        lines = "\n".join(f"  {n or '<model>'}: {why}" for n, why in report.skipped.items())
        warnings.warn(f"dora_kernels.fuse left {len(report.skipped)} DoRA layer(s) on PEFT's path:\n{lines}",
                      stacklevel=2)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo ``fuse`` in place (a merged ``DoRALinear`` that came from ``reference`` is unmerged
    first); returns ``model``. Layers built as ``dora_kernels.DoRALinear`` stay as they are."""
    for _, module in model.named_modules():
        if _is_fused_peft(module):
            module.__class__ = type(module)._dora_kernels_base
            vars(module).pop("_dora_kernels_save_output", None)
        elif isinstance(module, DoRALinear) and "_dora_kernels_reference" in vars(module):
            _unfuse_reference(module)
    return model


def fuse_report(model: nn.Module) -> FuseReport:
    """Which layers of ``model`` run the fused op and which DoRA layers do not, and why."""
    report = FuseReport()
    lora = _peft_lora()
    for name, module in model.named_modules():
        if isinstance(module, DoRALinear) or _is_fused_peft(module):
            report.fused.append(name)
        elif _is_reference_layer(module):
            report.skipped[name] = "reference.DoRALinear not fused yet: call fuse(model)"
        elif lora is not None and isinstance(module, lora.LoraLayer) and _has_dora(module):
            report.skipped[name] = (_why_not(module)
                                    or f"peft lora.{type(module).__name__} not fused yet: call fuse(model)")
    return report


def fused_layers(model: nn.Module) -> list:
    """Names (as in ``named_modules``) of the layers that run the fused op."""
    return fuse_report(model).fused
