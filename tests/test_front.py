"""Every smaller budget from one study: the front, the best under a limit, the CLI."""

from __future__ import annotations

import json

import optuna
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

from models import count_macs, count_params
from models.complexity import count_bytes
from models.presets import PRESETS, preset
from search import export
from search.front import Within, best_within, pareto_front, train_command

DISTS = {"x": optuna.distributions.FloatDistribution(0, 1)}


def trial(number: int, params: int, acc: float, state=TrialState.COMPLETE, arch=None):
    attrs = {"params": params, "macs": 10 * params}
    if arch is not None:
        attrs = {"params": count_params(arch), "macs": count_macs(arch), "arch": arch.to_json()}
    t = optuna.trial.create_trial(
        state=state,
        value=acc if state == TrialState.COMPLETE else None,
        params={"x": 0.5},
        distributions=DISTS,
        user_attrs=attrs,
    )
    t.number = number
    return t


points = st.lists(
    st.tuples(st.integers(1, 50), st.sampled_from([0.1 * i for i in range(11)])), max_size=40
)


@settings(max_examples=300, deadline=None)
@given(points)
def test_the_front_is_exactly_the_undominated_trials(pts) -> None:
    trials = [trial(i, p, a) for i, (p, a) in enumerate(pts)]
    front = pareto_front(trials)
    on = {t.number for t in front}

    def dominates(u, t) -> bool:
        pu, pt = u.user_attrs["params"], t.user_attrs["params"]
        better = pu < pt or u.value > t.value or (u.value == t.value and u.number < t.number)
        return pu <= pt and u.value >= t.value and better

    for t in trials:
        dominated = any(dominates(u, t) for u in trials if u is not t)
        assert (t.number in on) == (not dominated)
    sizes = [t.user_attrs["params"] for t in front]
    accs = [t.value for t in front]
    assert sizes == sorted(sizes) and accs == sorted(set(accs))  # smallest first, each better


@settings(max_examples=200, deadline=None)
@given(points, st.integers(1, 50))
def test_best_within_a_budget_is_on_the_front(pts, budget) -> None:
    trials = [trial(i, p, a) for i, (p, a) in enumerate(pts)]
    fits = [t for t in trials if t.user_attrs["params"] <= budget]
    if not fits:
        return
    best = best_within(trials, Within(params=budget))
    assert best.value == max(t.value for t in fits)
    assert best in pareto_front(trials)


def test_not_completed_trials_are_never_on_the_front() -> None:
    trials = [
        trial(0, 5, 0.5),
        trial(1, 1, 0.0, TrialState.PRUNED),
        trial(2, 1, 0, TrialState.FAIL),
    ]
    assert [t.number for t in pareto_front(trials)] == [0]


def test_export_answers_smaller_budgets_from_one_study(tmp_path, capsys) -> None:
    """--budget, --max-bytes, --max-activation-bytes and --front on a real SQLite study of
    real architectures."""
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="f", storage=url, direction="maximize")
    study.set_user_attr("settings", {"budget": 5_000_000, "dataset": "cifar10", "seed": 0})
    names = ["resnet-tiny", "resnet-3stage-2221", "resnet18-w32", "resnet18-2111", "resnet10"]
    accs = [0.80, 0.85, 0.86, 0.90, 0.84]
    for name, acc in zip(names, accs, strict=True):
        t = trial(0, 0, acc, arch=preset(name))
        t.user_attrs["training"] = {"batch_size": 64}
        study.add_trial(t)
    base = ["--storage", url, "--study-name", "f"]
    assert export.main([*base, "--budget", "1M"]) == 0
    assert json.loads(capsys.readouterr().out)["trial"] == 1  # resnet-3stage-2221, 696,618
    assert export.main([*base, "--budget", "3M", "--max-bytes", "3MB"]) == 0
    assert json.loads(capsys.readouterr().out)["trial"] == 1
    assert export.main([*base, "--max-bytes", "6MB", "--weight-dtype", "fp16"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["trial"] == 2 and best["bytes"]["fp16"] == count_bytes(
        PRESETS["resnet18-w32"], "fp16"
    )
    assert export.main([*base, "--max-activation-bytes", "500kB"]) == 0  # 2111: 786,432
    best = json.loads(capsys.readouterr().out)
    assert best["trial"] == 2 and best["activation_bytes"]["fp32"] == 393_216
    assert export.main([*base, "--budget", "100k"]) == 2
    err = capsys.readouterr().err
    assert "no completed trial fits params 100,000" in err and "trial 0 with 308,650" in err
    out = tmp_path / "front.json"
    assert export.main([*base, "--front", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    front = json.loads(out.read_text())
    assert [f["trial"] for f in front["front"]] == [0, 1, 2, 3]  # resnet10 is dominated
    assert [r["params"] for r in front["rows"]] == sorted(r["params"] for r in front["rows"])
    assert "python -m search.train --study-name f" in printed and "--trial 3" in printed
    assert [r["activation_bytes_fp32"] for r in front["rows"]] == [393_216] * 3 + [786_432]
    assert "activations" in printed and "786,432" in printed


def test_the_train_command_never_prints_a_password() -> None:
    """Front rows are printed and saved: a password stays in $NAS_STORAGE."""
    secret = train_command("s", 3, "postgresql+psycopg://nas:hunter2@db:5432/nas")
    assert "hunter2" not in secret and "--storage" not in secret
    plain = train_command("s", 3, "sqlite:///studies/s.db")
    assert plain.endswith("--storage sqlite:///studies/s.db --trial 3")
