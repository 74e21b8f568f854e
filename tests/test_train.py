"""The trainer on the CPU: it learns, it stops cleanly, its checkpoints replay."""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import threading

import pytest
import torch

from models.presets import preset
from search.data import synthetic
from search.final import load_checkpoint, run_once, save_checkpoint
from search.trainer import (
    Normalize,
    Stopped,
    TrainConfig,
    TrainingDiverged,
    evaluate,
    lr_factor,
    rung_steps,
    train,
)

from conftest import ROOT

TINY = preset("resnet-tiny")


def test_lr_schedules_warm_up_then_decay() -> None:
    for kind in ("onecycle", "cosine"):
        f = [lr_factor(s, 100, 20, kind) for s in range(100)]
        assert f[0] == pytest.approx(0.05) and f[19] == pytest.approx(1.0)
        assert all(a >= b for a, b in itertools.pairwise(f[19:]))
        assert f[-1] < 0.05


def test_config_round_trip_and_validation() -> None:
    cfg = TrainConfig(optimizer="adamw", lr=1e-3, cutout=8, ema=0.1)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"momentum": 0.9})


def test_loss_falls_and_rungs_report_on_the_way() -> None:
    d = synthetic(n_train=1024, n_test=256)
    seen = []
    res = train(
        TINY,
        TrainConfig(images=3072, batch_size=128, lr=0.05),
        d.train_x,
        d.train_y,
        d.test_x,
        d.test_y,
        mean=d.mean,
        std=d.std,
        rungs=(0.25, 0.5, 1.0),
        on_eval=lambda s: seen.append((s.rung, s.images, s.step)),
    )
    losses = [h.train_loss for h in res.history]
    assert seen == [(1, 768, 6), (2, 1536, 12), (3, 3072, 24)]  # 24 steps of 128
    assert losses[-1] < 0.6 * losses[0]
    assert res.history[-1].val_acc > 0.8
    assert res.images_per_s > 0 and res.device == "cpu"


def test_length_is_images_seen_whatever_the_split_size() -> None:
    """A tiny split is passed over many times; a large one partly: the same steps."""
    for n in (256, 2048):
        d = synthetic(n_train=n, n_test=64)
        res = train(
            TINY,
            TrainConfig(images=1024, batch_size=64),
            d.train_x,
            d.train_y,
            mean=d.mean,
            std=d.std,
        )
        assert res.history[-1].step == 16
    assert rung_steps(16, (1 / 3, 2 / 3, 1.0)) == [5, 11, 16]
    with pytest.raises(ValueError, match="increasing fractions"):
        rung_steps(16, (0.5, 0.25))


def test_divergence_stops_cleanly() -> None:
    d = synthetic(n_train=512, n_test=64)
    cfg = TrainConfig(images=1536, batch_size=64, lr=1e12, warmup=0.0, weight_decay=0.0)
    with pytest.raises(TrainingDiverged, match="by step"):
        train(TINY, cfg, d.train_x, d.train_y, mean=d.mean, std=d.std)


def test_a_stop_request_ends_training_between_steps() -> None:
    d = synthetic(n_train=512, n_test=64)
    stop, steps = threading.Event(), []

    def on_step(step: int, _total: int, _loss: torch.Tensor) -> None:
        steps.append(step)
        if step == 3:
            stop.set()

    with pytest.raises(Stopped, match="step 3 of 16"):
        train(
            TINY,
            TrainConfig(images=1024, batch_size=64),
            d.train_x,
            d.train_y,
            mean=d.mean,
            std=d.std,
            on_step=on_step,
            stop=stop,
        )
    assert steps == [1, 2, 3]


