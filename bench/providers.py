"""The implementations compared, each built as an ``nn.Module`` over the same tensors.

=============  ===============================================================================
provider       what runs
=============  ===============================================================================
fused          ``dora_kernels.DoRALinear`` (the fused op; eval caches the weight norm)
fused_peft     PEFT's ``lora.Linear`` (DoRA) after ``dora_kernels.fuse`` — what users run
reference      ``reference.DoRALinear``: PEFT's arithmetic in eager PyTorch
compiled       ``torch.compile(reference.DoRALinear)`` (default options, automatic dynamic
               shapes after the first recompile)
peft_dora      PEFT ``lora.Linear`` from ``get_peft_model`` on a one-Linear module, use_dora=True
peft_lora      the same with use_dora=False (same r)
linear         a frozen ``nn.Linear``: forward and input gradient only — the floor
peft_qdora     PEFT's DoRA layer over a bitsandbytes ``Linear4bit`` (nf4, double quantisation,
               blocksize 64): ``lora.bnb.Linear4bit``, what PEFT runs today
fused_qdora    the same after ``dora_kernels.fuse`` (``dora_kernels.quant.dora_linear``)
peft_qlora     PEFT's LoRA over the same ``Linear4bit`` (QLoRA)
qlora_floor    the frozen ``Linear4bit``: forward and input gradient — the QDoRA floor
=============  ===============================================================================

Every provider shares the frozen weight (no bias, as in Llama's projections); the adapters
(A, B ≠ 0, m) are copied in, in the adapter dtype (fp32 by default: PEFT's default for a
bf16/fp16 model, ``autocast_adapter_dtype=True``). Dropout is 0 (the targets are stated there).
The dry-run trace (``bench.trace``) builds the same modules on meta tensors, where a bias and
dropout may be asked for (``make_tensors(..., bias=True, dropout=p)``).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass

import torch
from torch import nn

from .tables import PROVIDERS, QDORA_FORMAT, dtype_of, short_dtype  # noqa: F401  (re-exported: P.dtype_of, …)


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


@dataclass
class Tensors:
    """The shared inputs of one case: W (out, in), A (r, in), B (out, r), m (out,), x (N, in), G (N, out);
    the frozen bias (out,) or None and the adapters' dropout probability."""

    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor
    x: torch.Tensor
    grad: torch.Tensor
    scaling: float
    r: int
    alpha: float
    bias: torch.Tensor | None = None
    dropout: float = 0.0


def make_tensors(tokens, in_features, out_features, r, dtype, adapter_dtype, device, seed=0, *, bias=False,
                 dropout=0.0) -> Tensors:
    # meta tensors (the dry-run trace) have no values and no generator
    gen = None if torch.device(device).type == "meta" else torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale, dt):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dt)

    alpha = 2.0 * r
    scaling = alpha / r
    weight = rand(out_features, in_features, scale=in_features ** -0.5, dt=dtype)
    lora_A = rand(r, in_features, scale=in_features ** -0.5, dt=adapter_dtype)
    lora_B = rand(out_features, r, scale=0.01, dt=adapter_dtype)
    with torch.no_grad():
        v = weight.float() + scaling * (lora_B.float() @ lora_A.float())
        magnitude = torch.linalg.vector_norm(v, dim=1).to(adapter_dtype)
    x = rand(tokens, in_features, scale=1.0, dt=dtype).requires_grad_(True)
    grad = rand(tokens, out_features, scale=1.0, dt=dtype)
    b = rand(out_features, scale=in_features ** -0.5, dt=dtype) if bias else None
    return Tensors(weight, lora_A, lora_B, magnitude, x, grad, scaling, r, alpha, b, float(dropout))


def _frozen(t):
    return nn.Parameter(t, requires_grad=False)


def _trainable(t):
    return nn.Parameter(t.detach().clone(), requires_grad=True)


