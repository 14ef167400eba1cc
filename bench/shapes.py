"""The layer shapes the benchmark sweeps, and the default sweeps per device.

Shapes are the real projections (``in → out``) of the models people fine-tune with DoRA
(``bench.tables.MODELS``):

- Llama-3-8B: hidden 4096, intermediate 14336, 32 heads, 8 kv heads, head_dim 128
- Qwen2.5-7B: hidden 3584, intermediate 18944, 28 heads, 4 kv heads, head_dim 128
- a 70B-class up-projection (Llama-3-70B: 8192 → 28672)

Projections of one model with the same ``in → out`` are measured once under a joint name
(``llama3-8b.q/o``); ``--shapes`` takes a model name (all its projections), a projection
(``llama3-8b.q``, ``qwen2.5-7b.down``), a group (``gpu``, ``cpu``) or ``INxOUT`` (``4096x1024``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tables import CPU_QUICK_TOKENS, CPU_SHAPES, CPU_TOKENS, GPU_QUICK_TOKENS, MODELS, TOKENS, projections


@dataclass(frozen=True)
class Shape:
    name: str
    in_features: int
    out_features: int

    @property
    def label(self) -> str:
        dims = f"{self.in_features}→{self.out_features}"
        return dims if self.name == f"{self.in_features}x{self.out_features}" else f"{self.name} {dims}"


def model_shapes(model: str) -> list[Shape]:
    """The distinct ``in → out`` of a model's projections, projections of one shape merged."""
    return [Shape(f"{model}.{projs}", i, o) for projs, i, o in projections(model)]


GROUPS = {
    "gpu": [s for m in MODELS for s in model_shapes(m)],
    "gpu-quick": [s for s in model_shapes("llama3-8b") if s.name.split(".")[1] in ("q/o", "gate/up", "down")],
    "cpu": [Shape(n, i, o) for n, (i, o) in CPU_SHAPES.items()],
    "cpu-quick": [Shape("cpu.up", *CPU_SHAPES["cpu.up"])],
}


def parse_shapes(spec: str) -> list[Shape]:
    """Comma-separated names (see the module docstring) → a list of distinct shapes, in order."""
    out: list[Shape] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in GROUPS:
            new = GROUPS[item]
        elif item in MODELS:
            new = model_shapes(item)
        elif item in CPU_SHAPES:
            new = [Shape(item, *CPU_SHAPES[item])]
        elif "." in item and item.rsplit(".", 1)[0] in MODELS:
            model, proj = item.rsplit(".", 1)
            if proj not in MODELS[model]:
                raise ValueError(f"unknown projection {proj!r} of {model}: one of {', '.join(MODELS[model])}")
            new = [Shape(item, *MODELS[model][proj])]
        elif "x" in item:
            try:
                i, o = (int(v) for v in item.lower().split("x"))
            except ValueError:
                raise ValueError(f"bad shape {item!r}: expected INxOUT such as 4096x1024") from None
            new = [Shape(f"{i}x{o}", i, o)]
        else:
            known = sorted(GROUPS) + sorted(MODELS) + sorted(CPU_SHAPES)
            raise ValueError(f"unknown shape {item!r}: one of {', '.join(known)}, MODEL.PROJ or INxOUT")
        for s in new:
            if all((s.in_features, s.out_features) != (t.in_features, t.out_features) for t in out):
                out.append(s)
    return out


@dataclass
class Defaults:
    shapes: str
    tokens: tuple
    ranks: tuple
    dtypes: tuple
    model_preset: str


def defaults(device: str, quick: bool) -> Defaults:
    """The sweep a run makes when no option overrides it (see bench/README.md)."""
    if device == "cuda":
        if quick:
            return Defaults("gpu-quick", GPU_QUICK_TOKENS, (16,), ("bf16",), "mini")
        return Defaults("gpu", TOKENS, (16,), ("bf16",), "small")
    if quick:
        return Defaults("cpu-quick", CPU_QUICK_TOKENS, (16,), ("fp32",), "tiny")
    return Defaults("cpu", CPU_TOKENS, (16,), ("fp32",), "tiny")
