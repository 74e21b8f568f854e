"""Many workers, one study: the global count, dead workers, Ctrl-C, SQLite locking.

The PostgreSQL tests use the real server at $NAS_TEST_POSTGRES (default
postgresql+psycopg://postgres@127.0.0.1:5432/test). They skip where none is
reachable, but never in CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search.study import SLOT, counts

from conftest import ROOT

PG_URL = os.environ.get("NAS_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# Trials of a fraction of a second: 64 synthetic images, one epoch, small networks.
TINY = [
    "--dataset",
    "synthetic",
    "--train-images",
    "64",
    "--val-images",
    "32",
    "--epochs",
    "1",
    "--max-macs",
    "12M",
    "--device",
    "cpu",
    "--no-progress",
]


def postgres_reachable() -> bool:
    try:
        with sqlalchemy.create_engine(PG_URL).connect():
            return True
    except Exception:
        return False


@pytest.fixture
def pg_url():
    if not postgres_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the PostgreSQL at {PG_URL}")
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    return PG_URL


@pytest.fixture
def study_name(request):
    name = f"test-{request.node.name[:30]}-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(Exception):
        optuna.delete_study(study_name=name, storage=PG_URL)


def search(*args: str, cwd, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "search.run", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def run_workers(workers: int, trials: int, url: str, name: str, cwd) -> tuple[str, str]:
    """`search.run --workers N` to the end; its stdout and stderr."""
    p = search(
        *TINY,
        "--workers",
        str(workers),
        "--trials",
        str(trials),
        "--storage",
        url,
        "--study-name",
        name,
        cwd=cwd,
    )
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err + out
    return out, err


def worker_logs(cwd, name: str) -> str:
    return "".join(f.read_text() for f in (cwd / "studies" / name).glob("worker-*"))


def load(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def assert_whole(trials, trained: int) -> None:
    c = counts(trials)
    assert c["trained"] == trained, c
    assert c["running"] == 0
    assert not any(t.state == TrialState.WAITING for t in trials)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))


@pytest.mark.postgres
def test_four_workers_reach_exactly_the_global_count(pg_url, study_name, tmp_path) -> None:
    # Trust auth ignores the password, so a secret one must simply never show up.
    secret = "s3cret-pw-4ae1"
    url = (
        sqlalchemy.engine.make_url(pg_url)
        .set(password=secret)
        .render_as_string(hide_password=False)
    )
    out, err = run_workers(4, 200, url, study_name, tmp_path)
    study = optuna.load_study(study_name=study_name, storage=pg_url)
    trials = study.get_trials(deepcopy=False)
    assert_whole(trials, 200)
    trained = [
        t
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "rejected" not in t.user_attrs
    ]
    assert sorted(t.user_attrs[SLOT] for t in trained) == list(range(200))
    assert len({t.user_attrs["worker"] for t in trained}) == 4
    shown = out + err + worker_logs(tmp_path, study_name) + json.dumps(study.user_attrs)
    assert secret not in shown and "***" in out
    assert (tmp_path / "studies" / study_name / "best.json").exists()


@pytest.mark.postgres
def test_a_killed_workers_trial_is_failed_and_retried(pg_url, study_name, tmp_path) -> None:
    args = [
        *TINY,
        "--epochs",
        "4",
        "--train-images",
        "512",
        "--trials",
        "6",
        "--storage",
        pg_url,
        "--study-name",
        study_name,
        "--heartbeat",
        "1",
        "--grace",
        "4",
    ]
    victim = search(*args, cwd=tmp_path)
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline:
        time.sleep(0.2)
        try:
            trials = load(pg_url, study_name)
        except KeyError:
            continue
        running = [
            t
            for t in trials
            if t.state == TrialState.RUNNING
            and SLOT in t.user_attrs
            and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
        ]
        if running:
            victim.send_signal(signal.SIGKILL)
            killed = running[0].number
    victim.communicate()
    assert killed is not None, "the victim never started a trial"
    survivor = search(*args, "--worker", cwd=tmp_path)  # a worker of the same study
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err + out
    trials = load(pg_url, study_name)
    assert trials[killed].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retries and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == trials[killed].params
    assert_whole(trials, 6)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_sigint_marks_the_trial_writes_best_and_resumes(
    backend, study_name, tmp_path, request
) -> None:
    url = (
        request.getfixturevalue("pg_url") if backend == "postgres" else f"sqlite:///{tmp_path}/s.db"
    )
    args = [
        *TINY,
        "--epochs",
        "3",
        "--train-images",
        "512",
        "--storage",
        url,
        "--study-name",
        study_name,
    ]
    run = search(*args, "--trials", "100", cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            trials = load(url, study_name)
        except (KeyError, sqlalchemy.exc.OperationalError):
            continue
        c = counts(trials)
        if c["complete"] >= 1 and c["running"] == 1:
            break
    else:
        run.kill()
        pytest.fail(f"no trial was running after 120 s: {run.communicate()}")
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, f"stdout:\n{out}\nstderr:\n{err}"
    assert "to resume: python -m search.run" in out
    trials = load(url, study_name)
    assert counts(trials)["running"] == 0
    best = json.loads((tmp_path / "studies" / study_name / "best.json").read_text())
    done = counts(trials)["trained"]
    again = search(*args, "--trials", str(done + 2), cwd=tmp_path)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"{done} trained so far" in out
    assert counts(load(url, study_name))["trained"] == done + 2
    assert best["study_name"] == study_name


def test_two_workers_share_one_sqlite_study(study_name, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    run_workers(2, 20, url, study_name, tmp_path)
    assert_whole(load(url, study_name), 20)
    logs = worker_logs(tmp_path, study_name)
    assert "database is locked" not in logs and "Traceback" not in logs
