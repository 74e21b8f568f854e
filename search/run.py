"""python -m search.run: search ResNets under a parameter budget.

Running the same command again resumes the same study; Ctrl-C or SIGTERM stops
after marking the running trial, writes best.json and says how to go on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

import optuna
import torch

from models.complexity import DTYPE_BYTES
from models.presets import PRESETS
from search import latency, launch, space
from search.choose import SHARE
from search.cli import (
    STORAGE_ENV,
    Parser,
    Progress,
    duration,
    human,
    parse_bytes,
    parse_count,
    tool,
    train_command,
)
from search.data import DataError, load_dataset, search_split
from search.env import device_name
from search.estimate import estimate_trial_seconds
from search.horizon import FINAL_EPOCHS, Horizon, cost, study_horizon
from search.limits import Limits
from search.profile import DEFAULT, QUICK
from search.records import counts, ranked, rejections, summary_table, write_best
from search.signals import Stop
from search.slots import Slots
from search.study import (
    DEFAULT_PRUNER,
    GRACE_S,
    HEARTBEAT_S,
    PRUNERS,
    StudyError,
    default_storage,
    make_pruner,
    open_study,
    record_or_check,
    safe_url,
)
from search.trainer import resolve_device
from search.worker import Search, run_worker, warm_start

GAVE_UP = 3  # exit code: the space kept proposing candidates over the limits


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = Parser(prog="python -m search.run", description=__doc__.split("\n")[0])
    add = ap.add_argument
    add("--trials", type=int, default=100, help="trained candidates to reach in the study")
    add("--budget", type=parse_count, default=5_000_000, help="parameters: 5M, 5e6, 500k")
    add(
        "--horizon",
        type=int,
        metavar="EPOCHS",
        help=f"the final training the choice is for, in epochs of the whole training set "
        f"(default: the study's, else {FINAL_EPOCHS}, search.train's default)",
    )
    add("--max-macs", type=parse_count, help="also reject candidates over this many MACs/image")
    add("--max-bytes", type=parse_bytes, help="also reject weights over this size: 10MB, 4MiB")
    add(
        "--max-activation-bytes",
        type=parse_bytes,
        help="also reject a peak of activations over this size (inference, batch 1): 512kB",
    )
    add(
        "--max-latency-ms",
        type=float,
        help="also reject a latency per image over this (batch 1, fp32, CPU), predicted",
    )
    add("--latency-threads", type=int, default=1, help="CPU threads for --max-latency-ms")
    add("--latency-table", help="a table built on the target CPU (default: this CPU's)")
    add(
        "--weight-dtype",
        default="fp32",
        choices=list(DTYPE_BYTES),
        help="the width shipped, for --max-bytes and --max-activation-bytes",
    )
    add("--dataset", default="cifar10", help="cifar10, fashion-mnist, folder:PATH or synthetic")
    add("--data-dir", help="where datasets live (default $NAS_DATA_DIR or ./data)")
    add("--quick", action="store_true", help=f"CPU demo profile: {QUICK.describe(10**9)}")
    add("--trial-images", type=parse_count, help="training images seen per trial")
    add("--train-images", type=parse_count, help="search on a stratified subset this big")
    add("--val-images", type=parse_count, help="validate on a stratified subset this big")
    add("--pruner", default=DEFAULT_PRUNER, choices=PRUNERS)
    add("--study-name", help="default: <dataset>-<budget>[-quick]; the same name resumes")
    add(
        "--storage",
        default=os.environ.get(STORAGE_ENV),
        help="SQLAlchemy URL (default $NAS_STORAGE, else sqlite:///studies/NAME.db)",
    )
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--seed", type=int, default=0, help="the study's seed: split, samplers, trials")
    add("--timeout", type=float, help="stop starting trials after this many seconds")
    add("--enqueue", action="append", default=[], metavar="PRESET", choices=list(PRESETS))
    add("--no-progress", action="store_true", help="no progress bar")
    add("--no-estimate", action="store_true", help="skip timing a trial before the search")
    add(
        "--workers",
        type=int,
        default=1,
        help="processes on this machine: one GPU each, or a share of the CPU's cores",
    )
    add(
        "--workers-per-gpu",
        type=int,
        metavar="K",
        help="K workers on each GPU, each capped at 1/K of its memory: small candidates "
        "leave a GPU idle between their kernels",
    )
    add("--heartbeat", type=int, default=HEARTBEAT_S, help="seconds between heartbeats")
    add("--grace", type=int, default=GRACE_S, help="seconds without one before a retry")
    add("--artifact-dir", help="optuna-dashboard artifacts (default studies/NAME/artifacts)")
    add("--create-only", action="store_true", help="create the study and exit; workers join")
    add("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.horizon is not None and args.horizon < 1:
        ap.error(f"--horizon must be at least 1 epoch, got {args.horizon}")
    for name in ("trials", "workers", "heartbeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.workers_per_gpu is not None:
        if args.workers != 1:
            ap.error("give --workers or --workers-per-gpu, not both")
        if args.workers_per_gpu < 1:
            ap.error(f"--workers-per-gpu must be at least 1, got {args.workers_per_gpu}")
        gpus = torch.cuda.device_count() if args.device != "cpu" else 0
        if not gpus:
            ap.error("--workers-per-gpu needs a GPU and this machine has none; use --workers")
        args.workers = args.workers_per_gpu * gpus
    if args.grace <= args.heartbeat:
        ap.error(f"--grace ({args.grace}) must be longer than --heartbeat ({args.heartbeat})")
    if args.study_name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.dataset.removeprefix("folder:"))
        args.study_name = f"{name}-{human(args.budget)}" + ("-quick" if args.quick else "")
    args.storage = args.storage or default_storage(args.study_name)
    args.artifact_dir = Path(args.artifact_dir or Path("studies") / args.study_name / "artifacts")
    return args


def prepare(args: argparse.Namespace, argv: list[str]) -> tuple[optuna.Study, Search]:
    """The data, the limits, the study (its settings recorded or checked), warm starts."""
    device = resolve_device(args.device)
    profile = (QUICK if args.quick else DEFAULT).override(
        images=args.trial_images,
        train_images=args.train_images,
        val_images=args.val_images,
        max_macs=args.max_macs,
    )
    full = load_dataset(args.dataset, args.data_dir)
    data = search_split(
        full,
        args.seed,
        profile.train_images,
        profile.val_images,
    )
    limits = Limits(
        args.budget,
        profile.max_macs,
        args.max_bytes,
        args.weight_dtype,
        args.max_activation_bytes,
        args.max_latency_ms,
        latency_table(args),
        # A candidate predicted within a factor NEAR of the limit is timed at the gate, on
        # this CPU, when the table is this CPU's: the fastest of repeated calls, which this
        # VM repeats to a few percent while its median moved 2x with other tenants
        # (search/latency.py). With a table of another machine (--latency-table), the
        # prediction alone decides.
        measure_near=args.latency_table is None,
    )
    space.check_room(data.shape, limits)
    study = open_study(
        args.storage,
        args.study_name,
        pruner=make_pruner(args.pruner, profile.rung_images()),
        heartbeat=(args.heartbeat, args.grace),
    )
    # Only a process that trains holds the split on the device: a --workers parent does not.
    if trains(args):
        launch.share_gpu(device)
    here = data.to(device) if trains(args) else data
    search = Search(
        here, limits, profile, args.seed, device, args.artifact_dir, ahead=device.type == "cuda"
    )
    record_or_check(study, search.settings(args.pruner), args.storage)
    if not args.worker:
        study_horizon(study, args.horizon, len(full.train_y))
    if "command" not in study.user_attrs:
        study.set_user_attr("command", command_line(argv))
    return study, search


def latency_table(args: argparse.Namespace) -> latency.Table | None:
    """The latency predictor --max-latency-ms needs: a file built on the target, or this
    CPU's (built once, about a minute, then cached). A worker reads the cache its parent
    filled."""
    if args.max_latency_ms is None:
        return None
    if args.max_latency_ms <= 0 or args.latency_threads < 1:
        raise ValueError("--max-latency-ms and --latency-threads must be positive")
    if args.latency_table:
        try:
            table = latency.Table.from_dict(json.loads(Path(args.latency_table).read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"--latency-table {args.latency_table}: {e}") from None
        if table.threads != args.latency_threads:
            raise ValueError(
                f"--latency-table {args.latency_table} is for {table.threads} thread(s), "
                f"not --latency-threads {args.latency_threads}"
            )
        return table
    return latency.load_table(args.latency_threads, say=lambda m: print(m, flush=True))


def trains(args: argparse.Namespace) -> bool:
    """Whether this process trains candidates itself (not a --workers parent, not
    --create-only): only such a process may touch the GPU."""
    return args.workers == 1 and not args.create_only


def command_line(argv: list[str], python: str = "python") -> str:
    """The command as typed, with any storage password masked (it is stored and shown)."""
    out = [
        f"--storage={safe_url(a[10:])}"
        if a.startswith("--storage=")
        else safe_url(a)
        if "://" in a
        else a
        for a in argv
    ]
    return shlex.join([python, "-m", "search.run", *out])


def announce(args: argparse.Namespace, study: optuna.Study, search: Search) -> None:
    d, c = search.data, counts(study.get_trials(deepcopy=False))
    print(
        f"study {args.study_name!r} in {safe_url(args.storage)} "
        f"({c['trained']} trained so far; target {args.trials})"
    )
    print(
        f"dataset {d.name}: {len(d.train_y):,} train / {len(d.val_y):,} validation images "
        f"of {d.shape[0]}x{d.shape[1]}x{d.shape[1]}, {d.num_classes} classes"
    )
    # A parent of workers names no GPU: the name would create a CUDA context here (0.5 GB,
    # and under the EXCLUSIVE_PROCESS compute mode a GPU that worker 0 cannot get).
    on = device_name(search.device) if trains(args) or search.device.type == "cpu" else "CUDA"
    print(f"{search.limits.describe()}; trials on {on}")
    print(search.profile.describe(len(d.train_y)))
    if "horizon" in study.user_attrs:
        horizon = Horizon.from_dict(study.user_attrs["horizon"])
        print(horizon.describe(search.profile.images), flush=True)
    if search.device.type != "cpu" or args.create_only:
        return
    if not args.no_estimate:
        if args.workers > 1:  # time a trial as one worker will run it
            torch.set_num_threads(launch.cpu_threads(args.workers, launch.cpu_cores()))
        typical, fast, slow = estimate_trial_seconds(search)
        total = args.trials * typical / args.workers
        print(
            f"a full trial takes about {typical:.0f} s on this CPU ({fast:.0f}-{slow:.0f} s); "
            f"{args.trials} trials: at most {duration(total)}, less with pruning",
            flush=True,
        )
    if not args.quick:
        print("warning: no GPU; add --quick for a CPU demo profile", flush=True)


def search_here(
    args: argparse.Namespace, argv: list[str], study: optuna.Study, search: Search, stop: Stop
) -> str:
    """This process's workers: itself, or --workers children it follows."""
    slots = Slots(study, args.trials, args.storage)
    if args.workers == 1:
        progress = Progress(args.trials, enabled=not args.no_progress)
        progress.show(study)
        why = run_worker(
            study,
            search,
            slots,
            stop,
            url=args.storage,
            timeout=args.timeout,
            on_tell=progress.show,
        )
        progress.bar.close()
        return why
    if stop():  # asked while the study was prepared: start no worker
        return "interrupted"
    gpus = torch.cuda.device_count() if search.device.type == "cuda" else 0
    log_dir = Path("studies") / args.study_name
    procs = launch.start(args.workers, argv, args.storage, log_dir, gpus)
    print(
        f"{args.workers} workers on {where(args.workers, gpus)}; logs in {log_dir}/worker-*.log",
        flush=True,
    )
    if not gpus and args.workers > launch.cpu_cores():
        print(
            f"note: more workers than the {launch.cpu_cores()} cores here; they share them, "
            "so a trial takes longer and the search gains nothing",
            flush=True,
        )
    progress = Progress(args.trials, enabled=not args.no_progress)
    codes = launch.follow(procs, stop, lambda: progress.show(study, every_s=2.0))
    progress.bar.close()
    if stop():
        return "interrupted"
    if any(c not in (0, 130, 143, GAVE_UP) for c in codes):
        print(f"error: worker exit codes {codes}; see {log_dir}/worker-*.log", file=sys.stderr)
        return "failed"
    return "gave up" if GAVE_UP in codes else "done"


