"""The network a user ships: ONNX from a final training's checkpoint, checked in ONNX
Runtime against PyTorch, timed, and quantized to int8 with its test accuracy."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from models import build_model
from models.presets import PRESETS
from search import deploy, export
from search.data import load_dataset
from search.final import save_checkpoint

if os.environ.get("CI") != "true":  # in CI the extra is installed (.[dev] has it): never skip
    pytest.importorskip("onnxruntime", reason="the deploy extra: pip install -e '.[deploy]'")


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint as search.train writes it: resnet-tiny on the synthetic dataset, its
    BatchNorm statistics moved off their initial values so that folding them matters."""
    spec = PRESETS["resnet-tiny"]
    model = build_model(spec)
    data = load_dataset("synthetic")
    with torch.no_grad():  # a few training-mode passes: running statistics of real data
        for i in range(0, 256, 64):
            model(data.train_x[i : i + 64].float() / 255)
    path = tmp_path / "model-seed0.pt"
    save_checkpoint(path, model.eval(), spec, data, {"seed": 0, "test_accuracy": 0.1})
    return path, model, data


def test_a_trained_network_exports_checked_timed_and_quantized(checkpoint, tmp_path, capsys):
    path, model, data = checkpoint
    onnx = tmp_path / "out" / "model.onnx"
    argv = ["--checkpoint", str(path), "--onnx", str(onnx), "--int8", "-o", str(tmp_path / "r")]
    assert export.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r").read_text())
    assert report["dataset"] == "synthetic" and report["trained"]
    assert report["max_abs_difference"] < 1e-4 and report["compared_on"] == 256
    assert report["latency_ms"] > 0
    # ONNX Runtime's accuracy is PyTorch's on the same normalised test images
    x = (data.test_x.float() / 255 - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(
        data.std
    ).view(1, -1, 1, 1)
    with torch.no_grad():
        torch_acc = float((model.eval()(x).argmax(1) == data.test_y).float().mean())
    assert abs(report["test_accuracy"] - torch_acc) <= 1 / len(data.test_y)
    q = report["int8"]
    assert q["bytes"] < onnx.stat().st_size / 2 and 0 <= q["test_accuracy"] <= 1
    assert "max abs difference" in out and "int8" in out and "test accuracy" in out


def test_a_study_trial_and_its_front_export_untrained_with_a_note(finished, tmp_path, capsys):
    base = ["--storage", finished.url, "--study-name", finished.name]
    assert export.main([*base, "--onnx", str(tmp_path / "best.onnx")]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out[captured.out.index("{") :])
    assert data["onnx"]["trained"] is False and (tmp_path / "best.onnx").exists()
    assert "untrained weights" in captured.err and "--checkpoint" in captured.err
    assert export.main([*base, "--front", "--onnx", str(tmp_path / "front")]) == 0
    out = capsys.readouterr().out
    assert "ORT ms" in out and "ONNX files" in out
    assert len(list((tmp_path / "front").glob("trial-*.onnx"))) >= 1


def test_bad_input_is_one_line(checkpoint, tmp_path, capsys, monkeypatch) -> None:
    path, _, _ = checkpoint
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert export.main(["--checkpoint", str(junk), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "not a checkpoint of search.train" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(path)])
    assert e.value.code == 2 and "--onnx" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the extra not installed
    assert export.main(["--checkpoint", str(path), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {deploy.INSTALL}"
