"""Storage URL -> study: SQLite or PostgreSQL through Optuna's RDBStorage.

Creating and resuming are the same call (`load_if_exists`), so any number of
workers can run it at once. RDB storages get a heartbeat; a trial whose
worker died is failed and retried by Optuna's `RetryHeartbeatStaleTrialCallback`,
at once when its process is known to be gone (same host, pid gone), else
after the grace period. A global trial count holds across workers through
slots claimed under a lock.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import random
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from search.cache import Cache

# Heartbeat, group, fail_stale_trials and the retry callback are marked experimental in
# Optuna; they are deliberate choices here, so the warnings are noise for a user. The
# worker runs the storage's heartbeat around each trial itself (`heartbeat` below), as
# Study.optimize does; Optuna's warning on ask() assumes nobody does.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

HEARTBEAT_S = 30
GRACE_S = 120
MAX_RETRY = 2
SCHEMA_ATTEMPTS = 5  # opening a new database: the race to create its tables
PRUNERS = ("median", "percentile", "halving", "hyperband", "none")
DEFAULT_PRUNER = "median"  # chosen by measurement: benchmarks/README.md#pruners
# The median rule from the first completed trial on: replayed on 100 measured candidates
# (benchmarks/rung_ranking.py), waiting for 5 costs most of what pruning saves.
PRUNER_STARTUP = 1
SLOT = "slot"  # user attr: the trial holds one of the study's --trials training slots
INTERRUPTED = "interrupted_trials"  # system attr: the retries in its history that were stops


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


class Retry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a failed trial, keeping what the candidate is and its slot,
    not how its last run went (who ran it, why it stopped).

    `max_retry` counts crashes only (a dead worker, a stale heartbeat). An
    interruption (`interrupted=True`: Ctrl-C, a preemption) is not the candidate's
    fault: it is retried always and does not use up its crash retries, although
    Optuna's `retry_history` lists it like any other retry.
    """

    KEEP = ("arch", "params", "macs", "bytes", "preset", SLOT)

    def __init__(self, max_retry: int | None = MAX_RETRY, interrupted: bool = False) -> None:
        super().__init__(max_retry=None)  # the limit is checked here, on crashes only
        self.crash_limit, self.interrupted = max_retry, interrupted

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        candidate = copy.deepcopy(trial)  # Optuna appends to its retry history in place
        candidate.user_attrs = {k: v for k, v in candidate.user_attrs.items() if k in self.KEEP}
        # The gate sets the constraints again when the copy runs.
        candidate.system_attrs = {
            k: v for k, v in candidate.system_attrs.items() if not k.startswith("constraints")
        }
        interrupted = list(trial.system_attrs.get(INTERRUPTED, []))
        if self.interrupted:
            interrupted.append(trial.number)
        candidate.system_attrs[INTERRUPTED] = interrupted
        crashes = len(self.retry_history(trial)) + 1 - len(interrupted)
        if self.crash_limit is not None and crashes > self.crash_limit:
            print(
                f"warning: trial {trial.number} failed {crashes} times (crashes, not "
                f"interruptions); its candidate is not retried again",
                file=sys.stderr,
            )
            return
        super().__call__(study, candidate)


Heartbeat = tuple[int, int] | None  # (interval, grace period) in seconds; None: off


def make_storage(url: str, heartbeat: Heartbeat = (HEARTBEAT_S, GRACE_S)) -> Cache:
    """An RDBStorage with pool settings fit for one worker process, in the cache Optuna
    would wrap it in (one that a worker can make `steady`: search.cache)."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StudyError(
            "the storage is not a database URL; use sqlite:///path.db or "
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
            "heartbeat_stale_trial_callback": Retry(MAX_RETRY),
        }
    try:
        return Cache(open_rdb(url, engine_kwargs, hb))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as e:
        reason = str(e).splitlines()[0]
        if url in reason:
            reason = reason.replace(url, safe_url(url))
        raise StudyError(f"cannot open storage {safe_url(url)}: {reason}") from None


def open_rdb(url: str, engine_kwargs: dict[str, Any], hb: dict[str, Any]) -> RDBStorage:
    """Optuna's RDBStorage. Workers that open a new database at once race to create its
    tables; a loser finds them made (or being made) and tries again."""
    attempt = 0
    while True:
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, **hb)
        except sqlalchemy.exc.DBAPIError as e:
            racing = isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e)
            attempt += 1
            if not racing or attempt == SCHEMA_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt + 0.3 * random.random())


def derived_seed(*parts: object) -> int:
    """A well-spread 31-bit seed from a study seed and what tells runs apart."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


