"""The run report's JSON: its schema (versions, timings, numbers as numbers, the threshold's verdict), written atomically."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import feeds, input_layer, mlp, mlp_reference, outlier_feeds, run

import graphquant
from graphquant.analysis.data import DEFAULT_BATCH_SIZE
from graphquant.cli import main
from graphquant.errors import OutputError
from graphquant.report import OUTLIER_RATIO, SCHEMA_VERSION, Report
from graphquant.validate import DEFAULT_MIN_COSINE


@pytest.fixture(scope="module")
def report():
    rng = np.random.default_rng(0)
    model = mlp(rng)
    data = feeds(rng, batches=2, rows=8, features=16)
    result = graphquant.optimize(model, calibration=data, show_progress=False)
    reference = np.concatenate([mlp_reference(model, feed["x"]) for feed in data])
    assert result.report.outputs["y"].cosine > 0.99 and np.abs(reference).max() > 0
    return result.report


def test_save_json_replaces_a_regular_file_atomically(report, tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old\n")
    report.save_json(path)
    assert json.loads(path.read_text()) == json.loads(report.to_json())
    assert json.loads(path.read_text())["outputs"]["y"]["cosine"] == pytest.approx(report.outputs["y"].cosine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.usefixtures("device_files")
def test_save_json_refuses_a_directory_or_a_device(report, tmp_path):
    with pytest.raises(OutputError, match="cannot write the report there: it is a directory"):
        report.save_json(tmp_path)
    with pytest.raises(OutputError, match="cannot write the report there: it is a character device"):
        report.save_json("/dev/full")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert list(tmp_path.iterdir()) == []


def no_constants(name: str) -> None:
    raise AssertionError(f"{name} in the JSON")


def strings(value) -> list[str]:
    """Every string value in a JSON document."""
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The mlp quantized by w8a8 through the CLI with --report: paths, the calibration rows, and the parsed JSON."""
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    model_path = folder / "model.onnx"
    ir.save(mlp(rng), str(model_path))
    x = rng.standard_normal((20, 16)).astype(np.float32)
    np.savez(folder / "calib.npz", x=x)
    argv = ["optimize", str(model_path), "-o", str(folder / "out.onnx"), "--recipe", "w8a8"]
    argv += ["--calib", str(folder / "calib.npz"), "--report", str(folder / "report.json")]
    assert main(argv) == 0
    text = (folder / "report.json").read_text()
    return folder, x, json.loads(text, parse_constant=no_constants)


def test_the_json_names_its_schema_versions_options_and_inputs(cli_run):
    folder, x, data = cli_run
    assert data["schema_version"] == SCHEMA_VERSION
    versions = {"graphquant": graphquant.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__}
    assert {name: data["versions"][name] for name in versions} == versions
    assert data["options"] == {"recipe": "w8a8", "min_cosine": DEFAULT_MIN_COSINE, "keep_failed": False}
    assert data["inputs"]["model"] == str((folder / "model.onnx").resolve())
    assert data["inputs"]["calibration"] == str((folder / "calib.npz").resolve())
    batches = -(-len(x) // DEFAULT_BATCH_SIZE)
    assert data["data"]["calibration"] == {"batches": batches, "samples": len(x)}
    assert data["data"]["validation"] == {"batches": batches, "samples": len(x)}


def test_the_json_times_every_stage_in_seconds(cli_run):
    _, _, data = cli_run
    timings = data["timings"]
    stages = [timings[name] for name in ("load", "validation", "save")]
    steps = [step["seconds"] for step in timings["passes"] + timings["lowering"]]
    assert all(isinstance(value, float) and value >= 0 for value in stages + steps)
    assert [step["pass"] for step in timings["passes"]][-3:] == ["quantize", "RemoveUnusedNodes", "TopologicalSort"]
    assert [step["pass"] for step in timings["lowering"]] == ["QdqLowering", "UnsignedWeights"]
    assert timings["total"] == pytest.approx(sum(stages) + sum(steps))


def test_the_json_has_numbers_as_numbers_and_an_identical_output_as_null_with_a_reason(cli_run):
    _, _, data = cli_run
    assert all(s.lower().strip("+-") not in ("inf", "infinity", "nan") for s in strings(data))
    model = mlp(np.random.default_rng(0))
    feeds_ = [{"x": np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)}]
    same = graphquant.compare_models(model, model, feeds_)["y"]  # the same model twice in onnxruntime: no error
    assert same.sqnr_db == math.inf
    report = Report("w8a8", "qdq", [], [], 1, 1, outputs={"y": same}, min_cosine=DEFAULT_MIN_COSINE)
    output = json.loads(report.to_json(), parse_constant=no_constants)["outputs"]["y"]
    assert (output["sqnr_db"], output["sqnr_db_reason"]) == (None, "no error: the tensors are identical")
    assert (output["cosine"], output["within_tolerance"]) == (pytest.approx(1.0), True)


def test_within_tolerance_is_the_validation_thresholds_verdict():
    rng = np.random.default_rng(0)
    model = mlp(rng)
    data = feeds(rng, batches=2, rows=8, features=16)
    first = graphquant.optimize(model, "w8a8", calibration=data, show_progress=False)
    reference = np.concatenate([run(model, feed)[0] for feed in data]).astype(np.float64).ravel()
    got = np.concatenate([run(first.model, feed)[0] for feed in data]).astype(np.float64).ravel()
    cosine = float(reference @ got / np.sqrt((reference @ reference) * (got @ got)))
    assert 0.99 < cosine < 1.0  # lossy: validate.py's rtol/atol check fails every element of this run
    assert not first.report.outputs["y"].within_tolerance
    for threshold, within in ((cosine - 1e-5, True), (min(cosine + 1e-5, 1.0), False)):
        result = graphquant.optimize(
            model, "w8a8", calibration=data, show_progress=False, min_cosine=threshold, keep_failed=True
        )
        report = result.report.to_dict()
        assert report["outputs"]["y"]["within_tolerance"] is within
        assert (report["validation"]["min_cosine"], report["validation"]["passed"]) == (threshold, within)
        assert report["validation"]["tolerance"] == "min_cosine" and report["options"]["min_cosine"] == threshold


def test_the_json_gives_each_layers_input_channel_range_from_the_calibration_data():
    rng = np.random.default_rng(0)
    data = outlier_feeds(0)
    result = graphquant.optimize(input_layer(rng), "w8a8", calibration=data, show_progress=False)
    (layer,) = result.report.to_dict()["layers"]
    x = np.concatenate([feed["x"] for feed in data])
    absmax = np.abs(x).max(axis=0)
    expected = int(np.count_nonzero(absmax > OUTLIER_RATIO * np.median(absmax)))
    assert layer["activation"] == {
        "tensor": "x",
        "min": pytest.approx(float(x.min())),
        "max": pytest.approx(float(x.max())),
        "channels": 16,
        "outlier_channels": expected,
    }
    assert expected == 3


def test_an_unvalidated_run_says_why():
    result = graphquant.optimize(mlp(np.random.default_rng(0)), "weight-only", show_progress=False, wbits=8)
    report = result.report.to_dict()
    assert report["validation"] == {
        "validated": False,
        "reason": "no calibration or validation data, or nothing was quantized",
    }
    assert report["outputs"] == {} and "validation" not in report["timings"] and "data" in report
