"""Does TPE + budget gate + median pruning beat random search, for the same wall clock?

python -m benchmarks.search_efficiency [--seconds 300] [--seeds 0 1 2]

Both methods search the same space on the same Fashion-MNIST subset (the
--quick profile: 2,000 train / 1,000 validation images, 3 epochs, at most 40M
MACs) under the same 5M budget, one after the other on the same device:

- budget-nas: TPE (multivariate, constant liar) + MedianPruner, as search.run.
- random: RandomSampler, no pruning. It skips over-budget candidates with the
  same analytic gate, since otherwise its best could be an invalid answer.

For every run, the best validation accuracy over elapsed time is recorded;
the summary gives each method's final best and how long it took to reach
random search's mean final best.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import optuna

from benchmarks.machine import save
from search.data import load_dataset
from search.objective import Limits, Objective, search_split
from search.run import QUICK
from search.study import make_pruner, make_sampler
from search.train import resolve_device


def run_one(method: str, seed: int, seconds: float, data, device) -> list[tuple[float, float]]:
    """[(elapsed seconds, best validation accuracy so far)] at every completed trial."""
    epochs = QUICK["epochs"]
    if method == "budget-nas":
        sampler, pruner = make_sampler(seed), make_pruner(epochs)
    else:
        sampler, pruner = optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    objective = Objective(data, Limits(5_000_000, QUICK["max_macs"]), epochs, seed, device)
    start, curve, best = time.perf_counter(), [], 0.0

    def record(st: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        nonlocal best
        if t.state == optuna.trial.TrialState.COMPLETE and t.value > best:
            best = t.value
            curve.append((time.perf_counter() - start, best))

    study.optimize(objective, timeout=seconds, callbacks=[record])
    trained = sum(1 for t in study.trials if "rejected" not in t.user_attrs)
    print(
        f"  {method:10s} seed {seed}: best {best:.4f} after {len(study.trials)} trials "
        f"({trained} trained)",
        flush=True,
    )
    return curve


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def summarize(curves: dict[str, list[list[tuple[float, float]]]]) -> tuple[dict, float]:
    """Final bests, and when each run first reached random search's final best:
    the mean over seeds, and the same seed's."""
    finals = {m: [c[-1][1] if c else 0.0 for c in cs] for m, cs in curves.items()}
    target = statistics.mean(finals["random"])
    summary = {}
    for method, cs in curves.items():
        times = [time_to(c, target) for c in cs]
        same_seed = [time_to(c, finals["random"][i]) for i, c in enumerate(cs)]
        reached = [t for t in times if t is not None]
        summary[method] = {
            "final_best": finals[method],
            "mean_final_best": statistics.mean(finals[method]),
            "seconds_to_random_mean_final": times,
            "median_seconds_to_random_mean_final": statistics.median(reached) if reached else None,
            "runs_reaching_it": len(reached),
            "seconds_to_same_seed_random_final": same_seed,
        }
        med = summary[method]["median_seconds_to_random_mean_final"]
        print(
            f"{method:10s} final best {', '.join(f'{f:.4f}' for f in finals[method])} "
            f"(mean {summary[method]['mean_final_best']:.4f}); reached random's mean final "
            f"best {target:.4f} in {len(reached)}/{len(cs)} runs"
            + (f", median {med:.0f}s" if med is not None else "")
            + "; same seed's random final best at "
            + ", ".join("never" if t is None else f"{t:.0f}s" for t in same_seed)
        )
    return summary, target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300, help="wall clock per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument(
        "--summarize",
        metavar="RESULT_JSON",
        help="print the summary of a stored result again (and update it)",
    )
    args = ap.parse_args()
    if args.summarize:
        path = Path(args.summarize)
        record = json.loads(path.read_text())
        record["summary"], _ = summarize(record["curves"])
        path.write_text(json.dumps(record, indent=2) + "\n")
        return
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    device = resolve_device(args.device)
    ds = load_dataset("fashion-mnist", args.data_dir)
    data = search_split(ds, 0, QUICK["train_images"], QUICK["val_images"])
    print(f"{args.seconds:.0f}s per run, seeds {args.seeds}, on {device}", flush=True)
    curves: dict[str, list[list[tuple[float, float]]]] = {"budget-nas": [], "random": []}
    for seed in args.seeds:
        for method in curves:
            curves[method].append(run_one(method, seed, args.seconds, data, device))
    summary, target = summarize(curves)
    path = save(
        "search_efficiency",
        {
            "seconds_per_run": args.seconds,
            "seeds": args.seeds,
            "profile": QUICK,
            "budget": 5_000_000,
            "random_mean_final_best": target,
            "summary": summary,
            "curves": curves,
        },
        str(device),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
