"""A new trial is a draft until the gate rejects it or it takes a slot: then it is
written once, on a real SQLite study, with everything a trial told step by step had."""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState

from search import draft, space
from search.data import search_split, synthetic
from search.draft import drafting, is_draft, write, written
from search.limits import Limits
from search.profile import Profile
from search.signals import Stop
from search.slots import Slots, is_trained
from search.study import SLOT, open_study
from search.worker import Search, gate, run_worker, trial_seed


def small_search() -> Search:
    data = search_split(synthetic(n_train=1024, n_test=64), 0, train_images=512, val_images=256)
    profile = Profile("test", 768, (1 / 3, 2 / 3, 1.0), min_steps=8, batch_sizes=(64, 128))
    return Search(data, Limits(5_000_000, 30_000_000), profile, 0, torch.device("cpu"))


def small_as(cls: type[Search], **changes: object) -> Search:
    """`small_search()` as an instance of `cls`, a Search whose training a test replaces."""
    base = small_search()
    return cls(**{f: getattr(base, f) for f in base.__dataclass_fields__} | changes)


class Writes:
    """Counts the study storage's writes, by method; a new trial written in one flush of
    rows (`search.draft.insert`) counts as a create_new_trial."""

    NAMES = ("create_new_trial", "set_trial_param", "set_trial_user_attr",
             "set_trial_system_attr")  # fmt: skip

    def __init__(self, study: optuna.Study, monkeypatch) -> None:
        self.calls: list[tuple[str, object]] = []
        real_insert = draft.insert

        def inserted(storage, study_id, t, attrs_of=None):
            before = self.count("create_new_trial")
            trial_id = real_insert(storage, study_id, t, attrs_of)
            if self.count("create_new_trial") == before:  # not Optuna's path, counted there
                self.calls.append(("create_new_trial", study_id))
            return trial_id

        monkeypatch.setattr(draft, "insert", inserted)
        for name in self.NAMES:
            real = getattr(study._storage, name)

            def counted(*args, _name=name, _real=real, **kwargs):
                self.calls.append((_name, args[1] if len(args) > 1 else None))
                return _real(*args, **kwargs)

            monkeypatch.setattr(study._storage, name, counted)

    def count(self, name: str) -> int:
        return sum(n == name for n, _ in self.calls)


def test_a_search_writes_each_new_trial_once(tmp_path, monkeypatch) -> None:
    """No suggestion and no attribute of a candidate reaches the database one by one
    before it is rejected or takes a slot: one create per trial, no params after it."""
    study = open_study(f"sqlite:///{tmp_path}/s.db", "s", heartbeat=None)
    writes = Writes(study, monkeypatch)
    search = small_search()
    assert run_worker(study, search, Slots(study, 3, None), Stop(), url=None) == "done"
    trials = study.get_trials()
    assert sum(map(is_trained, trials)) == 3 and any("rejected" in t.user_attrs for t in trials)
    assert writes.count("create_new_trial") == len(trials)
    assert writes.count("set_trial_param") == 0
    # written with the trial, its seed and settings too (they come from its number)
    before_training = {"worker", "sampler_seed", "process", "params", "macs", "arch", SLOT,
                       "seed", "training"}  # fmt: skip
    assert not before_training & {key for name, key in writes.calls if name.startswith("set_")}
    for t in trials:
        assert t.number >= 0 and t.params and {"worker", "arch", "params"} <= t.user_attrs.keys()
        assert any(k.startswith("constraints") for k in t.system_attrs)
        if is_trained(t):  # the seed comes from the number the trial was written with
            assert t.user_attrs["seed"] == trial_seed(search.seed, t.number)
            assert t.user_attrs[SLOT] in range(3) and t.distributions.keys() == t.params.keys()


