"""The trainer's CUDA-only branches, run on the CPU where torch can run them.

A GPU may be lent for minutes at a time: those minutes must measure the CUDA
path, not debug it. bf16 autocast, the fused optimizers, channels_last, the
fixed-shape evaluation and the one-gather augmentation all run here, on the
CPU, in the default test run. What only a GPU can run (cudnn.benchmark, CUDA's
own out-of-memory error, the device synchronisation at each rung, CUDA graphs) carries the
`gpu` marker; the out-of-memory-as-constraint path runs here through an
injected allocation failure (tests/test_faults.py).
"""

from __future__ import annotations

import pytest
import torch

import search.trainer as trainer
from models import build_model
from search.data import Split, augment, random_crop, random_flip, synthetic
from search.trainer import Normalize, TrainConfig, evaluate, initial_model, make_optimizer, train

from conftest import SMALL


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("padding", [0, 2, 4])
def test_crop_and_flip_in_one_pair_of_gathers_equal_crop_then_flip(padding, flip) -> None:
    """The mirror folded into the crop's column index: the same images from the same
    random draws as cropping, then flipping (the augmentation before the change)."""
    x = torch.randint(0, 256, (64, 3, 12, 10), dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    old = random_crop(x, padding, g1)
    if flip:
        old = random_flip(old, g1)
    new = augment(x, g2, padding, flip, 0)
    assert torch.equal(new, old)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_bf16_autocast_branch_trains_on_the_cpu() -> None:
    """The CUDA default, bf16 autocast, forced on the CPU: the convolutions run in bf16,
    BatchNorm keeps fp32 weights, the run learns."""
    d = synthetic(n_train=512, n_test=256)
    dtypes = []
    real = trainer.initial_model

    def spying(spec, cfg, device):
        model = real(spec, cfg, device)
        model.stem[0].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
        return model

    trainer.initial_model = spying
    try:
        res = train(
            SMALL, TrainConfig(images=2048, batch_size=64, lr=0.05), d.train_test, bf16=True
        )
    finally:
        trainer.initial_model = real
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    assert res.history[-1].val_acc > 0.5  # 10 classes: chance is 0.1


def test_one_autocast_context_serves_the_whole_run(monkeypatch) -> None:
    """Building a torch.autocast checks the device's bf16 support (a CUDA query): once
    per run, not once per step and per evaluation."""
    made, real = [], trainer.autocast
    monkeypatch.setattr(trainer, "autocast", lambda *a, **k: made.append(a) or real(*a, **k))
    d = synthetic(n_train=256, n_test=64)
    train(SMALL, TrainConfig(images=512, batch_size=64), d.train_test, rungs=(0.5, 1.0))
    assert len(made) == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_optimizer_matches_the_unfused_one(optimizer) -> None:
    """The fused update (CUDA's default) is the same step as the unfused one, given the
    same gradients. (With each model computing its own, the two updates' last-bit
    rounding fed back through the next gradients, and AdamW turns a near-zero
    gradient's difference into one of the order of its learning rate: on one input
    that failed 6 runs of 6 with 1 thread, the xdist workers' setting.)"""
    import copy

    cfg = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = x.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    model = build_model(SMALL).to(memory_format=torch.channels_last)
    models = [model, copy.deepcopy(model)]
    opts = [make_optimizer(m, cfg, fused=f) for m, f in zip(models, (True, False), strict=True)]
    assert opts[0].defaults.get("fused") is True and opts[1].defaults.get("fused") is None
    for _ in range(3):
        for opt in opts:
            opt.zero_grad()
        models[0](x).logsumexp(1).mean().backward()
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # an AdamW step: ~3e-3


def test_the_model_and_its_input_are_channels_last() -> None:
    """channels_last feeds Tensor Cores on CUDA; the trainer builds it on every device."""
    model = initial_model(SMALL, TrainConfig(), torch.device("cpu"))
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    norm = Normalize((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    x = norm(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32


def test_a_fixed_shape_evaluation_gives_the_ragged_ones_result() -> None:
    """The ragged last batch padded to the batch size (so cudnn.benchmark tunes one shape):
    the padding never reaches the loss, the accuracy or the predictions."""
    d = synthetic(n_train=64, n_test=300)
    model = build_model(SMALL).to(memory_format=torch.channels_last).eval()
    norm = Normalize(d.mean, d.std, torch.device("cpu"))
    split = Split(d.train_x, d.train_y, d.mean, d.std, d.test_x, d.test_y)
    for tta in (False, True):
        ragged = evaluate(model, split.eval_x, split.eval_y, norm, tta, 128, fixed_shape=False)
        fixed = evaluate(model, split.eval_x, split.eval_y, norm, tta, 128, fixed_shape=True)
        assert len(fixed[2]) == 300 and torch.equal(fixed[2], ragged[2])
        assert fixed[1] == ragged[1]
        assert fixed[0] == pytest.approx(ragged[0], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: cudnn, bf16 on the GPU")
def test_a_cuda_trial_learns_and_agrees_with_the_cpu() -> None:
    """The same candidate, data and seed on the GPU (bf16, fused, cudnn.benchmark) and on
    the CPU (fp32): both learn, to accuracies a few points apart at most."""
    d = synthetic(n_train=2048, n_test=512)
    cfg = TrainConfig(images=8192, batch_size=128, lr=0.05)
    gpu = train(SMALL, cfg, d.train_test, device="cuda")
    cpu = train(SMALL, cfg, d.train_test, device="cpu")
    assert gpu.device.startswith("cuda") and gpu.history[-1].val_acc > 0.8
    assert abs(gpu.history[-1].val_acc - cpu.history[-1].val_acc) <= 0.05


def test_workers_per_gpu_share_each_gpu_its_memory_and_the_cores(monkeypatch, tmp_path) -> None:
    """4 workers on the 2 GPUs a scheduler handed out ("2,3"): two on each, each told it
    shares its GPU with one other; threads are the cores divided, as on the CPU."""
    from search import launch

    started = []
    monkeypatch.setattr(
        launch.subprocess, "Popen", lambda cmd, env, **_: started.append((cmd, env))
    )
    monkeypatch.setattr(launch, "cpu_cores", lambda: 16)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    argv = ["--workers-per-gpu", "2", "--storage", "sqlite:///s.db", "--device", "cuda:1"]
    launch.start(4, argv, "sqlite:///s.db", tmp_path, gpus=2)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["2", "3", "2", "3"]
    assert {env[launch.SHARE_ENV] for _, env in started} == {"2"}
    assert {env["OMP_NUM_THREADS"] for _, env in started} == {"4"}
    for cmd, _ in started:
        assert "--workers-per-gpu" not in cmd and cmd[-4:] == [
            "--worker",
            "--no-progress",
            "--device",
            "cuda",
        ]


def test_a_worker_on_a_shared_gpu_is_capped_at_its_share_of_the_memory(monkeypatch) -> None:
    """So that a candidate runs out of memory by its own size, not its neighbours'. A
    worker's device is `cuda` (no index): torch is given None, its current device."""
    from torch.cuda._utils import _get_device_index

    from search import launch

    capped = []

    def cap(fraction: float, device: object) -> None:  # torch's own check of the device
        capped.append((fraction, None if device is None else _get_device_index(device)))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", cap)
    monkeypatch.setenv(launch.SHARE_ENV, "4")
    assert launch.share_gpu(torch.device("cuda")) == 0.25
    assert launch.share_gpu(torch.device("cuda:1")) == 0.25
    assert capped == [(0.25, None), (0.25, 1)]
    assert launch.share_gpu(torch.device("cpu")) is None
    monkeypatch.setenv(launch.SHARE_ENV, "1")
    assert launch.share_gpu(torch.device("cuda")) is None and len(capped) == 2


def test_workers_per_gpu_without_a_gpu_is_a_clear_error(capsys) -> None:
    from search import run

    with pytest.raises(SystemExit) as e:
        run.parse_args(["--quick", "--workers-per-gpu", "2", "--device", "cpu"])
    assert e.value.code == 2
    assert "needs a GPU and this machine has none; use --workers" in capsys.readouterr().err


def test_cuda_graphs_off_a_gpu_are_off_by_default_and_a_clear_error_when_asked() -> None:
    d = synthetic(n_train=256, n_test=64)
    res = train(SMALL, TrainConfig(images=256, batch_size=64), d.train_test)
    assert res.graphed is False and res.graph_error is None
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        train(SMALL, TrainConfig(images=256, batch_size=64), d.train_test, graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA graphs")
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_cuda_graphs_learn_as_eager_does_and_leave_a_plain_model(dropout) -> None:
    """The graphed forward and backward (the CUDA default) against eager, same seed: both
    learn, to accuracies a few points apart; the model handed back runs eager, with
    sane BatchNorm statistics (capturing ran it on noise, and they were put back)."""
    import dataclasses

    spec = dataclasses.replace(SMALL, dropout=dropout)
    d = synthetic(n_train=2048, n_test=512)
    cfg = TrainConfig(images=8192, batch_size=128, lr=0.05, ema=0)
    graphed = train(spec, cfg, d.train_test, device="cuda")
    eager = train(spec, cfg, d.train_test, device="cuda", graphs=False)
    assert graphed.graphed and graphed.graph_error is None and not eager.graphed
    assert "forward" not in graphed.model.__dict__
    assert graphed.history[-1].val_acc > 0.8
    assert abs(graphed.history[-1].val_acc - eager.history[-1].val_acc) <= 0.05
    for a, b in zip(graphed.model.buffers(), eager.model.buffers(), strict=True):
        if not a.is_floating_point():  # num_batches_tracked: one per step, replays included
            assert torch.equal(a, b) and int(a) == 8192 // 128
        elif dropout == 0:  # with dropout the two runs draw other masks and drift apart
            assert torch.allclose(a, b, rtol=0.2, atol=0.05)
        assert torch.isfinite(a).all()