def make_pruner(
    kind: str, rung_images: list[int], startup: int = PRUNER_STARTUP
) -> optuna.pruners.BasePruner:
    """Steps are the images seen at each rung, the same in every trial of a study.

    `startup`: trials that run to the end before the median and percentile rules
    prune anything.
    """
    first, last = rung_images[0], rung_images[-1]
    factor = max(2, round(rung_images[1] / first)) if len(rung_images) > 1 else 3
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
    if kind == "percentile":  # keeps the top quarter at each rung
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=startup, n_warmup_steps=0)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=first, reduction_factor=factor, min_early_stopping_rate=0
        )
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first, max_resource=last, reduction_factor=factor
        )
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner must be one of {', '.join(PRUNERS)}, got {kind!r}")


def open_study(
    url: str,
    name: str,
    *,
    pruner: optuna.pruners.BasePruner | None = None,
    create: bool = True,
    heartbeat: Heartbeat = (HEARTBEAT_S, GRACE_S),
) -> optuna.Study:
    """Create or resume (`create=True`), or load an existing study (`create=False`).

    The sampler is a placeholder: a worker sets its own (search.sampler) once it has
    claimed its number (`join`); reading a study samples nothing.
    """
    storage = make_storage(url, heartbeat=heartbeat)
    kwargs = {"storage": storage, "study_name": name, "sampler": optuna.samplers.RandomSampler()}
    if pruner is not None:
        kwargs["pruner"] = pruner
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


@contextmanager
def study_lock(url: str | None, name: str) -> Iterator[None]:
    """A mutex over one study, shared by every worker of it.

    PostgreSQL: a transaction-scoped advisory lock (any number of machines).
    SQLite: an flock on a file beside the database (one machine, as SQLite is).
    No URL (an in-memory study): one process, nothing to lock.
    """
    parsed = sqlalchemy.engine.make_url(url) if url else None
    backend = parsed.get_backend_name() if parsed else None
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        with open(f"{parsed.database}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    elif backend == "postgresql":
        with _lock_engine(url).begin() as conn:
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
        # One connection kept: a new PostgreSQL connection is a server process started,
        # and the lock is taken twice a trial.
        _ENGINES[url] = sqlalchemy.create_engine(
            url, pool_size=1, max_overflow=1, pool_pre_ping=True, pool_recycle=1800
        )
    return _ENGINES[url]


# --- a study's settings ------------------------------------------------------------------


def record_or_check(study: optuna.Study, settings: dict[str, Any], url: str | None) -> None:
    """Record the settings on a new study; on an existing one, refuse any difference.

    Trials scored on another split, budget or profile are not comparable, so a
    resume with other settings is an error (StudyError), never a silent mix.
    """
    with study_lock(url, study.study_name):
        attrs = study.user_attrs
        if "settings" not in attrs:
            study.set_user_attr("settings", settings)
            for key in ("budget", "dataset", "seed"):  # shown by optuna-dashboard's study list
                study.set_user_attr(key, settings[key])
            return
    recorded = attrs["settings"]
    if recorded.get("seed") != settings["seed"]:
        raise StudyError(
            f"study {study.study_name!r} was made with --seed {recorded.get('seed')}, "
            f"this run has --seed {settings['seed']}; the seed chooses the validation split, "
            "so use the same seed or another --study-name"
        )
    diff = [
        f"{k} {recorded.get(k)!r} (this run: {v!r})"
        for k, v in settings.items()
        if recorded.get(k) != v
    ]
    if diff:
        raise StudyError(
            f"study {study.study_name!r} was made with different settings: "
            f"{'; '.join(diff)}. Use another --study-name, or the same settings"
        )


def join(study: optuna.Study, url: str | None, seed: int) -> tuple[int, int]:
    """This process's worker number in the study, and its own sampler seed.

    Workers with one seed would propose the same candidates; the seed is
    derived from the study seed and the worker number, so it is reproducible.
    """
    with study_lock(url, study.study_name):
        number = int(study.user_attrs.get("workers", 0))
        study.set_user_attr("workers", number + 1)
    return number, derived_seed(seed, "worker", number)


# --- heartbeats ------------------------------------------------------------------------


@contextmanager
def heartbeat(trial: optuna.Trial) -> Iterator[None]:
    """The heartbeat `study.optimize` runs around a trial, for the ask-and-tell loop.

    Unlike Optuna's own thread (which ends at the first database error, and other
    workers then fail a trial that is still training), a failed beat is reported
    and the next one is tried. It calls the storage's `record_heartbeat`, which
    Optuna's heartbeat interface declares; tests/test_faults.py pins what it uses.
    """
    storage = getattr(trial.storage, "backend", trial.storage)  # a worker's (search.draft)
    interval = storage.get_heartbeat_interval() if hasattr(storage, "record_heartbeat") else None
    if not interval:
        yield
        return
    trial_id = trial._trial_id  # as Study.optimize's own heartbeat has it
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            try:
                storage.record_heartbeat(trial_id)
            except Exception as e:  # the database may be back by the next beat
                print(f"warning: heartbeat of trial {trial.number} failed: {e}", file=sys.stderr)
            done.wait(interval)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
