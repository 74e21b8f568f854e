"""`--workers N` on one machine: N worker processes on one study, one GPU each.

Each worker is the same command with `--worker`. It gets the storage URL from
its environment, never its command line (which every local user can read in
`ps`), GPU i % count through CUDA_VISIBLE_DEVICES, and its parent's pid, so it
stops by itself if the parent dies without passing anything on. A stop of the
parent (Ctrl-C, SIGTERM) is passed on to every worker, and the parent waits.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from search.cli import STORAGE_ENV
from search.signals import Stop

PARENT_ENV = "NAS_PARENT_PID"
SHARE_ENV = "NAS_GPU_SHARE"  # workers on this worker's GPU
KILL_AFTER_S = 60  # a worker that has not stopped this long after the signal is killed


def without(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def gpu_of(i: int, gpus: int, visible: str | None) -> str:
    """Worker i's GPU, as the parent sees them: SLURM and Kubernetes hand a process
    some of the machine's GPUs through CUDA_VISIBLE_DEVICES ("2,3"), so worker 0
    must get "2", not the machine's GPU 0."""
    ids = [g.strip() for g in visible.split(",")] if visible else [str(g) for g in range(gpus)]
    return ids[i % len(ids)]


def cpu_cores() -> int:
    """The cores this process may use: those it may run on (SLURM's, taskset's), and no
    more than a container's CPU quota (cgroup v2 cpu.max: docker --cpus, Kubernetes)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def cpu_threads(workers: int, cores: int) -> int:
    """Threads per CPU worker: the cores divided among them. Without a limit every
    worker's torch uses every core, and N workers on C cores run N*C threads that
    spin against each other (2 workers on 2 cores trained several times slower)."""
    return max(1, cores // workers)


def start(n: int, argv: list[str], url: str, log_dir: Path, gpus: int) -> list[subprocess.Popen]:
    """Start `n` workers of this command; logs in log_dir/worker-<host>-<i>.log.

    Each worker gets its share of the cores as its thread count; on a GPU that
    several workers share, also its share of the GPU's memory (`share_gpu`).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    child = [*without(without(without(argv, "--workers"), "--workers-per-gpu"), "--storage")]
    child += ["--worker", "--no-progress"]
    if gpus:  # each worker sees one GPU, whatever --device cuda:N the parent was given
        child = [*without(child, "--device"), "--device", "cuda"]
    procs = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    threads = str(cpu_threads(n, cpu_cores()))
    for i in range(n):
        env = dict(os.environ, **{STORAGE_ENV: url, PARENT_ENV: str(os.getpid())})
        env |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if gpus:
            gpu = gpu_of(i, gpus, visible)
            share = sum(gpu_of(j, gpus, visible) == gpu for j in range(n))
            env |= {"CUDA_VISIBLE_DEVICES": gpu, SHARE_ENV: str(share)}
        with (log_dir / f"worker-{socket.gethostname()}-{i}.log").open("a") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "search.run", *child],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # the terminal's Ctrl-C reaches the parent only
                )
            )
    return procs


def share_gpu(device: object) -> float | None:
    """In a worker on a GPU shared by k workers: cap this process at 1/k of the GPU's
    memory, so that a candidate fails for lack of memory by its own size and batch,
    never because its neighbours held the memory (the sampler learns from that
    failure that the size does not fit). The cap, or None."""
    import torch

    share = int(os.environ.get(SHARE_ENV, "1"))
    if share <= 1 or getattr(device, "type", None) != "cuda":
        return None
    torch.cuda.set_per_process_memory_fraction(1 / share, device.index)  # None: the current
    return 1 / share


def follow(procs: list[subprocess.Popen], stop: Stop, tick: Callable[[], None]) -> list[int]:
    """Wait for every worker, calling `tick` about once a second; pass a stop on.

    A stop reaches the workers from the signal handler itself, not after the
    next tick (which reads the study): a trial that ends meanwhile is one the
    signal did not stop. A second Ctrl-C is passed on as well, which stops the
    workers at once. Returns their exit codes.
    """
    started = time.monotonic()
    # Held back while the listener goes in, so that a stop is passed on once: here or by it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))
    try:
        stop.listeners.append(lambda signum: _signal_all(procs, signum))
        asked_before = stop()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if asked_before:
        _signal_all(procs, stop.signum or signal.SIGTERM)
    while True:
        try:
            if all(p.poll() is not None for p in procs):
                break
            asked = stop.requested_at
            if asked is not None and time.monotonic() - max(asked, started) > KILL_AFTER_S:
                _signal_all(procs, signal.SIGKILL)
            tick()
            time.sleep(0.5)
        except KeyboardInterrupt:
            _signal_all(procs, signal.SIGINT)
    tick()
    return [p.returncode for p in procs]


def _signal_all(procs: list[subprocess.Popen], signum: int) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
