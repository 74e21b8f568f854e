"""build_model(spec): the ResNet of DESIGN.md, built on the CPU from an ArchSpec."""

from __future__ import annotations

import torch
from torch import nn

from models.spec import ArchSpec, BlockPlan, block_plan

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """conv -> BN -> act -> [Dropout2d] -> conv -> BN, plus the skip; then act."""

    def __init__(self, plan: BlockPlan, activation: str, dropout: float) -> None:
        super().__init__()
        act = _ACTIVATIONS[activation]
        self.body = nn.Sequential(
            *conv_bn(plan.in_channels, plan.out_channels, plan.kernel, plan.stride),
            act(),
            *([nn.Dropout2d(dropout)] if dropout > 0 else []),
            *conv_bn(plan.out_channels, plan.out_channels, plan.kernel),
        )
        self.skip = (
            nn.Sequential(
                *conv_bn(plan.in_channels, plan.out_channels, plan.skip_kernel, plan.stride)
            )
            if plan.has_skip_conv
            else nn.Identity()
        )
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    """Stem, BasicBlock stages, AvgPool2d(P, stride P), flatten, Linear."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stem = nn.Sequential(
            *conv_bn(spec.in_channels, spec.stem_channels, spec.stem_kernel),
            _ACTIVATIONS[spec.activation](),
        )
        self.blocks = nn.Sequential(
            *(BasicBlock(p, spec.activation, spec.dropout) for p in block_plan(spec))
        )
        self.pool = nn.AvgPool2d(spec.pool, stride=spec.pool)
        self.head = nn.Linear(spec.head_features, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.head(torch.flatten(x, 1))


def build_model(spec: ArchSpec) -> ResNet:
    """A freshly initialised model on the CPU; no I/O, no global state."""
    return ResNet(spec)
