"""The `graphquant` command line, run in-process through main() (and once as the installed script)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnxruntime as ort
import pytest
from builders import build, mlp, mlp_reference, outlier_activations, run, save_model, weights

import graphquant
import graphquant.analysis.runner
from graphquant.cli import main
from graphquant.passes.quantize import QuantizePass
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
    assert main(["optimize", "--recipe", "w8a8", str(model_path), "-o", str(out), "--calib", str(calib)]) == 0
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
        [
            "optimize",
            "--recipe",
            "w8a8",
            str(model_path),
            "-o",
            str(tmp_path / "out.onnx"),
            "--calib",
            str(calib),
            "--report",
            str(report),
        ]
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
    args = [
        "optimize",
        "--recipe",
        "w8a8",
        str(model_path),
        "-o",
        str(tmp_path / "o.onnx"),
        "--calib",
        str(calib),
        "--wbits",
        "4",
    ]
    assert main([*args, "--passes", "quantize", "--target", "qdq", "--report", str(report)]) == 0
    assert {layer["scheme"] for layer in json.loads(report.read_text())["layers"]} == {
        "W4 per-channel, A8 per-tensor minmax"
    }


def test_keep_8bit_keeps_the_matching_layers_at_8_bits(files, tmp_path, capsys):
    _, model_path, calib = files
    report = tmp_path / "report.json"
    output = ["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(calib)]
    args = [*output, "--recipe", "w8a8", "--wbits", "4"]
    assert main([*args, "--keep-8bit", " @last, nothing*", "--report", str(report)]) == 0
    schemes = [layer["scheme"].split()[0] for layer in json.loads(report.read_text())["layers"]]
    assert schemes == ["W4", "W8"]
    assert main([*args, "--keep-8bit", "@stem"]) == 1
    assert error_lines(capsys.readouterr().err)[-1].startswith(
        "graphquant: error: pass 'quantize': keep_8bit: unknown role"
    )


CONVS = """
<ir_version: 10, opset_import: ["" : 18]>
convs (float[N, 4, 6, 6] x) => (float[N, 6, 6, 6] y) {
  a = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, w1, b1)
  ar = Relu(a)
  y = Conv<kernel_shape: ints = [1, 1]>(ar, w2)
}
"""


def saved_convs(tmp_path, seed: int):
    """CONVS with seeded weights saved, its calibration .npz, and a report path."""
    rng = np.random.default_rng(seed)
    model = build(CONVS, {"w1": weights(rng, 8, 4, 3, 3), "b1": weights(rng, 8), "w2": weights(rng, 6, 8, 1, 1)})
    model_path, calib, report = tmp_path / "convs.onnx", tmp_path / "calib.npz", tmp_path / "report.json"
    save_model(model, model_path)
    np.savez(calib, x=rng.standard_normal((16, 4, 6, 6)).astype(np.float32))
    return model_path, calib, report


def test_gptq_sequential_fits_the_convs_on_the_quantized_inputs(tmp_path):
    model_path, calib, report = saved_convs(tmp_path, 3)
    args = ["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(calib), "--recipe", "w8a8"]
    assert main([*args, "--wbits", "4", "--gptq", "--gptq-sequential", "--report", str(report)]) == 0
    schemes = [layer["scheme"] for layer in json.loads(report.read_text())["layers"]]
    assert len(schemes) == 2 and all("GPTQ sequential" in scheme for scheme in schemes), schemes


def test_asymmetric_conv_weights_reach_qlinear_conv_on_ort_cpu(tmp_path):
    model_path, calib, report = saved_convs(tmp_path, 5)
    output = tmp_path / "o.onnx"
    args = ["optimize", str(model_path), "-o", str(output), "--calib", str(calib), "--recipe", "w8a8"]
    assert (
        main([*args, "--wbits", "4", "--target", "ort-cpu", "--asymmetric-conv-weights", "--report", str(report)]) == 0
    )
    schemes = [layer["scheme"] for layer in json.loads(report.read_text())["layers"]]
    assert len(schemes) == 2 and all(scheme.startswith("W4 asym per-channel") for scheme in schemes), schemes
    assert [node.op_type for node in onnx.load(output).graph.node].count("QLinearConv") == 2


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
        [str(SCRIPT), "optimize", "--recipe", "w8a8", str(model_path), "-o", str(model_path), "--calib", "random"],
        check=False,
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
    assert main(["optimize", "--recipe", "w8a8", str(model_path), "-o", str(out), "--calib", str(calib)]) == 0
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
    assert (
        main(["optimize", "--recipe", "w8a8", str(model_path), "-o", str(out), "--calib", str(calib), "--wbits", "9"])
        == 1
    )
    captured = capsys.readouterr()
    (line,) = error_lines(captured.err)
    assert line.startswith("graphquant: error:") and "wbits must be in 2..8, got 9" in line
    assert "Traceback" not in captured.err
    assert not out.exists()


def test_missing_calibration_for_activation_quantization_fails_cleanly(files, tmp_path, capsys):
    _, model_path, _ = files
    assert main(["optimize", "--recipe", "w8a8", str(model_path), "-o", str(tmp_path / "out.onnx")]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == "graphquant: error: quantize: activation quantization needs calibration data"


def test_random_calibration_warns_on_stderr(files, tmp_path, capsys):
    _, model_path, _ = files
    assert (
        main(["optimize", "--recipe", "w8a8", str(model_path), "-o", str(tmp_path / "out.onnx"), "--calib", "random"])
        == 0
    )
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
    argv = [
        "optimize",
        "--recipe",
        "w8a8",
        str(model_path),
        "-o",
        str(out),
        "--calib",
        str(tmp_path / "huge.npz"),
        "--validate-data",
    ]
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


def folder_listing(folder: Path) -> dict[str, bytes | str]:
    """Every entry under the folder: regular files with their bytes, anything else by its kind."""
    listing: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        listing[str(path.relative_to(folder))] = path.read_bytes() if stat.S_ISREG(mode) else stat.filemode(mode)[0]
    return listing


def optimize_argv(model_path: Path, output: Path | str, calib: Path, *extra: str) -> list[str]:
    return ["optimize", "--recipe", "w8a8", str(model_path), "-o", str(output), "--calib", str(calib), *extra]


@pytest.mark.usefixtures("device_files")
@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_optimize_refuses_a_device_output_and_leaves_it_a_device(files, tmp_path, capsys, device):
    _, model_path, calib = files
    before = folder_listing(tmp_path)
    assert main(optimize_argv(model_path, device, calib)) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert (
        line
        == f"graphquant: error: {device}: cannot write the output there: it is a character device, not a regular file or a new path"
    )
    assert stat.S_ISCHR(os.stat(device).st_mode)
    assert folder_listing(tmp_path) == before


def test_optimize_refuses_a_fifo_or_a_directory_before_any_work(files, tmp_path, capsys, monkeypatch):
    _, model_path, calib = files
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder.onnx").mkdir()
    monkeypatch.setattr(graphquant.Calibrator, "collect", lambda *_: pytest.fail("calibration ran"))
    before = folder_listing(tmp_path)
    for output, kind in (("fifo", "a FIFO"), ("folder.onnx", "a directory")):
        assert main(optimize_argv(model_path, tmp_path / output, calib)) == 1
        (line,) = error_lines(capsys.readouterr().err)
        assert line.endswith(f"{output}: cannot write the output there: it is {kind}, not a regular file or a new path")
    assert main([*optimize_argv(model_path, tmp_path / "out.onnx", calib), "--report", str(tmp_path / "fifo")]) == 1
    assert error_lines(capsys.readouterr().err)[0].endswith(
        "cannot write the report there: it is a FIFO, not a regular file or a new path"
    )
    assert folder_listing(tmp_path) == before  # no folder.onnx.data, no temp files


def test_report_may_not_replace_the_input_or_the_output(files, tmp_path, capsys):
    _, model_path, calib = files
    before = folder_listing(tmp_path)
    out = tmp_path / "out.onnx"
    for report, fault in ((model_path, "the input model"), (out, "the output"), (calib, "the calibration data")):
        for extra in ([], ["--overwrite"]):
            assert main([*optimize_argv(model_path, out, calib), "--report", str(report), *extra]) == 1
            (line,) = error_lines(capsys.readouterr().err)
            assert line.startswith(f"graphquant: error: {report}: the report would overwrite {fault}")
    assert folder_listing(tmp_path) == before


def test_output_may_not_replace_a_file_the_run_reads(files, tmp_path, capsys):
    _, model_path, calib = files
    held_out = tmp_path / "heldout.npz"
    np.savez(held_out, x=np.random.default_rng(3).standard_normal((16, 16)).astype(np.float32))
    recipe = tmp_path / "mine.toml"
    recipe.write_text('name = "mine"\ntarget = "qdq"\n[[passes]]\nname = "quantize"\n')
    before = folder_listing(tmp_path)
    cases = ((calib, "the calibration data"), (held_out, "the validation data"), (recipe, "the recipe"))
    for output, fault in cases:
        argv = [*optimize_argv(model_path, output, calib), "--validate-data", str(held_out), "--recipe", str(recipe)]
        assert main([*argv, "--overwrite"]) == 1
        (line,) = error_lines(capsys.readouterr().err)
        assert line.startswith(f"graphquant: error: {output}: the output would overwrite {fault}")
    assert folder_listing(tmp_path) == before


def write_external_model(folder: Path, location: str) -> tuple[Path, np.ndarray]:
    """The mlp's layers as one MatMul whose weight lives in external data at ``location``."""
    w = np.random.default_rng(4).standard_normal((16, 4)).astype(np.float32)
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> ext (float[N, 16] x) => (float[N, 4] y) { y = MatMul(x, w) }'
    )
    tensor = onnx.numpy_helper.from_array(w, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    proto.graph.initializer.append(tensor)
    (folder / location).write_bytes(w.tobytes())
    (folder / "ext.onnx").write_bytes(proto.SerializeToString())
    return folder / "ext.onnx", w


def test_output_never_replaces_the_inputs_external_data(files, tmp_path, capsys):
    _, _, calib = files
    model_path, w = write_external_model(tmp_path, "ext.onnx.data")
    before = folder_listing(tmp_path)
    for output, label in ((tmp_path / "ext.onnx.data", "the output"), (model_path, "the output's external data")):
        assert main([*optimize_argv(model_path, output, calib), "--overwrite"]) == 1
        (line,) = error_lines(capsys.readouterr().err)
        assert f": {label} would overwrite external data of the input model" in line
    assert folder_listing(tmp_path) == before
    x = np.load(calib)["x"][:4]
    (y,) = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)