def test_a_draft_is_written_as_the_trial_it_would_have_been(tmp_path) -> None:
    """The same params, distributions, attributes and constraints as a trial asked and
    told on the study itself, from the same sampler seed."""
    search = small_search()
    told = []
    for drafted in (False, True):
        study = open_study(f"sqlite:///{tmp_path}/{drafted}.db", "s", heartbeat=None)
        study.sampler = optuna.samplers.RandomSampler(seed=1)
        asking = drafting(study) if drafted else study
        trial = asking.ask()
        assert is_draft(trial) is drafted
        spec = space.suggest_arch(trial, search.data.shape, search.limits)
        gate(trial, spec, search.limits)
        space.suggest_training(trial, search.profile, 512, 0)
        trial.set_user_attr("note", [1, "a"])
        if drafted:
            frozen = write(study, trial, TrialState.PRUNED)
            assert frozen == written(study, frozen._trial_id)  # as the study reads it back
        else:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        told.append(study.get_trials()[0])
        assert frozen.number == 0 and frozen.state == TrialState.PRUNED
    old, new = told
    assert new.params == old.params
    assert new.distributions == old.distributions
    assert new.user_attrs == old.user_attrs and new.system_attrs == old.system_attrs
    assert new.datetime_complete is not None


def test_a_draft_that_finds_no_slot_leaves_nothing(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(url, "s", heartbeat=None)
    search = small_search()
    slots = Slots(study, 1, url)
    drafts = drafting(study)
    first = drafts.ask()
    space.suggest_arch(first, search.data.shape, search.limits)
    running = slots.claim(first)
    assert running is not None and not is_draft(running) and running.number == 0
    assert study.get_trials()[0].state == TrialState.RUNNING
    assert study.get_trials()[0].user_attrs[SLOT] == 0
    second = drafts.ask()  # one draft at a time: a new ask replaces an unwritten one
    space.suggest_arch(second, search.data.shape, search.limits)
    assert slots.claim(second) is None
    assert len(study.get_trials()) == 1 and list(drafts._storage.drafts) == [second._trial_id]


def test_a_draft_is_not_told_or_reported_by_mistake(tmp_path) -> None:
    study = open_study(f"sqlite:///{tmp_path}/s.db", "s", heartbeat=None)
    trial = drafting(study).ask()
    with pytest.raises(RuntimeError, match="is written, not told"):
        trial.study.tell(trial, 0.5)
    with pytest.raises(RuntimeError, match="write it first"):
        trial.report(0.5, 1)
    assert study.get_trials() == []


def test_ahead_the_next_candidate_is_sampled_while_one_trains(tmp_path) -> None:
    """`ahead` (a GPU worker): the sampler runs in another thread during a trial, and a
    trial is told there too, so the main thread only trains; the count is exact and
    nothing is left running, queued or half-written."""
    import threading
    import time
    from dataclasses import dataclass

    sampled_during: list[bool] = []
    told_on_main: list[bool] = []
    training = threading.Event()

    class Watched(optuna.samplers.RandomSampler):
        def sample_independent(self, *args, **kwargs):
            sampled_during.append(training.is_set())
            return super().sample_independent(*args, **kwargs)

        def after_trial(self, study, trial, state, values):
            told_on_main.append(threading.current_thread() is threading.main_thread())
            return super().after_trial(study, trial, state, values)

    @dataclass(frozen=True)
    class Slow(Search):
        def train(self, spec, cfg, on_eval=None, stop=None):
            training.set()
            try:
                time.sleep(0.3)  # the device's time: the next proposal is made meanwhile
                return super().train(spec, cfg, on_eval, stop)
            finally:
                training.clear()

    search = small_as(Slow, ahead=True)
    study = open_study(f"sqlite:///{tmp_path}/s.db", "s", heartbeat=None)
    why = run_worker(study, search, Slots(study, 4, None), Stop(), url=None,
                     sampler=lambda seed: Watched(seed=seed))  # fmt: skip
    assert why == "done"
    trials = study.get_trials()
    assert sum(map(is_trained, trials)) == 4
    assert all(t.state.is_finished() for t in trials)  # none running, none queued
    assert any(sampled_during)  # proposals were sampled while a trial trained
    assert told_on_main and not any(told_on_main)


def slow_ahead(
    url: str, until: Callable[[optuna.Study], bool], stop: Stop | None = None, **changes: object
) -> Search:
    """A Search that proposes ahead and whose training waits (up to 10 s) until
    `until(study)` holds, then requests `stop` if given, and trains."""
    import time
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Slow(Search):
        def train(self, spec, cfg, on_eval=None, stop_=None):
            study = optuna.load_study(study_name="s", storage=url)
            end = time.monotonic() + 10
            while not until(study) and time.monotonic() < end:
                time.sleep(0.05)
            if stop is not None:
                stop.request()
            return super().train(spec, cfg, on_eval, stop_)

    return small_as(Slow, **({"ahead": True, "limits": Limits(5_000_000)} | changes))


def running(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials() if t.state == TrialState.RUNNING]


def test_ahead_a_stop_sends_the_trials_claimed_ahead_back_with_their_slots(tmp_path) -> None:
    """While slots are plenty a worker stays two candidates ahead: stopped while one
    trains and the next two are claimed, all three are queued again with their slots
    (the count stays exact on resume), none is left RUNNING."""
    url, stop = f"sqlite:///{tmp_path}/s.db", Stop()
    search = slow_ahead(url, lambda s: len(running(s)) == 3, stop)
    study = open_study(url, "s", heartbeat=None)
    assert run_worker(study, search, Slots(study, 5, None), stop, url=None) == "interrupted"
    trials = study.get_trials()
    assert not running(study) and sum(map(is_trained, trials)) == 0
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs[SLOT] for t in queued) == [0, 1, 2]


