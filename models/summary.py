"""python -m models.summary ARCH.json: per-stage output size, params and MACs; weight
bytes and the peak of activations at inference."""

from __future__ import annotations

import argparse
import json
import sys

from models import load_arch
from models.complexity import DTYPE_BYTES, breakdown, count_bytes, peak_activations


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0 or n == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.summary", description=__doc__)
    ap.add_argument("arch", help="architecture JSON, bare or an export (best.json)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = ap.parse_args(argv)
    try:
        spec = load_arch(args.arch)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = breakdown(spec)
    params, macs = sum(r.params for r in rows), sum(r.macs for r in rows)
    weights = {dtype: count_bytes(spec, dtype) for dtype in ("fp32", "fp16", "int8")}
    values, where = peak_activations(spec)
    activations = {d: values * DTYPE_BYTES[d] for d in ("fp32", "fp16", "int8")}
    if args.json:
        print(
            json.dumps(
                {
                    "params": params,
                    "macs": macs,
                    "bytes": weights,
                    "activation_bytes": activations,
                    "activation_peak_at": where,
                    "rows": [r._asdict() for r in rows],
                    "architecture": spec.to_dict(),
                }
            )
        )
        return 0
    table = [["layer", "blocks", "channels", "output", "params", "MACs"]]
    blocks = {f"stage{i + 1}": str(s.blocks) for i, s in enumerate(spec.stages)}
    for r in rows:
        side = f"x{r.out_size}x{r.out_size}" if r.name != "head" else ""
        out = f"{r.out_channels}{side}"
        table.append(
            [
                r.name,
                blocks.get(r.name, ""),
                str(r.out_channels),
                out,
                f"{r.params:,}",
                f"{r.macs:,}",
            ]
        )
    table.append(["total", "", "", "", f"{params:,}", f"{macs:,}"])
    size = f"{spec.in_channels}x{spec.input_size}x{spec.input_size}"
    print(
        f"input {size}, {spec.num_classes} classes, {spec.activation}, "
        f"dropout {spec.dropout}, pool {spec.pool}"
    )
    print(format_table(table))
    print(
        "weights (state dict payload): "
        + ", ".join(f"{n:,} bytes at {dtype}" for dtype, n in weights.items())
    )
    print(
        f"activations (peak at inference, batch 1, at {where}): "
        + ", ".join(f"{n:,} bytes at {dtype}" for dtype, n in activations.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
