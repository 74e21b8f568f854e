"""The search against the tools a user would pick instead, on the same objective.

python -m benchmarks.peers [--task quick-5M|quick-50k] [--seconds 300]
    [--seeds 0 1 2 3 4] [--methods default optuna optuna-hyperband smac dehb random]
    [--resume] [--summarize-only]

Every method searches the same space (search/space.py, its parameters taken from
the space itself), trains with the same trial trainer on the quick profile's
Fashion-MNIST split, for the same wall clock per run, one run after another, once
per seed. The tasks: quick-5M (the 5M budget and the quick profile's 20M-MAC cap)
and quick-50k (a 50,000-parameter budget and a 5M-MAC cap, which the defaults
were not tuned on).

- default: `search.run`'s own loop and settings (search.worker.run_worker,
  its first candidate past the gate trained with the start settings, TPE after 10
  trained candidates, the median rule after 1). `--start-candidates` and
  `--pruner-startup` vary it, to tune on other seeds than those reported.
- optuna: the same loop with Optuna as a person sets it up by hand:
  `TPESampler(seed=seed)` and `MedianPruner()`, their defaults.
- optuna-hyperband: `TPESampler(seed=seed)` and `HyperbandPruner(min_resource=3000,
  max_resource=24000)` (the rungs' first and last images; reduction factor 3, its
  default), the pair Optuna's documentation recommends for TPE.
- smac: SMAC3's `MultiFidelityFacade` (random forest, Hyperband intensifier,
  eta 3 as its documentation's examples), through ask and tell.
- dehb: DEHB (eta 3, its default), through ask and tell.
- random: RandomSampler, no pruning (the reference of search_efficiency).

The gate applies to all. In the Optuna loops it is the search's own (the
candidate's constraints set, told PRUNED, no training). SMAC and DEHB take no
constraint: a candidate over the limits is told the worst value (accuracy 0) at
no training cost, as a user would code it. Their configuration space is flat
(every stage's parameters for the deepest network, both optimizers' learning
rates; the ones a candidate does not use are ignored), a ConfigSpace made from
the space's Optuna distributions.

Fidelity is images seen. An Optuna trial reports at the quick profile's rungs
(3,000, 6,000, 12,000 and 24,000 of a 24,000-image schedule) and may be pruned
there. A SMAC or DEHB evaluation at budget b trains the same 24,000-image
schedule for its first b images and measures validation accuracy there, as a
trial pruned at b would have; a promoted configuration trains again from scratch
(neither resumes a run). With eta 3 both ask for 8,000 and 24,000 images.

A run's curve is its best validation accuracy of a full-length (24,000-image)
training over wall clock. Per task: each method's median final best; its
median time to each other method's median final best (a run that never reaches
it counts as twice the wall clock); the best peer (of optuna, optuna-hyperband,
smac, dehb: the highest median final best); `time_ratio_vs_best_peer` (the
default's median time to the best peer's median final best over the best peer's
own); and a Wilcoxon signed-rank test over seeds on final best. Results are saved
after every run, per task, each with its machine; --resume skips the (method, seed)
runs already saved.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from benchmarks.machine import machine, save, saved_for_resume
from benchmarks.search_efficiency import time_to, timed_search
from models.spec import max_stages
from search import space
from search.data import SearchData, load_dataset, search_split
from search.limits import Limits
from search.profile import QUICK
from search.records import counts
from search.sampler import START_CANDIDATES, make_sampler
from search.signals import Stop
from search.study import PRUNER_STARTUP, derived_seed, make_pruner
from search.trainer import OutOfMemory, Stopped, TrainingDiverged, train
from search.worker import Search

TASKS = {
    "quick-5M": Limits(5_000_000, QUICK.max_macs),
    "quick-50k": Limits(50_000, 5_000_000),
}
PEERS = ("optuna", "optuna-hyperband", "smac", "dehb")
METHODS = ("default", *PEERS, "random")
ETA = 3  # SMAC's and DEHB's documented default
Curve = list[tuple[float, float]]  # (elapsed seconds, best full-length accuracy so far)


# --- the space, as a ConfigSpace for the peers outside Optuna ------------------------------


def distributions(data: SearchData) -> dict[str, BaseDistribution]:
    """Every parameter the space can suggest: the deepest network's stages and both
    optimizers' settings, read off the space itself."""
    out: dict[str, BaseDistribution] = {}
    deepest = max_stages(data.shape[1])
    for optimizer in ("sgd", "adamw"):
        study = optuna.create_study()
        study.enqueue_trial({"stages": deepest, "optimizer": optimizer})
        trial = study.ask()
        space.suggest_arch(trial, data.shape, Limits(10**12))
        space.suggest_training(trial, QUICK, len(data.train_y), 0)
        out |= trial.distributions
    return out