def test_ahead_near_the_end_the_next_is_proposed_not_claimed(tmp_path) -> None:
    """With as many free slots as running trials, the next candidate is proposed ahead but
    not claimed (another worker may train it now); stopped then, a queued preset it was
    goes back to the queue, and nothing is left RUNNING."""
    from search.worker import warm_start

    url, stop = f"sqlite:///{tmp_path}/s.db", Stop()
    search = slow_ahead(url, lambda s: len(running(s)) == 2, stop)
    study = open_study(url, "s", heartbeat=None)
    assert warm_start(study, ["resnet-tiny"], search) == []
    assert warm_start(study, ["resnet-tiny"], search, again=True) == []
    assert run_worker(study, search, Slots(study, 2, None), stop, url=None) == "interrupted"
    trials = study.get_trials()
    assert not running(study)
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(queued) == 2 and all(t.user_attrs["preset"] == "resnet-tiny" for t in queued)
    # the first, interrupted, keeps its slot; the second was never claimed
    assert sorted(str(t.user_attrs.get(SLOT)) for t in queued) == ["0", "None"]


def test_ahead_a_timeout_starts_no_trial_after_the_deadline(tmp_path) -> None:
    """`--timeout` stops starting trials: the two claimed ahead before the deadline are
    not trained after it; they are queued again with their slots."""
    import time

    url, timeout = f"sqlite:///{tmp_path}/s.db", 2.0
    # The first trial trains once the next two are claimed and the deadline has passed (a
    # deadline of 0.1 s was flaky: a cold first proposal can take longer, and then no
    # trial starts at all).
    start = time.monotonic()
    # a trial of about a second: the deadline, not the training, is under test
    short = Profile("test", 256, (1.0,), min_steps=4, batch_sizes=(64,))
    search = slow_ahead(
        url,
        lambda s: len(running(s)) == 3 and time.monotonic() > start + timeout + 0.5,
        profile=short,
    )
    study = open_study(url, "s", heartbeat=None)
    why = run_worker(study, search, Slots(study, 5, None), Stop(), url=None, timeout=timeout)
    assert why == "timeout"
    trials = study.get_trials()
    assert sum(map(is_trained, trials)) == 1 and not running(study)
    assert sorted(t.user_attrs[SLOT] for t in trials if t.state == TrialState.WAITING) == [1, 2]
    assert time.monotonic() - start < 60


