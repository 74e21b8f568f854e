"""Faults of the search loop, each reproduced in one process on a real SQLite study:
another worker failing a trial, interruptions and crashes, a queued preset that
loses its slot, memory errors that are not OutOfMemoryError, a second Ctrl-C at
the wrong moment, heartbeats through a database error, a parent without CUDA."""

from __future__ import annotations

import os
import signal
import time

import optuna
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState

from models.presets import preset
from search import launch, replay, run, space, worker
from search.data import Split, search_split, synthetic
from search.limits import Limits
from search.profile import Profile
from search.signals import Stop
from search.slots import Slots, is_trained
from search.study import MAX_RETRY, SLOT, Retry, heartbeat, open_study
from search.trainer import OutOfMemory, TrainConfig, train
from search.worker import Search, run_worker

from conftest import FAST_SEARCH


def small_search(max_macs: int | None = 30_000_000) -> Search:
    data = search_split(synthetic(n_train=1024, n_test=64), 0, train_images=512, val_images=256)
    profile = Profile("test", 768, (1 / 3, 2 / 3, 1.0), min_steps=8, batch_sizes=(64, 128))
    return Search(data, Limits(5_000_000, max_macs), profile, 0, torch.device("cpu"))


def sqlite(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/s.db"


def retries_of(trials, number: int) -> list:
    return [t for t in trials if t.system_attrs.get("failed_trial") == number]


@pytest.mark.parametrize("when", ["while it trains", "after it trained"])
def test_a_trial_failed_by_another_worker_is_left_to_its_retry(
    tmp_path, monkeypatch, capsys, when
) -> None:
    """A heartbeat gap: another worker's stale check fails this worker's trial and
    queues its retry. This worker must not crash on its next report or its tell."""
    url = sqlite(tmp_path)
    study = open_study(url, "s", heartbeat=(5, 10))
    other = open_study(url, "s", create=False, heartbeat=(5, 10))  # another worker's handle
    failed: list[int] = []

    def fail_from_the_other_worker() -> None:
        if not failed:
            (running,) = [t for t in other.get_trials() if t.state == TrialState.RUNNING]
            Retry(MAX_RETRY)(other, other.tell(running.number, state=TrialState.FAIL))
            failed.append(running.number)

    if when == "while it trains":
        real = worker.train

        def train(*args, **kwargs):
            fail_from_the_other_worker()
            return real(*args, **kwargs)

        monkeypatch.setattr(worker, "train", train)
    else:
        real = worker.train_trial

        def train_trial(*args, **kwargs):
            out = real(*args, **kwargs)
            fail_from_the_other_worker()
            return out

        monkeypatch.setattr(worker, "train_trial", train_trial)
    why = run_worker(study, small_search(), Slots(study, 1, url), Stop(), url=url)
    assert why == "done"
    trials = study.get_trials()
    assert trials[failed[0]].state == TrialState.FAIL
    assert [is_trained(t) for t in retries_of(trials, failed[0])] == [True]
    assert "was failed by another worker" in capsys.readouterr().err


def test_interruptions_do_not_use_up_a_candidates_crash_retries(tmp_path, capsys) -> None:
    """Three preemptions, then MAX_RETRY crashes: still retried; one crash more: dropped,
    with a word."""
    url = sqlite(tmp_path)
    study = open_study(url, "s", heartbeat=None)
    slots = Slots(study, 5, url)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    assert slots.claim(trial)

    def picked_up() -> int:
        waiting = [t for t in study.get_trials() if t.state == TrialState.WAITING]
        assert len(waiting) == 1
        return study.ask().number

    number = trial.number
    for _ in range(3):
        assert slots.requeue(number, interrupted=True)
        number = picked_up()
    for _ in range(MAX_RETRY):
        assert slots.requeue(number)
        number = picked_up()
    assert slots.requeue(number)
    assert [t for t in study.get_trials() if t.state == TrialState.WAITING] == []
    assert f"trial {number} failed {MAX_RETRY + 1} times" in capsys.readouterr().err


def test_a_queued_preset_that_loses_its_slot_to_a_retry_is_queued_again(tmp_path) -> None:
    """Only a retry holds the free slot, but ask() hands out the lower-numbered preset
    first: the preset cannot claim a slot, and must not be lost."""
    url = sqlite(tmp_path)
    search = small_search(max_macs=None)  # room for the preset
    study = open_study(url, "s", heartbeat=None)
    slots = Slots(study, 1, url)
    tiny = space.preset_params(preset("resnet-tiny", *search.data.shape), search.limits)
    study.enqueue_trial(tiny)
    first = study.ask()  # a candidate that runs and is interrupted
    spec = space.suggest_arch(first, search.data.shape, search.limits)
    space.suggest_training(first, search.profile, len(search.data.train_y), 0)
    assert worker.gate(first, spec, search.limits) and slots.claim(first)
    study.enqueue_trial(tiny, user_attrs={"preset": "resnet-tiny"})
    assert slots.requeue(first, interrupted=True)  # its retry: after the preset in the queue

    assert run_worker(study, search, slots, Stop(), url=url) == "done"
    trials = study.get_trials()
    assert [is_trained(t) for t in retries_of(trials, first.number)] == [True]
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.user_attrs.get("preset") for t in queued] == ["resnet-tiny"]
    assert queued[0].system_attrs["fixed_params"] == tiny  # for a later resume


