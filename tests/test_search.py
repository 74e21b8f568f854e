"""The search loop and search.run end to end on synthetic data, in temporary SQLite studies."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import statistics
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState

from models import build_model, count_params, load_arch
from models.complexity import count_activation_bytes, count_bytes
from models.presets import PRESETS, preset
from search import cli, export, replay, run, space
from search import train as train_cli
from search.data import load_dataset, search_split, synthetic
from search.limits import Limits, over
from search.profile import Profile
from search.records import counts, trial_arch
from search.sampler import TrainedStartup, make_sampler
from search.signals import Stop
from search.slots import Slots, is_trained
from search.study import make_pruner, open_study
from search.trainer import TrainConfig
from search.worker import Search, run_worker

from conftest import FAST_SEARCH, ROOT

FAST = FAST_SEARCH


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/study.db"


def small_search(budget: int = 5_000_000, images: int = 1536, macs: int | None = None) -> Search:
    data = search_split(synthetic(n_train=1024, n_test=64), 0, train_images=512, val_images=256)
    profile = Profile("test", images, (1 / 3, 2 / 3, 1.0), min_steps=8, batch_sizes=(64, 128))
    return Search(data, Limits(budget, macs), profile, 0, torch.device("cpu"))


def loop(study: optuna.Study, search: Search, trials: int) -> str:
    return run_worker(study, search, Slots(study, trials, None), Stop(), url=None)


def test_short_search_completes_and_exports(finished) -> None:
    out = finished.out
    assert finished.rc == 0, out
    study = open_study(finished.url, finished.name, create=False)
    c = counts(study.trials)
    assert c["trained"] == 6 and c["running"] == 0
    assert "not enqueued: resnet18: it does not fit" in out  # 11.2M, over the 5M budget
    assert study.trials[0].user_attrs["preset"] == "resnet-tiny"
    assert trial_arch(study.trials[0]) == preset("resnet-tiny")
    assert "6 trained" in out and "best architecture" in out
    assert re.search(r"a full trial takes about \d+ s on this CPU", out)  # said before it starts
    folder = finished.cwd / "studies" / finished.name
    best = json.loads((folder / "best.json").read_text())
    spec = load_arch(folder / "best.json")
    assert (
        best["params"]
        == count_params(spec)
        == sum(p.numel() for p in build_model(spec).parameters())
    )
    assert best["study_name"] == finished.name and best["dataset"] == "synthetic"
    assert best["search_seed"] == 1 and isinstance(best["sampler_seed"], int)
    assert best["validation"]["accuracy"] == study.best_value
    assert {"training", "macs", "bytes", "seed", "versions", "trial"} <= set(best)
    # The horizon: the final training the choice is for, said at the start and the end,
    # recorded in the export, and what the printed next command trains for.
    n = len(load_dataset("synthetic").train_y)
    assert best["horizon"] == {"epochs": 30, "train_images": n, "images": 30 * n}
    assert f"horizon: a final training of 30 epochs of the {n:,} training images" in out
    next_line = out[out.index("next: ") :]
    assert "--epochs 30 --seeds 3" in next_line.splitlines()[0]
    assert f"3 run(s) of 30 epochs x {n:,} images" in next_line and "images/s" in next_line


def test_the_horizon_is_the_study_s_until_given_and_search_train_s_default(
    finished, tmp_path, capsys
) -> None:
    args = [*FAST, "--study-name", "h", "--storage", storage(tmp_path), "--trials", "1"]
    assert run.main([*args, "--horizon", "2"]) == 0
    study = open_study(storage(tmp_path), "h", create=False)
    assert study.user_attrs["horizon"]["epochs"] == 2
    assert run.main(args) == 0  # a resume without --horizon keeps the study's
    assert "horizon: a final training of 2 epochs" in capsys.readouterr().out
    # search.train trains an export for its horizon by default, and says the cost first.
    best = json.loads((finished.cwd / "studies" / finished.name / "best.json").read_text())
    best["horizon"] = best["horizon"] | {"epochs": 1}
    (tmp_path / "best.json").write_text(json.dumps(best))
    argv = [str(tmp_path / "best.json"), "--no-progress", "-o", str(tmp_path / "final")]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "final" / "result.json").read_text())["epochs"] == 1
    n = len(load_dataset("synthetic").train_y)
    cost = f"final training: 1 run(s) of 1 epochs x {n:,} images ({n:,} images a run), about"
    assert cost in out and out.index(cost) < out.index("epoch   1/1")


def test_resume_continues_and_refuses_other_settings(in_tmp, capsys) -> None:
    args = [*FAST, "--study-name", "r", "--storage", storage(in_tmp)]
    assert run.main([*args, "--trials", "2"]) == 0
    assert run.main([*args, "--trials", "4"]) == 0
    assert "2 trained so far" in capsys.readouterr().out
    study = open_study(storage(in_tmp), "r", create=False)
    assert counts(study.trials)["trained"] == 4
    # Another budget is another experiment: refused, not mixed in.
    assert run.main([*args, "--trials", "5", "--budget", "1M"]) == 2
    assert "different settings" in capsys.readouterr().err
    # Another seed chooses another validation split: refused, naming both seeds.
    assert run.main([*args, "--trials", "5", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "--seed 1" in err and "--seed 7" in err and err.count("\n") == 1


def test_over_the_limits_is_rejected_before_anything_else(monkeypatch) -> None:
    def no_build(*_a, **_k):
        raise AssertionError("a model was built for a rejected candidate")

    monkeypatch.setattr("search.trainer.build_model", no_build)
    monkeypatch.setattr("search.worker.train", no_build)
    search = small_search(budget=100_000)
    heavy = {"stages": 4, "growth": 2.0, "pool_div": 1, "stem_kernel": 3, "activation": "relu"}
    heavy |= {"dropout": 0.0, "width_frac": 0.0}
    for i in range(1, 5):
        heavy |= {f"blocks_{i}": 4, f"kernel_{i}": 7, f"skip_kernel_{i}": 3}
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(heavy)
    monkeypatch.setattr("search.worker.MAX_CONSECUTIVE_REJECTIONS", 1)
    assert loop(study, search, trials=1) == "gave up"
    t = study.trials[0]
    assert t.state == TrialState.PRUNED and t.user_attrs["params"] > 100_000
    assert t.user_attrs["rejected"].startswith("over the limit: params ")
    assert t.constraints["params"] == pytest.approx((t.user_attrs["params"] - 100_000) / 100_000)
    # The training settings were never sampled: a rejection teaches sizes, not learning rates.
    assert not {"optimizer", "batch_size", "lr_sgd", "lr_adamw"} & set(t.params)


def test_the_space_rarely_proposes_what_cannot_fit() -> None:
    """Width is sampled from what fits: a candidate is over the limits only when even
    its narrowest width is, far fewer than with a width drawn blindly, and every width
    that fits stays reachable."""
    limits, shape = Limits(1_000_000, 40_000_000), (1, 28, 10)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rng = random.Random(0)
    fits = blind_fits = 0
    for _ in range(300):
        trial = study.ask()
        spec = space.suggest_arch(trial, shape, limits)
        fits += limits.fits(spec)
        assert limits.fits(spec) or spec.stem_channels == space.WIDTH_MIN
        width = rng.randrange(space.WIDTH_MIN, space.WIDTH_MAX + 1, space.WIDTH_STEP)
        blind_fits += limits.fits(space._with_width(trial.params, spec, width))
        study.tell(trial, 0.0)
    assert fits > 1.5 * blind_fits
    tiny = preset("resnet-tiny", *shape)
    params = space.preset_params(tiny, limits)
    reached = {
        space.suggest_arch(
            optuna.trial.FixedTrial(params | {"width_frac": i / 100}), shape, limits
        ).stem_channels
        for i in range(101)
    }
    widest = space.widest(lambda w: space._with_width(params, tiny, w), limits)
    assert reached == set(range(space.WIDTH_MIN, widest + 1, space.WIDTH_STEP))


def test_a_trained_startup_is_not_shortened_by_rejected_candidates() -> None:
    """By default, until `startup` candidates were trained the sampler draws exactly
    what RandomSampler draws, however many were rejected; after, TPE."""

    def draws(sampler: optuna.samplers.BaseSampler, n: int, rejected: set[int]) -> list[float]:
        study = optuna.create_study(sampler=sampler)
        out = []
        for i in range(n):
            trial = study.ask()
            out.append(trial.suggest_float("x", 0.0, 1.0))
            if i in rejected:  # the gate's way: marked, told PRUNED, no intermediate value
                trial.set_user_attr("rejected", "over the limit")
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, (out[-1] - 0.3) ** 2)
        return out

    rejected = set(range(0, 24, 2))  # every other of the first 24: 12 trained by then
    ours = draws(make_sampler(7, startup=12), 40, rejected)
    plain = draws(optuna.samplers.RandomSampler(seed=7), 40, rejected)
    assert ours[:24] == plain[:24]  # 24 asks, 12 trained: still random

    def off_by(xs: list[float]) -> float:  # median distance from the optimum, 0.3
        return statistics.median(abs(x - 0.3) for x in xs)

    # Then TPE: it draws near the optimum, where random draws spread over [0, 1].
    assert off_by(ours[24:]) < off_by(plain[24:]) / 2
    # Optuna's count: TPE from the 12th ask, after 6 trained candidates.
    asks = draws(make_sampler(7, startup=12, trained_only=False), 40, rejected)
    assert asks[:12] == plain[:12] and off_by(asks[12:24]) < off_by(plain[12:24]) / 2


def test_the_random_start_trains_its_first_candidates_with_the_start_settings() -> None:
    """The first `start_candidates` trials given training settings (past the gate) get
    the start settings, the batch size fitted to the profile; rejected trials (no
    training settings) do not count; later ones are drawn at random."""
    profile = Profile("p", 24_000, (0.5, 1.0), min_steps=100, batch_sizes=(32, 64, 128))
    start = TrainConfig(lr=0.05, batch_size=256, crop_padding=0, flip=False)
    study = optuna.create_study(sampler=TrainedStartup(3, startup=10, start=start,
                                                       start_candidates=2))  # fmt: skip
    given = []
    for i in range(8):
        trial = study.ask()
        trial.suggest_int("stages", 1, 3)  # the architecture: drawn at random throughout
        if i in (0, 2):  # rejected by the gate: no training settings
            study.tell(trial, state=TrialState.PRUNED)
            continue
        given.append(space.suggest_training(trial, profile, 20_000, 0))
        study.tell(trial, 0.5)
    want = dataclasses.replace(start, images=profile.images, batch_size=128)
    assert given[:2] == [want, want]
    assert all(cfg != want for cfg in given[2:])
    assert len({cfg.lr for cfg in given[2:]}) == len(given) - 2  # drawn, not fixed
    # Off: the random start draws every setting.
    off = optuna.create_study(sampler=TrainedStartup(3, start=None))
    trial = off.ask()
    assert space.suggest_training(trial, profile, 20_000, 0) != want


def test_batch_sizes_fit_the_trial_length_and_the_print_says_what_they_give() -> None:
    p = Profile("p", 24_000, (0.5, 1.0), min_steps=250, batch_sizes=(32, 64, 96, 128))
    assert p.batch_choices(20_000) == (32, 64, 96)  # 128 leaves only 187 steps
    assert p.batch_choices(200) == (32,)  # 64 would be fewer than 4 batches per pass
    assert "(>= 250 steps)" in p.describe(20_000)
    short = p.override(images=4_000)  # no batch size leaves 250 steps: the smallest runs
    assert short.batch_choices(20_000) == (32,)
    assert "batch sizes [32] (125 steps)" in short.describe(20_000)
    assert short.name == "p+custom"


@pytest.mark.parametrize(
    ("kind", "rule"), [("median", "MedianPruner"), ("percentile", "PercentilePruner")]
)
def test_clearly_worse_trial_is_pruned_after_the_startup_trials(kind, rule) -> None:
    search = small_search(images=1024)
    pruner = make_pruner(kind, search.profile.rung_images(), startup=2)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    arch = space.preset_params(preset("resnet-tiny"), search.limits)
    good = space.training_params(TrainConfig(batch_size=64, lr=0.1))
    for _ in range(2):
        study.enqueue_trial(arch | good)
    # Same network at the smallest learning rate of the space.
    study.enqueue_trial(arch | space.training_params(TrainConfig(batch_size=128, lr=0.01)))
    loop(study, search, trials=3)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert study.trials[2].user_attrs["pruned"].startswith(f"{rule} at 341 images")
    assert list(study.trials[2].intermediate_values) == [341]


class PruneAll(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_the_last_rung_is_never_pruned_since_the_work_is_done() -> None:
    search = small_search(images=384)
    study = optuna.create_study(direction="maximize", pruner=PruneAll())
    study.enqueue_trial(space.preset_params(preset("resnet-tiny"), search.limits))
    loop(study, search, trials=1)
    assert list(study.trials[0].intermediate_values) == [128]  # stopped at the first rung
    one_rung = Profile("one rung", 256, (1.0,), min_steps=4, batch_sizes=(64,))
    study = optuna.create_study(direction="maximize", pruner=PruneAll())
    loop(study, dataclasses.replace(search, profile=one_rung), trials=1)
    trained = [t for t in study.trials if is_trained(t)]
    assert [t.state for t in trained] == [TrialState.COMPLETE]


def test_every_preset_is_a_point_of_the_space() -> None:
    limits = Limits(10**12)
    for name in PRESETS:
        for shape in [(3, 32, 10), (1, 28, 10)]:
            spec = preset(name, *shape)
            params = space.preset_params(spec, limits)
            assert space.suggest_arch(optuna.trial.FixedTrial(params), shape, limits) == spec


def test_export_cli_by_trial_number(finished, tmp_path, capsys) -> None:
    study = open_study(finished.url, finished.name, create=False)
    number = next(t.number for t in study.trials if t.state == TrialState.COMPLETE)
    out = tmp_path / "t.json"
    where = ["--storage", finished.url, "--study-name"]
    assert export.main([*where, finished.name, "--trial", str(number), "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["trial"] == number
    assert count_params(load_arch(out)) == data["params"]
    assert export.main([*where, "nope"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_replay_recomputes_the_stored_accuracy_exactly(finished, capsys) -> None:
    study = open_study(finished.url, finished.name, create=False)
    trained = [t for t in study.trials if is_trained(t)]
    where = ["--storage", finished.url, "--study-name", finished.name]
    for t in trained[:2]:
        assert replay.main([*where, "--trial", str(t.number), "--device", "cpu"]) == 0
        assert "equal: the trial replays exactly" in capsys.readouterr().out
    assert replay.main([*where, "--trial", "999"]) == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "lots"], "not a size"),
        (["--trials", "0"], "--trials must be at least 1"),
        (["--enqueue", "resnet99"], "invalid choice: 'resnet99'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--budget", "1k"], "nothing in the search space fits"),
        (["--max-bytes", "10 parsecs"], "not a size"),
        (["--device", "tpu"], "unknown device 'tpu'"),
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


def test_counts_and_sizes_as_people_write_them() -> None:
    counts_ = ["5000000", "5e6", "5M", "4.5m", "500k", "1G"]
    assert [cli.parse_count(s) for s in counts_] == [
        5_000_000,
        5_000_000,
        5_000_000,
        4_500_000,
        500_000,
        1_000_000_000,
    ]
    sizes = ["10MB", "10MiB", "500kB", "2e7", "1.5GB", "64 B"]
    assert [cli.parse_bytes(s) for s in sizes] == [
        10_000_000,
        10 * 2**20,
        500_000,
        20_000_000,
        1_500_000_000,
        64,
    ]


OOM_SCRIPT = """
import resource, json, optuna, torch
from models.presets import preset
from search import space
from search.data import load_dataset, search_split, synthetic
from search.limits import Limits, over
from search.profile import Profile
from search.signals import Stop
from search.slots import Slots
from search.trainer import TrainConfig
from search.worker import Search, run_worker

