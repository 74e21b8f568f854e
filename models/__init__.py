"""The architecture: spec, builder, closed-form counters. Never imports search/."""

from __future__ import annotations

import json
from pathlib import Path

from models.complexity import count_macs, count_params
from models.resnet import build_model
from models.spec import ArchSpec, StageSpec


def load_arch(path: str | Path) -> ArchSpec:
    """Read a bare architecture or an export that wraps it under "architecture".

    Raises ValueError (with the file named) for a missing file, broken JSON or
    an invalid spec, so CLIs can turn every bad input into a one-line error.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an architecture JSON file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "architecture" in data:
        data = data["architecture"]
    try:
        return ArchSpec.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


__all__ = ["ArchSpec", "StageSpec", "build_model", "count_macs", "count_params", "load_arch"]
