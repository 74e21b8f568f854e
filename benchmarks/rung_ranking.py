"""How well does a short look at a candidate rank it, and what does the look cost?

python -m benchmarks.rung_ranking [--candidates 100] [--rungs 0.125 0.25 0.5 1] [--resume]
python -m benchmarks.rung_ranking --replay none asha:2 median:2 percentile:25:2 ...

Candidates are drawn as random search draws them (a seeded RandomSampler over
the space, the budget gate skipping what does not fit) and each is trained
once on the quick profile's Fashion-MNIST split, with validation at every
rung. Each row keeps the candidate's parameters, its accuracy at each rung and
the wall clock to reach it (model build and evaluations included), so that
the result file is a small tabular benchmark: pruning rules can be replayed
on it (`replay`) thousands of times, which a 5-seed live run cannot do;
`--replay` adds their figures to the file, under "replay".

Printed: the Spearman correlation of each rung's accuracy with the last one's,
and how often each rung's top decile holds the final top decile's members.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace

import optuna
import torch

from benchmarks.machine import result_path, save, saved_for_resume
from benchmarks.search_efficiency import time_to
from benchmarks.trial_recipe import spearman
from search import space
from search.data import load_dataset, search_split
from search.limits import Limits
from search.profile import QUICK
from search.trainer import EvalStats
from search.worker import Search

Row = dict  # params, macs, batch, acc (per rung), seconds (per rung, cumulative)


def draw(search: Search, n: int, seed: int) -> list[tuple[optuna.trial.FrozenTrial, int]]:
    """The first `n` candidates random search trains, with the rejections before each."""
    sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    out, rejected = [], 0
    while len(out) < n:
        trial = study.ask()
        spec = space.suggest_arch(trial, search.data.shape, search.limits)
        if not search.limits.fits(spec):
            rejected += 1
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        space.suggest_training(trial, search.profile, len(search.data.train_y), search.seed)
        study.tell(trial, 0.0)
        out.append((study.trials[-1], rejected))
        rejected = 0
    return out


def measure(search: Search, trial: optuna.trial.FrozenTrial, rejected: int) -> Row:
    fixed = optuna.trial.FixedTrial(trial.params)
    spec = space.suggest_arch(fixed, search.data.shape, search.limits)
    cfg = space.suggest_training(fixed, search.profile, len(search.data.train_y), search.seed)
    acc, seconds = [], []
    start = time.perf_counter()

    def on_eval(s: EvalStats) -> None:
        acc.append(s.val_acc)
        seconds.append(round(time.perf_counter() - start, 2))

    search.train(spec, cfg, on_eval=on_eval)
    return {
        "number": trial.number,
        "rejected_before": rejected,
        "params": trial.params,
        "macs": search.limits.measure(spec)["macs"],
        "batch": cfg.batch_size,
        "acc": acc,
        "seconds": seconds,
    }


def top_overlap(rows: list[Row], rung: int, frac: float = 0.1) -> float:
    """The fraction of the final top `frac` that is also in this rung's top `frac`."""
    k = max(1, round(frac * len(rows)))
    top = set(sorted(range(len(rows)), key=lambda i: -rows[i]["acc"][-1])[:k])
    at = set(sorted(range(len(rows)), key=lambda i: -rows[i]["acc"][rung])[:k])
    return len(top & at) / k


# --- replaying pruning rules on the table ---------------------------------------------


