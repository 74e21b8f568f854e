"""A study's trials as a worker reads them: each trial read whole once, and again only
when its state changes.

Optuna wraps its RDB storage in `_CachedStorage`, which keeps the finished trials and
reads every unfinished one again, whole, on each read of the study. With 16 workers
that is 16 running trials of some 40 rows each, six queries and about 15 ms of a
core per read, several reads per proposal: most of a worker's time between trials
(benchmarks/README.md#service-overhead). A trial a worker drafted does not change in
the database while it runs (search.draft: its reports stay in its worker until it is
told), so a steady cache first asks for the states of the trials it holds
unfinished and the ids of trials newer than any it holds (one small query), and
reads whole only those that are new, whose state changed, that this worker wrote to,
or that are not yet settled: a queued trial (a retry, a preset) is taken RUNNING
and gets its slot and process only later, which a worker counting slots or looking
for dead workers must see (`search.worker.settled`).

What another worker's settled running trial writes while its state stays (a queued
trial's parameters as it samples them, the halving rules' rung marks, reports made
to the study) is seen here when it ends, so a worker is steady only when its study
drafts and its pruner is not a halving rule (`search.worker.Loop`), and the slot
count that must be exact is counted in the database (`search.slots.Slots.claim`).
New trials are found by id: a trial's id is taken under the study's row lock
(Optuna's `_create_new_trial`, `search.draft.insert`), so ids are committed in
order and none appears below one already read.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState


class Cache(_CachedStorage):
    """Optuna's cached RDB storage; made steady (`steady`), a running trial is read again
    only when its state changes, until it is settled, or after this process wrote to it."""

    def __init__(self, backend: RDBStorage) -> None:
        super().__init__(backend)
        # None: Optuna's reads. Else steady, and a running trial for which it is False is
        # read again at every read (a queued trial whose worker has not yet written its
        # slot and process: search.worker.settled).
        self.settled: Callable[[FrozenTrial], bool] | None = None
        self.written: set[int] = set()  # running trials this worker wrote to: read again

    def _wrote(self, trial_id: int) -> None:
        with self._lock:  # the ahead thread writes while the main thread reads, and back
            self.written.add(trial_id)

    def set_trial_param(self, trial_id: int, *args: Any) -> None:
        super().set_trial_param(trial_id, *args)
        self._wrote(trial_id)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_user_attr(trial_id, key, value)
        self._wrote(trial_id)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_system_attr(trial_id, key, value)
        self._wrote(trial_id)

    def set_trial_intermediate_value(self, trial_id: int, step: int, value: float) -> None:
        super().set_trial_intermediate_value(trial_id, step, value)
        self._wrote(trial_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        """Optuna's: a finished trial from the cache, else read from the database (every
        tell reads its trial), here with `read_whole`'s plain queries instead of the ORM."""
        with self._lock:
            trial = self._get_cached_trial(trial_id)
            known = self._trial_id_to_study_id_and_number.get(trial_id)
        if trial is not None:
            return trial
        if known is not None:
            found = read_whole(self._backend, known[0], {trial_id})
            if found:
                return found[0]
        return self._backend.get_trial(trial_id)  # unknown here: Optuna's read, its errors

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        settled = self.settled
        if settled is None:
            with self._lock:
                self.written.clear()
            return super()._read_trials_from_remote_storage(study_id)
        with self._lock:
            study = self._studies.setdefault(study_id, _StudyInfo())
            held = study.unfinished_trial_ids
            newest = max([study.last_finished_trial_id, *held])
            found = self._states(study_id, newest, held)
            changed = {i for i, s in found.items() if i <= newest and self._cached(i).state != s}
            changed |= self.written & held
            changed |= {i for i in held if not settled(self._cached(i))}
            self.written.clear()
            if not changed and all(i <= newest for i in found):
                return
            trials = read_whole(self._backend, study_id, changed, newest)
            self._add_trials_to_cache(study_id, trials)
            for t in trials:
                if t.state.is_finished():
                    held.discard(t._trial_id)
                    study.last_finished_trial_id = max(study.last_finished_trial_id, t._trial_id)
                else:
                    held.add(t._trial_id)

    def _states(self, study_id: int, newest: int, held: set[int]) -> dict[int, TrialState]:
        """The states of the trials `held` and of every trial newer than `newest`."""
        trial = models.TrialModel
        query = sqlalchemy.select(trial.trial_id, trial.state).where(
            _newer_or(study_id, newest, held)
        )
        with _create_scoped_session(self._backend.scoped_session) as session:
            return {i: s for i, s in session.execute(query)}

    def _cached(self, trial_id: int) -> FrozenTrial:
        study_id, number = self._trial_id_to_study_id_and_number[trial_id]
        return self._studies[study_id].trials[number]