def config_space(dists: dict[str, BaseDistribution], seed: int) -> Any:
    """A flat ConfigSpace: categorical choices by their text, floats on a step as floats
    (rounded back to the step)."""
    from ConfigSpace import Categorical, ConfigurationSpace, Float, Integer

    cs = ConfigurationSpace(seed=seed)
    for name, d in sorted(dists.items()):
        if isinstance(d, CategoricalDistribution):
            cs.add(Categorical(name, [str(c) for c in d.choices]))
        elif isinstance(d, IntDistribution):
            cs.add(Integer(name, (d.low, d.high), log=d.log))
        elif isinstance(d, FloatDistribution):
            cs.add(Float(name, (d.low, d.high), log=d.log))
        else:
            raise TypeError(f"{name}: {type(d).__name__} has no ConfigSpace counterpart")
    return cs


def params_of(config: dict[str, Any], dists: dict[str, BaseDistribution]) -> dict[str, Any]:
    """A ConfigSpace configuration as the space's parameters (Optuna's values)."""
    out: dict[str, Any] = {}
    for name, d in dists.items():
        v = config[name]
        if isinstance(d, CategoricalDistribution):
            out[name] = next(c for c in d.choices if str(c) == str(v))
        elif isinstance(d, IntDistribution):
            out[name] = round(float(v))
        else:
            v = min(max(float(v), d.low), d.high)
            if d.step is not None:
                v = min(d.low + round((v - d.low) / d.step) * d.step, d.high)  # as Optuna rounds
            out[name] = v
    return out


# --- one evaluation at a fidelity, for SMAC and DEHB ---------------------------------------


class _Reached(Exception):
    pass


@dataclass
class Objective:
    """Train a configuration for `images` of the quick profile's schedule; its validation
    accuracy there, or 0 when the gate rejects it (no training) or it diverged."""

    data: SearchData
    limits: Limits
    dists: dict[str, BaseDistribution]
    seed: int
    stop: Stop
    evaluations: int = 0
    rejected: int = 0

    def __call__(self, config: dict[str, Any], images: int) -> float:
        params = params_of(config, self.dists)
        fixed = optuna.trial.FixedTrial(params)
        spec = space.suggest_arch(fixed, self.data.shape, self.limits)
        if not self.limits.fits(spec):
            self.rejected += 1
            return 0.0
        self.evaluations += 1
        cfg = space.suggest_training(fixed, QUICK, len(self.data.train_y), 0)
        cfg = replace(cfg, seed=derived_seed(self.seed, "peer", self.evaluations))
        acc = 0.0

        def at(s: Any) -> None:
            nonlocal acc
            acc = s.val_acc
            raise _Reached

        try:
            train(spec, cfg, self.data.train_val, device="cpu", rungs=(images / cfg.images,),
                  on_eval=at, stop=self.stop.event)  # fmt: skip
        except _Reached:
            pass
        except (TrainingDiverged, OutOfMemory):
            return 0.0
        return acc


