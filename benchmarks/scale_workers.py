"""Many workers on one PostgreSQL study: peak connections and storage time per trial.

python -m benchmarks.scale_workers [--workers 1 4 16] [--trials 64] [--postgres URL]

For each worker count, a fresh study on the real PostgreSQL and that many worker
processes (as on that many GPUs), each running the real search loop
(search.worker.run_worker with the heartbeat, the slot lock and the median
pruner) on tiny synthetic trials. Every public method of each worker's storage
is timed in its main thread, so the figure is the time workers spent waiting on
the database per trained trial, whatever the contention; pg_stat_activity is
polled for the peak number of connections to the database. On a 2-core machine
16 processes also wait for the CPU, inside storage calls too: the figures are an
upper bound there.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time
import uuid

import optuna
import sqlalchemy

from benchmarks.machine import save

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def worker(url: str, name: str, trials: int, index: int, out: mp.Queue) -> None:
    """One worker process: the real loop on a timed storage."""
    import torch

    import search.cli
    from benchmarks.storage_overhead import StorageTimer
    from search.data import search_split, synthetic
    from search.limits import Limits
    from search.profile import Profile
    from search.signals import Stop
    from search.slots import Slots
    from search.study import make_pruner, make_storage
    from search.worker import Search, run_worker

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        storage = make_storage(url)
        timer = StorageTimer(storage)
        study = optuna.load_study(
            study_name=name, storage=storage, pruner=make_pruner("median", [64, 128])
        )
        data = search_split(synthetic(n_train=160, n_test=16), 0, 64, 32)
        profile = Profile("scale", 128, (0.5, 1.0), min_steps=1, batch_sizes=(32,))
        search = Search(data, Limits(5_000_000, 12_000_000), profile, 0, torch.device("cpu"))
        run_worker(study, search, Slots(study, trials, url), Stop(), url=url)
        out.put({"worker": index, "seconds": timer.seconds, "calls": timer.calls, "error": None})
    except Exception as e:  # reported, and the run counts as failed
        out.put({"worker": index, "seconds": 0.0, "calls": 0, "error": repr(e)})


def peak_connections(url: str, done: threading.Event, peak: list[int]) -> None:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    query = sqlalchemy.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    )
    while not done.is_set():
        with engine.connect() as c:
            peak[0] = max(peak[0], c.execute(query).scalar() - 1)  # not this one
        time.sleep(0.1)


def measure(url: str, workers: int, trials: int) -> dict:
    from search.records import counts

    name = f"scale-{workers}-{uuid.uuid4().hex[:6]}"
    optuna.create_study(study_name=name, storage=url, direction="maximize")
    done, peak = threading.Event(), [0]
    poller = threading.Thread(target=peak_connections, args=(url, done, peak))
    poller.start()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.perf_counter()
    procs = [ctx.Process(target=worker, args=(url, name, trials, i, out)) for i in range(workers)]
    for p in procs:
        p.start()
    reports = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    trials_ = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    c = counts(trials_)
    optuna.delete_study(study_name=name, storage=url)
    storage_s = sum(r["seconds"] for r in reports)
    result = {
        "workers": workers,
        "trained": c["trained"],
        "counts": c,
        "errors": [r["error"] for r in reports if r["error"]],
        "exit_codes": [p.exitcode for p in procs],
        "peak_connections": peak[0],
        "storage_seconds_per_trained_trial": storage_s / max(1, c["trained"]),
        "storage_calls_per_trained_trial": sum(r["calls"] for r in reports) / max(1, c["trained"]),
        "median_worker_storage_seconds": statistics.median(r["seconds"] for r in reports),
        "wall_seconds": wall,
    }
    print(
        f"{workers:3d} workers: {c['trained']} trained ({c['running']} running, {c['failed']} "
        f"failed, {len(result['errors'])} errors), peak {peak[0]} connections, storage "
        f"{1e3 * result['storage_seconds_per_trained_trial']:.0f} ms per trained trial in "
        f"{result['storage_calls_per_trained_trial']:.0f} calls, wall {wall:.0f} s",
        flush=True,
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--postgres", default=DEFAULT_URL)
    args = ap.parse_args()
    results = [measure(args.postgres, n, args.trials) for n in args.workers]
    print(f"wrote {save('scale_workers', {'trials': args.trials, 'results': results})}")


if __name__ == "__main__":
    main()
