"""QOperator lowering: MatMul/Gemm to QLinearMatMul or MatMulInteger, checked against the QDQ form in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

import graphquant
from builders import build, by_name, feeds, named_mlp, ops, run, weights
from graphquant.analysis.calibration import Calibrator
from graphquant.lowering import TARGETS
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.lowering.qoperator import QOperatorLoweringPass
from graphquant.lowering.unsigned_weights import UnsignedWeightsPass
from graphquant.passes.quantize import QuantizePass
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY

F32 = np.float32
# Where the integer form computes exactly what QDQ computes, only float rounding differs.
FLOAT_RTOL = 1e-5


def lowered_pair(text: str, init: dict[str, np.ndarray], data):
    """The same annotation lowered by QOperatorLoweringPass (then QDQ) and by QDQ alone; plus the annotations."""
    candidate, reference = build(text, init), build(text, init)
    for model in (candidate, reference):
        QuantizePass(Calibrator.for_model(model, data, show_progress=False))(model)
    annotations = {
        node.name: dict(node.meta[INPUT_SPECS_KEY]) for node in candidate.graph if INPUT_SPECS_KEY in node.meta
    }
    result = QOperatorLoweringPass()(candidate)
    QdqLoweringPass()(candidate)
    RemoveUnusedNodesPass()(candidate)
    QdqLoweringPass()(reference)
    onnx.checker.check_model(ir.to_proto(candidate))
    return candidate, reference, annotations, result


def assert_float_rounding_apart(candidate: ir.Model, reference: ir.Model, data) -> None:
    """Every output within FLOAT_RTOL of QDQ's, relative to the output's magnitude."""
    for feed in data:
        for got, expected in zip(run(candidate, feed), run(reference, feed), strict=True):
            np.testing.assert_allclose(got, expected, rtol=FLOAT_RTOL, atol=FLOAT_RTOL * np.abs(expected).max())


MATMUL = """
<ir_version: 8, opset_import: ["" : 17]>
matmul (float[B, S, 16] x) => (float[B, S, 8] y) {
  [fc] y = MatMul(x, w)
}
"""


def test_matmul_to_a_float_reader_becomes_matmul_integer_and_matches_qdq_to_float_rounding():
    rng = np.random.default_rng(0)
    init = {"w": weights(rng, 16, 8)}
    data = [{"x": rng.standard_normal((2, 5, 16)).astype(F32)} for _ in range(3)]
    model, reference, annotations, result = lowered_pair(MATMUL, init, data)
    assert result.modified
    assert ops(model) == ["QuantizeLinear", "MatMulInteger", "Cast", "Mul"]
    specs = annotations["fc"]
    matmul = by_name(model)["fc"]
    x, w, x_zero_point = matmul.inputs
    assert x.dtype == ir.DataType.UINT8 and int(x_zero_point.const_value.numpy()) == 128
    np.testing.assert_array_equal(w.const_value.numpy(), specs[1].quantize(init["w"]))
    assert matmul.outputs[0].dtype == ir.DataType.INT32 and matmul.meta[DECISION_KEY].status == "quantized"
    mul = next(node for node in model.graph if node.op_type == "Mul")
    np.testing.assert_allclose(mul.inputs[1].const_value.numpy(), specs[0].scale * specs[1].scale, rtol=1e-7)
    assert_float_rounding_apart(model, reference, data)


GEMM = """
<ir_version: 8, opset_import: ["" : 17]>
gemm (float[N, 16] x) => (float[N, 8] y) {
  [fc] y = Gemm<transB: int = 1>(x, w, c)
}
"""


def test_gemm_becomes_matmul_integer_cast_mul_add():
    rng = np.random.default_rng(1)
    init = {"w": weights(rng, 8, 16), "c": weights(rng, 8)}
    data = feeds(rng, batches=3, rows=8, features=16)
    model, reference, annotations, _ = lowered_pair(GEMM, init, data)
    assert ops(model) == ["QuantizeLinear", "MatMulInteger", "Cast", "Mul", "Add"]
    np.testing.assert_array_equal(
        by_name(model)["fc"].inputs[1].const_value.numpy(), annotations["fc"][1].quantize(init["w"]).T
    )
    assert_float_rounding_apart(model, reference, data)


MATMUL_BIAS = """
<ir_version: 8, opset_import: ["" : 17]>
matmul_bias (float[N, 16] x) => (float[N, 8] y) {
  [fc] h = MatMul(x, w)
  [bias] y = Add(h, b)
}
"""


def test_a_matmul_keeps_its_bias_add():
    rng = np.random.default_rng(2)
    init = {"w": weights(rng, 16, 8), "b": weights(rng, 8)}
    data = feeds(rng, batches=3, rows=8, features=16)
    model, reference, _, _ = lowered_pair(MATMUL_BIAS, init, data)
    assert ops(model) == ["QuantizeLinear", "MatMulInteger", "Cast", "Mul", "Add"]
    assert by_name(model)["bias"].inputs[0].producer().op_type == "Mul"
    assert_float_rounding_apart(model, reference, data)


CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
chain (float[N, 16] x) => (float[N, 4] y) {
  [fc1] h = MatMul(x, w1)
  [fc2] y = MatMul(h, w2)
}
"""


