"""A child process's work for tests that start many at once: light to import (no torch,
no test module), so that starting them costs little."""

from __future__ import annotations


def open_at_once(url: str, barrier, out) -> None:
    """A worker's first step: open the storage, at the same moment as the others."""
    from search.study import StudyError, make_storage

    barrier.wait()
    try:
        make_storage(url, heartbeat=None)
        out.put(None)
    except StudyError as e:
        out.put(str(e))