class FailsLikeCudnn(torch.nn.Module):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.message = message

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(self.message)


CUDA_MEMORY_ERRORS = [
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "Unable to find a valid cuDNN algorithm to run convolution",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
]


@pytest.mark.parametrize("message", CUDA_MEMORY_ERRORS)
def test_cudnn_and_cublas_memory_failures_are_out_of_memory(monkeypatch, message) -> None:
    monkeypatch.setattr("search.trainer.build_model", lambda spec: FailsLikeCudnn(message))
    x, y = torch.zeros(8, 1, 8, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    cfg = TrainConfig(images=8, batch_size=4)
    with pytest.raises(OutOfMemory, match="out of memory on cpu at batch size 4"):
        train(preset("resnet-tiny", 1, 8), cfg, Split(x, y, (0.5,), (0.5,)))


def test_an_injected_cudnn_failure_is_a_memory_constraint_and_the_study_goes_on(
    monkeypatch,
) -> None:
    """Through the search loop, as on a full GPU: the candidate is told as rejected with
    a memory constraint the sampler sees, and the next candidate trains."""
    import search.trainer as trainer

    real, built = trainer.build_model, []

    def build_model(spec):
        built.append(spec)
        return FailsLikeCudnn(CUDA_MEMORY_ERRORS[0]) if len(built) == 1 else real(spec)

    monkeypatch.setattr(trainer, "build_model", build_model)
    study = optuna.create_study(direction="maximize")
    assert run_worker(study, small_search(), Slots(study, 2, None), Stop(), url=None) == "done"
    trained = [t for t in study.get_trials() if SLOT in t.user_attrs]
    first = trained[0]
    assert first.state == TrialState.PRUNED
    assert first.user_attrs["rejected"].startswith("out of memory on cpu")
    assert first.constraints["memory"] == 1.0
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) >= 1


def test_a_second_ctrl_c_between_fail_and_retry_loses_nothing(tmp_path, monkeypatch) -> None:
    """The second Ctrl-C stops at once, but only after the retry is queued."""
    url = sqlite(tmp_path)
    study = open_study(url, "s", heartbeat=None)
    slots = Slots(study, 2, url)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    assert slots.claim(trial)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = Stop().install()
    stop.request(signal.SIGINT)  # the first Ctrl-C: the trial is being marked
    real = study.tell

    def tell(*args, **kwargs):
        frozen = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # the second, right after the fail
        time.sleep(0.05)
        return frozen

    monkeypatch.setattr(study, "tell", tell)
    try:
        with pytest.raises(KeyboardInterrupt):
            slots.requeue(trial, interrupted=True)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert [t.state for t in retries_of(trials, 0)] == [TrialState.WAITING]