def _dora_module(cls, t: Tensors) -> nn.Module:
    """A ``DoRALinear`` of either package, built on meta (no init) and given the shared tensors."""
    out_f, in_f = t.weight.shape
    layer = cls(in_f, out_f, t.r, t.alpha, bias=t.bias is not None, dropout=t.dropout, device="meta",
                dtype=t.weight.dtype, adapter_dtype=t.lora_A.dtype)
    layer.weight = _frozen(t.weight)
    if t.bias is not None:
        layer.bias = _frozen(t.bias)
    layer.lora_A = _trainable(t.lora_A)
    layer.lora_B = _trainable(t.lora_B)
    layer.magnitude = _trainable(t.magnitude)
    return layer


def _require(module: str, why: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Unavailable(f"{why}: {e}") from None


def _fused(t: Tensors) -> nn.Module:
    dk = _require("dora_kernels", "dora_kernels does not import")
    return _dora_module(dk.DoRALinear, t)


def _reference(t: Tensors) -> nn.Module:
    ref = _require("reference", "reference does not import")
    return _dora_module(ref.DoRALinear, t)


_COMPILE_CONFIGURED = False


def _compiled(t: Tensors) -> nn.Module:
    global _COMPILE_CONFIGURED
    if not _COMPILE_CONFIGURED:
        from torch import _dynamo

        # A sweep meets many shapes: without room for the recompiles, dynamo would silently
        # fall back to eager and "compiled" would time the reference.
        cfg = _dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
        _COMPILE_CONFIGURED = True
    return torch.compile(_reference(t))


class _One(nn.Module):
    """The module PEFT wraps: one ``proj`` Linear."""

    def __init__(self, weight, bias=None):
        super().__init__()
        out_f, in_f = weight.shape
        self.proj = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
        self.proj.weight = _frozen(weight)
        if bias is not None:
            self.proj.bias = _frozen(bias)

    def forward(self, x):
        return self.proj(x)


def _peft(t: Tensors, *, dora: bool, base: nn.Module | None = None) -> nn.Module:
    """PEFT's LoRA / DoRA layer over ``base`` (default: a plain ``nn.Linear`` of ``t``), adapters
    ``t``'s (in their dtype)."""
    peft = _require("peft", "peft is not installed")
    cfg = peft.LoraConfig(r=t.r, lora_alpha=t.alpha, lora_dropout=t.dropout, target_modules=["proj"],
                          use_dora=dora)
    # autocast_adapter_dtype=True (PEFT's default) keeps bf16/fp16 models' adapters in fp32.
    same = t.lora_A.dtype == t.weight.dtype
    if base is None:
        base, where = _One(t.weight, t.bias), contextlib.nullcontext()
    else:
        # On meta, PEFT's DoRA set-up deep-copies a Linear4bit, and a Params4bit copy starts from an
        # empty tensor of the default device: make that meta too
        where = torch.device("meta") if t.weight.is_meta else contextlib.nullcontext()
    with where:
        model = peft.get_peft_model(base, cfg, autocast_adapter_dtype=not same)
    layer = model.base_model.model.proj
    for p in layer.parameters():
        if p.requires_grad and p.dtype != t.lora_A.dtype:
            p.data = p.data.to(t.lora_A.dtype)  # 16-bit adapters on an fp32 model (autocast made them fp32)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t.lora_A)
        layer.lora_B["default"].weight.copy_(t.lora_B)
        if dora:
            layer.lora_magnitude_vector["default"].weight.copy_(t.magnitude)
    return layer


def _fused_peft(t: Tensors, layer: nn.Module | None = None) -> nn.Module:
    """``layer`` (default: PEFT's DoRA layer of ``t``) after ``dora_kernels.fuse``."""
    dk = _require("dora_kernels", "dora_kernels does not import")
    layer = _peft(t, dora=True) if layer is None else layer
    dk.fuse(layer)
    if not dk.fused_layers(layer):
        raise Unavailable(f"dora_kernels.fuse left the PEFT layer ({type(layer).__name__}) unfused")
    return layer


class _DVoRA(nn.Module):
    """One DVoRA layer on the fused op (``dora_kernels.dvora_linear``): frozen W0, A = ``t.lora_A``
    (the shared projection's slice), B (out, r); trainable λ_d (r,), λ_b (out,), m (out,)."""

    def __init__(self, t: Tensors):
        super().__init__()
        self.weight = _frozen(t.weight)
        self.bias = None if t.bias is None else _frozen(t.bias)
        self.register_buffer("vera_A", t.lora_A.detach())
        self.register_buffer("vera_B", t.lora_B.detach())
        self.lambda_d = _trainable(torch.full((t.r,), 0.1, dtype=t.lora_A.dtype, device=t.lora_A.device))
        self.lambda_b = _trainable(torch.ones(t.weight.shape[0], dtype=t.lora_A.dtype, device=t.lora_A.device))
        self.magnitude = _trainable(t.magnitude)
        self.dropout = t.dropout
        self.dk = _require("dora_kernels", "dora_kernels does not import")

    def forward(self, x):
        return self.dk.dvora_linear(x, self.weight, self.vera_A, self.vera_B, self.lambda_d, self.lambda_b,
                                    self.magnitude, self.bias, dropout_p=self.dropout, training=self.training)


def _peft_vera(t: Tensors) -> nn.Module:
    peft = _require("peft", "peft is not installed")
    cfg = peft.VeraConfig(r=t.r, target_modules=["proj"], vera_dropout=t.dropout)
    same = t.lora_A.dtype == t.weight.dtype
    model = peft.get_peft_model(_One(t.weight, t.bias), cfg, autocast_adapter_dtype=not same)
    return model.base_model.model.proj


def _linear(t: Tensors) -> nn.Module:
    out_f, in_f = t.weight.shape
    layer = nn.Linear(in_f, out_f, bias=t.bias is not None, device="meta", dtype=t.weight.dtype)
    layer.weight = _frozen(t.weight)
    if t.bias is not None:
        layer.bias = _frozen(t.bias)
    return layer


def _linear4bit(t: Tensors) -> nn.Module:
    """A frozen bitsandbytes ``Linear4bit`` holding ``t.weight`` quantised (``tables.QDORA_FORMAT``),
    compute dtype ``t.weight``'s, on ``t.weight``'s device. bitsandbytes' own ``quantize_4bit``
    packs it; on the meta device (the dry-run trace) that runs its fake kernels, so the packed
    codes, the uint8 absmax and the nested state have their real shapes and no values."""
    bnb = _require("bitsandbytes", "bitsandbytes is not installed")
    fmt = QDORA_FORMAT
    out_f, in_f = t.weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=t.bias is not None, compute_dtype=t.weight.dtype,
                              compress_statistics=fmt["compress_statistics"], quant_type=fmt["quant_type"],
                              quant_storage=fmt["quant_storage"], device="meta")
    qmaps = getattr(bnb.functional, "name2qmap", None)
    if t.weight.is_meta and isinstance(qmaps, dict) and "dynamic" not in qmaps:
        # bitsandbytes caches the nested absmax's table on the device it first quantises on and
        # copies it from there later: a meta one would break every later quantisation
        qmaps["dynamic"] = bnb.functional.create_dynamic_map()
    data, state = bnb.functional.quantize_4bit(t.weight.detach().contiguous(), blocksize=fmt["blocksize"],
                                               compress_statistics=fmt["compress_statistics"],
                                               quant_type=fmt["quant_type"], quant_storage=fmt["quant_storage"])
    layer.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=fmt["blocksize"],
                                     compress_statistics=fmt["compress_statistics"], quant_type=fmt["quant_type"],
                                     quant_storage=fmt["quant_storage"], module=layer, bnb_quantized=True)
    layer.quant_state = state
    if t.bias is not None:
        layer.bias = _frozen(t.bias)
    # bitsandbytes' CPU eval path rewrites the weight into an AVX-512 layout that PEFT's QDoRA then
    # misreads (DORA_SPEC.md): keep one layout on a CPU
    layer.support_avx512bf16_for_cpu = False
    return layer


