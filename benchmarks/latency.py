"""The latency predictor against measured latency of built models, on random specs.

python -m benchmarks.latency [--threads 1] [--specs 200]

Builds this machine's table (search/latency.py: layers timed alone, fitted, then
calibrated on 40 random networks) and records how long that took; then, on
random architectures as the search samples them that the calibration never saw
(other seeds), measures each built model (batch 1, fp32, eager inference; the
fastest of latency.ROUNDS rounds through all, as the table's own timings:
`latency.fastest_ms`) and compares with the prediction: Spearman rank
correlation, median and 90th percentile of the relative error. Two spaces: the
quick Fashion-MNIST search's (1x28x28, 20M-MAC cap) and CIFAR-10's at 5M
parameters with no MAC cap. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks.machine import save
from search import latency

SPACES = {
    "fashion-mnist-quick": ((1, 28, 10), 20_000_000),
    "cifar10-5M": ((3, 32, 10), None),
}


def ranks(x: list[float]) -> np.ndarray:
    """Ranks with ties averaged (Spearman's)."""
    a = np.asarray(x)
    order = a.argsort()
    r = np.empty(len(a))
    r[order] = np.arange(len(a))
    for v in np.unique(a):
        tied = a == v
        r[tied] = r[tied].mean()
    return r


def spearman(x: list[float], y: list[float]) -> float:
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def evaluate(table: latency.Table, specs: list, threads: int) -> dict:
    predicted = [table.predict(spec) for spec in specs]
    measured = latency.fastest_ms(specs, threads)
    rel = sorted(abs(p - m) / m for p, m in zip(predicted, measured, strict=True))
    return {
        "specs": len(specs),
        "spearman": round(spearman(predicted, measured), 4),
        "median_relative_error": round(statistics.median(rel), 4),
        "p90_relative_error": round(rel[int(0.9 * (len(rel) - 1))], 4),
        "measured_ms": {"min": round(min(measured), 3), "median":
                        round(statistics.median(measured), 3), "max": round(max(measured), 3)},
        "pairs": [[round(p, 4), round(m, 4)] for p, m in zip(predicted, measured, strict=True)],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--specs", type=int, default=200)
    args = ap.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    t0 = time.perf_counter()
    table = latency.build_table(args.threads, seed=0)
    print(
        f"table built in {table.build_seconds:.0f} s: scale {table.scale:.3f}, per block "
        f"{table.per_block:.4f} ms, per network {table.per_network:.4f} ms",
        flush=True,
    )
    result: dict = {"threads": args.threads, "runtime": latency.RUNTIME, "table": table.to_dict()}
    for name, (shape, macs) in SPACES.items():
        specs = list(latency.random_specs(args.specs, seed=1000, shape=shape, max_macs=macs))
        r = evaluate(table, specs, args.threads)
        result[name] = r
        print(f"{name}: {r['specs']} specs, measured {r['measured_ms']} ms; Spearman "
              f"{r['spearman']}, relative error median {r['median_relative_error']:.1%}, 90th "
              f"percentile {r['p90_relative_error']:.1%}", flush=True)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"wrote {save(f'latency-t{args.threads}', result)}")


if __name__ == "__main__":
    main()
