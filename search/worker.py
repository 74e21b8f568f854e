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
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from models import ArchSpec
from search import space
from search.data import SearchData
from search.draft import drafting, is_draft, write, written
from search.env import device_name
from search.latency import model_ms
from search.limits import Limits, over
from search.profile import Profile
from search.records import attach
from search.sampler import make_sampler
from search.signals import Stop, critical
from search.slots import Slots, this_process
from search.study import SLOT, derived_seed, heartbeat, join
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
RECIPE = ("ema", "tta", "zero_init", "bn_lr", "warmup")  # fixed, not sampled: a study setting


@dataclass(frozen=True)
class Search:
    """What every trial of a study shares."""

    data: SearchData  # on the training device
    limits: Limits
    profile: Profile
    seed: int  # the study's search seed: the split, and every trial's seed
    device: torch.device
    artifacts: Path | None = None  # optuna-dashboard artifacts; None: none
    # Propose the next candidate while this one trains (a thread): on a GPU the host
    # waits on the device, so sampling costs no trial time. Off on a CPU, where
    # training needs every core and a search with one worker stays reproducible.
    ahead: bool = False

    def settings(self, pruner: str) -> dict[str, object]:
        """What makes the trials of a study comparable: a resume must match all of it."""
        return {
            "space_version": space.SPACE_VERSION,
            "dataset": self.data.name,
            "budget": self.limits.params,
            "max_macs": self.limits.macs,
            "max_bytes": self.limits.bytes,
            "weight_dtype": self.limits.weight_dtype,
            "max_activation_bytes": self.limits.activation_bytes,
            "max_latency_ms": self.limits.latency_ms,
            "latency_table": self.limits.latency.machine if self.limits.latency_ms else None,
            "profile": self.profile.to_dict(),
            "train_images": len(self.data.train_y),
            "val_images": len(self.data.val_y),
            "seed": self.seed,
            "pruner": pruner,
            "recipe": {k: v for k, v in TrainConfig().to_dict().items() if k in RECIPE},
        }

    def train(
        self,
        spec: ArchSpec,
        cfg: TrainConfig,
        on_eval: Callable[[EvalStats], None] | None = None,
        stop: Stop | None = None,
    ) -> TrainResult:
        """Train a candidate as a trial does: on the search's split, with its rungs."""
        return train(
            spec,
            cfg,
            self.data.train_val,
            device=self.device,
            rungs=self.profile.rungs,
            on_eval=on_eval,
            stop=None if stop is None else stop.event,
        )


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

    def finished() -> bool:
        return stop() or (deadline is not None and time.monotonic() >= deadline)

    drafts = drafting(study)  # a new trial is written once, not once per suggest
    rejected_in_a_row = 0
    pending: deque[Proposal] = deque()  # proposed, not yet tried for a slot
    with ThreadPoolExecutor(1, thread_name_prefix="propose") as pool:
        ahead: Future[list[Proposal]] | None = None
        try:
            while slots.wait(finished):
                if not pending:
                    made = (
                        ahead.result()
                        if ahead is not None
                        else [propose(study, drafts, search, who)]
                    )
                    pending.extend(made)
                    ahead = None
                proposal = pending.popleft()
                if proposal.spec is None:  # rejected by the gate: told already
                    rejected_in_a_row += 1
                    if on_tell is not None:
                        on_tell(study, proposal.frozen)
                    if rejected_in_a_row >= MAX_CONSECUTIVE_REJECTIONS:
                        return "gave up"
                    continue
                rejected_in_a_row = 0
                claimed = slots.claim(proposal.trial)
                if claimed is None:  # another worker took the last free slot first
                    unused(study, proposal.trial, search)
                    continue
                if search.ahead and not pending:  # the next one is made while this one trains
                    ahead = pool.submit(propose_until_one_fits, study, drafts, search, who)
                cfg = replace(proposal.cfg, seed=trial_seed(search.seed, claimed.number))
                frozen = run_trial(study, claimed, proposal.spec, cfg, search, stop, slots)
                if on_tell is not None and frozen is not None:
                    on_tell(study, frozen)
        finally:  # done, stopped or failed: what was proposed ahead is not trained
            if ahead is not None:
                pending.extend(ahead.result())
            for proposal in pending:
                drop(study, proposal, search, slots, on_tell)
    if stop():
        return "interrupted"
    return "timeout" if deadline is not None and time.monotonic() >= deadline else "done"