@pytest.fixture(params=["sqlite", "postgres"])
def any_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def away_from_utc(monkeypatch):
    """Local time 5:30 ahead of UTC: Optuna's RDB storage keeps times in naive UTC."""
    import time

    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_trial_inserted_in_one_flush_reads_back_as_optunas_write_of_it(
    any_url, away_from_utc
) -> None:
    """`insert` against Optuna's own `create_new_trial(template)`: the same trial read
    back (state, value, every kind of parameter, attributes, constraints), numbered in
    turn, on SQLite and PostgreSQL."""
    import uuid

    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    study = open_study(any_url, f"ins-{uuid.uuid4().hex[:6]}", heartbeat=None)
    dists = {
        "stages": IntDistribution(1, 4),
        "lr": FloatDistribution(1e-4, 1.0, log=True),
        "width": IntDistribution(16, 256, step=16),
        "act": CategoricalDistribution(["relu", "silu", None]),
        "drop": FloatDistribution(0.0, 0.5, step=0.1),
    }
    params = {"stages": 3, "lr": 0.0123, "width": 96, "act": None, "drop": 0.2}
    template = FrozenTrial(
        number=-1, state=TrialState.PRUNED, value=None, datetime_start=None,
        datetime_complete=None, params=params, distributions=dists,
        user_attrs={"arch": {"stages": [1, 2]}, "rejected": "over params", "macs": 12_345},
        system_attrs={"constraints": [0.5, -0.1]}, intermediate_values={}, trial_id=-1,
    )  # fmt: skip
    import datetime

    now = datetime.datetime.now()
    template.datetime_start, template.datetime_complete = now, now
    storage = study._storage
    ids = []
    for t in (template, _complete(template)):
        ids.append(draft.insert(storage, study._study_id, t)[0])
        ids.append(storage.create_new_trial(study._study_id, template_trial=t))
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t._trial_id for t in trials] == ids
    for ours, optunas in (trials[0:2], trials[2:4]):
        for field in ("state", "values", "params", "distributions", "user_attrs",
                      "system_attrs", "intermediate_values", "datetime_start",
                      "datetime_complete"):  # fmt: skip
            assert getattr(ours, field) == getattr(optunas, field), field
    assert trials[2].value == 0.875 and trials[0].params == params


def test_workers_inserting_at_once_take_every_number_once(any_url) -> None:
    """Four workers, each with its own storage as four processes have, insert trials at
    once: every number is taken once, in the order of the ids. (On SQLite the study row's
    FOR UPDATE is void: numbering before the insert let two workers take one number.)"""
    import threading
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from optuna.distributions import IntDistribution

    name, workers, each = f"race-{uuid.uuid4().hex[:6]}", 4, 10
    open_study(any_url, name, heartbeat=None)
    start = threading.Barrier(workers)

    def trial(i: int) -> FrozenTrial:
        return FrozenTrial(
            number=-1, state=TrialState.PRUNED, value=None, datetime_start=None,
            datetime_complete=None, params={"w": i}, distributions={"w": IntDistribution(0, each)},
            user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=-1,
        )  # fmt: skip

    def work() -> list[tuple[int, int]]:
        study = open_study(any_url, name, heartbeat=None, create=False)
        start.wait()
        return [draft.insert(study._storage, study._study_id, trial(i)) for i in range(each)]

    with ThreadPoolExecutor(workers) as pool:
        made = [x for job in [pool.submit(work) for _ in range(workers)] for x in job.result()]
    assert sorted(number for _, number in made) == list(range(workers * each))
    assert [number for _, number in sorted(made)] == list(range(workers * each))  # by id
    trials = open_study(any_url, name, heartbeat=None, create=False).get_trials()
    assert [t.number for t in trials] == list(range(workers * each))


def test_a_trials_records_in_one_transaction_read_back_as_optunas_writes(any_url) -> None:
    """`record` against Optuna's writes one by one, on trials that already have a value at
    a step and an attribute it overwrites: the same trial read back; then an ended trial
    refuses it, as Optuna's writes do, and an unknown one is a KeyError."""
    import math
    import uuid

    from optuna.exceptions import UpdateFinishedTrialError

    study = open_study(any_url, f"rec-{uuid.uuid4().hex[:6]}", heartbeat=None)
    storage = study._storage
    reported = {1: 0.5, 2: float("inf"), 3: float("nan"), 4: float("-inf")}
    attrs = {"a": 2, "b": [1, "x"], "c": {"k": None}}
    ids, trials = [], []
    for ours in (True, False):
        trial = study.ask()
        trial.report(0.3, 1)
        trial.set_user_attr("a", 1)
        if ours:
            draft.record(storage, trial._trial_id, attrs, reported)
        else:
            for step, value in reported.items():
                storage.set_trial_intermediate_value(trial._trial_id, step, value)
            for key, value in attrs.items():
                storage.set_trial_user_attr(trial._trial_id, key, value)
        ids.append(trial._trial_id)
        trials.append(trial)
    fresh = optuna.load_study(study_name=study.study_name, storage=any_url)
    ours, optunas = (fresh._storage.get_trial(i) for i in ids)
    assert ours.user_attrs == optunas.user_attrs == attrs
    assert ours.intermediate_values.keys() == optunas.intermediate_values.keys() == {1, 2, 3, 4}
    for step, value in ours.intermediate_values.items():
        other = optunas.intermediate_values[step]
        assert value == other or (math.isnan(value) and math.isnan(other))
    study.tell(trials[0], 0.5)
    with pytest.raises(UpdateFinishedTrialError):
        draft.record(storage, ids[0], {"late": 1}, {})
    with pytest.raises(KeyError):
        draft.record(storage, max(ids) + 100, {"late": 1}, {})


