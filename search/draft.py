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
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import random
import time
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState


class DraftStorage(BaseStorage):
    """A study's storage in which a new trial is a draft: its id is negative, its writes
    stay here, the study's other trials do not see it (a sampler leaves out the trial
    it samples for anyway)."""

    def __init__(self, backend: BaseStorage) -> None:
        self.backend = backend
        self.drafts: dict[int, FrozenTrial] = {}
        self._ids = itertools.count(-1, -1)

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
        return self.backend.get_trial(trial_id)

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        return self.backend.get_all_trials(study_id, deepcopy=deepcopy, states=states)

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


def write(study: optuna.Study, trial: optuna.Trial, state: TrialState, **user_attrs: Any) -> int:
    """Write a draft of `study` in one transaction, with `user_attrs` added, finished or
    RUNNING; its trial id. A finished one is told to the sampler, as `tell` does."""
    draft = trial.storage.drafts.pop(trial._trial_id)
    draft.state = state
    draft.user_attrs.update(user_attrs)
    if state.is_finished():
        draft.datetime_complete = datetime.datetime.now()
    trial_id = insert(study._storage, study._study_id, draft)
    if state.is_finished():
        study.sampler.after_trial(study, written(study, trial_id), state, None)
    return trial_id


def insert(storage: BaseStorage, study_id: int, t: FrozenTrial) -> int:
    """`storage.create_new_trial(study_id, template_trial=t)` in one flush of rows.

    Optuna's RDB storage writes a template trial one row at a time, each after
    finding the trial again and, for a parameter, reading an earlier trial's
    distribution to check it is compatible: about 130 statements, 0.1 s on a local
    PostgreSQL (benchmarks/README.md#service-overhead). The space fixes every
    parameter's distribution (search/space.py, SPACE_VERSION), so here the rows go in
    at once, under the same study-row lock that makes the trial's number unique.
    Other storages, and a trial with intermediate values, take Optuna's path.
    """
    rdb = getattr(storage, "_backend", storage)  # under Optuna's _CachedStorage
    if not isinstance(rdb, optuna.storages.RDBStorage) or t.intermediate_values:
        return storage.create_new_trial(study_id, template_trial=t)
    from optuna.exceptions import StorageInternalError
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    for attempt in range(1, 6):  # Optuna's retries: a deadlock between workers
        try:
            with _create_scoped_session(rdb.scoped_session) as session:
                models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                row = models.TrialModel(
                    study_id=study_id,
                    number=None,
                    state=t.state,
                    datetime_start=t.datetime_start,
                    datetime_complete=t.datetime_complete,
                )
                session.add(row)
                session.flush()
                session.add_all(rows_of(row.trial_id, t))
                row.number = row.count_past_trials(session)
                return row.trial_id
        except StorageInternalError:
            if attempt == 5:
                raise
            time.sleep(random.random() * 2.0)
    raise AssertionError("not reached")


def rows_of(trial_id: int, t: FrozenTrial) -> list[Any]:
    """The value, parameter and attribute rows of `t`, as Optuna's RDB storage stores them."""
    from optuna.storages._rdb import models

    rows: list[Any] = []
    for objective, value in enumerate(t.values or []):
        stored, kind = models.TrialValueModel.value_to_stored_repr(value)
        rows.append(
            models.TrialValueModel(
                trial_id=trial_id, objective=objective, value=stored, value_type=kind
            )
        )
    for name, value in t.params.items():
        dist = t.distributions[name]
        rows.append(
            models.TrialParamModel(
                trial_id=trial_id,
                param_name=name,
                param_value=dist.to_internal_repr(value),
                distribution_json=distribution_to_json(dist),
            )
        )
    for key, value in t.user_attrs.items():
        rows.append(
            models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value))
        )
    for key, value in t.system_attrs.items():
        rows.append(
            models.TrialSystemAttributeModel(
                trial_id=trial_id, key=key, value_json=json.dumps(value)
            )
        )
    return rows


def written(study: optuna.Study, trial_id: int) -> FrozenTrial:
    """The trial as the study has it now (a copy, as `tell` returns)."""
    return copy.deepcopy(study._storage.get_trial(trial_id))
