"""Is the network the product ships the best one after the training the user runs?

python -m benchmarks.final_choice [--seed 0] [--trials 100] [--horizon 10]
    [--seeds 0 1 2] [--resume] [--only CONTENDER ...]

One quick Fashion-MNIST search (`search.run --quick --horizon H`), then the
product's choice for the horizon (`search.choose`), then every contender trained
for the horizon (H epochs of the whole 60,000-image training set) with the same
final training (search/final.py), once per seed, and measured on the test split:

- chosen: the network and settings `search.choose` picked; the same network with the
  hand defaults of TrainConfig (were the chosen settings right for the horizon?);
- best short trial: the study's best trial by validation, with its settings;
- front: every trial on the study's accuracy/size front, with its settings (the
  best of them at the horizon is an oracle: what a perfect choice would ship);
- the hand designs that fit the budget (resnet18-2111, resnet-3stage-2221,
  resnet-tiny) with the hand defaults of TrainConfig, as a person would train them,
  and with the chosen network's settings.

A contender that is another's network and settings is trained once. The searched
networks (minutes a run) go first, all seeds, then the hand designs (up to 1.75 h a
run on 2 cores) seed by seed from the smallest, so a benchmark stopped early
already answers "is the chosen network the best of the front" and then, at one
seed, "does it beat the hand designs". Each run is saved as it ends
(`--resume` keeps them: the work spans sessions). The search and the choice resume
by themselves: their study is kept beside the results (committed, as each session
may run on a fresh machine), with its trials and the choice's runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import optuna
import torch

from benchmarks.machine import result_path, save
from benchmarks.nas_vs_hand import HAND, training
from models import ArchSpec, count_params
from models.presets import preset
from search import choose, run
from search.data import load_dataset
from search.final import mean_sd, train_final
from search.front import pareto_front
from search.records import best_trial, trial_arch, trial_training
from search.slots import is_trained
from search.study import open_study
from search.trainer import TrainConfig

NAME = "final_choice"
STUDY_DB = "benchmarks/results/final_choice-study.db"  # committed: the work spans sessions


def key(spec: ArchSpec, cfg: TrainConfig) -> str:
    return json.dumps([spec.to_dict(), training(cfg)], sort_keys=True)


def quiet(fn, argv: list[str]) -> tuple[int, str]:
    """A product CLI in this process, its output kept (and its last lines shown)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = fn(argv)
    text = out.getvalue()
    print("\n".join("  " + line for line in text.strip().splitlines()[-6:]), flush=True)
    return rc, text


def contenders(study: optuna.Study, chosen: dict, shape: tuple[int, int, int]) -> dict:
    """name -> (architecture, settings, what it is)."""
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    spec_c, cfg_c = (
        ArchSpec.from_dict(chosen["architecture"]),
        TrainConfig.from_dict(chosen["training"]),
    )
    out = {
        "chosen": (spec_c, cfg_c, "chosen"),
        # were the chosen settings right for the horizon? the choice dropped the hand
        # settings (augmentation) at its first rung, 1/9 of the horizon
        "chosen network, hand settings": (spec_c, TrainConfig(seed=cfg_c.seed), "settings"),
        "best short trial": (trial_arch(best), trial_training(best), "short"),
    }
    for t in pareto_front(trials):
        out[f"front trial {t.number}"] = (trial_arch(t), trial_training(t), "front")
    for name in HAND:
        spec = preset(name, *shape)
        out[f"{name}, hand settings"] = (spec, TrainConfig(), "hand")
        out[f"{name}, chosen settings"] = (spec, cfg_c, "hand")
    return out


def order(designs: dict, seeds: list[int]) -> list[tuple]:
    """(name, spec, cfg, seed) to run: the searched networks seed by seed, then the
    hand designs seed by seed, smallest first: each seed's pass gives every contender a
    figure (one hand design is hours a run here)."""
    searched = [(n, s, c) for n, (s, c, k) in designs.items() if k != "hand"]
    hand = [(n, s, c) for n, (s, c, k) in designs.items() if k == "hand"]
    hand.sort(key=lambda d: count_params(d[1]))  # stable: hand settings, then chosen
    return [(*d, seed) for seed in seeds for d in searched] + [
        (*d, seed) for seed in seeds for d in hand
    ]