@dataclass
class Proposal:
    """A candidate ready to claim a slot (`spec`, `cfg`), or one the gate rejected
    (`spec` None, `frozen` as told)."""

    trial: optuna.Trial
    spec: ArchSpec | None = None
    cfg: TrainConfig | None = None
    frozen: FrozenTrial | None = None


def drop(
    study: optuna.Study,
    proposal: Proposal,
    search: Search,
    slots: Slots,
    on_tell: Callable[[optuna.Study, FrozenTrial], None] | None,
) -> None:
    """A proposal that will not train: a rejected one was told, a draft was never written;
    one the study had queued goes back to the queue (a retry keeps its slot)."""
    if proposal.spec is None:
        if on_tell is not None and proposal.frozen is not None:
            on_tell(study, proposal.frozen)
    elif not is_draft(proposal.trial):
        if SLOT in proposal.trial.user_attrs:
            slots.requeue(proposal.trial, interrupted=True)
        else:
            unused(study, proposal.trial, search)


AHEAD_MOST = 10  # proposals made ahead at a time: the rejected ones, then one that fits


def propose_until_one_fits(
    study: optuna.Study, drafts: optuna.Study, search: Search, who: dict[str, object]
) -> list[Proposal]:
    """Proposals until one passes the gate (at most AHEAD_MOST): a rejected candidate
    costs a sample too, so ahead it costs no trial time either."""
    made = [propose(study, drafts, search, who)]
    while made[-1].spec is None and len(made) < AHEAD_MOST:
        made.append(propose(study, drafts, search, who))
    return made


def propose(
    study: optuna.Study, drafts: optuna.Study, search: Search, who: dict[str, object]
) -> Proposal:
    """Ask, sample the architecture, gate it (a rejected one is told PRUNED here), then
    sample its training settings."""
    trial = drafts.ask()
    if not is_draft(trial):  # one the study had queued (a retry, a preset): in the database
        trial = optuna.Trial(study, trial._trial_id)
    for key, value in who.items():
        trial.set_user_attr(key, value)
    spec = space.suggest_arch(trial, search.data.shape, search.limits)
    if not gate(trial, spec, search.limits):
        return Proposal(trial, frozen=rejected(study, trial))
    cfg = space.suggest_training(trial, search.profile, len(search.data.train_y), 0)
    trial.set_user_attr("device", device_name(search.device))
    return Proposal(trial, spec, cfg)


