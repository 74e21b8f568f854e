"""Named classic configurations, enqueued by the search as warm starts.

All are the CIFAR-10 ResNet (3x32 input, 10 classes, 3x3 convs, 1x1 projection
skips) or reduced variants of it; `preset()` adapts one to another input.
Counts are pinned in tests/test_presets.py.
"""

from __future__ import annotations

from dataclasses import replace

from models.spec import ArchSpec, StageSpec, last_side


def _resnet(
    blocks: tuple[int, ...], widths: tuple[int, ...], stem: int | None = None, pool: int = 4
) -> ArchSpec:
    return ArchSpec(
        stages=tuple(StageSpec(b, w) for b, w in zip(blocks, widths, strict=True)),
        stem_channels=stem or widths[0],
        pool=pool,
    )


PRESETS: dict[str, ArchSpec] = {
    # ResNet-18 for CIFAR (kuangliu): 11.2M, over the classic 5M budget.
    "resnet18": _resnet((2, 2, 2, 2), (64, 128, 256, 512)),
    # DESIGN.md's example: fewer blocks in the late stages, 4,977,226 params.
    "resnet18-2111": _resnet((2, 1, 1, 1), (64, 128, 256, 512)),
    # ResNet-10: one block per stage.
    "resnet10": _resnet((1, 1, 1, 1), (64, 128, 256, 512)),
    # Narrower first width (32): the whole ResNet-18 at half width.
    "resnet18-w32": _resnet((2, 2, 2, 2), (32, 64, 128, 256)),
    # Three stages, the 512-wide stage dropped; pool over the 8x8 map.
    "resnet18-3stage": _resnet((2, 2, 2), (64, 128, 256), pool=8),
    # Three stages, a deeper middle.
    "resnet-3stage-2221": _resnet((2, 2, 2), (32, 64, 128), pool=8),
    # Small and fast: the sub-1M network for Fashion-MNIST and CPU demos.
    "resnet-tiny": _resnet((1, 1, 1), (32, 64, 128), pool=8),
}


def preset(
    name: str, in_channels: int = 3, input_size: int = 32, num_classes: int = 10
) -> ArchSpec:
    """A named preset for the given input; the pool shrinks if the map is smaller."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[name]
    side = last_side(input_size, len(base.stages))
    return replace(
        base,
        in_channels=in_channels,
        input_size=input_size,
        num_classes=num_classes,
        pool=min(base.pool, side),
    )
