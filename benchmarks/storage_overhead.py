"""Time per trial spent in Optuna storage calls, SQLite vs PostgreSQL, next to training.

python -m benchmarks.storage_overhead [--trials 30] [--postgres URL]

Each backend runs the same short synthetic search (the real Objective, budget
gate, median pruner and heartbeat) on a fresh study. Every public method of
the RDBStorage instance is wrapped with a timer, so the figure is the time
the worker spent waiting on the database (the heartbeat thread excluded),
not a model of it.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory

import optuna
import torch

import search.cli  # noqa: F401  (silences Optuna's experimental-feature warnings)
from benchmarks.machine import save
from search.data import search_split, synthetic
from search.limits import Limits
from search.profile import Profile
from search.records import counts
from search.signals import Stop
from search.slots import Slots
from search.study import make_pruner, make_storage
from search.worker import Search, run_worker


class StorageTimer:
    """Wraps the storage's methods; sums the main thread's time inside them."""

    def __init__(self, storage: optuna.storages.RDBStorage) -> None:
        self.seconds, self.calls = 0.0, 0
        main = threading.main_thread()
        for name in dir(storage):
            fn = getattr(storage, name)
            if name.startswith("_") or not callable(fn):
                continue

            def timed(*a, _fn=fn, **k):
                if threading.current_thread() is not main:
                    return _fn(*a, **k)
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.calls += 1

            setattr(storage, name, timed)


def measure(url: str, trials: int) -> dict[str, float]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    storage = make_storage(url)
    timer = StorageTimer(storage)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        pruner=make_pruner("median", [512, 1024]),
    )
    data = search_split(synthetic(n_train=1024, n_test=64), 0, 512, 256)
    profile = Profile("bench", 1024, (0.5, 1.0), min_steps=8, batch_sizes=(64, 128))
    search = Search(data, Limits(5_000_000, 40_000_000), profile, 0, torch.device("cpu"))
    start = time.perf_counter()
    run_worker(study, search, Slots(study, trials, url), Stop(), url=url)
    wall = time.perf_counter() - start
    done = study.get_trials(deepcopy=False)
    trained = counts(done)["trained"]
    train_s = sum(t.user_attrs.get("train_seconds", 0.0) for t in done)
    optuna.delete_study(study_name=name, storage=url)
    return {
        "trials": len(done),
        "trained": trained,
        "storage_seconds_per_trained_trial": timer.seconds / trained,
        "storage_calls_per_trained_trial": timer.calls / trained,
        "train_seconds_per_trained_trial": train_s / trained,
        "wall_seconds_per_trained_trial": wall / trained,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    results = {}
    with TemporaryDirectory() as tmp:
        for backend, url in [
            ("sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}"),
            ("postgresql", args.postgres),
        ]:
            results[backend] = r = measure(url, args.trials)
            print(
                f"{backend:10s}: per trained trial (rejected ones' calls included) "
                f"{1e3 * r['storage_seconds_per_trained_trial']:6.1f} ms in "
                f"{r['storage_calls_per_trained_trial']:.0f} storage calls, training "
                f"{r['train_seconds_per_trained_trial']:.2f} s, wall "
                f"{r['wall_seconds_per_trained_trial']:.2f} s",
                flush=True,
            )
    ratio = {
        b: r["storage_seconds_per_trained_trial"] / r["train_seconds_per_trained_trial"]
        for b, r in results.items()
    }
    print(
        "storage time / training time: "
        + ", ".join(f"{b} {100 * x:.1f}%" for b, x in ratio.items())
    )
    print(f"wrote {save('storage_overhead', {'results': results, 'ratio': ratio})}")


if __name__ == "__main__":
    main()