def rejected(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """Tell a candidate the gate rejected: PRUNED, with its sizes and constraints."""
    if is_draft(trial):
        return written(study, write(study, trial, TrialState.PRUNED))
    return study.tell(trial, state=TrialState.PRUNED)


def unused(study: optuna.Study, trial: optuna.Trial, search: Search) -> None:
    """A candidate that found no slot: failed as unused; a queued preset is queued again."""
    why = "not trained: another worker took the last slot"
    if is_draft(trial):
        write(study, trial, TrialState.FAIL, unused=why)
        return
    trial.set_user_attr("unused", why)
    with critical():
        study.tell(trial, state=TrialState.FAIL)
        if "preset" in trial.user_attrs:  # the user queued it: queue it again, behind
            warm_start(study, [trial.user_attrs["preset"]], search, again=True)


def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: ArchSpec,
    cfg: TrainConfig,
    search: Search,
    stop: Stop,
    slots: Slots,
) -> FrozenTrial | None:
    """Train a candidate that holds a slot, under the heartbeat, and tell how it ended.

    Interrupted: failed and queued again (it keeps its slot; interruptions do not
    use up its retries). Failed meanwhile by another worker (a heartbeat gap made
    it look dead): given up here, since its retry is queued. An unexpected error:
    failed with the reason, then raised.
    """
    try:
        with heartbeat(trial):
            try:
                state, value = train_trial(trial, spec, cfg, search, stop)
            except UpdateFinishedTrialError:
                raise
            except Exception as e:
                with contextlib.suppress(UpdateFinishedTrialError):  # the error, not this
                    trial.set_user_attr("failed", f"{type(e).__name__}: {one_line(e)}")
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
        if state == TrialState.FAIL:
            slots.requeue(trial, interrupted=True)
            return None
        frozen = study.tell(trial, value, state=state, skip_if_finished=True)
        if frozen.state == state:
            return frozen
    except UpdateFinishedTrialError:
        pass
    print(
        f"warning: trial {trial.number} was failed by another worker (no heartbeat for the "
        "grace period); its retry, if it has retries left, trains the candidate",
        file=sys.stderr,
    )
    return None


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def gate(trial: optuna.Trial, spec: ArchSpec, limits: Limits) -> bool:
    """Record the candidate's sizes and constraints; False (and why) when over a limit.

    Constraints are the relative excess, (size - limit) / limit, so limits in
    different units (parameters, MACs, bytes) weigh alike for the sampler.
    """
    sizes = limits.measure(spec)
    if limits.near_latency_limit(sizes) and limits.latency is not None:
        # too near the limit to trust the prediction: time the built model here (weights
        # exist now, for a fraction of a second; nothing is trained)
        sizes["latency_predicted_ms"] = sizes["latency_ms"]
        sizes["latency_ms"] = round(model_ms(spec, limits.latency.threads), 4)
    for key, value in sizes.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("arch", spec.to_json(indent=None))
    for key, excess in limits.excess(sizes).items():
        trial.set_constraint(key, excess / limits.limits()[key])
    reason = over(limits, sizes)
    if reason is not None:
        trial.set_user_attr("rejected", reason)
    return reason is None


def train_trial(
    trial: optuna.Trial, spec: ArchSpec, cfg: TrainConfig, search: Search, stop: Stop
) -> tuple[TrialState, float | None]:
    """Train one candidate, reporting at each rung; the state to tell, and the value."""
    trial.set_user_attr("training", cfg.to_dict())
    trial.set_user_attr("seed", cfg.seed)
    curve: list[float] = []

    def report(s: EvalStats) -> None:
        curve.append(s.val_acc)
        trial.report(s.val_acc, s.images)
        # At the last rung the work is done: pruning it would only throw the result away.
        if s.images < cfg.images and trial.should_prune():
            raise optuna.TrialPruned(
                f"{type(trial.study.pruner).__name__} at {s.images:,} images: "
                f"validation accuracy {s.val_acc:.4f}"
            )

    try:
        result = search.train(spec, cfg, report, stop)
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
        try:
            attach(
                trial, f"trial-{trial.number}-arch.json", spec.to_json() + "\n", search.artifacts
            )
        except OSError as e:  # the dashboard misses one artifact; the trial stands
            print(f"warning: artifact of trial {trial.number} not written: {e}", file=sys.stderr)
    return TrialState.COMPLETE, last.val_acc


def _ended(trial: optuna.Trial, state: TrialState, **attrs: object) -> tuple[TrialState, None]:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return state, None


def warm_start(
    study: optuna.Study, names: list[str], search: Search, again: bool = False
) -> list[str]:
    """Enqueue presets' architectures (training settings are sampled); what was skipped.
    A preset already in the study is not queued twice, unless `again`."""
    from models.presets import preset

    skipped = []
    for name in names:
        spec = preset(name, *search.data.shape)
        try:
            params = space.preset_params(spec, search.limits)
        except ValueError as e:
            skipped.append(f"{name}: {e}")
            continue
        study.enqueue_trial(params, user_attrs={"preset": name}, skip_if_exists=not again)
    return skipped
