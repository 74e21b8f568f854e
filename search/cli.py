"""What every CLI of the search shares: one-line errors with exit code 2, counts as
people write them, and opening the study a command names."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import NoReturn

import optuna
from tqdm import tqdm

from search.records import counts, ranked
from search.study import StudyError, default_storage, open_study


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage dump), exit code 2, and
    no abbreviated flags (`--stor URL` must not slip past the code that keeps the
    storage URL off the workers' command lines)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


_NUMBER = r"\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)\s*"
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def _parse(text: str, units: dict[str, float], example: str) -> int:
    m = re.fullmatch(_NUMBER + r"([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (try {example})")
    value = float(m.group(1)) * units[unit]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return round(value)


def parse_count(text: str) -> int:
    """`5000000`, `5e6`, `5M`, `4.5m`, `500k`, `1G` -> an integer count."""
    return _parse(text, _COUNT_UNITS, "5M, 5e6 or 500k")


def parse_bytes(text: str) -> int:
    """`10MB` (10^6), `10MiB` (2^20), `500kB`, `2e7` -> bytes."""
    return _parse(text, _BYTE_UNITS, "10MB, 10MiB or 500kB")


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


STORAGE_ENV = "NAS_STORAGE"  # where every command finds the storage URL by default


def add_study_args(ap: argparse.ArgumentParser, required: bool = True) -> None:
    """--storage and --study-name, as every CLI that reads an existing study takes them."""
    ap.add_argument(
        "--storage",
        default=os.environ.get(STORAGE_ENV),
        help="SQLAlchemy URL (default $NAS_STORAGE, else sqlite:///studies/NAME.db)",
    )
    ap.add_argument("--study-name", required=required)


def load_existing(args: argparse.Namespace) -> optuna.Study:
    """The study named on the command line; StudyError if it is not there."""
    storage = args.storage or default_storage(args.study_name)
    if storage.startswith("sqlite:///") and not Path(storage[10:]).exists():
        raise StudyError(f"no study database at {storage[10:]}; pass --storage")
    return open_study(storage, args.study_name, create=False, heartbeat=None)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Progress:
    """A bar of trained candidates with the counts and the best so far."""

    def __init__(self, target: int, enabled: bool) -> None:
        self.bar = tqdm(total=target, unit="trial", disable=not enabled, file=sys.stderr)
        self.target, self.last = target, 0.0

    def show(self, study: optuna.Study, *_: object, every_s: float = 0.0) -> None:
        if self.bar.disable or time.monotonic() - self.last < every_s:
            return  # reading the study is not free: only for a bar someone sees
        self.last = time.monotonic()
        trials = study.get_trials(deepcopy=False)
        c, best = counts(trials), next(iter(ranked(trials)), None)
        self.bar.n = min(c["trained"], self.target)
        self.bar.set_postfix_str(
            f"complete {c['complete']} pruned {c['pruned']} rejected {c['rejected']} "
            f"failed {c['failed']}" + (f" best {best.value:.4f}" if best else ""),
            refresh=True,
        )


def tool(name: str) -> str:
    """How to call a command of this environment: bare when PATH finds this one (an
    activated venv), else by its path (`.venv/bin/...`): the `python` on PATH may be
    one without the project."""
    here = Path(sys.executable) if name == "python" else Path(sys.executable).parent / name
    if not here.exists():  # installed elsewhere (pip --user): PATH's, if any
        return shutil.which(name) or name
    on_path = shutil.which(name)
    if on_path and os.path.abspath(on_path) == os.path.abspath(here):  # not resolved: a
        return name  # venv's python links to the base interpreter, which has no project
    try:
        relative = os.path.relpath(here)
    except ValueError:  # another drive, or no cwd
        return str(here)
    return relative if os.sep in relative and not relative.startswith("..") else str(here)


def train_command(path: Path | str, epochs: int, data_dir: str | None) -> str:
    """The command that final-trains an exported network for the horizon, 3 seeds, as
    search.run and search.choose print it."""
    extra = ["--data-dir", data_dir] if data_dir else []
    argv = [tool("python"), "-m", "search.train", str(path), *extra]
    return f"{shlex.join(argv)} --epochs {epochs} --seeds 3"
