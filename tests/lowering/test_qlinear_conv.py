"""QLinearConv lowering, checked against the QDQ form of the same specs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from builders import build, by_name, ops, run, weights
from graphquant.analysis.calibration import Calibrator
from graphquant.lowering.fuse_activation import FuseActivationPass
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.lowering.qlinear_conv import QLinearConvLoweringPass
from graphquant.passes.quantize import QuantizePass
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, OUTPUT_SPEC_KEY

F32 = np.float32


def image_feeds(seed: int, shape: tuple[int, ...], batches: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(F32)} for _ in range(batches)]


def lowered_pair(text: str, init: dict[str, np.ndarray], data, passes=(QLinearConvLoweringPass,), **options):
    """The same annotation lowered by ``passes`` (then QDQ for the rest) and by QDQ alone; plus the annotations."""
    candidate, reference = build(text, init), build(text, init)
    for model in (candidate, reference):
        QuantizePass(Calibrator.for_model(model, data, show_progress=False), **options)(model)
    annotations = {
        node.name: (dict(node.meta[INPUT_SPECS_KEY]), node.meta.get(OUTPUT_SPEC_KEY))
        for node in candidate.graph
        if INPUT_SPECS_KEY in node.meta
    }
    results = [lowering()(candidate) for lowering in passes]
    QdqLoweringPass()(candidate)
    RemoveUnusedNodesPass()(candidate)
    QdqLoweringPass()(reference)
    onnx.checker.check_model(ir.to_proto(candidate))
    return candidate, reference, annotations, results


def max_error_in_steps(candidate: ir.Model, reference: ir.Model, data, step: float) -> float:
    """The largest |candidate - reference| over all feeds, in units of ``step``."""
    return max(float(np.abs(run(candidate, f)[0] - run(reference, f)[0]).max()) / step for f in data)


def requantization_bound(x_spec, w_spec, y_spec) -> float:
    """In output steps: QLinearConv rounds the output that QDQ leaves float (half a step) and the bias to int32
    (half an accumulator step x_scale * w_scale); 1e-3 covers float rounding."""
    accumulator_step = float(np.max(x_spec.scale * w_spec.scale))
    return 0.5 + 0.5 * accumulator_step / float(y_spec.scale) + 1e-3


CONV = """
<ir_version: 8, opset_import: ["" : 17]>
conv (float[N, 3, 9, 9] x) => (float[N, 8, 5, 5] y) {
  [conv] y = Conv<pads: ints = [1, 1, 1, 1], strides: ints = [2, 2], kernel_shape: ints = [3, 3]>(x, w, b)
}
"""


def test_conv_becomes_qlinear_conv_within_one_output_step_of_qdq():
    rng = np.random.default_rng(0)
    init = {"w": weights(rng, 8, 3, 3, 3), "b": weights(rng, 8)}
    data = image_feeds(1, (4, 3, 9, 9))
    model, reference, annotations, (result,) = lowered_pair(CONV, init, data)
    assert result.modified
    assert ops(model) == ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]
    conv = by_name(model)["conv"]
    assert tuple(conv.attributes.get_ints("strides")) == (2, 2) and tuple(conv.attributes.get_ints("pads")) == (
        1,
        1,
        1,
        1,
    )
    x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias = conv.inputs
    specs, y_spec = annotations["conv"]
    x_spec, w_spec = specs[0], specs[1]
    assert x.dtype == ir.DataType.UINT8 and int(x_zero_point.const_value.numpy()) == 128  # signed grid, moved up
    assert float(x_scale.const_value.numpy()) == float(x_spec.scale)
    np.testing.assert_array_equal(w.const_value.numpy(), w_spec.quantize(init["w"]))
    np.testing.assert_array_equal(w_scale.const_value.numpy(), w_spec.scale)
    assert w_zero_point.const_value.numpy().dtype == np.int8 and not w_zero_point.const_value.numpy().any()
    assert float(y_scale.const_value.numpy()) == float(y_spec.scale)  # the output's calibrated grid
    assert y_spec.signed and int(y_zero_point.const_value.numpy()) == 128
    # int32 bias on the accumulator grid x_scale * w_scale
    np.testing.assert_array_equal(bias.const_value.numpy(), np.rint(init["b"] / (x_spec.scale * w_spec.scale)))
    assert bias.const_value.numpy().dtype == np.int32
    assert conv.meta[DECISION_KEY].status == "quantized"
    assert max_error_in_steps(model, reference, data, float(y_spec.scale)) <= requantization_bound(
        x_spec, w_spec, y_spec
    )


GROUPED = """
<ir_version: 8, opset_import: ["" : 17]>
grouped (float[N, 4, 6, 6] x) => (float[N, 4, 6, 6] y) {
  [depthwise] d = Conv<group: int = 4, pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, wd, bd)
  [grouped] y = Conv<group: int = 2, kernel_shape: ints = [1, 1]>(d, wg)
}
"""


def test_depthwise_then_grouped_conv_chain_in_integers():
    rng = np.random.default_rng(2)
    init = {"wd": weights(rng, 4, 1, 3, 3), "bd": weights(rng, 4), "wg": weights(rng, 4, 2, 1, 1)}
    data = image_feeds(3, (2, 4, 6, 6))
    model, reference, annotations, _ = lowered_pair(GROUPED, init, data)
    # The depthwise output goes to the grouped Conv as codes on the grouped Conv's input grid: no Q/DQ between.
    assert ops(model) == ["QuantizeLinear", "QLinearConv", "QLinearConv", "DequantizeLinear"]
    nodes = by_name(model)
    assert nodes["grouped"].inputs[0] is nodes["depthwise"].outputs[0]
    assert nodes["depthwise"].attributes.get_int("group") == 4
    grouped_x = annotations["grouped"][0][0]
    assert float(nodes["depthwise"].inputs[6].const_value.numpy()) == float(grouped_x.scale)
    # Each depthwise code may round differently from QDQ's (at most one code), which the grouped Conv
    # carries forward: bounded by one output step plus sum |w| * x_step over its inputs.
    y_spec = annotations["grouped"][1]
    w_spread = float(np.abs(init["wg"]).reshape(4, -1).sum(axis=1).max())
    bound = 0.5 + 1e-3 + w_spread * float(grouped_x.scale) / float(y_spec.scale)
    assert max_error_in_steps(model, reference, data, float(y_spec.scale)) <= bound
    float_out = np.concatenate([run(build(GROUPED, init), f)[0] for f in data])
    got = np.concatenate([run(model, f)[0] for f in data])
    assert np.corrcoef(float_out.ravel(), got.ravel())[0, 1] > 0.999


RELU_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
relu_chain (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) {
  [conv1] c = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, w1, b1)
  [relu] r = Relu(c)
  [conv2] y = Conv<kernel_shape: ints = [1, 1]>(r, w2, b2)
}
"""


