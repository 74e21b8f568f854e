"""The latency predictor's view of a network is the built model's, layer for layer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from models import ArchSpec, build_model, count_macs
from search import latency

from strategies import arch_specs

KINDS = {nn.BatchNorm2d: "bn", nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu",
         nn.Identity: "identity", nn.Dropout2d: "identity", nn.AvgPool2d: "pool",
         nn.Linear: "linear"}  # fmt: skip


def called(model: nn.Module, x: torch.Tensor) -> Counter:
    """The leaf modules the forward pass calls, by kind (convs by kernel and stride), and
    their input and output sizes."""
    seen: Counter = Counter()

    def hook(m: nn.Module, inp, out) -> None:
        if isinstance(m, nn.Conv2d):
            kind = f"conv{m.kernel_size[0]}s{m.stride[0]}"
        else:
            kind = KINDS[type(m)]
        seen[(kind, inp[0].shape[1], inp[0].shape[-1], out.shape[1], out.shape[-1])] += 1

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch_specs())
def test_layers_are_the_modules_the_model_calls(spec: ArchSpec) -> None:
    with torch.device("meta"):
        model = build_model(spec).eval()
        x = torch.empty(1, spec.in_channels, spec.input_size, spec.input_size)
    calls = called(model, x)
    mine = Counter()
    for layer in latency.layers(spec):
        if layer.kind == "add":  # a + b in BasicBlock.forward: no module
            continue
        if layer.kind == "linear":
            mine[("linear", layer.cin, layer.cin, layer.cout, layer.cout)] += 1
            continue
        mine[(layer.kind, layer.cin, layer.in_size, layer.cout, layer.out_size)] += 1
    linear = next(k for k in calls if k[0] == "linear")
    calls[("linear", linear[1], linear[1], linear[3], linear[3])] = calls.pop(linear)
    assert mine == calls
    assert sum(layer.macs for layer in latency.layers(spec)) == count_macs(spec)


def test_a_table_predicts_from_its_coefficients_and_round_trips(tmp_path, monkeypatch):
    spec = ArchSpec.from_dict(
        {"input": {"channels": 1, "size": 28}, "num_classes": 10, "stem": {"channels": 8},
         "stages": [{"blocks": 2, "channels": 8}, {"blocks": 1, "channels": 16}], "pool": 2}
    )  # fmt: skip
    kinds = {k.kind: [0.01, 0.1, 0.0, 0.0] for k in latency.layers(spec)}
    table = latency.Table(1, kinds, 2.0, 0.05, 0.3)
    n = len(latency.layers(spec))
    expected = 2.0 * (0.01 * n + 0.1 * count_macs(spec) / 1e6) + 0.05 * 3 + 0.3
    assert table.predict(spec) == pytest.approx(expected)
    assert latency.Table.from_dict(table.to_dict()).predict(spec) == table.predict(spec)
    with pytest.raises(ValueError, match="no conv3s1"):
        latency.Table(1, {}, 1.0, 0.0, 0.0).predict(spec)
    monkeypatch.setenv("NAS_CACHE_DIR", str(tmp_path))
    path = latency.cache_path(1)
    assert path.parent == tmp_path / "latency" and torch.__version__.split("+")[0] in path.name
    assert latency.cache_path(1) != latency.cache_path(2)


def flat_table(ms_per_mmac: float = 1.0) -> latency.Table:
    """A table whose prediction is `ms_per_mmac` per million MACs (deterministic)."""
    kinds = [*(f"conv{k}s{s}" for k in latency.KERNELS for s in (1, 2)), "bn", "add", "identity"]
    kinds += ["relu", "gelu", "silu", "pool", "linear"]
    return latency.Table(1, {k: [0.0, ms_per_mmac, 0.0, 0.0] for k in kinds}, 1.0, 0.0, 0.0)


def test_the_gate_predicts_and_times_a_candidate_near_the_limit() -> None:
    import optuna

    from search.limits import Limits
    from search.worker import gate

    spec = ArchSpec.from_dict(
        {"input": {"channels": 1, "size": 28}, "num_classes": 10, "stem": {"channels": 8},
         "stages": [{"blocks": 1, "channels": 8}], "pool": 4}
    )  # fmt: skip
    predicted = count_macs(spec) / 1e6
    study = optuna.create_study()
    far = Limits(10**6, latency_ms=predicted * 3, latency=flat_table(), measure_near=True)
    t = study.ask()
    assert gate(t, spec, far) and t.user_attrs["latency_ms"] == round(predicted, 4)
    assert "latency_predicted_ms" not in t.user_attrs  # far from the limit: not timed
    near = Limits(10**6, latency_ms=predicted * 1.05, latency=flat_table(), measure_near=True)
    t = study.ask()
    gate(t, spec, near)
    assert t.user_attrs["latency_predicted_ms"] == round(predicted, 4)
    assert t.user_attrs["latency_ms"] != t.user_attrs["latency_predicted_ms"]  # timed here
    elsewhere = Limits(10**6, latency_ms=predicted * 1.05, latency=flat_table(), measure_near=False)
    t = study.ask()
    gate(t, spec, elsewhere)  # another CPU's table: this CPU's time would say nothing
    assert "latency_predicted_ms" not in t.user_attrs
    assert t.constraints["latency_ms"] == pytest.approx(1 / 1.05 - 1, abs=1e-3)


def test_max_latency_ms_with_a_target_table(tmp_path, monkeypatch, capsys) -> None:
    """A table built on another CPU (--latency-table): every trained candidate's predicted
    latency is under the limit; the limit is recorded on the study."""
    import json

    import optuna

    from search import run
    from search.slots import is_trained

    from conftest import FAST_SEARCH

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "target.json"
    path.write_text(json.dumps(flat_table(0.1).to_dict()))
    url = f"sqlite:///{tmp_path}/s.db"
    argv = [*FAST_SEARCH, "--trials", "3", "--study-name", "l", "--storage", url]
    assert run.main([*argv, "--max-latency-ms", "2", "--latency-table", str(path)]) == 0
    assert "at most 2 ms/image (1 CPU thread(s))" in capsys.readouterr().out
    study = optuna.load_study(study_name="l", storage=url)
    trained = [t for t in study.trials if is_trained(t)]
    assert len(trained) == 3 and all(t.user_attrs["latency_ms"] <= 2 for t in trained)
    assert study.user_attrs["settings"]["max_latency_ms"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert run.main([*argv, "--max-latency-ms", "2", "--latency-table", str(bad)]) == 2
    assert "--latency-table" in capsys.readouterr().err