def read_whole(
    rdb: RDBStorage, study_id: int, ids: set[int], newer: int | None = None
) -> list[FrozenTrial]:
    """The trials `ids` and those newer than `newer`, whole, as Optuna's `_get_trials` reads
    them, in six plain queries: without its ORM objects (a Python object per row, and a
    JSON parse per parameter of every trial for its distribution), a read costs a
    fraction of the CPU. Ordered by id."""
    m, t = models, models.TrialModel
    which = _newer_or(study_id, newer, ids)
    wanted: Any = sqlalchemy.select(t.trial_id).where(which)  # the parts of a big read

    def of(model: Any, *columns: str) -> sqlalchemy.Select:
        cols = [getattr(model, c) for c in ("trial_id", *columns)]
        return sqlalchemy.select(*cols).where(model.trial_id.in_(wanted))

    def rows_of(query: sqlalchemy.Select) -> Iterator[Any]:
        """A statement's rows, of the trials the first one found (one committed since is
        read at the next read; a state it changed since is found then too)."""
        return (row for row in session.execute(query) if row[0] in parts)

    inter = m.TrialIntermediateValueModel
    with _create_scoped_session(rdb.scoped_session) as session:
        trials = sqlalchemy.select(t.trial_id, t.number, t.state, t._datetime_start_utc,
                                   t._datetime_complete_utc).where(which)  # fmt: skip
        rows = {i: row for i, *row in session.execute(trials)}
        if len(rows) <= _LISTED:  # by id: PostgreSQL plans the subquery as a scan of every
            wanted = list(rows)  # row of each table (5 ms a query at 3,000 trials)
        parts: dict[int, dict[str, dict]] = {
            i: {"values": {}, "params": {}, "dists": {}, "user": {}, "system": {}, "inter": {}}
            for i in rows
        }
        for i, k, value, kind in rows_of(of(m.TrialValueModel, "objective", "value",
                                                    "value_type")):  # fmt: skip
            parts[i]["values"][k] = m.TrialValueModel.stored_repr_to_value(value, kind)
        params = of(m.TrialParamModel, "param_name", "param_value", "distribution_json")
        for i, name, value, text in rows_of(params.order_by(m.TrialParamModel.param_id)):
            d = parts[i]["dists"][name] = _distribution(text)
            parts[i]["params"][name] = d.to_external_repr(value)
        for i, key, text in rows_of(of(m.TrialUserAttributeModel, "key", "value_json")):
            parts[i]["user"][key] = json.loads(text)
        for i, key, text in rows_of(of(m.TrialSystemAttributeModel, "key", "value_json")):
            parts[i]["system"][key] = json.loads(text)
        steps = of(inter, "step", "intermediate_value", "intermediate_value_type")
        for i, step, value, kind in rows_of(steps):
            parts[i]["inter"][step] = inter.stored_repr_to_intermediate_value(value, kind)
    out = []
    for i in sorted(rows):
        number, state, start, end = rows[i]
        p = parts[i]
        values = [p["values"][k] for k in sorted(p["values"])] or None
        out.append(FrozenTrial(number, state, None, _local(start), _local(end), p["params"],
                               p["dists"], p["user"], p["system"], p["inter"], i,
                               values=values))  # fmt: skip
    return out


_LISTED = 500  # trials read whole by their ids; more (a first read): by the subquery


def _newer_or(study_id: int, newer: int | None, ids: set[int]) -> sqlalchemy.ColumnElement[bool]:
    """The study's trials newer than `newer` (None: none), and those of `ids`."""
    t = models.TrialModel
    if newer is None:
        return sqlalchemy.and_(t.study_id == study_id, t.trial_id.in_(ids))
    return sqlalchemy.and_(
        t.study_id == study_id, sqlalchemy.or_(t.trial_id > newer, t.trial_id.in_(ids))
    )


def _local(utc: datetime.datetime | None) -> datetime.datetime | None:
    """A stored naive-UTC time as the naive local time Optuna's trials carry."""
    if utc is None:
        return None
    return utc.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None)


@functools.lru_cache(maxsize=1024)
def _distribution(text: str) -> BaseDistribution:
    """A parameter's distribution, parsed once per process: a space has a few dozen."""
    return json_to_distribution(text)


def steady(storage: BaseStorage, settled: Callable[[FrozenTrial], bool] | None) -> None:
    """Make the cache under `storage` (itself, or what a draft storage wraps) steady, with
    `settled` (`Cache.settled`; None: Optuna's reads again); nothing for other storages."""
    cache = getattr(storage, "backend", storage)  # under search.draft.DraftStorage
    if isinstance(cache, Cache):
        cache.settled = settled


def rdb_of(storage: BaseStorage) -> RDBStorage | None:
    """The RDB storage under `storage` (a draft storage, a cache); None if there is none."""
    storage = getattr(storage, "backend", storage)  # under search.draft.DraftStorage
    storage = getattr(storage, "_backend", storage)  # under Optuna's _CachedStorage
    return storage if isinstance(storage, RDBStorage) else None