def test_relu_between_convs_is_fused_into_the_first_conv_s_output_grid():
    rng = np.random.default_rng(4)
    init = {
        "w1": weights(rng, 6, 3, 3, 3),
        "b1": weights(rng, 6),
        "w2": weights(rng, 4, 6, 1, 1),
        "b2": weights(rng, 4),
    }
    data = image_feeds(5, (2, 3, 6, 6))
    passes = (FuseActivationPass, QLinearConvLoweringPass)
    model, reference, annotations, results = lowered_pair(RELU_CHAIN, init, data, passes=passes)
    assert all(result.modified for result in results)
    assert ops(model) == ["QuantizeLinear", "QLinearConv", "QLinearConv", "DequantizeLinear"]
    relu_grid = annotations["conv2"][0][0]
    assert not relu_grid.signed and int(relu_grid.zero_point) == 0  # Relu output: unsigned [0, max]
    conv1 = by_name(model)["conv1"]
    assert int(conv1.inputs[7].const_value.numpy()) == 0  # saturating at code 0 computes the Relu
    assert float(conv1.inputs[6].const_value.numpy()) == float(relu_grid.scale)
    y_spec = annotations["conv2"][1]
    w_spread = float(np.abs(init["w2"]).reshape(4, -1).sum(axis=1).max())
    bound = 0.5 + 1e-3 + w_spread * float(relu_grid.scale) / float(y_spec.scale)
    assert max_error_in_steps(model, reference, data, float(y_spec.scale)) <= bound