def stop_rung(rule: str, acc: list[float], seen: list[list[float]], done: list[list[float]]) -> int:
    """The rung where `rule` stops a candidate with this curve (the last: it completes).

    rules: "none"; "asha:ETA" (go on when in the top 1/ETA of every value seen at that
    rung, this one included: Optuna's SuccessiveHalvingPruner, the table's rungs a
    factor ETA apart); "median:N" / "percentile:P:N" (the best value so far against
    the completed candidates' values at that rung, once N have completed: Optuna's
    MedianPruner and PercentilePruner). `seen` (per rung) and `done` are the
    search's history; ASHA adds this candidate's values to `seen`.
    """
    kind, *args = rule.split(":")
    for i, a in enumerate(acc[:-1]):
        if kind == "asha":
            seen[i].append(a)
            ranked = sorted(seen[i], reverse=True)
            if a < ranked[max(0, len(ranked) // int(args[0]) - 1)]:
                return i
        elif kind in ("median", "percentile") and done and len(done) >= int(args[-1]):
            q = 50.0 if kind == "median" else 100 - float(args[0])
            if max(acc[: i + 1]) < percentile([c[i] for c in done], q):
                return i
    return len(acc) - 1


def replay(rows: list[Row], rule: str, seconds: float, rng: random.Random) -> list[tuple]:
    """One simulated search with random sampling: candidates drawn from the table with
    replacement, each stopped where `rule` says (`stop_rung`), each costing the wall
    clock to its stopping rung. Returns its best-so-far curve.
    """
    seen: list[list[float]] = [[] for _ in rows[0]["acc"]]
    done: list[list[float]] = []
    clock, best, curve = 0.0, 0.0, []
    while True:
        r = rng.choice(rows)
        stop = stop_rung(rule, r["acc"], seen, done)
        clock += r["seconds"][stop]
        if clock > seconds:
            return curve
        if stop == len(r["acc"]) - 1:
            done.append(r["acc"])
            if r["acc"][-1] > best:
                best = r["acc"][-1]
                curve.append((clock, best))


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def from_rung(rows: list[Row], rungs: list[float], first: float) -> list[Row]:
    """The table as a profile whose first rung is `first` would have seen it."""
    keep = [i for i, f in enumerate(rungs) if f >= first]
    return [r | {k: [r[k][i] for i in keep] for k in ("acc", "seconds")} for r in rows]


def time_ratios(
    rows: list[Row], rungs: list[float], rules: list[str], seconds: float, seeds: int, runs: int = 5
) -> dict[str, dict[str, list[float]]]:
    """Each rule's time_ratio against "none" over `seeds` repeats of a `runs`-seed
    benchmark (its quartiles say how much is luck), and the quartiles of the final
    best of its runs. A rule may end in @F: the table seen from rung F on.
    """
    ratios: dict[str, list[float]] = {rule: [] for rule in rules}
    finals: dict[str, list[float]] = {rule: [] for rule in rules}
    tables = {
        rule: from_rung(rows, rungs, float(rule.split("@")[1]) if "@" in rule else 0.0)
        for rule in rules
    }
    never = 2 * seconds
    for s in range(seeds):
        rng = random.Random(s)
        base = [replay(rows, "none", seconds, rng) for _ in range(runs)]
        target = statistics.median(c[-1][1] if c else 0.0 for c in base)
        base_t = statistics.median(time_to(c, target, never) for c in base)
        for rule in rules:
            cs = [replay(tables[rule], rule.split("@")[0], seconds, rng) for _ in range(runs)]
            ratios[rule].append(statistics.median(time_to(c, target, never) for c in cs) / base_t)
            finals[rule] += [c[-1][1] if c else 0.0 for c in cs]
    return {
        r: {
            "time_ratio": statistics.quantiles(ratios[r], n=4),
            "p_time_ratio_at_most_half": statistics.mean(x <= 0.5 for x in ratios[r]),
            "final_best": statistics.quantiles(finals[r], n=4),
        }
        for r in rules
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--rungs", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="keep the candidates already saved")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--replay", nargs="+", metavar="RULE", help="replay rules on the saved table")
    ap.add_argument("--seconds", type=float, default=300, help="--replay: wall clock per run")
    args = ap.parse_args()
    if args.replay:
        path = result_path("rung_ranking")
        saved = json.loads(path.read_text())
        rows, rungs = saved["rows"], saved["profile"]["rungs"]
        print(f"{args.seconds:.0f} s per run; quartiles over 400 repeats of a 5-seed benchmark")
        replayed = time_ratios(rows, rungs, args.replay, args.seconds, seeds=400)
        saved["replay"] = {"seconds_per_run": args.seconds, "repeats": 400, "rules": replayed}
        path.write_text(json.dumps(saved, indent=2) + "\n")  # the table is unchanged
        for rule, q in replayed.items():
            r, f = q["time_ratio"], q["final_best"]
            print(
                f"{rule:22s} time_ratio {r[0]:.2f} {r[1]:.2f} {r[2]:.2f} "
                f"(<= 0.5 in {q['p_time_ratio_at_most_half']:.0%})  "
                f"final best {f[0]:.4f} {f[1]:.4f} {f[2]:.4f}"
            )
        return
    try:
        rows: list[Row] = saved_for_resume("rung_ranking").get("rows", []) if args.resume else []
    except ValueError as e:
        ap.error(str(e))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    profile = replace(QUICK, rungs=tuple(args.rungs))
    data = search_split(
        load_dataset("fashion-mnist", args.data_dir), 0, QUICK.train_images, QUICK.val_images
    )
    search = Search(data, Limits(5_000_000, QUICK.max_macs), profile, 0, torch.device("cpu"))
    for trial, rejected in draw(search, args.candidates, args.seed)[len(rows) :]:
        rows.append(measure(search, trial, rejected))
        r = rows[-1]
        print(
            f"{len(rows):3d}: {' '.join(f'{a:.3f}' for a in r['acc'])} "
            f"at {' '.join(f'{s:.1f}' for s in r['seconds'])} s",
            flush=True,
        )
        save("rung_ranking", {"profile": profile.to_dict(), "seed": args.seed, "rows": rows})
    final = [r["acc"][-1] for r in rows]
    summary = {
        f"{f:g}": {
            "spearman_with_last": spearman([r["acc"][i] for r in rows], final),
            "top_decile_overlap": top_overlap(rows, i),
            "median_seconds": statistics.median(r["seconds"][i] for r in rows),
        }
        for i, f in enumerate(profile.rungs)
    }
    for f, s in summary.items():
        print(
            f"rung {f}: Spearman {s['spearman_with_last']:.2f}, top-decile overlap "
            f"{s['top_decile_overlap']:.2f}, median {s['median_seconds']:.1f} s"
        )
    result = {"profile": profile.to_dict(), "seed": args.seed, "summary": summary, "rows": rows}
    print(f"wrote {save('rung_ranking', result)}")


if __name__ == "__main__":
    main()
