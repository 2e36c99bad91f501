"""QuantizePass: weight/activation QuantSpecs on layers, overrides, methods and option checks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from builders import build, by_name, feeds, initializer, named_mlp, qkv, relu_only, run, weights
from graphquant.analysis.calibration import Calibrator
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import NodeOverride, QuantizePass
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, PREEXECUTED_KEY, QuantSpec, symmetric_spec


def calibrated(model: ir.Model, data, **options) -> ir.passes.PassResult:
    return QuantizePass(Calibrator.for_model(model, data, show_progress=False), **options)(model)


@pytest.fixture
def mlp_and_data():
    rng = np.random.default_rng(0)
    return named_mlp(rng), feeds(rng, batches=3, rows=5, features=16)


def test_annotations_on_a_matching_graph(mlp_and_data):
    model, data = mlp_and_data
    w1, b1, w2 = initializer(model, "w1"), initializer(model, "b1"), initializer(model, "w2")
    result = calibrated(model, data)
    assert result.modified
    named = by_name(model)

    fc1 = named["fc1"].meta[INPUT_SPECS_KEY]
    assert sorted(fc1) == [0, 1]
    weight = fc1[1]
    assert (weight.bits, weight.signed, weight.axis, weight.qmin, weight.qmax) == (8, True, 1, -127, 127)
    np.testing.assert_allclose(weight.scale, np.abs(w1).max(axis=0) / 127, rtol=1e-6)
    np.testing.assert_array_equal(weight.zero_point, np.zeros(8))

    x = np.concatenate([feed["x"] for feed in data])
    activation = fc1[0]
    assert activation.axis is None and activation.scale.shape == ()
    np.testing.assert_allclose(activation.scale, np.abs(x).max() / 127, rtol=1e-6)

    fc2 = named["fc2"].meta[INPUT_SPECS_KEY]
    assert fc2[1].axis == 0  # Gemm transB: out channels are the rows of w2
    np.testing.assert_allclose(fc2[1].scale, np.abs(w2).max(axis=1) / 127, rtol=1e-6)
    relu = np.maximum(x @ w1 + b1, 0)
    # The Relu output never goes below 0: an unsigned [0, max] grid with zero point 0.
    assert not fc2[0].signed and int(fc2[0].zero_point) == 0 and fc2[0].qmax == 255
    np.testing.assert_allclose(fc2[0].scale, relu.max() / 255, rtol=1e-5)
    assert 2 not in fc2  # the bias stays float

    decision = named["fc1"].meta[DECISION_KEY]
    assert (decision.node, decision.op_type, decision.status) == ("fc1", "MatMul", "quantized")
    assert decision.scheme == "W8 per-channel, A8 per-tensor minmax"
    assert INPUT_SPECS_KEY not in named["act"].meta  # Relu is not a layer


def test_running_again_changes_nothing(mlp_and_data):
    model, data = mlp_and_data
    calibrated(model, data)
    before = {name: node.meta[INPUT_SPECS_KEY] for name, node in by_name(model).items() if INPUT_SPECS_KEY in node.meta}
    assert not calibrated(model, data).modified
    after = {name: node.meta[INPUT_SPECS_KEY] for name, node in by_name(model).items() if INPUT_SPECS_KEY in node.meta}
    assert {k: [s.key for s in v.values()] for k, v in before.items()} == {
        k: [s.key for s in v.values()] for k, v in after.items()
    }


def test_no_quantizable_layer_means_not_modified():
    model = relu_only()
    data = [{"x": np.ones((2, 4), np.float32)}]
    assert not calibrated(model, data).modified
    assert all(not node.meta for node in model.graph)


ACT_ACT = """
<ir_version: 8, opset_import: ["" : 17]>
attn (float[N, 4] a, float[4, N] b) => (float[N, N] y) {
  [scores] y = MatMul(a, b)
}
"""


def test_activation_times_activation_is_recorded_as_float():
    model = build(ACT_ACT)
    data = [{"a": np.ones((2, 4), np.float32), "b": np.ones((4, 2), np.float32)}]
    assert not calibrated(model, data).modified
    decision = by_name(model)["scores"].meta[DECISION_KEY]
    assert decision.status == "float"
    assert decision.reason == "activation x activation MatMul (left float)"


def test_shared_input_gets_identical_activation_specs():
    rng = np.random.default_rng(1)
    model = qkv(rng)
    data = feeds(rng, batches=2, rows=4, features=8)
    calibrated(model, data)
    specs = [by_name(model)[name].meta[INPUT_SPECS_KEY][0] for name in ("q_proj", "k_proj", "v_proj")]
    assert specs[0].key == specs[1].key == specs[2].key
    x = np.concatenate([feed["x"] for feed in data])
    np.testing.assert_allclose(specs[0].scale, np.abs(x).max() / 127, rtol=1e-6)
    assert INPUT_SPECS_KEY not in by_name(model)["residual"].meta


OUTPUT_CONSUMER = """
<ir_version: 8, opset_import: ["" : 17]>
out_consumer (float[N, 6] x) => (float[N, 6] h, float[N, 3] y) {
  [act] h = Relu(x)
  [fc] y = MatMul(h, w)
}
"""


def test_activation_that_is_also_a_graph_output_keeps_its_values():
    rng = np.random.default_rng(2)
    w = weights(rng, 6, 3)
    model = build(OUTPUT_CONSUMER, {"w": w})
    data = feeds(rng, batches=2, rows=8, features=6)
    calibrated(model, data)
    QdqLoweringPass()(model)
    assert [value.name for value in model.graph.outputs] == ["h", "y"]
    x = data[0]["x"]
    h, y = run(model, {"x": x})
    np.testing.assert_array_equal(h, np.maximum(x, 0))  # the graph output is the float tensor, untouched
    # ...while the MatMul reads its fake-quantized form.
    h_all = np.maximum(np.concatenate([feed["x"] for feed in data]), 0)
    a_scale = np.float32(h_all.max()) / np.float32(255)  # a Relu output: unsigned grid
    w_scale = (np.abs(w).max(axis=0) / np.float32(127)).astype(np.float32)
    h_q = np.clip(np.rint(np.maximum(x, 0) / a_scale), 0, 255) * a_scale
    w_q = np.clip(np.rint(w / w_scale), -127, 127) * w_scale
    np.testing.assert_allclose(y, h_q @ w_q, rtol=1e-5, atol=1e-5)
    assert np.abs(y - np.maximum(x, 0) @ w).max() > 1e-4  # and it really is quantized


def test_override_skip_keeps_the_layer_float(mlp_and_data):
    model, data = mlp_and_data
    result = calibrated(model, data, overrides=[NodeOverride("fc2", {"skip": True})])
    assert result.modified
    named = by_name(model)
    assert INPUT_SPECS_KEY in named["fc1"].meta
    assert INPUT_SPECS_KEY not in named["fc2"].meta
    decision = named["fc2"].meta[DECISION_KEY]
    assert (decision.status, decision.reason) == ("float", "skipped by a recipe override")


def test_override_wbits_4_gives_codes_in_plus_minus_7(mlp_and_data):
    model, data = mlp_and_data
    w1 = initializer(model, "w1")
    calibrated(model, data, overrides=[NodeOverride("fc*", {"wbits": 6}), NodeOverride("fc1", {"wbits": 4})])
    named = by_name(model)
    spec = named["fc1"].meta[INPUT_SPECS_KEY][1]
    assert (spec.bits, spec.qmin, spec.qmax) == (4, -7, 7)
    np.testing.assert_allclose(spec.scale, np.abs(w1).max(axis=0) / 7, rtol=1e-6)
    assert named["fc2"].meta[INPUT_SPECS_KEY][1].bits == 6  # the later, narrower pattern wins only for fc1
    assert named["fc1"].meta[INPUT_SPECS_KEY][0].bits == 8  # activation bits untouched
    assert named["fc1"].meta[DECISION_KEY].scheme.startswith("W4 per-channel")

    QdqLoweringPass()(model)
    assert model.graph.initializers["w1_quantized"].const_value.dtype == ir.DataType.INT4  # 4 bits: native INT4
    assert model.graph.initializers["w2_quantized"].const_value.dtype == ir.DataType.INT8  # 6 bits: narrow int8
    codes = initializer(model, "w1_quantized").astype(np.int8)
    assert codes.min() >= -7 and codes.max() <= 7
    np.testing.assert_array_equal(np.abs(codes).max(axis=0), np.full(8, 7))  # every channel uses the full grid
    codes2 = initializer(model, "w2_quantized")
    assert np.abs(codes2).max() == 31  # W6


def test_named_schemes_set_each_layer_and_explicit_fields_win(mlp_and_data):
    model, data = mlp_and_data
    x = data[0]["x"]
    reference = run(model.clone(), {"x": x})[0]
    overrides = [NodeOverride("fc1", {"scheme": "w4"}), NodeOverride("fc2", {"scheme": "w8a8", "wbits": 6})]
    calibrated(model, data, overrides=overrides)
    named = by_name(model)
    fc1 = named["fc1"].meta[INPUT_SPECS_KEY]
    assert sorted(fc1) == [1] and fc1[1].bits == 4 and fc1[1].block_size == 32 and np.any(fc1[1].zero_point != 0)
    fc2 = named["fc2"].meta[INPUT_SPECS_KEY]
    assert sorted(fc2) == [0, 1] and (fc2[0].bits, fc2[1].bits) == (8, 6)
    QdqLoweringPass()(model)
    (quantized,) = run(model, {"x": x}, optimize=False)
    error = np.sum((quantized - reference) ** 2) / np.sum(reference**2)
    assert 1e-6 < error < 0.05  # W4 weights: lossy, but close


def test_the_float_scheme_skips_and_an_unknown_scheme_is_refused(mlp_and_data):
    model, data = mlp_and_data
    calibrated(model, data, overrides=[NodeOverride("fc2", {"scheme": "float"})])
    assert INPUT_SPECS_KEY not in by_name(model)["fc2"].meta
    assert by_name(model)["fc2"].meta[DECISION_KEY].reason == "skipped by a recipe override"
    with pytest.raises(ValueError, match="unknown scheme 'w2'"):
        QuantizePass(None, overrides=[NodeOverride("fc1", {"scheme": "w2"})])


def test_a_weight_only_scheme_leaves_a_preexecuted_activation_float(mlp_and_data):
    model, data = mlp_and_data
    by_name(model)["fc1"].inputs[0].meta[PREEXECUTED_KEY] = 8
    calibrated(model, data, overrides=[NodeOverride("fc1", {"scheme": "w8"})])
    assert sorted(by_name(model)["fc1"].meta[INPUT_SPECS_KEY]) == [1]
    assert "A8" not in by_name(model)["fc1"].meta[DECISION_KEY].scheme


def test_weight_only_needs_no_calibration(mlp_and_data):
    model, _ = mlp_and_data
    result = QuantizePass(None, abits=None)(model)
    assert result.modified
    specs = by_name(model)["fc1"].meta[INPUT_SPECS_KEY]
    assert sorted(specs) == [1]
    assert by_name(model)["fc1"].meta[DECISION_KEY].scheme == "W8 per-channel"


def test_activation_bits_without_calibration_is_a_precondition_error(mlp_and_data):
    model, _ = mlp_and_data
    with pytest.raises(ir.passes.PreconditionError, match="needs calibration data"):
        QuantizePass(None)(model)


def test_percentile_gives_a_smaller_scale_than_minmax_on_heavy_tails():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2048, 16)).astype(np.float32)
    x[[10, 700, 1500], [3, 9, 12]] = [400.0, -350.0, 500.0]  # three huge spikes among 32768 values
    data = [{"x": x[i : i + 256]} for i in range(0, 2048, 256)]

    minmax_model = named_mlp(np.random.default_rng(4))
    calibrated(minmax_model, data)
    percentile_model = named_mlp(np.random.default_rng(4))
    calibrated(percentile_model, data, activation_method="percentile", percentile=99.9)

    minmax = float(by_name(minmax_model)["fc1"].meta[INPUT_SPECS_KEY][0].scale)
    percentile = float(by_name(percentile_model)["fc1"].meta[INPUT_SPECS_KEY][0].scale)
    assert minmax == pytest.approx(500.0 / 127, rel=1e-6)
    exact = float(np.percentile(np.abs(x), 99.9)) / 127
    assert exact * (1 - 1e-3) <= percentile <= exact * 2 ** (1 / 16) * (1 + 1e-3)
    assert percentile < minmax / 50
    assert by_name(percentile_model)["fc1"].meta[DECISION_KEY].scheme.endswith("per-tensor percentile")


def test_an_asymmetric_override_puts_min_and_max_on_an_unsigned_grid():
    rng = np.random.default_rng(5)
    # A lopsided input like GELU's output: a long positive tail, a short negative one.
    data = [{"x": (np.abs(rng.standard_normal((64, 16))) * 2 - 0.2).astype(np.float32)} for _ in range(3)]
    x = np.concatenate([feed["x"] for feed in data])
    symmetric, asymmetric = named_mlp(np.random.default_rng(6)), named_mlp(np.random.default_rng(6))
    w1 = initializer(asymmetric, "w1")
    calibrated(symmetric, data)
    calibrated(asymmetric, data, overrides=[NodeOverride("fc1", {"activation_symmetric": False})])
    named = by_name(asymmetric)
    spec = named["fc1"].meta[INPUT_SPECS_KEY][0]
    scale = np.float32(x.max() - x.min()) / np.float32(255)
    assert not spec.signed and spec.qmax == 255
    np.testing.assert_allclose(spec.scale, scale, rtol=1e-6)
    assert int(spec.zero_point) == int(np.rint(-x.min() / scale))
    assert named["fc1"].meta[DECISION_KEY].scheme == "W8 per-channel, A8 per-tensor minmax asymmetric"
    assert named["fc2"].meta[INPUT_SPECS_KEY][0].zero_point == 0  # the Relu output keeps its [0, max] grid

    errors = []
    for model in (symmetric, asymmetric):
        QdqLoweringPass()(model)
        hidden = by_name(model)["fc1"].outputs[0].name
        model.graph.outputs.append(next(n.outputs[0] for n in model.graph if n.outputs[0].name == hidden))
        errors.append(np.abs(run(model, {"x": x})[1] - x @ w1).max())
    zero = np.float32(spec.zero_point.astype(np.float32))
    x_q = (np.clip(np.rint(x / spec.scale) + zero, 0, 255) - zero) * spec.scale
    w_scale = (np.abs(w1).max(axis=0) / np.float32(127)).astype(np.float32)
    expected = x_q @ (np.clip(np.rint(w1 / w_scale), -127, 127) * w_scale)
    np.testing.assert_allclose(run(asymmetric, {"x": x})[1], expected, rtol=1e-5, atol=1e-5)
    assert errors[1] < 0.75 * errors[0]  # [-0.2, max] on 255 steps: a finer grid than ±max on 254


def test_an_asymmetric_grid_needs_minmax():
    with pytest.raises(ValueError, match="asymmetric activation grid takes activation_method 'minmax'"):
        QuantizePass(None, activation_method="mse", overrides=[NodeOverride("fc1", {"activation_symmetric": False})])


@pytest.mark.parametrize(
    "options",
    [
        {"wbits": 9},
        {"wbits": 1},
        {"abits": 9},
        {"abits": -1},
        {"overrides": [NodeOverride("fc1", {"wbits": 16})]},
        {"overrides": [NodeOverride("fc1", {"abits": 1})]},
    ],
)
def test_bits_out_of_range_are_refused(options):
    with pytest.raises(ValueError, match="must be in 2..8"):
        QuantizePass(None, **options)


def test_unknown_override_option_and_method_are_refused():
    with pytest.raises(ValueError, match="unknown options"):
        QuantizePass(None, overrides=[NodeOverride("fc1", {"bits": 4})])
    with pytest.raises(ValueError, match="activation_method"):
        QuantizePass(None, activation_method="kl")


def test_quant_spec_math():
    spec = symmetric_spec(np.array([2.0, 0.0, 1e-45], np.float32), 8, axis=0)
    np.testing.assert_array_equal(spec.scale, np.array([2.0 / 127, 1.0, 1.0], np.float32))  # zero ranges get scale 1
    values = np.array([[2.0, 2.5, 0.0], [-3.0, -3.5, 300.0]], np.float32).T  # channels along axis 0
    codes = spec.quantize(values)
    assert codes.dtype == np.int8
    # Channel 1 has scale 1: 2.5 -> 2 and -3.5 -> -4 (round half to even); 300 clips to 127, -3 clips to -127.
    np.testing.assert_array_equal(codes, [[127, -127], [2, -4], [0, 127]])
    np.testing.assert_allclose(spec.dequantize(codes), codes * spec.scale[:, None], rtol=1e-7)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=9, signed=True, scale=np.float32(1), zero_point=np.int8(0))
    with pytest.raises(ValueError, match="positive"):
        QuantSpec(bits=8, signed=True, scale=np.float32(0), zero_point=np.int8(0))
    with pytest.raises(ValueError, match="per-axis"):
        QuantSpec(bits=8, signed=True, scale=np.ones(3, np.float32), zero_point=np.zeros(3, np.int8))


SKEWED_CONVS = """
<ir_version: 8, opset_import: ["" : 17]>
skewed (float[N, 8, 6, 6] x) => (float[N, 8] y) {
  [conv4] c = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, w4)
  [conv8] d = Conv<kernel_shape: ints = [1, 1]>(c, w8)
  [pool] p = GlobalAveragePool(d)
  [flat] f = Flatten(p)
  [fc] y = MatMul(f, wm)
}
"""


def skewed_kernels(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Conv kernels with a long tail on one side of each output channel (a sign per channel) and a short one."""
    sign = np.where(rng.random(shape[0]) < 0.5, -1.0, 1.0).reshape(-1, *[1] * (len(shape) - 1))
    return (sign * (rng.exponential(0.3, shape) - 0.1)).astype(np.float32)


