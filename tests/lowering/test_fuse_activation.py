"""FuseActivationPass: Relu/Clip(0, c) dropped where the readers' saturating unsigned grids compute them, exactly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from builders import build, by_name, ops, run, weights
from graphquant.analysis.calibration import Calibrator
from graphquant.lowering.fuse_activation import FuseActivationPass
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import QuantizePass
from graphquant.quant_spec import CHANNEL_BOUND_KEY, INPUT_SPECS_KEY, QuantSpec, asymmetric_spec, symmetric_spec

F32 = np.float32

ACTIVATIONS = """
<ir_version: 8, opset_import: ["" : 17]>
activations (float[N, 8] x) => (float[N, 4] y, float[N, 4] z) {
  [relu] r = Relu(x)
  [fc_relu] y = MatMul(r, w1)
  [relu6] c = Clip(x, zero, six)
  [fc_clip] z = MatMul(c, w2)
}
"""


def activations(rng: np.random.Generator) -> ir.Model:
    return build(ACTIVATIONS, {"w1": weights(rng, 8, 4), "w2": weights(rng, 8, 4), "zero": F32(0), "six": F32(6)})


def wide_feeds(seed: int, scale: float, batches: int = 3) -> list[dict[str, np.ndarray]]:
    """Gaussian feeds times ``scale``: with scale 4, Clip(0, 6) saturates in every batch."""
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((32, 8)) * scale).astype(F32)} for _ in range(batches)]


def fused_and_reference(make, data) -> tuple[ir.Model, ir.Model, ir.passes.PassResult]:
    """The same annotation lowered to QDQ with and without FuseActivationPass."""
    fused, reference = make(), make()
    for model in (fused, reference):
        QuantizePass(Calibrator.for_model(model, data, show_progress=False))(model)
    result = FuseActivationPass()(fused)
    QdqLoweringPass()(fused)
    QdqLoweringPass()(reference)
    return fused, reference, result


def test_relu_and_a_saturated_clip_are_removed_and_outputs_are_bit_identical():
    rng = np.random.default_rng(0)
    data = wide_feeds(1, scale=4.0)
    fused, reference, result = fused_and_reference(lambda: activations(np.random.default_rng(7)), data)
    assert result.modified
    assert "Relu" not in ops(fused) and "Clip" not in ops(fused)
    nodes = by_name(fused)
    quantize = [node for node in fused.graph if node.op_type == "QuantizeLinear"]
    assert all(node.inputs[0].name == "x" for node in quantize)  # both grids now read x itself
    assert all(int(node.inputs[2].const_value.numpy()) == 0 for node in quantize)
    assert nodes["fc_relu"].inputs[0].producer().op_type == "DequantizeLinear"
    # Held-out inputs reach far past 6: saturation at code 0 and at qmax computes Relu and Clip exactly.
    for feed in wide_feeds(2, scale=10.0) + [{"x": rng.standard_normal((4, 8)).astype(F32)}]:
        for got, expected in zip(run(fused, feed), run(reference, feed), strict=True):
            np.testing.assert_array_equal(got, expected)


def test_a_clip_whose_grid_tops_out_below_its_bound_is_redundant_too():
    # Calibrated on small inputs, the grid tops out near 2.3 < 6: every x above it gets code qmax with or without
    # the Clip. (A calibrated Clip output never exceeds c, so only a hand-made grid can keep a Clip; see below.)
    data = wide_feeds(3, scale=0.7)
    fused, reference, result = fused_and_reference(lambda: activations(np.random.default_rng(7)), data)
    assert result.modified
    assert "Relu" not in ops(fused) and "Clip" not in ops(fused)
    for feed in wide_feeds(4, scale=5.0):
        for got, expected in zip(run(fused, feed), run(reference, feed), strict=True):
            np.testing.assert_array_equal(got, expected)


def reader_with_spec(spec: QuantSpec, clip_max: float = 6.0) -> ir.Model:
    """Clip(x, 0, clip_max) read by a MatMul whose activation input carries ``spec`` (hand-made annotation)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    clip (float[N, 8] x) => (float[N, 4] y) {
      [clip] c = Clip(x, zero, high)
      [fc] y = MatMul(c, w)
    }
    """
    model = build(text, {"w": weights(np.random.default_rng(0), 8, 4), "zero": F32(0), "high": F32(clip_max)})
    weight = np.abs(model.graph.initializers["w"].const_value.numpy()).max(axis=0)
    by_name(model)["fc"].meta[INPUT_SPECS_KEY] = {0: spec, 1: symmetric_spec(weight, 8, axis=1)}
    return model


@pytest.mark.parametrize(
    ("top_code_value", "fused"),
    [(6.0 / 254.6, True), (6.0 / 254.5, False), (6.0 / 255.0, True), (6.5 / 255.0, False)],
    ids=["rounds_up_to_qmax", "tie_rounds_to_even_254", "grid_max_is_c", "grid_max_above_c"],
)
def test_clip_bound_rule_is_round_c_over_scale_reaching_qmax(top_code_value, fused):
    spec = QuantSpec(bits=8, signed=False, scale=np.array(top_code_value, F32), zero_point=np.array(0, np.uint8))
    model = reader_with_spec(spec)
    reference = reader_with_spec(spec)
    assert FuseActivationPass()(model).modified is fused
    QdqLoweringPass()(model)
    QdqLoweringPass()(reference)
    feed = {"x": np.linspace(-2.0, 9.0, 8 * 64, dtype=F32).reshape(64, 8)}
    np.testing.assert_array_equal(run(model, feed)[0], run(reference, feed)[0])


@pytest.mark.parametrize(
    "spec",
    [
        symmetric_spec(6.0, 8),  # signed: negative inputs keep negative codes
        asymmetric_spec(-1.0, 6.0, 8),  # zero point above 0: negative inputs have codes below it
        QuantSpec(8, False, np.ones(4, F32) * 6 / 255, np.zeros(4, np.uint8), axis=1),  # per channel
    ],
    ids=["signed", "zero_point_above_0", "per_channel"],
)
def test_grids_that_do_not_saturate_at_zero_keep_the_clip(spec):
    model = reader_with_spec(spec)
    assert not FuseActivationPass()(model).modified
    assert ops(model) == ["Clip", "MatMul"]


OTHER_READERS = """
<ir_version: 8, opset_import: ["" : 17]>
other_readers (float[N, 8] x) => (float[N, 4] y, float[N, 8] s, float[N, 4] z, float[N, 8] q) {
  [relu_shared] r = Relu(x)
  [fc] y = MatMul(r, w)
  [sum] s = Add(r, x)
  [relu_out] q = Relu(x)
  [fc_out] z = MatMul(q, w)
}
"""


def test_activations_with_a_float_reader_or_as_graph_output_stay():
    model = build(OTHER_READERS, {"w": weights(np.random.default_rng(1), 8, 4)})
    QuantizePass(Calibrator.for_model(model, wide_feeds(5, 1.0), show_progress=False))(model)
    before = ops(model)
    assert not FuseActivationPass()(model).modified
    assert ops(model) == before


def test_clip_with_a_negative_lower_bound_or_a_computed_bound_stays():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    clips (float[N, 8] x, float high) => (float[N, 4] y, float[N, 4] z) {
      [clip_low] a = Clip(x, minus_one, six)
      [fc_a] y = MatMul(a, w)
      [clip_input] b = Clip(x, zero, high)
      [fc_b] z = MatMul(b, w)
    }
    """
    model = build(
        text, {"w": weights(np.random.default_rng(2), 8, 4), "minus_one": F32(-1), "zero": F32(0), "six": F32(6)}
    )
    for node in ("fc_a", "fc_b"):
        by_name(model)[node].meta[INPUT_SPECS_KEY] = {0: asymmetric_spec(0.0, 6.0, 8)}
    assert not FuseActivationPass()(model).modified


