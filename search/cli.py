"""What every CLI of the search shares: one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import NoReturn

import optuna

from search.study import StudyError, default_storage, open_study

# Heartbeat, group and the retry callback are marked experimental in Optuna;
# they are deliberate choices here, so the warnings are noise for a user.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage dump), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_study_args(ap: argparse.ArgumentParser) -> None:
    """--storage and --study-name, as every CLI that reads an existing study takes them."""
    ap.add_argument(
        "--storage",
        default=os.environ.get("NAS_STORAGE"),
        help="SQLAlchemy URL (default $NAS_STORAGE, else sqlite:///studies/NAME.db)",
    )
    ap.add_argument("--study-name", required=True)


def load_existing(args: argparse.Namespace) -> optuna.Study:
    """The study named on the command line; StudyError if it is not there."""
    storage = args.storage or default_storage(args.study_name)
    if storage.startswith("sqlite:///") and not Path(storage[10:]).exists():
        raise StudyError(f"no study database at {storage[10:]}; pass --storage")
    return open_study(storage, args.study_name, create=False, heartbeat=None)


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)