class _OneQuant(nn.Module):
    """The module PEFT wraps: one ``proj`` ``Linear4bit``, flagged as transformers flags a model loaded
    in 4 bits, so PEFT builds its ``lora.bnb.Linear4bit`` (what a QLoRA/QDoRA user gets)."""

    is_loaded_in_4bit = True

    def __init__(self, t: Tensors):
        super().__init__()
        self.proj = _linear4bit(t)

    def forward(self, x):
        return self.proj(x)


def _peft_quant(t: Tensors, *, dora: bool) -> nn.Module:
    """PEFT's LoRA / DoRA layer over ``_linear4bit(t)``, adapters ``t``'s (in their dtype)."""
    return _peft(t, dora=dora, base=_OneQuant(t))


def _fused_qdora(t: Tensors) -> nn.Module:
    return _fused_peft(t, _peft_quant(t, dora=True))


_BUILDERS = {
    "fused": _fused,
    "fused_peft": _fused_peft,
    "reference": _reference,
    "compiled": _compiled,
    "peft_dora": lambda t: _peft(t, dora=True),
    "peft_lora": lambda t: _peft(t, dora=False),
    "linear": _linear,
    "fused_dvora": _DVoRA,
    "peft_vera": _peft_vera,
    "peft_qdora": lambda t: _peft_quant(t, dora=True),
    "fused_qdora": _fused_qdora,
    "peft_qlora": lambda t: _peft_quant(t, dora=False),
    "qlora_floor": _linear4bit,
}


