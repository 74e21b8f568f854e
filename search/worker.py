"""The search loop of one worker, top to bottom with Optuna's ask and tell.

ask -> architecture -> gate (over the limits: constraints set, told PRUNED,
nothing else sampled) -> training settings -> slot -> train, reporting at each
rung and pruning -> tell. `python -m search.run`, the benchmarks and the tests
all run this loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from models import ArchSpec
from search import space
from search.cache import steady
from search.data import SearchData
from search.draft import Training, ask_again, drafting, is_draft, record, training, write
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
# After a rejection the next candidate is proposed without reading the study again (for
# free slots, or for the sampler) if it was read this recently: the claim counts the
# slots afresh anyway, and a worker's next ask after that reads what others wrote.
RECHECK_S = 1.0
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
    # Tell the last trial and propose and claim the next while this one trains (a
    # thread): on a GPU the host waits on the device, so this costs no trial time. Off
    # on a CPU, where training needs every core and one worker stays reproducible.
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


def settled(t: FrozenTrial) -> bool:
    """Whether what other workers need of a trial is written: a running one's slot and
    process (a queued trial gets them after it is taken: `propose`, `Loop.claim`)."""
    return t.state != TrialState.RUNNING or (SLOT in t.user_attrs and "process" in t.user_attrs)


def trial_seed(seed: int, number: int) -> int:
    return derived_seed(seed, "trial", number)


@dataclass
class Ready:
    """A candidate that passed the gate: what the main thread trains. Claimed, it holds a
    slot and its heartbeat beats (`beat`); proposed ahead when slots were few, it is
    claimed by the main thread when that is free (`beat` None)."""

    trial: optuna.Trial
    spec: ArchSpec
    cfg: TrainConfig
    beat: contextlib.ExitStack | None = None


@dataclass
class Outcome:
    """How a trial ended, to be told: its state, value and what to record with it."""

    ready: Ready
    state: TrialState
    value: float | None
    attrs: dict[str, object]


class Now:
    """An executor that runs each job at once, in this thread (a CPU worker's loop)."""

    def submit(self, fn: Callable[..., object], *args: object) -> Future[object]:
        done: Future[object] = Future()
        try:
            done.set_result(fn(*args))
        except BaseException as e:
            done.set_exception(e)
        return done

    def __enter__(self) -> Now:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


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

    The sampler is made from this worker's own seed (`sampler(seed)`). With
    `search.ahead` the main thread only trains: telling the last trial, waiting for a
    slot, sampling, the gate and the claim of the next happen in a thread meanwhile
    (`on_tell` is called there), two candidates ahead (`Loop.ahead`). A claim made
    ahead holds a slot while this worker's trial trains, so it is made only while free
    slots outnumber the trials running (`Slots.plenty`); near the end of a study one
    candidate is proposed ahead, and the main thread claims it.
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

    loop = Loop(study, search, slots, finished, who, on_tell)
    told: Outcome | None = None  # trained, not yet told (ahead: the next job tells it)
    jobs = ThreadPoolExecutor(1, thread_name_prefix="ahead") if search.ahead else Now()
    job: Future[object] | None = None  # the ahead thread's last job

    def submit(told: Outcome | None, block: bool) -> Future[Ready | str | None]:
        nonlocal job
        out: Future[Ready | str | None] = Future()
        job = jobs.submit(loop.ahead, told, block, out, search.ahead)
        return out

    with jobs:
        upcoming: Future[Ready | str | None] | None = submit(None, True)
        unused_: Ready | None = None  # made ahead, then stopped: it goes back (finally)
        ended = False
        try:
            while True:
                ready = upcoming.result()
                upcoming = None
                if isinstance(ready, Ready) and finished():  # stopped or out of time meanwhile
                    unused_, ready = ready, "done"
                if isinstance(ready, Ready) and ready.beat is None:
                    ready = loop.claim(ready)  # proposed ahead, claimed now that it can train
                if ready is None:  # nothing to train now: tell the last trial, then wait
                    upcoming = submit(told, True)
                    told = None
                    continue
                if isinstance(ready, str):
                    break
                if search.ahead:  # the next one is made while this one trains
                    upcoming = submit(told, False)
                    told = None
                told = run_trial(study, ready, search, stop)
                if not search.ahead:
                    upcoming = submit(told, True)
                    told = None
            ended = True
        finally:  # done, stopped or failed: tell what trained; what was claimed ahead goes back
            try:
                if job is not None:
                    wait([job])  # the ahead thread idle: what it made and kept is final
                made, loop.kept = [unused_, loop.kept], None
                for left in made:
                    if isinstance(left, Ready):
                        loop.drop(left)
                left = upcoming.result() if upcoming is not None else None
                if isinstance(left, Ready):
                    loop.drop(left)
            except Exception as e:  # the error the main thread raises, if any, comes first
                print(f"warning: proposing ahead failed: {one_line(e)}", file=sys.stderr)
            finally:
                for outcome in (told, loop.untold):  # a failed job did not tell its own
                    if outcome is not None:
                        loop.tell(outcome)
            if loop.failed is not None and not ended:
                print(f"warning: proposing ahead failed: {one_line(loop.failed)}", file=sys.stderr)
    if loop.failed is not None:  # after it delivered, with no error on the main thread
        raise loop.failed
    if stop():
        return "interrupted"
    if ready == "gave up":
        return ready
    return "timeout" if deadline is not None and time.monotonic() >= deadline else "done"


@dataclass
class Loop:
    """One worker's steps around training: tell, wait for a slot, propose, claim."""

    study: optuna.Study
    search: Search
    slots: Slots
    finished: Callable[[], bool]
    who: dict[str, object]
    on_tell: Callable[[optuna.Study, FrozenTrial], None] | None
    rejected_in_a_row: int = 0
    kept: Ready | str | None = None  # made ahead for the trial after the next (`ahead`)
    failed: BaseException | None = None  # raised by a job after it delivered
    untold: Outcome | None = None  # handed to a job that failed before telling it

    def __post_init__(self) -> None:
        self.drafts = drafting(self.study)  # a new trial is written once, not per suggest
        self.training = training(self.drafts)  # a trial's rungs: no round trip
        # running trials then change in the database only as they end: read them so
        halving = isinstance(self.study.pruner, optuna.pruners.SuccessiveHalvingPruner)
        steady(self.study._storage, settled if self.training is not None and not halving else None)

    def ahead(
        self, told: Outcome | None, block: bool, out: Future[Ready | str | None], keep: bool
    ) -> None:
        """`next(told, block)`, delivered to `out` as soon as it is made; with `keep`, one
        more is then made and kept for the job after (`kept`, delivered by it at once,
        before its tell). A trial pruned at its first rung ends sooner than a proposal
        is made (up to several gate rejections, TPE's sampling, the claim, the tell), so
        a worker proposing ahead stays two candidates ahead while slots are plenty."""
        try:
            if self.failed is not None:  # the last job failed after it delivered
                self.untold = told  # told by the worker as it ends
                raise self.failed
            if self.kept is not None:
                made, self.kept = self.kept, None
                out.set_result(made)
                if told is not None:
                    self.tell(told)
            else:
                made = self.next(told, block)
                out.set_result(made)
            if keep and isinstance(made, Ready) and made.beat is not None:
                self.kept = self.next(None, block=False, keep=True)
        except BaseException as e:
            if out.done():
                self.failed = e
            else:
                out.set_exception(e)
            raise

    def next(self, told: Outcome | None, block: bool, keep: bool = False) -> Ready | str | None:
        """Tell `told`, then the next candidate holding a slot; "done" or "gave up" when
        there is none to train; None when `block` is off and no slot is free now. With
        `keep` (a second candidate made ahead), only one it could claim now."""
        if told is not None:
            self.tell(told)
        checked = -math.inf
        while True:
            again = time.monotonic() - checked < RECHECK_S  # just rejected: slots were free
            if again:
                free = not self.finished()
            else:
                free = self.slots.wait(self.finished, block=block)
                checked = time.monotonic()
            if free is None or (free and keep and not self.slots.plenty()):
                return None
            if not free:
                return "done"
            if again:
                ask_again(self.drafts)  # the study was just read too
            proposal = propose(self.study, self.drafts, self.search, self.who)
            if isinstance(proposal, FrozenTrial):  # rejected by the gate, told
                self.rejected_in_a_row += 1
                if self.on_tell is not None:
                    self.on_tell(self.study, proposal)
                if self.rejected_in_a_row >= MAX_CONSECUTIVE_REJECTIONS:
                    return "gave up"
                continue
            self.rejected_in_a_row = 0
            trial, spec, cfg = proposal
            if not block and not keep and not self.slots.plenty():  # (keep: checked above)
                # Few slots left: claimed ahead, one would wait behind this worker's trial
                # while another worker could train it now. The main thread claims it.
                return Ready(trial, spec, cfg)
            ready = self.claim(Ready(trial, spec, cfg))
            if ready is not None:
                return ready
            checked = -math.inf  # another worker took the last slot: read the slots again

    def claim(self, proposal: Ready) -> Ready | None:
        """`proposal` holding a slot, its heartbeat started and its settings recorded; None
        (the candidate failed as unused) when another worker took the last free slot."""

        def settings(number: int) -> dict[str, object]:
            cfg = replace(proposal.cfg, seed=trial_seed(self.search.seed, number))
            return {"training": cfg.to_dict(), "seed": cfg.seed}

        drafted = is_draft(proposal.trial)  # written with its settings, in the claim
        claimed = self.slots.claim(proposal.trial, self.training, settings)
        if claimed is None:
            unused(self.study, proposal.trial, self.search)
            return None
        beat = contextlib.ExitStack()
        beat.enter_context(heartbeat(claimed))
        try:
            cfg = replace(proposal.cfg, seed=trial_seed(self.search.seed, claimed.number))
            if not drafted:  # a queued trial (a retry, a preset): in the database already
                for key, value in settings(claimed.number).items():
                    claimed.set_user_attr(key, value)
        except BaseException:
            beat.close()
            self.slots.requeue(claimed)
            raise
        return Ready(claimed, proposal.spec, cfg, beat)

    def tell(self, told: Outcome) -> None:
        """Record how a trial ended and tell it (an interrupted one is queued again)."""
        trial = told.ready.trial
        try:
            with told.ready.beat or contextlib.nullcontext():  # it beats until it is told
                frozen = self._write(told)
        except UpdateFinishedTrialError:
            frozen = None
        if told.state == TrialState.FAIL:
            return
        if frozen is None or frozen.state != told.state:
            failed_elsewhere(trial.number)
            return
        if self.on_tell is not None:
            self.on_tell(self.study, frozen)

    def _write(self, told: Outcome) -> FrozenTrial | None:
        """The trial's records, then its tell (None: interrupted, queued again)."""
        trial = told.ready.trial
        reported = take_reports(trial)
        if told.state == TrialState.FAIL:  # interrupted: retried from the start
            reported = {}
        # before the tell, in one transaction: a pruned trial's value is its last report
        record(self.study._storage, trial._trial_id, told.attrs, reported)
        if told.state == TrialState.FAIL:
            self.slots.requeue(trial, interrupted=True)
            return None
        if told.state == TrialState.COMPLETE:  # before the tell: then it is read-only
            self.attach_arch(trial, told.ready.spec)
        return self.study.tell(trial, told.value, state=told.state, skip_if_finished=True)

    def attach_arch(self, trial: optuna.Trial, spec: ArchSpec) -> None:
        if self.search.artifacts is None:
            return
        try:
            attach(trial, f"trial-{trial.number}-arch.json", spec.to_json() + "\n",
                   self.search.artifacts)  # fmt: skip
        except OSError as e:  # the dashboard misses one artifact; the trial stands
            print(f"warning: artifact of trial {trial.number} not written: {e}", file=sys.stderr)

    def drop(self, ready: Ready) -> None:
        """A candidate made ahead that will not train now. Claimed: queued again, with its
        slot. Not claimed: a draft was never written; one the study had queued goes back."""
        if ready.beat is not None:
            ready.beat.close()
            self.slots.requeue(ready.trial, interrupted=True)
        elif is_draft(ready.trial):
            ready.trial.storage.discard(ready.trial._trial_id)
        else:
            unused(self.study, ready.trial, self.search)


def propose(
    study: optuna.Study, drafts: optuna.Study, search: Search, who: dict[str, object]
) -> tuple[optuna.Trial, ArchSpec, TrainConfig] | FrozenTrial:
    """Ask, sample the architecture, gate it (a rejected one is told PRUNED here, and
    returned as told), then sample its training settings."""
    trial = drafts.ask()
    if not is_draft(trial):  # one the study had queued (a retry, a preset): in the database
        study._thread_local.cached_all_trials = None  # its sampling reads the study afresh
        trial = optuna.Trial(study, trial._trial_id)
    for key, value in who.items():
        trial.set_user_attr(key, value)
    spec = space.suggest_arch(trial, search.data.shape, search.limits)
    if not gate(trial, spec, search.limits):
        return rejected(study, trial)
    cfg = space.suggest_training(trial, search.profile, len(search.data.train_y), 0)
    trial.set_user_attr("device", device_name(search.device))
    return trial, spec, cfg


def rejected(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """Tell a candidate the gate rejected: PRUNED, with its sizes and constraints."""
    if is_draft(trial):
        return write(study, trial, TrialState.PRUNED)
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


def run_trial(study: optuna.Study, ready: Ready, search: Search, stop: Stop) -> Outcome | None:
    """Train a candidate that holds a slot; how it ended, to tell (`Loop.tell`).

    Interrupted: FAIL, which the telling queues again (it keeps its slot;
    interruptions do not use up its retries). Failed meanwhile by another worker
    (a heartbeat gap made it look dead): None, given up here, since its retry is
    queued. An unexpected error: failed with the reason, then raised.
    """
    trial, beat = ready.trial, ready.beat or contextlib.ExitStack()
    try:
        state, value, attrs = train_trial(trial, ready.spec, ready.cfg, search, stop)
    except UpdateFinishedTrialError:
        beat.close()
        take_reports(trial)
        failed_elsewhere(trial.number)
        return None
    except Exception as e:
        beat.close()
        take_reports(trial)
        with contextlib.suppress(UpdateFinishedTrialError):  # the error, not this
            trial.set_user_attr("failed", f"{type(e).__name__}: {one_line(e)}")
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    except BaseException:  # a second Ctrl-C: out at once; the heartbeat stops with it
        beat.close()
        raise
    return Outcome(ready, state, value, attrs)


def take_reports(trial: optuna.Trial) -> dict[int, float]:
    """What a trial reported to its worker (search.draft.Training), taken from it: to
    write at its tell, or to drop when it will not be told. Others report to the study."""
    if isinstance(trial.storage, Training):
        return trial.storage.reported(trial._trial_id)
    return {}


def failed_elsewhere(number: int) -> None:
    print(
        f"warning: trial {number} was failed by another worker (no heartbeat for the grace "
        "period); its retry, if it has retries left, trains the candidate",
        file=sys.stderr,
    )


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
) -> tuple[TrialState, float | None, dict[str, object]]:
    """Train one candidate, reporting at each rung (the pruner needs it now); the state to
    tell, the value, and what to record with it (written when it is told)."""
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
        return TrialState.PRUNED, None, {"pruned": str(e), "val_curve": curve}
    except TrainingDiverged as e:
        return TrialState.PRUNED, None, {"pruned": f"diverged: {e}", "val_curve": curve}
    except OutOfMemory as e:
        trial.set_constraint("memory", 1.0)  # the sampler learns this size and batch don't fit
        return TrialState.PRUNED, None, {"rejected": str(e)}
    except Stopped as e:
        why = f"{stop.name}: {e}; the candidate will be retried when the study goes on"
        return TrialState.FAIL, None, {"interrupted": why}
    last = result.history[-1]
    attrs = {
        "val_curve": curve,
        "val_loss": last.val_loss,
        "train_seconds": round(result.train_seconds, 3),
        "seconds": round(result.total_seconds, 3),
        "images_per_s": round(result.images_per_s, 1),
    }
    if result.graph_error:  # it trained eager: slower, and why
        attrs["graph_error"] = result.graph_error
    return TrialState.COMPLETE, last.val_acc, attrs


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
