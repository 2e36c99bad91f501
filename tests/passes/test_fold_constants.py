"""FoldConstantsPass: weights computed from constants become initializers (outputs unchanged); quantized models are
refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import assert_same_outputs, build, gaussian_feeds, mlp, run, weights

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.errors import InvalidModelError
from graphquant.passes import FoldConstantsPass

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def matmul_through(expression: str) -> str:
    """A graph x[N,16] @ w[16,8] where w is computed by ``expression`` from constants."""
    return f"{HEADER}\nweighted (float[N, 16] x) => (float[N, 8] y) {{\n  w = {expression}\n  y = MatMul(x, w)\n}}"


def constant_node_text(array: np.ndarray) -> str:
    """A Constant node holding ``array`` (float32) in onnx.parser syntax."""
    values = ", ".join(repr(float(v)) for v in array.ravel())
    return f"Constant<value: tensor = float[{', '.join(map(str, array.shape))}] {{{values}}}>()"


def weight_forms() -> dict[str, ir.Model]:
    """The ways real exports compute a constant weight, each as a MatMul's [16, 8] weight."""
    rng = np.random.default_rng(40)
    w = weights(rng, 16, 8)
    codes = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    scale = (0.01 + 0.01 * rng.random(8)).astype(np.float32)
    return {
        "cast-fp16": build(matmul_through("Cast<to: int = 1>(w16)"), {"w16": w.astype(np.float16)}),
        "identity": build(matmul_through("Identity(w0)"), {"w0": w}),
        "reshape": build(matmul_through("Reshape(w0, shape)"), {"w0": w.ravel(), "shape": np.array([16, 8])}),
        "transpose": build(matmul_through("Transpose<perm: ints = [1, 0]>(w0)"), {"w0": w.T.copy()}),
        "dequantize": build(
            matmul_through("DequantizeLinear<axis: int = 1>(codes, scale, zero)"),
            {"codes": codes, "scale": scale, "zero": np.zeros(8, np.int8)},
        ),
        "dequantize-rows": build(
            matmul_through("DequantizeLinear<axis: int = 0>(codes, rows, zeros)"),
            {
                "codes": codes,
                "rows": np.linspace(0.01, 0.02, 16, dtype=np.float32),
                "zeros": np.arange(16, dtype=np.int8),
            },
        ),
        "constant-of-shape": build(
            matmul_through("ConstantOfShape<value: tensor = float[1] {0.25}>(shape)"), {"shape": np.array([16, 8])}
        ),
        "constant-node": build(matmul_through(constant_node_text(w))),
    }


@pytest.mark.parametrize("form", sorted(weight_forms()))
def test_a_computed_weight_becomes_an_initializer_with_the_same_outputs(form: str) -> None:
    model = weight_forms()[form]
    reference = model.clone()
    assert FoldConstantsPass()(model).modified
    (node,) = list(model.graph)
    assert node.op_type == "MatMul"
    assert node.inputs[1].is_initializer()
    assert node.inputs[1].dtype == ir.DataType.FLOAT
    assert list(model.graph.initializers) == [node.inputs[1].name]
    for feed in gaussian_feeds(seed=41, batches=2):
        # Unoptimized: onnxruntime would otherwise run DequantizeLinear -> MatMul as an integer kernel.
        np.testing.assert_allclose(run(model, feed)[0], run(reference, feed, optimize=False)[0], rtol=1e-5, atol=1e-5)


LARGE_SHARED = f"""{HEADER}
large (float[N, 96] x) => (float[N, 96] y, float[N, 96] z, float[N, 720] u) {{
  t = Transpose<perm: ints = [1, 0]>(w)
  y = MatMul(x, t)
  z = MatMul(x, w)
  filled = ConstantOfShape<value: tensor = float[1] {{0.5}}>(shape)
  u = MatMul(x, filled)
}}
"""