# ---------------------------------------------------------------------------------------------
# layers other than Linear (``bench.tables.KIND_SHAPES``): a PEFT Conv2d or Embedding DoRA layer
# after ``dora_kernels.fuse`` (``fused``), unfused (``peft_dora``), PEFT's LoRA (``peft_lora``)
# and the frozen base layer (``base``, the floor)

@dataclass
class KindTensors:
    """One case of a conv / embedding layer: the frozen weight (conv (out, in, k, k) with its
    bias; embedding (vocab, dim)), the input (conv (batch, in, H, W) requiring grad; embedding
    (batch, seq) int64 ids) and the upstream gradient in the output's shape. ``tokens``: output
    positions (batch·H·W) or ids; ``in_features``/``out_features``: in/out channels, vocab/dim."""

    kind: str
    name: str
    sizes: dict
    weight: torch.Tensor
    bias: torch.Tensor | None
    x: torch.Tensor
    grad: torch.Tensor
    r: int
    alpha: float
    adapter_dtype: torch.dtype
    tokens: int
    in_features: int
    out_features: int


def make_kind_tensors(kind, name, sizes, r, dtype, adapter_dtype, device, seed=0) -> KindTensors:
    meta = torch.device(device).type == "meta"
    gen = None if meta else torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    if kind == "conv":
        c_in, c_out, k, n = sizes["in_ch"], sizes["out_ch"], sizes["kernel"], sizes["batch"]
        hw = sizes["size"]
        fan = c_in * k * k
        weight, bias = rand(c_out, c_in, k, k, scale=fan ** -0.5), rand(c_out, scale=fan ** -0.5)
        out_hw = hw + 2 * sizes["padding"] - k + 1
        x = rand(n, c_in, hw, hw, scale=1.0).requires_grad_(True)
        grad = rand(n, c_out, out_hw, out_hw, scale=1.0)
        return KindTensors(kind, name, dict(sizes), weight, bias, x, grad, r, 2.0 * r, adapter_dtype,
                           n * out_hw * out_hw, c_in, c_out)
    if kind == "embedding":
        vocab, dim, n, seq = sizes["vocab"], sizes["dim"], sizes["batch"], sizes["seq"]
        weight = rand(vocab, dim, scale=1.0)
        if meta:
            x = torch.zeros(n, seq, dtype=torch.long, device=device)
        else:
            x = torch.randint(0, vocab, (n, seq), generator=gen, device=device)
        grad = rand(n, seq, dim, scale=1.0)
        return KindTensors(kind, name, dict(sizes), weight, None, x, grad, r, 2.0 * r, adapter_dtype, n * seq,
                           vocab, dim)
    raise ValueError(f"unknown layer kind {kind!r}: conv or embedding")


