"""A worker's read of the study (search.cache) and the slot count made in the database
(search.slots.count_holders), on real SQLite and PostgreSQL studies written by another
storage, as another worker would."""

from __future__ import annotations

import uuid

import optuna
import pytest
from optuna.trial import TrialState, create_trial

import search.cache
from search.cache import Cache, read_whole, steady
from search.slots import count_holders, slot_holders
from search.study import SLOT, make_storage
from search.worker import settled


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
    steady(reader._storage, settled)
    return writer, reader


def drafted(study: optuna.Study, slot: int) -> optuna.Trial:
    """A running trial as a worker writes a draft it claims: with its slot and process."""
    trial = study.ask()
    trial.set_user_attr(SLOT, slot)
    trial.set_user_attr("process", {"host": "elsewhere", "pid": 1})
    return trial


def test_a_steady_cache_reads_a_running_trial_again_when_its_state_changes(url):
    writer, reader = two_workers(url)
    running = drafted(writer, 0)
    running.suggest_float("x", 0, 1)
    assert [t.state for t in reader.get_trials()] == [TrialState.RUNNING]
    running.set_user_attr("late", 1)  # written while it runs: not read again while it runs
    assert "late" not in reader.get_trials()[0].user_attrs
    writer.tell(running, 0.5)
    drafted(writer, 1)
    first, second = reader.get_trials()
    assert (first.state, first.value, first.user_attrs["late"]) == (TrialState.COMPLETE, 0.5, 1)
    assert second.state == TrialState.RUNNING
    steady(reader._storage, None)  # Optuna's own: every unfinished trial read again
    optuna.Trial(writer, second._trial_id).set_user_attr("late", 2)
    assert reader.get_trials()[1].user_attrs["late"] == 2


def test_a_steady_read_with_nothing_new_reads_no_trial_whole(url, monkeypatch):
    writer, reader = two_workers(url)
    for slot in range(3):
        drafted(writer, slot)
    writer.tell(drafted(writer, 3), 1.0)
    reader.get_trials()
    cache = reader._storage
    assert isinstance(cache, Cache)
    whole = []

    def counted(rdb, *a):  # the reader's reads (the writer's tells read their trial)
        if rdb is cache._backend:
            whole.append(a)
        return read_whole(rdb, *a)

    monkeypatch.setattr(search.cache, "read_whole", counted)
    reader.get_trials()
    assert whole == []  # three running trials, none changed: only their states were read
    writer.tell(writer.trials[0].number, 0.25)
    drafted(writer, 4)
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
    writer.ask().set_user_attr("process", {"pid": 1})  # the copy: running, slot 2
    preset = writer.ask()  # running, no slot, no process yet
    writer.enqueue_trial({}, user_attrs={SLOT: 4})  # another copy, waiting
    reader.get_trials()  # cached before the preset took its slot
    preset.set_user_attr(SLOT, 3)
    truth = slot_holders(writer.get_trials())
    assert len(truth) == 5
    assert count_holders(reader) == len(truth)
    # not settled (no process yet): the steady reader reads it again, and sees its slot
    assert len(slot_holders(reader.get_trials())) == 5
    preset.set_user_attr("process", {"pid": 2})
    reader.get_trials()
    preset.set_user_attr("late", 1)  # settled now: seen when it ends
    assert "late" not in reader.get_trials()[6].user_attrs


def test_a_whole_read_is_the_trials_optuna_reads(url, monkeypatch):
    """`read_whole` (plain queries) against Optuna's own `_get_trials` (its ORM), on
    trials of every state with parameters of every kind, attributes and reports."""
    writer, _ = two_workers(url)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        trial.suggest_int("blocks", 1, 4)
        trial.suggest_categorical("act", ["relu", "silu"])
        trial.set_user_attr("training", {"lr": x, "epochs": [1, 2]})
        trial.report(float("inf") if trial.number == 1 else x, 100)
        if trial.number == 2:
            raise optuna.TrialPruned
        if trial.number == 3:
            raise RuntimeError("failed")
        return -x if trial.number else float("-inf")

    writer.optimize(objective, n_trials=5, catch=(RuntimeError,))
    writer.enqueue_trial({"blocks": 2}, user_attrs={SLOT: 1})
    writer.ask().suggest_float("lr", 1e-4, 1.0, log=True)  # running
    writer.enqueue_trial({"blocks": 3})  # waiting
    rdb, study_id = writer._storage._backend, writer._study_id
    ours, optunas = read_whole(rdb, study_id, set(), -1), rdb._get_trials(study_id, None, set(), -1)
    assert [t.state for t in ours] == [TrialState.COMPLETE, TrialState.COMPLETE,
                                       TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE,
                                       TrialState.RUNNING, TrialState.WAITING]  # fmt: skip
    assert ours == optunas
    assert [t.datetime_start for t in ours] == [t.datetime_start for t in optunas]
    some = read_whole(rdb, study_id, {ours[1]._trial_id}, ours[4]._trial_id)
    assert some == [ours[1], ours[5], ours[6]]
    monkeypatch.setattr(search.cache, "_LISTED", 0)  # a big read: its parts by a subquery
    assert read_whole(rdb, study_id, set(), -1) == optunas
    monkeypatch.undo()
    cache = writer._storage  # a tell's read of its trial: plain queries, the same trial
    assert isinstance(cache, Cache)
    assert [cache.get_trial(t._trial_id) for t in ours] == optunas
    with pytest.raises(KeyError):
        cache.get_trial(ours[-1]._trial_id + 1000)
