"""BiasCorrectPass: each quantized Conv/Gemm's bias absorbs the mean output shift its quantization causes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from builders import build, run, weights
from graphquant.analysis.calibration import Calibrator
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.bias_correct import BiasCorrectPass
from graphquant.passes.quantize import QuantizePass
from graphquant.quant_spec import INPUT_SPECS_KEY

F32 = np.float32

# A small CNN: conv (no bias) -> Relu -> depthwise -> Relu -> pointwise -> global pool -> Gemm.
CNN = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N, 3, 12, 12] x) => (float[N, 5] y) {
  [conv1] c1 = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, w1)
  r1 = Relu(c1)
  [depthwise] d = Conv<group: int = 8, pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(r1, wd, bd)
  r2 = Relu(d)
  [pointwise] p = Conv<kernel_shape: ints = [1, 1]>(r2, wp, bp)
  g = GlobalAveragePool(p)
  f = Flatten(g)
  [fc] y = Gemm<transB: int = 1>(f, wf, bf)
}
"""

SINGLE = """
<ir_version: 8, opset_import: ["" : 17]>
single (float[N, 3, 12, 12] x) => (float[N, 8, 12, 12] y) {
  [conv1] y = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, w1)
}
"""


def cnn(rng: np.random.Generator) -> ir.Model:
    init = {
        "w1": weights(rng, 8, 3, 3, 3),
        "wd": weights(rng, 8, 1, 3, 3),
        "bd": weights(rng, 8, scale=0.1),
        "wp": weights(rng, 16, 8, 1, 1),
        "bp": weights(rng, 16, scale=0.1),
        "wf": weights(rng, 5, 16),
        "bf": weights(rng, 5, scale=0.1),
    }
    return build(CNN, init)


def images(seed: int, batches: int = 4) -> list[dict[str, np.ndarray]]:
    """Images with a positive mean, so that weight rounding errors shift the outputs' means."""
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((8, 3, 12, 12)) + 1.0).astype(F32)} for _ in range(batches)]


CALIB, HELD_OUT = images(0), images(1)


def quantized(model: ir.Model, correct: bool, wbits: int = 4, abits: int | None = 8) -> ir.Model:
    """A QDQ model: quantize (W4 by default, so the shifts are large), optionally bias-correct, lower."""
    copy = model.clone()
    calibrator = Calibrator.for_model(copy, CALIB, show_progress=False)
    QuantizePass(calibrator, wbits=wbits, abits=abits)(copy)
    if correct:
        assert BiasCorrectPass(calibrator)(copy).modified
    QdqLoweringPass()(copy)
    return copy


def outputs(model: ir.Model, data: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([run(model, feed)[0] for feed in data])


def test_corrected_biases_remove_most_of_the_mean_output_error_on_held_out_data():
    model = cnn(np.random.default_rng(0))
    expected = outputs(model, HELD_OUT)
    plain = outputs(quantized(model, correct=False), HELD_OUT) - expected
    corrected = outputs(quantized(model, correct=True), HELD_OUT) - expected
    plain_shift, corrected_shift = np.abs(plain.mean(axis=0)), np.abs(corrected.mean(axis=0))
    assert corrected_shift.mean() < 0.5 * plain_shift.mean(), (plain_shift, corrected_shift)
    assert np.mean(corrected**2) < np.mean(plain**2)


def test_the_correction_of_one_layer_is_the_mean_of_its_weight_error_convolved_with_the_input():
    model = build(SINGLE, {"w1": weights(np.random.default_rng(3), 8, 3, 3, 3)})
    float_weight = model.graph.initializers["w1"].const_value.numpy()
    copy = model.clone()
    calibrator = Calibrator.for_model(copy, CALIB, show_progress=False)
    QuantizePass(calibrator, wbits=4, abits=None)(copy)
    spec = copy.graph.node(0).meta[INPUT_SPECS_KEY][1]
    error = spec.dequantize(spec.quantize(float_weight)) - float_weight
    # E[conv(x, W_q) - conv(x, W)] = E[conv(x, W_q - W)], zero padding included, from onnxruntime.
    error_model = build(SINGLE, {"w1": error})
    expected_shift = np.mean([run(error_model, feed)[0].mean(axis=(0, 2, 3)) for feed in CALIB], axis=0)

    assert BiasCorrectPass(calibrator)(copy).modified
    bias = copy.graph.node(0).inputs[2].const_value.numpy()
    np.testing.assert_allclose(bias, -expected_shift, rtol=1e-4, atol=1e-6)
    assert np.abs(expected_shift).max() > 1e-3  # a real shift, not rounding noise


def test_a_model_without_quantized_layers_is_left_alone():
    model = cnn(np.random.default_rng(0))
    calibrator = Calibrator.for_model(model, CALIB, show_progress=False)
    before = {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()}
    assert not BiasCorrectPass(calibrator)(model).modified
    after = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_annotations_are_kept_for_lowering():
    model = cnn(np.random.default_rng(0))
    calibrator = Calibrator.for_model(model, CALIB, show_progress=False)
    QuantizePass(calibrator, wbits=8, abits=8)(model)
    specs = {node.name: node.meta[INPUT_SPECS_KEY] for node in model.graph if INPUT_SPECS_KEY in node.meta}
    assert BiasCorrectPass(calibrator)(model).modified
    assert {node.name: node.meta[INPUT_SPECS_KEY] for node in model.graph if INPUT_SPECS_KEY in node.meta} == specs


def test_without_calibration_data_the_pass_refuses():
    with pytest.raises(ir.passes.PreconditionError, match="calibration"):
        BiasCorrectPass(None)(cnn(np.random.default_rng(0)))
