"""Storage URL -> study: SQLite or PostgreSQL through Optuna's RDBStorage.

Creating and resuming are the same call (`load_if_exists`), so any number of
workers can run it at once. RDB storages get a heartbeat, and a trial whose
worker died is failed and retried by `RetryHeartbeatStaleTrialCallback`.
"""

from __future__ import annotations

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


def make_storage(url: str, heartbeat: bool = True) -> RDBStorage:
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
            "heartbeat_interval": HEARTBEAT_S,
            "grace_period": GRACE_S,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(MAX_RETRY),
        }
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, **hb)
    except (sqlalchemy.exc.SQLAlchemyError, ModuleNotFoundError, OSError) as e:
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
    heartbeat: bool = True,
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


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial, or None before the first one finishes."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=lambda t: t.value) if done else None