def test_a_claimed_draft_opens_as_the_trial_read_back_with_its_numbered_settings(
    any_url, away_from_utc
) -> None:
    """A draft written RUNNING by its claim carries the attributes its number gives, and
    opens as a trial without a read: what it holds is what the study reads back."""
    import uuid

    study = open_study(any_url, f"claim-{uuid.uuid4().hex[:6]}", heartbeat=None)
    search = small_search()
    study.ask()  # one before it: the draft's number is 1
    drafts = drafting(study)
    trial = drafts.ask()
    space.suggest_arch(trial, search.data.shape, search.limits)
    reads: list[int] = []
    real = study._storage.get_trial
    study._storage.get_trial = lambda i: reads.append(i) or real(i)
    claimed = Slots(study, 3, None).claim(trial, drafts, lambda n: {"seed": 100 + n})
    del study._storage.get_trial
    assert claimed is not None and reads == []
    read = optuna.load_study(study_name=study.study_name, storage=any_url)._storage.get_trial(
        claimed._trial_id
    )
    held = claimed._cached_frozen_trial
    assert held.number == read.number == 1 and read.user_attrs["seed"] == 101
    for field in ("state", "params", "distributions", "user_attrs", "system_attrs",
                  "intermediate_values", "datetime_start", "datetime_complete"):  # fmt: skip
        assert getattr(held, field) == getattr(read, field), field


def _complete(t: FrozenTrial) -> FrozenTrial:
    import copy

    c = copy.deepcopy(t)
    c.state, c.value = TrialState.COMPLETE, 0.875
    return c


