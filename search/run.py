"""python -m search.run: search ResNets under a parameter budget.

Running the same command again resumes the same study; Ctrl-C stops after
marking the running trial, writes best.json and says how to go on.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from models import count_macs, count_params
from models.presets import PRESETS, preset
from search import space
from search.cli import Parser
from search.data import DataError, default_data_dir, load_dataset
from search.export import export_trial, write_json
from search.objective import Limits, Objective, SearchData, StudyFull, search_split
from search.study import (
    GRACE_S,
    HEARTBEAT_S,
    StudyError,
    best_trial,
    claim_slot,
    counts,
    default_storage,
    is_rejected,
    open_study,
    ranked,
    safe_url,
    wait_for_slot,
)
from search.train import OutOfMemory, TrainConfig, resolve_device, train

# A CPU demo: a stratified subset, short trials, and a compute cap so that a
# trial takes seconds on two cores. Printed at start.
QUICK = {"train_images": 4000, "val_images": 1000, "epochs": 3, "max_macs": 40_000_000}
MAX_CONSECUTIVE_REJECTIONS = 500


class QuietStudyFull(logging.Filter):
    """Optuna logs a caught exception with its traceback; for StudyFull (a worker
    that lost the race for the last slot) that is noise, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "StudyFull" not in message and "failed with value None" not in message


class UsageError(Exception):
    """Bad input on the command line: one line on stderr, exit code 2."""