def test_clip_with_attribute_bounds_from_opset_10_is_fused():
    text = """
    <ir_version: 5, opset_import: ["" : 10]>
    old_clip (float[N, 8] x) => (float[N, 4] y) {
      [relu6] c = Clip<min: float = 0.0, max: float = 6.0>(x)
      [fc] y = MatMul(c, w)
    }
    """
    model = build(text, {"w": weights(np.random.default_rng(3), 8, 4)})
    by_name(model)["fc"].meta[INPUT_SPECS_KEY] = {0: asymmetric_spec(0.0, 6.0, 8)}
    assert FuseActivationPass()(model).modified
    assert ops(model) == ["MatMul"] and by_name(model)["fc"].inputs[0].name == "x"


def test_constant_nodes_without_inputs_are_passed_over():
    """A Constant node (no inputs, as legacy exporters and the opset upgrade make them) beside a fusable Relu."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    constant (float[N, 8] x) => (float[N, 4] y) {
      [half] c = Constant<value = float {0.5}>()
      [scaled] s = Mul(x, c)
      [relu] r = Relu(s)
      [fc] y = MatMul(r, w)
    }
    """
    data = wide_feeds(6, scale=2.0)
    fused, reference, result = fused_and_reference(
        lambda: build(text, {"w": weights(np.random.default_rng(4), 8, 4)}), data
    )
    assert result.modified
    assert ops(fused).count("Relu") == 0 and ops(fused).count("Constant") == 1
    for feed in wide_feeds(7, scale=4.0):
        np.testing.assert_array_equal(run(fused, feed)[0], run(reference, feed)[0])


CHANNEL_MIN = """
<ir_version: 8, opset_import: ["" : 17]>
channel_min (float[N, 8] x) => (float[N, 4] y) {
  [relu] r = Relu(x)
  [bound] m = Min(r, bounds)
  [fc] y = MatMul(m, w)
}
"""


@pytest.mark.parametrize("marked", [True, False])
def test_relu_and_a_per_channel_min_above_the_grid_are_removed_only_when_marked(marked):
    def make() -> ir.Model:
        init = {"w": weights(np.random.default_rng(7), 8, 4), "bounds": np.linspace(5, 8, 8).astype(F32)}
        model = build(CHANNEL_MIN, init)
        if marked:  # as equalize-convs marks the bounds it writes: one per channel, never broadcasting x
            by_name(model)["bound"].meta[CHANNEL_BOUND_KEY] = True
        return model

    fused, reference, result = fused_and_reference(make, wide_feeds(3, scale=0.7))
    assert result.modified is marked
    assert ("Min" in ops(fused), "Relu" in ops(fused)) == (not marked, not marked)
    for feed in wide_feeds(4, scale=10.0):  # far past every bound: saturation computes the Min
        for got, expected in zip(run(fused, feed), run(reference, feed), strict=True):
            np.testing.assert_array_equal(got, expected)
