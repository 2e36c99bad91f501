"""Pieces the benchmark table scripts share: a table row, progress lines, file-name slugs, a calibration reader."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class Row:
    """One model of the table: where it is, how long quantization took, or why it is missing."""

    label: str
    path: Path | None = None
    quant_s: float | None = None
    error: str | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # Wall seconds per stage of the run that built it (where the builder reports them).
    stages: dict[str, float] = dataclasses.field(default_factory=dict)


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def publish(path: Path, header: str, table: str, started: float) -> None:
    """Print the header and table, write them to ``path`` and log it with the run's total time."""
    text = f"{header}\n\n{table}\n"
    print(text)
    path.write_text(text, encoding="utf-8")
    log(f"wrote {path}; total {time.perf_counter() - started:.0f}s")


def ratio(numerator: float | None, denominator: float | None) -> str:
    """numerator / denominator as '1.23x', or a dash."""
    return "—" if not numerator or not denominator else f"{numerator / denominator:.2f}x"


def slug(label: str) -> str:
    """A file-name-safe version of a label."""
    keep = "".join(c if c.isalnum() else "_" for c in label.lower())
    return "_".join(part for part in keep.split("_") if part)


def make_reader(feeds: list[dict[str, np.ndarray]]) -> Any:
    """An onnxruntime CalibrationDataReader over the calibration feeds (rewindable)."""
    from onnxruntime.quantization import CalibrationDataReader

    class ListReader(CalibrationDataReader):
        """Hands out the feeds one by one."""

        def __init__(self) -> None:
            self._iter = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._iter, None)

        def rewind(self) -> None:
            self._iter = iter(feeds)

    return ListReader()
