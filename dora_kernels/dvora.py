"""DVoRA (DoRA over VeRA) as a PEFT method that trains on the fused DoRA op.

    model = peft.get_peft_model(model, dora_kernels.DVoRAConfig(r=256, target_modules=["q_proj", "v_proj"]))

VeRA's conventions (PEFT ``tuners/vera``): one pair of frozen projections per model,
``vera_A (r, max_in)`` and ``vera_B (max_out, r)`` (``dvora_ops.vera_projections``: VeRA's very
tensors for the same key and shapes); each layer uses ``A = vera_A[:r, :in]``,
``B = vera_B[:out, :r]`` and trains ``λ_d (r,)``, ``λ_b (out,)`` and DoRA's magnitude ``m (out,)``::

    V = W0 + diag(λ_b)·B·diag(λ_d)·A
    y = (m / ‖V‖_rows) ⊙ (x·W0ᵀ + ((x·Aᵀ) ⊙ λ_d)·(diag(λ_b)·B)ᵀ) + bias

(norm detached, no alpha/r; dropout on the adapter branch in PEFT's DoRA form). Initialised as
VeRA does, λ_d = ``d_initial``, λ_b = 0 (``init_weights=False``: λ_b = 1, λ_d ~ N(0, 1)), and
m = ‖V‖ rows at init. The forward is ``dvora_ops.dvora_linear`` (the fused op).

Several active adapters add their deltas, each taken on W0: ``y = x·W0ᵀ + bias + Σ_a (y_a −
x·W0ᵀ − bias)``, ``y_a`` the layer with adapter a alone. Merging keeps that sum: adapter a adds
``g_a ⊙ (W0 + ΔW_a) − W0`` with g_a from the unmerged W0, which is recovered from the merged weight
and the g of the adapters merged so far (kept until unmerge).

Importing this module registers the method with PEFT (``PeftType.DVORA``, prefix ``dvora_``), so
``PeftModel.from_pretrained`` can load a DVoRA checkpoint once it has been imported.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

try:
    from peft.config import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.tuners_utils import (
        BaseTuner,
        BaseTunerLayer,
        _get_in_out_features,
        _maybe_include_all_linear_layers,
        check_adapters_to_merge,
    )
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING,
        PeftType,
        register_peft_method,
        resolve_quantization_backend,
    )
except ImportError as e:  # peft is an optional extra of dora_kernels
    raise ImportError("dora_kernels.dvora (DVoRAConfig, DVoRAModel) needs PEFT (tested with 0.21.2): "
                      "pip install peft") from e
if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):
    # Older PEFT saves VeRA-style shared projections through per-method code in save_and_load.
    raise ImportError("dora_kernels.dvora needs a newer PEFT, whose tuners save their own state dict entries "
                      "(tested with 0.21.2): pip install -U peft")
try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # isinstance(x, ()) is False: no Conv1D base without transformers
    Conv1D = ()

from .dvora_ops import dvora_delta_weight, dvora_linear, dvora_weight_norm, frozen_cast, vera_projections

__all__ = ["DVoRAConfig", "DVoRALayer", "DVoRALinear", "DVoRAModel"]

PEFT_NAME = "dvora"
PREFIX = "dvora_"
BIAS_MODES = ("none", "all", "dvora_only")


def _register_peft_type(name: str) -> PeftType:
    """``PeftType[name]``, adding the member first if PEFT does not list it: ``register_peft_method``
    accepts only names of its ``PeftType`` enum, which a method outside PEFT cannot edit."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    add = getattr(PeftType, "_add_member_", None)  # Python ≥ 3.13
    if add is not None:
        add(name, member)
    else:
        PeftType._member_map_[name] = member
        type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ only guards existing members
    # Iteration (``list(PeftType)``, which register_peft_method checks) and lookup by value read these.
    if name not in PeftType._member_names_:
        PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


DVORA = _register_peft_type(PEFT_NAME.upper())


