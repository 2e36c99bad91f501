"""EqualizeConvsPass: exact cross-layer scale migration between convs through Relu, ReLU6 (Clip) or nothing."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from builders import assert_same_outputs, build, by_name, ops, weights
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.channel_probe import channel_reductions
from graphquant.passes.equalize_convs import EqualizeConvsPass, conv_pairs

F32 = np.float32
CHANNELS = 8

# conv1 -> ReLU6 -> depthwise -> Relu -> pointwise -> (nothing) -> last: three pairs.
CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
chain (float[N, 3, 10, 10] x) => (float[N, 4, 10, 10] y) {
  [conv1] c1 = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, w1, b1)
  [relu6] r1 = Clip(c1, zero, six)
  [depthwise] d = Conv<group: int = 8, pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(r1, wd, bd)
  [relu] r2 = Relu(d)
  [pointwise] p = Conv<kernel_shape: ints = [1, 1]>(r2, wp)
  [last] y = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(p, wl, bl)
}
"""

# conv1's ReLU6 output is read twice, so nothing may be rescaled there; Clip(-1, 1) is not a ReLU6.
SHARED = """
<ir_version: 8, opset_import: ["" : 17]>
shared (float[N, 3, 10, 10] x) => (float[N, 8, 10, 10] y, float[N, 8, 10, 10] r1) {
  [conv1] c1 = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, w1, b1)
  [relu6] r1 = Clip(c1, zero, six)
  [depthwise] d = Conv<group: int = 8, pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(r1, wd, bd)
  [hardtanh] h = Clip(d, minus_one, one)
  [pointwise] y = Conv<kernel_shape: ints = [1, 1]>(h, wq)
}
"""

# A grouped Conv2 (2 groups of 4 channels) after a Relu.
GROUPED = """
<ir_version: 8, opset_import: ["" : 17]>
grouped (float[N, 3, 10, 10] x) => (float[N, 6, 10, 10] y) {
  [conv1] c1 = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, w1, b1)
  [relu] r1 = Relu(c1)
  [grouped] y = Conv<group: int = 2, pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(r1, wg)
}
"""


def spread_conv1(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """conv1's weights and bias with output channels 100x apart in scale, several of them past ReLU6's bound."""
    factors = np.logspace(-1, 1, CHANNELS).astype(F32)[:, None, None, None]
    return {"w1": weights(rng, CHANNELS, 3, 3, 3) * factors, "b1": weights(rng, CHANNELS, scale=0.3)}


def chain(rng: np.random.Generator) -> ir.Model:
    init = {
        **spread_conv1(rng),
        "wd": weights(rng, CHANNELS, 1, 3, 3),
        "bd": weights(rng, CHANNELS, scale=0.1),
        "wp": weights(rng, CHANNELS, CHANNELS, 1, 1),
        "wl": weights(rng, 4, CHANNELS, 3, 3, scale=0.2),
        "bl": weights(rng, 4, scale=0.1),
        "zero": F32(0),
        "six": F32(6),
    }
    return build(CHAIN, init)


def shared(rng: np.random.Generator) -> ir.Model:
    init = {
        **spread_conv1(rng),
        "wd": weights(rng, CHANNELS, 1, 3, 3),
        "bd": weights(rng, CHANNELS, scale=0.1),
        "wq": weights(rng, CHANNELS, CHANNELS, 1, 1),
        "zero": F32(0),
        "six": F32(6),
        "minus_one": F32(-1),
        "one": F32(1),
    }
    return build(SHARED, init)


def grouped(rng: np.random.Generator) -> ir.Model:
    return build(GROUPED, {**spread_conv1(rng), "wg": weights(rng, 6, 4, 3, 3)})


def images(seed: int, batches: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 3, 10, 10)).astype(F32)} for _ in range(batches)]


CALIB, HELD_OUT = images(0), images(1)


def equalize(model: ir.Model, alpha: float = 0.5) -> ir.passes.PassResult:
    return EqualizeConvsPass(Calibrator.for_model(model, CALIB, show_progress=False), alpha=alpha)(model)


def channel_spans(model: ir.Model, name: str) -> np.ndarray:
    """Calibrated max - min (with zero) of each channel of the named NCHW tensor."""
    calibrator = Calibrator.for_model(model, CALIB, show_progress=False)
    found = channel_reductions(calibrator, model, {name: 4}, ("ReduceMax", "ReduceMin"))[name]
    return np.maximum(found["ReduceMax"], 0) - np.minimum(found["ReduceMin"], 0)