def test_the_heartbeat_goes_on_after_a_database_error(tmp_path, monkeypatch) -> None:
    """Optuna's own heartbeat thread ends at the first error, and the trial is then
    failed as stale while it still trains."""
    url = sqlite(tmp_path)
    study = open_study(url, "s", heartbeat=(1, 2))
    trial = study.ask()
    real, beats = trial.storage.record_heartbeat, []

    def flaky(trial_id: int) -> None:
        beats.append(trial_id)
        if len(beats) == 2:
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("server closed"))
        real(trial_id)

    monkeypatch.setattr(trial.storage, "record_heartbeat", flaky)
    with heartbeat(trial):
        time.sleep(4.5)
        optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[0].state == TrialState.RUNNING
    assert len(beats) >= 4


def test_optuna_api_the_heartbeat_relies_on() -> None:
    """The heartbeat uses public storage methods only; if Optuna renames them, this
    fails loudly instead of a study whose trials go stale."""
    study = optuna.create_study(storage="sqlite:///:memory:")
    trial = study.ask()
    storage = trial.storage
    sid = storage.get_study_id_from_name(study.study_name)
    tid = storage.get_trial_id_from_study_id_trial_number(sid, trial.number)
    assert storage.get_trial(tid).number == trial.number
    assert callable(storage.record_heartbeat) and callable(storage.get_heartbeat_interval)


def test_the_workers_parent_never_creates_a_cuda_context(tmp_path, monkeypatch, capsys) -> None:
    """Under EXCLUSIVE_PROCESS a context in the parent takes the GPU from worker 0.
    Counting GPUs does not create one; naming or using a device does."""

    def no_context(*_a, **_k):
        raise AssertionError("the --workers parent created a CUDA context")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("_lazy_init", "init", "get_device_name", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, no_context)
    flags = [f for f in FAST_SEARCH if f not in ("--device", "cpu")]
    argv = [*flags, "--device", "cuda", "--workers", "2", "--create-only", "--study-name", "g"]
    assert run.main([*argv, "--storage", sqlite(tmp_path)]) == 0
    assert "trials on CUDA" in capsys.readouterr().out


def test_cpu_workers_divide_the_cores() -> None:
    assert [launch.cpu_threads(n, 2) for n in (1, 2, 16)] == [2, 1, 1]
    assert [launch.cpu_threads(n, 16) for n in (1, 2, 3, 4, 16)] == [16, 8, 5, 4, 1]


def test_a_gpu_replay_is_judged_within_the_stated_tolerance() -> None:
    """Exact when the trial and its replay both ran on a CPU; else within the tolerance."""
    assert replay.judge(0.9, 0.9, True)[0] and replay.judge(0.9, 0.9, False)[0]
    assert not replay.judge(0.9, 0.9001, True)[0]
    ok, line = replay.judge(0.9, 0.9 + replay.CUDA_TOLERANCE / 2, False)
    assert ok and "within the GPU tolerance" in line
    ok, line = replay.judge(0.9, 0.9 - 2 * replay.CUDA_TOLERANCE, False)
    assert not ok and "outside" in line


def test_a_search_run_in_a_program_gives_its_signal_handlers_back(tmp_path, monkeypatch) -> None:
    """run.main handles SIGINT/SIGTERM while it runs, then restores the program's own:
    a benchmark that ran a search in its process was deaf to SIGTERM afterwards."""
    monkeypatch.chdir(tmp_path)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    argv = [*FAST_SEARCH, "--create-only", "--study-name", "h", "--storage", sqlite(tmp_path)]
    assert run.main(argv) == 0
    assert {s: signal.getsignal(s) for s in before} == before
