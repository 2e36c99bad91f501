"""The same model, data and options give a byte-identical output file."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import graphquant

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(("recipe", "target"), [("w8a8", "qdq"), ("outliertune", "ort-cpu"), ("os-plus", "qdq")])
def test_two_runs_write_identical_bytes(tmp_path: Path, recipe: str, target: str) -> None:
    """Quantizing the toy transformer twice gives the same file, byte for byte."""
    outputs = []
    for run in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = graphquant.optimize(
                graphquant.load(EXAMPLES / "toy_transformer.onnx"),
                recipe,
                calibration=EXAMPLES / "toy_calib.npz",
                target=target,
                show_progress=False,
            )
        outputs.append(graphquant.save(result, tmp_path / f"run{run}.onnx").read_bytes())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) > 50_000
