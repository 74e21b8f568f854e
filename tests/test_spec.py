"""ArchSpec: lossless JSON, and every invalid field rejected by name."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings

from models import ArchSpec, load_arch
from models.presets import PRESETS

from strategies import arch_specs

DESIGN = PRESETS["resnet18-2111"].to_dict()


@settings(max_examples=200, deadline=None)
@given(arch_specs())
def test_json_round_trip_is_lossless(spec: ArchSpec) -> None:
    text = spec.to_json()
    again = ArchSpec.from_json(text)
    assert again == spec
    assert again.to_json() == text
    assert hash(again) == hash(spec)


def test_format_matches_design_md(examples_dir) -> None:
    assert json.loads((examples_dir / "resnet18-2111.json").read_text()) == DESIGN
    assert list(DESIGN) == [
        "format",
        "input",
        "num_classes",
        "stem",
        "stages",
        "pool",
        "activation",
        "dropout",
    ]


def mutate(path: tuple, value) -> dict:
    data = copy.deepcopy(DESIGN)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


BAD = [
    (("format",), "resnet-arch/2", "format"),
    (("input", "channels"), 0, "input.channels"),
    (("input", "channels"), 1.5, "input.channels"),
    (("input", "size"), -4, "input.size"),
    (("input", "size"), KeyError, "input.size"),
    (("num_classes",), 1, "num_classes"),
    (("num_classes",), "10", "num_classes"),
    (("stem", "channels"), 0, "stem.channels"),
    (("stem", "kernel"), 4, "stem.kernel"),
    (("stages",), [], "stages"),
    (("stages",), [DESIGN["stages"][0]] * 6, "stages"),
    (("stages",), {"blocks": 1}, "stages"),
    (("stages", 0, "blocks"), 0, "stages[0].blocks"),
    (("stages", 1, "channels"), -8, "stages[1].channels"),
    (("stages", 2, "kernel"), 2, "stages[2].kernel"),
    (("stages", 3, "skip_kernel"), 0, "stages[3].skip_kernel"),
    (("stages", 3, "skip_kernel"), True, "stages[3].skip_kernel"),
    (("stages", 0, "width"), 64, "stages[0]"),
    (("pool",), 5, "pool"),
    (("pool",), 0, "pool"),
    (("activation",), "tanh", "activation"),
    (("dropout",), 1.0, "dropout"),
    (("dropout",), -0.1, "dropout"),
    (("dropout",), float("nan"), "dropout"),
    (("extra",), 1, "extra"),
]


@pytest.mark.parametrize(("path", "value", "field"), BAD)
def test_invalid_field_is_named(path, value, field) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ArchSpec.from_dict(mutate(path, value))


def test_too_many_stages_for_a_small_input() -> None:
    data = mutate(("input", "size"), 8)
    data["pool"] = 1
    data["stages"] = DESIGN["stages"] + [DESIGN["stages"][-1]]  # 8 -> 4 -> 2 -> 1 -> ?
    with pytest.raises(ValueError, match=r"stages\[4\].*at most 4 stages"):
        ArchSpec.from_dict(data)


def test_checks_survive_python_O() -> None:
    code = (
        "from models import ArchSpec, StageSpec\n"
        "try:\n    ArchSpec(stages=(StageSpec(1, 8, kernel=2),))\n"
        "except ValueError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True
    )
    assert "stages[0].kernel must be odd" in out.stdout


def test_load_arch_accepts_bare_and_wrapped(tmp_path) -> None:
    bare, wrapped = tmp_path / "a.json", tmp_path / "b.json"
    bare.write_text(json.dumps(DESIGN))
    wrapped.write_text(json.dumps({"architecture": DESIGN, "params": 4977226}))
    assert load_arch(bare) == load_arch(wrapped) == PRESETS["resnet18-2111"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_load_arch_errors_name_the_file(tmp_path, content, message) -> None:
    path = tmp_path / "arch.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_arch(path)
    assert str(path) in str(err.value)
