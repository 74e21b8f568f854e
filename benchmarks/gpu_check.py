r"""The CUDA path of the product, proved and measured in one command on a lent GPU.

python -m benchmarks.gpu_check [--out DIR] [--data-dir DIR] [--dry-run]

A GPU machine may be lent for minutes, offline: this is what runs there. Seven
steps, each timed, each with a time cap (all of them fit in 8 minutes on one
H100/H200), each guarded: a failing step is recorded with its error and the
next one still runs. The result file is rewritten after every step, so a run cut
short still brings back what it measured.

1. environment: GPU, torch and CUDA versions, bf16, cores, free memory.
2. throughput: this trainer against the classic DataLoader loop
   (benchmarks/throughput.py) on resnet18-2111 (4.98M) and resnet-tiny at
   3x32x32; goals: >= 100,000 images/s on resnet-tiny, >= 8x the classic loop.
3. workers: `search.run --dataset synthetic --workers-per-gpu K` for 1, 4 and 8 workers
   on the one GPU: summed training images/s, and nvidia-smi's utilisation.
4. search: a 30-trial `search.run --quick` on Fashion-MNIST: wall clock, best
   trial, best.json.
5. final: `search.train` of that winner for 2 epochs: test accuracy.
6. tests: `pytest -m gpu`.
7. compile: the trial step eager, with the trainer's CUDA graphs of the model
   (its default on CUDA), and under torch.compile (default; reduce-overhead, which
   adds CUDA graphs) on resnet-tiny: seconds to the first step, images/s, and the
   trial length past which each pays against eager.

On the GPU machine (PyTorch there, nothing else; results come back through $OUT):
run `bash scripts/gpu-wheels` here first (wheels into .whl/, Fashion-MNIST into
.data/), then run, with carry [".whl", ".data"] and a timeout of 540 s (one line in
benchmarks/README.md#gpu-check):

set -o pipefail; \
python3 -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl -e . \
  || { python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
       && export PYTHONPATH=/tmp/site; }; \
PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT 2>&1 | tee $OUT/gpu_check.log

`--dry-run` runs the same steps on the CPU at tiny sizes (a few hundred images,
2-3 trials, 1 and 2 workers, a 1-epoch final training on 600 Fashion-MNIST
images) and writes gpu_check-dryrun-cpu.json: everything up to the GPU.
Without a CUDA device and without --dry-run it refuses to start (exit code 2).
Figures and what they mean: benchmarks/README.md#gpu-check.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from benchmarks.machine import RESULTS, machine, result_path

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
GOAL_IMAGES_PER_S = 100_000  # resnet-tiny at 3x32x32, this trainer, one H100/H200
GOAL_RATIO = 8.0  # this trainer against the classic DataLoader loop
KILL_AFTER_S = 20  # a command that has not stopped this long after SIGTERM is killed
TAIL = 30  # lines of a command's output kept in the result


@dataclass(frozen=True)
class Sizes:
    """How big each step is: on the GPU, or in the dry run on the CPU."""

    device: str
    budget_s: float  # all steps together; each step also has its own cap
    caps: dict[str, float]  # seconds per step
    images: int  # throughput: this trainer's images per epoch
    classic_images: int  # throughput: the classic loop's images per epoch
    batch_size: int
    worker_counts: tuple[int, ...]
    worker_trials: int
    worker_flags: str  # search.run flags of the workers step
    search_trials: int
    search_flags: str
    subset: tuple[int, int] | None  # Fashion-MNIST train / test images; None: all
    final_epochs: int
    compile_modes: tuple[str, ...]  # torch.compile modes timed against eager, on resnet-tiny


# About 5 minutes expected; the budget holds the caps (550 s together) to 450 s, so that
# with pip's install and the start the run ends inside 8 minutes. Compile is last and gets
# what is left of the budget.
GPU = Sizes(
    device="cuda",
    budget_s=450,
    caps=dict(
        environment=20, throughput=90, workers=150, search=110, final=50, tests=60, compile=100
    ),
    images=50_000,
    classic_images=20_000,
    batch_size=512,
    worker_counts=(1, 4, 8),
    worker_trials=12,
    # Small candidates (the quick profile's MAC cap), every trial to its end (no pruner), so
    # each trained trial records its speed; --timeout ends a run at about 35 s, the cap at 50.
    worker_flags="--trial-images 100k --max-macs 20M --pruner none --timeout 30 --device cuda",
    search_trials=30,
    search_flags="--quick --device cuda",  # no GPU profile: the quick one
    subset=None,
    final_epochs=2,
    compile_modes=("eager", "graphs", "default", "reduce-overhead"),
)
DRY_RUN = Sizes(
    device="cpu",
    # 46 s on a quiet 2-core VM (2026-11-30); the caps are loose, for a loaded one.
    budget_s=480,
    caps=dict(
        environment=60, throughput=90, workers=120, search=90, final=60, tests=120, compile=150
    ),
    images=64,
    classic_images=64,
    batch_size=32,
    worker_counts=(1, 2),
    worker_trials=2,
    worker_flags="--trial-images 512 --train-images 256 --val-images 128 --max-macs 30M "
    "--pruner none --no-estimate --device cpu",
    search_trials=3,
    search_flags="--quick --trial-images 512 --train-images 400 --val-images 64 --no-estimate "
    "--device cpu",
    subset=(600, 200),
    final_epochs=1,
    compile_modes=("eager", "default"),
)


StepFn = Callable[["Context", dict[str, Any]], str]  # fills the figures, returns a headline


class StepFailed(Exception):
    """A step that ran but did not do what it checks; the message says what to do."""


class StepTimeout(Exception):
    """A step ran past its cap."""


@dataclass
class Context:
    """What the steps share."""

    sizes: Sizes
    work: Path  # a temporary folder: studies, staged data, the final training
    data_dir: Path  # where the carried Fashion-MNIST is
    cap: float = 0.0  # the running step's
    fashion_dir: Path | None = None  # the --data-dir the product gets
    best_json: Path | None = None  # step 4's winner, step 5's input

    @property
    def cuda(self) -> bool:
        return self.sizes.device == "cuda"


# --- running the product's commands -----------------------------------------------------


@dataclass
class Ran:
    """How a command ended."""

    exit_code: int | None
    seconds: float
    timed_out: bool
    tail: list[str]

    def figures(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "wall_seconds": round(self.seconds, 1),
            "timed_out": self.timed_out,
            "output_tail": self.tail,
        }


def run_command(args: list[str], limit: float, cwd: Path) -> Ran:
    """`python ARGS`, its output relayed with an indent. Past `limit` seconds it gets
    SIGTERM, the product's own stop (running trials marked, best.json written), and
    SIGKILL KILL_AFTER_S later. The project's code is found from any folder."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    print(f"  $ python {shlex.join(args)}", flush=True)
    tail: deque[str] = deque(maxlen=TAIL)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        text=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    relay = threading.Thread(target=_relay, args=(proc.stdout, tail), daemon=True)
    relay.start()
    timed_out = False
    try:
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            print(f"  (past {limit:.0f} s: stopping it)", flush=True)
            proc.terminate()
            proc.wait(timeout=KILL_AFTER_S)
    except subprocess.TimeoutExpired:
        pass
    finally:  # past the grace, or our own stop (Ctrl-C, the step's cap): no orphans
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    relay.join(timeout=5)
    return Ran(proc.returncode, time.perf_counter() - start, timed_out, list(tail))