def _validate(config: "DVoRAConfig") -> None:
    """The config errors VeRA leaves to the first forward (or never raises)."""
    r = config.r
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"DVoRAConfig: r must be a positive integer, got {r!r}")
    key = config.projection_prng_key
    if isinstance(key, bool) or not isinstance(key, int):
        raise ValueError(f"DVoRAConfig: projection_prng_key must be an integer, got {key!r}")
    d = config.d_initial
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
        raise ValueError(f"DVoRAConfig: d_initial must be a finite number, got {d!r}")
    p = config.dvora_dropout
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"DVoRAConfig: dvora_dropout must be a number in [0, 1), got {p!r}")
    if config.bias not in BIAS_MODES:
        raise ValueError(f"DVoRAConfig: bias must be one of {BIAS_MODES}, got {config.bias!r}")


@dataclass
class DVoRAConfig(PeftConfig):
    """Configuration of a ``DVoRAModel`` (VeRA's ``VeraConfig`` fields, ``dvora_`` for ``vera_``).

    Args:
        r: rank of the shared projections (VeRA's default 256; far above LoRA ranks, since a layer
            trains r + 2·out numbers whatever r is).
        target_modules: names or a regex of the modules to adapt (``nn.Linear``, GPT-2 ``Conv1D``);
            None takes VeRA's defaults for known architectures, ``"all-linear"`` every linear layer.
        projection_prng_key: seed of the shared projections; every adapter of a model must use the
            same one.
        save_projection: save ``vera_A``/``vera_B`` in the checkpoint (else they are rebuilt from
            the key at load, which relies on torch's CPU generator being the same).
        d_initial: initial value of every λ_d (small, ≤ 0.1, as in VeRA's paper).
        dvora_dropout: dropout probability on the adapter branch (DoRA's form: the base path stays
            undropped).
        fan_in_fan_out: True for bases that store (in, out) weights (GPT-2 ``Conv1D``); corrected
            with a warning where it does not fit the layer.
        bias: "none", "all" or "dvora_only": which biases train.
        modules_to_save: other modules to train and save (e.g. a classifier head).
        init_weights: VeRA's init (λ_b = 0, λ_d = d_initial: the model starts as the base model);
            False leaves λ_b = 1 and λ_d ~ N(0, 1).
        layers_to_transform, layers_pattern: restrict the adapted layers by index, as in PEFT.
    """

    r: int = field(default=256, metadata={"help": "DVoRA rank: rows of vera_A, columns of vera_B"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of the modules to adapt (linear layers only)"})
    projection_prng_key: int = field(default=0, metadata={"help": "Seed of the shared vera_A / vera_B"})
    save_projection: bool = field(default=True, metadata={"help": "Save vera_A / vera_B in the checkpoint"})
    d_initial: float = field(default=0.1, metadata={"help": "Initial value of lambda_d"})
    dvora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True for (in, out) weights (GPT-2 Conv1D)"})
    bias: str = field(default="none", metadata={"help": "Which biases train: 'none', 'all' or 'dvora_only'"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train and save (e.g. a classifier head)"})
    init_weights: bool = field(default=True, metadata={"help": "VeRA's init (the model starts as the base model)"})
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indexes of the layers to adapt"})
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers (with layers_to_transform)"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = DVORA
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) \
            else self.target_modules
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("DVoRAConfig: layers_pattern needs layers_to_transform")
        _validate(self)
        if not self.save_projection:
            warnings.warn("DVoRAConfig(save_projection=False): vera_A and vera_B are not saved and will be rebuilt "
                          "from projection_prng_key at load, which relies on torch's CPU generator giving the same "
                          "numbers there")


# ---------------------------------------------------------------------------------------------
# the layer

class DVoRALayer(BaseTunerLayer):
    """PEFT bookkeeping of a DVoRA layer: per adapter λ_b (out,), λ_d (r,), m (out,), dropout,
    and references to the model's shared ``vera_A`` / ``vera_B`` (``BufferDict``s)."""

    adapter_layer_names = ("dvora_lambda_b", "dvora_lambda_d", "dvora_magnitude")
    other_param_names = ("vera_A", "vera_B", "dvora_dropout", "r")
    fan_in_fan_out = False  # True: the base stores (in, out) (GPT-2 Conv1D)

    def __init__(self, base_layer: nn.Module, **kwargs):
        self.base_layer = base_layer
        self.r = {}
        self.dvora_dropout = nn.ModuleDict({})
        self.dvora_lambda_b = nn.ParameterDict({})
        self.dvora_lambda_d = nn.ParameterDict({})
        self.dvora_magnitude = nn.ParameterDict({})
        # The model's BufferDicts (shared by every layer; None until the first adapter).
        self.vera_A: Optional[BufferDict] = None
        self.vera_B: Optional[BufferDict] = None
        self._disable_adapters = False
        self.merged_adapters = []
        # g = m / ‖W0 + ΔW‖ (out,) fp32 of each merged adapter: unmerging needs the g used to merge.
        self._merged_gates: dict[str, torch.Tensor] = {}
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"DVoRA: unsupported layer type {type(self.get_base_layer()).__name__}")
        self.in_features, self.out_features = in_features, out_features
        self.kwargs = kwargs

    def _base_weight(self) -> torch.Tensor:
        """W0 as (out, in): a view of the base layer's weight (its transpose for ``Conv1D``)."""
        w = self.get_base_layer().weight
        return w.T if self.fan_in_fan_out else w

    def _projections(self, adapter: str, device=None, a_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's slices ``A (r, in)``, ``B (out, r)`` of the shared projections (views), on
        ``device`` and A in ``a_dtype`` if given: of copies of the whole projections that
        ``frozen_cast`` makes once and shares with every layer, not per step."""
        r = self.r[adapter]
        A, B = self.vera_A[adapter], self.vera_B[adapter]
        if device is not None or a_dtype is not None:
            A, B = frozen_cast(A, a_dtype, device), frozen_cast(B, None, device)
        return A[:r, : self.in_features], B[: self.out_features, :r]

    def update_layer(self, adapter_name, vera_A: BufferDict, vera_B: BufferDict, r, config: DVoRAConfig,
                     inference_mode: bool = False, **kwargs):
        _validate(config)
        if r <= 0:
            raise ValueError(f"DVoRA: r must be a positive integer, got {r}")
        self.r[adapter_name] = r
        p = float(config.dvora_dropout)
        self.dvora_dropout.update(nn.ModuleDict({adapter_name: nn.Dropout(p=p) if p > 0 else nn.Identity()}))
        # VeRA's values without its init: λ_b = 1, λ_d ~ N(0, 1).
        self.dvora_lambda_b[adapter_name] = nn.Parameter(torch.ones(self.out_features))
        self.dvora_lambda_d[adapter_name] = nn.Parameter(torch.randn(r))

        self.vera_A, self.vera_B = vera_A, vera_B
        if adapter_name not in vera_A:
            # A later adapter uses the projections the first one made; they must be large enough.
            if len(vera_A) < 1:
                raise ValueError("DVoRA: the shared vera_A / vera_B are empty")
            A0, B0 = next(iter(vera_A.values())), next(iter(vera_B.values()))
            for what, have, need in (("vera_A columns (in)", A0.shape[1], self.in_features),
                                     ("vera_B rows (out)", B0.shape[0], self.out_features),
                                     ("vera_A rows (r)", A0.shape[0], r)):
                if have < need:
                    raise ValueError(f"DVoRA: adapter {adapter_name!r} needs {need} {what} but the shared "
                                     f"projections have {have}: the first adapter of a model fixes their size (add "
                                     "the largest one first)")
            vera_A[adapter_name], vera_B[adapter_name] = A0, B0

        if config.init_weights:
            with torch.no_grad():
                self.dvora_lambda_d[adapter_name].fill_(config.d_initial)
                self.dvora_lambda_b[adapter_name].zero_()
        self.dvora_magnitude[adapter_name] = nn.Parameter(self._initial_magnitude(adapter_name))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def _initial_magnitude(self, adapter: str) -> torch.Tensor:
        """m = ‖W0 + ΔW‖ rows (out,) fp32, by the op's own norm (so g = 1 at init)."""
        w = self._base_weight()
        lam_b, lam_d = self.dvora_lambda_b[adapter], self.dvora_lambda_d[adapter]
        if any(t.device.type == "meta" for t in (w, lam_b, lam_d)):  # low_cpu_mem_usage: loaded later
            return torch.empty(self.out_features, device="meta")
        A, B = self._projections(adapter, w.device)
        return dvora_weight_norm(w.detach(), A, B, lam_d.to(w.device), lam_b.to(w.device))

    def reset_dvora_parameters(self, adapter_name: str, d_initial: float = 0.1) -> None:
        """VeRA's init (λ_d = d_initial, λ_b = 0) and m = ‖V‖ again."""
        if adapter_name in self.dvora_lambda_d:
            with torch.no_grad():
                self.dvora_lambda_d[adapter_name].fill_(d_initial)
                self.dvora_lambda_b[adapter_name].zero_()
                m = self.dvora_magnitude[adapter_name]
                m.copy_(self._initial_magnitude(adapter_name).to(m.device, m.dtype))


class DVoRALinear(nn.Module, DVoRALayer):
    """DVoRA over an ``nn.Linear`` or a GPT-2 ``Conv1D`` (``fan_in_fan_out``), on the fused op."""

    def __init__(self, base_layer, vera_A: BufferDict, vera_B: BufferDict, adapter_name: str,
                 config: DVoRAConfig, r: int = 0, is_target_conv_1d_layer: bool = False, **kwargs) -> None:
        super().__init__()
        DVoRALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, vera_A, vera_B, r, config=config)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer

    # -- merging ------------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """VeRA's ``ΔW = diag(λ_b)·B·diag(λ_d)·A`` in the base weight's layout and dtype (the
        unnormalised update; the merged weight is ``g ⊙ (W0 + ΔW)``)."""
        w = self.get_base_layer().weight
        delta = self._delta32(adapter, w.device)
        return (delta.T if self.fan_in_fan_out else delta).to(w.dtype)

    def _delta32(self, adapter: str, device) -> torch.Tensor:
        A, B = self._projections(adapter, device)
        return dvora_delta_weight(A, B, self.dvora_lambda_d[adapter].to(device),
                                  self.dvora_lambda_b[adapter].to(device))

    @torch.no_grad()
    def _unmerged_weight32(self, device) -> torch.Tensor:
        """W0 (out, in) fp32 from the merged weight ``W = c ⊙ W0 + Σ g_a ⊙ ΔW_a``,
        ``c = 1 + Σ (g_a − 1)`` over the merged adapters."""
        w = self._base_weight().detach().float()
        if not self.merged_adapters:
            return w
        c = torch.ones(self.out_features, device=device)
        for a in self.merged_adapters:
            g = self._merged_gates[a].to(device)
            w = w - g[:, None] * self._delta32(a, device)
            c = c + (g - 1)
        return w / c[:, None]

    @torch.no_grad()
    def _gate(self, adapter: str, w0: torch.Tensor) -> torch.Tensor:
        """g = m / ‖W0 + ΔW‖ (out,) fp32 by the op's norm; g = 0 where the norm is 0 (the op's rule)."""
        A, B = self._projections(adapter, w0.device)
        lam_d, lam_b = self.dvora_lambda_d[adapter].to(w0.device), self.dvora_lambda_b[adapter].to(w0.device)
        n = dvora_weight_norm(w0, A, B, lam_d, lam_b)
        m = self.dvora_magnitude[adapter].float().to(w0.device)
        return torch.where(n > 0, m / n, torch.zeros_like(n))

    def _set_weight(self, w_out_in: torch.Tensor) -> None:
        weight = self.get_base_layer().weight
        new = (w_out_in.T if self.fan_in_fan_out else w_out_in).contiguous().to(weight.dtype)
        self.set_base_weight(new)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the active (or the named) adapters into the base weight: each adds
        ``g ⊙ (W0 + ΔW) − W0``, its g taken on the unmerged W0 as the forward takes it."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.dvora_lambda_d]
        if not adapter_names:
            return
        weight = self.get_base_layer().weight
        device = weight.device
        w0 = self._unmerged_weight32(device)
        # The norm as the forward sees it: of W0 in the base dtype (exactly the stored weight when
        # nothing is merged yet).
        w0_base = self._base_weight().detach() if not self.merged_adapters else w0.to(weight.dtype)
        w = self._base_weight().detach().float()
        gates = {}
        for a in adapter_names:
            g = self._gate(a, w0_base)
            w = w + (g - 1)[:, None] * w0 + g[:, None] * self._delta32(a, device)
            gates[a] = g
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_names} seems to be broken")
        self._set_weight(w)
        self._merged_gates.update(gates)
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 from the merged weight and the g each merged adapter used."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        w0 = self._unmerged_weight32(self.get_base_layer().weight.device)
        self._set_weight(w0)
        self.merged_adapters.clear()
        self._merged_gates.clear()

    # -- forward ------------------------------------------------------------------------------

    def _adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        lam_d, lam_b = self.dvora_lambda_d[adapter], self.dvora_lambda_b[adapter]
        # A in the adapters' dtype, as the op takes it (dvora_factors): cast once, not every step.
        A, B = self._projections(adapter, x.device, torch.promote_types(lam_d.dtype, lam_b.dtype))
        drop = self.dvora_dropout[adapter]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        return dvora_linear(x, self._base_weight(), A, B, lam_d, lam_b, self.dvora_magnitude[adapter], base.bias,
                            dropout_p=p, training=self.training)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.dvora_lambda_d]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        result = self._adapter_forward(active[0], x)
        if len(active) > 1:
            # Each output holds the base once: add the others' deltas only.
            base = self.base_layer(x, *args, **kwargs)
            for a in active[1:]:
                result = result + (self._adapter_forward(a, x) - base)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False  # the row normalisation is not a low-rank update

    def __repr__(self) -> str:
        return "dvora." + super().__repr__()


# ---------------------------------------------------------------------------------------------
# the model

def _layer_class(base: nn.Module):
    return DVoRALinear if isinstance(base, (nn.Linear, Conv1D)) else None


class DVoRAModel(BaseTuner):
    """Turns a model into a DVoRA model (``peft.get_peft_model(model, DVoRAConfig(...))``).

    Holds the shared projections ``vera_A`` / ``vera_B`` (``BufferDict``s keyed by adapter,
    persistent iff ``save_projection``); the checkpoint stores them once, as ``base_model.vera_A``
    / ``base_model.vera_B``, beside each layer's ``dvora_lambda_b``, ``dvora_lambda_d``,
    ``dvora_magnitude``.
    """

    uses_shared_state: bool = True
    prefix: str = PREFIX
    tuner_layer_cls = DVoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING

    def _find_dim(self, config: DVoRAConfig) -> tuple[int, int]:
        """(max_out, max_in) over the layers this config adapts: the projections' size."""
        peft_config = self._prepare_adapter_config(config, self.get_model_config(self.model))
        peft_config = _maybe_include_all_linear_layers(peft_config, self.model)
        largest = None
        for key, module in self.model.named_modules():
            if not self._check_target_module_exists(peft_config, key) or _layer_class(module) is None:
                continue
            in_features, out_features = _get_in_out_features(module)
            shape = (out_features, in_features)
            largest = shape if largest is None else tuple(max(a, b) for a, b in zip(largest, shape))
        if largest is None:
            raise ValueError("DVoRA: no nn.Linear or Conv1D layer matches target_modules; check "
                             "DVoRAConfig.target_modules")
        return largest

    def _pre_injection_hook(self, model: nn.Module, config: DVoRAConfig, adapter_name: str) -> None:
        max_out, max_in = self._find_dim(config)
        # persistent=False keeps them out of the state dict (save_projection=False).
        self.vera_A = BufferDict({}, persistent=config.save_projection)
        self.vera_B = BufferDict({}, persistent=config.save_projection)
        A, B = vera_projections(config.r, max_in, max_out, config.projection_prng_key)
        self.vera_A[adapter_name], self.vera_B[adapter_name] = A, B

    def _check_new_adapter_config(self, config: DVoRAConfig) -> None:
        super()._check_new_adapter_config(config)
        _validate(config)
        for other in self.peft_config.values():
            if other is not config and other.projection_prng_key != config.projection_prng_key:
                raise ValueError(f"DVoRA: every adapter of a model shares one pair of projections, so "
                                 f"projection_prng_key must be the same for all adapters; got "
                                 f"{config.projection_prng_key} but an existing adapter has "
                                 f"{other.projection_prng_key}")
        if len({c.save_projection for c in self.peft_config.values()}) > 1:
            raise ValueError("DVoRA: save_projection must be the same for all adapters of a model")

    def _create_and_replace(self, dvora_config, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        if current_key is None:
            raise ValueError("DVoRA: current_key must not be None")
        if isinstance(target, DVoRALinear):
            target.update_layer(adapter_name, self.vera_A, self.vera_B, dvora_config.r, config=dvora_config)
            return
        new_module = self._create_new_module(dvora_config, self.vera_A, self.vera_B, adapter_name, target,
                                             r=dvora_config.r)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter does not train until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(dvora_config, vera_A, vera_B, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if resolve_quantization_backend(base) is not None:
            raise TypeError(f"DVoRA: target module {target} is quantized; DVoRA runs on the fused op, which needs a "
                            "floating-point base weight (quantized bases are not supported yet)")
        layer_cls = _layer_class(base)
        if layer_cls is None:
            raise TypeError(f"DVoRA: target module {target} is not supported; only torch.nn.Linear and "
                            "transformers' Conv1D are")
        if isinstance(base, Conv1D):
            kwargs["is_target_conv_1d_layer"] = True
            if not dvora_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is False but the target module is Conv1D: setting it to True")
                dvora_config.fan_in_fan_out = True
        elif dvora_config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is True but the target module is torch.nn.Linear: setting it to False")
            dvora_config.fan_in_fan_out = False
        return layer_cls(target, vera_A, vera_B, adapter_name, config=dvora_config, **kwargs)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # Every layer references the shared projections: keep only the model's one copy.
        to_return = {k: v for k, v in to_return.items() if ".vera_A." not in k and ".vera_B." not in k}
        if config.save_projection:
            for name in ("vera_A", "vera_B"):
                key = f"base_model.{name}.{adapter_name}"
                if key not in state_dict:
                    raise ValueError("DVoRA: the model was built with save_projection=False but the config now asks "
                                     "to save the projections; set config.save_projection = False")
                to_return[key] = state_dict[key]
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        if config.save_projection and f"base_model.vera_A.{adapter_name}" not in remapped:
            raise ValueError("DVoRA: the config says the checkpoint holds vera_A / vera_B (save_projection=True) "
                             "but it does not")
        if not config.save_projection and "base_model.vera_A" in remapped:
            warnings.warn("DVoRA: save_projection=False but the checkpoint holds vera_A / vera_B; they are not "
                          "loaded (the projections are rebuilt from projection_prng_key)")
        return remapped


_registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(DVORA)
if _registered is None:
    register_peft_method(name=PEFT_NAME, config_cls=DVoRAConfig, model_cls=DVoRAModel, prefix=PREFIX)
elif _registered.__module__ != __name__:  # a reload of this module finds its own earlier classes: fine
    warnings.warn(f"PEFT already has a method called {PEFT_NAME!r} ({_registered.__module__}.{_registered.__name__}); "
                  "dora_kernels' DVoRA is not registered, so PeftModel.from_pretrained will not build it", UserWarning)
