"""The trainer on the CPU: it learns, it stops cleanly, its checkpoints replay."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
import torch

from models import build_model
from models.presets import preset
from models.resnet import BasicBlock
from search import train as train_cli
from search.data import Dataset, Split, synthetic
from search.final import load_checkpoint, save_checkpoint, train_final
from search.trainer import (
    SCHEDULES,
    Normalize,
    Stopped,
    TrainConfig,
    TrainingDiverged,
    evaluate,
    initial_model,
    lr_schedule,
    make_optimizer,
    rung_steps,
    train,
)

from conftest import ROOT, SMALL


def train_only(d: Dataset) -> Split:
    """The training images alone: no evaluation."""
    return Split(d.train_x, d.train_y, d.mean, d.std)


def closed_form(step: int, total: int, warmup: int, schedule: str) -> float:
    """What the schedule must be: (step + 1) / warmup while warming up, then linear or
    cosine decay from the peak to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 1, 2, 20])
def test_lr_schedule_warms_up_linearly_then_decays_to_zero(schedule, warmup) -> None:
    """torch's schedulers, chained, give the closed form in every parameter group."""
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.3}])
    sched = lr_schedule(opt, 100, warmup, schedule)
    for step in range(100):
        want = closed_form(step, 100, warmup, schedule)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * want, 0.3 * want])
        opt.step()
        sched.step()


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
        preset("resnet-tiny"),  # it learns in 24 steps; SMALL needs more
        TrainConfig(images=3072, batch_size=128, lr=0.05),
        d.train_test,
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
        res = train(SMALL, TrainConfig(images=1024, batch_size=64), train_only(d))
        assert res.history[-1].step == 16
    assert rung_steps(16, (1 / 3, 2 / 3, 1.0)) == [5, 11, 16]
    with pytest.raises(ValueError, match="increasing fractions"):
        rung_steps(16, (0.5, 0.25))


def test_divergence_stops_cleanly() -> None:
    d = synthetic(n_train=512, n_test=64)
    cfg = TrainConfig(images=1536, batch_size=64, lr=1e12, warmup=0.0, weight_decay=0.0)
    with pytest.raises(TrainingDiverged, match="by step"):
        train(SMALL, cfg, train_only(d))


def test_a_stop_request_ends_training_between_steps() -> None:
    d = synthetic(n_train=512, n_test=64)
    stop, steps = threading.Event(), []

    def on_step(step: int, _total: int, _loss: torch.Tensor) -> None:
        steps.append(step)
        if step == 3:
            stop.set()

    with pytest.raises(Stopped, match="step 3 of 16"):
        train(
            SMALL,
            TrainConfig(images=1024, batch_size=64),
            train_only(d),
            on_step=on_step,
            stop=stop,
        )
    assert steps == [1, 2, 3]


def test_bn_lr_puts_batchnorm_and_biases_at_a_multiple_without_decay() -> None:
    model = build_model(SMALL)
    opt = make_optimizer(model, TrainConfig(lr=0.1, bn_lr=3.0, weight_decay=5e-4))
    decay, no_decay = opt.param_groups
    assert (decay["lr"], decay["weight_decay"]) == (0.1, 5e-4)
    assert no_decay["lr"] == pytest.approx(0.3) and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def last_batchnorms(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.body[-1].weight for b in model.modules() if isinstance(b, BasicBlock)]


def test_zero_init_starts_every_block_as_the_identity() -> None:
    on = initial_model(SMALL, TrainConfig(zero_init=True), torch.device("cpu"))
    off = initial_model(SMALL, TrainConfig(zero_init=False), torch.device("cpu"))
    assert last_batchnorms(on) and all((w == 0).all() for w in last_batchnorms(on))
    assert all((w == 1).all() for w in last_batchnorms(off))


def test_tta_averages_the_logits_of_each_image_and_its_mirror() -> None:
    d = synthetic(n_train=64, n_test=64)
    model = initial_model(SMALL, TrainConfig(), torch.device("cpu")).eval()
    norm = Normalize(d.mean, d.std, torch.device("cpu"))
    with torch.no_grad():
        x = norm(d.test_x)
        both = (model(x) + model(x.flip(3))) / 2
    loss, acc, pred = evaluate(model, d.test_x, d.test_y, norm, tta=True, batch_size=16)
    assert torch.equal(pred, both.argmax(1))
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(both, d.test_y).item(), 1e-5)
    assert acc == pytest.approx((pred == d.test_y).float().mean().item())