def test_a_matmul_read_only_by_a_quantized_layer_becomes_qlinear_matmul_on_the_reader_s_grid():
    rng = np.random.default_rng(4)
    init = {"w1": weights(rng, 16, 8), "w2": weights(rng, 8, 4)}
    data = feeds(rng, batches=3, rows=8, features=16)
    model, reference, annotations, _ = lowered_pair(CHAIN, init, data)
    assert ops(model) == ["QuantizeLinear", "QLinearMatMul", "MatMulInteger", "Cast", "Mul"]
    nodes = by_name(model)
    assert nodes["fc2"].inputs[0] is nodes["fc1"].outputs[0]  # fc1's codes go straight into fc2
    x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point = nodes["fc1"].inputs
    x_spec, w_spec, h_spec = annotations["fc1"][0], annotations["fc1"][1], annotations["fc2"][0]
    assert x.dtype == ir.DataType.UINT8 and int(x_zero_point.const_value.numpy()) == 128
    assert float(x_scale.const_value.numpy()) == float(x_spec.scale)
    np.testing.assert_array_equal(w.const_value.numpy(), w_spec.quantize(init["w1"]))
    np.testing.assert_array_equal(w_scale.const_value.numpy(), w_spec.scale)  # per column
    assert w_zero_point.const_value.numpy().shape == (8,) and not w_zero_point.const_value.numpy().any()
    assert float(y_scale.const_value.numpy()) == float(h_spec.scale) and int(y_zero_point.const_value.numpy()) == 128
    # QDQ rounds the float h to the same grid; QLinearMatMul may round a code the other way (at most one code),
    # which moves y by at most sum_k |w2[k, n]| * h_step.
    bound = float(np.abs(init["w2"]).sum(axis=0).max()) * float(h_spec.scale)
    for feed in data:
        difference = np.abs(run(model, feed)[0] - run(reference, feed)[0])
        assert difference.max() <= bound + 1e-5
        assert np.mean(difference < 1e-5) > 0.5  # most outputs see no rounding difference at all


def test_qoperator_target_on_an_mlp_fuses_the_relu_and_matches_qdq():
    rng = np.random.default_rng(5)
    data = feeds(rng, batches=4, rows=16, features=16)
    held_out = feeds(rng, batches=2, rows=16, features=16)
    seed = int(rng.integers(1 << 30))
    model = named_mlp(np.random.default_rng(seed))
    assert TARGETS["qoperator"][-2:] == (QdqLoweringPass, UnsignedWeightsPass)
    results = {
        target: graphquant.optimize(model, "w8a8", data, target=target, validation=held_out, show_progress=False)
        for target in ("qoperator", "qdq")
    }
    lowered = results["qoperator"].model
    # fc1 (MatMul + bias Add) and fc2 (Gemm) go to MatMulInteger; the Relu is gone into fc2's unsigned input grid.
    assert ops(lowered) == ["QuantizeLinear", "MatMulInteger", "Cast", "Mul", "Add"] * 2
    relu_grid = next(node for node in lowered.graph if node.op_type == "QuantizeLinear" and node.inputs[0].name == "hb")
    assert relu_grid.outputs[0].dtype == ir.DataType.UINT8 and int(relu_grid.inputs[2].const_value.numpy()) == 0
    assert results["qoperator"].report.outputs["y"].sqnr_db > 30
    # Float rounding apart, except where it moves fc2's input across a rounding boundary: one code, which moves
    # y by at most sum_k |w2[n, k]| * step.
    w2 = model.graph.initializers["w2"].const_value.numpy()
    bound = float(np.abs(w2).sum(axis=1).max()) * float(relu_grid.inputs[1].const_value.numpy())
    for feed in held_out:
        difference = np.abs(run(lowered, feed)[0] - run(results["qdq"].model, feed)[0])
        assert difference.max() <= bound + 1e-5
        assert np.mean(difference < 1e-4) > 0.9
