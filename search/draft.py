"""A new trial drafted in this process and written to the study in one transaction.

Every `suggest_*`, `set_user_attr` and `set_constraint` of an Optuna trial is a
database transaction of its own (find the trial, check it, insert, commit): a
candidate made about 35 of them before it trained or was rejected, some 300
statements per trained trial (benchmarks/README.md#service-overhead). Here a new
trial is a draft: the sampler reads the study as usual, the trial's own writes
stay in memory, and the draft is written once, finished when the budget gate
rejects it, or RUNNING with its slot when it trains (`Slots.claim`). A trial the
study had queued (a retry, a preset) is in the database already; its writes go
there, as before.

Reads are cut the same way. A draft is sampled on one read of the study (the one
`ask` makes), not one per part of the sampler. A drafted trial that trains reports
to a `Training` storage: its rungs' values stay in the worker until it is told, and
the pruner decides on the study as the worker last read it, so under the median and
percentile rules its rungs make no round trip (benchmarks/README.md#service-overhead).
A queued trial (a retry, a preset), and any under the hyperband pruner, reports to
the study as Optuna does; the successive-halving rule still reads and writes its
rung marks. A trial that another worker failed meanwhile (a heartbeat gap) is now
found out at its tell, not at its next rung.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import random
import time
from collections.abc import Callable, Container, Sequence
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import BaseStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from search.cache import rdb_of


class DraftStorage(BaseStorage):
    """A study's storage in which a new trial is a draft: its id is negative, its writes
    stay here, the study's other trials do not see it (a sampler leaves out the trial
    it samples for anyway). While a draft is sampled, the study is the one read made
    when it was asked for (`seen`)."""

    def __init__(self, backend: BaseStorage) -> None:
        self.backend = backend
        self.drafts: dict[int, FrozenTrial] = {}
        self._ids = itertools.count(-1, -1)
        self.seen: list[FrozenTrial] | None = None  # the study as this worker last read it
        # a trial just written RUNNING, as it was written: opening it as a Trial (which
        # reads it) is served from here once (`write`)
        self.fresh: dict[int, FrozenTrial] = {}
        self.again = False  # the next ask reuses `seen` too (`ask_again`)

    # --- the draft ---------------------------------------------------------------------

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is not None:
            return self.backend.create_new_trial(study_id, template_trial)
        self.drafts.clear()  # one at a time: a new one replaces any an interruption left
        trial_id = next(self._ids)
        self.drafts[trial_id] = FrozenTrial(
            number=-1,  # its number is given when it is written
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.datetime.now(),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=trial_id,
        )
        return trial_id

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:  # fmt: skip
        if trial_id not in self.drafts:
            return self.backend.set_trial_param(
                trial_id, param_name, param_value_internal, distribution
            )
        draft = self.drafts[trial_id]
        draft.params[param_name] = distribution.to_external_repr(param_value_internal)
        draft.distributions[param_name] = distribution

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id not in self.drafts:
            return self.backend.set_trial_user_attr(trial_id, key, value)
        self.drafts[trial_id].user_attrs[key] = value

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id not in self.drafts:
            return self.backend.set_trial_system_attr(trial_id, key, value)
        self.drafts[trial_id].system_attrs[key] = value

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        if trial_id in self.drafts:
            raise RuntimeError("a draft is written, not told: search.draft.write")
        return self.backend.set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        if trial_id in self.drafts:
            raise RuntimeError("a draft does not train; write it first")
        self.backend.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id in self.drafts:
            return copy.deepcopy(self.drafts[trial_id])
        fresh = self.fresh.pop(trial_id, None)
        return fresh if fresh is not None else self.backend.get_trial(trial_id)

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        """The study, read once per draft: `ask` reads it (for a queued trial) before the
        draft exists; the sampler's reads while it is drafted reuse that read."""
        seen = self.reused()
        self.again = False
        if seen is None:
            seen = self.seen = list(self.backend.get_all_trials(study_id, deepcopy=False))
        return _select(seen, deepcopy, states)

    def reused(self) -> list[FrozenTrial] | None:
        """The read that a read of the study now reuses; None: read it."""
        return self.seen if self.drafts or self.again else None

    def ask_again(self) -> None:
        """The next ask reuses the last read, with the drafts written since: right after
        the budget gate rejected a candidate (its worker asks again at once). Rejections
        in a row within `search.worker.RECHECK_S` share one read; what other workers
        wrote meanwhile is read at the ask after."""
        self.again = self.seen is not None

    def discard(self, trial_id: int) -> None:
        """A draft that will not be written (proposed ahead, then not trained)."""
        self.drafts.pop(trial_id, None)

    # --- everything else is the study's storage -----------------------------------------

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        return self.backend.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self.backend.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.backend.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.backend.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.backend.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.backend.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self.backend.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.backend.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.backend.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self.backend.get_all_studies()

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self.backend.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def remove_session(self) -> None:
        self.backend.remove_session()