def _base_layer(t: KindTensors) -> nn.Module:
    """The frozen nn.Conv2d / nn.Embedding over ``t.weight`` (built on meta, no init)."""
    if t.kind == "conv":
        s = t.sizes
        layer = nn.Conv2d(s["in_ch"], s["out_ch"], s["kernel"], padding=s["padding"], bias=t.bias is not None,
                          device="meta", dtype=t.weight.dtype)
        if t.bias is not None:
            layer.bias = _frozen(t.bias)
    else:
        layer = nn.Embedding(*t.weight.shape, device="meta", dtype=t.weight.dtype)
    layer.weight = _frozen(t.weight)
    return layer


class _OneKind(nn.Module):
    """The module PEFT wraps: one ``proj`` Conv2d or Embedding."""

    def __init__(self, t: KindTensors):
        super().__init__()
        self.proj = _base_layer(t)

    def forward(self, x):
        return self.proj(x)


def _peft_kind(t: KindTensors, *, dora: bool) -> nn.Module:
    """PEFT's Conv2d / Embedding LoRA layer (``use_dora``), adapters randomly initialised
    (``init_lora_weights=False``: B ≠ 0) in ``t.adapter_dtype``; on meta tensors no values are made."""
    peft = _require("peft", "peft is not installed")
    cfg = peft.LoraConfig(r=t.r, lora_alpha=t.alpha, lora_dropout=0.0, target_modules=["proj"], use_dora=dora,
                          init_lora_weights=False)
    same = t.adapter_dtype == t.weight.dtype
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same adapters for every provider of a case on the CPU
    try:
        model = peft.get_peft_model(_OneKind(t), cfg, autocast_adapter_dtype=not same)
    finally:
        torch.random.set_rng_state(gen_state)
    layer = model.base_model.model.proj
    for p in layer.parameters():
        if p.requires_grad and p.dtype != t.adapter_dtype:
            p.data = p.data.to(t.adapter_dtype)
    return layer


def _fused_kind(t: KindTensors) -> nn.Module:
    dk = _require("dora_kernels", "dora_kernels does not import")
    layer = _peft_kind(t, dora=True)
    dk.fuse(layer)
    if not dk.fused_layers(layer):
        raise Unavailable("dora_kernels.fuse left the PEFT layer unfused")
    return layer


_KIND_BUILDERS = {
    "fused": _fused_kind,
    "peft_dora": lambda t: _peft_kind(t, dora=True),
    "peft_lora": lambda t: _peft_kind(t, dora=False),
    "base": _base_layer,
}


def build_kind(provider: str, t: KindTensors) -> nn.Module:
    """``provider``'s conv / embedding module over ``t`` (``bench.tables.KIND_PROVIDERS``)."""
    return _KIND_BUILDERS[provider](t)


def build(provider: str, t: Tensors) -> nn.Module:
    """The provider's module over ``t``'s tensors; raises ``Unavailable`` if it cannot run here."""
    return _BUILDERS[provider](t)


def trainable(module: nn.Module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def check_installed(provider: str) -> str | None:
    """Why ``provider`` cannot run in this environment (a missing package), or None."""
    needs = {"fused": ["dora_kernels"], "fused_peft": ["dora_kernels", "peft"], "reference": ["reference"],
             "compiled": ["reference"], "peft_dora": ["peft"], "peft_lora": ["peft"], "linear": [],
             "fused_dvora": ["dora_kernels"], "peft_vera": ["peft"], "peft_qdora": ["bitsandbytes", "peft"],
             "fused_qdora": ["dora_kernels", "bitsandbytes", "peft"], "peft_qlora": ["bitsandbytes", "peft"],
             "qlora_floor": ["bitsandbytes"]}[provider]
    for mod in needs:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            missing = isinstance(e, ModuleNotFoundError) and e.name == mod
            return f"{mod} is not installed" if missing else f"{mod} does not import ({type(e).__name__}: {e})"
    return None


def fused_path(device: str) -> str:
    """Which body of the fused op runs: ``triton`` (GPU), ``triton-interpreter`` (CPU with
    TRITON_INTERPRET=1 set before import; timings meaningless) or ``torch`` (CPU)."""
    if device == "cuda":
        return "triton"
    try:
        launch = importlib.import_module("dora_kernels.runtime")
    except ImportError:
        return "unknown"
    return "triton-interpreter" if getattr(launch, "INTERPRET", False) else "torch"
