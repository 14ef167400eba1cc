"""``DoRALinear``: the fused op as an ``nn.Module``.

Same constructor, ``from_linear``, parameter names and state_dict as ``reference.DoRALinear``
(either loads the other's checkpoint), plus ``merge()`` / ``unmerge()`` and an eval mode
that computes the weight norm once and reuses it until the weights change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import NORM_GRADS, gate, recip
from .ops import dora_linear, weight_norm


class DoRALinear(nn.Module):
    """DoRA linear: frozen ``weight`` (out, in) and ``bias`` (out,); trainable ``lora_A`` (r, in),
    ``lora_B`` (out, r) and ``magnitude`` (out,); ``scaling = alpha / r`` (``alpha / √r`` with
    ``use_rslora``). Initialised as PEFT does: A Kaiming-uniform (a = √5), B zero,
    magnitude the row norms of ``W0 + s·B·A``.

    ``norm_grad``: ``"detached"`` (PEFT's default) or ``"exact"`` (see ``dora_linear``).
    ``save_output``: see ``dora_linear``; set it False where the output is modified in place.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8.0, *, bias: bool = True,
                 dropout: float = 0.0, use_rslora: bool = False, norm_grad: str = "detached", device=None,
                 dtype=None, adapter_dtype=None, save_output: bool = True):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if norm_grad not in NORM_GRADS:
            raise ValueError(f"norm_grad must be one of {NORM_GRADS}, got {norm_grad!r}")
        factory = {"device": device, "dtype": dtype}
        adapter = {"device": device, "dtype": adapter_dtype or dtype}
        self.in_features, self.out_features, self.r, self.alpha = in_features, out_features, r, alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout_p = float(dropout)
        self.norm_grad = norm_grad
        if not isinstance(save_output, bool):
            raise ValueError(f"save_output must be a bool, got {save_output!r}")
        self.save_output = save_output
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **adapter))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **adapter))
        self.magnitude = nn.Parameter(torch.empty(out_features, **adapter))
        self.merged = False
        self._merged_norm = None
        self._norm_cache = None
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A Kaiming-uniform, B zero, magnitude = ‖W0 + s·B·A‖ (PEFT's init)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        # Rounded to the weight's dtype first, as PEFT's init does (see reference.DoRALinear).
        self.magnitude.copy_(self.weight_norm().to(self.weight.dtype).to(self.magnitude.dtype))
        self._norm_cache = None

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``‖W0 + s·B·A‖`` per output row (out,), fp32, by the norm kernel."""
        if self.merged:
            raise RuntimeError("weight_norm() of a merged layer: unmerge() first")
        return weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling)[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 8.0, *, dropout: float = 0.0,
                    use_rslora: bool = False, norm_grad: str = "detached", adapter_dtype=None) -> "DoRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are shared, not copied."""
        layer = cls(linear.in_features, linear.out_features, r, alpha, bias=linear.bias is not None,
                    dropout=dropout, use_rslora=use_rslora, norm_grad=norm_grad, device="meta",
                    dtype=linear.weight.dtype)
        layer.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        adapter = {"device": linear.weight.device, "dtype": adapter_dtype or linear.weight.dtype}
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, **adapter))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, **adapter))
        layer.magnitude = nn.Parameter(torch.empty(linear.out_features, **adapter))
        layer.reset_adapter()
        return layer

    # -- eval caching --------------------------------------------------------------------------
    def _norm_key(self):
        return tuple((t.data_ptr(), t._version) for t in (self.weight, self.lora_A, self.lora_B)) + (self.scaling,)

    def _cached_norm(self):
        """In eval mode, the norm of the current weights, computed once per weight version."""
        if self.training or self.norm_grad == "exact":
            return None
        if torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
            # Training in eval mode (e.g. to switch dropout off): optimizers may update the
            # weights without bumping their version counters (fused AdamW), so don't cache.
            return None
        key = self._norm_key()
        if self._norm_cache is None or self._norm_cache[0] != key:
            with torch.no_grad():
                self._norm_cache = (key, weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling)[0])
        return self._norm_cache[1]

    def train(self, mode: bool = True):
        self._norm_cache = None
        return super().train(mode)

    # -- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight``: ``W' = g ⊙ (W0 + s·B·A)`` row by row (fp32 math).
        ``unmerge`` restores W0 from the norm kept here, not one recomputed from W'."""
        if self.merged:
            return
        norm = weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling)[0]
        g = gate(self.magnitude, norm)
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        self.weight.data = (g[:, None] * (self.weight.float() + delta)).to(self.weight.dtype)
        self._merged_norm = norm
        self.merged = True
        self._norm_cache = None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: ``W0 = W' / g − s·B·A`` with the g used to merge."""
        if not self.merged:
            return
        norm = self._merged_norm
        g = gate(self.magnitude, norm)
        inv = recip(g, g != 0)
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        self.weight.data = (self.weight.float() * inv[:, None] - delta).to(self.weight.dtype)
        self._merged_norm = None
        self.merged = False
        self._norm_cache = None

    def forward(self, x: torch.Tensor, dropout_seed=None) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return dora_linear(x, self.weight, self.lora_A, self.lora_B, self.magnitude, self.scaling, self.bias,
                           dropout_p=self.dropout_p, training=self.training, norm_grad=self.norm_grad,
                           dropout_seed=dropout_seed, weight_norm=self._cached_norm(),
                           save_output=self.save_output)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={self.dropout_p}, bias={self.bias is not None}, "
                f"norm_grad={self.norm_grad!r}, merged={self.merged}")
