import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))  # benchmarks/ and docs/ for the tests that run them


def _share_the_cores() -> None:
    """Under pytest-xdist, each test process gets its share of the cores for torch and
    for the subprocesses it starts: N processes with every core each run N times the
    threads there are cores for, and all of them crawl."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


_share_the_cores()

# Synthetic search trials of about a second each on the CPU.
FAST_SEARCH = [
    "--dataset",
    "synthetic",
    "--trial-images",
    "1024",
    "--train-images",
    "512",
    "--val-images",
    "256",
    "--max-macs",
    "60M",
    "--device",
    "cpu",
    "--no-progress",
    "--no-estimate",
    "--seed",
    "1",
]


def examples(full: int) -> list:
    """Hypothesis examples of a property test: a tenth (at least 25) in the default run,
    the full count under the `slow` marker."""
    return [max(25, full // 10), pytest.param(full, marks=pytest.mark.slow, id=f"all-{full}")]


def _small():
    """resnet-tiny at half its widths: a quarter of its 49M MACs, for the tests that train
    a few steps of some network (the trainer, not the network, under test)."""
    from dataclasses import replace

    from models.presets import preset

    tiny = preset("resnet-tiny")
    stages = tuple(replace(s, channels=s.channels // 2) for s in tiny.stages)
    return replace(tiny, stem_channels=tiny.stem_channels // 2, stages=stages)


SMALL = _small()


@dataclass(frozen=True)
class Finished:
    """A finished study, as `search.run` leaves it, shared by the tests that read one."""

    cwd: Path
    url: str
    name: str
    rc: int
    out: str


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Finished:
    """6 trained synthetic candidates (no pruning: every one complete), resnet-tiny
    enqueued first, resnet18 refused by the budget; the CPU estimate printed."""
    from search import run

    cwd = tmp_path_factory.mktemp("finished")
    url, name = f"sqlite:///{cwd}/study.db", "done"
    argv = [a for a in FAST_SEARCH if a != "--no-estimate"]
    argv += ["--trials", "6", "--pruner", "none", "--study-name", name, "--storage", url]
    argv += ["--enqueue", "resnet-tiny", "--enqueue", "resnet18"]
    here, out = os.getcwd(), io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            rc = run.main(argv)
    finally:
        os.chdir(here)
    return Finished(cwd, url, name, rc, out.getvalue())


@pytest.fixture
def examples_dir() -> Path:
    return ROOT / "examples"


PG_URL = os.environ.get("NAS_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_reachable() -> bool:
    try:
        with sqlalchemy.create_engine(PG_URL).connect():
            return True
    except Exception:
        return False


@pytest.fixture
def pg_url():
    """The real PostgreSQL: skipped where there is none, but never in CI."""
    if not postgres_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the PostgreSQL at {PG_URL}")
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    return PG_URL


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The readers of the shared finished study run in one xdist process, which makes it
    once (a session fixture is made once per process)."""
    for item in items:
        if "finished" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("finished"))
