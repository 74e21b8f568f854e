"""The search service end to end on synthetic data, in temporary SQLite studies."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from optuna.trial import TrialState

from models import build_model, count_params, load_arch
from models.presets import PRESETS, preset
from search import export, objective, run, space
from search.data import synthetic
from search.objective import Limits, Objective, search_split
from search.study import counts, open_study

from conftest import FAST_SEARCH

FAST = FAST_SEARCH


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/study.db"


def test_short_search_completes_and_exports(in_tmp, capsys) -> None:
    rc = run.main(
        [
            *FAST,
            "--trials",
            "6",
            "--study-name",
            "s",
            "--storage",
            storage(in_tmp),
            "--enqueue",
            "resnet-tiny",
            "--enqueue",
            "resnet18",
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured.err
    study = open_study(storage(in_tmp), "s", create=False)
    c = counts(study.trials)
    assert c["trained"] == 6 and c["running"] == 0
    assert c["rejected"] >= 1  # resnet18 (11M) is over the 5M budget
    assert "6 trained" in out and "best architecture" in out
    best = json.loads((in_tmp / "studies" / "s" / "best.json").read_text())
    spec = load_arch(in_tmp / "studies" / "s" / "best.json")
    assert (
        best["params"]
        == count_params(spec)
        == sum(p.numel() for p in build_model(spec).parameters())
    )
    assert best["study_name"] == "s" and best["dataset"] == "synthetic"
    assert best["validation"]["accuracy"] == study.best_value
    assert {"training", "macs", "seed", "versions", "trial"} <= set(best)


def test_resume_continues_the_same_study(in_tmp, capsys) -> None:
    args = [*FAST, "--study-name", "r", "--storage", storage(in_tmp)]
    assert run.main([*args, "--trials", "2"]) == 0
    assert run.main([*args, "--trials", "4"]) == 0
    assert "2 trained so far" in capsys.readouterr().out
    study = open_study(storage(in_tmp), "r", create=False)
    assert counts(study.trials)["trained"] == 4
    # Another budget is another experiment: refused, not mixed in.
    assert run.main([*args, "--trials", "5", "--budget", "1M"]) == 2
    assert "different settings" in capsys.readouterr().err


def small_objective(budget: int = 5_000_000, epochs: int = 3) -> Objective:
    data = search_split(synthetic(n_train=1024, n_test=64), seed=0)
    return Objective(data, Limits(budget), epochs, seed=0, device=torch.device("cpu"))


def test_over_budget_is_rejected_before_any_model(monkeypatch) -> None:
    def no_build(*_a, **_k):
        raise AssertionError("a model was built for a rejected candidate")

    monkeypatch.setattr("search.train.build_model", no_build)
    monkeypatch.setattr("search.train.train", no_build)
    monkeypatch.setattr("search.objective.train", no_build)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(space.preset_params(preset("resnet18")))
    study.optimize(small_objective(), n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.PRUNED
    assert t.user_attrs["params"] == 11_173_962
    assert t.user_attrs["rejected"] == "over the limit: params 11,173,962 > 5,000,000"
    assert t.system_attrs["constraints:params"] == 11_173_962 - 5_000_000


def test_clearly_worse_trial_is_pruned_by_the_median_rule() -> None:
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(5, n_warmup_steps=1)
    )
    good = space.preset_params(preset("resnet-tiny"), run.TrainConfig(batch_size=128, lr=0.1))
    for _ in range(5):
        study.enqueue_trial(good)
    # Same network; one step per epoch at the smallest learning rate.
    bad = space.preset_params(preset("resnet-tiny"), run.TrainConfig(batch_size=512, lr=0.01))
    study.enqueue_trial(bad)
    study.optimize(small_objective(), n_trials=6)
    states = [t.state for t in study.trials]
    assert states[:5] == [TrialState.COMPLETE] * 5
    assert states[5] == TrialState.PRUNED
    assert study.trials[5].user_attrs["pruned"].startswith("median rule at epoch 1")
    assert len(study.trials[5].intermediate_values) == 1


def test_every_preset_is_a_point_of_the_space() -> None:
    for name in PRESETS:
        for shape in [(3, 32, 10), (1, 28, 10)]:
            spec = preset(name, *shape)
            params = space.preset_params(spec)
            assert space.suggest_arch(optuna.trial.FixedTrial(params), *shape) == spec


def test_export_cli_by_trial_number(in_tmp, capsys) -> None:
    assert (
        run.main([*FAST, "--trials", "2", "--study-name", "e", "--storage", storage(in_tmp)]) == 0
    )
    study = open_study(storage(in_tmp), "e", create=False)
    number = next(t.number for t in study.trials if t.state == TrialState.COMPLETE)
    out = in_tmp / "t.json"
    assert (
        export.main(
            [
                "--storage",
                storage(in_tmp),
                "--study-name",
                "e",
                "--trial",
                str(number),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["trial"] == number
    assert count_params(load_arch(out)) == data["params"]
    assert export.main(["--storage", storage(in_tmp), "--study-name", "nope"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "lots"], "not a count"),
        (["--trials", "0"], "--trials must be at least 1"),
        (["--enqueue", "resnet99"], "unknown preset resnet99"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--budget", "1k"], "nothing in the search space fits"),
        (["--storage", "notaurl"], "not a database URL"),
        (["--storage", "postgresql+psycopg://nobody:pw@127.0.0.1:1/x"], "Connection refused"),
        (["--storage", "postgres://x:pw@127.0.0.1/db"], "cannot open storage postgres://x:***@"),
        (["--storage", "mysql://u@127.0.0.1:1/x"], "Failed to import DB access module"),
    ],
)
def test_bad_input_is_a_one_line_error(in_tmp, capsys, flags, message) -> None:
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(run.main([*FAST, "--trials", "1", *flags]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert ":pw@" not in err


def test_budget_parsing() -> None:
    assert [run.parse_count(s) for s in ["5000000", "5e6", "5M", "4.5m", "500k", "1G"]] == [
        5_000_000,
        5_000_000,
        5_000_000,
        4_500_000,
        500_000,
        1_000_000_000,
    ]


def test_trial_seed_is_recorded_and_replays() -> None:
    obj = small_objective(epochs=1)
    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        study.enqueue_trial(space.preset_params(preset("resnet-tiny")))
    study.optimize(obj, n_trials=2)
    a, b = study.trials
    assert a.user_attrs["seed"] != b.user_attrs["seed"]
    assert objective.replay(a, obj.data, obj.device) == a.value