def _relay(stream: IO[str], tail: deque[str]) -> None:
    for line in stream:
        tail.append(line.rstrip())
        print(f"    {line.rstrip()}", flush=True)


class GpuSampler:
    """nvidia-smi's utilisation and memory of each GPU every `every` seconds, in a thread,
    while a command runs; None and why where there is nothing to sample."""

    QUERY = (
        "nvidia-smi",
        "--query-gpu=utilization.gpu,memory.used",
        "--format=csv,noheader,nounits",
    )

    def __init__(self, on: bool, every: float = 0.5) -> None:
        self.every = every
        self.why = None if on else "dry run on the CPU: nvidia-smi not used"
        if on and shutil.which("nvidia-smi") is None:
            self.why = "nvidia-smi is not on this machine's PATH"
        self.samples: list[list[tuple[float, float]]] = []
        self.failed, self.last_error = 0, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        if self.why is None:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                out = subprocess.run(
                    self.QUERY, capture_output=True, text=True, timeout=5, check=True
                ).stdout
                rows = [line.split(",") for line in out.strip().splitlines()]
                self.samples.append([(float(u), float(m)) for u, m in rows])
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                self.failed, self.last_error = self.failed + 1, str(e)

    def summary(self) -> dict[str, Any]:
        if self.why is not None:
            return {"utilization": None, "why": self.why}
        if not self.samples:
            why = f"no sample: {self.failed} queries failed ({self.last_error or 'too short'})"
            return {"utilization": None, "why": why}
        gpus = []
        for i in range(len(self.samples[0])):
            util = [s[i][0] for s in self.samples if len(s) > i]
            mem = [s[i][1] for s in self.samples if len(s) > i]
            gpus.append(
                {
                    "utilization_mean": round(statistics.mean(util), 1),
                    "utilization_median": statistics.median(util),
                    "utilization_max": max(util),
                    "memory_used_mib_max": max(mem),
                    "utilization": util,
                }
            )
        return {
            "every_s": self.every,
            "samples": len(self.samples),
            "failed": self.failed,
            "gpus": gpus,
        }