def test_a_trials_rungs_make_no_round_trip_and_are_written_when_it_is_told(
    tmp_path, monkeypatch
) -> None:
    """A trained trial's reports stay in the worker until it is told, and the pruner reads
    the study as the worker's proposals last read it: no database call at a rung. Told,
    the trial has every value it reported, and a pruned one its last as its value."""
    from dataclasses import dataclass

    at_rung = [False]
    calls_at_rung: list[str] = []

    class OddOnesOut(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
            assert study.get_trials(deepcopy=False)  # the worker's last read: not empty
            return trial.number % 2 == 1

    @dataclass(frozen=True)
    class Watched(Search):
        def train(self, spec, cfg, on_eval=None, stop=None):
            def at(s):
                at_rung[0] = True
                try:
                    on_eval(s)
                finally:
                    at_rung[0] = False

            return super().train(spec, cfg, at, stop)

    study = open_study(f"sqlite:///{tmp_path}/s.db", "s", heartbeat=None)
    study.pruner = OddOnesOut()
    for name in ("get_all_trials", "get_trial", "set_trial_intermediate_value",
                 "set_trial_user_attr", "set_trial_system_attr"):  # fmt: skip
        real = getattr(study._storage, name)

        def watched(*args, _name=name, _real=real, **kwargs):
            if at_rung[0]:
                calls_at_rung.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(study._storage, name, watched)
    base = small_search()
    search = small_as(Watched)
    assert run_worker(study, search, Slots(study, 4, None), Stop(), url=None) == "done"
    assert calls_at_rung == []
    trained = [t for t in study.get_trials() if is_trained(t)]
    rungs = base.profile.rung_images()
    assert len(trained) == 4 and {t.state for t in trained} == {
        TrialState.COMPLETE, TrialState.PRUNED}  # fmt: skip
    for t in trained:
        if t.state == TrialState.PRUNED:
            assert list(t.intermediate_values) == rungs[:1]
            assert t.value == t.intermediate_values[rungs[0]]
        else:
            assert list(t.intermediate_values) == rungs and t.value == t.intermediate_values[
                rungs[-1]]  # fmt: skip


def test_an_ask_right_after_a_rejection_reuses_the_last_read_with_the_rejected_trial(
    tmp_path, monkeypatch
) -> None:
    """`ask_again`: the ask that follows a gate rejection makes no read of the study, and
    the sampler sees the rejected trial in it; the ask after that reads the study."""
    from search.worker import propose

    study = open_study(f"sqlite:///{tmp_path}/s.db", "s", heartbeat=None)
    drafts = drafting(study)
    reads: list[int] = []
    real = drafts._storage.backend.get_all_trials
    monkeypatch.setattr(
        drafts._storage.backend, "get_all_trials",
        lambda *a, **k: reads.append(1) or real(*a, **k),
    )  # fmt: skip
    search, who = small_search(), {"worker": "test"}
    first = drafts.ask()
    assert len(reads) == 1
    rejected = write(study, first, TrialState.PRUNED, rejected="over the budget")
    drafts._storage.ask_again()
    seen_by_the_sampler: list[list[int]] = []
    sample = study.sampler.sample_independent

    def watched(study_, trial, name, dist):
        seen_by_the_sampler.append([t.number for t in study_.get_trials(deepcopy=False)])
        return sample(study_, trial, name, dist)

    monkeypatch.setattr(study.sampler, "sample_independent", watched)
    proposal = propose(study, drafts, search, who)
    assert len(reads) == 1  # no read: the last one, with the rejected trial added
    assert seen_by_the_sampler and all(s == [rejected.number] for s in seen_by_the_sampler)
    if not isinstance(proposal, FrozenTrial):
        drafts._storage.discard(proposal[0]._trial_id)
    drafts.ask()
    assert len(reads) == 2  # not right after a rejection: read


def test_ahead_a_job_that_fails_after_it_delivered_is_raised_and_nothing_is_left_running(
    tmp_path,
) -> None:
    """A job fails after it delivered the next candidate (here the tell's callback, in
    the ahead thread): the worker raises that error once its trial ends, tells what it
    trained, and sends back what it claimed ahead; nothing is left RUNNING."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Slow(Search):
        def train(self, spec, cfg, on_eval=None, stop=None):
            import time

            time.sleep(0.3)  # the next candidates are made meanwhile
            return super().train(spec, cfg, on_eval, stop)

    told: list[int] = []

    def on_tell(study: optuna.Study, trial: FrozenTrial) -> None:
        if is_trained(trial):
            told.append(trial.number)
            if len(told) == 2:
                raise RuntimeError("the dashboard's callback broke")

    search = small_as(Slow, ahead=True)
    study = open_study(f"sqlite:///{tmp_path}/s.db", "s", heartbeat=None)
    with pytest.raises(RuntimeError, match="callback broke"):
        run_worker(study, search, Slots(study, 8, None), Stop(), url=None, on_tell=on_tell)
    trials = study.get_trials()
    assert not running(study)
    trained = [t for t in trials if is_trained(t)]
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(trained) >= 3  # the two told, and the one trained after the failure
    held = sorted(t.user_attrs[SLOT] for t in trained + queued)
    assert held == list(range(len(held)))  # every claimed slot trained or queued again


def test_a_worker_asks_again_on_the_read_it_made_after_a_gate_rejection(
    tmp_path, monkeypatch
) -> None:
    """The loop itself: with many candidates over a tight budget, the ask after a rejection
    reads nothing, so a worker reads the study for fewer asks than it makes."""
    from dataclasses import replace

    from search.draft import DraftStorage

    asks, reads = [0], [0]
    create, get_all = DraftStorage.create_new_trial, DraftStorage.get_all_trials

    def counted_create(self, *args, **kwargs):
        asks[0] += 1
        return create(self, *args, **kwargs)

    def counted_read(self, *args, **kwargs):
        if self.reused() is None:
            reads[0] += 1
        return get_all(self, *args, **kwargs)

    monkeypatch.setattr(DraftStorage, "create_new_trial", counted_create)
    monkeypatch.setattr(DraftStorage, "get_all_trials", counted_read)
    search = replace(small_search(), limits=Limits(20_000, 30_000_000))
    study = open_study(f"sqlite:///{tmp_path}/s.db", "s", heartbeat=None)
    assert run_worker(study, search, Slots(study, 3, None), Stop(), url=None) == "done"
    rejected = sum("rejected" in t.user_attrs for t in study.get_trials())
    assert rejected > 0
    assert reads[0] < asks[0]
