"""Storage URL -> study: SQLite or PostgreSQL through Optuna's RDBStorage.

Creating and resuming are the same call (`load_if_exists`), so any number of
workers can run it at once. RDB storages get a heartbeat, and a trial whose
worker died is failed and retried by `RetryHeartbeatStaleTrialCallback`.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

HEARTBEAT_S = 30
GRACE_S = 120
MAX_RETRY = 2


class StudyError(Exception):
    """A storage or study problem the user can fix (bad URL, unknown study, ...)."""


def default_storage(study_name: str) -> str:
    return f"sqlite:///studies/{study_name}.db"


def safe_url(url: str) -> str:
    """The URL with any password masked: the only form that may be printed or logged."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<unparseable storage URL>"


Heartbeat = tuple[int, int] | None  # (interval, grace period) in seconds; None: off


def make_storage(url: str, heartbeat: Heartbeat = (HEARTBEAT_S, GRACE_S)) -> RDBStorage:
    """An RDBStorage with pool settings fit for one worker process."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StudyError(
            "--storage is not a database URL; use sqlite:///path.db or "
            "postgresql+psycopg://user:password@host:5432/dbname"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # Wait for the write lock instead of failing with "database is locked".
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {
            "pool_pre_ping": True,
            "pool_size": 2,
            "max_overflow": 2,
            "pool_recycle": 1800,
        }
    hb: dict[str, Any] = {}
    if heartbeat:
        hb = {
            "heartbeat_interval": heartbeat[0],
            "grace_period": heartbeat[1],
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(MAX_RETRY),
        }
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, **hb)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as e:
        reason = str(e).splitlines()[0]
        if url in reason:
            reason = reason.replace(url, safe_url(url))
        raise StudyError(f"cannot open storage {safe_url(url)}: {reason}") from None


def make_sampler(seed: int | None) -> optuna.samplers.TPESampler:
    # constant_liar: parallel workers see running trials as bad, so they spread out;
    # group: the per-stage parameters exist only for some stage counts.
    return optuna.samplers.TPESampler(
        multivariate=True, group=True, constant_liar=True, seed=seed, n_startup_trials=10
    )


def make_pruner(epochs: int) -> optuna.pruners.MedianPruner:
    """Steps are 1-based epochs; with warmup w the first decision follows epoch w."""
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 5))


def open_study(
    url: str,
    name: str,
    *,
    seed: int | None = None,
    epochs: int = 10,
    create: bool = True,
    heartbeat: Heartbeat = (HEARTBEAT_S, GRACE_S),
) -> optuna.Study:
    """Create or resume (`create=True`), or load an existing study (`create=False`)."""
    storage = make_storage(url, heartbeat=heartbeat)
    kwargs = {
        "storage": storage,
        "study_name": name,
        "sampler": make_sampler(seed),
        "pruner": make_pruner(epochs),
    }
    try:
        if create:
            return optuna.create_study(direction="maximize", load_if_exists=True, **kwargs)
        return optuna.load_study(**kwargs)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise StudyError(
            f"no study {name!r} in {safe_url(url)}; studies there: {', '.join(names) or 'none'}"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise StudyError(f"cannot use storage {safe_url(url)}: {str(e).splitlines()[0]}") from None


# --- reading a study ------------------------------------------------------------------


def is_rejected(t: FrozenTrial) -> bool:
    """Over the budget: stopped by the gate, never trained."""
    return "rejected" in t.user_attrs


def counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trained (complete + pruned by the median rule), rejected, failed, running."""
    c = {"complete": 0, "pruned": 0, "rejected": 0, "failed": 0, "running": 0}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            c["complete"] += 1
        elif t.state == TrialState.PRUNED:
            c["rejected" if is_rejected(t) else "pruned"] += 1
        elif t.state == TrialState.FAIL:
            c["failed"] += 1
        elif t.state == TrialState.RUNNING:
            c["running"] += 1
    c["trained"] = c["complete"] + c["pruned"]
    return c


def ranked(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials, best validation accuracy first."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return sorted(done, key=lambda t: t.value, reverse=True)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial, or None before the first one finishes."""
    best = ranked(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return best[0] if best else None


# --- one global trial count across workers ----------------------------------------------

SLOT = "slot"  # user attr: the trial holds one of the study's --trials training slots


@contextmanager
def study_lock(url: str, name: str) -> Iterator[None]:
    """A mutex over one study, shared by every worker of it.

    PostgreSQL: a transaction-scoped advisory lock (any number of machines).
    SQLite: an flock on a file beside the database (one machine, as SQLite is).
    """
    parsed = sqlalchemy.engine.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        with open(f"{parsed.database}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    elif backend == "postgresql":
        engine = _lock_engine(url)
        with engine.begin() as conn:
            conn.execute(
                sqlalchemy.text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
                {"k": f"budget-nas:{name}"},
            )
            yield
    else:
        yield  # other databases: the cap may overshoot by up to workers - 1


_ENGINES: dict[str, sqlalchemy.Engine] = {}


def _lock_engine(url: str) -> sqlalchemy.Engine:
    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    return _ENGINES[url]


def slot_holders(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that hold a slot: trained, training, or waiting to be retried."""
    live = (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE, TrialState.PRUNED)
    return [t for t in trials if SLOT in t.user_attrs and t.state in live]


def claim_slot(study: optuna.Study, trial: optuna.Trial, cap: int, url: str) -> bool:
    """Give `trial` one of the `cap` slots, atomically across workers; False if none is left.

    A retried trial (a copy of one whose worker died) keeps the slot it had.
    """
    if SLOT in trial.user_attrs:
        return True
    with study_lock(url, study.study_name):
        held = len(slot_holders(study.get_trials(deepcopy=False)))
        if held >= cap:
            return False
        trial.set_user_attr(SLOT, held)
        return True


def wait_for_slot(study: optuna.Study, cap: int, poll_s: float = 2.0) -> bool:
    """Block until this worker may start a trial (True) or the study is done (False).

    While every slot is held by running trials, a worker waits instead of
    sampling: if a holder's worker died, its trial turns stale, is failed and
    retried, and this worker picks the retry up.
    """
    while True:
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        if counts(trials)["trained"] >= cap:
            return False
        if any(t.state == TrialState.WAITING for t in trials):
            return True
        if len(slot_holders(trials)) < cap:
            return True
        time.sleep(poll_s)
