"""How much cheaper the analytic budget gate is than building the model.

python -m benchmarks.count_vs_build: times count_params + count_macs and
build_model on DESIGN.md's 4,977,226-parameter example, best of several runs.
"""

from __future__ import annotations

import timeit

from benchmarks.machine import save
from models import ArchSpec, build_model, count_macs, count_params
from models.presets import PRESETS


def best_of(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main() -> None:
    spec = PRESETS["resnet18-2111"]
    assert count_params(spec) == 4_977_226
    count_s = best_of(lambda: (count_params(spec), count_macs(spec)), number=2000, repeat=5)
    # The plan is made when a spec is validated, so also time the whole gate
    # from a parsed JSON dict: validation + plan + both counts.
    data = spec.to_dict()
    gate_s = best_of(
        lambda: (c := ArchSpec.from_dict(data), count_params(c), count_macs(c)),
        number=2000,
        repeat=5,
    )
    build_s = best_of(lambda: build_model(spec), number=3, repeat=5)
    ratio = build_s / count_s
    print(f"count_params + count_macs: {count_s * 1e6:9.1f} us")
    print(f"from_dict + both counts:   {gate_s * 1e6:9.1f} us")
    print(f"build_model:               {build_s * 1e3:9.1f} ms")
    print(
        f"counting is {ratio:,.0f}x faster than building "
        f"({build_s / gate_s:,.0f}x with parsing and validation)"
    )
    path = save(
        "count_vs_build",
        {
            "spec": "resnet18-2111",
            "params": 4_977_226,
            "count_seconds": count_s,
            "parse_validate_count_seconds": gate_s,
            "build_seconds": build_s,
            "ratio": ratio,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