SHARED_OUTPUT = """
<ir_version: 8, opset_import: ["" : 17]>
shared_output (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y, float[N, 4, 5, 5] z) {
  [conv1] c = Conv<kernel_shape: ints = [1, 1]>(x, w1)
  [conv2] y = Conv<kernel_shape: ints = [1, 1]>(c, w2)
  [residual] z = Add(c, c)
}
"""


def test_an_output_with_a_float_reader_is_dequantized_on_its_calibrated_grid():
    rng = np.random.default_rng(6)
    init = {"w1": weights(rng, 4, 3, 1, 1), "w2": weights(rng, 4, 4, 1, 1)}
    data = image_feeds(7, (2, 3, 5, 5))
    model, reference, annotations, _ = lowered_pair(SHARED_OUTPUT, init, data)
    conv1 = by_name(model)["conv1"]
    c_spec = annotations["conv1"][1]
    assert float(conv1.inputs[6].const_value.numpy()) == float(c_spec.scale)  # the Add is not quantized
    assert by_name(model)["residual"].inputs[0].producer().op_type == "DequantizeLinear"
    assert ops(model).count("QLinearConv") == 2
    for feed in data:
        got_z, expected_z = run(model, feed)[1], run(reference, feed)[1]
        assert np.abs(got_z - expected_z).max() <= 2 * (0.5 + 1e-3) * float(c_spec.scale)


def test_six_bit_activations_get_a_clip_on_the_codes():
    rng = np.random.default_rng(8)
    init = {"w": weights(rng, 8, 3, 3, 3), "b": weights(rng, 8)}
    data = image_feeds(9, (2, 3, 9, 9))
    model, reference, annotations, _ = lowered_pair(CONV, init, data, abits=6, wbits=6)
    assert ops(model) == ["QuantizeLinear", "Clip", "QLinearConv", "Clip", "DequantizeLinear"]
    clips = [node for node in model.graph if node.op_type == "Clip"]
    assert [int(clip.inputs[1].const_value.numpy()) for clip in clips] == [128 - 31] * 2
    assert [int(clip.inputs[2].const_value.numpy()) for clip in clips] == [128 + 31] * 2
    specs, y_spec = annotations["conv"]
    x_spec, w_spec = specs[0], specs[1]
    assert max_error_in_steps(model, reference, data, float(y_spec.scale)) <= requantization_bound(
        x_spec, w_spec, y_spec
    )


UNLOWERABLE = """
<ir_version: 8, opset_import: ["" : 17]>
unlowerable (float[N, 4, 5, 5] x) => (float[N, 4, 10, 10] y) {
  [deconv] y = ConvTranspose<strides: ints = [2, 2], kernel_shape: ints = [2, 2]>(x, w)
}
"""


def test_conv_transpose_is_left_to_qdq():
    rng = np.random.default_rng(10)
    model = build(UNLOWERABLE, {"w": weights(rng, 4, 4, 2, 2)})
    QuantizePass(Calibrator.for_model(model, image_feeds(11, (1, 4, 5, 5)), show_progress=False))(model)
    before = ops(model)
    assert not QLinearConvLoweringPass()(model).modified
    assert ops(model) == before and INPUT_SPECS_KEY in by_name(model)["deconv"].meta


def test_weight_only_conv_is_left_to_qdq():
    rng = np.random.default_rng(12)
    model = build(CONV, {"w": weights(rng, 8, 3, 3, 3), "b": weights(rng, 8)})
    QuantizePass(None, abits=None)(model)
    assert not QLinearConvLoweringPass()(model).modified
    assert ops(model) == ["Conv"] and INPUT_SPECS_KEY in by_name(model)["conv"].meta


def test_six_bit_codes_pass_between_convs_through_the_clip_to_the_grid():
    rng = np.random.default_rng(14)
    init = {"wd": weights(rng, 4, 1, 3, 3), "bd": weights(rng, 4), "wg": weights(rng, 4, 2, 1, 1)}
    model, _, _, _ = lowered_pair(GROUPED, init, image_feeds(15, (2, 4, 6, 6)), abits=6, wbits=6)
    assert ops(model) == ["QuantizeLinear", "Clip", "QLinearConv", "Clip", "QLinearConv", "Clip", "DequantizeLinear"]
    nodes = by_name(model)
    assert nodes["grouped"].inputs[0].producer().op_type == "Clip"
    assert nodes["grouped"].inputs[0].producer().inputs[0] is nodes["depthwise"].outputs[0]


