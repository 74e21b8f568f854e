"""A worker's read of the study (search.cache) and the slot count made in the database
(search.slots.count_holders), on real SQLite and PostgreSQL studies written by another
storage, as another worker would."""

from __future__ import annotations

import uuid

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search.cache import Cache, steady
from search.slots import count_holders, slot_holders
from search.study import SLOT, make_storage


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cache.db"
    return request.getfixturevalue("pg_url")


def two_workers(url: str) -> tuple[optuna.Study, optuna.Study]:
    """The same new study through two storages: one writes, one reads (steady)."""
    name = f"cache-{uuid.uuid4().hex[:8]}"
    writer = optuna.create_study(
        storage=make_storage(url, heartbeat=None), study_name=name, direction="maximize"
    )
    reader = optuna.load_study(study_name=name, storage=make_storage(url, heartbeat=None))
    steady(reader._storage)
    return writer, reader


def test_a_steady_cache_reads_a_running_trial_again_when_its_state_changes(url):
    writer, reader = two_workers(url)
    running = writer.ask()
    running.suggest_float("x", 0, 1)
    assert [t.state for t in reader.get_trials()] == [TrialState.RUNNING]
    running.set_user_attr("late", 1)  # written while it runs: not read again while it runs
    assert "late" not in reader.get_trials()[0].user_attrs
    writer.tell(running, 0.5)
    writer.ask()
    first, second = reader.get_trials()
    assert (first.state, first.value, first.user_attrs) == (TrialState.COMPLETE, 0.5, {"late": 1})
    assert second.state == TrialState.RUNNING
    steady(reader._storage, on=False)  # Optuna's own: every unfinished trial read again
    optuna.Trial(writer, second._trial_id).set_user_attr("late", 2)
    assert reader.get_trials()[1].user_attrs == {"late": 2}


def test_a_steady_read_with_nothing_new_reads_no_trial_whole(url, monkeypatch):
    writer, reader = two_workers(url)
    for _ in range(3):
        writer.ask()
    writer.tell(writer.ask(), 1.0)
    reader.get_trials()
    cache = reader._storage
    assert isinstance(cache, Cache)
    whole = []
    real = cache._backend._get_trials
    monkeypatch.setattr(cache._backend, "_get_trials", lambda *a: whole.append(a) or real(*a))
    reader.get_trials()
    assert whole == []  # three running trials, none changed: only their states were read
    writer.tell(writer.trials[0].number, 0.25)
    writer.ask()
    got = reader.get_trials()
    assert len(whole) == 1
    assert [t.state for t in got] == [TrialState.COMPLETE, TrialState.RUNNING,
                                      TrialState.RUNNING, TrialState.COMPLETE,
                                      TrialState.RUNNING]  # fmt: skip
    assert got[0].value == 0.25


def test_the_slot_count_in_the_database_is_the_holders_of_every_kind(url):
    writer, reader = two_workers(url)
    finished = [
        (TrialState.COMPLETE, {SLOT: 0}),
        (TrialState.PRUNED, {SLOT: 1}),
        (TrialState.FAIL, {SLOT: 2}),  # interrupted: its queued copy holds the slot
        (TrialState.PRUNED, {"rejected": "over the budget"}),
        (TrialState.COMPLETE, {}),
    ]
    for state, attrs in finished:
        writer.add_trial(
            create_trial(
                state=state,
                value=0.5 if state == TrialState.COMPLETE else None,
                intermediate_values={1: 0.4} if state == TrialState.PRUNED else None,
                user_attrs=attrs,
            )
        )
    writer.enqueue_trial({}, user_attrs={SLOT: 2})  # the copy
    writer.enqueue_trial({})  # a preset, no slot yet
    writer.ask()  # the copy: running, slot 2
    preset = writer.ask()  # running, no slot
    writer.enqueue_trial({}, user_attrs={SLOT: 4})  # another copy, waiting
    reader.get_trials()  # cached before the preset took its slot
    preset.set_user_attr(SLOT, 3)
    truth = slot_holders(writer.get_trials())
    assert len(truth) == 5
    assert len(slot_holders(reader.get_trials())) == 4  # the steady cache lags
    assert count_holders(reader) == len(truth)
