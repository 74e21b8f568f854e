"""python -m models.summary, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from models.summary import main

from conftest import ROOT


def summary(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "models.summary", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_design_example_prints_its_count(examples_dir) -> None:
    out = summary(str(examples_dir / "resnet18-2111.json"))
    assert out.returncode == 0, out.stderr
    assert "4,977,226" in out.stdout
    assert "stage4" in out.stdout and "512x4x4" in out.stdout
    assert "activations (peak at inference, batch 1, at stage1 block 1): 786,432" in out.stdout


def test_json_output(examples_dir, capsys) -> None:
    assert main([str(examples_dir / "resnet18-2111.json"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 4_977_226 and data["macs"] == 328_930_304
    assert data["activation_bytes"] == {"fp32": 786_432, "fp16": 393_216, "int8": 196_608}


def test_bad_inputs_are_one_line_errors(tmp_path, capsys) -> None:
    """In-process: main() returns the exit code (the subprocess smoke test is above)."""
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    invalid = tmp_path / "invalid.json"
    invalid.write_text(
        json.dumps(
            {
                "format": "resnet-arch/1",
                "input": {"channels": 3, "size": 32},
                "num_classes": 10,
                "stem": {"channels": 8, "kernel": 3},
                "stages": [{"blocks": 1, "channels": 8, "kernel": 4}],
                "pool": 1,
            }
        )
    )
    for path, message in [
        (tmp_path / "missing.json", "no such file"),
        (broken, "not valid JSON"),
        (invalid, "stages[0].kernel"),
    ]:
        assert main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
