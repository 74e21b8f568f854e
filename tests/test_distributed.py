"""Many workers, one study: the global count, distinct samplers, dead workers, signals,
secrets.

The PostgreSQL tests use the real server at $NAS_TEST_POSTGRES (default
postgresql+psycopg://postgres@127.0.0.1:5432/test). They skip where none is
reachable, but never in CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search import launch
from search.records import counts
from search.signals import Stop
from search.slots import is_trained
from search.study import SLOT

from conftest import PG_URL, ROOT

# Trials of a fraction of a second: 64 synthetic images, two steps, small networks. Not
# under 30M MACs: at 12M ten candidates are rejected for each one trained, and each
# rejection costs some thirty storage round trips.
TINY = [
    *("--dataset", "synthetic", "--train-images", "64", "--val-images", "32"),
    *("--trial-images", "128", "--max-macs", "30M", "--device", "cpu"),
    *("--no-progress", "--no-estimate"),
]
# Trials of a few seconds, so that a signal lands in the middle of one.
SLOW_IMAGES = 3000
SLOW = [*TINY, "--train-images", "512", "--trial-images", str(SLOW_IMAGES)]
# Never pruned, so that a trial the signal catches in its first third has some fifteen
# steps left: on a fast CPU a SLOW trial ended at its first rung before a signal's stop
# reached it. 10M MACs (the smallest candidate has 5M) keeps its steps short.
SLOWER = [*SLOW, "--pruner", "none", "--max-macs", "10M"]


pytestmark = pytest.mark.xdist_group("processes")


@pytest.fixture
def study_name(request):
    name = f"test-{request.node.name[:30]}-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(Exception):
        optuna.delete_study(study_name=name, storage=PG_URL)


def search(*args: str, cwd, env: dict[str, str] | None = None) -> subprocess.Popen:
    """search.run in a subprocess. A single worker gets one thread (tests run side by
    side); a --workers parent is left to divide the cores among its workers itself."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    full_env.pop("OMP_NUM_THREADS", None)
    if "--workers" not in args:
        full_env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "search.run", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_workers(workers: int, trials: int, url: str, name: str, cwd) -> tuple[str, str]:
    """`search.run --workers N` to the end; its stdout and stderr."""
    args = ["--workers", str(workers), "--trials", str(trials), "--storage", url]
    p = search(*TINY, *args, "--study-name", name, cwd=cwd)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err + out
    return out, err


def worker_logs(cwd, name: str) -> str:
    return "".join(f.read_text() for f in (cwd / "studies" / name).glob("worker-*"))