def where(workers: int, gpus: int) -> str:
    if gpus:
        each = f", {math.ceil(workers / gpus)} on each" if workers > gpus else ""
        return f"{gpus} GPU(s){each}"
    threads = launch.cpu_threads(workers, launch.cpu_cores())
    return f"the CPU, {threads} thread{'s' if threads > 1 else ''} each"


def finish(
    args: argparse.Namespace, argv: list[str], study: optuna.Study, why: str, seconds: float
) -> None:
    """Summary table, best.json, the dashboard command and how to resume."""
    trials = study.get_trials(deepcopy=False)
    print(summary_table(trials, rejections(trials)))
    path = write_best(study, Path("studies") / args.study_name, args.artifact_dir)
    print(
        f"{'interrupted' if why == 'interrupted' else 'finished'} after {seconds:.0f} s; "
        + (f"best architecture: {path}" if path else "no completed trial yet, no best.json")
    )
    print(
        f"dashboard: {tool('optuna-dashboard')} {safe_url(args.storage)} --artifact-dir "
        f"{args.artifact_dir}"
    )
    if path:
        data_dir = ["--data-dir", args.data_dir] if args.data_dir else []
        h = Horizon.from_dict(study.user_attrs["horizon"])
        speed = ranked(trials)[0].user_attrs.get("images_per_s")
        # the choice trains up to SHARE times the search's compute: about that of its time
        # (a trained trial's time: a pruned one records no train_seconds)
        took = SHARE * sum(
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials
            if t.intermediate_values and t.datetime_complete and t.datetime_start
        )
        choose = [tool("python"), "-m", "search.choose", "--study-name", args.study_name,
                  "--storage", safe_url(args.storage), *data_dir]  # fmt: skip
        print(
            f"choose: {shlex.join(choose)}   # the network to ship for the horizon: the best "
            "by their trials trained longer, then against its wider copies and the hand "
            f"designs, within {SHARE:g}x the search's compute"
            + (f", about {duration(took)} here" if took else "")
            + "; it rewrites best.json"
        )
        print(
            f"next: {train_command(path, h.epochs, args.data_dir)}   # final training at "
            "the horizon: test accuracy, mean +- sd"
        )
        print(
            f"      {cost(3, h.epochs, h.train_images, speed)}"
            + (" (the winner's trial speed here)" if speed else "")
        )
    if why == "gave up":
        print(
            "stopped: the last candidates were all over the limits; raise --budget", file=sys.stderr
        )
    if why in ("interrupted", "timeout"):
        # this run's flags, not the first run's; the Python that has the project
        print(f"to resume: {command_line(argv, tool('python'))}")


