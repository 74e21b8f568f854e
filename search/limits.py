"""The limits a candidate must fit, judged in closed form before any weight exists.

Parameters (the budget), and optionally MACs per image, the bytes of the
saved weights at a chosen width, and the peak bytes of the activations at
inference (batch 1, at the same width: `models.complexity.peak_activations`),
and the latency of one image on a CPU, predicted from a table of timed layers
(search/latency.py).
`excess()` is what the gate records as constraints: how far over each limit a
candidate is (> 0: over), so the sampler learns sizes, not just pass or fail.

Why a gate before training: counting is closed-form arithmetic on the spec, orders
of magnitude cheaper than building the model (benchmarks/README.md, Count vs
build), so a candidate over the limits costs the search neither time nor memory,
however often the sampler proposes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models import ArchSpec, count_macs, count_params
from models.complexity import DTYPE_BYTES, count_activation_bytes, count_bytes
from search.latency import Table

# Predictions within this factor of the limit, either side, are timed instead: the
# predictor's 90th-percentile relative error is 27-29% (benchmarks/README.md#latency)
NEAR = 1.4


@dataclass(frozen=True)
class Limits:
    params: int  # the parameter budget
    macs: int | None = None  # per image; None: no compute limit
    bytes: int | None = None  # of the saved weights at `weight_dtype`; None: no size limit
    weight_dtype: str = "fp32"  # the width a user ships: of the weights and activations
    activation_bytes: int | None = None  # peak at inference, batch 1; None: no limit
    latency_ms: float | None = None  # one image on the CPU the table is of; None: no limit
    latency: Table | None = field(default=None, compare=False, repr=False)  # its predictor
    measure_near: bool = False  # time a candidate predicted near the latency limit (this CPU's)

    def __post_init__(self) -> None:
        if self.weight_dtype not in DTYPE_BYTES:
            raise ValueError(
                f"weight dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.weight_dtype!r}"
            )
        if self.latency_ms is not None and self.latency is None:
            raise ValueError("a latency limit needs a latency table to predict from")

    def measure(self, spec: ArchSpec) -> dict[str, float]:
        """The sizes this study limits or shows: params, MACs, bytes of the weights, peak
        bytes of the activations and, with a latency table, the predicted latency."""
        return {
            "params": count_params(spec),
            "macs": count_macs(spec),
            "bytes": count_bytes(spec, self.weight_dtype),
            "activation_bytes": count_activation_bytes(spec, self.weight_dtype),
        } | ({"latency_ms": round(self.latency.predict(spec), 4)} if self.latency else {})

    def near_latency_limit(self, sizes: dict[str, float]) -> bool:
        """Whether the predicted latency is too near the limit to trust (within a factor
        NEAR of it): the gate then times the built model on this CPU instead."""
        if self.latency_ms is None or not self.measure_near or "latency_ms" not in sizes:
            return False
        return self.latency_ms / NEAR <= sizes["latency_ms"] <= self.latency_ms * NEAR

    def limits(self) -> dict[str, float]:
        out = {
            "params": self.params,
            "macs": self.macs,
            "bytes": self.bytes,
            "activation_bytes": self.activation_bytes,
            "latency_ms": self.latency_ms,
        }
        return {k: v for k, v in out.items() if v is not None}

    def excess(self, sizes: dict[str, float]) -> dict[str, float]:
        """Constraint values for every set limit: > 0 is over it by that much."""
        return {k: sizes[k] - limit for k, limit in self.limits().items()}

    def fits(self, spec: ArchSpec) -> bool:
        return all(v <= 0 for v in self.excess(self.measure(spec)).values())

    def describe(self) -> str:
        parts = [f"budget {self.params:,} params"]
        if self.macs is not None:
            parts.append(f"at most {self.macs:,} MACs/image")
        if self.bytes is not None:
            parts.append(f"at most {self.bytes:,} bytes of {self.weight_dtype} weights")
        if self.activation_bytes is not None:
            parts.append(
                f"at most {self.activation_bytes:,} bytes of {self.weight_dtype} activations"
            )
        if self.latency_ms is not None:
            threads = self.latency.threads if self.latency else 1
            parts.append(f"at most {self.latency_ms:g} ms/image ({threads} CPU thread(s))")
        return ", ".join(parts)


def over(limits: Limits, sizes: dict[str, float]) -> str | None:
    """Why a candidate is over the limits (`params 11,173,962 > 5,000,000`), or None."""
    parts = [
        f"{key} {sizes[key]:,} > {limit:,}"
        for key, limit in limits.limits().items()
        if sizes[key] > limit
    ]
    return "over the limit: " + ", ".join(parts) if parts else None