def test_recipe_parts_change_training() -> None:
    """Each recipe part is wired in: with the same seed, switching it changes the result."""
    d = synthetic(n_train=512, n_test=128)
    base = TrainConfig(images=2560, batch_size=64)  # 40 steps: the EMA spans 2 of them
    kwargs = {"mean": d.mean, "std": d.std}

    def val_loss(cfg: TrainConfig) -> float:
        return (
            train(TINY, cfg, d.train_x, d.train_y, d.test_x, d.test_y, **kwargs)
            .history[-1]
            .val_loss
        )

    ref = val_loss(base)
    assert val_loss(base) == ref  # deterministic on the CPU
    for part in [{"ema": 0.0}, {"ema": 0.2}, {"tta": True}, {"zero_init": True}, {"bn_lr": 1.0}]:
        assert val_loss(TrainConfig(**base.to_dict() | part)) != ref, part


def test_augmentation_settings_are_used() -> None:
    d = synthetic(n_train=256, n_test=64)
    off = TrainConfig(images=256, batch_size=64, crop_padding=0, flip=False)
    on = TrainConfig(images=256, batch_size=64, crop_padding=4, flip=True, cutout=8)
    a = train(TINY, off, d.train_x, d.train_y, mean=d.mean, std=d.std).history[0].train_loss
    b = train(TINY, on, d.train_x, d.train_y, mean=d.mean, std=d.std).history[0].train_loss
    assert a != b  # same seed and data: only the augmentation differs


@pytest.mark.parametrize("recipe", [{}, {"ema": 0.0, "tta": True}])
def test_checkpoint_reproduces_the_recorded_test_accuracy(tmp_path, recipe) -> None:
    d = synthetic(n_train=512, n_test=256)
    cfg = TrainConfig(batch_size=128, **recipe)
    run, model = run_once(TINY, cfg, 2, d, torch.device("cpu"))
    save_checkpoint(tmp_path / "model.pt", model, TINY, d, run)
    loaded, ckpt = load_checkpoint(tmp_path / "model.pt")
    norm = Normalize(
        ckpt["normalization"]["mean"], ckpt["normalization"]["std"], torch.device("cpu")
    )
    loaded = loaded.to(memory_format=torch.channels_last)
    _, acc, _ = evaluate(loaded, d.test_x, d.test_y, norm, tta=cfg.tta)
    assert acc == run["test_accuracy"] == ckpt["test_accuracy"]
    assert sum(sum(r) for r in run["confusion_matrix"]) == 256
    assert [e["epoch"] for e in run["epochs"]] == [1, 2]


def test_train_cli_writes_result_and_checkpoint(tmp_path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "search.train",
            "resnet-tiny",
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--batch-size",
            "128",
            "--seeds",
            "2",
            "--no-progress",
            "-o",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "seed 1 epoch   1/1" in out.stdout and "over 2 seed(s)" in out.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["training"]["batch_size"] == 128 and result["dataset"] == "synthetic"
    accs = [r["test_accuracy"] for r in result["runs"]]
    assert result["seeds"] == [0, 1] and len(accs) == 2
    assert result["test_accuracy"] == pytest.approx(sum(accs) / 2)
    assert result["test_accuracy_std"] == pytest.approx(statistics.stdev(accs))
    for run in result["runs"]:
        ckpt = torch.load(run["checkpoint"], weights_only=True)
        assert ckpt["architecture"]["stages"][0]["channels"] == 32
        assert ckpt["seed"] == run["seed"] and ckpt["test_accuracy"] == run["test_accuracy"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope.json"], "not a preset"),
        (["examples/resnet18-2111.json", "--dataset", "synthetic", "--epochs", "0"], "epochs"),
        (["resnet-tiny", "--dataset", "nope"], "unknown dataset"),
        (["resnet-tiny", "--lr", "abc"], "invalid float"),
    ],
)
def test_train_cli_bad_input(args, message) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "search.train", *args], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2
    assert message in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_out_of_memory_is_a_distinct_error() -> None:
    from search.trainer import OutOfMemory

    d = synthetic(n_train=4096, n_test=64)
    big = preset("resnet18")
    with pytest.raises(OutOfMemory, match="batch size"):
        train(
            big,
            TrainConfig(images=4096 * 64, batch_size=4096 * 64),
            d.train_x.repeat(64, 1, 1, 1),
            d.train_y.repeat(64),
            mean=d.mean,
            std=d.std,
            device="cuda",
        )