class Training(DraftStorage):
    """Where the trials a worker trains report, for a trial's rungs to cost no round trip:
    its intermediate values are kept here until it is told (`reported`, written with its
    records), and the pruner reads the study as the worker's proposals last read it
    (`DraftStorage.seen`: at most one trial old for this worker's own results; other
    workers' as of then). Everything else is the study's storage."""

    def __init__(self, drafts: DraftStorage) -> None:
        super().__init__(drafts.backend)
        self.source = drafts
        self.fresh = drafts.fresh  # a claimed draft opens as a trial of this study
        self.reports: dict[int, dict[int, float]] = {}

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self.reports.setdefault(trial_id, {})[step] = intermediate_value

    def reused(self) -> list[FrozenTrial] | None:
        return self.source.seen

    def reported(self, trial_id: int) -> dict[int, float]:
        """The trial's intermediate values, to be written now (they are forgotten here)."""
        return self.reports.pop(trial_id, {})


def _select(
    trials: list[FrozenTrial], deepcopy: bool, states: Container[TrialState] | None
) -> list[FrozenTrial]:
    if states is not None:
        trials = [t for t in trials if t.state in states]
    return copy.deepcopy(trials) if deepcopy else trials


def training(drafts: optuna.Study) -> optuna.Study | None:
    """The study the trials a worker trains report to (`Training`); None under the
    hyperband pruner, whose brackets need no drafts (`drafting`): reports go to the study."""
    if not isinstance(drafts._storage, DraftStorage):
        return None
    storage = Training(drafts._storage)
    return optuna.Study(drafts.study_name, storage, drafts.sampler, drafts.pruner)


def ask_again(drafts: optuna.Study) -> None:
    """The next ask of `drafts` reuses the worker's last read (`DraftStorage.ask_again`);
    under the hyperband pruner, whose asks are Optuna's, nothing."""
    if isinstance(drafts._storage, DraftStorage):
        drafts._storage.ask_again()


def drafting(study: optuna.Study) -> optuna.Study:
    """The same study, with its sampler and pruner, in which `ask()` drafts a new trial
    (a queued one it takes from the database, as Optuna does). Under the hyperband
    pruner, the study itself: a trial's bracket comes from its number, which a draft
    does not have yet."""
    if isinstance(study.pruner, optuna.pruners.HyperbandPruner):
        return study
    return optuna.Study(study.study_name, DraftStorage(study._storage), study.sampler, study.pruner)


def is_draft(trial: optuna.Trial) -> bool:
    return isinstance(trial.storage, DraftStorage) and trial._trial_id in trial.storage.drafts


def write(
    study: optuna.Study,
    trial: optuna.Trial,
    state: TrialState,
    attrs_of: Callable[[int], dict[str, Any]] | None = None,
    **user_attrs: Any,
) -> FrozenTrial:
    """Write a draft of `study` in one transaction, with `user_attrs` added (and those
    `attrs_of` its number gives: a trial's seed), finished or RUNNING; the trial as
    written (as the study would read it back, without the round trip). A finished one
    is told to the sampler, as `tell` does; a RUNNING one is next opened as a trial
    (`Slots.claim`), which reads it: that read is served from here."""
    drafts = trial.storage
    draft = drafts.drafts.pop(trial._trial_id)
    draft.state = state
    draft.user_attrs.update(user_attrs)
    if state.is_finished():
        draft.datetime_complete = datetime.datetime.now()
    draft._trial_id, draft.number = insert(study._storage, study._study_id, draft, attrs_of)
    for attrs in (draft.user_attrs, draft.system_attrs):  # as stored: JSON
        attrs.update(json.loads(json.dumps(attrs)))
    if drafts.seen is not None:  # the worker's last read of the study, now with this trial
        drafts.seen = [*drafts.seen, draft]
    if state.is_finished():
        study.sampler.after_trial(study, copy.deepcopy(draft), state, None)
    else:
        drafts.fresh.clear()
        drafts.fresh[draft._trial_id] = copy.deepcopy(draft)
    return draft


