"""The Python API: optimize (fidelity, report, no mutation), atomic save, and safe load."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import feeds, mlp, mlp_reference, relu_only, run, save_model

import graphquant
from graphquant.errors import FidelityError, InternalError, InvalidModelError, OutputError, RecipeError
from graphquant.lowering.fuse_activation import FuseActivationPass
from graphquant.passes.quantize import QuantizePass
from graphquant.validate import DEFAULT_MIN_COSINE


def snapshot(model: ir.Model) -> tuple:
    """Everything optimize must leave alone on its input: nodes, names, weights, metadata."""
    return (
        [(node.op_type, node.name, [v.name for v in node.inputs], dict(node.meta)) for node in model.graph],
        {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()},
        [value.name for value in model.graph.outputs],
    )


def metrics(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Cosine similarity and SQNR (dB) computed directly in numpy."""
    ref, cand = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    cosine = ref @ cand / (np.linalg.norm(ref) * np.linalg.norm(cand))
    sqnr = 10 * math.log10((ref @ ref) / ((ref - cand) @ (ref - cand)))
    return float(cosine), sqnr


@pytest.fixture
def model_and_data():
    rng = np.random.default_rng(0)
    return mlp(rng), feeds(rng, batches=4, rows=16, features=16)


def test_optimize_quantizes_and_stays_close(model_and_data):
    model, data = model_and_data
    before = snapshot(model)
    result = graphquant.optimize(model, calibration=data, show_progress=False)

    report = result.report
    assert (report.recipe, report.target, report.passes) == ("w8a8", "qdq", ["quantize"])
    assert [(layer.op_type, layer.status) for layer in report.quantized] == [
        ("MatMul", "quantized"),
        ("Gemm", "quantized"),
    ]
    assert report.kept_float == [] and report.notes == []
    assert all(layer.scheme == "W8 per-channel, A8 per-tensor minmax" for layer in report.quantized)

    reference = np.concatenate([mlp_reference(model, feed["x"]) for feed in data])
    candidate = np.concatenate([run(result.model, feed)[0] for feed in data])
    cosine, sqnr = metrics(reference, candidate)
    assert cosine > 0.99
    assert sqnr > 25.0
    # The report measured the same thing against the onnxruntime reference.
    assert report.outputs["y"].cosine == pytest.approx(cosine, abs=1e-6)
    assert report.outputs["y"].sqnr_db == pytest.approx(sqnr, abs=0.01)
    assert report.outputs["y"].max_abs_error == pytest.approx(np.abs(reference - candidate).max(), rel=1e-3)
    assert sorted(report.layer_metrics) == sorted(layer.node for layer in report.quantized)

    stored = sum(value.const_value.nbytes for value in result.model.graph.initializers.values())
    assert report.bytes_after == stored < report.bytes_before == 4 * (16 * 8 + 8 + 4 * 8 + 4)
    assert snapshot(model)[0] == before[0] and snapshot(model)[2] == before[2]
    for name, array in before[1].items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)
    assert [node.op_type for node in model.graph] == ["MatMul", "Add", "Relu", "Gemm"]


def test_optimize_with_separate_validation_data_and_wbits(model_and_data):
    model, data = model_and_data
    held_out = feeds(np.random.default_rng(9), batches=2, rows=8, features=16)
    result = graphquant.optimize(model, calibration=data, validation=held_out, wbits=4, show_progress=False)
    assert all(layer.scheme.startswith("W4 per-channel") for layer in result.report.quantized)
    reference = np.concatenate([mlp_reference(model, feed["x"]) for feed in held_out])
    candidate = np.concatenate([run(result.model, feed)[0] for feed in held_out])
    cosine, sqnr = metrics(reference, candidate)
    assert result.report.outputs["y"].sqnr_db == pytest.approx(sqnr, abs=0.01)
    assert 0.9 < cosine and sqnr < 25.0  # W4 costs visibly more than W8


def test_optimize_with_a_one_shot_generator_calibrates_and_validates(model_and_data):
    model, data = model_and_data
    from_list = graphquant.optimize(model, calibration=data, show_progress=False)
    from_generator = graphquant.optimize(model, calibration=(feed for feed in data), show_progress=False)
    assert from_generator.report.outputs["y"].sqnr_db == pytest.approx(from_list.report.outputs["y"].sqnr_db)
    for feed in data[:2]:
        np.testing.assert_array_equal(run(from_generator.model, feed)[0], run(from_list.model, feed)[0])


def test_optimize_without_calibration_is_a_recipe_error(model_and_data):
    model, _ = model_and_data
    with pytest.raises(RecipeError, match="needs calibration data"):
        graphquant.optimize(model, show_progress=False)