def test_weights_past_the_folders_default_size_limits_are_folded_and_a_shared_weight_stays() -> None:
    # w (9216 elements, two readers) is past onnxscript's input limit; filled (69120 elements from a 2-element
    # shape) would be refused by its default output-growth limit and its ConstantOfShape rule.
    rng = np.random.default_rng(42)
    model = build(LARGE_SHARED, {"w": weights(rng, 96, 96), "shape": np.array([96, 720])})
    reference = model.clone()
    assert FoldConstantsPass()(model).modified
    assert [node.op_type for node in model.graph] == ["MatMul", "MatMul", "MatMul"]
    assert all(node.inputs[1].is_initializer() for node in model.graph)
    assert "w" in model.graph.initializers  # still read by the second MatMul
    assert_same_outputs(reference, model, gaussian_feeds(seed=43, batches=2, features=96))


def test_a_model_with_nothing_to_fold_is_not_modified() -> None:
    model = mlp(np.random.default_rng(44))
    before = ir.to_proto(model).SerializeToString()
    assert not FoldConstantsPass()(model).modified
    assert ir.to_proto(model).SerializeToString() == before


OVERRIDABLE = f"""{HEADER}
overridable (float[N, 8] x, float[8, 8] w) => (float[N, 8] y) {{
  t = Transpose<perm: ints = [1, 0]>(w)
  y = MatMul(x, t)
}}
"""


def test_an_initializer_that_is_also_a_graph_input_is_not_folded() -> None:
    # A caller may feed w, so t is not a constant.
    model = build(OVERRIDABLE, {"w": weights(np.random.default_rng(45), 8, 8)})
    assert not FoldConstantsPass()(model).modified
    assert [node.op_type for node in model.graph] == ["Transpose", "MatMul"]
    feed = {"x": np.ones((2, 8), np.float32), "w": np.eye(8, dtype=np.float32)}
    (expected,) = onnx.reference.ReferenceEvaluator(ir.to_proto(model)).run(None, feed)
    np.testing.assert_allclose(expected, feed["x"])


SPLIT_WEIGHT = """<ir_version: 8, opset_import: ["" : 18]>
split (float[N, 16] x) => (float[N, 8] y, float[N, 8] z) {
  a, b = Split<axis: int = 1, num_outputs: int = 2>(w)
  y = MatMul(x, a)
  z = MatMul(x, b)
}
"""


def test_a_constant_node_with_several_outputs_is_left_to_run_without_a_log_line(capsys) -> None:
    model = build(SPLIT_WEIGHT, {"w": weights(np.random.default_rng(50), 16, 16)})
    assert not FoldConstantsPass()(model).modified
    assert [node.op_type for node in model.graph] == ["Split", "MatMul", "MatMul"]
    assert capsys.readouterr().err == ""


def test_folding_is_deterministic() -> None:
    outputs = []
    for _ in range(2):
        model = weight_forms()["dequantize"]
        FoldConstantsPass()(model)
        outputs.append(ir.to_proto(model).SerializeToString())
    assert outputs[0] == outputs[1]


def test_external_weights_that_nothing_folds_stay_on_disk(tmp_path) -> None:
    rng = np.random.default_rng(46)
    text = f"""{HEADER}
    mixed (float[N, 64] x) => (float[N, 64] y) {{
      t = Transpose<perm: ints = [1, 0]>(small)
      h = MatMul(x, t)
      y = MatMul(h, big)
    }}
    """
    small, big = weights(rng, 64, 64), weights(rng, 64, 64)
    ir.save(
        build(text, {"small": small, "big": big}),
        tmp_path / "mixed.onnx",
        external_data="mixed.data",
        size_threshold_bytes=0,
    )
    model = graphquant.load(tmp_path / "mixed.onnx")
    assert FoldConstantsPass()(model).modified
    assert isinstance(model.graph.initializers["big"].const_value, ir.ExternalTensor)
    assert [node.op_type for node in model.graph] == ["MatMul", "MatMul"]
    ir.save(model, tmp_path / "folded.onnx", external_data="folded.data")
    session = ort.InferenceSession(str(tmp_path / "folded.onnx"), providers=["CPUExecutionProvider"])
    x = gaussian_feeds(seed=47, batches=1, features=64)[0]["x"]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ small.T @ big, rtol=1e-4, atol=1e-4)


