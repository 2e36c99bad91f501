"""NBitsAccuracyPass: float compute in MatMulNBits for inputs that int8 rounding per block would spoil, in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import build, run, sqnr_db, weights

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import classify
from graphquant.analysis.simulate import scored_columns
from graphquant.lowering.matmul_nbits import FLOAT_COMPUTE, INT8_COMPUTE, MatMulNBitsLoweringPass
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.nbits_accuracy import NBitsAccuracyPass, scored_dequantized
from graphquant.passes.quantize import QuantizePass
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, INT8_COMPUTE_KEY

F32 = np.float32
LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
layers (float[N, 80] x) => (float[N, 24] y, float[N, 24] z) {
  [fc1] y = MatMul(x, w1)
  [fc2] z = Gemm<transB: int = 1>(x, w2)
}
"""
OUTLIER = 5  # a massive channel: 300x the others in every row, read by a weight row 300x smaller


def feeds(seed: int, massive: bool) -> list[dict[str, np.ndarray]]:
    """Gaussian rows for x, channel OUTLIER 300x larger when ``massive``."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(2):
        x = rng.standard_normal((32, 80)).astype(F32)
        if massive:
            x[:, OUTLIER] *= 300
        data.append({"x": x})
    return data


def lowered(massive: bool, with_pass: bool = True) -> tuple[ir.Model, ir.Model]:
    """(QDQ reference, MatMulNBits form asked for int8 compute) of one W4 weight-only model, with or without the pass."""
    rng = np.random.default_rng(3)
    w1, w2 = weights(rng, 80, 24), weights(rng, 24, 80)
    if massive:
        w1[OUTLIER] /= 300
        w2[:, OUTLIER] /= 300
    model = build(LAYERS, {"w1": w1, "w2": w2})
    calibrator = Calibrator.for_model(model, feeds(4, massive), show_progress=False)
    QuantizePass(calibrator, wbits=4, abits=0, block_size=32)(model)
    if with_pass:
        assert NBitsAccuracyPass(calibrator)(model).modified
    reference = model.clone()
    QdqLoweringPass()(reference)
    MatMulNBitsLoweringPass(INT8_COMPUTE)(model)
    return reference, model


def held_out_sqnr_db(reference: ir.Model, model: ir.Model, massive: bool) -> float:
    """SQNR of the MatMulNBits outputs against the QDQ form's (the same weights with float activations)."""
    pairs = [(run(reference, feed, optimize=False), run(model, feed)) for feed in feeds(5, massive)]
    return sqnr_db(
        np.concatenate([np.ravel(out) for want, _ in pairs for out in want]),
        np.concatenate([np.ravel(out) for _, got in pairs for out in got]),
    )


def test_massive_input_channels_get_float_compute_and_keep_the_qdq_outputs():
    reference, model = lowered(massive=True)
    for name in ("fc1", "fc2"):
        node = model.graph.node(name)
        assert node.op_type == "MatMulNBits" and node.attributes.get_int("accuracy_level") == FLOAT_COMPUTE
        assert "float compute in MatMulNBits" in node.meta[DECISION_KEY].reason
    assert held_out_sqnr_db(reference, model, massive=True) > 80  # float compute: only the QDQ form's own rounding
    # Without the verdict, int8 compute rounds every row's ordinary channels on a step set by the massive one.
    reference, unchecked = lowered(massive=True, with_pass=False)
    assert all(node.attributes.get_int("accuracy_level") == INT8_COMPUTE for node in unchecked.graph)
    assert held_out_sqnr_db(reference, unchecked, massive=True) < 25


def test_ordinary_inputs_keep_int8_compute():
    reference, model = lowered(massive=False)
    for name in ("fc1", "fc2"):
        node = model.graph.node(name)
        assert node.attributes.get_int("accuracy_level") == INT8_COMPUTE
        assert "int8 compute in MatMulNBits" in node.meta[DECISION_KEY].reason
    assert held_out_sqnr_db(reference, model, massive=False) > 30


def test_without_calibration_no_layer_is_marked():
    model = build(LAYERS, {"w1": np.ones((80, 24), F32), "w2": np.ones((24, 80), F32)})
    QuantizePass(None, wbits=4, abits=0, block_size=32)(model)
    assert not NBitsAccuracyPass(None)(model).modified
    assert not any(INT8_COMPUTE_KEY in node.meta for node in model.graph)


WIDE = """
<ir_version: 8, opset_import: ["" : 17]>
wide (float[N, 64] x) => (float[N, 300] y, float[N, 300] z) {
  [fc1] y = MatMul(x, w1)
  [fc2] z = Gemm<transB: int = 1>(x, w2)
}
"""


@pytest.mark.parametrize("block_size", [32, None])
def test_the_scored_columns_dequantize_to_the_whole_weights_columns_bit_for_bit(block_size: int | None):
    rng = np.random.default_rng(7)
    model = build(WIDE, {"w1": weights(rng, 64, 300), "w2": weights(rng, 300, 64)})
    calibrator = Calibrator.for_model(model, [{"x": rng.standard_normal((16, 64)).astype(F32)}], show_progress=False)
    QuantizePass(calibrator, wbits=4, abits=0, block_size=block_size, weight_symmetric=False)(model)
    for node in model.graph:
        layer = classify(node).layer
        spec = node.meta[INPUT_SPECS_KEY][layer.weight_index]
        whole = spec.dequantize(spec.quantize(layer.weight_array))
        whole = whole if layer.in_axis == 0 else whole.T
        columns = scored_columns(300)
        assert len(columns) < 300
        np.testing.assert_array_equal(scored_dequantized(layer, spec), whole[:, columns])
