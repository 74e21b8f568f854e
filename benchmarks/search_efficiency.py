"""Does the search beat random search for the same wall clock? And which pruner?

python -m benchmarks.search_efficiency [--seconds 240] [--seeds 0 1 2 3 4]
    [--methods random tpe10t+median:1 tpe10t+percentile:1 tpe10t+halving] [--resume]
    [--name search_efficiency] [--summarize-only]

Every method runs the real search loop (search.worker.run_worker: the same
space, budget gate and trial profile) on the quick profile's Fashion-MNIST
split under the 5M budget, for the same wall clock, one run after another on
the same device, once per seed:

- random: RandomSampler, no pruning (the gate still skips over-limit candidates,
  since otherwise its best could be an invalid answer);
- tpe+PRUNER: multivariate TPE with that pruner, modelling after 10 trials
  (Optuna's count: rejected ones count; search.run's default until 2026-11-29);
  tpe+PRUNER:N: the median or percentile rule after N completed trials instead of 1
  (search.study.PRUNER_STARTUP; it was 5 until the 1/8 rung came);
  tpeK+PRUNER[:N]: TPE models after K trials instead of 10;
  tpeKt+PRUNER[:N]: after K trained candidates (search.sampler.TrainedStartup).
  search.run's default is tpe10t+median:1. (Saved names keep their meaning.)

Each run records its best validation accuracy over elapsed time. `time_ratio`
of a method: the median over seeds of the time it needs to reach random
search's median final best, divided by random search's own median time to
reach it, both on the seeds that the method and random search ran; a run
that never reaches it counts as twice the wall clock. The statistic is not 1
for a method as good as random search: the target is random search's own
median, which another 5 runs of the same search reach in 3 of them only half
the time; `python -m benchmarks.rung_ranking --replay none` measures
that null (benchmarks/README.md#rung-ranking).
Results are saved after every run; --resume skips the runs already saved.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

from benchmarks.machine import result_path, save, saved_for_resume
from search.data import load_dataset, search_split
from search.limits import Limits
from search.profile import QUICK
from search.records import counts, outcome
from search.sampler import SAMPLER_STARTUP, make_sampler
from search.signals import Stop
from search.slots import Slots
from search.study import PRUNER_STARTUP, PRUNERS, make_pruner
from search.worker import Search, run_worker

PRUNER_KINDS = tuple(k for k in PRUNERS if k != "none")  # random search is the unpruned run
METHOD = re.compile(rf"random|tpe(\d*)(t?)\+({'|'.join(PRUNER_KINDS)})(?::(\d+))?")
BUDGET = 5_000_000
Curve = list[tuple[float, float]]  # (elapsed seconds, best validation accuracy so far)


def run_one(method: str, seed: int, seconds: float, search: Search) -> dict:
    """One timed search; its curve and what it did."""
    rungs = search.profile.rung_images()
    if method == "random":
        sampler, pruner = optuna.samplers.RandomSampler, make_pruner("none", rungs)
    else:
        tpe_startup, trained_only, kind, pruner_startup = method_parts(method)
        pruner = make_pruner(kind, rungs, pruner_startup)
        sampler = functools.partial(make_sampler, startup=tpe_startup, trained_only=trained_only)
    start, curve, best = time.perf_counter(), [], 0.0
    log: list[list] = []  # every trained trial: where the wall clock went

    def record(_st: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        nonlocal best
        now, how = time.perf_counter() - start, outcome(t)
        if how in ("complete", "pruned"):
            last = max(t.intermediate_values, default=0)  # 0: diverged before the first rung
            acc = t.intermediate_values.get(last)
            size = t.user_attrs.get("macs"), t.params.get("batch_size")
            log.append([round(now, 1), t.number, how, last, acc, *size])
        if how == "complete" and t.value > best:
            best = t.value
            curve.append((now, best))

    study = timed_search(search, sampler, pruner, seconds, record)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if outcome(t) != "interrupted"]
    rejected = [outcome(t) == "rejected" for t in done]
    c = counts(trials)
    print(
        f"  {method:15s} seed {seed}: best {best:.4f}; {c['trained']} trained "
        f"({c['complete']} complete, {c['pruned']} pruned), {c['rejected']} rejected",
        flush=True,
    )
    return {
        "method": method,
        "seed": seed,
        "curve": curve,
        "final_best": best,
        "counts": c,
        "trained_log": log,  # [seconds at its end, number, outcome, images, accuracy, MACs, batch]
        "rejected_fraction_first_20": statistics.mean(rejected[:20]) if rejected else None,
        "rejected_fraction_last_50": statistics.mean(rejected[-50:]) if rejected else None,
    }


def timed_search(
    search: Search,
    sampler: Callable[[int], optuna.samplers.BaseSampler],
    pruner: optuna.pruners.BasePruner,
    seconds: float,
    on_tell: Callable[[optuna.Study, optuna.trial.FrozenTrial], None],
) -> optuna.Study:
    """The search loop of one worker for `seconds` of wall clock (a trial still training
    then is interrupted), with no trial count; its in-memory study."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    stop = Stop()
    timer = threading.Timer(seconds, stop.request)
    timer.start()
    try:
        slots = Slots(study, 10**6, None)
        run_worker(study, search, slots, stop, url=None, on_tell=on_tell, sampler=sampler)
    finally:
        timer.cancel()
    return study


