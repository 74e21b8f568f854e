"""search.choose: successive halving of the front for the study's horizon."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from models import ArchSpec, count_macs, count_params
from models.presets import preset
from search import choose, train
from search.choose import (
    FIRST,
    SHARE,
    Candidate,
    candidates,
    compute,
    grow_plan,
    grown,
    halve,
    most,
    plan,
    searched_compute,
    searched_images,
    user_limits,
    widened,
)
from search.data import load_dataset, search_split
from search.records import ranked, trial_arch
from search.study import open_study
from search.trainer import TrainConfig

from conftest import SMALL

STUDY_DB = Path(__file__).parents[1] / "benchmarks/results/final_choice-study.db"


@pytest.fixture
def final_choice(tmp_path):
    """The final_choice benchmark's study (a 100-trial quick search), a copy."""
    db = tmp_path / "study.db"
    shutil.copy(STUDY_DB, db)
    return open_study(f"sqlite:///{db}", "final-choice-s0", create=False)


def test_the_choice_looks_longer_at_as_many_as_half_the_search_allows() -> None:
    # the final_choice study: 702,000 images searched, 6 candidates, 24,000-image trials
    half = {"share": 0.5}  # of the search's images
    assert plan(6, 702_000, 24_000, 600_000, **half) == (3, [117_000])  # 6 would get 29,250 each
    assert plan(12, 2_808_000, 24_000, 1_800_000, **half) == (9, [78_000, 234_000])
    assert plan(12, 2_808_000, 24_000, 300_000, **half) == (3, [100_000])  # <= horizon / 3
    assert plan(6, 40_000, 24_000, 600_000, **half) == (1, [])  # a small search: its ranking stands
    assert plan(8, 13_500_000, 450_000, 1_500_000, **half) == (1, [])  # the GPU profile: too near
    for n in range(2, 30):
        for searched in (100_000, 702_000, 5_000_000):
            k, lengths = plan(n, searched, 24_000, 1_800_000)
            alive = [-(-k // 3**r) for r in range(len(lengths))]
            spent = sum(a * n_ for a, n_ in zip(alive, lengths, strict=True))
            assert spent <= SHARE * FIRST * searched
            assert all(n_ >= 2 * 24_000 for n_ in lengths) and lengths == sorted(lengths)


def test_halving_keeps_the_best_third_at_each_rung_and_trains_each_once() -> None:
    cands = [Candidate(i, s, SMALL, TrainConfig()) for i in range(5) for s in ("trial", "hand")]
    score = {c.name: (c.trial % 3) + (0.5 if c.settings == "hand" else 0) for c in cands}
    calls = []

    def run(c: Candidate, length: int) -> float:
        calls.append((c.name, length))
        return score[c.name] + length / 1e6

    winner, rows = halve(cands, [100, 300, 900], run)
    assert [len([r for r in rows if r["rung"] == k]) for k in (1, 2, 3)] == [10, 4, 2]
    assert len(calls) == len(set(calls)) == 16
    assert winner.name == "trial 2 with hand settings"  # 2.5: the best


def test_a_network_several_trials_trained_is_a_candidate_once(final_choice) -> None:
    """The final_choice benchmark's study: trials 89 and 90 trained one network with
    learning rates 0.079 and 0.068; the choice looks longer at it once, as trial 90 (the
    better), and the third best network takes the place the copy held."""
    trials = final_choice.get_trials()
    by_number = {t.number: t for t in trials}
    assert trial_arch(by_number[89]) == trial_arch(by_number[90])
    cands = candidates(trials, top=3)
    nets = [c.spec for c in cands]
    assert len(nets) == len(set(nets)) and {c.settings for c in cands} == {"trial"}
    both = candidates(trials, top=3, settings=("trial", "hand"))
    assert len(both) == 2 * len(cands) and both[1].cfg == TrainConfig(seed=both[0].cfg.seed)
    assert 90 in {c.trial for c in cands} and 89 not in {c.trial for c in cands}
    ranked_nets = {}
    for t in ranked(trials):
        ranked_nets.setdefault(trial_arch(t), t.number)
    assert set(list(ranked_nets.values())[:3]) <= {c.trial for c in cands}


def test_the_networks_the_search_could_not_try_fit_the_user_s_limits_only(final_choice) -> None:
    """The winner's wider copies and the hand designs for its input, cheapest first, each
    within the user's limits: the quick profile's 20M MACs cap a trial, not the network
    shipped; a MAC limit the user set bounds both."""
    winner = next(c for c in candidates(final_choice.get_trials()) if c.trial == 139)
    settings = final_choice.user_attrs["settings"]
    assert settings["max_macs"] == 20_000_000  # the profile's: no limit of the user's
    out = grown(winner, user_limits(settings))
    macs = [count_macs(c.spec) for c in out]
    assert macs == sorted(macs) and all(c.cfg == winner.cfg and c.trial == 139 for c in out)
    assert [c.grown for c in out][:3] == [
        "trial 139 at 2x width", "resnet-tiny", "resnet-3stage-2221"
    ]  # fmt: skip
    assert all(count_params(c.spec) <= 5_000_000 for c in out)
    assert "resnet18" not in {c.grown for c in out}  # 11.2M: over the budget
    two = widened(winner.spec, 2)
    assert two.stem_channels == 2 * winner.spec.stem_channels
    assert [s.channels for s in two.stages] == [2 * s.channels for s in winner.spec.stages]
    assert out[0].spec == two and out[0].name == "trial 139 at 2x width with trial 139's settings"
    tiny = preset("resnet-tiny", 1, 28, 10)
    assert out[1].spec == tiny and count_macs(tiny) == 37_156_608
    # A MAC limit of the user's (not the profile's) bounds them; so does a latency limit.
    mine = user_limits(settings | {"max_macs": 40_000_000})
    assert [c.grown for c in grown(winner, mine)] == ["trial 139 at 2x width", "resnet-tiny"]
    assert user_limits(settings | {"max_latency_ms": 1.0}) is None


def test_the_last_look_compares_as_many_as_the_rest_of_the_budget_allows() -> None:
    # the final_choice study's pool: 139 (9.0M MACs), its 2x copy, resnet-tiny, resnet-3stage
    macs = [9_039_520, 35_916_608, 37_156_608, 80_508_672]
    assert grow_plan(macs, 1.2e13, 24_000, 600_000) == (4, 73_791)
    assert grow_plan(macs, 2.16e12, 24_000, 600_000) == (2, 48_046)  # 3 would get 26,305
    assert grow_plan(macs, 1e14, 24_000, 600_000) == (4, 200_000)  # at most horizon / 3
    assert grow_plan(macs, 1e12, 24_000, 600_000) == (1, 0)  # not two trials: the winner
    for budget in (1e11, 1e12, 5e12, 1e13):
        k, length = grow_plan(macs, budget, 24_000, 600_000)
        assert k == 1 or (length >= 48_000 and length * sum(macs[:k]) <= budget)
    # the most a halving can cost: each rung's survivors the most expensive
    small, large = (Candidate(0, "trial", s, TrainConfig()) for s in (SMALL, widened(SMALL, 2)))
    m1, m2 = count_macs(SMALL), count_macs(widened(SMALL, 2))
    assert most([small, large, small, small], [100, 300]) == 100 * (3 * m1 + m2) + 300 * (m2 + m1)
    rows = [{"candidate": c, "images": n, "macs": m} for c, n, m in [("a", 10, 3), ("b", 2, 5)]]
    assert compute(rows) == compute([*rows, rows[0]]) == 40  # a run counts once


def test_the_search_s_compute_is_its_trials_images_times_their_macs(final_choice) -> None:
    trials = final_choice.get_trials()
    assert searched_images(trials) == 702_000
    assert searched_compute(trials) == 7_247_793_936_000  # benchmarks/results/horizon_looks


def test_choose_writes_the_chosen_network_and_settings_and_resumes(finished, tmp_path, capsys):
    db = tmp_path / "study.db"
    shutil.copy(finished.cwd / "study.db", db)
    url = f"sqlite:///{db}"
    study = open_study(url, finished.name, create=False)
    h = study.user_attrs["horizon"]
    study.set_user_attr("horizon", h | {"epochs": 3, "images": 3 * h["train_images"]})
    trials = study.get_trials()
    n, lengths = plan(  # the front and the best: fewer runs
        len(candidates(trials, top=1)),
        searched_images(trials),
        study.user_attrs["settings"]["profile"]["images"],
        3 * h["train_images"],
        share=2 * FIRST,  # of --share 2: the rest is the last look's
    )  # fmt: skip (6 trials: half their images would allow no look of two trials)
    assert n >= 2 and len(lengths) == 1  # the study's trials leave room for one longer look
    out = tmp_path / "best.json"
    argv = ["--study-name", finished.name, "--storage", url, "--device", "cpu", "--top", "1"]
    argv += ["--share", "2"]
    argv += ["-o", str(out)]
    assert choose.main(argv) == 0
    text = capsys.readouterr().out
    best = json.loads(out.read_text())
    choice = best["choice"]
    rows = choice["rungs"]
    assert [r["images"] for r in rows if r["rung"] == 1] == lengths * n
    # The last look: the halving's winner first, then networks the search did not train,
    # with its settings, one length; within the budget: twice the search's compute.
    last = [r for r in rows if r["rung"] == 2]
    first = min((r for r in rows if r["rung"] == 1), key=lambda r: (-r["validation"], r["trial"]))
    assert len(last) >= 2 and last[0]["candidate"] == first["candidate"]
    assert len({r["images"] for r in last}) == 1 and last[0]["images"] >= 2 * 1024
    assert {r["trial"] for r in last} == {first["trial"]}
    assert compute(rows) == choice["compute"] <= 2 * searched_compute(trials)
    top = max(last, key=lambda r: r["validation"])
    assert choice["network"] == top["candidate"] and best["trial"] == top["trial"]
    once = {(r["candidate"], r["images"]): r["images"] for r in rows}  # a run counts once
    assert choice["images_trained"] == sum(once.values())
    # What it ships is that network: a grown one's architecture and sizes, not its trial's.
    spec = ArchSpec.from_dict(best["architecture"])
    assert best["params"] == count_params(spec) and best["macs"] == count_macs(spec) == top["macs"]
    assert (choice["grown"] is None) == (spec == trial_arch(trials[best["trial"]]))
    assert best["training"]["seed"] is not None and best["horizon"]["epochs"] == 3
    assert f"ship: {choice['network']}" in text
    # The command it prints final-trains that file, with this environment, at the horizon.
    line = next(x for x in text.splitlines() if x.startswith("next: "))
    command = shlex.split(line.removeprefix("next: "))
    assert Path(shutil.which(command[0]) or command[0]).resolve() == Path(sys.executable).resolve()
    assert command[1:] == ["-m", "search.train", str(out), "--epochs", "3", "--seeds", "3"]
    # ... and what search.train reads from it is the network and settings shipped
    args = train.parse_args([str(out)])
    arch, cfg, dataset = train.resolve(args)
    shipped = TrainConfig.from_dict(best["training"])  # its images: the trial's length
    assert arch == spec and cfg == replace(shipped, images=cfg.images) and args.epochs == 3
    assert dataset == "synthetic"
    # Its runs see the whole training set less the held-out images, and all of those.
    settings = study.user_attrs["settings"]
    whole = search_split(load_dataset(settings["dataset"]), settings["seed"])
    assert len(whole.train_y) > settings["train_images"]  # the trials' subset: 512
    assert f"on {len(whole.train_y):,} training and {len(whole.val_y):,} validation" in text
    # each network and length trains once: the winner's last look may be its rung's run
    assert text.count("): validation") == len({(r["candidate"], r["images"]) for r in rows})
    # Run again: every run is on the study already, nothing trains, the same choice.
    assert choose.main(argv) == 0
    again = capsys.readouterr().out
    assert "validation 0." not in again and json.loads(out.read_text())["trial"] == best["trial"]
    # What the choice cost is its runs' time, the earlier call's too: not 0 s on a resume.
    assert json.loads(out.read_text())["choice"]["seconds"] == choice["seconds"] > 0
    # A MAC limit of the user's that no grown network fits: the halving's winner ships,
    # with no last look (and nothing trains: its runs are on the study).
    study.set_user_attr("settings", settings | {"max_macs": first["macs"]})
    assert choose.main([*argv[:-1], str(tmp_path / "halved.json")]) == 0
    text = capsys.readouterr().out
    halved = json.loads((tmp_path / "halved.json").read_text())
    assert "no wider or hand-designed network fits the limits" in text
    assert "validation 0." not in text and halved["choice"]["network"] == first["candidate"]
    assert [r["rung"] for r in halved["choice"]["rungs"]] == [1] * n


def test_the_choose_command_search_run_prints_works_and_keeps_the_ranking_when_poor(
    finished, tmp_path, capsys
) -> None:
    """search.run's `choose:` line is a command that runs; on a search too small for a look
    of two trials within half its compute, the best trial is what it ships, as it is."""
    import shlex

    line = finished.out[finished.out.index("choose: ") :].splitlines()[0]
    assert f"--study-name {finished.name}" in line
    assert f"within {SHARE:g}x the search's compute" in line
    argv = shlex.split(line.split("#")[0])[4:]  # after "choose: <python> -m search.choose"
    out = tmp_path / "best.json"
    # half the search's compute: its 6 trials' images allow no look of two trials
    assert choose.main([*argv, "--device", "cpu", "--share", "0.5", "-o", str(out)]) == 0
    assert "the trials' ranking stands" in capsys.readouterr().out
    study = open_study(finished.url, finished.name, create=False)
    best, shipped = ranked(study.get_trials())[0], json.loads(out.read_text())
    assert shipped["trial"] == best.number and shipped["choice"]["grown"] is None
    assert ArchSpec.from_dict(shipped["architecture"]) == trial_arch(best)
    assert shipped["choice"]["rungs"] == [] and shipped["choice"]["compute"] == 0


def test_choose_on_a_missing_study_is_a_clear_error(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path}/none.db"
    assert choose.main(["--study-name", "x", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