def run_peer(method: str, seed: int, seconds: float, data: SearchData, limits: Limits) -> dict:
    """SMAC or DEHB through ask and tell, for `seconds`."""
    rungs = QUICK.rung_images()
    dists = distributions(data)
    cs = config_space(dists, seed)
    stop = Stop()
    objective = Objective(data, limits, dists, seed, stop)
    curve: Curve = []
    best, full, low = 0.0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        ask, tell = peer(method, cs, seed, rungs[0], rungs[-1], Path(tmp))
        timer = threading.Timer(seconds, stop.request)
        start = time.perf_counter()
        timer.start()
        try:
            while not stop():
                job, config, images = ask()
                t0, rejected = time.perf_counter(), objective.rejected
                try:
                    acc = objective(config, images)
                except Stopped:
                    break
                tell(job, acc, time.perf_counter() - t0)
                if objective.rejected > rejected:
                    continue
                if images >= rungs[-1]:
                    full += 1
                    if acc > best:
                        best = acc
                        curve.append((time.perf_counter() - start, best))
                else:
                    low += 1
        finally:
            timer.cancel()
    print(f"  {method:16s} seed {seed}: best {best:.4f}; {full} full-length, {low} shorter, "
          f"{objective.rejected} rejected", flush=True)  # fmt: skip
    return {
        "method": method,
        "seed": seed,
        "curve": curve,
        "final_best": best,
        "counts": {"full_length": full, "shorter": low, "rejected": objective.rejected},
    }


Ask = Callable[[], tuple[Any, dict[str, Any], int]]
Tell = Callable[[Any, float, float], None]


def peer(method: str, cs: Any, seed: int, low: int, high: int, tmp: Path) -> tuple[Ask, Tell]:
    """The peer's ask (a job, its configuration, the images to train) and tell (the job,
    its accuracy, its seconds), each as its documentation shows them."""
    if method == "smac":
        from smac import MultiFidelityFacade, Scenario
        from smac.runhistory.dataclasses import TrialValue

        scenario = Scenario(cs, deterministic=True, n_trials=10**6, min_budget=low,
                            max_budget=high, seed=seed, output_directory=tmp / "smac")  # fmt: skip

        def never_called(config: Any, seed: int = 0, budget: float = 0.0) -> float:
            raise AssertionError("ask and tell: the target function is not called")

        smac = MultiFidelityFacade(
            scenario, never_called, intensifier=MultiFidelityFacade.get_intensifier(
                scenario, eta=ETA), overwrite=True, logging_level=40,
        )  # fmt: skip

        def smac_ask() -> tuple[Any, dict[str, Any], int]:
            info = smac.ask()
            return info, dict(info.config), round(info.budget)

        def smac_tell(info: Any, acc: float, secs: float) -> None:
            smac.tell(info, TrialValue(cost=1.0 - acc, time=secs))

        return smac_ask, smac_tell
    if method == "dehb":
        from dehb import DEHB

        dehb = DEHB(cs=cs, dimensions=len(list(cs.values())), min_fidelity=low,
                    max_fidelity=high, eta=ETA, n_workers=1, seed=seed,
                    output_path=str(tmp / "dehb"), log_level="ERROR")  # fmt: skip

        def dehb_ask() -> tuple[Any, dict[str, Any], int]:
            job = dehb.ask()
            return job, dict(job["config"]), round(job["fidelity"])

        def dehb_tell(job: Any, acc: float, secs: float) -> None:
            dehb.tell(job, {"fitness": 1.0 - acc, "cost": secs})

        return dehb_ask, dehb_tell
    raise ValueError(f"not a peer outside Optuna: {method}")


# --- the Optuna methods: the search's own loop ----------------------------------------------