def main(argv: list[str] | None = None) -> int:
    """The search in a program that goes on after it (a benchmark, a notebook): the
    program's signal handlers come back when it returns."""
    argv = sys.argv[1:] if argv is None else argv
    stop = Stop().install()
    try:
        return search_main(argv, stop)
    finally:
        stop.uninstall()


def search_main(argv: list[str], stop: Stop) -> int:
    """The search, with `stop` handling the signals; its exit code."""
    args = parse_args(argv)
    if args.worker and launch.PARENT_ENV in os.environ:
        stop.watch_parent(int(os.environ[launch.PARENT_ENV]))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study, search = prepare(args, argv)
        if not args.worker:
            announce(args, study, search)
            for skipped in warm_start(study, args.enqueue, search):
                print(f"not enqueued: {skipped}")
    except (StudyError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before any trial started", file=sys.stderr)
        return 130
    if args.create_only:
        print(f"study {args.study_name!r} is ready; start workers with the same flags")
        return 0
    start = time.perf_counter()
    try:
        why = search_here(args, argv, study, search, stop)
        if not args.worker:
            finish(args, argv, study, why, time.perf_counter() - start)
    except KeyboardInterrupt:
        print("interrupted again: stopped at once; run the same command to resume", file=sys.stderr)
        return 130
    if why == "interrupted":
        print(f"stopped by {stop.name}", file=sys.stderr)
        return stop.exit_code
    return {"gave up": GAVE_UP, "failed": 1}.get(why, 0)


if __name__ == "__main__":  # the process ends with the search: its handlers stay to the end
    sys.exit(search_main(sys.argv[1:], Stop().install()))
