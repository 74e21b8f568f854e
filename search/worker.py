"""The search loop of one worker, top to bottom with Optuna's ask and tell.

ask -> architecture -> gate (over the limits: constraints set, told PRUNED,
nothing else sampled) -> training settings -> slot -> train, reporting at each
rung and pruning -> tell. `python -m search.run`, the benchmarks and the tests
all run this loop.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from models import ArchSpec
from search import space
from search.data import SearchData
from search.env import device_name
from search.limits import Limits, over
from search.profile import Profile
from search.records import attach, trial_arch, trial_training
from search.signals import Stop
from search.study import (
    MAX_RETRY,
    Retry,
    Slots,
    derived_seed,
    heartbeat,
    join,
    make_sampler,
    this_process,
)
from search.trainer import (
    EvalStats,
    OutOfMemory,
    Stopped,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    train,
)

MAX_CONSECUTIVE_REJECTIONS = 500


@dataclass(frozen=True)
class Search:
    """What every trial of a study shares."""

    data: SearchData  # on the training device
    limits: Limits
    profile: Profile
    seed: int  # the study's search seed: the split, and every trial's seed
    device: torch.device
    artifacts: Path | None = None  # optuna-dashboard artifacts; None: none


def trial_seed(seed: int, number: int) -> int:
    return derived_seed(seed, "trial", number)


def run_worker(
    study: optuna.Study,
    search: Search,
    slots: Slots,
    stop: Stop,
    *,
    url: str | None,
    timeout: float | None = None,
    on_tell: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    sampler: Callable[[int], optuna.samplers.BaseSampler] = make_sampler,
) -> str:
    """Run trials until the study has its count; why it ended: done, timeout,
    interrupted or gave up (too many candidates in a row over the limits).

    The sampler is made from this worker's own seed (`sampler(seed)`).
    """
    number, sampler_seed = join(study, url, search.seed)
    study.sampler = sampler(sampler_seed)
    who = {
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "sampler_seed": sampler_seed,
        "process": this_process() | {"worker_number": number},
    }
    deadline = None if timeout is None else time.monotonic() + timeout
    rejected_in_a_row = 0
    while not stop():
        if deadline is not None and time.monotonic() >= deadline:
            return "timeout"
        if not slots.wait(stop):
            break
        trial = study.ask()
        for key, value in who.items():
            trial.set_user_attr(key, value)
        spec = space.suggest_arch(trial, search.data.shape, search.limits)
        if not gate(trial, spec, search.limits):
            frozen = study.tell(trial, state=TrialState.PRUNED)
            rejected_in_a_row += 1
            if on_tell is not None:
                on_tell(study, frozen)
            if rejected_in_a_row >= MAX_CONSECUTIVE_REJECTIONS:
                return "gave up"
            continue
        rejected_in_a_row = 0
        seed = trial_seed(search.seed, trial.number)
        cfg = space.suggest_training(trial, search.profile, len(search.data.train_y), seed)
        if not slots.claim(trial):
            trial.set_user_attr("failed", "not trained: the study reached its trial count")
            study.tell(trial, state=TrialState.FAIL)
            break
        with heartbeat(study, trial):
            state, value = train_trial(trial, spec, cfg, search, stop)
        frozen = study.tell(trial, value, state=state)
        if state == TrialState.FAIL:
            Retry(MAX_RETRY)(study, frozen)  # interrupted: run again when the study goes on
        if on_tell is not None:
            on_tell(study, frozen)
    return "interrupted" if stop() else "done"


def gate(trial: optuna.Trial, spec: ArchSpec, limits: Limits) -> bool:
    """Record the candidate's sizes and constraints; False (and why) when over a limit.

    Constraints are the relative excess, (size - limit) / limit, so limits in
    different units (parameters, MACs, bytes) weigh alike for the sampler.
    """
    sizes = limits.measure(spec)
    for key, value in sizes.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("arch", spec.to_json(indent=None))
    for key, excess in limits.excess(sizes).items():
        trial.set_constraint(key, excess / limits.limits()[key])
    reason = over(limits, sizes)
    if reason is not None:
        trial.set_user_attr("rejected", reason)
    return reason is None


def fit(
    spec: ArchSpec,
    cfg: TrainConfig,
    search: Search,
    on_eval: Callable[[EvalStats], None] | None = None,
    stop: Stop | None = None,
) -> TrainResult:
    """The one trainer call of the search: its split, its rungs."""
    d = search.data
    return train(
        spec,
        cfg,
        d.train_x,
        d.train_y,
        d.val_x,
        d.val_y,
        mean=d.mean,
        std=d.std,
        device=search.device,
        rungs=search.profile.rungs,
        on_eval=on_eval,
        stop=None if stop is None else stop.event,
    )


def train_trial(
    trial: optuna.Trial, spec: ArchSpec, cfg: TrainConfig, search: Search, stop: Stop
) -> tuple[TrialState, float | None]:
    """Train one candidate, reporting at each rung; the state to tell, and the value."""
    trial.set_user_attr("training", cfg.to_dict())
    trial.set_user_attr("seed", cfg.seed)
    trial.set_user_attr("device", device_name(search.device))
    curve: list[float] = []

    def report(s: EvalStats) -> None:
        curve.append(s.val_acc)
        trial.report(s.val_acc, s.images)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"{type(trial.study.pruner).__name__} at {s.images:,} images: "
                f"validation accuracy {s.val_acc:.4f}"
            )

    try:
        result = fit(spec, cfg, search, report, stop)
    except optuna.TrialPruned as e:
        return _ended(trial, TrialState.PRUNED, pruned=str(e), val_curve=curve)
    except TrainingDiverged as e:
        return _ended(trial, TrialState.PRUNED, pruned=f"diverged: {e}", val_curve=curve)
    except OutOfMemory as e:
        trial.set_constraint("memory", 1.0)  # the sampler learns this size and batch don't fit
        return _ended(trial, TrialState.PRUNED, rejected=str(e))
    except Stopped as e:
        why = f"{stop.name}: {e}; the candidate will be retried when the study goes on"
        return _ended(trial, TrialState.FAIL, interrupted=why)
    last = result.history[-1]
    _ended(
        trial,
        TrialState.COMPLETE,
        val_curve=curve,
        val_loss=last.val_loss,
        train_seconds=round(result.train_seconds, 3),
        seconds=round(result.total_seconds, 3),
        images_per_s=round(result.images_per_s, 1),
    )
    if search.artifacts is not None:
        attach(trial, f"trial-{trial.number}-arch.json", spec.to_json() + "\n", search.artifacts)
    return TrialState.COMPLETE, last.val_acc


def _ended(trial: optuna.Trial, state: TrialState, **attrs: object) -> tuple[TrialState, None]:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return state, None


def replay(trial: FrozenTrial, search: Search) -> tuple[float, float]:
    """Train a recorded trial again from its record: (stored, recomputed) validation
    accuracy at the last rung it reached (a pruned trial stops where it was pruned)."""
    reached = max(trial.intermediate_values)
    stored = (
        trial.value if trial.state == TrialState.COMPLETE else trial.intermediate_values[reached]
    )
    seen: list[float] = []

    class Reached(Exception):
        pass

    def at_rung(s: EvalStats) -> None:
        seen.append(s.val_acc)
        if s.images >= reached:
            raise Reached

    with contextlib.suppress(Reached):
        fit(trial_arch(trial), trial_training(trial), search, at_rung)
    return stored, seen[-1]


def warm_start(study: optuna.Study, names: list[str], search: Search) -> list[str]:
    """Enqueue presets' architectures (training settings are sampled); what was skipped."""
    from models.presets import preset

    skipped = []
    for name in names:
        spec = preset(name, *search.data.shape)
        try:
            params = space.preset_params(spec, search.limits)
        except ValueError as e:
            skipped.append(f"{name}: {e}")
            continue
        study.enqueue_trial(params, user_attrs={"preset": name}, skip_if_exists=True)
    return skipped


