"""The architecture: one frozen dataclass that builds, counts, stores and exports.

`ArchSpec` is the single source of truth for a network of the ResNet family
described in DESIGN.md. The builder (resnet.py) and the counters
(complexity.py) both walk `block_plan(spec)`, so they cannot disagree about
strides, widths or feature-map sizes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

FORMAT = "resnet-arch/1"
ACTIVATIONS = ("relu", "gelu", "silu")
MAX_STAGES = 5


def _int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _odd(value: Any, name: str) -> int:
    _int(value, name)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd (1, 3, 5, 7, ...), got {value}")
    return value


def downsample(side: int) -> int:
    """Side of a map after a stride-2 conv with an odd kernel and padding k//2."""
    return (side - 1) // 2 + 1


def last_side(size: int, stages: int) -> int:
    """Side of the last stage's map: every stage after the first downsamples."""
    for _ in range(stages - 1):
        size = downsample(size)
    return size


def max_stages(size: int) -> int:
    """As many stages as the input allows: each downsample needs a map of 2px or more."""
    n = 1
    while n < MAX_STAGES and last_side(size, n) >= 2:
        n += 1
    return n


@dataclass(frozen=True)
class StageSpec:
    """`blocks` BasicBlocks of width `channels`; `kernel` is F_i, `skip_kernel` K_i."""

    blocks: int
    channels: int
    kernel: int = 3
    skip_kernel: int = 1

    def validate(self, where: str) -> None:
        _int(self.blocks, f"{where}.blocks")
        _int(self.channels, f"{where}.channels")
        _odd(self.kernel, f"{where}.kernel")
        _odd(self.skip_kernel, f"{where}.skip_kernel")


class BlockPlan(NamedTuple):
    """One BasicBlock as both the builder and the counters see it."""

    stage: int
    in_channels: int
    out_channels: int
    stride: int
    kernel: int
    skip_kernel: int
    in_size: int
    out_size: int

    @property
    def has_skip_conv(self) -> bool:
        return self.stride != 1 or self.in_channels != self.out_channels


class StagePlan(NamedTuple):
    """A stage: its first block (which may stride and project), then `repeats`
    copies of `rest`, which keeps the shape."""

    first: BlockPlan
    rest: BlockPlan
    repeats: int

    def blocks(self) -> list[BlockPlan]:
        return [self.first] + [self.rest] * self.repeats