def insert(
    storage: BaseStorage,
    study_id: int,
    t: FrozenTrial,
    attrs_of: Callable[[int], dict[str, Any]] | None = None,
) -> tuple[int, int]:
    """`storage.create_new_trial(study_id, template_trial=t)` in one insert per table, with
    the user attributes `attrs_of` the new trial's number gives added to `t`; the new
    trial's id and number.

    Optuna's RDB storage writes a template trial one row at a time, each after
    finding the trial again and, for a parameter, reading an earlier trial's
    distribution to check it is compatible: about 130 statements, 0.1 s on a local
    PostgreSQL (benchmarks/README.md#service-overhead). The space fixes every
    parameter's distribution (search/space.py, SPACE_VERSION), so here the rows go in
    at once, as plain inserts (the ORM's unit of work cost more CPU than the database
    did), under the same study-row lock that makes the trial's number unique (the
    number of the study's trials before it). Times are stored as Optuna stores them:
    naive UTC.
    Other storages, and a trial with intermediate values, take Optuna's path.
    """
    rdb = rdb_of(storage)
    if rdb is None or t.intermediate_values:
        trial_id = storage.create_new_trial(study_id, template_trial=t)
        number = storage.get_trial(trial_id).number
        for key, value in (attrs_of(number) if attrs_of else {}).items():
            storage.set_trial_user_attr(trial_id, key, value)
            t.user_attrs[key] = value
        return trial_id, number
    from optuna.exceptions import StorageInternalError

    trials = models.TrialModel.__table__
    for attempt in range(1, 6):  # Optuna's retries: a deadlock between workers
        try:
            with _create_scoped_session(rdb.scoped_session) as session:
                models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                # inserted first, then numbered, as Optuna does: on SQLite the FOR UPDATE is
                # void and only the first write takes the lock that makes the count exact
                trial_id = session.execute(
                    sqlalchemy.insert(trials).values(
                        study_id=study_id,
                        number=None,
                        state=t.state,
                        datetime_start=_utc(t.datetime_start),
                        datetime_complete=_utc(t.datetime_complete),
                    )
                ).inserted_primary_key[0]  # RETURNING where the database has it, else its last id
                number = session.scalar(
                    sqlalchemy.select(sqlalchemy.func.count(trials.c.trial_id)).where(
                        trials.c.study_id == study_id, trials.c.trial_id < trial_id
                    )
                )
                session.execute(
                    sqlalchemy.update(trials)
                    .where(trials.c.trial_id == trial_id)
                    .values(number=number)
                )
                t.user_attrs.update(attrs_of(number) if attrs_of else {})
                for model, rows in rows_of(trial_id, t).items():
                    if rows:
                        session.execute(sqlalchemy.insert(model.__table__), rows)
                return trial_id, number
        except StorageInternalError:
            if attempt == 5:
                raise
            time.sleep(random.random() * 2.0)
    raise AssertionError("not reached")


def _utc(when: datetime.datetime | None) -> datetime.datetime | None:
    """A local time as Optuna's RDB storage stores it: naive UTC (its ORM's setter)."""
    return None if when is None else when.astimezone(datetime.UTC).replace(tzinfo=None)


def record(
    storage: BaseStorage, trial_id: int, user_attrs: dict[str, Any], reported: dict[int, float]
) -> None:
    """A running trial's user attributes and intermediate values, stored as Optuna's RDB
    storage stores them, in one transaction of a few statements (Optuna's finds the
    trial again and looks for the row before each write: some 16 statements a trained
    trial); other storages, a call each. A trial another worker ended meanwhile raises
    UpdateFinishedTrialError, as Optuna's writes do."""
    rdb = rdb_of(storage)
    if rdb is None:
        for step, value in reported.items():
            storage.set_trial_intermediate_value(trial_id, step, value)
        for key, value in user_attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        return

    trials = models.TrialModel
    values = models.TrialIntermediateValueModel
    attrs = models.TrialUserAttributeModel
    with _create_scoped_session(rdb.scoped_session, True) as session:
        state = session.scalar(sqlalchemy.select(trials.state).where(trials.trial_id == trial_id))
        if state is None:
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        rdb.check_trial_is_updatable(trial_id, state)
        if reported:
            session.execute(
                sqlalchemy.delete(values.__table__).where(
                    values.trial_id == trial_id, values.step.in_(list(reported))
                )
            )
            rows = []
            for step, value in reported.items():
                stored, kind = values.intermediate_value_to_stored_repr(value)
                rows.append({"trial_id": trial_id, "step": step, "intermediate_value": stored,
                             "intermediate_value_type": kind})  # fmt: skip
            session.execute(sqlalchemy.insert(values.__table__), rows)
        if user_attrs:
            session.execute(
                sqlalchemy.delete(attrs.__table__).where(
                    attrs.trial_id == trial_id, attrs.key.in_(list(user_attrs))
                )
            )
            session.execute(
                sqlalchemy.insert(attrs.__table__),
                [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                 for k, v in user_attrs.items()],
            )  # fmt: skip


def rows_of(trial_id: int, t: FrozenTrial) -> dict[type, list[dict[str, Any]]]:
    """The value, parameter and attribute rows of `t`, as Optuna's RDB storage stores
    them, by model."""
    values = []
    for objective, value in enumerate(t.values or []):
        stored, kind = models.TrialValueModel.value_to_stored_repr(value)
        values.append({"trial_id": trial_id, "objective": objective, "value": stored,
                       "value_type": kind})  # fmt: skip
    params = [
        {"trial_id": trial_id, "param_name": name,
         "param_value": t.distributions[name].to_internal_repr(value),
         "distribution_json": distribution_to_json(t.distributions[name])}
        for name, value in t.params.items()
    ]  # fmt: skip
    return {
        models.TrialValueModel: values,
        models.TrialParamModel: params,
        models.TrialUserAttributeModel: [
            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
            for k, v in t.user_attrs.items()
        ],
        models.TrialSystemAttributeModel: [
            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
            for k, v in t.system_attrs.items()
        ],
    }


def written(study: optuna.Study, trial_id: int) -> FrozenTrial:
    """The trial as the study has it now (a copy, as `tell` returns)."""
    return copy.deepcopy(study._storage.get_trial(trial_id))