def method_parts(method: str) -> tuple[int, bool, str, int]:
    """tpeK[t]+KIND:N -> (TPE startup K, counted in trained candidates, pruner kind,
    pruner startup N), defaults filled."""
    m = METHOD.fullmatch(method)
    assert m is not None and method != "random", method
    return int(m[1] or SAMPLER_STARTUP), m[2] == "t", m[3], int(m[4] or PRUNER_STARTUP)


def method_name(text: str) -> str:
    if not METHOD.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use random or tpe[K][t]+KIND[:N], KIND one of {', '.join(PRUNER_KINDS)}"
        )
    return text


def time_to(curve: Curve, target: float, never: float) -> float:
    return next((t for t, acc in curve if acc >= target), never)


def summarize(runs: list[dict], seconds: float) -> dict:
    """Final bests per method and time_ratio against random search.

    Each method is scored on the seeds it shares with random search, against
    random search's median final best on those seeds: a --resume that adds
    seeds for some methods only never compares a 5-seed run with a 10-seed target.
    """
    by: dict[str, dict[int, dict]] = {}
    for r in runs:
        if r["seed"] in by.setdefault(r["method"], {}):
            raise ValueError(f"{r['method']} seed {r['seed']} was saved twice")
        by[r["method"]][r["seed"]] = r
    if "random" not in by:
        raise ValueError("no random search run saved: nothing to compare with")
    never = 2 * seconds
    out = {
        "random_seeds": sorted(by["random"]),
        "random_median_final_best": statistics.median(
            r["final_best"] for r in by["random"].values()
        ),
    }
    for method, of_seed in by.items():
        seeds = sorted(set(of_seed) & set(by["random"]))
        if not seeds:
            print(f"{method:15s} no seed in common with random search: not scored")
            continue
        baseline = [by["random"][s] for s in seeds]
        target = statistics.median(r["final_best"] for r in baseline)
        random_time = statistics.median(time_to(r["curve"], target, never) for r in baseline)
        rs = [of_seed[s] for s in seeds]
        times = [time_to(r["curve"], target, never) for r in rs]
        out[method] = {
            "seeds": seeds,
            "target": target,  # random search's median final best on these seeds
            "random_seconds_to_target": random_time,
            "final_best": [r["final_best"] for r in rs],
            "median_final_best": statistics.median(r["final_best"] for r in rs),
            "seconds_to_target": times,
            "time_ratio": statistics.median(times) / random_time,
            "trained": [r["counts"]["trained"] for r in rs],
            "rejected_fraction_first_20": [r["rejected_fraction_first_20"] for r in rs],
            "rejected_fraction_last_50": [r["rejected_fraction_last_50"] for r in rs],
        }
        m = out[method]
        print(
            f"{method:15s} {len(seeds)} seeds: final best "
            f"{', '.join(f'{f:.4f}' for f in m['final_best'])} "
            f"(median {m['median_final_best']:.4f}); reached {target:.4f} at "
            f"{', '.join(f'{t:.0f}' for t in times)} s; time_ratio {m['time_ratio']:.2f}"
        )
    return out


