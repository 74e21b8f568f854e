"""The closed-form counters against the model the builder really makes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from models import ArchSpec, StageSpec, build_model, count_macs, count_params, load_arch
from models.complexity import count_activation_bytes, count_bytes, peak_activations
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


def traced_peak(model: nn.Module, x: torch.Tensor) -> int:
    """The most values alive at once when the model's traced graph runs in order, each
    node's result freed after its last reader; a result that is one of its inputs or a
    view of one (identity, inference dropout, flatten) is that input's buffer.
    Measured on the model as built: torch.fx traces it, and running the trace says
    which results alias which."""
    graph_module = torch.fx.symbolic_trace(model)
    nodes = list(graph_module.graph.nodes)
    buffer: dict[torch.fx.Node, int] = {}  # node -> the index of the node that wrote it
    sizes: dict[int, int] = {}
    results: dict[int, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node):
            out = super().run_node(n)
            if n.op == "output":
                return out
            i = nodes.index(n)
            for arg in n.all_input_nodes:
                source = results[buffer[arg]]
                if out is source or out._base is source:
                    buffer[n] = buffer[arg]
                    return out
            buffer[n], sizes[i], results[i] = i, out.numel(), out
            return out

    Recorder(graph_module).run(x)
    last = {b: b for b in sizes}
    for i, n in enumerate(nodes):
        for arg in n.all_input_nodes:
            last[buffer[arg]] = max(last[buffer[arg]], i)
    return max(
        sum(size for b, size in sizes.items() if b <= i <= last[b]) for i in range(len(nodes))
    )


@pytest.mark.parametrize("n", examples(300))
def test_activation_count_equals_the_traced_model(n: int) -> None:
    @settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(arch_specs())
    def check(spec: ArchSpec) -> None:
        with torch.device("meta"):  # shapes and aliasing without storage
            model = build_model(spec).eval()
            x = torch.empty(1, spec.in_channels, spec.input_size, spec.input_size)
        peak = traced_peak(model, x)
        assert peak_activations(spec)[0] == peak
        assert count_activation_bytes(spec, "fp32") == 4 * peak
        assert count_activation_bytes(spec, "int8") == peak

    check()


def test_activation_peak_of_the_seeds_network() -> None:
    """resnet18-2111 on CIFAR-10: the stem's 64x32x32 maps, 3 at once in the first block."""
    spec = PRESETS["resnet18-2111"]
    assert peak_activations(spec) == (3 * 64 * 32 * 32, "stage1 block 1")
    assert count_activation_bytes(spec, "fp16") == 2 * 3 * 64 * 32 * 32


def test_activation_peak_at_the_stem_when_the_image_is_wider() -> None:
    """A stem narrower than the image: the image and the stem's first map are the peak."""
    spec = ArchSpec(stages=(StageSpec(1, 1),), stem_channels=1, in_channels=3, input_size=8, pool=1)
    assert peak_activations(spec) == ((3 + 1) * 64, "stem")
    with torch.device("meta"):
        assert traced_peak(build_model(spec).eval(), torch.empty(1, 3, 8, 8)) == 4 * 64