def spearman(x: list[float], y: list[float]) -> float | None:
    from scipy.stats import spearmanr

    return None if len(x) < 3 else round(float(spearmanr(x, y).statistic), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="the search's seed")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--horizon", type=int, default=10, help="epochs of the whole training set")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--storage", default=f"sqlite:///{STUDY_DB}")
    ap.add_argument("--resume", action="store_true", help="keep the runs already saved")
    ap.add_argument("--only", nargs="+", metavar="CONTENDER",
                    help="run only these contenders now (names as in the results' table, "
                    "e.g. chosen): the others wait for a later call")  # fmt: skip
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    name = f"final-choice-s{args.seed}"
    ds = load_dataset("fashion-mnist")
    shape = (ds.channels, ds.size, ds.num_classes)

    t0 = time.perf_counter()
    print(f"search: {args.trials} trials, quick profile, seed {args.seed}", flush=True)
    argv = ["--dataset", "fashion-mnist", "--quick", "--trials", str(args.trials)]
    argv += ["--seed", str(args.seed), "--horizon", str(args.horizon), "--no-progress"]
    argv += ["--no-estimate", "--study-name", name, "--storage", args.storage]
    rc, _ = quiet(run.main, argv)
    if rc != 0:
        raise SystemExit(f"search.run exited {rc}")
    search_s = time.perf_counter() - t0
    study = open_study(args.storage, name, create=False, heartbeat=None)
    trained = [t for t in study.get_trials(deepcopy=False) if is_trained(t)]

    print("choice: search.choose", flush=True)
    chosen_path = Path("studies") / name / "chosen.json"
    t0 = time.perf_counter()
    argv = ["--study-name", name, "--storage", args.storage, "-o", str(chosen_path)]
    rc, _ = quiet(choose.main, argv)
    if rc != 0:
        raise SystemExit(f"search.choose exited {rc}")
    chosen = json.loads(chosen_path.read_text())

    designs = contenders(study, chosen, shape)
    path = result_path(NAME)
    saved = json.loads(path.read_text()) if args.resume and path.exists() else {}
    same = saved.get("study") == name and saved.get("horizon", {}).get("epochs") == args.horizon
    runs = saved.get("runs", []) if same else []
    notes = {k: v for k, v in saved.items() if k == "note" or k.startswith("choice_at")}
    done = {(r["key"], r["seed"]) for r in runs}
    record = {
        "complete": False,
        "study": name,
        "horizon": study.user_attrs["horizon"],
        "search": {
            "trials": args.trials,
            "seed": args.seed,
            "trained": len(trained),
            # the completed trials' training time (a pruned trial records none)
            "complete_train_seconds": round(
                sum(t.user_attrs.get("train_seconds", 0) for t in trained)
            ),
            "images": choose.searched_images(study.get_trials(deepcopy=False)),
            "wall_seconds_this_call": round(search_s),
        },
        "choice": chosen["choice"] | {"rungs": None},
        # what earlier sessions wrote by hand beside the figures: kept on resume
        **(notes if same else {}),
        "designs": {
            n: {
                "key": key(s, c),
                "kind": k,
                "params": count_params(s),
                "architecture": s.to_dict(),
                "training": training(c),
            }
            for n, (s, c, k) in designs.items()
        },
    }
    device = torch.device("cpu")
    unknown = set(args.only or []) - set(designs)
    if unknown:
        raise SystemExit(f"error: no contender {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(designs)}")  # fmt: skip
    for dname, spec, cfg, seed in order(designs, args.seeds):
        k = key(spec, cfg)
        if (k, seed) in done or (args.only and dname not in args.only):
            continue
        result, _ = train_final(spec, replace(cfg, seed=seed), args.horizon, ds, device)
        runs.append({"key": k, "design": dname, "seed": seed,
                     "test_accuracy": result["test_accuracy"],
                     "seconds": result["seconds"],
                     "curve": [e["test_accuracy"] for e in result["epochs"]]})  # fmt: skip
        done.add((k, seed))
        print(f"{dname:40s} seed {seed}: test {result['test_accuracy']:.4f} "
              f"({result['seconds']:.0f} s)", flush=True)  # fmt: skip
        save(NAME, summarize(record, runs, study, args.seeds))  # the figures so far
    save(NAME, summarize(record, runs, study, args.seeds))
    print(f"wrote {path}")


def summarize(record: dict, runs: list[dict], study: optuna.Study, seeds: list[int]) -> dict:
    """Each design's mean and sd at the horizon, the figures the issue names."""
    by_key: dict[str, list[float]] = {}
    for r in runs:
        by_key.setdefault(r["key"], []).append(r["test_accuracy"])
    table = {}
    for dname, d in record["designs"].items():
        accs = by_key.get(d["key"], [])
        mean, sd = mean_sd(accs) if accs else (None, None)
        table[dname] = {"kind": d["kind"], "params": d["params"], "test_mean": mean,
                        "test_sd": sd, "test_accuracy": accs}  # fmt: skip
    full = {n: t for n, t in table.items() if len(t["test_accuracy"]) >= len(seeds)}

    def best(kind: str) -> float | None:
        means = [t["test_mean"] for t in full.values() if t["kind"] == kind]
        return max(means) if means else None

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    front = [(trials[int(n.split()[-1])].value, t["test_mean"]) for n, t in full.items()
             if t["kind"] == "front"]  # fmt: skip
    chosen = table["chosen"]
    return record | {
        "complete": len(full) == len(table),
        "seeds": seeds,
        # the choice's extra compute: its MAC-images over the search's (goal <= 0.5)
        "choice_share_of_search": record["choice"].get("share_of_search_compute"),
        "choice_share_of_search_images": round(
            record["choice"]["images_trained"] / record["search"]["images"], 3
        ),
        "chosen_test_mean": chosen["test_mean"],
        "chosen_params": chosen["params"],
        "best_short_trial_test_mean": table["best short trial"]["test_mean"],
        "chosen_network_hand_settings_test_mean": table["chosen network, hand settings"][
            "test_mean"
        ],
        "best_hand_test_mean": best("hand"),
        "best_front_test_mean": best("front"),
        "spearman_short_vs_horizon_front": spearman(*zip(*front, strict=True)) if front else None,
        "median_seconds_per_run": statistics.median(r["seconds"] for r in runs) if runs else None,
        "table": table,
        "runs": runs,
    }


if __name__ == "__main__":
    main()
