"""Reference DoRA: the arithmetic of PEFT's ``DoraLinearLayer`` / ``DoraLinearVariant``.

Shapes (``nn.Linear`` convention): ``x (..., in)``, ``weight (out, in)``, ``bias (out,)``,
``lora_A (r, in)``, ``lora_B (out, r)``, ``magnitude (out,)``.

    V = W0 + s·B·A,  n = ‖V‖ row-wise (detached),  g = m / n
    y = x·W0ᵀ + bias + (g − 1) ⊙ (x̃·W0ᵀ) + g ⊙ s·(x̃·Aᵀ)·Bᵀ,  x̃ = dropout(x)

With no dropout (or in eval) PEFT reuses the base output for ``x̃·W0ᵀ`` (minus the bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dora_linear", "dora_weight_norm", "DoRALinear"]


def dora_weight_norm(weight, lora_A, lora_B, scaling, *, dtype=None):
    """Row norms ``‖W0 + s·B·A‖`` as PEFT computes them, in ``dtype`` (default: the weight's).

    PEFT forms ``B·A`` as ``lora_B(lora_A(eye)).T`` in the adapters' dtype, casts it and the
    weight to the compute dtype, and casts the norm back to that dtype.
    """
    dtype = weight.dtype if dtype is None else dtype
    eye = torch.eye(lora_A.shape[1], device=lora_A.device, dtype=lora_A.dtype)
    lora_weight = F.linear(F.linear(eye, lora_A), lora_B).T.to(dtype)
    w = weight.to(dtype) + scaling * lora_weight
    return torch.linalg.norm(w, dim=1).to(w.dtype)


def dora_linear(
    x,
    weight,
    lora_A,
    lora_B,
    magnitude,
    scaling,
    bias=None,
    *,
    dropout_p=0.0,
    training=True,
    dropout_mask=None,
    detach_norm=True,
):
    """DoRA linear exactly as PEFT computes it (one adapter).

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_A: (r, in); lora_B: (out, r);
    magnitude: (out,). Returns (..., out) in x's dtype.

    ``dropout_mask``: a boolean keep-mask of x's shape; when given (and ``dropout_p > 0`` in
    training) it replaces a fresh ``nn.Dropout`` draw: ``x̃ = x · mask / (1 − p)``.
    ``detach_norm=False`` lets the gradient flow through the norm (not PEFT's default).
    """
    result = F.linear(x, weight, bias)
    result_dtype = result.dtype
    # PEFT casts the input to the adapters' dtype before the LoRA/DoRA branch.
    x = x.to(lora_A.dtype)
    if training and dropout_p > 0:
        if dropout_mask is not None:
            x = x * (dropout_mask.to(x.dtype) * (1.0 / (1.0 - dropout_p)))
        else:
            x = F.dropout(x, p=dropout_p, training=True)
        base_result = None
    else:
        base_result = result

    eye = torch.eye(lora_A.shape[1], device=lora_A.device, dtype=lora_A.dtype)
    lora_weight = F.linear(F.linear(eye, lora_A), lora_B).T.to(x.dtype)
    w = weight.to(x.dtype)
    lw = lora_weight.detach() if detach_norm else lora_weight
    weight_norm = torch.linalg.norm(w + scaling * lw, dim=1).to(w.dtype)
    if detach_norm:
        weight_norm = weight_norm.detach()
    mag_norm_scale = (magnitude / weight_norm).view(1, -1)

    lora_result = F.linear(F.linear(x, lora_A), lora_B)
    if base_result is not None:
        if bias is not None:
            base_result = base_result - bias
    else:
        base_result = F.linear(x, w)
    result_dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling
    return (result + result_dora).to(result_dtype)


class DoRALinear(nn.Module):
    """A DoRA linear layer: frozen ``weight``/``bias``, trainable ``lora_A``, ``lora_B``, ``magnitude``.

    ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). Initialised as PEFT does:
    A Kaiming-uniform (a = √5), B zero, magnitude the row norms of ``W0 + s·B·A``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 8.0,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device=None,
        dtype=None,
        adapter_dtype=None,
    ):
        super().__init__()
        if r < 1:
            raise ValueError(f"r must be a positive integer, got {r}")
        factory = {"device": device, "dtype": dtype}
        adapter = {"device": device, "dtype": adapter_dtype or dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout_p = float(dropout)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **adapter))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **adapter))
        self.magnitude = nn.Parameter(torch.empty(out_features, **adapter))
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
        self.magnitude.copy_(self.weight_norm().to(self.magnitude.dtype))

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``‖W0 + s·B·A‖`` per output row as PEFT computes it at init: in the weight's dtype
        (PEFT creates the adapters in the base dtype and widens them only afterwards, so on a
        bf16/fp16 model with fp32 adapters the magnitude starts as the norm rounded to bf16/fp16)."""
        dt = self.weight.dtype
        lora_weight = (self.lora_B.float() @ self.lora_A.float()).to(dt)
        return torch.linalg.norm(self.weight + self.scaling * lora_weight, dim=1).to(dt)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 8.0, *, dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype=None) -> "DoRALinear":
        """Wrap an existing ``nn.Linear``: its weight and bias are shared, not copied."""
        layer = cls(linear.in_features, linear.out_features, r, alpha, bias=linear.bias is not None,
                    dropout=dropout, use_rslora=use_rslora, device="meta", dtype=linear.weight.dtype)
        layer.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        adapter = {"device": linear.weight.device, "dtype": adapter_dtype or linear.weight.dtype}
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, **adapter))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, **adapter))
        layer.magnitude = nn.Parameter(torch.empty(linear.out_features, **adapter))
        layer.reset_adapter()
        return layer

    def forward(self, x: torch.Tensor, dropout_mask=None) -> torch.Tensor:
        return dora_linear(x, self.weight, self.lora_A, self.lora_B, self.magnitude, self.scaling, self.bias,
                           dropout_p=self.dropout_p, training=self.training, dropout_mask=dropout_mask)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={self.dropout_p}, bias={self.bias is not None}")
