import os
import sys
from pathlib import Path

import pytest
import sqlalchemy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

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
    "--seed",
    "1",
]


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