def test_asymmetric_conv_weights_lower_the_weight_error_of_low_bit_convs_only():
    rng = np.random.default_rng(30)
    init = {"w4": skewed_kernels(rng, 8, 8, 3, 3), "w8": skewed_kernels(rng, 8, 8, 1, 1), "wm": weights(rng, 8, 8)}
    data = [{"x": rng.standard_normal((2, 8, 6, 6)).astype(np.float32)} for _ in range(2)]
    specs, errors = {}, {}
    for asymmetric in (False, True):
        model = build(SKEWED_CONVS, init)
        overrides = [NodeOverride("conv8", {"wbits": 8})]
        calibrated(
            model, data, wbits=4, weight_clip_search=True, overrides=overrides, asymmetric_conv_weights=asymmetric
        )
        specs[asymmetric] = {
            name: node.meta[INPUT_SPECS_KEY][1] for name, node in by_name(model).items() if INPUT_SPECS_KEY in node.meta
        }
        w4 = specs[asymmetric]["conv4"]
        errors[asymmetric] = float(np.sum((w4.dequantize(w4.quantize(init["w4"])) - init["w4"]) ** 2))
    conv4 = specs[True]["conv4"]
    assert (conv4.bits, conv4.signed, conv4.axis) == (4, False, 0) and np.any(conv4.zero_point != 8)
    assert errors[True] < 0.6 * errors[False]  # the symmetric grid spends codes on the short side of each kernel
    # 8-bit convs and other ops keep the symmetric grid (QLinearConv's int8 codes cannot hold an asymmetric 8-bit one)
    for name in ("conv8", "fc"):
        assert specs[True][name].signed and not np.any(specs[True][name].zero_point)
        np.testing.assert_array_equal(specs[True][name].scale, specs[False][name].scale)