def test_overwrite_replaces_the_input_model_with_the_quantized_one(files, tmp_path, capsys):
    model, model_path, calib = files
    assert main([*optimize_argv(model_path, model_path, calib), "--overwrite"]) == 0
    assert f"wrote {model_path}" in capsys.readouterr().out
    x = np.load(calib)["x"][:8]
    (y,) = run(graphquant.load(model_path), {"x": x})
    reference = mlp_reference(model, x)
    assert 0 < np.abs(y - reference).max() < 0.05 * np.abs(reference).max()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "model.onnx"]


def test_help_says_that_an_existing_output_file_is_replaced(capsys):
    with pytest.raises(SystemExit):
        main(["optimize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a regular file, which is replaced" in help_text
    assert "--overwrite allow -o to replace the input model (never its external data)" in help_text
    assert "--report REPORT write the run report as JSON (same rules as -o)" in help_text


def test_a_failed_save_leaves_neither_model_nor_report(files, tmp_path, capsys, monkeypatch):
    _, model_path, calib = files

    def refuse(path: Path) -> None:
        raise graphquant.OutputError("the output fails onnx's checker: synthetic")

    monkeypatch.setattr(graphquant.api, "_check_written", refuse)
    before = folder_listing(tmp_path)
    argv = [*optimize_argv(model_path, tmp_path / "out.onnx", calib), "--report", str(tmp_path / "report.json")]
    assert main(argv) == 1
    assert error_lines(capsys.readouterr().err) == ["graphquant: error: the output fails onnx's checker: synthetic"]
    assert folder_listing(tmp_path) == before


def test_report_is_written_only_with_the_model(files, tmp_path, capsys):
    _, model_path, calib = files
    report = tmp_path / "report.json"
    report.write_text("old report\n")
    argv = [*optimize_argv(model_path, tmp_path / "out.onnx", calib), "--report", str(report)]
    assert main(argv) == 0
    data = json.loads(report.read_text())
    (y,) = run(graphquant.load(tmp_path / "out.onnx"), {"x": np.load(calib)["x"][:8]})
    assert data["outputs"]["y"]["cosine"] > 0.99 and y.shape == (8, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "model.onnx", "out.onnx", "report.json"]


SIGNAL_RUN = """
import os, signal, sys, time
import graphquant.api, graphquant.analysis.runner
from graphquant.cli import main

where, signum = sys.argv[1], getattr(signal, sys.argv[2])
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job's shell starts it with SIGINT ignored
module = graphquant.api if where == "save" else graphquant.analysis.runner
name = "_check_written" if where == "save" else "load_session"
original = getattr(module, name)

def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signum)  # the real signal, while the temp folder exists
    time.sleep(5)
    return original(*args, **kwargs)

setattr(module, name, interrupted)
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize(
    ("where", "signum", "code", "message"),
    [
        ("save", "SIGHUP", 129, "terminated by SIGHUP"),  # the scratch folder beside the output
        ("session", "SIGTERM", 143, "terminated by SIGTERM"),  # the session's scratch folder in TMPDIR
        ("session", "SIGINT", 130, "interrupted"),
    ],
)
def test_a_signal_mid_run_leaves_no_temp_files(files, tmp_path, where, signum, code, message):
    _, model_path, calib = files
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    before = folder_listing(tmp_path)
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(Path(graphquant.__file__).parent.parent)}
    argv = optimize_argv(model_path, tmp_path / "out.onnx", calib)
    completed = subprocess.run(
        [sys.executable, "-c", SIGNAL_RUN, where, signum, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert completed.returncode == code
    assert error_lines(completed.stderr) == [f"graphquant: error: {message}"]
    leftovers = {name: kind for name, kind in folder_listing(tmp_path).items() if not name.endswith(".ses")}
    assert leftovers == before  # onnxruntime's own telemetry session id (tmpdir/.ses) aside


STARTUP_INTERRUPT = """
import sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime":
            raise KeyboardInterrupt  # as a Ctrl-C while the heavy libraries load
        return None

sys.meta_path.insert(0, CtrlC())
from graphquant.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_start_up_prints_one_line_and_exits_130(files):
    _, model_path, _ = files
    env = {**os.environ, "PYTHONPATH": str(Path(graphquant.__file__).parent.parent)}
    completed = subprocess.run(
        [sys.executable, "-c", STARTUP_INTERRUPT, "inspect", str(model_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert (completed.returncode, completed.stderr) == (130, "graphquant: error: interrupted\n")


def test_debug_is_accepted_after_the_subcommand(files, tmp_path, capsys):
    _, model_path, _ = files
    assert main(["inspect", str(tmp_path / "absent.onnx"), "--debug"]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback (most recent call last)" in stderr and "InvalidModelError" in stderr
    assert main(["--debug", "optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--calib", "absent.npz"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "absent.onnx")]) == 1
    assert len(error_lines(capsys.readouterr().err)) == 1


def test_internal_error_prints_the_root_causes_first_line(files, tmp_path, capsys, monkeypatch):
    _, model_path, calib = files

    def broken(self, model):
        raise RuntimeError("synthetic failure\nsecond line")

    monkeypatch.setattr(QuantizePass, "call", broken)
    assert main(optimize_argv(model_path, tmp_path / "out.onnx", calib)) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == "graphquant: error: internal error: pass quantize failed: RuntimeError: synthetic failure"
    assert not (tmp_path / "out.onnx").exists()


def test_onnxruntime_log_lines_stay_off_the_terminal(files, capfd, monkeypatch):
    _, model_path, calib = files
    ort.set_default_logger_severity(2)  # onnxruntime's default, whatever an earlier test set
    make_options = graphquant.analysis.runner.session_options

    def logging_options(prepack: bool = False) -> ort.SessionOptions:
        # a thread affinity that fails makes onnxruntime's default logger print an error
        options = make_options(prepack)
        options.intra_op_num_threads = 2
        options.add_session_config_entry("session.intra_op_thread_affinities", "900")
        return options

    monkeypatch.setattr(graphquant.analysis.runner, "session_options", logging_options)
    assert main(["validate", str(model_path), str(model_path), "--calib", str(calib)]) == 0
    captured = capfd.readouterr()
    assert captured.err == ""
    name, cosine, sqnr, max_err = captured.out.splitlines()[1].split()
    assert (name, cosine, sqnr, float(max_err)) == ("y", "1.00000", "inf", 0.0)


def test_validate_on_models_with_different_inputs_says_so(files, tmp_path, capsys):
    _, model_path, calib = files
    other = tmp_path / "other.onnx"
    text = '<ir_version: 8, opset_import: ["" : 17]> other (float[N, 16] z) => (float[N, 4] y) { y = MatMul(z, w) }'
    save_model(build(text, {"w": weights(np.random.default_rng(5), 16, 4)}), other)
    assert main(["validate", str(model_path), str(other), "--calib", str(calib)]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == (
        f"graphquant: error: {other}: its inputs (z: float32 [N, 16]) differ from those of {model_path} "
        "(x: float32 [N, 16])"
    )
    renamed = onnx.load(str(model_path))  # the same model with its batch dim named differently still compares
    renamed.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(renamed, tmp_path / "renamed.onnx")
    assert main(["validate", str(model_path), str(tmp_path / "renamed.onnx"), "--calib", str(calib)]) == 0
    name, cosine, sqnr, max_err = capsys.readouterr().out.splitlines()[1].split()
    assert (name, cosine, sqnr, float(max_err)) == ("y", "1.00000", "inf", 0.0)


def test_data_errors_name_the_file(files, tmp_path, capsys, monkeypatch):
    _, model_path, calib = files
    wrong_name = tmp_path / "wrong_name.npz"
    np.savez(wrong_name, z=np.zeros((8, 16), np.float32))
    wrong_dtype = tmp_path / "wrong_dtype.npz"
    np.savez(wrong_dtype, x=np.zeros((8, 16), np.float64))
    monkeypatch.setattr(graphquant.Calibrator, "collect", lambda *_: pytest.fail("calibration ran"))
    out = tmp_path / "out.onnx"
    assert main([*optimize_argv(model_path, out, calib), "--validate-data", str(wrong_name)]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"graphquant: error: {wrong_name}: input 'z' is not an input of the model (inputs: ['x'])"
    assert main(optimize_argv(model_path, out, wrong_dtype)) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"graphquant: error: {wrong_dtype}: input 'x': dtype float64 given, model expects float32"
    assert main(["validate", str(model_path), str(model_path), "--calib", str(wrong_dtype)]) == 1
    assert error_lines(capsys.readouterr().err)[0].startswith(f"graphquant: error: {wrong_dtype}: input 'x'")
    assert not out.exists()


def test_inspect_lists_the_graph_inputs(files, capsys):
    _, model_path, _ = files
    assert main(["inspect", str(model_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("inputs"))
    assert lines[header + 1].split() == ["x", "float32", "[N,", "16]"]
    # A float [N, 16] input: neither token ids (text) nor a rank-4 image, so only arrays fit.
    assert lines[header + 2 :] == ["--calib forms that fit: an .npz or test-data folder of these inputs"]


def test_an_unwritable_report_is_refused_before_the_model_is_written(files, tmp_path, capsys):
    _, model_path, calib = files
    before = folder_listing(tmp_path)
    argv = [*optimize_argv(model_path, tmp_path / "out.onnx", calib), "--report", str(tmp_path / "absent" / "r.json")]
    assert main(argv) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"graphquant: error: {tmp_path / 'absent'}: output folder does not exist"
    assert folder_listing(tmp_path) == before


def test_a_directory_output_leaves_no_external_data_behind(files, tmp_path, capsys):
    _, _, calib = files
    model_path, _ = write_external_model(tmp_path, "weights.bin")
    (tmp_path / "out").mkdir()
    before = folder_listing(tmp_path)
    assert main(optimize_argv(model_path, tmp_path / "out", calib)) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line.endswith("out: cannot write the output there: it is a directory, not a regular file or a new path")
    assert folder_listing(tmp_path) == before  # no out.data


def test_a_model_that_fails_in_onnxruntime_gives_one_line_and_no_log(tmp_path, capfd):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    bad (float[N, 4] x) => (float[M] y) {
      s = Constant<value = int64[2] {3, 5}>()
      y = Reshape(x, s)
    }
    """
    model_path = tmp_path / "bad.onnx"
    save_model(build(text), model_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.ones((8, 4), np.float32))
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match="cannot be reshaped"):
        run(graphquant.load(model_path), {"x": np.ones((8, 4), np.float32)})
    capfd.readouterr()
    assert main(["validate", str(model_path), str(model_path), "--calib", str(calib)]) == 1
    captured = capfd.readouterr()
    (line,) = error_lines(captured.err)
    assert line.startswith("graphquant: error:") and "cannot be reshaped" in line
    assert captured.out == ""


def test_the_default_recipe_is_auto_on_ort_cpu_with_the_search_in_the_report(files, tmp_path, capsys):
    model, model_path, calib = files
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    argv = ["optimize", str(model_path), "-o", str(out), "--calib", str(calib), "--report", str(report)]
    assert main([*argv, "--objective", "size", "--max-drop", "0.01"]) == 0
    stdout = capsys.readouterr().out
    assert "recipe auto -> target ort-cpu" in stdout
    data = json.loads(report.read_text())
    # For size the plain graph is searched beside OutlierTune's; the line names the method that won.
    assert data["auto"]["method"] in ("outliertune", "none")
    assert f"auto: {data['auto']['method']}" in stdout
    assert f"(bound {data['auto']['chosen']['error_bound']:.5f}) meets the budget 0.01000" in stdout
    assert (data["auto"]["objective"], data["auto"]["max_drop"]) == ("size", 0.01)
    assert {unit["unit"] for unit in data["auto"]["layers"]} == {layer["node"] for layer in data["layers"]}
    assert data["auto"]["pareto_front"] and data["bytes_after"] < data["bytes_before"]
    x = np.load(calib)["x"][24:]  # the quarter of the rows the search held out
    (y,) = run(graphquant.load(out), {"x": x})
    reference = mlp_reference(model, x)
    assert 1 - float(np.sum(y * reference) / (np.linalg.norm(y) * np.linalg.norm(reference))) <= 0.01


def test_auto_refuses_fixed_recipe_flags(files, tmp_path, capsys):
    _, model_path, calib = files
    assert (
        main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(calib), "--wbits", "4"]) == 1
    )
    assert "recipe 'auto' chooses the schemes itself: option 'wbits' is for fixed recipes" in capsys.readouterr().err