def results(runs: list[dict], seconds: float, profile: dict, budget: int) -> dict:
    """The saved record: every run, and their summaries.

    Every saved run counts, each method against random search on its own seeds
    (a later --resume may add seeds for some methods only); all methods are also
    compared on the seeds that every one of them ran.
    """
    methods = list(dict.fromkeys(r["method"] for r in runs))  # in the order they first ran
    common = sorted(
        set.intersection(*({r["seed"] for r in runs if r["method"] == m} for m in methods))
    )
    print("all saved runs:")
    summary = summarize(runs, seconds)
    print(f"the seeds every method ran ({common}):")
    on_common = summarize([r for r in runs if r["seed"] in common], seconds) if common else {}
    return {
        "seconds_per_run": seconds,
        "seeds": summary["random_seeds"],
        "methods": methods,
        "profile": profile,
        "budget": budget,
        "time_ratio": {m: summary[m]["time_ratio"] for m in methods if m in summary},
        "summary": summary,
        "common_seeds": common,
        "summary_on_common_seeds": on_common,
        "runs": runs,
    }


def summarize_saved(name: str) -> Path:
    """Recompute a saved file's summaries from its runs; its machine, date and profile
    stay (the runs were measured under them)."""
    path = result_path(name, "cpu")
    saved = json.loads(path.read_text())
    budget = saved.get("budget", BUDGET)  # every file so far searched under 5M
    saved |= results(saved["runs"], saved["seconds_per_run"], saved["profile"], budget)
    saved["summarized"] = time.strftime("%Y-%m-%d")
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=240, help="wall clock per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument(
        "--methods", nargs="+", default=["random", "tpe10t+median:1"], type=method_name, metavar="M"
    )
    ap.add_argument("--resume", action="store_true", help="keep the runs already saved")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument(
        "--name", default="search_efficiency", help="results file: benchmarks/results/NAME-cpu.json"
    )
    ap.add_argument(
        "--summarize-only",
        action="store_true",
        help="run nothing: recompute the saved file's summaries (any machine)",
    )
    args = ap.parse_args()
    if args.summarize_only:
        if not result_path(args.name, "cpu").exists():
            ap.error(f"nothing saved: {result_path(args.name, 'cpu')} does not exist")
        try:
            print(f"wrote {summarize_saved(args.name)}")
        except ValueError as e:
            ap.error(str(e))
        return
    if "random" not in args.methods:
        ap.error("random is the baseline: include it in --methods")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    device = torch.device("cpu")
    ds = load_dataset("fashion-mnist", args.data_dir)
    data = search_split(ds, 0, QUICK.train_images, QUICK.val_images)
    try:
        runs = saved_for_resume(args.name).get("runs", []) if args.resume else []
    except ValueError as e:
        ap.error(str(e))
    done = {(r["method"], r["seed"]) for r in runs}
    print(f"{args.seconds:.0f} s per run, seeds {args.seeds}, on {device}", flush=True)
    for seed in args.seeds:
        search = Search(data, Limits(BUDGET, QUICK.max_macs), QUICK, seed, device)
        for method in args.methods:
            if (method, seed) not in done:
                runs.append(run_one(method, seed, args.seconds, search))
                record = {"seconds_per_run": args.seconds, "seeds": args.seeds, "runs": runs}
                save(args.name, record | {"profile": QUICK.to_dict(), "budget": BUDGET}, "cpu")
    record = results(runs, args.seconds, QUICK.to_dict(), BUDGET)
    print(f"wrote {save(args.name, record, 'cpu')}")


if __name__ == "__main__":
    main()