def run_optuna(
    method: str,
    seed: int,
    seconds: float,
    data: SearchData,
    limits: Limits,
    start_candidates: int = START_CANDIDATES,
    pruner_startup: int = PRUNER_STARTUP,
) -> dict:
    rungs = QUICK.rung_images()
    sampler: Callable[[int], optuna.samplers.BaseSampler]
    if method == "default":
        sampler = functools.partial(make_sampler, start_candidates=start_candidates)
        pruner = make_pruner("median", rungs, pruner_startup)
    elif method == "optuna":
        sampler, pruner = _tpe, optuna.pruners.MedianPruner()
    elif method == "optuna-hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=rungs[0], max_resource=rungs[-1])
        sampler = _tpe
    elif method == "random":
        sampler, pruner = _random, make_pruner("none", rungs)
    else:
        raise ValueError(f"not an Optuna method: {method}")
    search = Search(data, limits, QUICK, seed, torch.device("cpu"))
    curve: Curve = []
    best = 0.0
    start = time.perf_counter()

    def record(_st: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        nonlocal best
        if t.state == optuna.trial.TrialState.COMPLETE and t.value > best:
            best = t.value
            curve.append((time.perf_counter() - start, best))

    study = timed_search(search, sampler, pruner, seconds, record)
    c = counts(study.get_trials(deepcopy=False))
    print(f"  {method:16s} seed {seed}: best {best:.4f}; {c['trained']} trained "
          f"({c['complete']} complete, {c['pruned']} pruned), {c['rejected']} rejected",
          flush=True)  # fmt: skip
    out = {"method": method, "seed": seed, "curve": curve, "final_best": best, "counts": c}
    ours = {"start_candidates": start_candidates, "pruner_startup": pruner_startup}
    return out | (ours if method == "default" else {})


def _tpe(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed)


def _random(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


# --- the summary --------------------------------------------------------------------------


def wilcoxon(a: list[float], b: list[float]) -> dict[str, Any]:
    """Wilcoxon signed-rank on paired final bests (scipy's, two-sided, exact when small)."""
    from scipy.stats import wilcoxon as test

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if not any(diffs):
        return {"statistic": None, "p_value": 1.0, "n": len(diffs), "wins": 0, "losses": 0}
    r = test(a, b)
    return {
        "statistic": float(r.statistic),
        "p_value": round(float(r.pvalue), 4),
        "n": len(diffs),
        "wins": sum(d > 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
    }


def summarize(runs: list[dict], seconds: float) -> dict:
    """Per method its median final best and median times to every method's median final
    best; the default against the best peer, on the seeds both ran."""
    by: dict[str, dict[int, dict]] = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = r
    never = 2 * seconds
    medians = {m: statistics.median(r["final_best"] for r in s.values()) for m, s in by.items()}
    out: dict[str, Any] = {"methods": {}}
    for m, of_seed in by.items():
        out["methods"][m] = {
            "seeds": sorted(of_seed),
            "final_best": [of_seed[s]["final_best"] for s in sorted(of_seed)],
            "median_final_best": medians[m],
            "median_seconds_to": {
                other: statistics.median(
                    time_to(r["curve"], target, never) for r in of_seed.values()
                )
                for other, target in medians.items()
            },
        }
    peers = [p for p in PEERS if p in by]
    if "default" not in by or not peers:
        return out
    best_peer = max(peers, key=lambda p: medians[p])
    seeds = sorted(set(by["default"]) & set(by[best_peer]))
    target = medians[best_peer]
    ours = statistics.median(time_to(by["default"][s]["curve"], target, never) for s in seeds)
    theirs = statistics.median(time_to(by[best_peer][s]["curve"], target, never) for s in seeds)
    out |= {
        "best_peer": best_peer,
        "seeds": seeds,
        "default_median_final_best": medians["default"],
        "best_peer_median_final_best": target,
        "time_ratio_vs_best_peer": round(ours / theirs, 4),
        "wilcoxon_default_vs_best_peer": wilcoxon(
            [by["default"][s]["final_best"] for s in seeds],
            [by[best_peer][s]["final_best"] for s in seeds],
        ),
    }
    return out


def report(summary: dict) -> None:
    for m, s in summary["methods"].items():
        print(f"{m:16s} seeds {s['seeds']}: final best "
              f"{', '.join(f'{f:.4f}' for f in s['final_best'])} (median "
              f"{s['median_final_best']:.4f})")  # fmt: skip
    if "best_peer" in summary:
        w = summary["wilcoxon_default_vs_best_peer"]
        print(f"best peer {summary['best_peer']} ({summary['best_peer_median_final_best']:.4f}); "
              f"default {summary['default_median_final_best']:.4f}; time_ratio_vs_best_peer "
              f"{summary['time_ratio_vs_best_peer']:.2f}; Wilcoxon p {w['p_value']} "
              f"({w['wins']} seeds better, {w['losses']} worse)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=list(TASKS), default="quick-5M")
    ap.add_argument("--seconds", type=float, default=300, help="wall clock per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--resume", action="store_true", help="keep the runs already saved")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument(
        "--name", default="peers", help="results file: benchmarks/results/NAME-cpu.json"
    )
    ap.add_argument("--summarize-only", action="store_true", help="run nothing: summarize")
    ap.add_argument(
        "--start-candidates",
        type=int,
        default=START_CANDIDATES,
        help="default method: its first candidates that train with the start settings",
    )
    ap.add_argument(
        "--pruner-startup",
        type=int,
        default=PRUNER_STARTUP,
        help="default method: trials that run to the end before the median rule prunes",
    )
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        saved = saved_for_resume(args.name) if args.resume or args.summarize_only else {}
    except ValueError as e:
        ap.error(str(e))
    tasks: dict[str, Any] = saved.get("tasks", {})
    task = tasks.setdefault(args.task, {"seconds_per_run": args.seconds, "runs": []})
    if task["seconds_per_run"] != args.seconds:
        ap.error(f"{args.task} was run at {task['seconds_per_run']} s a run, not {args.seconds}")
    ours = {(r.get("start_candidates", 0), r.get("pruner_startup", 1))
            for r in task["runs"] if r["method"] == "default"}  # fmt: skip
    if not args.summarize_only and ours - {(args.start_candidates, args.pruner_startup)}:
        ap.error(f"{args.task}'s saved default runs used (--start-candidates, --pruner-startup) "
                 f"{sorted(ours)}, not {(args.start_candidates, args.pruner_startup)}: use "
                 "another --name")  # fmt: skip
    if not args.summarize_only:
        limits = TASKS[args.task]
        ds = load_dataset("fashion-mnist", args.data_dir)
        done = {(r["method"], r["seed"]) for r in task["runs"]}
        here = machine("cpu")  # each run names its machine: a resume may mix comparable VMs
        for t in tasks.values():
            for r in t["runs"]:
                r.setdefault("machine", saved.get("machine"))
        print(f"{args.task}: {limits.describe()}; {args.seconds:.0f} s a run", flush=True)
        data = search_split(ds, 0, QUICK.train_images, QUICK.val_images)  # the task's split
        for seed in args.seeds:
            for method in args.methods:
                if (method, seed) in done:
                    continue
                if method in ("smac", "dehb"):
                    r = run_peer(method, seed, args.seconds, data, limits)
                else:
                    r = run_optuna(method, seed, args.seconds, data, limits,
                                   args.start_candidates, args.pruner_startup)  # fmt: skip
                task["runs"].append(r | {"machine": here})
                task["summary"] = summarize(task["runs"], args.seconds)
                save(args.name, {"tasks": tasks, "profile": QUICK.to_dict()}, "cpu", here)
    for name, t in tasks.items():
        t["summary"] = summarize(t["runs"], t["seconds_per_run"])
        print(f"{name}:")
        report(t["summary"])
    seeds = sorted({r["seed"] for t in tasks.values() for r in t["runs"]})
    record = {"tasks": tasks, "seeds": seeds, "profile": QUICK.to_dict()}
    print(f"wrote {save(args.name, record, 'cpu')}")


if __name__ == "__main__":
    main()