def estimate_trial_seconds(search: Search, samples: int = 24) -> tuple[float, float, float]:
    """(typical, fastest, slowest) seconds of a full trial here, for the candidates the space
    proposes first: their MACs, and this device's speed timed on two of them."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=search.seed))
    found: list[tuple[int, ArchSpec, TrainConfig]] = []
    for _ in range(20 * samples):
        if len(found) == samples:
            break
        trial = study.ask()
        spec = space.suggest_arch(trial, search.data.shape, search.limits)
        if search.limits.fits(spec):
            cfg = space.suggest_training(trial, search.profile, len(search.data.train_y), 0)
            found.append((search.limits.measure(spec)["macs"], spec, cfg))
        study.tell(trial, 0.0)
    if not found:  # the limits leave little room: time the smallest candidate
        spec = space.smallest(search.data.shape)
        found = [(search.limits.measure(spec)["macs"], spec, TrainConfig(batch_size=64))]
    found.sort(key=lambda f: f[0])
    rates = [_macs_per_second(found[i][1], found[i][2], search) for i in (len(found) // 4, -1)]
    # Small networks use the device less well: interpolate the speed in MACs.
    lo, hi = found[len(found) // 4][0], found[-1][0]
    p = search.profile

    def seconds(macs: int) -> float:
        t = 0.0 if hi == lo else min(1.0, max(0.0, (macs - lo) / (hi - lo)))
        rate = rates[0] + t * (rates[1] - rates[0])
        val = len(search.data.val_y) * len(p.rungs) / 3  # a forward pass is ~1/3 of a step
        return macs * (p.images + val) / rate

    times = sorted(seconds(m) for m, _, _ in found)
    return times[len(times) // 2], times[0], times[-1]


def _macs_per_second(spec: ArchSpec, cfg: TrainConfig, search: Search) -> float:
    """Training MACs per second of one candidate: a few timed steps after a warm-up."""
    d, bs = search.data, min(cfg.batch_size, len(search.data.train_y))
    n = min(len(d.train_y), 6 * bs)
    kwargs = {"mean": d.mean, "std": d.std, "device": search.device}
    warm = TrainConfig(images=2 * bs, batch_size=bs, seed=0)
    train(spec, warm, d.train_x[:n], d.train_y[:n], **kwargs)
    result = train(
        spec, TrainConfig(images=n, batch_size=bs, seed=0), d.train_x[:n], d.train_y[:n], **kwargs
    )
    return search.limits.measure(spec)["macs"] * result.images_per_s
