"""The OpenVINO executor: outputs against onnxruntime, validation on both executors, the CLI options and errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from builders import attention, attention_feeds, mlp, run, save_model

import graphquant
from graphquant.analysis import openvino_run
from graphquant.cli import main
from graphquant.errors import ExecutorError
from graphquant.validate import compare_models


F32 = np.float32


def feeds(rng: np.random.Generator, batches: int = 3) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.standard_normal((8, 16)).astype(F32)} for _ in range(batches)]


def test_openvino_in_float32_gives_onnxruntime_outputs_and_named_intermediates():
    rng = np.random.default_rng(0)
    model = mlp(rng)
    feed = feeds(rng, 1)[0]
    hidden = next(value.name for node in model.graph if node.op_type == "Relu" for value in node.outputs)
    with openvino_run.compiled_model(model, [hidden], openvino_run.FLOAT32) as compiled:
        outputs = openvino_run.run(compiled, ["y", hidden], feed)
    probe = model.clone()
    probe.graph.outputs.append(next(v for node in probe.graph for v in node.outputs if v.name == hidden))
    expected_y, expected_hidden = run(probe, feed)
    np.testing.assert_allclose(outputs["y"], expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs[hidden], expected_hidden, rtol=1e-5, atol=1e-5)


def quantized(rng: np.random.Generator) -> tuple[graphquant.OptimizeResult, list[dict[str, np.ndarray]]]:
    """The mlp quantized with w8a8 (qdq), and its calibration feeds."""
    model, data = mlp(rng), feeds(rng, 4)
    return graphquant.optimize(model, "w8a8", data, show_progress=False), data


def test_validation_on_both_executors_agrees():
    rng = np.random.default_rng(1)
    result, data = quantized(rng)
    reference = mlp(np.random.default_rng(1))
    by_ort = compare_models(reference, result.model, data)["y"]
    by_openvino = compare_models(reference, result.model, data, executor="openvino")["y"]
    # Both run int8 kernels on the same codes; OpenVINO may keep float parts in bf16: the metrics agree closely.
    assert by_ort.cosine > 0.99
    assert by_openvino.cosine == pytest.approx(by_ort.cosine, abs=2e-3)
    assert by_openvino.sqnr_db == pytest.approx(by_ort.sqnr_db, abs=3.0)
    assert by_openvino.max_abs_error > 0


def test_optimize_validates_on_openvino_and_says_so():
    rng = np.random.default_rng(2)
    model, data = mlp(rng), feeds(rng, 4)
    on_ort = graphquant.optimize(model, "w8a8", data, show_progress=False)
    on_openvino = graphquant.optimize(model, "w8a8", data, show_progress=False, validate_on="openvino")
    assert on_openvino.report.outputs["y"].cosine == pytest.approx(on_ort.report.outputs["y"].cosine, abs=2e-3)
    assert any("OpenVINO" in note for note in on_openvino.report.notes)
    assert not any("OpenVINO" in note for note in on_ort.report.notes)


def test_cli_validate_and_optimize_on_openvino(tmp_path, capsys):
    rng = np.random.default_rng(3)
    model_path, calib, out = tmp_path / "model.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    save_model(mlp(rng), model_path)
    np.savez(calib, x=rng.standard_normal((32, 16)).astype(F32))
    argv = ["optimize", "--recipe", "w8a8", str(model_path), "-o", str(out), "--calib", str(calib)]
    assert main([*argv, "--validate-on", "openvino"]) == 0
    capsys.readouterr()
    cosines = {}
    for executor in ("onnxruntime", "openvino"):
        assert main(["validate", str(model_path), str(out), "--calib", str(calib), "--executor", executor]) == 0
        name, cosine, _, max_err = capsys.readouterr().out.splitlines()[1].split()
        assert name == "y" and float(max_err) > 0
        cosines[executor] = float(cosine)
    assert cosines["openvino"] == pytest.approx(cosines["onnxruntime"], abs=2e-3)


def test_cli_refuses_an_unknown_executor(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "a.onnx", "b.onnx", "--calib", "random", "--executor", "tensorrt"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_without_openvino_installed_the_cli_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(4)
    model_path, calib = tmp_path / "model.onnx", tmp_path / "calib.npz"
    save_model(mlp(rng), model_path)
    np.savez(calib, x=rng.standard_normal((8, 16)).astype(F32))
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` sees when it is not installed
    argv = ["validate", str(model_path), str(model_path), "--calib", str(calib), "--executor", "openvino"]
    assert main(argv) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line == (
        "graphquant: error: the openvino executor needs the openvino package: pip install 'graphquant[openvino]'"
    )
    with pytest.raises(ExecutorError, match="pip install"):
        graphquant.optimize(mlp(rng), "w8a8", str(calib), show_progress=False, validate_on="openvino")


def test_the_python_api_refuses_an_unknown_executor():
    rng = np.random.default_rng(5)
    model = mlp(rng)
    with pytest.raises(ExecutorError, match="unknown executor 'tensorrt'"):
        compare_models(model, model, feeds(rng, 1), executor="tensorrt")


def test_a_model_openvino_cannot_load_names_the_candidate(tmp_path):
    rng = np.random.default_rng(6)
    reference = mlp(rng)
    broken = reference.clone()
    relu = next(node for node in broken.graph if node.op_type == "Relu")
    relu.op_type = "NoSuchOp"
    with pytest.raises(graphquant.InvalidModelError, match="^OpenVINO cannot load the candidate model: "):
        compare_models(reference, broken, feeds(rng, 1), executor="openvino")


def test_the_openvino_preset_runs_every_matmul_of_an_attention_block_in_int8():
    rng = np.random.default_rng(7)
    model, data = attention(rng), attention_feeds(rng, 4)
    result = graphquant.optimize(model, "openvino-w8a8", data, show_progress=False)
    assert result.report.outputs["y"].cosine > 0.99
    kinds = openvino_run.layer_precisions(result.model, openvino_run.UNFUSED)
    # Three projections (FullyConnected) and the two attention MatMuls, none left in float.
    assert kinds[("FullyConnected", "i8")] + kinds[("FullyConnected", "u8")] == 3  # u8: the asymmetric grids
    assert kinds[("MatMul", "i8")] + kinds[("MatMul", "u8")] == 2
    assert not any(kind in ("FullyConnected", "MatMul") and p not in ("i8", "u8") for kind, p in kinds)
