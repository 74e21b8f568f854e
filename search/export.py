"""python -m search.export: a trial as JSON that rebuilds the exact model.

`--budget 1M` (and `--max-macs`, `--max-bytes`, `--max-activation-bytes`) answers a
smaller budget from the same study: the best completed trial within it. `--front`
writes every trial on the accuracy/size front, smallest first, each in the export
format.

`--onnx model.onnx` also writes the network as ONNX, run in ONNX Runtime to check it
and time it (search/deploy.py). Trained weights come from a final training's
checkpoint (`--checkpoint runs/.../model-seed0.pt`; `--int8` adds a quantized file
and both test accuracies). A study's trial has no trained weights: its ONNX file
holds the architecture with fresh weights, for its graph and its latency only
(`--front --onnx DIR`: one file per front trial).

The file wraps the architecture (DESIGN.md's format, under "architecture")
with what it cost, how it was trained and how it scored, so `models.load_arch`
and `python -m search.train` both read it directly.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from models import build_model
from models.complexity import DTYPE_BYTES
from search import deploy, latency
from search.cli import Parser, add_study_args, load_existing, parse_bytes, parse_count
from search.data import DataError, load_dataset
from search.final import load_checkpoint
from search.front import Within, best_within, front_rows, pareto_front
from search.records import best_trial, export_trial, trial_arch, write_json
from search.study import StudyError

FRONT_FORMAT = "budget-nas-front/1"


def select_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    if number is None:
        best = best_trial(study)
        if best is None:
            raise StudyError(f"study {study.study_name!r} has no completed trial yet")
        return best
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise StudyError(f"study {study.study_name!r} has no trial {number} (it has {len(trials)})")
    t = trials[number]
    if t.state != TrialState.COMPLETE:
        raise StudyError(
            f"trial {number} is {t.state.name}, not COMPLETE; only completed "
            "trials have a final validation accuracy to export"
        )
    return t


def print_front(rows: list[dict], within: Within) -> None:
    print(f"front of validation accuracy against parameters ({within.describe()}):")
    timed = any("onnx_ms" in r for r in rows)
    print(
        f"{'trial':>6} {'params':>11} {'MACs':>13} {'fp32 bytes':>11} {'fp16 bytes':>11} "
        f"{'activations':>11} " + (f"{'ORT ms':>7} " if timed else "") + "val acc   final training"
    )
    for r in rows:
        print(
            f"{r['trial']:>6} {r['params']:>11,} {r['macs']:>13,} {r['bytes_fp32']:>11,} "
            f"{r['bytes_fp16']:>11,} {r['activation_bytes_fp32']:>11,} "
            + (f"{r['onnx_ms']:>7.2f} " if timed else "")
            + f"{r['validation']:>7.4f}   {r['train']}"
        )


def untrained_onnx(trial: FrozenTrial, path: Path) -> dict[str, object]:
    """A trial's architecture with fresh weights as ONNX (its graph and latency only)."""
    spec = trial_arch(trial)
    model = deploy.Normalized(build_model(spec), [0.0] * spec.in_channels, [1.0] * spec.in_channels)
    deploy.to_onnx(model, spec, path)
    out = {"file": str(path), "trained": False, "latency_ms": round(deploy.latency_ms(path), 3)}
    return out | torch_latency(spec)


def torch_latency(spec) -> dict[str, float]:
    """The search's own latency figures (PyTorch eager, 1 thread): measured here, and
    predicted when this CPU's table is cached (search/latency.py)."""
    out = {"torch_ms": round(latency.model_ms(spec, 1), 3)}
    with contextlib.suppress(FileNotFoundError):
        out["torch_predicted_ms"] = round(latency.load_table(1, build=False).predict(spec), 3)
    return out


