"""Stopping on request: Ctrl-C, SIGTERM (docker stop, Kubernetes, SLURM) and a dead parent.

A signal sets an event, and a parent passes it on to its workers at once
(`listeners`); the search loop and the trainer look at the event at safe points
(between optimizer steps, between trials), so no storage call is cut in half.
The running trial is then marked and retried later, and the process exits with
128 + the signal's number. A second Ctrl-C stops at once, except inside `critical()`
on the main thread, which it lets finish first. In another thread (a worker's
ahead thread) `critical()` holds nothing: the main thread waits for that thread's
job to end before it exits.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any] | int | None  # what signal.signal returns
_held = {"depth": 0, "pending": False}  # a second Ctrl-C that arrived inside critical()


@contextmanager
def critical() -> Iterator[None]:
    """Steps that must not be cut apart (fail a trial, queue its retry): a second
    Ctrl-C that lands inside waits for the end, then stops at once as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if _held["depth"] == 0 and _held["pending"]:
            _held["pending"] = False
            raise KeyboardInterrupt


class Stop:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self.requested_at: float | None = None  # time.monotonic() of the first request
        self.listeners: list[Callable[[int], None]] = []  # told at once, from the handler
        self._before: dict[int, Handler] = {}

    def install(self) -> Stop:
        """Handle SIGINT and SIGTERM in this (main) thread until `uninstall`."""
        for s in (signal.SIGINT, signal.SIGTERM):
            self._before[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        """The handlers from before `install`: a program that ran a search in its own
        process (a benchmark, a notebook) is stopped by a signal again as before."""
        for s, handler in self._before.items():
            if handler is not None:  # None: a handler not set from Python, left as it is
                signal.signal(s, handler)
        self._before.clear()

    def _handle(self, signum: int, _frame: object) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            if _held["depth"]:
                _held["pending"] = True
                return
            raise KeyboardInterrupt
        self.request(signum)

    def request(self, signum: int = signal.SIGTERM) -> None:
        first = self.signum is None
        if first:
            self.signum, self.requested_at = signum, time.monotonic()
        self.event.set()
        if first:
            for listener in self.listeners:
                listener(signum)

    def __call__(self) -> bool:
        """True once a stop was asked for."""
        return self.event.is_set()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "stop"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def watch_parent(self, parent_pid: int, poll_s: float = 1.0) -> None:
        """Stop as if sent SIGTERM when the parent process dies without passing a signal on
        (SIGKILL, a scheduler's hard timeout): the process is then re-parented."""

        def watch() -> None:
            while not self.event.is_set():
                if os.getppid() != parent_pid:
                    self.request(signal.SIGTERM)
                    return
                time.sleep(poll_s)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
