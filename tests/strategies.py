"""Hypothesis strategies for valid architectures."""

from __future__ import annotations

from hypothesis import strategies as st

from models.spec import ArchSpec, StageSpec, downsample


@st.composite
def arch_specs(draw, max_blocks: int = 6, max_width: int = 512) -> ArchSpec:
    size = draw(st.integers(8, 64))
    sides = [size]
    while len(sides) < 5 and sides[-1] >= 2:
        sides.append(downsample(sides[-1]))
    n = draw(st.integers(1, len(sides)))
    stages = tuple(
        StageSpec(
            blocks=draw(st.integers(1, max_blocks)),
            channels=draw(st.integers(8, max_width)),
            kernel=draw(st.sampled_from([1, 3, 5, 7])),
            skip_kernel=draw(st.sampled_from([1, 3])),
        )
        for _ in range(n)
    )
    return ArchSpec(
        stages=stages,
        stem_channels=draw(st.integers(8, max_width)),
        stem_kernel=draw(st.sampled_from([1, 3, 5, 7])),
        in_channels=draw(st.sampled_from([1, 3])),
        input_size=size,
        num_classes=draw(st.integers(2, 100)),
        pool=draw(st.integers(1, sides[n - 1])),
        activation=draw(st.sampled_from(["relu", "gelu", "silu"])),
        dropout=draw(st.sampled_from([0.0, 0.1, 0.25])),
    )