def load(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def processes_of(study_name: str) -> list[int]:
    """Pids of live search.run processes of this study (its workers included)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                stat = (d / "stat").read_text()
                if b"search.run" in cmd and study_name.encode() in cmd and ") Z " not in stat:
                    pids.append(int(d.name))
    return pids


def assert_whole(trials, trained: int) -> None:
    c = counts(trials)
    assert c["trained"] == trained, c
    assert c["running"] == 0 and c["waiting"] == 0, c
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))


def assert_distinct_candidates(trials) -> None:
    """Workers with their own sampler seeds never train the same parameter set twice."""
    trained = [t for t in trials if is_trained(t)]
    keys = [json.dumps(t.params, sort_keys=True) for t in trained]
    assert len(keys) == len(set(keys)), "a parameter set was trained twice"
    seeds = {
        t.user_attrs["process"]["worker_number"]: t.user_attrs["sampler_seed"] for t in trained
    }
    assert len(set(seeds.values())) == len(seeds)


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(KeyError, sqlalchemy.exc.OperationalError):
            found = predicate()
            if found:
                return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {what} after {timeout} s: {proc.communicate()}")


@pytest.mark.postgres
def test_four_workers_reach_exactly_the_global_count(pg_url, study_name, tmp_path) -> None:
    """Exact count, distinct candidates; a password given only in NAS_STORAGE is in no
    command line (read from /proc while the run is live), no output and no file."""
    secret = "s3cret-pw-4ae1"  # trust auth ignores it, so it simply must never show up
    url = (
        sqlalchemy.engine.make_url(pg_url)
        .set(password=secret)
        .render_as_string(hide_password=False)
    )
    args = [*TINY, "--workers", "4", "--trials", "24", "--study-name", study_name]
    p = search(*args, cwd=tmp_path, env={"NAS_STORAGE": url})
    pids = wait_for(
        lambda: len(processes_of(study_name)) == 5 and processes_of(study_name), "workers", p
    )
    cmdlines = b"".join(Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err + out
    assert secret.encode() not in cmdlines and b"--worker" in cmdlines
    study = optuna.load_study(study_name=study_name, storage=pg_url)
    trials = study.get_trials(deepcopy=False)
    assert_whole(trials, 24)
    assert_distinct_candidates(trials)
    trained = [t for t in trials if is_trained(t)]
    assert sorted(t.user_attrs[SLOT] for t in trained) == list(range(24))
    assert len({t.user_attrs["worker"] for t in trained}) == 4
    files = "".join(
        f.read_text(errors="replace") for f in (tmp_path / "studies").rglob("*") if f.is_file()
    )
    shown = out + err + files + json.dumps(study.user_attrs)
    assert secret not in shown and "***" in out
    assert (tmp_path / "studies" / study_name / "best.json").exists()


def test_two_workers_share_one_sqlite_study(study_name, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    run_workers(2, 10, url, study_name, tmp_path)
    trials = load(url, study_name)
    assert_whole(trials, 10)
    assert_distinct_candidates(trials)
    logs = worker_logs(tmp_path, study_name)
    assert "database is locked" not in logs and "Traceback" not in logs
    # Each worker had its share of the cores, not all of them.
    share = launch.cpu_threads(2, launch.cpu_cores())
    threads = {
        re.search(r"\((\d+) threads\)", t.user_attrs["device"])[1] for t in trials if is_trained(t)
    }
    assert threads == {str(share)}


@pytest.mark.postgres
def test_a_killed_workers_trial_is_failed_and_retried(pg_url, study_name, tmp_path) -> None:
    """Another machine's worker dies: its trial is failed after the grace period."""
    args = [*SLOW, "--trials", "3", "--storage", pg_url, "--study-name", study_name]
    args += ["--heartbeat", "1", "--grace", "4"]
    victim = search(*args, cwd=tmp_path)

    killed = wait_for(lambda: training(load(pg_url, study_name)), "running trial", victim)[0].number
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    # Pretend the dead worker ran on another machine: only the heartbeat can tell.
    with sqlalchemy.create_engine(pg_url).begin() as c:
        c.execute(
            sqlalchemy.text(
                "UPDATE trial_user_attributes SET value_json = '{}' WHERE key = 'process' AND "
                "trial_id = (SELECT trial_id FROM trials t JOIN studies s USING (study_id) "
                "WHERE s.study_name = :s AND t.number = :n)"
            ),
            {"s": study_name, "n": killed},
        )
    survivor = search(*args, "--worker", cwd=tmp_path)  # a worker of the same study
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err + out
    trials = load(pg_url, study_name)
    assert trials[killed].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retries and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == trials[killed].params
    assert_whole(trials, 3)


def test_a_dead_process_on_this_host_is_retried_at_once(study_name, tmp_path) -> None:
    """Killed without a word, same host: the next start fails and retries its trial
    at once, not after the 10-minute grace period."""
    url = f"sqlite:///{tmp_path}/s.db"
    args = [*SLOW, "--trials", "3", "--storage", url, "--study-name", study_name]
    args += ["--grace", "600"]
    victim = search(*args, cwd=tmp_path)

    killed = wait_for(lambda: training(load(url, study_name)), "running trial", victim)[0].number
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    start = time.time()
    again = search(*args, cwd=tmp_path)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err + out
    trials = load(url, study_name)
    assert trials[killed].state == TrialState.FAIL
    assert any(t.system_attrs.get("failed_trial") == killed and is_trained(t) for t in trials)
    assert_whole(trials, 3)
    assert time.time() - start < 300


def training(trials: list) -> list:
    """RUNNING trials that hold a slot; one without is a candidate the gate will reject."""
    return [t for t in trials if t.state == TrialState.RUNNING and SLOT in t.user_attrs]


def interrupt_mid_trial(args: list[str], name: str, url: str, cwd, signum: int, workers: int):
    """Start a run, signal it while trials run; (rc, seconds to exit, out, err, trials)."""
    p = search(*args, cwd=cwd)

    def busy():
        """Every worker training a candidate, one of them in the first third of its time
        (a trial completed already says how long one takes on this machine, loaded or
        not), so that the signal stops it rather than its end. (Its start, not its
        reports: a worker writes those when the trial is told.) Asking that of every
        worker at once was too narrow a window on a loaded VM: two workers' starts drift
        apart by more than a third of a trial and never shared one within 180 s."""
        import datetime

        trials = load(url, name)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if not done:
            return False
        # the median trial's: the shortest (a candidate a tenth as large) left a window
        # narrower than a poll, and two workers never shared one within 180 s
        third = (
            statistics.median(
                (t.datetime_complete - t.datetime_start).total_seconds() for t in done
            )
            / 3
        )
        now = datetime.datetime.now()
        since = [(now - t.datetime_start).total_seconds() for t in training(trials)]
        return (
            len(since) >= workers
            and min(since) < third  # a trial lasts as long: none is pruned
            and len(processes_of(name)) >= workers
        )

    wait_for(busy, f"{workers} running trial(s)", p, timeout=180)
    t0 = time.time()
    p.send_signal(signum)
    out, err = p.communicate(timeout=60)
    return p.returncode, time.time() - t0, out, err, load(url, name)


@pytest.mark.parametrize(
    ("backend", "workers", "signum"),
    [
        pytest.param("sqlite", 1, signal.SIGTERM, marks=pytest.mark.slow),
        ("sqlite", 1, signal.SIGINT),
        ("sqlite", 2, signal.SIGTERM),
        pytest.param("postgres", 1, signal.SIGTERM, marks=[pytest.mark.postgres, pytest.mark.slow]),
        pytest.param("postgres", 2, signal.SIGINT, marks=pytest.mark.postgres),
    ],
)
def test_a_signal_mid_trial_marks_it_writes_best_and_resumes(
    backend, workers, signum, study_name, tmp_path, request
) -> None:
    url = (
        request.getfixturevalue("pg_url") if backend == "postgres" else f"sqlite:///{tmp_path}/s.db"
    )
    args = [*SLOWER, "--storage", url, "--study-name", study_name, "--workers", str(workers)]
    rc, seconds, out, err, trials = interrupt_mid_trial(
        [*args, "--trials", "100"], study_name, url, tmp_path, signum, workers
    )
    assert rc == 128 + signum, f"stdout:\n{out}\nstderr:\n{err}"
    assert seconds < 30
    assert "Traceback" not in out + err + worker_logs(tmp_path, study_name)
    assert f"stopped by {signal.Signals(signum).name}" in err
    assert re.search(r"to resume: \S*python -m search\.run ", out)  # .venv/bin/python or python
    assert processes_of(study_name) == []
    c = counts(trials)
    assert c["running"] == 0 and c["failed"] == 0 and c["interrupted"] >= 1
    interrupted = [t for t in trials if "interrupted" in t.user_attrs]
    assert all(t.state == TrialState.FAIL for t in interrupted)
    retries = {t.system_attrs.get("failed_trial") for t in trials if t.state == TrialState.WAITING}
    assert retries == {t.number for t in interrupted}  # each will run again
    best = json.loads((tmp_path / "studies" / study_name / "best.json").read_text())
    assert best["study_name"] == study_name
    done = c["trained"]  # the resume trains the retries: its workers take them first
    again = search(*args, "--trials", str(done + len(retries)), cwd=tmp_path)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"{done} trained so far" in out
    trials = load(url, study_name)
    assert_whole(trials, done + len(retries))
    assert all(is_trained(t) for t in trials if t.system_attrs.get("failed_trial") in retries)


def test_a_stop_reaches_the_workers_while_the_parent_is_busy() -> None:
    """The parent's tick reads the study, which takes seconds on a big one; a stop
    that waited for it would let running trials end instead of stopping them."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = Stop().install()
    during_tick: list[int | None] = []

    def tick() -> None:
        if not during_tick:  # the first tick: busy until the worker is gone (or 20 s)
            sigterm = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
            sigterm.start()  # the signal arrives while the parent reads
            try:
                during_tick.append(worker.wait(timeout=20))
            except subprocess.TimeoutExpired:
                during_tick.append(None)

    try:
        codes = launch.follow([worker], stop, tick)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        worker.kill()
    assert during_tick == [-signal.SIGTERM]
    assert codes == [-signal.SIGTERM]


def test_workers_stop_when_their_parent_is_killed(study_name, tmp_path) -> None:
    """SIGKILL leaves no time to pass anything on; the workers notice and stop."""
    url = f"sqlite:///{tmp_path}/s.db"
    args = [*SLOW, "--storage", url, "--study-name", study_name, "--workers", "2"]
    p = search(*args, "--trials", "100", cwd=tmp_path)
    wait_for(lambda: counts(load(url, study_name))["running"] >= 2, "running trials", p, 180)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    deadline = time.time() + 30
    while processes_of(study_name) and time.time() < deadline:
        time.sleep(0.5)
    assert processes_of(study_name) == []
    assert counts(load(url, study_name))["running"] == 0
    assert "Traceback" not in worker_logs(tmp_path, study_name)


@pytest.mark.slow
@pytest.mark.postgres
def test_sixteen_workers_on_one_postgres_study(pg_url) -> None:
    """16 processes (as on 16 GPUs) run the real loop on one study: the count is exact,
    nothing is left RUNNING or FAILED, no worker hits a connection error."""
    from benchmarks.scale_workers import measure

    r = measure(pg_url, 16, 32)
    assert r["errors"] == [] and r["exit_codes"] == [0] * 16
    assert r["trained"] == 32
    assert r["counts"]["running"] == 0 and r["counts"]["failed"] == 0
    assert r["counts"]["waiting"] == 0


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_workers_opening_a_new_database_at_once_all_open_it(backend, request, tmp_path) -> None:
    """SLURM array tasks or pods started together on an empty database race to create
    Optuna's tables: every one of them must open it (the losers try again)."""
    import multiprocessing as mp

    from opener import open_at_once

    if backend == "postgres":
        base = sqlalchemy.engine.make_url(request.getfixturevalue("pg_url"))
        db = f"nas_race_{uuid.uuid4().hex[:8]}"
        admin = sqlalchemy.create_engine(
            base.set(database="postgres"), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as c:
            c.execute(sqlalchemy.text(f"CREATE DATABASE {db}"))
        url = base.set(database=db).render_as_string(hide_password=False)
    else:
        url = f"sqlite:///{tmp_path / 'new.db'}"
    try:
        ctx = mp.get_context("spawn")
        n = 6
        barrier, out = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=open_at_once, args=(url, barrier, out)) for _ in range(n)]
        for p in procs:
            p.start()
        errors = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert errors == [None] * n
        optuna.create_study(study_name="after-the-race", storage=url)  # the schema is whole
    finally:
        if backend == "postgres":
            with admin.connect() as c:
                c.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            admin.dispose()