def load_trials(name: str, url: str) -> list[Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def training_rates(trials: list[Any]) -> dict[str, Any]:
    """Images/s of the complete trials (the ones that record it). Summed: each worker's
    training rate (its images over its training seconds), added up, as if all ran at
    once. Span: all their images over first start to last end, with everything a trial
    does besides training steps (building, validating, the storage)."""
    done = [t for t in trials if t.state.name == "COMPLETE" and "images_per_s" in t.user_attrs]
    if not done:
        return {"complete_trials": 0, "images_per_s_sum": None, "images_per_s_span": None}
    per_worker: dict[str, list[float]] = {}
    for t in done:
        w = per_worker.setdefault(str(t.user_attrs.get("worker")), [0.0, 0.0])
        w[0] += t.user_attrs["images_per_s"] * t.user_attrs["train_seconds"]
        w[1] += t.user_attrs["train_seconds"]
    images = sum(w[0] for w in per_worker.values())
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    return {
        "complete_trials": len(done),
        "images_trained": round(images),
        "images_per_s_sum": round(sum(i / max(s, 1e-9) for i, s in per_worker.values())),
        "images_per_s_span": round(images / max(span.total_seconds(), 1e-9)),
        "per_worker_images_per_s": [round(i / max(s, 1e-9)) for i, s in per_worker.values()],
        "trial_seconds_median": statistics.median(t.user_attrs["seconds"] for t in done),
    }


# --- Fashion-MNIST, as carried ----------------------------------------------------------


def find_fashion_mnist(folder: Path) -> dict[str, Path]:
    """Each file as torchvision keeps it (FashionMNIST/raw/NAME), gzipped there (what
    scripts/gpu-wheels carries), or gzipped at the top (the Debian package's layout)."""
    found = {}
    for n in FASHION_MNIST:
        raw = folder / "FashionMNIST" / "raw"
        for p in (raw / n, raw / f"{n}.gz", folder / f"{n}.gz"):
            if p.is_file():
                found[n] = p
                break
    return found


def first_items(idx: bytes, n: int) -> bytes:
    """The first `n` items of an IDX file (the MNIST format), header rewritten."""
    dims = idx[3]
    shape = struct.unpack(f">{dims}I", idx[4 : 4 + 4 * dims])
    k = min(n, shape[0])
    header = idx[:4] + struct.pack(f">{dims}I", k, *shape[1:])
    return header + idx[4 + 4 * dims : 4 + 4 * dims + k * math.prod(shape[1:])]


def stage_fashion_mnist(found: dict[str, Path], dest: Path, subset: tuple[int, int] | None) -> Path:
    """A --data-dir the loader reads offline: FashionMNIST/raw/ with the files unpacked.
    Gzipped, torchvision would check them against its own checksums, which the Debian
    package's recompressed files fail, and try to download them."""
    if subset is None and all(p.name == n for n, p in found.items()):
        return found[FASHION_MNIST[0]].parents[2]
    raw = dest / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for n, p in found.items():
        data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        if subset is not None:
            data = first_items(data, subset[0] if n.startswith("train") else subset[1])
        (raw / n).write_bytes(data)
    return dest


def fashion_mnist_dir(ctx: Context) -> Path:
    from search.data import DEBIAN_FASHION_MNIST

    if ctx.fashion_dir is None:
        for source in (ctx.data_dir, DEBIAN_FASHION_MNIST):
            found = find_fashion_mnist(source)
            if len(found) == len(FASHION_MNIST):
                break
        else:
            raise StepFailed(
                f"Fashion-MNIST is not under {ctx.data_dir} (nor {DEBIAN_FASHION_MNIST}): "
                "run `bash scripts/gpu-wheels` in the checkout that starts the run (it copies "
                "the Debian package dataset-fashion-mnist into .data/FashionMNIST/raw) and "
                "name '.data' in the run's carry"
            )
        print(f"  Fashion-MNIST from {found[FASHION_MNIST[0]].parent}", flush=True)
        ctx.fashion_dir = stage_fashion_mnist(found, ctx.work / "data", ctx.sizes.subset)
    return ctx.fashion_dir


# --- the steps ---------------------------------------------------------------------------


def environment(ctx: Context, fig: dict[str, Any]) -> str:
    from search.env import versions
    from search.launch import cpu_cores

    fig["machine"] = machine(ctx.sizes.device)
    fig |= {  # torch, python and the cores are in fig["machine"]
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cores_usable": cpu_cores(),
        "memory_available_gib": memory_available_gib(),
        "versions": versions(),
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        fig |= {
            "gpu": props.name,
            "gpus": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "bf16": torch.cuda.is_bf16_supported(),
            "gpu_memory_free_gib": round(free / 2**30, 1),
            "gpu_memory_total_gib": round(total / 2**30, 1),
        }
    else:
        fig |= {"gpu": None, "bf16": None}
    fig["nvidia_smi"] = nvidia_smi(ctx.cuda)
    gpu = f"{fig['gpu']} ({fig['gpu_memory_free_gib']} GiB free)" if ctx.cuda else "no GPU"
    return (
        f"{gpu}, torch {fig['machine']['torch']} (CUDA {fig['cuda']}), bf16 {fig['bf16']}, "
        f"{fig['cores_usable']} cores, {fig['memory_available_gib']} GiB memory free"
    )


def memory_available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def nvidia_smi(cuda: bool) -> dict[str, Any]:
    """Driver and compute mode (an exclusive mode would keep the workers off a GPU that
    this process holds), or why not."""
    if not cuda:
        return {"available": False, "why": "dry run on the CPU: nvidia-smi not used"}
    if shutil.which("nvidia-smi") is None:
        return {"available": False, "why": "nvidia-smi is not on this machine's PATH"}
    query = "--query-gpu=name,driver_version,compute_mode,memory.total"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"available": False, "why": f"nvidia-smi failed: {e}"}
    keys = ("name", "driver", "compute_mode", "memory_total")
    gpus = [
        dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
        for line in out.strip().splitlines()
    ]
    return {"available": True, "gpus": gpus}


def throughput(ctx: Context, fig: dict[str, Any]) -> str:
    from benchmarks.throughput import measure
    from search.launch import cpu_cores

    s, device = ctx.sizes, torch.device(ctx.sizes.device)
    workers = min(8, cpu_cores())  # the classic loop's DataLoader workers, as throughput.py
    failed = []
    for name in ("resnet18-2111", "resnet-tiny"):  # one failing keeps the other's figures
        fig[name] = {}
        try:
            measure(name, device, s.images, s.batch_size, workers, s.classic_images, fig[name])
        except (StepTimeout, KeyboardInterrupt):
            raise
        except Exception as e:
            fig[name]["error"] = f"{type(e).__name__}: {e}"
            failed.append(f"{name}: {fig[name]['error']}")
    if ctx.cuda:
        torch.cuda.empty_cache()  # the next steps' processes want the memory
    big, small = fig["resnet18-2111"], fig["resnet-tiny"]
    fig["goals"] = goals(big, small)
    if failed:
        raise StepFailed("; ".join(failed))
    return "; ".join(
        f"{r['preset']} {r['trainer_images_per_s']:,.0f} images/s, {r['ratio']:.1f}x the "
        f"classic loop, {r['ratio_same_compute']:.1f}x with its compute settings"
        for r in (big, small)
    )


def goals(big: dict[str, Any], small: dict[str, Any]) -> list[dict[str, Any]]:
    """The throughput goals, judged on the figures there are."""
    out = []
    if "trainer_images_per_s" in small:
        what = f"resnet-tiny: this trainer >= {GOAL_IMAGES_PER_S:,} images/s"
        out.append(goal(what, small["trainer_images_per_s"], GOAL_IMAGES_PER_S))
    for r in (big, small):
        for key, label in (("ratio", ""), ("ratio_same_compute", " with the same compute")):
            if key in r:
                what = f"{r['preset']}: >= {GOAL_RATIO:g}x the classic loop{label}"
                out.append(goal(what, r[key], GOAL_RATIO))
    return out


def goal(what: str, value: float, target: float) -> dict[str, Any]:
    return {"goal": what, "value": round(value, 2), "met": value >= target}


def search_run(ctx: Context, name: str, trials: int, flags: str) -> tuple[list[str], str]:
    """`search.run` on a fresh SQLite study in the work folder: its arguments, its URL."""
    url = f"sqlite:///{ctx.work}/{name}.db"
    args = f"-m search.run --trials {trials} --seed 0 --no-progress {flags}".split()
    return [*args, "--study-name", name, "--storage", url], url


def workers(ctx: Context, fig: dict[str, Any]) -> str:
    from search.records import counts

    runs = fig.setdefault("runs", [])
    limit = ctx.cap / len(ctx.sizes.worker_counts)
    for k in ctx.sizes.worker_counts:
        per = f"--workers-per-gpu {k}" if ctx.cuda else f"--workers {k}"  # one GPU here
        flags = f"--dataset synthetic {per} {ctx.sizes.worker_flags}"
        args, url = search_run(ctx, f"gpu-check-workers-{k}", ctx.sizes.worker_trials, flags)
        with GpuSampler(ctx.cuda) as gpu:
            ran = run_command(args, limit, ctx.work)
        trials = load_trials(f"gpu-check-workers-{k}", url)
        run = {"workers": k, **ran.figures(), "counts": counts(trials)}
        runs.append(run | training_rates(trials) | {"gpu": gpu.summary()})
    one, many = runs[0], runs[-1]
    if one["images_per_s_span"] and many["images_per_s_span"]:
        fig["speedup_span"] = round(many["images_per_s_span"] / one["images_per_s_span"], 2)
        fig["speedup_sum"] = round(many["images_per_s_sum"] / one["images_per_s_sum"], 2)
    # A run stopped at its cap is still a measurement: its complete trials count.
    bad = []
    for r in runs:
        if r["exit_code"] and not r["timed_out"]:
            bad.append(f"{r['workers']} worker(s): exit {r['exit_code']}")
        if not r["complete_trials"]:
            bad.append(f"{r['workers']} worker(s): no trial completed")
    if bad:
        raise StepFailed("; ".join(bad))
    return "; ".join(f"{r['workers']} worker(s) {worker_line(r)}" for r in runs)


def worker_line(run: dict[str, Any]) -> str:
    gpus = run["gpu"].get("gpus")
    busy = f", GPU busy {gpus[0]['utilization_mean']}% on average" if gpus else ""
    return (
        f"{run['images_per_s_sum']:,} images/s summed, {run['images_per_s_span']:,} over the "
        f"span ({run['complete_trials']} complete in {run['wall_seconds']:.0f} s{busy})"
    )


def search(ctx: Context, fig: dict[str, Any]) -> str:
    from search.records import counts

    data = fashion_mnist_dir(ctx)
    name, flags = "gpu-check-fashion-mnist", f"--dataset fashion-mnist {ctx.sizes.search_flags}"
    args, url = search_run(ctx, name, ctx.sizes.search_trials, flags)
    with GpuSampler(ctx.cuda) as gpu:
        ran = run_command([*args, "--data-dir", str(data)], ctx.cap, ctx.work)
    fig |= ran.figures() | {"counts": counts(load_trials(name, url)), "gpu": gpu.summary()}
    best = ctx.work / "studies" / name / "best.json"
    if not best.exists():
        raise StepFailed(f"search.run exited {ran.exit_code} and wrote no best.json")
    export = json.loads(best.read_text())
    ctx.best_json = best  # stopped at the cap, the winner so far still gets its final training
    fig["best_json"] = str(best)
    fig["best"] = {k: export[k] for k in ("trial", "params", "macs", "training", "architecture")}
    fig["best"]["validation_accuracy"] = export["validation"]["accuracy"]
    c = fig["counts"]
    if ran.exit_code != 0:
        stopped = " (stopped at the cap)" if ran.timed_out else ""
        raise StepFailed(f"search.run exited {ran.exit_code}{stopped} after {c['trained']} trained")
    return (
        f"{c['trained']} trained ({c['complete']} complete, {c['pruned']} pruned, "
        f"{c['rejected']} rejected) in {ran.seconds:.0f} s; best trial {export['trial']}: "
        f"validation {export['validation']['accuracy']:.4f}, {export['params']:,} params"
    )


def final(ctx: Context, fig: dict[str, Any]) -> str:
    if ctx.best_json is None or ctx.fashion_dir is None:
        raise StepFailed("no winner to train: the search step wrote no best.json")
    out = ctx.work / "final"
    args = ["-m", "search.train", str(ctx.best_json), "--data-dir", str(ctx.fashion_dir)]
    args += f"--epochs {ctx.sizes.final_epochs} --seed 0 --device {ctx.sizes.device}".split()
    ran = run_command([*args, "--no-progress", "-o", str(out)], ctx.cap, ctx.work)
    fig |= ran.figures()
    if ran.exit_code != 0 or not (out / "result.json").exists():
        raise StepFailed(f"search.train exited {ran.exit_code}")
    result = json.loads((out / "result.json").read_text())
    keys = ("test_accuracy", "epochs", "params", "train_images", "test_images", "seconds")
    fig |= {k: result[k] for k in (*keys, "device")}
    fig["images_per_s"] = result["runs"][0]["images_per_s"]
    return (
        f"test accuracy {100 * result['test_accuracy']:.2f}% after {result['epochs']} "
        f"epoch(s) on {result['train_images']:,} images, {fig['images_per_s']:,.0f} images/s"
    )


def tests(ctx: Context, fig: dict[str, Any]) -> str:
    args = ["-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-n", "0", "-q"]
    ran = run_command(args, ctx.cap, ROOT)
    fig |= ran.figures()
    words = ("passed", "failed", "skipped", "error", "deselected", "no tests ran")
    lines = [x for x in ran.tail if any(w in x for w in words)]
    fig["summary"] = lines[-1].strip("= ") if lines else None
    if ran.exit_code != 0:
        raise StepFailed(f"pytest exited {ran.exit_code}: {fig['summary']}")
    return str(fig["summary"])


def compiled(ctx: Context, fig: dict[str, Any]) -> str:
    """torch.compile of the trial step, against eager: does its compile time pay within a
    trial? Last, since a compiler that hangs must not cost the other steps."""
    from benchmarks.throughput import measure_compiled

    s = ctx.sizes
    measure_compiled("resnet-tiny", torch.device(s.device), s.images, s.batch_size,
                     s.compile_modes, fig)  # fmt: skip
    return "; ".join(
        f"{m} {fig[m]['images_per_s']:,} images/s (first step {fig[m]['first_step_s']:.1f} s"
        + (
            f", pays after {fig[m]['pays_after_images']:,} images"
            if fig[m].get("pays_after_images")
            else ""
        )
        + ")"
        for m in s.compile_modes
    )


STEPS: tuple[tuple[str, StepFn, bool], ...] = (
    ("environment", environment, False),  # (name, function, runs commands)
    ("throughput", throughput, False),
    ("workers", workers, True),
    ("search", search, True),
    ("final", final, True),
    ("tests", tests, True),
    ("compile", compiled, False),
)


# --- the run -----------------------------------------------------------------------------


@contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """StepTimeout after `seconds`, raised in this (the main) thread."""

    def ring(*_: object) -> None:
        raise StepTimeout(f"past its cap of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_step(
    i: int, total: int, name: str, fn: StepFn, commands: bool, ctx: Context, left: float
) -> dict:
    """One step, timed, capped and guarded: its figures, and its error if it failed."""
    ctx.cap = min(ctx.sizes.caps[name], left)
    fig: dict[str, Any] = {"cap_s": round(ctx.cap)}
    print(f"[{i}/{total}] {name} (at most {ctx.cap:.0f} s)", flush=True)
    if ctx.cap < 5:
        fig |= {"ok": False, "seconds": 0.0, "error": "skipped: the run's time was used up"}
        print(f"[{i}/{total}] {name}: skipped, no time left", flush=True)
        return fig
    start = time.perf_counter()
    try:  # the product's commands are stopped at the cap; the alarm is the backstop
        with alarm(ctx.cap + (2 * KILL_AFTER_S + 10 if commands else 0)):
            fig["headline"] = fn(ctx, fig)
        fig["ok"] = True
    except Exception as e:
        fig |= {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if not isinstance(e, StepFailed | StepTimeout):
            fig["traceback"] = traceback.format_exc().splitlines()[-12:]
    fig["seconds"] = round(time.perf_counter() - start, 1)
    state = "ok" if fig["ok"] else "FAILED"
    print(
        f"[{i}/{total}] {name}: {state} in {fig['seconds']:.1f} s: "
        f"{fig.get('headline') or fig.get('error')}",
        flush=True,
    )
    return fig


def write(path: Path, record: dict[str, Any]) -> None:
    """Write then rename: a run killed mid-write leaves the last whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


def summary(record: dict[str, Any]) -> str:
    lines = [f"gpu_check {record['mode']}: {record['seconds']:.0f} s"]
    for i, (name, step) in enumerate(record["steps"].items(), 1):
        state = "ok" if step["ok"] else "FAILED"
        text = step.get("headline") or step.get("error")
        lines.append(f"  {i} {name:<12} {state:<6} {step['seconds']:6.1f} s  {text}")
    for g in record["steps"].get("throughput", {}).get("goals", []):
        met = "met" if g["met"] else "NOT met"
        lines.append(f"  goal (on the GPU): {g['goal']}: {met} ({g['value']:,})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of the result file")
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=ROOT / ".data",
        help="the carried Fashion-MNIST (scripts/gpu-wheels); default .data",
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes"
    )
    ap.add_argument(
        "--only",
        metavar="STEP,...",
        help="run these steps (and environment) only, into gpu_check-only-...json: a rerun "
        f"of what failed; steps: {', '.join(n for n, _, _ in STEPS)}",
    )
    args = ap.parse_args(argv)
    if args.only:
        args.only = {"environment", *args.only.split(",")}
        unknown = args.only - {n for n, _, _ in STEPS}
        if unknown:
            ap.error(f"--only: no step {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"error: no CUDA device here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}): this check runs on a GPU machine "
            "(benchmarks/README.md#gpu-check); add --dry-run to rehearse it on the CPU",
            file=sys.stderr,
        )
        return 2
    sizes = DRY_RUN if args.dry_run else GPU
    name = "gpu_check-dryrun" if args.dry_run else "gpu_check"
    steps = [st for st in STEPS if not args.only or st[0] in args.only]
    if args.only:
        name += "-only-" + "-".join(n for n, _, _ in steps[1:])
    mode = "dry run on the CPU" if args.dry_run else "on the GPU"
    path = args.out / result_path(name, sizes.device).name
    record: dict[str, Any] = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": None,  # step 1's
        "mode": mode,
        "sizes": dataclasses.asdict(sizes),
        "steps": {},
        "seconds": 0.0,
        "complete": False,
    }
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        ctx = Context(sizes, Path(work), args.data_dir.resolve())
        try:
            for i, (step, fn, commands) in enumerate(steps, 1):
                left = sizes.budget_s - (time.monotonic() - start)
                record["steps"][step] = run_step(i, len(steps), step, fn, commands, ctx, left)
                if "machine" in record["steps"][step]:
                    record["machine"] = record["steps"][step].pop("machine")
                record["seconds"] = round(time.monotonic() - start, 1)
                write(path, record)
        except KeyboardInterrupt:
            write(path, record)
            print(f"interrupted; wrote {path}", file=sys.stderr)
            return 130
    record["complete"] = True
    write(path, record)
    print(summary(record))
    print(f"wrote {path}")
    return 0 if all(s["ok"] for s in record["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