def trained_onnx(
    checkpoint: Path, path: Path, int8: bool, dataset: str | None, data_dir: str | None
) -> dict[str, object]:
    """A final training's network as ONNX, checked against PyTorch on test images and timed;
    with `int8`, also quantized, with both test accuracies on the whole test split."""
    deploy.require()
    try:
        model, ckpt = load_checkpoint(checkpoint)
    except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, pickle.UnpicklingError):  # torch's text suggests unsafe loading
            why = "unreadable as a weights-only torch file"
        raise StudyError(f"{checkpoint}: not a checkpoint of search.train ({why})") from None
    name = dataset or ckpt.get("dataset")
    if name is None:
        raise StudyError(f"{checkpoint} does not name its dataset; pass --dataset")
    spec = model.spec
    net = deploy.Normalized(model, ckpt["normalization"]["mean"], ckpt["normalization"]["std"])
    deploy.to_onnx(net, spec, path)
    data = load_dataset(name, data_dir)
    test_x, test_y = data.test_x.float() / 255, data.test_y
    out: dict[str, object] = {
        "file": str(path),
        "trained": True,
        "checkpoint": str(checkpoint),
        "dataset": name,
        "max_abs_difference": deploy.max_abs_difference(path, net, test_x[:256]),
        "compared_on": min(256, len(test_y)),
        "latency_ms": round(deploy.latency_ms(path), 3),
        **torch_latency(spec),
        "test_images": len(test_y),
        "test_accuracy": deploy.accuracy(path, test_x, test_y),
    }
    if int8:
        quantized = path.with_name(path.stem + "-int8.onnx")
        g = torch.Generator().manual_seed(0)
        calibration = data.train_x[torch.randperm(len(data.train_y), generator=g)[:512]]
        deploy.quantize_int8(path, quantized, calibration.float() / 255)
        out["int8"] = {
            "file": str(quantized),
            "bytes": quantized.stat().st_size,
            "calibration_images": len(calibration),
            "latency_ms": round(deploy.latency_ms(quantized), 3),
            "test_accuracy": deploy.accuracy(quantized, test_x, test_y),
        }
    return out


