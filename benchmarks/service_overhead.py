"""The service around a trial: what a worker does between trials, as the study grows.

python -m benchmarks.service_overhead [--workers 1 16] [--trained 2000]
    [--trial-seconds 2] [--postgres URL] [--name NAME] [--resume]

On a GPU a small candidate's trial takes seconds, so what happens around it
(storage round trips, the slot lock and its reads, sampling, the pruner, the
heartbeat) decides how busy the GPUs are. Each worker here is a process that
runs the real search loop (`search.worker.run_worker` on a real PostgreSQL
study: ask, the space, the budget gate, the slot lock, TPE after its trained
start, the median pruner, the heartbeat, tell) with one thing replaced, in
this harness only: a candidate's training is a wait of `--trial-seconds`,
reported at each rung with an accuracy that depends on the candidate's
settings, so that TPE and the pruner have something to act on.

Recorded per run: the idle fraction (the share of each worker's loop time
spent outside a trial's wait), the seconds outside the wait per trained trial
at 100, 1,000 and 2,000 trained trials (the gap before each trial, counted at
the study's size when it started), its parts (storage calls of the worker's
main thread; waiting in `Slots.wait` while no trial trains; a worker that
proposes ahead also waits on its ahead thread, which neither part counts), the
exact count, lost and duplicated slots, the peak number of database
connections, and the CPU the service takes per trained trial (the workers'
processes and the local PostgreSQL's) with the cores that CPU needs for the
workers to be in a trial 95% of the time: where the machine has fewer, the
idle fraction measures the machine. Run it alone on the machine: on 2 cores,
16 processes also wait for the CPU.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue
import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna

from benchmarks.machine import result_path, save
from benchmarks.scale_workers import DEFAULT_URL, peak_connections

MARKS = (100, 1000, 2000)  # trained trials at which the overhead is read


def fake_accuracy(cfg: object, params: int, frac: float) -> float:
    """A smooth, deterministic score of the sampled settings: best near lr 0.05 (SGD) or
    3e-3 (AdamW), a little better when larger, rising with the rung."""
    best = 0.05 if cfg.optimizer == "sgd" else 3e-3
    lr_term = 0.08 * abs(math.log10(cfg.lr / best))
    return max(0.1, 0.9 - lr_term + 0.01 * math.log10(params) - 0.1 * (1 - frac))


def worker(url: str, name: str, cap: int, seconds: float, index: int, out: mp.Queue) -> None:
    """One worker process: the real loop, its training replaced by a wait."""
    import torch

    import search.cli  # Optuna's experimental warnings off
    from benchmarks.storage_overhead import StorageTimer
    from models import count_params
    from search.data import search_split, synthetic
    from search.limits import Limits
    from search.profile import QUICK
    from search.signals import Stop
    from search.slots import Slots
    from search.study import make_pruner, make_storage
    from search.trainer import EvalStats, TrainResult
    from search.worker import Search, run_worker

    waits: list[tuple[float, float, float]] = []  # a trial's start, end, seconds asleep

    @dataclass(frozen=True)
    class Waiting(Search):
        """A Search whose candidates 'train' by waiting."""

        def train(self, spec, cfg, on_eval=None, stop=None):
            start, done, slept = time.time(), 0.0, 0.0
            history = []
            try:
                for rung, frac in enumerate(self.profile.rungs, 1):
                    t0 = time.time()
                    time.sleep(seconds * (frac - done))
                    slept += time.time() - t0
                    done = frac
                    acc = fake_accuracy(cfg, count_params(spec), frac)
                    history.append(
                        EvalStats(rung, round(frac * cfg.images), rung, 0.0, 0.0, 0.0, acc,
                                  cfg.lr, seconds * frac, 0.0)
                    )  # fmt: skip
                    if on_eval is not None:  # the report and the pruner: outside the wait
                        on_eval(history[-1])
            finally:
                waits.append((start, time.time(), slept))
            return TrainResult(torch.nn.Identity(), history, seconds, seconds, 0.0)

    class TimedSlots(Slots):
        waited = 0.0

        def wait(self, stopped, poll_s: float = 2.0, block: bool = True) -> bool | None:
            t0 = time.perf_counter()
            try:
                return super().wait(stopped, poll_s, block)
            finally:  # what the device waits on: the main thread's, and a blocking one
                # in the ahead thread, which the main thread waits for
                if block or threading.current_thread() is threading.main_thread():
                    TimedSlots.waited += time.perf_counter() - t0

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        storage = make_storage(url)
        timer = StorageTimer(storage)
        pruner = make_pruner("median", QUICK.rung_images())
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        data = search_split(synthetic(n_train=400, n_test=16), 0, 256, 64)
        # ahead: a GPU worker's loop, which samples the next candidate while a trial trains
        search = Waiting(
            data, Limits(5_000_000, QUICK.max_macs), QUICK, 0, torch.device("cpu"), ahead=True
        )
        begin, cpu = time.time(), time.process_time()
        run_worker(study, search, TimedSlots(study, cap, url), Stop(), url=url)
        end, cpu = time.time(), time.process_time() - cpu
        out.put(
            {"worker": index, "begin": begin, "end": end, "waits": waits, "cpu_seconds": cpu,
             "storage_seconds": timer.seconds, "storage_calls": timer.calls,
             "slot_wait_seconds": TimedSlots.waited, "error": None}
        )  # fmt: skip
    except Exception as e:  # reported; the run counts as failed
        out.put({"worker": index, "error": repr(e), "waits": waits})


def overhead_as_it_grows(reports: list[dict], marks: tuple[int, ...]) -> dict[str, float]:
    """Mean seconds outside the wait per trial, for trials started near each mark (the
    10% of trials before it): the gap since the same worker's previous trial ended (or
    since its loop began), and the trial's own time outside its waits (reports, the
    pruner)."""
    gaps = []  # (start time, seconds outside the wait)
    for r in reports:
        last = r["begin"]
        for start, end, slept in sorted(r["waits"]):
            gaps.append((start, start - last + (end - start - slept)))
            last = end
    gaps.sort()
    out = {}
    for mark in marks:
        window = [g for i, (_, g) in enumerate(gaps, 1) if mark - max(1, mark // 10) < i <= mark]
        if window:
            out[str(mark)] = round(statistics.mean(window), 4)
    return out


def postgres_cpu_seconds() -> float | None:
    """CPU seconds the local PostgreSQL's processes have used: the live ones', and those
    of ended ones (connections closed), which their parent reaped; None if none is here."""
    tick, total, found = os.sysconf("SC_CLK_TCK"), 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended meanwhile
            continue
        if "(postgres)" not in text:
            continue
        found = True
        fields = text.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if fields[1] != "postgres":  # the server's first process: reaped children
            total += int(fields[13]) + int(fields[14])
    return total / tick if found else None


def measure(url: str, workers: int, cap: int, seconds: float) -> dict:
    from search.records import counts
    from search.slots import is_trained
    from search.study import SLOT

    name = f"overhead-{workers}-{uuid.uuid4().hex[:6]}"
    optuna.create_study(study_name=name, storage=url, direction="maximize")
    done, peak = threading.Event(), [0]
    poller = threading.Thread(target=peak_connections, args=(url, done, peak))
    poller.start()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    t0, db0 = time.time(), postgres_cpu_seconds()
    procs = [
        ctx.Process(target=worker, args=(url, name, cap, seconds, i, out)) for i in range(workers)
    ]
    for p in procs:
        p.start()
    reports = []
    while len(reports) < workers:  # a worker that died without a word must not hang this
        try:
            reports.append(out.get(timeout=10))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                reports += [{"worker": -1, "error": "died without a report", "waits": []}] * (
                    workers - len(reports)
                )
    for p in procs:
        p.join()
    wall, db1 = time.time() - t0, postgres_cpu_seconds()
    done.set()
    poller.join()
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    optuna.delete_study(study_name=name, storage=url)
    c = counts(trials)
    trained = [t for t in trials if is_trained(t)]
    slots = [t.user_attrs.get(SLOT) for t in trained]
    keys = [str(sorted(t.params.items())) for t in trained]
    ok = [r for r in reports if r["error"] is None]
    waited = sum(slept for r in ok for _, _, slept in r["waits"])
    loop = sum(r["end"] - r["begin"] for r in ok)
    inside = sum(end - start - slept for r in ok for start, end, slept in r["waits"])
    between = loop - waited - inside
    n = max(1, c["trained"])
    result = {
        "workers": workers,
        "trial_seconds": seconds,
        "trained": c["trained"],
        "counts": c,
        "errors": [r["error"] for r in reports if r["error"]],
        "exit_codes": [p.exitcode for p in procs],
        "idle_fraction": round(1 - waited / loop, 4) if loop else None,
        "idle_fraction_with_startup": round(1 - waited / (workers * wall), 4),
        "lost": len(set(range(cap)) - set(slots)),
        "duplicated": (len(slots) - len(set(slots))) + (len(keys) - len(set(keys))),
        "peak_connections": peak[0],
        "overhead_seconds_per_trained_trial": round((loop - waited) / n, 4),
        "overhead_seconds_as_the_study_grows": overhead_as_it_grows(ok, MARKS),
        # its two parts: waiting between trials (for the next candidate), and inside a
        # trial outside its wait (the reports and the pruner)
        "between_trials_seconds_per_trained_trial": round(between / n, 4),
        "in_trial_seconds_per_trained_trial": round(inside / n, 4),
        "storage_seconds_per_trained_trial": round(sum(r["storage_seconds"] for r in ok) / n, 4),
        "storage_calls_per_trained_trial": round(sum(r["storage_calls"] for r in ok) / n, 1),
        "slot_wait_seconds_per_trained_trial": round(
            sum(r["slot_wait_seconds"] for r in ok) / n, 4
        ),
        "wall_seconds": round(wall, 1),
    }
    # The CPU the service takes per trained trial (the workers' processes, all threads,
    # and the database), and the cores it would take to keep the workers in trials 95%
    # of the time: a machine with fewer is CPU-bound, whatever the design.
    cpu = sum(r["cpu_seconds"] for r in ok)
    db = db1 - db0 if db0 is not None and db1 is not None else 0.0
    # Per ask (trained, rejected or unused): comparable between runs whose rejections and
    # first-rung prunings (short waits) differ, which the idle fraction is not
    asks = max(1, c["trained"] + c["rejected"] + c["unused"])
    result |= {
        "worker_cpu_seconds_per_ask": round(cpu / asks, 4),
        "db_cpu_seconds_per_ask": round(db / asks, 4) if db0 is not None else None,
        "worker_cpu_seconds_per_trained_trial": round(cpu / n, 4),
        "db_cpu_seconds_per_trained_trial": round(db / n, 4) if db0 is not None else None,
        "cores_needed_for_5pct_idle": round((cpu + db) * 0.95 * workers / waited, 2)
        if waited
        else None,
        "cores": os.cpu_count(),
    }
    print(
        f"{workers:3d} workers, {seconds} s trials: {c['trained']} trained ({c['rejected']} "
        f"rejected, {c['running']} running, {c['failed']} failed), idle "
        f"{100 * (result['idle_fraction'] or 0):.1f}% of the loop, outside the wait "
        f"{result['overhead_seconds_as_the_study_grows']} s per trial at "
        f"{', '.join(map(str, MARKS))} (between trials {between / n:.4f} s, in a trial "
        f"{inside / n:.4f} s); storage {result['storage_calls_per_trained_trial']} "
        f"calls / {result['storage_seconds_per_trained_trial']} s, slot waits "
        f"{result['slot_wait_seconds_per_trained_trial']} s per trial; lost {result['lost']}, "
        f"duplicated {result['duplicated']}, peak {peak[0]} connections, wall {wall:.0f} s; "
        f"CPU per trial {cpu / n:.3f} s workers + {db / n:.3f} s database: "
        f"{result['cores_needed_for_5pct_idle']} cores for 5% idle ({os.cpu_count()} here)",
        flush=True,
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--trained", type=int, default=2000)
    ap.add_argument("--trial-seconds", type=float, default=2.0)
    ap.add_argument("--postgres", default=DEFAULT_URL)
    ap.add_argument("--name", default="service_overhead", help="results/NAME-cpu.json")
    ap.add_argument("--resume", action="store_true", help="add these runs to the saved ones")
    args = ap.parse_args()
    import json

    path = result_path(args.name)
    runs = json.loads(path.read_text())["runs"] if args.resume and path.exists() else []
    for n in args.workers:
        runs.append(measure(args.postgres, n, args.trained, args.trial_seconds))
        print(f"wrote {save(args.name, {'runs': runs})}", flush=True)


if __name__ == "__main__":
    main()