QDQ = f"""{HEADER}
qdq (float[N, 16] x) => (float[N, 8] y) {{
  q = QuantizeLinear(x, xs, xz)
  d = DequantizeLinear(q, xs, xz)
  w = DequantizeLinear<axis: int = 1>(codes, ws, wz)
  y = MatMul(d, w)
}}
"""
QLINEAR = f"""{HEADER}
qlinear (uint8[N, 16] x) => (uint8[N, 8] y) {{
  y = QLinearMatMul(x, xs, xz, codes, s1, z1, xs, xz)
}}
"""
INTEGER = f"""{HEADER}
integer (uint8[N, 16] x) => (int32[N, 8] y) {{
  y = MatMulInteger(x, codes)
}}
"""
DYNAMIC = f"""{HEADER}
dynamic (float[N, 16] x) => (uint8[N, 16] y, float s, uint8 z) {{
  y, s, z = DynamicQuantizeLinear(x)
}}
"""
NBITS = """<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
nbits (float[N, 16] x) => (float[N, 8] y) {
  y = com.microsoft.MatMulNBits<K: int = 16, N: int = 8, bits: int = 4, block_size: int = 16>(x, packed, scales)
}
"""


def quantized_models() -> dict[str, tuple[ir.Model, str]]:
    """Already-quantized graphs (QDQ, QOperator, integer, dynamic, MatMulNBits), each with its op named."""
    codes = np.ones((16, 8), np.int8)
    scale = np.array(0.1, np.float32)
    zero = np.array(128, np.uint8)
    return {
        "qdq": (
            build(
                QDQ,
                {
                    "xs": scale,
                    "xz": zero,
                    "codes": codes,
                    "ws": np.full(8, 0.01, np.float32),
                    "wz": np.zeros(8, np.int8),
                },
            ),
            "1 QuantizeLinear",
        ),
        "qlinear": (
            build(QLINEAR, {"xs": scale, "xz": zero, "codes": codes, "s1": scale, "z1": np.array(0, np.int8)}),
            "1 QLinearMatMul",
        ),
        "integer": (build(INTEGER, {"codes": codes}), "1 MatMulInteger"),
        "dynamic": (build(DYNAMIC), "1 DynamicQuantizeLinear"),
        "nbits": (
            ir.serde.deserialize_model(
                _with_initializers(NBITS, {"packed": np.zeros((8, 1, 8), np.uint8), "scales": np.ones(8, np.float32)})
            ),
            "1 MatMulNBits",
        ),
    }


def _with_initializers(text: str, initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A parsed model with initializers added (no checker: MatMulNBits is a contrib op)."""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in initializers.items())
    return proto


@pytest.mark.parametrize("kind", sorted(quantized_models()))
def test_an_already_quantized_model_is_refused_naming_its_quantized_ops(kind: str) -> None:
    model, named = quantized_models()[kind]
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(InvalidModelError, match="already quantized") as refusal:
        FoldConstantsPass()(model)
    message = str(refusal.value)
    assert named in message and "\n" not in message
    assert ir.to_proto(model).SerializeToString() == before


def test_a_quantized_file_is_refused_by_optimize_before_its_calibration_data_is_read(tmp_path, monkeypatch) -> None:
    model, _ = quantized_models()["qdq"]
    path = tmp_path / "already.onnx"
    ir.save(model, path)

    def no_calibration(*_: object, **__: object) -> None:
        raise AssertionError("calibration data was read for a quantized model")

    monkeypatch.setattr(Calibrator, "for_model", no_calibration)
    with pytest.raises(InvalidModelError, match=f"{path.name}: already quantized \\(1 QuantizeLinear\\)"):
        graphquant.optimize(graphquant.load(path), "w8a8", calibration=gaussian_feeds(seed=48, batches=1))


def test_a_dequantized_constant_weight_is_folded_and_then_quantized() -> None:
    model = weight_forms()["dequantize"]
    result = graphquant.optimize(model, "w8a8", calibration=gaussian_feeds(seed=49, batches=2), show_progress=False)
    assert [layer.op_type for layer in result.report.quantized] == ["MatMul"]
    assert result.report.outputs["y"].sqnr_db > 30.0
    assert "DequantizeLinear" in [node.op_type for node in result.model.graph]  # the new int8 weight's
