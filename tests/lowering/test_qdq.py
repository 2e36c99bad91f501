"""QDQ lowering: QuantizeLinear/DequantizeLinear pairs that onnxruntime runs like a numpy fake-quant reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from builders import build, feeds, initializer, named_mlp, qkv, run, weights
from graphquant.analysis.calibration import Calibrator
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import QuantizePass
from graphquant.quant_spec import INPUT_SPECS_KEY

F32 = np.float32


def quantize_and_lower(model: ir.Model, data) -> ir.passes.PassResult:
    QuantizePass(Calibrator.for_model(model, data, show_progress=False))(model)
    return QdqLoweringPass()(model)


def fake_quant_weight(w: np.ndarray, out_axis: int, bits: int = 8) -> np.ndarray:
    """Symmetric per-output-channel fake quantization, round half to even."""
    qmax = 2 ** (bits - 1) - 1
    reduce = tuple(axis for axis in range(w.ndim) if axis != out_axis)
    scale = (np.abs(w).max(axis=reduce, keepdims=True) / F32(qmax)).astype(F32)
    return (np.clip(np.rint(w / scale), -qmax, qmax) * scale).astype(F32)


def fake_quant_activation(x: np.ndarray, absmax: float, unsigned: bool = False) -> np.ndarray:
    """Per-tensor int8 (or, for a non-negative tensor, uint8 [0, absmax]) fake quantization as Q/DQ compute it."""
    scale = F32(absmax) / F32(255 if unsigned else 127)
    return (np.clip(np.rint(x / scale), 0 if unsigned else -128, 255 if unsigned else 127) * scale).astype(F32)


def producer_op(value: ir.Value) -> str | None:
    producer = value.producer()
    return None if producer is None else producer.op_type


@pytest.fixture
def lowered_mlp():
    rng = np.random.default_rng(0)
    model = named_mlp(rng)
    float_weights = {name: initializer(model, name) for name in ("w1", "b1", "w2", "b2")}
    data = feeds(rng, batches=4, rows=8, features=16)
    result = quantize_and_lower(model, data)
    return model, float_weights, data, result


def test_onnxruntime_matches_numpy_fake_quant(lowered_mlp):
    model, w, data, _ = lowered_mlp
    x_all = np.concatenate([feed["x"] for feed in data])
    x_absmax = float(np.abs(x_all).max())
    r_absmax = float(np.maximum(x_all @ w["w1"] + w["b1"], 0).max())
    w1_q = fake_quant_weight(w["w1"], out_axis=1)
    w2_q = fake_quant_weight(w["w2"], out_axis=0)
    for feed in data:
        x = feed["x"]
        r = np.maximum(fake_quant_activation(x, x_absmax) @ w1_q + w["b1"], 0)
        expected = fake_quant_activation(r, r_absmax, unsigned=True) @ w2_q.T + w["b2"]
        (got,) = run(model, feed)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        float_out = np.maximum(x @ w["w1"] + w["b1"], 0) @ w["w2"].T + w["b2"]
        assert np.abs(got - float_out).max() > 1e-3  # the quantization is real


def test_graph_holds_the_expected_qdq_nodes(lowered_mlp):
    model, _, _, result = lowered_mlp
    assert result.modified
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    ops = [node.op_type for node in model.graph]
    assert ops.count("QuantizeLinear") == 2  # the activations x and r
    assert ops.count("DequantizeLinear") == 4  # x, r, w1, w2
    by_name = {node.name: node for node in model.graph}
    fc1, fc2 = by_name["fc1"], by_name["fc2"]
    assert not any(INPUT_SPECS_KEY in node.meta for node in model.graph)

    weight_dq = fc1.inputs[1].producer()
    assert weight_dq.op_type == "DequantizeLinear"
    assert weight_dq.attributes["axis"].value == 1
    codes, scale, zero_point = weight_dq.inputs
    assert codes.const_value.numpy().dtype == np.int8
    assert scale.const_value.numpy().shape == (8,)
    assert zero_point.const_value.numpy().dtype == np.int8
    assert fc2.inputs[1].producer().attributes["axis"].value == 0  # Gemm transB

    activation_dq = fc1.inputs[0].producer()
    assert activation_dq.op_type == "DequantizeLinear"
    assert "axis" not in activation_dq.attributes  # per tensor
    quantize = activation_dq.inputs[0].producer()
    assert quantize.op_type == "QuantizeLinear" and quantize.inputs[0].name == "x"
    assert quantize.inputs[1] is activation_dq.inputs[1] and quantize.inputs[2] is activation_dq.inputs[2]
    assert producer_op(fc2.inputs[0]) == "DequantizeLinear"
    assert fc2.inputs[2].name == "b2"  # the bias stays a float initializer


def test_float_weights_are_removed(lowered_mlp):
    model, w, _, _ = lowered_mlp
    names = set(model.graph.initializers)
    assert "w1" not in names and "w2" not in names
    assert {"w1_quantized", "w2_quantized", "b1", "b2"} <= names
    w1_codes = initializer(model, "w1_quantized")
    w1_scale = initializer(model, "w1_scale")
    np.testing.assert_allclose(w1_codes * w1_scale, fake_quant_weight(w["w1"], out_axis=1), rtol=1e-6)


def test_lowering_again_is_a_no_op(lowered_mlp):
    model, _, _, _ = lowered_mlp
    before = [(node.op_type, node.name) for node in model.graph]
    assert not QdqLoweringPass()(model).modified
    assert [(node.op_type, node.name) for node in model.graph] == before


def test_one_qdq_pair_per_shared_tensor():
    rng = np.random.default_rng(1)
    model = qkv(rng)
    data = feeds(rng, batches=2, rows=4, features=8)
    quantize_and_lower(model, data)
    ops = [node.op_type for node in model.graph]
    assert ops.count("QuantizeLinear") == 1
    assert ops.count("DequantizeLinear") == 4  # x once, three weights
    by_name = {node.name: node for node in model.graph}
    shared = {by_name[name].inputs[0] for name in ("q_proj", "k_proj", "v_proj")}
    assert len(shared) == 1 and producer_op(shared.pop()) == "DequantizeLinear"
    assert by_name["residual"].inputs[0].name == "x"  # the residual still reads the float input
    x = data[0]["x"]
    q, k, v, res = run(model, data[0])
    np.testing.assert_allclose(res, x + v, rtol=1e-6, atol=1e-6)


TIED = """
<ir_version: 8, opset_import: ["" : 17]>
tied (float[N, 4] a, float[N, 4] b) => (float[N, 4] ya, float[N, 4] yb) {
  [left] ya = MatMul(a, w)
  [right] yb = MatMul(b, w)
}
"""


def test_a_tied_weight_is_dequantized_once():
    rng = np.random.default_rng(2)
    w = weights(rng, 4, 4)
    model = build(TIED, {"w": w})
    data = [{"a": rng.standard_normal((3, 4)).astype(F32), "b": rng.standard_normal((3, 4)).astype(F32)}]
    quantize_and_lower(model, data)
    by_name = {node.name: node for node in model.graph}
    assert by_name["left"].inputs[1] is by_name["right"].inputs[1]
    assert [node.op_type for node in model.graph].count("DequantizeLinear") == 3  # a, b, w
    assert "w" not in model.graph.initializers
    ya, _ = run(model, data[0])
    expected = fake_quant_activation(data[0]["a"], np.abs(data[0]["a"]).max()) @ fake_quant_weight(w, out_axis=1)
    np.testing.assert_allclose(ya, expected, rtol=1e-5, atol=1e-5)


OLD_OPSET = """
<ir_version: 7, opset_import: ["" : 11]>
old (float[N, 4] x) => (float[N, 4] y) {
  y = MatMul(x, w)
}
"""


def test_lowering_needs_opset_13_for_annotated_models():
    rng = np.random.default_rng(3)
    model = build(OLD_OPSET, {"w": weights(rng, 4, 4)})
    assert not QdqLoweringPass()(model).modified  # nothing annotated: nothing to refuse
    QuantizePass(None, abits=None)(model)
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 13"):
        QdqLoweringPass()(model)


def test_four_bit_weights_are_stored_as_int4_after_an_opset_21_upgrade():
    rng = np.random.default_rng(7)
    model = named_mlp(rng)
    w1 = initializer(model, "w1")
    data = feeds(rng, batches=4, rows=8, features=16)
    QuantizePass(Calibrator.for_model(model, data, show_progress=False), wbits=4, abits=None)(model)
    QdqLoweringPass()(model)
    assert model.graph.opset_imports[""] == 21
    int4 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.INT4]
    assert len(int4) == 4  # two weights and their zero points
    fc1 = next(node for node in model.graph if node.name == "fc1")
    dequantize = fc1.inputs[1].producer()
    assert dequantize.op_type == "DequantizeLinear" and dequantize.attributes.get_int("axis") == 1
    codes = dequantize.inputs[0].const_value.numpy()
    assert codes.min() >= -7 and codes.max() <= 7
    # onnxruntime reads the INT4 weight back to the 4-bit fake-quantized values.
    probe = np.eye(16, dtype=np.float32)
    hidden = run(model, {"x": probe})[0]
    w2 = fake_quant_weight(initializer(named_mlp(np.random.default_rng(7)), "w2"), out_axis=0, bits=4)
    b1, b2 = initializer(model, "b1"), initializer(model, "b2")
    expected = np.maximum(probe @ fake_quant_weight(w1, out_axis=1, bits=4) + b1, 0) @ w2.T + b2
    np.testing.assert_allclose(hidden, expected, rtol=1e-5, atol=1e-5)


def test_four_bit_activations_use_int4_quantize_linear():
    rng = np.random.default_rng(8)
    model = named_mlp(rng)
    data = feeds(rng, batches=4, rows=8, features=16)
    QuantizePass(Calibrator.for_model(model, data, show_progress=False), wbits=4, abits=4)(model)
    QdqLoweringPass()(model)
    quantizers = {node.inputs[0].name: node for node in model.graph if node.op_type == "QuantizeLinear"}
    assert quantizers["x"].inputs[2].const_value.dtype == ir.DataType.INT4
    assert quantizers["r"].inputs[2].const_value.dtype == ir.DataType.UINT4  # the Relu output's unsigned grid
    assert not any(node.op_type == "Clip" for node in model.graph)
    (y,) = run(model, data[0])
    assert np.all(np.isfinite(y))


BLOCKED_CONV = """
<ir_version: 8, opset_import: ["" : 17]>
blocked (float[N, 16, 8, 8] x) => (float[N, 12, 8, 8] y, float[N, 6, 8, 8] z) {
  [full] y = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, w, b)
  [odd] z = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, v)
}
"""


@pytest.mark.parametrize("wbits", [8, 4])
def test_blocked_conv_weights_are_a_blocked_dequantize_linear_on_axis_1(wbits):
    """Blocks of input channels at one tap: onnxruntime runs the opset-21 form as written, optimized or not."""
    rng = np.random.default_rng(30)
    init = {"w": weights(rng, 12, 16, 3, 3), "b": weights(rng, 12), "v": weights(rng, 6, 16, 3, 3)}
    model = build(BLOCKED_CONV, init)
    data = [{"x": rng.standard_normal((2, 16, 8, 8)).astype(F32)}]
    QuantizePass(Calibrator.for_model(model, data, show_progress=False), wbits=wbits, block_size=8)(model)
    specs = [node.meta[INPUT_SPECS_KEY][1] for node in model.graph]
    QdqLoweringPass()(model)
    dequantizers = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    assert {(n.attributes.get_int("axis"), n.attributes.get_int("block_size")) for n in dequantizers} == {(1, 8)}
    assert [spec.scale.shape for spec in specs] == [(12, 2, 3, 3), (6, 2, 3, 3)]
    for name, spec in zip("wv", specs):
        # Each block of 8 input channels at one tap has its own range: absmax / qmax.
        blocks = init[name].reshape(init[name].shape[0], 2, 8, 3, 3)
        np.testing.assert_allclose(spec.scale, np.abs(blocks).max(axis=2) / spec.qmax, rtol=1e-6)
    optimized, plain = run(model, data[0]), run(model, data[0], optimize=False)
    for got, want in zip(optimized, plain):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