def vm(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) * 1024

data = search_split(synthetic(n_train=4700, n_test=64), 0, val_images=64)
profile = Profile("t", 2048, (1.0,), min_steps=1, batch_sizes=(1024, 64))
search = Search(data, Limits(10**12), profile, 0, torch.device("cpu"))
study = optuna.create_study(direction="maximize")
big = space.preset_params(preset("resnet18"), search.limits)
study.enqueue_trial(big | space.training_params(TrainConfig(batch_size=1024)))
small = space.preset_params(preset("resnet-tiny"), search.limits)
study.enqueue_trial(small | space.training_params(TrainConfig(batch_size=64)))
# The address space this process may use: what it has now and 1.5 GB more.
limit = vm("VmSize") + 1_500_000_000
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
def live_tensor_bytes():
    import gc
    gc.collect()
    return sum(o.untyped_storage().nbytes() for o in gc.get_objects() if torch.is_tensor(o))

before, after = live_tensor_bytes(), []
run_worker(study, search, Slots(study, 2, None), Stop(), url=None,
           on_tell=lambda s, t: after.append(live_tensor_bytes()))
t0, t1 = study.trials[:2]
print(json.dumps({"states": [t0.state.name, t1.state.name],
                  "rejected": t0.user_attrs.get("rejected", ""),
                  "constraints": t0.constraints, "trained": len(study.trials),
                  "growth_after_oom": after[0] - before}))
