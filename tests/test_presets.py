"""Every classic configuration, its exact size pinned."""

from __future__ import annotations

import pytest
import torch

from models import build_model, count_params
from models.presets import PRESETS, preset

PINNED = {
    "resnet18": 11_173_962,
    "resnet18-2111": 4_977_226,
    "resnet10": 4_903_242,
    "resnet18-w32": 2_797_610,
    "resnet18-3stage": 2_777_674,
    "resnet-3stage-2221": 696_618,
    "resnet-tiny": 308_650,
}


def test_every_preset_is_pinned() -> None:
    assert set(PRESETS) == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_preset_counts(name: str) -> None:
    spec = PRESETS[name]
    assert count_params(spec) == PINNED[name]
    with torch.device("meta"):
        assert sum(p.numel() for p in build_model(spec).parameters()) == PINNED[name]


def test_preset_adapts_to_fashion_mnist() -> None:
    spec = preset("resnet18-2111", in_channels=1, input_size=28)
    assert spec.feature_sizes == (28, 14, 7, 4)
    assert spec.pool == 4
    tiny = preset("resnet-tiny", in_channels=1, input_size=28)
    assert tiny.pool == 7  # the 8px pool of the 32px preset shrinks to the 7px map
    assert count_params(tiny) == 308_074


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="resnet18-2111"):
        preset("resnet99")