def test_chain_is_rescaled_exactly_and_relu6_clips_each_channel_at_its_own_bound():
    model = chain(np.random.default_rng(0))
    reference = model.clone()
    assert len(conv_pairs(model.graph)) == 3
    spans_before = channel_spans(model, "r1")

    assert equalize(model).modified
    assert "Clip" not in ops(model) and ops(model).count("Min") == 1
    bound = next(n for n in model.graph if n.op_type == "Min").inputs[1].const_value.numpy()
    assert bound.shape == (CHANNELS, 1, 1) and np.ptp(bound) > 1.0
    assert_same_outputs(reference, model, HELD_OUT)
    spans_after = channel_spans(model, "r1")
    # The depthwise reader takes alpha = 1: every channel of r1 ends at the same range.
    assert spans_before.max() / spans_before.min() > 5
    np.testing.assert_allclose(spans_after, spans_after.mean(), rtol=1e-4)


def test_clip_bound_is_reached_on_the_calibration_data():
    model = chain(np.random.default_rng(0))
    calibrator = Calibrator.for_model(model, CALIB, show_progress=False)
    found = channel_reductions(calibrator, model, {"c1": 4}, ("ReduceMax",))["c1"]["ReduceMax"]
    assert np.any(found > 6) and np.any(found < 6)  # so the exactness test covers both sides of the bound


def test_a_second_run_changes_nothing():
    model = chain(np.random.default_rng(0))
    assert equalize(model).modified
    assert not equalize(model).modified


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_pointwise_pairs_balance_activation_and_weight_ranges_by_alpha(alpha):
    model = chain(np.random.default_rng(0))
    reference = model.clone()
    assert equalize(model, alpha=alpha).modified
    assert_same_outputs(reference, model, HELD_OUT)


def test_grouped_reader_scales_each_input_channel_within_its_group():
    model = grouped(np.random.default_rng(1))
    reference = model.clone()
    assert equalize(model).modified
    assert_same_outputs(reference, model, HELD_OUT)
    spans = channel_spans(model, "r1")
    np.testing.assert_allclose(spans, spans.mean(), rtol=1e-4)


def test_shared_activation_and_non_relu_clip_are_left_alone():
    model = shared(np.random.default_rng(2))
    assert conv_pairs(model.graph) == []
    before = {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()}
    assert not equalize(model).modified
    after = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert by_name(model)["relu6"].op_type == "Clip"


def test_without_calibration_data_the_pass_refuses():
    model = chain(np.random.default_rng(0))
    with pytest.raises(ir.passes.PreconditionError, match="calibration"):
        EqualizeConvsPass(None)(model)


def test_depthwise_only_rescales_just_the_pairs_with_a_grouped_reader():
    model = chain(np.random.default_rng(0))
    reference = model.clone()
    untouched = {name: model.graph.initializers[name].const_value.numpy().copy() for name in ("wp", "wl")}

    result = EqualizeConvsPass(Calibrator.for_model(model, CALIB, show_progress=False), depthwise_only=True)(model)

    assert result.modified
    assert_same_outputs(reference, model, HELD_OUT)
    # conv1 -> depthwise was equalized; depthwise -> pointwise and pointwise -> last were not.
    spans = channel_spans(model, "r1")
    np.testing.assert_allclose(spans, spans.mean(), rtol=1e-4)
    readers = {node.name: node for node in model.graph}
    assert readers["pointwise"].inputs[1].name == "wp" and readers["last"].inputs[1].name == "wl"
    for name, array in untouched.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)


def test_headroom_leaves_each_bounded_channel_room_above_its_calibrated_range():
    model = chain(np.random.default_rng(0))
    reference = model.clone()
    spans_before = channel_spans(model, "r1")
    headroom = 3.0

    calibrator = Calibrator.for_model(model, CALIB, show_progress=False)
    assert EqualizeConvsPass(calibrator, depthwise_only=True, headroom=headroom)(model).modified

    assert_same_outputs(reference, model, HELD_OUT)
    # Channel k now spans min(3 r_k, 6) / s_k = the same for all: a channel below 2 keeps room up to 3 r_k.
    room = np.minimum(spans_before * headroom, 6.0) / spans_before
    spans_after = channel_spans(model, "r1")
    np.testing.assert_allclose(spans_after * room, (spans_after * room).max(), rtol=1e-4)
    assert np.any(room > 1.5) and np.any(room < 1.01)


def test_headroom_below_one_is_refused():
    with pytest.raises(ValueError, match="headroom"):
        EqualizeConvsPass(None, headroom=0.5)