def test_save_is_atomic_and_never_overwrites_the_input(tmp_path, model_and_data):
    model, data = model_and_data
    source = tmp_path / "model.onnx"
    save_model(model, source)
    original = source.read_bytes()
    loaded = graphquant.load(source)
    result = graphquant.optimize(loaded, calibration=data, show_progress=False)

    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        graphquant.save(result, source)
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        graphquant.save(loaded, tmp_path / "." / "model.onnx")
    assert source.read_bytes() == original

    written = graphquant.save(result, tmp_path / "quantized.onnx")
    assert written == (tmp_path / "quantized.onnx").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "quantized.onnx"]  # no temp files left
    reloaded = graphquant.load(written)
    onnx.checker.check_model(str(written), full_check=True)
    for feed in data[:2]:
        np.testing.assert_array_equal(run(reloaded, feed)[0], run(result.model, feed)[0])

    graphquant.save(result, source, overwrite=True)
    assert source.read_bytes() != original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "quantized.onnx"]


def test_nothing_to_quantize_saves_fine_and_says_so(tmp_path):
    model = relu_only()
    data = [{"x": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)}]
    result = graphquant.optimize(model, calibration=data, show_progress=False)
    assert result.report.quantized == [] and result.report.outputs == {}
    assert any("nothing to quantize" in note for note in result.report.notes)
    assert "note: nothing to quantize" in result.report.format_table()
    path = graphquant.save(result, tmp_path / "relu.onnx")
    (y,) = run(graphquant.load(path), data[0])
    np.testing.assert_array_equal(y, np.maximum(data[0]["x"], 0))


def test_report_to_dict_is_json_ready(model_and_data):
    model, data = model_and_data
    report = graphquant.optimize(model, calibration=data, show_progress=False).report
    as_dict = report.to_dict()
    assert [layer["status"] for layer in as_dict["layers"]] == ["quantized", "quantized"]
    assert all("metrics" in layer and layer["metrics"]["cosine"] > 0.99 for layer in as_dict["layers"])
    assert as_dict["outputs"]["y"]["sqnr_db"] == pytest.approx(report.outputs["y"].sqnr_db)


LOADABLE = """
<ir_version: 8, opset_import: ["" : 17]>
ext (float[N, 16] x) => (float[N, 16] y) {
  y = MatMul(x, w)
}
"""


