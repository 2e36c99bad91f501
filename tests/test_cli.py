"""The `graphquant` command line, run in-process through main() (and once as the installed script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from builders import build, mlp, mlp_reference, outlier_activations, run, save_model, weights

import graphquant
from graphquant.cli import main
from graphquant.validate import DEFAULT_MIN_COSINE

SCRIPT = Path(sys.executable).parent / "graphquant"


@pytest.fixture
def files(tmp_path):
    """A saved mlp model, and .npz calibration data for it."""
    rng = np.random.default_rng(0)
    model = mlp(rng)
    model_path = tmp_path / "model.onnx"
    save_model(model, model_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((32, 16)).astype(np.float32))
    return model, model_path, calib


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_optimize_writes_the_model_and_prints_the_table(files, tmp_path, capsys):
    model, model_path, calib = files
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "--calib", str(calib)]) == 0
    stdout = capsys.readouterr().out
    assert "recipe w8a8 -> target qdq" in stdout
    assert "layers quantized: 2   kept float: 0" in stdout
    assert "output y: cosine 0.99" in stdout
    assert f"wrote {out}" in stdout
    x = np.load(calib)["x"][:8]
    (y,) = run(graphquant.load(out), {"x": x})
    reference = mlp_reference(model, x)
    assert np.abs(y - reference).max() < 0.05 * np.abs(reference).max()
    assert "QuantizeLinear" in {node.op_type for node in graphquant.load(out).graph}


def test_optimize_report_is_valid_json(files, tmp_path, capsys):
    _, model_path, calib = files
    report = tmp_path / "report.json"
    code = main(
        ["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--calib", str(calib), "--report", str(report)]
    )
    assert code == 0
    assert f"wrote {report}" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert (data["recipe"], data["target"], data["passes"]) == ("w8a8", "qdq", ["quantize"])
    assert [layer["op_type"] for layer in data["layers"]] == ["MatMul", "Gemm"]
    assert all(layer["status"] == "quantized" for layer in data["layers"])
    assert data["outputs"]["y"]["cosine"] > 0.99 and data["outputs"]["y"]["sqnr_db"] > 25
    assert data["bytes_after"] < data["bytes_before"]


def test_optimize_with_wbits_and_passes(files, tmp_path, capsys):
    _, model_path, calib = files
    report = tmp_path / "report.json"
    args = ["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(calib), "--wbits", "4"]
    assert main([*args, "--passes", "quantize", "--target", "qdq", "--report", str(report)]) == 0
    assert {layer["scheme"] for layer in json.loads(report.read_text())["layers"]} == {
        "W4 per-channel, A8 per-tensor minmax"
    }


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "inspect", str(tmp_path / "absent.onnx")]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback (most recent call last)" in stderr
    assert "InvalidModelError" in stderr
    assert error_lines(stderr)[-1].startswith("graphquant: error:")


def test_installed_script_exit_code(files, tmp_path):
    _, model_path, _ = files
    assert SCRIPT.exists()
    before = model_path.read_bytes()
    completed = subprocess.run(
        [str(SCRIPT), "optimize", str(model_path), "-o", str(model_path), "--calib", "random"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1
    assert error_lines(completed.stderr) == [error_lines(completed.stderr)[0]]
    assert completed.stderr.startswith("graphquant: error:")
    assert model_path.read_bytes() == before


def test_inspect_without_calibration(files, capsys):
    _, model_path, _ = files
    assert main(["inspect", str(model_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    histogram = {line.split()[0]: int(line.split()[1]) for line in lines[1:5]}
    assert lines[0] == "op histogram:"
    assert histogram == {"MatMul": 1, "Add": 1, "Relu": 1, "Gemm": 1}
    assert "MatMul/Gemm/Conv layers: 2" in lines
    assert sum("quantizable" in line for line in lines) == 2
    assert not any(line.startswith("activations") for line in lines)


OUTLIERS = """
<ir_version: 8, opset_import: ["" : 17]>
outliers (float[N, 16] x) => (float[N, 8] y) {
  [wide] h = MatMul(x, w1)
  [narrow] y = MatMul(h, w2)
}
"""


def test_inspect_with_calibration_prints_outlier_counts(tmp_path, capsys):
    rng = np.random.default_rng(1)
    model = build(OUTLIERS, {"w1": weights(rng, 16, 16, scale=0.01), "w2": weights(rng, 16, 8)})
    model_path = tmp_path / "outliers.onnx"
    save_model(model, model_path)
    calib = tmp_path / "calib.npz"
    x = outlier_activations(rng, 64, 16, outliers=2)
    np.savez(calib, x=x)
    assert main(["inspect", str(model_path), "--calib", str(calib)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("activations (outlier: channel max|x| > 6x the median channel's):")
    rows = {line.split()[0]: line.split() for line in lines[header + 2 :]}
    wide = rows["wide"]
    assert wide[3] == "2/16"  # the two planted outlier channels
    assert float(wide[1]) == pytest.approx(x.min(), rel=1e-2) and float(wide[2]) == pytest.approx(x.max(), rel=1e-2)
    median = np.median(np.abs(x).max(axis=0))
    assert float(wide[4]) == pytest.approx(np.abs(x).max() / median, rel=0.05)
    assert rows["narrow"][3].endswith("/16")


def test_validate_compares_two_models(files, tmp_path, capsys):
    _, model_path, calib = files
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "--calib", str(calib)]) == 0
    capsys.readouterr()
    assert main(["validate", str(model_path), str(out), "--calib", str(calib)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["output", "cosine", "SQNR", "dB", "max", "abs", "err"]
    name, cosine, sqnr, max_err = lines[1].split()
    assert name == "y" and float(cosine) > 0.99 and 25 < float(sqnr) < 80 and float(max_err) > 0
    assert main(["validate", str(model_path), str(model_path), "--calib", str(calib)]) == 0
    name, cosine, sqnr, max_err = capsys.readouterr().out.splitlines()[1].split()
    assert (cosine, sqnr, float(max_err)) == ("1.00000", "inf", 0.0)


def test_validate_needs_calibration_data(files):
    _, model_path, _ = files
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(model_path), str(model_path)])
    assert exit_info.value.code == 2


def test_passes_and_recipes_lists(capsys):
    assert main(["passes"]) == 0
    passes = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "quantize" in passes and "Lossy: per-channel or block-wise weights" in passes["quantize"]
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    w8a8 = next(line for line in lines if line.startswith("w8a8 "))
    assert "[quantize -> qdq]" in w8a8
    assert "targets:" in lines and any(line.split()[0] == "qdq" for line in lines[lines.index("targets:") + 1 :])


def test_unknown_recipe_fails_cleanly(files, tmp_path, capsys):
    _, model_path, calib = files
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "--calib", str(calib), "--recipe", "w2a2"]) == 1
    captured = capsys.readouterr()
    (line,) = error_lines(captured.err)
    assert line.startswith("graphquant: error: unknown recipe 'w2a2'")
    assert not out.exists()


def test_wbits_9_fails_cleanly(files, tmp_path, capsys):
    _, model_path, calib = files
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "--calib", str(calib), "--wbits", "9"]) == 1
    captured = capsys.readouterr()
    (line,) = error_lines(captured.err)
    assert line.startswith("graphquant: error:") and "wbits must be in 2..8, got 9" in line
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_missing_calibration_for_activation_quantization_fails_cleanly(files, tmp_path, capsys):
    _, model_path, _ = files
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx")]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == "graphquant: error: quantize: activation quantization needs calibration data"


def test_random_calibration_warns_on_stderr(files, tmp_path, capsys):
    _, model_path, _ = files
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--calib", "random"]) == 0
    stderr = capsys.readouterr().err
    warnings = [line for line in error_lines(stderr) if line.startswith("graphquant: warning:")]
    assert len(warnings) == 1 and "RANDOM" in warnings[0]


def test_optimize_layers_flag_prints_each_layers_scheme_and_reason(files, tmp_path, capsys):
    _, model_path, calib = files
    out = tmp_path / "out.onnx"
    assert (
        main(
            ["optimize", str(model_path), "-o", str(out), "--calib", str(calib), "--recipe", "outliertune", "--layers"]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    layer_lines = [line for line in stdout.splitlines() if " quantized " in line]
    assert len(layer_lines) == 2
    assert all("W8 per-channel" in line and "simulated SQNR" in line for line in layer_lines)


def test_a_run_that_fails_validation_exits_1_and_writes_nothing_unless_asked(files, tmp_path, capsys):
    model, model_path, calib = files
    x = np.load(calib)["x"]
    np.savez(tmp_path / "huge.npz", x=x / np.abs(x).max() * np.float32(3e38))
    out = tmp_path / "out.onnx"
    argv = ["optimize", str(model_path), "-o", str(out), "--calib", str(tmp_path / "huge.npz"), "--validate-data"]
    assert main([*argv, str(calib)]) == 1
    (line,) = [e for e in error_lines(capsys.readouterr().err) if e.startswith("graphquant: error")]
    assert line.startswith("graphquant: error: validation failed: output 'y': cosine ") and not out.exists()
    assert main([*argv, str(calib), "--keep-failed"]) == 1
    captured = capsys.readouterr()
    assert (
        f"validation: FAILED (every output cosine >= {DEFAULT_MIN_COSINE:g} and finite)" in captured.out
        and out.exists()
    )
    (line,) = [e for e in error_lines(captured.err) if e.startswith("graphquant: error")]
    assert line.endswith("(written anyway: --keep-failed)")
    expected, (got,) = mlp_reference(model, x).ravel(), run(graphquant.load(out), {"x": x})
    cosine = float(expected @ got.ravel() / (np.linalg.norm(expected) * np.linalg.norm(got)))
    assert float(line.split("cosine ")[1].split()[0]) == pytest.approx(cosine, abs=2e-5) and cosine < DEFAULT_MIN_COSINE
    assert main([*argv, str(calib), "--min-cosine", "-1"]) == 0
    assert "validation: passed (every output cosine >= -1 and finite)" in capsys.readouterr().out