def test_gptq_w4a8_conv_runs_as_qlinear_conv_with_4_bit_codes_in_int8():
    rng = np.random.default_rng(20)
    init = {"w": weights(rng, 8, 3, 3, 3), "b": weights(rng, 8)}
    data = image_feeds(21, (4, 3, 9, 9))
    model, reference, annotations, (result,) = lowered_pair(CONV, init, data, wbits=4, gptq=True)
    assert result.modified and ops(model) == ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]
    codes = by_name(model)["conv"].inputs[3].const_value.numpy()
    assert codes.dtype == np.int8 and np.abs(codes).max() == 7
    specs, y_spec = annotations["conv"]
    assert by_name(reference)["conv"].meta[DECISION_KEY].scheme.startswith("W4 per-channel GPTQ")
    bound = requantization_bound(specs[0], specs[1], y_spec)
    assert max_error_in_steps(model, reference, data, float(y_spec.scale)) <= bound


def offset_kernels(rng: np.random.Generator) -> np.ndarray:
    """The CONV weights shifted by a different offset per output channel: every kernel off-centre."""
    return weights(rng, 8, 3, 3, 3) + np.linspace(-0.6, 0.6, 8, dtype=F32).reshape(8, 1, 1, 1)


def test_asymmetric_w4_conv_runs_as_qlinear_conv_with_codes_less_zero_points_in_int8():
    rng = np.random.default_rng(22)
    init = {"w": offset_kernels(rng), "b": weights(rng, 8)}
    data = image_feeds(23, (4, 3, 9, 9))
    model, reference, annotations, (result,) = lowered_pair(CONV, init, data, wbits=4, weight_symmetric=False)
    assert result.modified and ops(model) == ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]
    specs, y_spec = annotations["conv"]
    w_spec = specs[1]
    assert (w_spec.bits, w_spec.signed, w_spec.axis) == (4, False, 0) and len(set(w_spec.zero_point.tolist())) > 1
    conv = by_name(model)["conv"]
    codes, scale, zero_point = (conv.inputs[i].const_value.numpy() for i in (3, 4, 5))
    expected = w_spec.quantize(init["w"]).astype(np.int16) - w_spec.zero_point.astype(np.int16).reshape(8, 1, 1, 1)
    assert codes.dtype == np.int8 and np.abs(codes).max() > 7  # beyond a symmetric 4-bit grid's ±7
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(scale, w_spec.scale)
    assert zero_point.dtype == np.int8 and not zero_point.any()
    # The QDQ reference keeps the grid as UINT4 codes with per-channel zero points (opset 21), which onnxruntime runs.
    dequantize = by_name(reference)["conv"].inputs[1].producer()
    assert [value.dtype for value in (dequantize.inputs[0], dequantize.inputs[2])] == [ir.DataType.UINT4] * 2
    assert max_error_in_steps(model, reference, data, float(y_spec.scale)) <= requantization_bound(
        specs[0], w_spec, y_spec
    )


def test_gptq_on_an_asymmetric_w4_grid_lowers_to_qlinear_conv_within_one_output_step_of_qdq():
    rng = np.random.default_rng(24)
    init = {"w": offset_kernels(rng), "b": weights(rng, 8)}
    data = image_feeds(25, (4, 3, 9, 9))
    model, reference, annotations, _ = lowered_pair(
        CONV, init, data, wbits=4, gptq=True, weight_clip_search=True, asymmetric_conv_weights=True
    )
    assert ops(model) == ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]
    assert by_name(reference)["conv"].meta[DECISION_KEY].scheme.startswith("W4 asym per-channel clip-searched GPTQ")
    specs, y_spec = annotations["conv"]
    assert max_error_in_steps(model, reference, data, float(y_spec.scale)) <= requantization_bound(
        specs[0], specs[1], y_spec
    )


def test_an_asymmetric_8_bit_conv_is_left_to_qdq():
    rng = np.random.default_rng(26)
    init = {"w": offset_kernels(rng), "b": weights(rng, 8)}
    model, _, _, (result,) = lowered_pair(CONV, init, image_feeds(27, (2, 3, 9, 9)), weight_symmetric=False)
    assert not result.modified and "QLinearConv" not in ops(model)
