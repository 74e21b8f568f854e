"""The benchmarks' own logic, where a figure depends on it (no training here)."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.trial import TrialState

from benchmarks.rung_ranking import from_rung, stop_rung

RUNGS = [3000, 6000, 12000, 24000]  # a factor 2 apart, as the quick profile's


@pytest.mark.parametrize(
    ("rule", "pruner"),
    [
        ("median:1", optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)),
        ("percentile:25:2", optuna.pruners.PercentilePruner(25.0, n_startup_trials=2)),
        ("asha:2", optuna.pruners.SuccessiveHalvingPruner(min_resource=3000, reduction_factor=2)),
    ],
)
def test_the_replay_stops_candidates_where_optunas_pruner_does(rule, pruner) -> None:
    """The replayed time_ratio figures are only worth what this agreement is."""
    rng = random.Random(0)
    curves = [[rng.uniform(0.1, 0.9) for _ in RUNGS] for _ in range(60)]
    study = optuna.create_study(direction="maximize", pruner=pruner)
    seen: list[list[float]] = [[] for _ in RUNGS]
    done: list[list[float]] = []
    stops = []
    for acc in curves:
        trial = study.ask()
        stop = len(acc) - 1
        for i, (step, a) in enumerate(zip(RUNGS, acc, strict=True)):
            trial.report(a, step)
            if i < stop and trial.should_prune():  # the search never prunes the last rung
                stop = i
                break
        if stop == len(acc) - 1:
            study.tell(trial, acc[-1])
        else:
            study.tell(trial, state=TrialState.PRUNED)
        expected = stop_rung(rule, acc, seen, done)
        if expected == len(acc) - 1:
            done.append(acc)
        stops.append((stop, expected))
    assert all(a == b for a, b in stops), stops
    assert len({s for s, _ in stops}) > 1  # the rule pruned some and kept others


def test_a_later_first_rung_drops_the_earlier_columns() -> None:
    rows = [{"acc": [0.1, 0.2, 0.3, 0.4], "seconds": [1, 2, 4, 8], "batch": 64}]
    assert from_rung(rows, [0.125, 0.25, 0.5, 1.0], 0.25) == [
        {"acc": [0.2, 0.3, 0.4], "seconds": [2, 4, 8], "batch": 64}
    ]


def test_resume_refuses_timings_from_a_machine_of_another_speed(monkeypatch) -> None:
    """Two VMs both called "AMD EPYC" trained 4x apart; a --resume must not mix them."""
    from benchmarks import machine as m

    monkeypatch.setattr(m, "trial_speed", lambda: 300.0)
    here = m.machine("cpu")
    assert m.comparable(here) is None
    assert m.comparable(here | {"trial_images_per_s": 340}) is None  # within 25%
    assert "4.00x" in m.comparable(here | {"trial_images_per_s": 75})
    old = {k: v for k, v in here.items() if k != "trial_images_per_s"}
    assert "predate" in m.comparable(old)
    assert "GPU X" in m.comparable(here | {"gpu": "GPU X"})


def test_each_method_is_scored_on_the_seeds_it_shares_with_random_search() -> None:
    """A --resume that adds seeds for some methods only must not score a method's
    5 seeds against a target set by random search's 10."""
    from benchmarks.search_efficiency import summarize

    def run(method: str, seed: int, best: float, at: float) -> dict:
        return {
            "method": method,
            "seed": seed,
            "final_best": best,
            "curve": [(at, best)],
            "counts": {"trained": 1},
            "rejected_fraction_first_20": 0.0,
            "rejected_fraction_last_50": 0.0,
        }

    runs = [run("random", s, b, 100.0) for s, b in enumerate([0.80, 0.82, 0.90, 0.92])]
    runs += [run("tpe", 0, 0.83, 50.0), run("tpe", 1, 0.815, 20.0)]
    out = summarize(runs, seconds=300)
    assert out["random_median_final_best"] == pytest.approx(0.86)  # all four seeds
    tpe = out["tpe"]
    assert tpe["seeds"] == [0, 1]
    assert tpe["target"] == pytest.approx(0.81)  # random search on seeds 0 and 1
    assert tpe["seconds_to_target"] == [50.0, 20.0]
    assert tpe["time_ratio"] == pytest.approx(35.0 / 350.0)  # random: never (600) and 100 s
    assert out["random"]["time_ratio"] == pytest.approx(1.0)


def test_summarizing_a_saved_file_keeps_what_it_was_measured_with(tmp_path, monkeypatch) -> None:
    """--summarize-only recomputes summaries; the machine, date and profile of the runs stay."""
    import json

    from benchmarks import search_efficiency as se

    path = tmp_path / "old-cpu.json"
    monkeypatch.setattr(se, "result_path", lambda name, device: path)
    runs = [
        {
            "method": m,
            "seed": 0,
            "final_best": 0.8,
            "curve": [(10.0, 0.8)],
            "counts": {"trained": 1},
            "rejected_fraction_first_20": 0.0,
            "rejected_fraction_last_50": 0.0,
        }
        for m in ("random", "tpe")
    ]
    old = {"machine": {"cpu": "X"}, "date": "2026-01-01", "profile": {"rungs": [0.25, 1.0]}}
    path.write_text(json.dumps(old | {"budget": 1_000_000, "seconds_per_run": 60, "runs": runs}))
    se.summarize_saved("old")
    saved = json.loads(path.read_text())
    assert {k: saved[k] for k in old} == old
    assert saved["budget"] == 1_000_000
    assert saved["time_ratio"] == {"random": 1.0, "tpe": 1.0}