"""


@pytest.mark.slow  # the default run injects the failure (test_faults); this one is real
def test_out_of_memory_is_a_constraint_and_the_study_goes_on() -> None:
    """A real allocation failure: the process's address space is capped below what a
    ResNet-18 at batch 1024 needs; the candidate after it trains in the freed memory."""
    out = subprocess.run(
        [sys.executable, "-c", OOM_SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["states"] == ["PRUNED", "COMPLETE"], r
    assert r["rejected"].startswith("out of memory on cpu at batch size 1024")
    assert r["constraints"]["memory"] == 1.0
    assert r["growth_after_oom"] < 1_000_000  # nothing of the failed run is held on to


def test_max_bytes_gates_like_the_budget(in_tmp, capsys) -> None:
    url = storage(in_tmp)
    args = [*FAST, "--trials", "4", "--study-name", "b", "--storage", url]
    assert run.main([*args, "--max-bytes", "40kB", "--weight-dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    study = open_study(url, "b", create=False)
    trained = [t for t in study.trials if is_trained(t)]
    assert len(trained) == 4
    assert all(count_bytes(trial_arch(t), "fp16") <= 40_000 for t in trained)
    over = [t for t in study.trials if t.constraints.get("bytes", 0) > 0]
    assert over and all("rejected" in t.user_attrs and "optimizer" not in t.params for t in over)
    assert f"{len(over)} over bytes" in out


def test_max_activation_bytes_is_a_limit_like_the_others(in_tmp, capsys) -> None:
    """The peak of activations is recorded on every candidate and is a constraint for
    the sampler; the width is fitted under it (as under the budget), and what is over
    it is rejected before anything is built."""
    url = storage(in_tmp)
    args = [*FAST, "--trials", "3", "--study-name", "a", "--storage", url]
    assert run.main([*args, "--max-activation-bytes", "300kB"]) == 0
    assert "at most 300,000 bytes of fp32 activations" in capsys.readouterr().out
    study = open_study(url, "a", create=False)
    trained = [t for t in study.trials if is_trained(t)]
    assert len(trained) == 3
    for t in study.trials:
        assert t.user_attrs["activation_bytes"] == count_activation_bytes(trial_arch(t))
        assert "activation_bytes" in t.constraints
    assert all(t.user_attrs["activation_bytes"] <= 300_000 for t in trained)
    assert study.user_attrs["settings"]["max_activation_bytes"] == 300_000
    limits = Limits(5_000_000, activation_bytes=300_000)
    wide = PRESETS["resnet18-2111"]  # 786,432 bytes of fp32 activations
    assert not limits.fits(wide)
    assert over(limits, limits.measure(wide)) == (
        "over the limit: activation_bytes 786,432 > 300,000"
    )


def test_train_the_top_k_of_a_study_chooses_on_validation(finished, tmp_path, capsys) -> None:
    argv = ["--study-name", finished.name, "--storage", finished.url, "--top", "2"]
    argv += ["--seeds", "1", "--epochs", "1", "--no-progress", "-o", str(tmp_path / "top")]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "top" / "result.json").read_text())
    ranking = result["selection"]
    assert len(ranking) == 2 and ranking[0]["val_mean"] >= ranking[1]["val_mean"]
    assert result["chosen"] == ranking[0]["name"] and len(ranking[0]["validation"]) == 1
    assert result["seeds"] == [0] and len(result["runs"]) == 1  # test split: chosen only
    assert "1. trial" in out and "test accuracy" in out


def test_printed_commands_name_the_venv_unless_path_finds_it(tmp_path, monkeypatch) -> None:
    """A venv's python links to the base interpreter, which lacks the project: only the
    venv's own path (or PATH finding exactly it) runs the printed resume command."""
    import os
    import sys

    from search.cli import tool

    base, venv = tmp_path / "base" / "bin", tmp_path / "venv" / "bin"
    base.mkdir(parents=True)
    venv.mkdir(parents=True)
    (base / "python").symlink_to(sys.executable)
    (venv / "python").symlink_to(base / "python")
    dashboard = venv / "optuna-dashboard"
    dashboard.write_text("#!/bin/sh\n")
    dashboard.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(base))  # python on PATH is the same binary, resolved
    assert tool("python") == os.path.join("venv", "bin", "python")
    assert tool("optuna-dashboard") == os.path.join("venv", "bin", "optuna-dashboard")
    monkeypatch.setenv("PATH", f"{venv}{os.pathsep}{base}")  # an activated venv
    assert (tool("python"), tool("optuna-dashboard")) == ("python", "optuna-dashboard")
    dashboard.unlink()
    monkeypatch.setenv("PATH", str(base))
    assert tool("optuna-dashboard") == "optuna-dashboard"  # not installed: its bare name
