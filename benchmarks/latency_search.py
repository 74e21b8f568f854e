"""A quick search under a latency limit: is every trained candidate under it?

python -m benchmarks.latency_search [--trials 100] [--seed 0] [--threads 1]

The limit is half the measured latency (batch 1, `--threads`, fp32 eager) of the
unconstrained quick search's winner (`results/nas_vs_hand-cpu.json`, "search
winner": seed 0's 100-trial quick Fashion-MNIST search). The search runs as a user
runs it (`python -m search.run --quick --dataset fashion-mnist --max-latency-ms
LIMIT`, a subprocess; this CPU's latency table, built or cached). Afterwards every
trained candidate's built model is timed again here, alone, in ROUNDS rounds over
all of them (the fastest of a candidate's kept: a neighbour on a shared VM holds
the core for seconds, and a round spreads one candidate's timings over minutes):
the ones over the limit are listed with their prediction, and the best
validation accuracy under the limit is recorded. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import optuna

from benchmarks.machine import RESULTS, save
from models import ArchSpec
from search import latency
from search.records import trial_arch
from search.slots import is_trained

ROUNDS = 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit-ms", type=float, help="this limit instead (another run's, to compare)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    saved = json.loads((RESULTS / "nas_vs_hand-cpu.json").read_text())
    winner = ArchSpec.from_dict(saved["designs"]["search winner"]["architecture"])
    winner_ms = latency.fastest_ms([winner], args.threads, ROUNDS)[0]
    limit = args.limit_ms or round(winner_ms / 2, 3)  # this VM's timings vary run to run
    print(f"unconstrained winner: {winner_ms:.3f} ms; limit {limit} ms", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/s.db"
        cmd = [sys.executable, "-m", "search.run", "--quick", "--dataset", "fashion-mnist"]
        cmd += ["--trials", str(args.trials), "--seed", str(args.seed), "--no-progress"]
        cmd += ["--max-latency-ms", str(limit), "--latency-threads", str(args.threads)]
        cmd += ["--study-name", "latency", "--storage", url]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        print(done.stdout[-3000:], done.stderr[-3000:], flush=True)
        if done.returncode != 0:
            raise SystemExit(f"search.run exited {done.returncode}")
        trials = optuna.load_study(study_name="latency", storage=url).get_trials(deepcopy=False)
    table = latency.load_table(args.threads, build=False)
    rows = []
    trained = [t for t in trials if is_trained(t)]
    measured = latency.fastest_ms([trial_arch(t) for t in trained], args.threads, ROUNDS)
    for t, ms in zip(trained, measured, strict=True):
        spec = trial_arch(t)
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                "predicted_ms": round(table.predict(spec), 4),
                "gate_ms": t.user_attrs["latency_ms"],  # measured at the gate when near
                "timed_at_gate": "latency_predicted_ms" in t.user_attrs,
                "measured_ms": round(ms, 4),
                "architecture": spec.to_dict(),
                "training": t.user_attrs.get("training"),
            }
        )
    over = [r for r in rows if r["measured_ms"] > limit]
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["measured_ms"] <= limit]
    best = max(complete, key=lambda r: r["value"], default=None)
    rejected = [t for t in trials if t.constraints.get("latency_ms", 0) > 0]
    result = {
        "threads": args.threads,
        "winner_ms": round(winner_ms, 4),
        "limit_ms": limit,
        "trials": args.trials,
        "seed": args.seed,
        "search_seconds": round(seconds, 1),
        "trained": len(rows),
        "rejected_by_latency": len(rejected),
        "timed_at_gate": sum(r["timed_at_gate"] for r in rows),
        "over_limit_measured_after": over,
        "best_under_limit": best,
        "rows": rows,
    }
    print(f"{len(rows)} trained, {len(rejected)} rejected by latency, "
          f"{result['timed_at_gate']} timed at the gate; {len(over)} measured over {limit} ms "
          f"afterwards; best validation {best['value'] if best else None}", flush=True)  # fmt: skip
    print(f"wrote {save(f'latency_search-t{args.threads}', result)}")


if __name__ == "__main__":
    main()
