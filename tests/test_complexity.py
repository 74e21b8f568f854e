"""The closed-form counters against the model the builder really makes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from models import ArchSpec, build_model, count_macs, count_params, load_arch
from models.complexity import count_bytes
from models.presets import PRESETS

from conftest import examples
from strategies import arch_specs


def hooked_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Conv and linear multiply-accumulates per image, read off forward hooks."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        per_out = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        total += out[0].numel() * per_out

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    handles = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return total, out


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("n", examples(300))
def test_counts_equal_the_built_model(n: int) -> None:
    @settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(arch_specs())
    def check(spec: ArchSpec) -> None:
        # Meta tensors have exact shapes and numel but no storage, so the widest
        # 5-stage, 6-block draws cost no memory and no initialisation time.
        with torch.device("meta"):
            model = build_model(spec).eval()
            x = torch.empty(2, spec.in_channels, spec.input_size, spec.input_size)
        assert count_params(spec) == numel(model)
        macs, out = hooked_macs(model, x)
        assert count_macs(spec) == macs
        assert out.shape == (2, spec.num_classes)

    check()


@pytest.mark.parametrize("n", examples(40))
def test_real_cpu_forward(n: int) -> None:
    @settings(max_examples=n, deadline=None)
    @given(arch_specs(max_blocks=2, max_width=48))
    def check(spec: ArchSpec) -> None:
        model = build_model(spec).eval()
        assert count_params(spec) == numel(model)
        x = torch.rand(3, spec.in_channels, spec.input_size, spec.input_size)
        macs, out = hooked_macs(model, x)
        assert count_macs(spec) == macs
        assert out.shape == (3, spec.num_classes)
        assert torch.isfinite(out).all()

    check()


def test_design_example(examples_dir) -> None:
    spec = load_arch(examples_dir / "resnet18-2111.json")
    assert spec == PRESETS["resnet18-2111"]
    assert count_params(spec) == 4_977_226 == numel(build_model(spec))


def test_builder_is_cpu_and_in_train_mode() -> None:
    model = build_model(PRESETS["resnet-tiny"])
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.training


def payload(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("n", examples(200))
def test_bytes_equal_the_state_dict_payload(n: int) -> None:
    @settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(arch_specs())
    def check(spec: ArchSpec) -> None:
        with torch.device("meta"):
            model = build_model(spec)
        assert count_bytes(spec, "fp32") == payload(model)
        assert count_bytes(spec, "fp16") == payload(model.half())
        assert count_bytes(spec, "bf16") == payload(model.bfloat16())
        int8 = sum(
            t.numel() if t.is_floating_point() else 8 * t.numel()
            for t in model.state_dict().values()
        )
        assert count_bytes(spec, "int8") == int8

    check()


def test_bytes_match_a_saved_file(tmp_path) -> None:
    """The payload is what a saved state dict holds, less the file format's few kB."""
    spec = PRESETS["resnet-tiny"]
    model = build_model(spec)
    for dtype, convert in (("fp32", model.float), ("fp16", model.half)):
        path = tmp_path / f"{dtype}.pt"
        torch.save(convert().state_dict(), path)
        overhead = path.stat().st_size - count_bytes(spec, dtype)
        assert 0 < overhead < 40_000, (dtype, overhead)