def test_the_evaluated_model_is_an_ema_of_the_weights(monkeypatch) -> None:
    """ema = f: the evaluated copy averages the weights from their initial values with
    decay min(1 - 1/(f * steps), (1 + step) / (10 + step)); its BatchNorm statistics are
    the trained model's (averaging them measured worse)."""
    import search.trainer as trainer

    d = synthetic(n_train=512, n_test=64)
    cfg = TrainConfig(images=1280, batch_size=64, ema=0.2)  # 20 steps, the EMA spans 4
    built, real, first = [], trainer.initial_model, []

    def initial_model(*args):
        built.append(real(*args))
        first.append(built[-1].stem[0].weight.detach().clone())
        return built[-1]

    monkeypatch.setattr(trainer, "initial_model", initial_model)
    seen: list[torch.Tensor] = []
    on_step = lambda *_: seen.append(built[0].stem[0].weight.detach().clone())  # noqa: E731
    res = train(SMALL, cfg, train_only(d), on_step=on_step)
    max_decay, ema = 1 - 1 / (0.2 * 20), first[0]
    for step, now in enumerate(seen):
        decay = min(max_decay, (1 + step) / (10 + step))
        ema = decay * ema + (1 - decay) * now
    assert torch.allclose(res.model.stem[0].weight, ema, atol=1e-6)
    assert not torch.allclose(res.model.stem[0].weight, seen[-1], atol=1e-4)
    trained_bn, evaluated_bn = built[0].stem[1], res.model.stem[1]
    assert torch.equal(evaluated_bn.running_mean, trained_bn.running_mean)
    assert torch.equal(evaluated_bn.running_var, trained_bn.running_var)
    assert train(SMALL, replace(cfg, ema=0.0), train_only(d)).model is built[-1]


def test_tta_setting_reaches_the_evaluation(monkeypatch) -> None:
    import search.trainer as trainer

    seen, real = [], trainer.evaluate

    def evaluate(*args, **kwargs):
        seen.append(kwargs["tta"])
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    d = synthetic(n_train=256, n_test=64)
    for tta in (True, False):
        train(SMALL, TrainConfig(images=128, batch_size=64, tta=tta), d.train_test)
    assert seen == [True, False]


def test_augmentation_settings_reach_the_augmentation(monkeypatch) -> None:
    import search.trainer as trainer

    calls, real = [], trainer.augment

    def augment(x, g, padding, flip, cutout):
        calls.append((padding, flip, cutout))
        return real(x, g, padding, flip, cutout)

    monkeypatch.setattr(trainer, "augment", augment)
    d = synthetic(n_train=256, n_test=64)
    cfg = TrainConfig(images=256, batch_size=64, crop_padding=3, flip=False, cutout=8)
    train(SMALL, cfg, train_only(d))
    assert calls == [(3, False, 8)] * 4


@pytest.mark.parametrize("recipe", [{}, {"ema": 0.0, "tta": True}])
def test_checkpoint_reproduces_the_recorded_test_accuracy(tmp_path, recipe) -> None:
    d = synthetic(n_train=512, n_test=256)
    cfg = TrainConfig(batch_size=128, **recipe)
    run, model = train_final(SMALL, cfg, 2, d, torch.device("cpu"))
    save_checkpoint(tmp_path / "model.pt", model, SMALL, d, run)
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
    arch = tmp_path / "small.json"
    arch.write_text(json.dumps(SMALL.to_dict()))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "search.train",
            str(arch),
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
        assert ckpt["architecture"]["stages"][0]["channels"] == 16
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
def test_train_cli_bad_input(args, message, capsys, monkeypatch) -> None:
    """In-process (the subprocess smoke test is above): one line, exit code 2."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(train_cli.main(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_out_of_memory_is_a_distinct_error() -> None:
    from search.trainer import OutOfMemory

    d = synthetic(n_train=4096, n_test=64)
    big = preset("resnet18")
    with pytest.raises(OutOfMemory, match="batch size"):
        big_split = Split(d.train_x.repeat(64, 1, 1, 1), d.train_y.repeat(64), d.mean, d.std)
        train(big, TrainConfig(images=4096 * 64, batch_size=4096 * 64), big_split, device="cuda")