def print_onnx(o: dict) -> None:
    size = Path(o["file"]).stat().st_size
    print(f"wrote {o['file']} ({size:,} bytes): ONNX Runtime latency {o['latency_ms']:.2f} ms "
          "(batch 1, 1 thread, median of 100)")  # fmt: skip
    predicted = o.get("torch_predicted_ms")
    table = f", {predicted:.2f} ms predicted by the latency table" if predicted else ""
    print(f"  PyTorch eager on this CPU: {o['torch_ms']:.2f} ms measured{table}")
    if o["trained"]:
        print(f"  ONNX Runtime vs PyTorch on {o['compared_on']} test images: max abs difference "
              f"{o['max_abs_difference']:.2e}; test accuracy {o['test_accuracy']:.4f} "
              f"on {o['test_images']:,} {o['dataset']} test images")  # fmt: skip
    if "int8" in o:
        q = o["int8"]
        print(f"wrote {q['file']} ({q['bytes']:,} bytes, int8 weights and activations, "
              f"calibrated on {q['calibration_images']} training images): test accuracy "
              f"{q['test_accuracy']:.4f} (fp32 {o['test_accuracy']:.4f}), latency "
              f"{q['latency_ms']:.2f} ms")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m search.export", description=__doc__.split("\n")[0])
    add_study_args(ap, required=False)
    ap.add_argument("--trial", type=int, help="trial number (default: the best)")
    ap.add_argument("--budget", type=parse_count, help="the best trial within this many params")
    ap.add_argument("--max-macs", type=parse_count, help="... and this many MACs per image")
    ap.add_argument("--max-bytes", type=parse_bytes, help="... and weights this size: 4MB")
    ap.add_argument(
        "--max-activation-bytes", type=parse_bytes, help="... and a peak of activations this size"
    )
    ap.add_argument("--weight-dtype", default="fp32", choices=list(DTYPE_BYTES))
    ap.add_argument("--front", action="store_true", help="every trial on the accuracy/size front")
    ap.add_argument("-o", "--output", help="file to write (default: print to stdout)")
    ap.add_argument("--onnx", help="also write the network as ONNX (a folder with --front)")
    ap.add_argument("--checkpoint", help="with --onnx: a final training's trained network")
    ap.add_argument("--int8", action="store_true", help="with --checkpoint: also int8, tested")
    ap.add_argument("--dataset", help="with --checkpoint: default: the one it was trained on")
    ap.add_argument("--data-dir", help="where datasets live (default $NAS_DATA_DIR or ./data)")
    args = ap.parse_args(argv)
    if args.checkpoint is not None:
        return export_checkpoint(ap, args)
    if args.study_name is None:
        ap.error("--study-name is required (or --checkpoint with --onnx)")
    if args.int8:
        ap.error("--int8 quantizes a trained network: give --checkpoint")
    within = Within(
        args.budget, args.max_macs, args.max_bytes, args.weight_dtype, args.max_activation_bytes
    )
    if args.trial is not None and (args.front or within != Within(weight_dtype=args.weight_dtype)):
        ap.error("--trial names one trial; it does not go with --front or limits")
    try:
        study = load_existing(args)
        trials = study.get_trials(deepcopy=False)
        if args.front:
            front = pareto_front(trials, within)
            if not front:
                best_within(trials, within)  # raises, naming the smallest trial
            rows = front_rows(front, study.study_name, args.storage)
            if args.onnx:
                for row, t in zip(rows, front, strict=True):
                    onnx = untrained_onnx(t, Path(args.onnx) / f"trial-{t.number}.onnx")
                    row["onnx"], row["onnx_ms"] = onnx["file"], onnx["latency_ms"]
            data = {
                "format": FRONT_FORMAT,
                "study_name": study.study_name,
                "within": within.describe(),
                "rows": rows,
                "front": [export_trial(study, t) for t in front],
            }
        else:
            chosen = (
                best_within(trials, within)
                if args.trial is None
                else select_trial(study, args.trial)
            )
            data = export_trial(study, chosen)
            if args.onnx:
                data["onnx"] = untrained_onnx(chosen, Path(args.onnx))
    except (StudyError, deploy.DeployError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "onnx" in data:
        print_onnx(data["onnx"])
        print(f"  untrained weights (the architecture's graph and latency): final-train trial "
              f"{data['trial']} with search.train, then export its model-seed0.pt with "
              "--checkpoint --onnx", file=sys.stderr)  # fmt: skip
    if args.front and args.onnx:
        print(f"wrote {len(data['rows'])} ONNX files to {args.onnx} (untrained weights: "
              "the graphs and their latency)")  # fmt: skip
    if args.front:
        print_front(data["rows"], within)
    if args.output:
        write_json(Path(args.output), data)
        what = (
            f"{len(data['front'])} front trials"
            if args.front
            else f"trial {data['trial']}, {data['params']:,} params, "
            f"validation accuracy {data['validation']['accuracy']:.4f}"
        )
        print(f"wrote {args.output}: {what}")
    elif not args.front:
        print(json.dumps(data, indent=2))
    return 0


def export_checkpoint(ap: Parser, args) -> int:
    """`--checkpoint X --onnx Y [--int8]`: a trained network to ONNX, checked and tested."""
    study_flags = (args.study_name, args.trial, args.budget, args.max_macs, args.max_bytes)
    if args.front or any(v is not None for v in study_flags) or args.max_activation_bytes:
        ap.error("--checkpoint exports a trained network; it does not go with a study's flags")
    if not args.onnx:
        ap.error("--checkpoint goes with --onnx FILE")
    try:
        data = trained_onnx(
            Path(args.checkpoint), Path(args.onnx), args.int8, args.dataset, args.data_dir
        )
    except (StudyError, deploy.DeployError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_onnx(data)
    if args.output:
        write_json(Path(args.output), data)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
