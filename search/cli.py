"""What every CLI of the search shares: one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import NoReturn

import optuna

# Heartbeat, group and the retry callback are marked experimental in Optuna;
# they are deliberate choices here, so the warnings are noise for a user.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage dump), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
