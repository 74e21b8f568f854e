"""search.choose: successive halving of the front for the study's horizon."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from search import choose
from search.choose import SHARE, Candidate, candidates, halve, plan, searched_images
from search.data import load_dataset, search_split
from search.records import ranked, trial_arch
from search.study import open_study
from search.trainer import TrainConfig


def test_the_choice_looks_longer_at_as_many_as_half_the_search_allows() -> None:
    # the final_choice study: 702,000 images searched, 6 candidates, 24,000-image trials
    assert plan(6, 702_000, 24_000, 600_000) == (3, [117_000])  # 6 would get 29,250 each
    assert plan(12, 2_808_000, 24_000, 1_800_000) == (9, [78_000, 234_000])
    assert plan(12, 2_808_000, 24_000, 300_000) == (3, [100_000])  # a look: <= horizon / 3
    assert plan(6, 40_000, 24_000, 600_000) == (1, [])  # a small search: its ranking stands
    assert plan(8, 13_500_000, 450_000, 1_500_000) == (1, [])  # the GPU profile: too near
    for n in range(2, 30):
        for searched in (100_000, 702_000, 5_000_000):
            k, lengths = plan(n, searched, 24_000, 1_800_000)
            alive = [-(-k // 3**r) for r in range(len(lengths))]
            assert sum(a * n_ for a, n_ in zip(alive, lengths, strict=True)) <= SHARE * searched
            assert all(n_ >= 2 * 24_000 for n_ in lengths) and lengths == sorted(lengths)


def test_halving_keeps_the_best_third_at_each_rung_and_trains_each_once() -> None:
    cands = [Candidate(i, s, None, TrainConfig()) for i in range(5) for s in ("trial", "hand")]
    score = {c.name: (c.trial % 3) + (0.5 if c.settings == "hand" else 0) for c in cands}
    calls = []

    def run(c: Candidate, length: int) -> float:
        calls.append((c.name, length))
        return score[c.name] + length / 1e6

    winner, rows = halve(cands, [100, 300, 900], run)
    assert [len([r for r in rows if r["rung"] == k]) for k in (1, 2, 3)] == [10, 4, 2]
    assert len(calls) == len(set(calls)) == 16
    assert winner.name == "trial 2 with hand settings"  # 2.5: the best


def test_a_network_several_trials_trained_is_a_candidate_once(tmp_path) -> None:
    """The final_choice benchmark's study: trials 89 and 90 trained one network with
    learning rates 0.079 and 0.068; the choice looks longer at it once, as trial 90 (the
    better), and the third best network takes the place the copy held."""
    db = tmp_path / "study.db"
    shutil.copy(Path(__file__).parents[1] / "benchmarks/results/final_choice-study.db", db)
    trials = open_study(f"sqlite:///{db}", "final-choice-s0", create=False).get_trials()
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
        share=2.0,
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
    assert [r["images"] for r in choice["rungs"]] == lengths * n
    top = max(choice["rungs"], key=lambda r: r["validation"])["validation"]
    row = next(r for r in choice["rungs"] if r["candidate"] == f"trial {best['trial']} with "
               f"{choice['settings']} settings")  # fmt: skip
    assert row["validation"] == top and choice["images_trained"] == n * lengths[0]
    assert best["training"]["seed"] is not None and best["horizon"]["epochs"] == 3
    assert "ship: trial" in text
    # The command it prints final-trains that file, with this environment, at the horizon.
    line = next(x for x in text.splitlines() if x.startswith("next: "))
    command = shlex.split(line.removeprefix("next: "))
    assert Path(shutil.which(command[0]) or command[0]).resolve() == Path(sys.executable).resolve()
    assert command[1:] == ["-m", "search.train", str(out), "--epochs", "3", "--seeds", "3"]
    # Its runs see the whole training set less the held-out images, and all of those.
    settings = study.user_attrs["settings"]
    whole = search_split(load_dataset(settings["dataset"]), settings["seed"])
    assert len(whole.train_y) > settings["train_images"]  # the trials' subset: 512
    assert f"on {len(whole.train_y):,} training and {len(whole.val_y):,} validation" in text
    assert text.count("): validation") == n
    # Run again: every run is on the study already, nothing trains, the same choice.
    assert choose.main(argv) == 0
    again = capsys.readouterr().out
    assert "validation 0." not in again and json.loads(out.read_text())["trial"] == best["trial"]
    # What the choice cost is its runs' time, the earlier call's too: not 0 s on a resume.
    assert json.loads(out.read_text())["choice"]["seconds"] == choice["seconds"] > 0


def test_the_choose_command_search_run_prints_works_and_keeps_the_ranking_when_poor(
    finished, tmp_path, capsys
) -> None:
    """search.run's `choose:` line is a command that runs; on a search too small for a look
    of two trials within half its images, the best trial is what it ships."""
    import shlex

    line = finished.out[finished.out.index("choose: ") :].splitlines()[0]
    assert f"--study-name {finished.name}" in line and "half the search's" in line
    argv = shlex.split(line.split("#")[0])[4:]  # after "choose: <python> -m search.choose"
    out = tmp_path / "best.json"
    assert choose.main([*argv, "--device", "cpu", "-o", str(out)]) == 0
    assert "the trials' ranking stands" in capsys.readouterr().out
    study = open_study(finished.url, finished.name, create=False)
    assert json.loads(out.read_text())["trial"] == ranked(study.get_trials())[0].number


def test_choose_on_a_missing_study_is_a_clear_error(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path}/none.db"
    assert choose.main(["--study-name", "x", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