@dataclass(frozen=True)
class ArchSpec:
    """A ResNet: stem, stages of BasicBlocks, average pool, linear head."""

    stages: tuple[StageSpec, ...]
    stem_channels: int = 64
    stem_kernel: int = 3
    in_channels: int = 3
    input_size: int = 32
    num_classes: int = 10
    pool: int = 4
    activation: str = "relu"
    dropout: float = 0.0
    _sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _plan: tuple[StagePlan, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        self._validate()

    def _validate(self) -> None:
        # Explicit raises, not asserts: `python -O` must keep every check.
        _int(self.in_channels, "input.channels")
        _int(self.input_size, "input.size")
        _int(self.num_classes, "num_classes", minimum=2)
        _int(self.stem_channels, "stem.channels")
        _odd(self.stem_kernel, "stem.kernel")
        if not 1 <= len(self.stages) <= MAX_STAGES:
            raise ValueError(f"stages must hold 1 to {MAX_STAGES} stages, got {len(self.stages)}")
        limit, sizes, side = max_stages(self.input_size), [], self.input_size
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, StageSpec):
                raise ValueError(f"stages[{i}] must be a StageSpec, got {type(stage).__name__}")
            stage.validate(f"stages[{i}]")
            if i >= limit:
                raise ValueError(
                    f"stages[{i}]: the {self.input_size}px input is already 1px wide "
                    f"here, so it allows at most {i} stages"
                )
            side = downsample(side) if i > 0 else side
            sizes.append(side)
        object.__setattr__(self, "_sizes", tuple(sizes))
        object.__setattr__(self, "_plan", _make_plan(self))
        _int(self.pool, "pool")
        if self.pool > side:
            raise ValueError(
                f"pool must not exceed the last feature map ({side}px), got {self.pool}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not math.isfinite(self.dropout)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    @property
    def feature_sizes(self) -> tuple[int, ...]:
        """Side of each stage's output map."""
        return self._sizes

    @property
    def head_features(self) -> int:
        side = self._sizes[-1] // self.pool
        return self.stages[-1].channels * side * side

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "input": {"channels": self.in_channels, "size": self.input_size},
            "num_classes": self.num_classes,
            "stem": {"channels": self.stem_channels, "kernel": self.stem_kernel},
            "stages": [
                {
                    "blocks": s.blocks,
                    "channels": s.channels,
                    "kernel": s.kernel,
                    "skip_kernel": s.skip_kernel,
                }
                for s in self.stages
            ],
            "pool": self.pool,
            "activation": self.activation,
            "dropout": self.dropout,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> ArchSpec:
        """Parse the DESIGN.md format; any unknown or missing field is a ValueError."""
        if not isinstance(data, dict):
            raise ValueError("architecture must be a JSON object")
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {fmt!r}")
        known = {
            "format",
            "input",
            "num_classes",
            "stem",
            "stages",
            "pool",
            "activation",
            "dropout",
        }
        _no_extra(data, known, "architecture")
        inp = _member(data, "input", dict)
        stem = _member(data, "stem", dict)
        _no_extra(inp, {"channels", "size"}, "input")
        _no_extra(stem, {"channels", "kernel"}, "stem")
        stages = []
        for i, s in enumerate(_member(data, "stages", list)):
            if not isinstance(s, dict):
                raise ValueError(f"stages[{i}] must be an object")
            _no_extra(s, {"blocks", "channels", "kernel", "skip_kernel"}, f"stages[{i}]")
            stages.append(
                StageSpec(
                    blocks=_member(s, "blocks", None, f"stages[{i}]"),
                    channels=_member(s, "channels", None, f"stages[{i}]"),
                    kernel=s.get("kernel", 3),
                    skip_kernel=s.get("skip_kernel", 1),
                )
            )
        return cls(
            stages=tuple(stages),
            stem_channels=_member(stem, "channels", None, "stem"),
            stem_kernel=stem.get("kernel", 3),
            in_channels=_member(inp, "channels", None, "input"),
            input_size=_member(inp, "size", None, "input"),
            num_classes=_member(data, "num_classes", None),
            pool=_member(data, "pool", None),
            activation=data.get("activation", "relu"),
            dropout=data.get("dropout", 0.0),
        )

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        return cls.from_dict(json.loads(text))


def _member(data: dict, key: str, kind: type | None, where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if key not in data:
        raise ValueError(f"{name} is missing")
    value = data[key]
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {'object' if kind is dict else 'array'}")
    return value


def _no_extra(data: dict, known: set[str], where: str) -> None:
    extra = sorted(set(data) - known)
    if extra:
        raise ValueError(f"{where} has unknown field(s): {', '.join(extra)}")


def _make_plan(spec: ArchSpec) -> tuple[StagePlan, ...]:
    """Every stage after the first opens with a stride-2 block; the rest keep the shape."""
    plan, cin, side = [], spec.stem_channels, spec.input_size
    for i, (stage, out) in enumerate(zip(spec.stages, spec.feature_sizes, strict=True)):
        c, k, sk = stage.channels, stage.kernel, stage.skip_kernel
        first = BlockPlan(i, cin, c, 2 if i else 1, k, sk, side, out)
        plan.append(StagePlan(first, BlockPlan(i, c, c, 1, k, sk, out, out), stage.blocks - 1))
        cin, side = c, out
    return tuple(plan)


def stage_plan(spec: ArchSpec) -> tuple[StagePlan, ...]:
    """The one plan shared by builder and counters, made once when the spec is
    validated (the spec is frozen, so it cannot go stale)."""
    return spec._plan


def block_plan(spec: ArchSpec) -> list[BlockPlan]:
    """Every BasicBlock in order, as the builder makes them."""
    return [b for stage in stage_plan(spec) for b in stage.blocks()]
