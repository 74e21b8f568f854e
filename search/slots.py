"""One global trial count across workers, and trials whose worker is gone.

Every trained candidate takes one of the study's `--trials` slots, claimed
under the study lock, so the study ends with exactly that many trained trials
whatever the number of workers. A trial whose run ended early (interrupted, or
its worker dead) is failed and a copy that keeps its slot is queued, under the
same lock, so no other candidate can take the slot in between.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from search.cache import rdb_of
from search.draft import is_draft, write
from search.signals import critical
from search.study import MAX_RETRY, SLOT, Retry, study_lock


def is_trained(t: FrozenTrial) -> bool:
    """Trained to the end or pruned by the pruner: what counts towards --trials."""
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "rejected" not in t.user_attrs


def slot_holders(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that hold a slot: trained, training, or waiting to be retried."""
    live = (TrialState.RUNNING, TrialState.WAITING)
    return [t for t in trials if SLOT in t.user_attrs and (t.state in live or is_trained(t))]


def count_holders(study: optuna.Study) -> int:
    """`len(slot_holders(...))` of the study as the database has it now: counted there on
    an RDB storage (exact whatever a worker's cache holds: search.cache), read otherwise.
    """
    rdb = rdb_of(study._storage)
    if rdb is None:
        return len(slot_holders(study.get_trials(deepcopy=False)))
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    trial, attr = models.TrialModel, models.TrialUserAttributeModel

    def has(key: str) -> sqlalchemy.Exists:
        return sqlalchemy.exists().where(attr.trial_id == trial.trial_id, attr.key == key)

    live = trial.state.in_([TrialState.RUNNING, TrialState.WAITING])
    trained = sqlalchemy.and_(
        trial.state.in_([TrialState.COMPLETE, TrialState.PRUNED]), ~has("rejected")
    )
    query = sqlalchemy.select(sqlalchemy.func.count()).where(
        trial.study_id == study._study_id, has(SLOT), sqlalchemy.or_(live, trained)
    )
    with _create_scoped_session(rdb.scoped_session) as session:
        return session.execute(query).scalar_one()


class Slots:
    """The study's `cap` training slots, shared by every worker of it."""

    def __init__(self, study: optuna.Study, cap: int, url: str | None) -> None:
        self.study, self.cap, self.url = study, cap, url
        # A trial can become stale on this time scale; None: no heartbeat, nothing stale.
        self.stale_every = getattr(study._storage, "get_heartbeat_interval", lambda: None)()
        self.next_stale_check = 0.0
        self.seen: list[FrozenTrial] | None = None  # the study as `wait` last read it

    def claim(
        self,
        trial: optuna.Trial,
        to: optuna.Study | None = None,
        attrs_of: Callable[[int], dict[str, Any]] | None = None,
    ) -> optuna.Trial | None:
        """`trial` holding one of the study's slots, atomically across workers; None if
        none is left. A draft (search.draft) is written here, RUNNING with its slot and
        the user attributes `attrs_of` its number gives, under the lock that counts the
        slots, and comes back as a trial of `to` (default: the study); a retried trial
        keeps the slot it had.
        """
        if SLOT in trial.user_attrs:
            return trial
        with study_lock(self.url, self.study.study_name):
            held = count_holders(self.study)
            if held >= self.cap:
                return None
            if not is_draft(trial):
                trial.set_user_attr(SLOT, held)
                return trial
            written = write(self.study, trial, TrialState.RUNNING, attrs_of, **{SLOT: held})
        # outside the lock; a draft's storage serves the trial as written, without a read
        # (opened elsewhere, the copy kept for it is dropped: it would be served later)
        claimed = optuna.Trial(to or self.study, written._trial_id)
        trial.storage.fresh.pop(written._trial_id, None)
        return claimed

    def requeue(self, trial: optuna.Trial | int, interrupted: bool = False) -> bool:
        """Fail a running trial and queue its copy, which keeps its slot; False when
        another worker ended it first. `interrupted`: a stop, not a crash, so it does
        not count towards the candidate's retries.

        A second Ctrl-C waits until both are done: in between, the candidate would
        be failed with no copy queued, and lost.
        """
        with critical(), study_lock(self.url, self.study.study_name):
            try:
                frozen = self.study.tell(trial, state=TrialState.FAIL)
            except (ValueError, RuntimeError):
                return False
            Retry(MAX_RETRY, interrupted=interrupted)(self.study, frozen)
            return True

    def wait(
        self, stopped: Callable[[], bool], poll_s: float = 2.0, block: bool = True
    ) -> bool | None:
        """Block until this worker may start a trial (True) or should not (False: the study
        has its count, or `stopped()`); without `block`, None when no slot is free now.

        While every slot is held by running trials, a worker waits instead of
        sampling: if a holder's worker died, its trial is failed and retried
        (at once when its process is known to be gone), and this worker picks
        the retry up.
        """
        while not stopped():
            self.fail_stale()
            trials = self.seen = self.study.get_trials(deepcopy=False)
            if self.fail_dead(trials):
                continue
            if sum(map(is_trained, trials)) >= self.cap:
                return False
            free = len(slot_holders(trials)) < self.cap
            waiting = [t for t in trials if t.state == TrialState.WAITING]
            if free or any(SLOT in t.user_attrs for t in waiting):
                return True
            if not block:
                return None
            time.sleep(poll_s)
        return False

    def plenty(self) -> bool:
        """Whether more slots are free than trials are running: then a worker may claim
        its next trial while its current one trains, and no other worker lacks a slot.
        Read off the study as `wait` last read it (a round trip fewer per candidate): a
        heuristic; the claim counts the slots against the cap afresh, under the lock."""
        trials = self.seen if self.seen is not None else self.study.get_trials(deepcopy=False)
        running = sum(t.state == TrialState.RUNNING and SLOT in t.user_attrs for t in trials)
        return self.cap - len(slot_holders(trials)) > running

    def fail_stale(self) -> None:
        """Fail and retry trials whose heartbeat is older than the grace period; at most
        once a heartbeat interval, the time scale on which a trial can become stale."""
        if not self.stale_every or time.monotonic() < self.next_stale_check:
            return
        with critical(), study_lock(self.url, self.study.study_name):
            optuna.storages.fail_stale_trials(self.study)  # fails and retries: one step
        self.next_stale_check = time.monotonic() + self.stale_every

    def fail_dead(self, trials: list[FrozenTrial]) -> list[int]:
        """Fail and retry RUNNING trials whose process is known to be gone; their numbers."""
        here = this_process()
        dead = [
            t.number
            for t in trials
            if t.state == TrialState.RUNNING and is_gone(t.user_attrs.get("process", {}), here)
        ]
        return [n for n in dead if self.requeue(n)]


# --- is a trial's process still there? ----------------------------------------------------


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def this_process() -> dict[str, Any]:
    """Who runs a trial, precisely enough to tell later, on the same host, that it is gone."""
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return {
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": pidns,
        "pid": os.getpid(),
        "start": _proc_start(os.getpid()),
    }


def is_gone(process: dict[str, Any], here: dict[str, Any]) -> bool:
    """True only when certain: same host, boot and pid namespace, and that pid is not
    the same process any more. Anything else is left to the heartbeat's grace period."""
    same_machine = all(process.get(k) == here[k] for k in ("host", "boot", "pidns"))
    if not same_machine or not here["boot"] or process.get("start") is None:
        return False
    return _proc_start(process["pid"]) != process["start"]
