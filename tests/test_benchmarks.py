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


def test_the_peers_flat_space_rebuilds_every_candidate_of_the_search_space() -> None:
    """A SMAC or DEHB configuration is a point of the search's own space: a random
    sample of the space, written as a ConfigSpace configuration and read back, gives
    the same architecture and training settings."""
    pytest.importorskip("ConfigSpace")
    from benchmarks.peers import config_space, distributions, params_of
    from search import space
    from search.data import search_split, synthetic
    from search.limits import Limits
    from search.profile import QUICK

    data = search_split(synthetic(n_train=64, n_test=8, channels=1, size=28), 0, 48, 16)
    dists = distributions(data)
    cs = config_space(dists, 0)
    assert {h.name for h in cs.values()} == set(dists)
    limits = Limits(5_000_000, QUICK.max_macs)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(0))
    for _ in range(30):
        trial = study.ask()
        spec = space.suggest_arch(trial, data.shape, limits)
        cfg = space.suggest_training(trial, QUICK, len(data.train_y), 0)
        flat = dict(cs.sample_configuration())  # the unused parameters: any value
        flat |= {k: str(v) if k in cs and hasattr(cs[k], "choices") else v
                 for k, v in trial.params.items()}  # fmt: skip
        fixed = optuna.trial.FixedTrial(params_of(flat, dists))
        assert space.suggest_arch(fixed, data.shape, limits) == spec
        assert space.suggest_training(fixed, QUICK, len(data.train_y), 0) == cfg
        study.tell(trial, 0.0)


def test_peers_summary_compares_the_default_with_the_best_peer() -> None:
    pytest.importorskip("scipy")
    from benchmarks.peers import summarize

    def run(method: str, seed: int, final: float, at: float) -> dict:
        return {"method": method, "seed": seed, "final_best": final,
                "curve": [[at / 2, final - 0.01], [at, final]]}  # fmt: skip

    runs = [run("default", s, 0.90 + s / 1000, 100) for s in range(5)]
    runs += [run("smac", s, 0.88, 200) for s in range(5)]
    runs += [run("dehb", s, 0.89, 250) for s in range(5)]
    out = summarize(runs, 300)
    assert out["best_peer"] == "dehb" and out["best_peer_median_final_best"] == 0.89
    assert out["default_median_final_best"] == 0.902
    # the default reaches 0.89 at its curve's first point (50 s); dehb at 250 s
    assert out["time_ratio_vs_best_peer"] == 0.2
    assert out["wilcoxon_default_vs_best_peer"]["wins"] == 5
    assert out["methods"]["smac"]["median_seconds_to"]["default"] == 600  # never: twice
