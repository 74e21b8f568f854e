"""What a user ships: an ONNX file of the trained network, checked in ONNX Runtime, and
its int8 version by ONNX Runtime's static quantization.

The file takes images as float32 N x C x H x W in [0, 1] (pixels / 255) and returns
logits: the dataset's normalisation is the graph's first layer, so a deployment
needs nothing of this project. torch's exporter folds each BatchNorm into its conv.
The ONNX tools are an extra (`pip install -e .[deploy]`); without them every
function here raises DeployError saying so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import ArchSpec

INSTALL = "the ONNX tools are not installed: pip install -e '.[deploy]' (onnx, onnxruntime)"


class DeployError(Exception):
    """A missing extra or an export that cannot be made: one line for the user."""


def require() -> Any:
    """onnxruntime, or DeployError naming the extra to install."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  torch's exporter needs it
    except ImportError:
        raise DeployError(INSTALL) from None
    return onnxruntime


class Normalized(nn.Module):
    """The network with the dataset's normalisation in front: images in [0, 1] in."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def to_onnx(model: nn.Module, spec: ArchSpec, path: Path) -> None:
    """Write `model` (eval mode, on the CPU; any batch size) as one ONNX file."""
    require()
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.rand(2, spec.in_channels, spec.input_size, spec.input_size)
    torch.onnx.export(
        model.eval().cpu(),
        (x,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,  # one file: these networks are megabytes, not gigabytes
        dynamo=True,
        verbose=False,
    )


def session(path: Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with `threads` threads."""
    ort = require()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: Any, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Logits of float images in [0, 1], in batches."""
    out = [
        sess.run(None, {"images": images[i : i + batch].numpy()})[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out)


def max_abs_difference(path: Path, model: nn.Module, images: torch.Tensor) -> float:
    """Largest |ONNX Runtime - PyTorch| over the logits of `images` (float, [0, 1])."""
    with torch.no_grad():
        reference = model.eval()(images).numpy()
    return float(np.abs(run(session(path), images) - reference).max())


def latency_ms(path: Path, threads: int = 1, warmup: int = 20, repeats: int = 100) -> float:
    """Median milliseconds of one image (batch 1) in ONNX Runtime with `threads` threads."""
    sess = session(path, threads)
    shape = [1 if isinstance(d, str) else d for d in sess.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {"images": x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"images": x})
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def accuracy(path: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of the ONNX file on float images in [0, 1]."""
    predicted = run(session(path), images).argmax(1)
    return float((torch.from_numpy(predicted) == labels).float().mean())


def quantize_int8(path: Path, out: Path, calibration: torch.Tensor, batch: int = 64) -> None:
    """int8 weights (per channel) and uint8 activations in QDQ form, by ONNX Runtime's
    static quantization, calibrated on `calibration` (training images, float [0, 1])."""
    require()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = (
                {"images": calibration[i : i + batch].numpy()}
                for i in range(0, len(calibration), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = out.with_name(out.stem + ".prepared.onnx")
    try:
        quant_pre_process(str(path), str(prepared))
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)