def parse_count(text: str) -> int:
    """`5000000`, `5e6`, `5M`, `4.5m`, `500k`, `1G` -> an integer count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:[eE]\d+)?|\.\d+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (try 5M, 5e6 or 500k)")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return round(value)


def human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return str(n)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = Parser(prog="python -m search.run", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--trials",
        type=int,
        default=100,
        help="trained candidates to reach in the study (rejected ones don't count)",
    )
    ap.add_argument(
        "--budget",
        type=parse_count,
        default=5_000_000,
        help="parameter budget: 5M, 5e6, 500k (default 5M)",
    )
    ap.add_argument(
        "--max-macs",
        type=parse_count,
        default=None,
        help="also reject candidates over this many MACs per image",
    )
    ap.add_argument(
        "--dataset",
        default="cifar10",
        help="cifar10, fashion-mnist, folder:PATH or synthetic (default cifar10)",
    )
    ap.add_argument(
        "--data-dir", default=None, help="where datasets live (default $NAS_DATA_DIR or ./data)"
    )
    ap.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 15)")
    ap.add_argument(
        "--study-name",
        default=None,
        help="default: <dataset>-<budget>[-quick]; the same name resumes",
    )
    ap.add_argument(
        "--storage",
        default=os.environ.get("NAS_STORAGE"),
        help="SQLAlchemy URL (default $NAS_STORAGE, else sqlite:///studies/NAME.db)",
    )
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    ap.add_argument(
        "--enqueue",
        action="append",
        default=[],
        metavar="PRESET",
        help=f"warm start from a preset (repeatable): {', '.join(PRESETS)}",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CPU demo: {train_images} train / {val_images} validation images, "
        "{epochs} epochs, at most 40M MACs".format(**QUICK),
    )
    ap.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="train on a stratified subset of this many images",
    )
    ap.add_argument(
        "--val-images",
        type=int,
        default=None,
        help="validate on a stratified subset of this many images",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on this machine, one GPU each when there are GPUs",
    )
    ap.add_argument(
        "--heartbeat",
        type=int,
        default=HEARTBEAT_S,
        help=f"seconds between a running trial's heartbeats (default {HEARTBEAT_S})",
    )
    ap.add_argument(
        "--grace",
        type=int,
        default=GRACE_S,
        help="seconds without a heartbeat before a trial counts as dead and is "
        f"retried (default {GRACE_S})",
    )
    ap.add_argument(
        "--artifact-dir",
        default=None,
        help="optuna-dashboard artifacts (default studies/NAME/artifacts)",
    )
    ap.add_argument(
        "--create-only",
        action="store_true",
        help="create the study (settings, warm starts) and exit; workers join it",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.epochs = args.epochs or 15
    for name in ("trials", "epochs", "train_images", "val_images", "workers", "heartbeat"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    bad = [p for p in args.enqueue if p not in PRESETS]
    if bad:
        ap.error(f"unknown preset {', '.join(bad)}; known: {', '.join(PRESETS)}")
    if args.study_name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.dataset.removeprefix("folder:"))
        args.study_name = f"{name}-{human(args.budget)}" + ("-quick" if args.quick else "")
    args.storage = args.storage or default_storage(args.study_name)
    if args.grace <= args.heartbeat:
        ap.error(f"--grace ({args.grace}) must be longer than --heartbeat ({args.heartbeat})")
    return args


@dataclass
class Setup:
    study: optuna.Study
    objective: Objective
    data: SearchData


def fingerprint(args: argparse.Namespace, data: SearchData) -> dict[str, Any]:
    """What makes trials of one study comparable; a resumed study must match it."""
    return {
        "space_version": space.SPACE_VERSION,
        "dataset": data.name,
        "budget": args.budget,
        "max_macs": args.max_macs,
        "epochs": args.epochs,
        "train_images": len(data.train_y),
        "val_images": len(data.val_y),
    }


def command_line(argv: list[str]) -> str:
    """The command as typed, with any storage password masked (it is stored and shown)."""
    out, mask_next = [], False
    for a in argv:
        if mask_next:
            a, mask_next = safe_url(a), False
        elif a == "--storage":
            mask_next = True
        elif a.startswith("--storage="):
            a = "--storage=" + safe_url(a.removeprefix("--storage="))
        out.append(a)
    return shlex.join(["python", "-m", "search.run", *out])


def check_or_record(study: optuna.Study, fp: dict[str, Any], argv: list[str]) -> None:
    attrs = study.user_attrs
    if "space_version" not in attrs:
        for key, value in fp.items():
            study.set_user_attr(key, value)
        study.set_user_attr("command", command_line(argv))
        return
    diff = [f"{k} {attrs.get(k)!r} (this run: {v!r})" for k, v in fp.items() if attrs.get(k) != v]
    if diff:
        raise UsageError(
            f"study {study.study_name!r} was made with different settings: "
            f"{'; '.join(diff)}. Use another --study-name, or the same settings"
        )


def setup(args: argparse.Namespace, argv: list[str]) -> Setup:
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    ds = load_dataset(args.dataset, args.data_dir or default_data_dir())
    data = search_split(ds, args.seed, args.train_images, args.val_images)
    floor = space.smallest(*data.shape)
    floor_params, floor_macs = count_params(floor), count_macs(floor)
    if floor_params > args.budget or (args.max_macs and floor_macs > args.max_macs):
        raise UsageError(
            f"nothing in the search space fits: the smallest candidate has {floor_params:,} "
            f"params and {floor_macs:,} MACs; raise --budget (or --max-macs)"
        )
    study = open_study(
        args.storage,
        args.study_name,
        seed=args.seed,
        epochs=args.epochs,
        heartbeat=(args.heartbeat, args.grace),
    )
    if not args.worker:
        check_or_record(study, fingerprint(args, data), argv)
    for name in [] if args.worker else args.enqueue:
        spec = preset(name, *data.shape)
        study.enqueue_trial(
            space.preset_params(spec), skip_if_exists=True, user_attrs={"preset": name}
        )
    objective = Objective(
        data,
        Limits(args.budget, args.max_macs),
        args.epochs,
        args.seed,
        device,
        claim=lambda t: claim_slot(study, t, args.trials, args.storage),
        artifacts=artifact_dir(args),
    )
    return Setup(study, objective, data)


def artifact_dir(args: argparse.Namespace) -> Path:
    return Path(args.artifact_dir or Path("studies") / args.study_name / "artifacts")


def estimate_cpu_trial(data: SearchData, epochs: int) -> float:
    """Seconds for one trial of a mid-sized candidate, from two timed training steps."""
    spec = preset("resnet18-w32", *data.shape)
    n = min(128, len(data.train_y))
    start = time.perf_counter()
    train(
        spec,
        TrainConfig(epochs=1, batch_size=64),
        data.train_x[:n],
        data.train_y[:n],
        mean=data.mean,
        std=data.std,
        device="cpu",
    )
    per_image = (time.perf_counter() - start) / n
    return per_image * (len(data.train_y) + len(data.val_y) / 3) * epochs


class Progress:
    """A bar of trained candidates with the counts and the best so far."""

    def __init__(self, target: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.target = target
        self.bar = tqdm(
            total=target, unit="trial", disable=not enabled, dynamic_ncols=True, file=sys.stderr
        )

    def show(self, study: optuna.Study) -> dict[str, int]:
        trials = study.get_trials(deepcopy=False)
        c = counts(trials)
        best = next(iter(ranked(trials)), None)
        self.bar.n = min(c["trained"], self.target)
        self.bar.set_postfix_str(
            f"complete {c['complete']} pruned {c['pruned']} rejected {c['rejected']} "
            f"failed {c['failed']}" + (f" best {best.value:.4f}" if best else ""),
            refresh=True,
        )
        return c

    def close(self) -> None:
        self.bar.close()


class AfterTrial:
    """The callback after every trial: show progress, then wait for a free slot or stop."""

    def __init__(self, progress: Progress, target: int) -> None:
        self.progress, self.target = progress, target
        self.consecutive_rejections = 0
        self.gave_up = False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.progress.show(study)
        self.consecutive_rejections = self.consecutive_rejections + 1 if is_rejected(trial) else 0
        if self.consecutive_rejections >= MAX_CONSECUTIVE_REJECTIONS:
            self.gave_up = True
            study.stop()
        elif not wait_for_slot(study, self.target):
            study.stop()


def summary(study: optuna.Study, top: int = 5) -> str:
    trials = study.get_trials(deepcopy=False)
    done = ranked(trials)[:top]
    c = counts(trials)
    over_budget = sum(1 for t in trials if "params " in t.user_attrs.get("rejected", ""))
    lines = [
        f"trials: {c['trained']} trained ({c['complete']} complete, {c['pruned']} pruned), "
        f"{c['rejected']} rejected before any weight existed ({over_budget} over the parameter "
        f"budget, {c['rejected'] - over_budget} only over --max-macs), {c['failed']} failed"
    ]
    if done:
        lines.append(
            f"{'trial':>6} {'val acc':>8} {'params':>11} {'MACs':>13} "
            f"{'stages':>7} {'blocks':>10} {'widths':>20}  optimizer"
        )
        for t in done:
            p = t.params
            n = p["stages"]
            blocks = "-".join(str(p[f"blocks_{i}"]) for i in range(1, n + 1))
            widths = "-".join(str(w) for w in space.stage_widths(p["width"], p["growth"], n))
            lines.append(
                f"{t.number:>6} {t.value:>8.4f} {t.user_attrs['params']:>11,} "
                f"{t.user_attrs['macs']:>13,} {n:>7} {blocks:>10} {widths:>20}  "
                f"{p['optimizer']} lr {p['lr_' + p['optimizer']]:.3g}"
            )
    return "\n".join(lines)


def write_best(study: optuna.Study, out_dir: Path, artifacts: Path) -> Path | None:
    """studies/<study>/best.json, also attached to the study for the dashboard."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    best = best_trial(study)
    if best is None:
        return None
    path = out_dir / "best.json"
    write_json(path, export_trial(study, best))
    artifacts.mkdir(parents=True, exist_ok=True)
    upload_artifact(
        artifact_store=FileSystemArtifactStore(str(artifacts)),
        file_path=str(path),
        study_or_trial=study,
        mimetype="application/json",
    )
    return path


