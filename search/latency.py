"""Latency of one image on this machine's CPU, predicted before any weight exists.

What is predicted: the milliseconds of `model(x)` for one image (batch 1),
fp32, PyTorch eager inference (`torch.inference_mode`) with `threads` threads,
the network as built (BatchNorm not folded), on a core the process has to itself:
the fastest of repeated calls. On a shared VM other tenants take the core for
tenths of a second to seconds at a time, which moved this machine's median for one network
from 0.80 to 1.53 ms between windows a second apart while the fastest call stayed
at 0.78-0.79 ms; the fastest call is what the CPU does, and what a device that
runs only the model sees. ONNX Runtime runs the exported file faster (BatchNorm
folded, kernels fused); `search.export --onnx` prints its measured latency beside
this prediction.

How: a network is the layers it runs (`layers(spec)`: each conv, BatchNorm,
activation, addition, pool, linear, and the identity skips and inference
dropouts, which cost a module call). Each kind of layer (a conv per kernel and
stride) is timed alone on random shapes that cover the search space, and a
least-squares fit on relative error gives its time from its MACs, input and
output sizes. The module calls around the layers (a block's forward, the
sequences) are fitted last, from 40 whole random networks (16 of 1x28x28 images
under 20M MACs, 8 more with one stage, the fastest kind, and 16 of 3x32x32 under
5M parameters): a scale on the layers' sum, a time per block and one per
network, none negative. Every layer and network is timed in ROUNDS rounds, the
fastest kept, since a neighbour can hold the core for seconds. The table holds
those coefficients; it is built once per machine, torch version and thread
count (`build_table`, about a minute) and kept in ~/.cache/budget-nas/ (or
$NAS_CACHE_DIR).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import ArchSpec, build_model
from models.spec import ACTIVATIONS, block_plan
from search.env import cpu_model

FORMAT = "budget-nas-latency/2"  # 2: fastest-call timings, rounds, no negative terms
RUNTIME = "torch eager inference, fp32, batch 1"
KERNELS = (1, 3, 5, 7)
SIZES = (32, 28, 16, 14, 8, 7, 4, 2, 1)
ROUNDS = 2  # each layer and network of the table timed this many times, apart; the fastest
_ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass(frozen=True)
class Layer:
    """One layer as the predictor sees it: its kind and its sizes."""

    kind: str  # conv{k}s{stride}, bn, relu, gelu, silu, add, identity, pool, linear
    cin: int
    cout: int
    in_size: int  # side of the input map (linear: 1)
    out_size: int
    macs: int = 0

    def features(self) -> tuple[float, ...]:
        """Intercept, MACs (millions), input and output values (ten-thousands)."""
        return (
            1.0,
            self.macs / 1e6,
            self.cin * self.in_size**2 / 1e4,
            self.cout * self.out_size**2 / 1e4,
        )


def conv(cin: int, cout: int, k: int, stride: int, in_size: int, out_size: int) -> Layer:
    return Layer(
        f"conv{k}s{stride}", cin, cout, in_size, out_size, cin * cout * k * k * out_size**2
    )


def elementwise(kind: str, c: int, size: int) -> Layer:
    return Layer(kind, c, c, size, size)


def layers(spec: ArchSpec) -> list[Layer]:
    """Every layer the built model runs, in order (see models/resnet.py)."""
    act, side = spec.activation, spec.input_size
    out = [conv(spec.in_channels, spec.stem_channels, spec.stem_kernel, 1, side, side)]
    out += [elementwise("bn", spec.stem_channels, side), elementwise(act, spec.stem_channels, side)]
    for b in block_plan(spec):
        c, s = b.out_channels, b.out_size
        out += [conv(b.in_channels, c, b.kernel, b.stride, b.in_size, s), elementwise("bn", c, s)]
        out.append(elementwise(act, c, s))
        if spec.dropout > 0:
            out.append(elementwise("identity", c, s))  # Dropout2d at inference: a call
        out += [conv(c, c, b.kernel, 1, s, s), elementwise("bn", c, s)]
        if b.has_skip_conv:
            out.append(conv(b.in_channels, c, b.skip_kernel, b.stride, b.in_size, s))
            out.append(elementwise("bn", c, s))
        else:
            out.append(elementwise("identity", c, s))
        out += [elementwise("add", c, s), elementwise(act, c, s)]
    c, s = spec.stages[-1].channels, spec.feature_sizes[-1]
    out.append(Layer("pool", c, c, s, s // spec.pool))
    f = spec.head_features
    out.append(Layer("linear", f, spec.num_classes, 1, 1, f * spec.num_classes))
    return out


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


def layer_module(layer: Layer) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The layer built alone, and an input for it (batch 1)."""
    x = torch.rand(1, layer.cin, layer.in_size, layer.in_size)
    if layer.kind.startswith("conv"):
        k, stride = map(int, re.findall(r"\d+", layer.kind))
        return nn.Conv2d(layer.cin, layer.cout, k, stride, k // 2, bias=False), (x,)
    if layer.kind == "bn":
        return nn.BatchNorm2d(layer.cin), (x,)
    if layer.kind in _ACTS:
        return _ACTS[layer.kind](), (x,)
    if layer.kind == "identity":
        return nn.Identity(), (x,)
    if layer.kind == "add":
        return _Add(), (x, torch.rand_like(x))
    if layer.kind == "pool":
        p = layer.in_size // layer.out_size
        return nn.AvgPool2d(p, p), (x,)
    if layer.kind == "linear":
        return nn.Linear(layer.cin, layer.cout), (torch.rand(1, layer.cin),)
    raise ValueError(f"unknown layer kind {layer.kind!r}")


def time_ms(
    fn: Callable[[], Any], min_repeats: int = 15, budget_s: float = 0.05, windows: int = 1
) -> float:
    """Milliseconds of the fastest call of `fn()`, after a warm-up: at least `min_repeats`
    calls (more while the time budget lasts) in each of `windows` windows 0.05 s apart, so a
    neighbour that holds the core through one window does not decide the figure."""
    for _ in range(3):
        fn()
    best = float("inf")
    for w in range(windows):
        if w:
            time.sleep(0.05)
        start, n = time.perf_counter(), 0
        while n < min_repeats or time.perf_counter() - start < budget_s:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
            n += 1
            if n >= 2000:
                break
    return 1000 * best


def measure_ms(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int, windows: int = 1
) -> float:
    """Fastest milliseconds of one inference call of `module` with `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        module = module.eval()
        with torch.inference_mode():
            return time_ms(lambda: module(*inputs), windows=windows)
    finally:
        torch.set_num_threads(before)


def model_ms(spec: ArchSpec, threads: int = 1) -> float:
    """The measured latency of the built model (fresh weights; latency does not see them)."""
    x = torch.rand(1, spec.in_channels, spec.input_size, spec.input_size)
    return measure_ms(build_model(spec), (x,), threads, windows=3)


@dataclass(frozen=True)
class Table:
    """Per layer kind, coefficients of its features; then, fitted on whole networks, a
    scale on the layers' sum (a layer timed alone is not a layer among others) and the
    time of the module calls around the layers, per block and per network."""

    threads: int
    kinds: dict[str, list[float]]
    scale: float
    per_block: float
    per_network: float
    machine: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0

    def predict(self, spec: ArchSpec) -> float:
        """Predicted milliseconds of one image; a kind never measured is an error."""
        return (
            self.scale * self.layers_ms(spec)
            + self.per_block * len(block_plan(spec))
            + self.per_network
        )

    def layers_ms(self, spec: ArchSpec) -> float:
        """The sum of the layers' times, each as if timed alone."""
        total = 0.0
        for layer in layers(spec):
            coef = self.kinds.get(layer.kind)
            if coef is None:
                raise ValueError(f"the latency table has no {layer.kind} (rebuild it)")
            total += float(np.dot(coef, layer.features()))
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "runtime": RUNTIME,
            "threads": self.threads,
            "kinds": self.kinds,
            "scale": self.scale,
            "per_block": self.per_block,
            "per_network": self.per_network,
            "machine": self.machine,
            "build_seconds": self.build_seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Table:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a latency table of this version ({d.get('format')!r})")
        return cls(
            d["threads"], d["kinds"], d["scale"], d["per_block"], d["per_network"], d["machine"],
            d["build_seconds"],
        )  # fmt: skip


def this_machine(threads: int) -> dict[str, Any]:
    """What a table is valid for: the CPU, torch and the thread count."""
    return {
        "cpu": cpu_model(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": threads,
    }


def cache_path(threads: int) -> Path:
    m = this_machine(threads)
    key = re.sub(r"[^A-Za-z0-9.]+", "-", f"{m['cpu']}-{m['isa']}-torch{m['torch']}-t{threads}")
    root = Path(os.environ.get("NAS_CACHE_DIR") or Path.home() / ".cache" / "budget-nas")
    return root / "latency" / f"{key}.json"


def sample_layers(rng: np.random.Generator, activations: tuple[str, ...]) -> Iterator[Layer]:
    """Random layers of every kind, shaped like the search space's."""

    def width() -> int:
        return int(np.exp(rng.uniform(np.log(4), np.log(640))))

    for k in KERNELS:
        for stride in (1, 2):
            made = 0
            while made < 24:
                size = int(rng.choice(SIZES))
                layer = conv(width(), width(), k, stride, size, (size - 1) // stride + 1)
                # as in the space: half the 5M budget at most; and a bound on timing cost
                if layer.cin * layer.cout * k * k <= 2_500_000 and layer.macs <= 300_000_000:
                    made += 1
                    yield layer
    for kind in ("bn", "add", "identity", *activations):
        for _ in range(16):
            yield elementwise(kind, width(), int(rng.choice(SIZES)))
    for _ in range(16):
        size = int(rng.choice(SIZES))
        yield Layer("pool", width(), width(), size, max(1, size // int(rng.choice((1, 2, 4)))))
    for _ in range(16):
        f = width() * int(rng.choice((1, 4, 16)))
        yield Layer("linear", f, 10, 1, 1, f * 10)


def _fit(rows: list[tuple[float, ...]], ms: list[float]) -> list[float]:
    """Least squares on relative error: each row weighted by 1 / its measured time."""
    a, y = np.asarray(rows), np.asarray(ms)
    coef, *_ = np.linalg.lstsq(a / y[:, None], np.ones_like(y), rcond=None)
    return [float(c) for c in coef]


def build_table(
    threads: int = 1,
    calibration: list[ArchSpec] | None = None,
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> Table:
    """Time every kind of layer on random shapes, fit each kind, then fit the module calls
    around them on whole networks (`calibration`, default: random ones)."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    samples: dict[str, tuple[list[tuple[float, ...]], list[float]]] = {}
    for layer in sample_layers(rng, ACTIVATIONS):
        rows, ms = samples.setdefault(layer.kind, ([], []))
        rows.append(layer.features())
        ms.append(layer_ms(layer, threads))
    kinds = {kind: _fit(rows, ms) for kind, (rows, ms) in samples.items()}
    if on_progress:
        on_progress(f"{sum(len(m) for _, m in samples.values())} layers timed")
    alone = Table(threads, kinds, 1.0, 0.0, 0.0)
    if calibration is None:  # small and large networks: the fixed costs matter for small ones
        calibration = [*random_specs(16, seed + 1, (1, 28, 10), 20_000_000),
                       *random_specs(8, seed + 3, (1, 28, 10), 20_000_000, stages=1),
                       *random_specs(16, seed + 2, (3, 32, 10))]  # fmt: skip
    rows = [(alone.layers_ms(spec), float(len(block_plan(spec))), 1.0) for spec in calibration]
    scale, per_block, per_network = _fit_nonnegative(rows, fastest_ms(calibration, threads))
    return Table(
        threads, kinds, scale, per_block, per_network, this_machine(threads),
        round(time.perf_counter() - start, 1),
    )  # fmt: skip


def fastest_ms(specs: list[ArchSpec], threads: int, rounds: int = ROUNDS) -> list[float]:
    """Each network's fastest `model_ms` over `rounds` rounds through all of them: a
    neighbour that holds the core for seconds misses a network's other rounds."""
    best = [float("inf")] * len(specs)
    for _ in range(rounds):
        best = [min(b, model_ms(s, threads)) for b, s in zip(best, specs, strict=True)]
    return best


def layer_ms(layer: Layer, threads: int) -> float:
    """The fastest of ROUNDS timings of the layer alone, each on a new module."""
    best = float("inf")
    for _ in range(ROUNDS):
        module, inputs = layer_module(layer)
        best = min(best, measure_ms(module, inputs, threads))
    return best


def _fit_nonnegative(rows: list[tuple[float, ...]], ms: list[float]) -> list[float]:
    """`_fit` with no negative coefficient: a negative one is dropped (held at 0) and the
    rest fitted again. A negative time per network fits the large networks a little
    better and made the smallest ones a third faster than they run."""
    keep = list(range(len(rows[0])))
    while True:
        coef = _fit([tuple(r[i] for i in keep) for r in rows], ms)
        if min(coef) >= 0 or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    out = [0.0] * len(rows[0])
    for i, c in zip(keep, coef, strict=True):
        out[i] = c
    return out


def random_specs(
    n: int,
    seed: int,
    shape: tuple[int, int, int] = (3, 32, 10),
    max_macs: int | None = None,
    stages: int | None = None,
) -> Iterator[ArchSpec]:
    """Architectures as the search samples them (random sampler, 5M budget); `stages`:
    only networks of that many stages."""
    import optuna

    from search import space
    from search.limits import Limits

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed))
    limits = Limits(5_000_000, max_macs)
    made = 0
    while made < n:
        if stages is not None:
            study.enqueue_trial({"stages": stages})
        trial = study.ask()
        spec = space.suggest_arch(trial, shape, limits)
        study.tell(trial, 0.0)
        if limits.fits(spec):
            made += 1
            yield spec


def load_table(threads: int = 1, build: bool = True, say: Callable[[str], None] = print) -> Table:
    """This machine's table from the cache; built (and cached) when missing and `build`."""
    path = cache_path(threads)
    if path.exists():
        try:
            return Table.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, json.JSONDecodeError):
            say(f"latency table {path} is unreadable or old: building it again")
    if not build:
        raise FileNotFoundError(path)
    say(f"latency: timing layers on this CPU with {threads} thread(s), once (about a minute)")
    table = build_table(threads, on_progress=say)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    tmp.replace(path)
    say(f"latency: table built in {table.build_seconds:.0f} s, kept in {path}")
    return table


def main(argv: list[str] | None = None) -> int:
    """python -m search.latency [--threads 1] [-o FILE]: build this CPU's table (again), for
    this machine's cache or, with -o, a file to pass to --latency-table elsewhere."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m search.latency", description=main.__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", help="write the table here instead of the cache")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"timing layers and networks with {args.threads} thread(s) (about a minute)")
    table = build_table(args.threads, on_progress=print)
    path = Path(args.output) if args.output else cache_path(args.threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    print(f"wrote {path} (built in {table.build_seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
