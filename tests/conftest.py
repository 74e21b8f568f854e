import sys
from pathlib import Path

import pytest

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