def announce(args: argparse.Namespace, s: Setup) -> None:
    d = s.data
    c = counts(s.study.get_trials(deepcopy=False))
    print(
        f"study {args.study_name!r} in {safe_url(args.storage)} "
        f"({c['trained']} trained so far; target {args.trials})"
    )
    print(
        f"dataset {d.name}: {len(d.train_y):,} train / {len(d.val_y):,} validation images "
        f"of {d.shape[0]}x{d.shape[1]}x{d.shape[1]}, {d.num_classes} classes"
    )
    limits = f"budget {args.budget:,} params" + (
        f", at most {args.max_macs:,} MACs/image" if args.max_macs else ""
    )
    print(f"{limits}; {args.epochs} epochs per trial on {s.objective.device_name}")
    if args.quick:
        print(
            "quick profile: {train_images:,} train / {val_images:,} validation images, "
            "{epochs} epochs per trial, at most {max_macs:,} MACs per image".format(**QUICK)
        )
    if s.objective.device.type == "cpu" and not args.quick:
        est = estimate_cpu_trial(d, args.epochs)
        cost = f"{est / 60:.0f} min" if est >= 90 else f"{est:.0f} s"
        total = (
            f"{args.trials * est / 3600:.1f} h"
            if args.trials * est >= 5400
            else f"{args.trials * est / 60:.0f} min"
        )
        print(
            f"warning: no GPU; a mid-sized trial will take roughly {cost} on this CPU "
            f"({args.trials} trials: about {total}). Add --quick for a CPU demo profile.",
            flush=True,
        )


