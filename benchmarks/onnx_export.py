"""A final-trained network as a user ships it: ONNX, checked, timed, and int8.

python -m benchmarks.onnx_export ARCH.json [--epochs 3] [--dataset fashion-mnist]

Final-trains the architecture with its own settings (`python -m search.train ARCH
--epochs N`, seed 0), then runs what a user runs to ship it (`python -m
search.export --checkpoint .../model-seed0.pt --onnx model.onnx --int8`): ONNX
Runtime against PyTorch on 256 test images (max abs difference), latencies
(ONNX Runtime, and PyTorch eager measured and predicted by the latency table),
and the test accuracy of the fp32 and the int8 file on the whole test split.
Both commands run as subprocesses, as a user runs them. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import save


def run(cmd: list[str], cwd: str) -> None:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=cwd, text=True, capture_output=True)
    print(done.stdout[-2000:], done.stderr[-2000:], flush=True)
    if done.returncode != 0:
        raise SystemExit(f"exited {done.returncode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch", help="an architecture or export JSON (its training settings kept)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--dataset", default="fashion-mnist")
    args = ap.parse_args()
    arch = str(Path(args.arch).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train = [sys.executable, "-m", "search.train", arch, "--epochs", str(args.epochs)]
        run([*train, "--dataset", args.dataset, "--no-progress", "-o", "final"], tmp)
        trained = time.perf_counter() - t0
        result = json.loads((Path(tmp) / "final" / "result.json").read_text())
        export = [sys.executable, "-m", "search.export", "--checkpoint"]
        export += ["final/model-seed0.pt", "--onnx", "model.onnx", "--int8", "-o", "onnx.json"]
        run(export, tmp)
        onnx = json.loads((Path(tmp) / "onnx.json").read_text())
    record = {
        "arch": json.loads(Path(arch).read_text()),
        "dataset": args.dataset,
        "epochs": args.epochs,
        "train_seconds": round(trained, 1),
        "pytorch_test_accuracy": result["test_accuracy"],
        "onnx": onnx,
    }
    print(f"wrote {save('onnx_export', record)}")


if __name__ == "__main__":
    main()
