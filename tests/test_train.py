"""The trainer on the CPU: it learns, it stops cleanly, its checkpoints replay."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from models.presets import preset
from search.data import synthetic
from search.train import (
    Normalize,
    TrainConfig,
    TrainingDiverged,
    evaluate,
    final_training,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
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
    cfg = TrainConfig(optimizer="adamw", lr=1e-3, cutout=8)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"momentum": 0.9})


def test_loss_falls_on_synthetic_data() -> None:
    d = synthetic(n_train=1024, n_test=256)
    seen = []
    res = train(
        TINY,
        TrainConfig(epochs=3, batch_size=128, lr=0.05),
        d.train_x,
        d.train_y,
        d.test_x,
        d.test_y,
        mean=d.mean,
        std=d.std,
        on_epoch=lambda s, _m: seen.append(s.epoch),
    )
    losses = [h.train_loss for h in res.history]
    assert seen == [1, 2, 3]
    assert losses[-1] < 0.6 * losses[0]
    assert res.history[-1].val_acc > 0.8
    assert res.images_per_s > 0 and res.device == "cpu"


def test_divergence_stops_cleanly() -> None:
    d = synthetic(n_train=512, n_test=64)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e12, warmup=0.0, weight_decay=0.0)
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        train(TINY, cfg, d.train_x, d.train_y, mean=d.mean, std=d.std)


def test_augmentation_settings_are_used() -> None:
    d = synthetic(n_train=256, n_test=64)
    off = TrainConfig(epochs=1, batch_size=64, crop_padding=0, flip=False)
    on = TrainConfig(epochs=1, batch_size=64, crop_padding=4, flip=True, cutout=8)
    a = train(TINY, off, d.train_x, d.train_y, mean=d.mean, std=d.std).history[0].train_loss
    b = train(TINY, on, d.train_x, d.train_y, mean=d.mean, std=d.std).history[0].train_loss
    assert a != b  # same seed and data: only the augmentation differs


def test_checkpoint_reproduces_the_recorded_test_accuracy(tmp_path) -> None:
    d = synthetic(n_train=512, n_test=256)
    result, model = final_training(
        TINY, TrainConfig(epochs=1, batch_size=128), d, torch.device("cpu")
    )
    save_checkpoint(tmp_path / "model.pt", model, TINY, result)
    loaded, ckpt = load_checkpoint(tmp_path / "model.pt")
    norm = Normalize(
        ckpt["normalization"]["mean"],
        ckpt["normalization"]["std"],
        torch.device("cpu"),
        torch.channels_last,
    )
    _, acc, _ = evaluate(loaded.to(memory_format=torch.channels_last), d.test_x, d.test_y, norm)
    assert acc == result["test_accuracy"] == ckpt["test_accuracy"]
    assert sum(sum(r) for r in result["confusion_matrix"]) == 256
    assert len(result["epochs"]) == 1 and result["params"] == 308_650


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
            "-o",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "epoch   1/1" in out.stdout and "test accuracy" in out.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["training"]["batch_size"] == 128 and result["dataset"] == "synthetic"
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert ckpt["architecture"]["stages"][0]["channels"] == 32


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
    from search.train import OutOfMemory

    d = synthetic(n_train=4096, n_test=64)
    big = preset("resnet18")
    with pytest.raises(OutOfMemory, match="batch size"):
        train(
            big,
            TrainConfig(epochs=1, batch_size=4096 * 64),
            d.train_x.repeat(64, 1, 1, 1),
            d.train_y.repeat(64),
            mean=d.mean,
            std=d.std,
            device="cuda",
        )