def optimize(args: argparse.Namespace, s: Setup) -> tuple[bool, bool]:
    """Run trials until the study's count is reached: (interrupted, gave up)."""
    progress = Progress(args.trials, enabled=not args.no_progress)
    after = AfterTrial(progress, args.trials)
    try:
        progress.show(s.study)
        if wait_for_slot(s.study, args.trials):
            s.study.optimize(
                s.objective,
                timeout=args.timeout,
                callbacks=[after],
                catch=(OutOfMemory, StudyFull),
                gc_after_trial=False,
            )
    except KeyboardInterrupt:
        return True, after.gave_up
    finally:
        progress.close()
    return False, after.gave_up


def supervise(args: argparse.Namespace, argv: list[str], s: Setup) -> bool:
    """Start --workers processes on this study and follow them; True if interrupted.

    Each worker is this command with --worker; with GPUs, worker i sees only
    GPU i % count (CUDA_VISIBLE_DEVICES). Logs go to studies/<study>/worker-<i>.log.
    """
    log_dir = Path("studies") / args.study_name
    log_dir.mkdir(parents=True, exist_ok=True)
    child_argv = strip_flag(argv, "--workers")
    child_argv += [
        "--worker",
        "--no-progress",
        "--storage",
        args.storage,
        "--study-name",
        args.study_name,
    ]
    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") else 0
    procs = []
    for i in range(args.workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        log = (log_dir / f"worker-{i}.log").open("a")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "search.run", *child_argv],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    where = f"GPUs 0-{gpus - 1}" if gpus else "the CPU"
    print(f"{args.workers} workers on {where}; logs in {log_dir}/worker-*.log", flush=True)
    progress = Progress(args.trials, enabled=not args.no_progress)
    interrupted = False
    try:
        while any(p.poll() is None for p in procs):
            progress.show(s.study)
            time.sleep(1.0)
    except KeyboardInterrupt:
        interrupted = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
    finally:
        progress.show(s.study)
        progress.close()
    bad = [i for i, p in enumerate(procs) if p.returncode not in (0, 130, -signal.SIGINT)]
    if bad:
        print(f"warning: worker(s) {bad} exited with an error; see their logs", file=sys.stderr)
    return interrupted


def strip_flag(argv: list[str], flag: str) -> list[str]:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:  # filters on handlers see child loggers
        handler.addFilter(QuietStudyFull())
    try:
        s = setup(args, argv)
        if not args.worker:
            announce(args, s)
    except (UsageError, DataError, StudyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before any trial started", file=sys.stderr)
        return 130
    if args.worker:
        interrupted, gave_up = optimize(args, s)
        return 130 if interrupted else 1 if gave_up else 0
    if args.create_only:
        print(f"study {args.study_name!r} is ready; start workers with the same --study-name")
        return 0
    start = time.perf_counter()
    if args.workers > 1:
        interrupted, gave_up = supervise(args, argv, s), False
    else:
        interrupted, gave_up = optimize(args, s)
    try:
        return finish(args, s, time.perf_counter() - start, interrupted, gave_up)
    except KeyboardInterrupt:
        print(
            "interrupted again while writing the summary; run the same command to finish",
            file=sys.stderr,
        )
        return 130


def finish(
    args: argparse.Namespace, s: Setup, elapsed: float, interrupted: bool, gave_up: bool
) -> int:
    """Summary table, best.json, the dashboard command and how to resume."""
    print(summary(s.study))
    path = write_best(s.study, Path("studies") / args.study_name, artifact_dir(args))
    print(
        f"{'interrupted' if interrupted else 'finished'} after {elapsed:.0f}s; "
        + (f"best architecture: {path}" if path else "no completed trial yet, no best.json")
    )
    print(
        f"dashboard: optuna-dashboard {safe_url(args.storage)} --artifact-dir {artifact_dir(args)}"
    )
    if gave_up:
        print(
            f"stopped: the last {MAX_CONSECUTIVE_REJECTIONS} candidates were all over the "
            "limits; raise --budget (or --max-macs)",
            file=sys.stderr,
        )
        return 1
    if interrupted:
        print(f"to resume: {s.study.user_attrs.get('command', 'the same command')}")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
