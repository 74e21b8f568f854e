"""Closed-form parameter and MAC counts, from per-layer counters.

These walk the same `stage_plan` as the builder, so a candidate can be
judged against the budget in microseconds, before any weight exists.
MACs count the multiply-accumulates of convolutions and the linear head
per image (BatchNorm, activations, pooling and additions are not counted).
Bytes are the payload of the saved state dict: every parameter and buffer
(BatchNorm's running statistics, and its int64 batch counter), floating-point
tensors at the chosen width. Activation bytes are the peak of the feature maps
alive at once at inference (batch 1), by the rule `activation_bytes` states.
"""

from __future__ import annotations

from typing import NamedTuple

from models.spec import ArchSpec, BlockPlan, StagePlan, stage_plan


def conv_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k  # bias-free: a BatchNorm follows every conv


def conv_macs(cin: int, cout: int, k: int, out_side: int) -> int:
    return cin * cout * k * k * out_side * out_side


def bn_params(c: int) -> int:
    return 2 * c


def linear_params(fin: int, fout: int) -> int:
    return fin * fout + fout


def block_params(b: BlockPlan) -> int:
    cin, c = b.in_channels, b.out_channels
    n = conv_params(cin, c, b.kernel) + conv_params(c, c, b.kernel) + 2 * bn_params(c)
    if b.has_skip_conv:
        n += conv_params(cin, c, b.skip_kernel) + bn_params(c)
    return n


def block_macs(b: BlockPlan) -> int:
    cin, c, side = b.in_channels, b.out_channels, b.out_size
    n = conv_macs(cin, c, b.kernel, side) + conv_macs(c, c, b.kernel, side)
    if b.has_skip_conv:
        n += conv_macs(cin, c, b.skip_kernel, side)
    return n


def stage_params(s: StagePlan) -> int:
    return block_params(s.first) + s.repeats * block_params(s.rest)


def stage_macs(s: StagePlan) -> int:
    return block_macs(s.first) + s.repeats * block_macs(s.rest)


def stem_params(spec: ArchSpec) -> int:
    return conv_params(spec.in_channels, spec.stem_channels, spec.stem_kernel) + bn_params(
        spec.stem_channels
    )


def stem_macs(spec: ArchSpec) -> int:
    return conv_macs(spec.in_channels, spec.stem_channels, spec.stem_kernel, spec.input_size)


def count_params(spec: ArchSpec) -> int:
    """Exactly `sum(p.numel() for p in build_model(spec).parameters())`."""
    body = sum(stage_params(s) for s in stage_plan(spec))
    return stem_params(spec) + body + linear_params(spec.head_features, spec.num_classes)


def batchnorms(spec: ArchSpec) -> list[int]:
    """The width of every BatchNorm, stem first: each holds 2 running statistics per channel
    and one int64 counter besides its 2 parameters per channel."""
    widths = [spec.stem_channels]
    for b in (b for s in stage_plan(spec) for b in s.blocks()):
        widths += [b.out_channels] * (3 if b.has_skip_conv else 2)
    return widths


DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
COUNTER_BYTES = 8  # BatchNorm's num_batches_tracked stays int64 at any weight width


def count_bytes(spec: ArchSpec, dtype: str = "fp32") -> int:
    """Bytes of the state dict's tensors with floating-point ones at `dtype`.

    Equals `sum(t.numel() * t.element_size() for t in model.to(dtype).state_dict().values())`
    for fp32, fp16 and bf16; int8 counts 1 byte per floating-point value (quantisation
    scales not included).
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    bns = batchnorms(spec)
    floats = count_params(spec) + 2 * sum(bns)
    return floats * DTYPE_BYTES[dtype] + COUNTER_BYTES * len(bns)


def peak_activations(spec: ArchSpec) -> tuple[int, str]:
    """The most activation values alive at once for one image, and where.

    The rule is a memory planner's (ONNX Runtime's, TFLite's), on the network as
    built: layers run in the order of `forward`; every conv, BatchNorm, activation,
    addition, pool and linear writes a new tensor (nothing fused or in place),
    which lives from its layer to its last reader; while a layer runs its inputs
    and its output are alive. Identity, inference dropout and flatten write
    nothing (they hand on their input). The input image counts until the stem has
    read it. So a block with input x and output maps y holds x + 2y until its
    input's last reader (the skip conv, or the addition) and 3y while the body's
    output waits for the skip's. tests/test_complexity.py checks this against a
    trace of the built model.
    """
    image = spec.in_channels * spec.input_size**2
    stem = spec.stem_channels * spec.input_size**2
    peaks = [(image + stem, "stem"), (2 * stem, "stem")]
    for i, s in enumerate(stage_plan(spec)):
        for j, b in enumerate(s.blocks()):
            x = b.in_channels * b.in_size**2
            y = b.out_channels * b.out_size**2
            peaks.append((max(x + 2 * y, 3 * y) if b.has_skip_conv else x + 2 * y,
                          f"stage{i + 1} block {j + 1}"))  # fmt: skip
    last = spec.stages[-1].channels * spec.feature_sizes[-1] ** 2
    peaks += [(last + spec.head_features, "pool"),
              (spec.head_features + spec.num_classes, "head")]  # fmt: skip
    return max(peaks, key=lambda p: p[0])  # the first such place on a tie


def count_activation_bytes(spec: ArchSpec, dtype: str = "fp32") -> int:
    """Peak bytes of the feature maps alive at once for one image at `dtype`
    (int8: a quantized network's 1-byte activations); the rule: `peak_activations`."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return peak_activations(spec)[0] * DTYPE_BYTES[dtype]


def count_macs(spec: ArchSpec) -> int:
    """Conv and linear multiply-accumulates for one image."""
    body = sum(stage_macs(s) for s in stage_plan(spec))
    return stem_macs(spec) + body + spec.head_features * spec.num_classes


class Row(NamedTuple):
    """One line of the summary: a part of the network and what it costs."""

    name: str
    out_channels: int
    out_size: int
    params: int
    macs: int


def breakdown(spec: ArchSpec) -> list[Row]:
    """Stem, each stage and the head, in order; the totals are their sums."""
    rows = [Row("stem", spec.stem_channels, spec.input_size, stem_params(spec), stem_macs(spec))]
    for i, s in enumerate(stage_plan(spec)):
        rows.append(
            Row(
                f"stage{i + 1}",
                s.first.out_channels,
                s.first.out_size,
                stage_params(s),
                stage_macs(s),
            )
        )
    fin = spec.head_features
    rows.append(
        Row(
            "head",
            spec.num_classes,
            1,
            linear_params(fin, spec.num_classes),
            fin * spec.num_classes,
        )
    )
    return rows