def write_external(model_path, location: str) -> np.ndarray:
    """A model whose 1 KiB weight lives in external data at ``location`` (relative to the model's folder)."""
    w = (np.arange(256, dtype=np.float32).reshape(16, 16) - 128) / 64
    proto = onnx.parser.parse_model(LOADABLE)
    tensor = onnx.numpy_helper.from_array(w, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    proto.graph.initializer.append(tensor)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(proto.SerializeToString())
    return w


def run_file(path, feed):
    """Run a saved model file in onnxruntime (so external data resolves against its folder)."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def test_external_data_models_optimize_and_save_elsewhere(tmp_path):
    w = write_external(tmp_path / "in" / "model.onnx", "weights.bin")
    (tmp_path / "in" / "weights.bin").write_bytes(w.tobytes())
    model = graphquant.load(tmp_path / "in" / "model.onnx")
    data = feeds(np.random.default_rng(2), batches=2, rows=4, features=16)
    x = data[0]["x"]

    result = graphquant.optimize(model, calibration=data, show_progress=False)
    assert len(result.report.quantized) == 1
    assert result.report.outputs["y"].sqnr_db > 30

    (tmp_path / "out").mkdir()
    copy = graphquant.save(model, tmp_path / "out" / "copy.onnx")  # the float model, weight still external
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.onnx", "copy.onnx.data"]
    np.testing.assert_allclose(run_file(copy, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-5)
    quantized = graphquant.save(result, tmp_path / "out" / "quantized.onnx")
    (y,) = run_file(quantized, {"x": x})
    assert metrics(x @ w, y)[1] > 30


def test_forced_external_data_round_trips_through_optimize_and_save(tmp_path, monkeypatch, model_and_data):
    model, data = model_and_data
    monkeypatch.setattr(graphquant.api, "PROTO_SIZE_LIMIT", 0)  # every model counts as large: external data
    (tmp_path / "float").mkdir()
    (tmp_path / "int8").mkdir()
    saved = graphquant.save(model, tmp_path / "float" / "model.onnx")
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    loaded = graphquant.load(saved)
    assert isinstance(loaded.graph.initializers["w1"].const_value, ir.ExternalTensor)
    result = graphquant.optimize(loaded, "outliertune", calibration=data, show_progress=False)
    quantized = graphquant.save(result, tmp_path / "int8" / "model.onnx")
    assert sorted(p.name for p in quantized.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    x = data[0]["x"]
    np.testing.assert_array_equal(run_file(saved, {"x": x})[0], run(model, {"x": x})[0])
    np.testing.assert_allclose(run_file(quantized, {"x": x})[0], run(result.model, {"x": x})[0], rtol=1e-5, atol=1e-6)
    assert metrics(mlp_reference(model, x), run_file(quantized, {"x": x})[0])[0] > 0.99


# --- validation fails the run when the quantized model is far from the float one ---


def test_calibration_near_float_max_collapses_the_model_and_fails_validation(model_and_data):
    model, data = model_and_data
    huge = [{"x": feed["x"] / np.abs(feed["x"]).max() * np.float32(3e38)} for feed in data]
    result = graphquant.optimize(model, calibration=huge, validation=data, show_progress=False, keep_failed=True)
    expected = np.concatenate([mlp_reference(model, feed["x"]) for feed in data])
    got = np.concatenate([run(result.model, feed)[0] for feed in data])
    cosine = metrics(expected, got)[0]
    assert cosine < DEFAULT_MIN_COSINE and result.report.outputs["y"].cosine == pytest.approx(cosine, abs=1e-6)
    assert result.report.failures == [
        f"output 'y': cosine {result.report.outputs['y'].cosine:.5f} against the float model, below the threshold {DEFAULT_MIN_COSINE:g}"
    ]
    assert (
        f"validation: FAILED (every output cosine >= {DEFAULT_MIN_COSINE:g} and finite)" in result.report.format_table()
    )
    validation = result.report.to_dict()["validation"]
    assert (validation["min_cosine"], validation["passed"]) == (DEFAULT_MIN_COSINE, False)
    assert validation["failures"] == result.report.failures
    assert result.report.to_dict()["outputs"]["y"]["within_tolerance"] is False
    with pytest.raises(FidelityError, match=f"^validation failed: {result.report.failures[0]}; not written"):
        graphquant.optimize(model, calibration=huge, validation=data, show_progress=False)


def test_the_threshold_is_settable_and_printed(model_and_data):
    model, data = model_and_data
    result = graphquant.optimize(model, calibration=data, show_progress=False)
    cosine = result.report.outputs["y"].cosine
    expected = mlp_reference(model, data[0]["x"])
    assert cosine == pytest.approx(metrics(expected, run(result.model, data[0])[0])[0], abs=5e-4)
    assert (
        f"validation: passed (every output cosine >= {DEFAULT_MIN_COSINE:g} and finite)" in result.report.format_table()
    )
    with pytest.raises(FidelityError, match="below the threshold"):
        graphquant.optimize(model, calibration=data, show_progress=False, min_cosine=min(1.0, cosine + 1e-7))
    for bad in (1.5, float("nan"), "0.9"):
        with pytest.raises(RecipeError, match="min_cosine must be a number in"):
            graphquant.optimize(model, calibration=data, show_progress=False, min_cosine=bad)


# --- which model onnxruntime cannot run ---


PLUGIN = """
<ir_version: 8, opset_import: ["" : 17, "com.example.plugins" : 1]>
plugin (float[N, 16] x) => (float[N, 8] y) {
  [fc1] h = MatMul(x, w1)
  [plugin] g = com.example.plugins.FancyActivation(h)
  [fc2] y = MatMul(g, w2)
}
"""


def test_an_original_onnxruntime_cannot_load_is_named_as_the_input():
    rng = np.random.default_rng(3)
    proto = onnx.parser.parse_model(PLUGIN)
    for name, shape in (("w1", (16, 16)), ("w2", (16, 8))):
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        )
    model = ir.serde.deserialize_model(proto)
    data = feeds(rng, batches=2, rows=4, features=16)
    with pytest.raises(InvalidModelError, match=r"^onnxruntime cannot load the original model \(the input\): .*Fancy"):
        graphquant.optimize(model, "weight-only", validation=data, show_progress=False)


DUPLICATE_NAMES = """
<ir_version: 8, opset_import: ["" : 17]>
duplicate (float[N, 16] x) => (float[N, 4] y) {
  [fc] h = MatMul(x, w1)
  [fc] y = MatMul(h, w2)
}
"""


def test_an_original_with_duplicate_node_names_is_validated_after_name_fixing():
    rng = np.random.default_rng(4)
    proto = onnx.parser.parse_model(DUPLICATE_NAMES)
    w1, w2 = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    with pytest.raises(Exception, match="two nodes with same node name"):
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    data = feeds(rng, batches=3, rows=8, features=16)
    result = graphquant.optimize(ir.serde.deserialize_model(proto), calibration=data, show_progress=False)
    (note,) = [note for note in result.report.notes if note.startswith("validated against")]
    assert "name fixing" in note and "onnxruntime cannot load the original model (the input)" in note
    expected = np.concatenate([feed["x"] @ w1 @ w2 for feed in data])
    got = np.concatenate([run(result.model, feed)[0] for feed in data])
    cosine, sqnr = metrics(expected, got)
    assert result.report.outputs["y"].cosine == pytest.approx(cosine, abs=1e-6)
    assert result.report.outputs["y"].sqnr_db == pytest.approx(sqnr, abs=0.01)


# --- an unexpected failure inside a pass names the pass ---


@pytest.mark.parametrize(
    ("pass_class", "label"),
    [(QuantizePass, "quantize"), (FuseActivationPass, "FuseActivation")],
    ids=["cli-named", "lowering"],
)
def test_a_failing_pass_is_named_with_the_first_line_of_its_error(monkeypatch, model_and_data, pass_class, label):
    def broken(self, model):
        raise IndexError("tuple index out of range\nsecond line")

    monkeypatch.setattr(pass_class, "call", broken)
    model, data = model_and_data
    with pytest.raises(InternalError) as raised:
        graphquant.optimize(model, calibration=data, target="ort-cpu", show_progress=False)
    assert str(raised.value) == f"pass {label} failed: IndexError: tuple index out of range"


# --- weights a caller can feed, and models with nothing quantized ---


FED_WEIGHT = """
<ir_version: 8, opset_import: ["" : 17]>
fed (float[N, 16] x, float[16, 8] w1) => (float[N, 4] y) {
  [fc1] h = MatMul(x, w1)
  [fc2] y = MatMul(h, w2)
}
"""


def test_a_weight_that_is_also_a_graph_input_stays_float_and_can_still_be_fed():
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    proto = onnx.parser.parse_model(FED_WEIGHT)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    data = feeds(rng, batches=3, rows=8, features=16)
    result = graphquant.optimize(ir.serde.deserialize_model(proto), calibration=data, show_progress=False)
    decisions = {layer.node: (layer.status, layer.reason) for layer in result.report.layers}
    assert decisions == {
        "fc1": ("float", "weight 'w1' is also a graph input (a caller can feed it)"),
        "fc2": ("quantized", ""),
    }
    other = rng.standard_normal((16, 8)).astype(np.float32)
    x = data[0]["x"]
    (fed,) = run(result.model, {"x": x, "w1": other})
    assert metrics(x @ other @ w2, fed)[1] > 30  # the fed weight is used; only fc2's quantization differs


ACTIVATION_PRODUCTS = """
<ir_version: 8, opset_import: ["" : 17]>
products (float[N, 8] x) => (float[N, 8] y) {
  [square] s = MatMul(x, x)
  [cube] y = MatMul(s, x)
}
"""


def test_zero_of_n_layers_quantized_warns_with_the_reasons():
    model = ir.serde.deserialize_model(onnx.parser.parse_model(ACTIVATION_PRODUCTS))
    data = [{"x": np.eye(8, dtype=np.float32) * 2}]
    with pytest.warns(
        UserWarning, match=r"^0 of 2 layers quantized: 2 x activation x activation MatMul \(left float\)$"
    ):
        result = graphquant.optimize(model, calibration=data, show_progress=False)
    assert result.report.notes == ["0 of 2 layers quantized: 2 x activation x activation MatMul (left float)"]
    np.testing.assert_array_equal(run(result.model, data[0])[0], np.eye(8, dtype=np.float32) * 8)


def test_layers_unnamed_in_the_float_model_get_their_stored_bytes():
    model = mlp(np.random.default_rng(0))  # no node names: the candidate's are given by the name-fixing pass
    assert all(not node.name for node in model.graph)
    data = feeds(np.random.default_rng(1), batches=2, rows=8, features=16)
    result = graphquant.optimize(model, "w8a8", calibration=data, show_progress=False)
    stored = {name: value.const_value.nbytes for name, value in model.graph.initializers.items()}
    matmul, gemm = (layer.node for layer in result.report.quantized)
    # before: the MatMul reads w1; the Gemm reads w2 and its bias b2. After: int8 codes plus per-channel grids.
    assert result.report.layer_bytes[matmul][0] == stored["w1"]
    assert result.report.layer_bytes[gemm][0] == stored["w2"] + stored["b2"]
    assert all(after < before for before, after in result.report.layer_bytes.values())
