"""`search.run --workers N` on the CPU: wall clock, and each worker's training speed.

python -m benchmarks.cpu_workers [--workers 1 2] [--trials 10] [--postgres URL]
    [--root PATH] [--name NAME] [--limit SECONDS]

The product's own command, a quick synthetic search with one seed, once per
worker count, each in a fresh study (SQLite in a temporary folder, or a new
study on `--postgres`). Then the study is read back: trained, running and
failed trials, and per worker its median training images/s and the thread
count its trials recorded. `--root` runs another checkout's code, which is how
the same command is timed before a change. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna

from benchmarks.machine import save

ROOT = Path(__file__).resolve().parents[1]


def measure(workers: int, trials: int, url: str | None, root: Path, limit: float) -> dict:
    from search.records import counts

    name = f"cpu-workers-{workers}-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as tmp:
        url = url or f"sqlite:///{tmp}/s.db"
        argv = ["--dataset", "synthetic", "--quick", "--trials", str(trials), "--seed", "0"]
        argv += ["--workers", str(workers), "--study-name", name, "--no-progress"]
        env = dict(os.environ, PYTHONPATH=str(root), NAS_STORAGE=url)
        env.pop("OMP_NUM_THREADS", None)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "search.run", *argv], cwd=tmp, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the product's own stop: trials marked, workers stopped
            out, _ = proc.communicate()
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name=name, storage=url)
        trials_ = study.get_trials(deepcopy=False)
        if "postgresql" in url:
            optuna.delete_study(study_name=name, storage=url)
    per_worker: dict[str, list] = {}
    for t in trials_:
        if "images_per_s" in t.user_attrs:
            per_worker.setdefault(t.user_attrs["worker"], []).append(t)
    result = {
        "workers": workers,
        "trials": trials,
        "storage": url.split(":")[0],
        "exit_code": proc.returncode,
        "timed_out": wall >= limit,
        "wall_seconds": round(wall, 1),
        "counts": counts(trials_),
        "per_worker": [
            {
                "images_per_s": round(statistics.median(t.user_attrs["images_per_s"] for t in ts)),
                "threads": sorted({threads(t.user_attrs.get("device", "")) for t in ts}),
                "complete_trials": len(ts),
            }
            for ts in per_worker.values()
        ],
        "output_tail": out.splitlines()[-6:],
    }
    c = result["counts"]
    speeds = [w["images_per_s"] for w in result["per_worker"]]
    print(
        f"{workers:3d} workers: {wall:6.0f} s{' (limit reached)' if result['timed_out'] else ''}"
        f", exit {proc.returncode}; {c['trained']} trained, {c['running']} running, "
        f"{c['failed']} failed, {c['rejected']} rejected; images/s per worker {speeds}",
        flush=True,
    )
    return result


def threads(device: str) -> int | None:
    m = re.search(r"\((\d+) threads\)", device)
    return int(m[1]) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--postgres", help="a PostgreSQL URL instead of a temporary SQLite file")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose code runs")
    ap.add_argument("--name", default="cpu_workers", help="results/NAME-cpu.json")
    ap.add_argument("--limit", type=float, default=1800, help="seconds before a run is stopped")
    args = ap.parse_args()
    runs = [measure(n, args.trials, args.postgres, args.root, args.limit) for n in args.workers]
    commit = subprocess.run(
        ["git", "-C", str(args.root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"wrote {save(args.name, {'code': commit, 'runs': runs})}")


if __name__ == "__main__":
    main()
