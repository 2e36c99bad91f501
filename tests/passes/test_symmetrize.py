"""SymmetrizePass: exact channel shifts folded into LayerNormalization or a Mul/Add branch, and into the biases."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from builders import (
    OUTLIER_CHANNELS,
    activation_outputs,
    assert_same_outputs,
    build,
    by_name,
    gaussian_feeds,
    initializer,
    input_layer,
    ln_gemms,
    ln_qkv,
    ops,
    outlier_feeds,
    outlier_layer_norm,
    post_ln,
    relu_only,
    weights,
)
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.stats import TensorStats
from graphquant.passes.symmetrize import SHIFT_KEY, SymmetrizePass, useful_shift
from graphquant.rewrites import AFFINE_BRANCH_KEY

CALIB = gaussian_feeds(seed=100)
HELD_OUT = gaussian_feeds(seed=101, batches=2)


def symmetrize(model: ir.Model, data=CALIB) -> ir.passes.PassResult:
    return SymmetrizePass(Calibrator.for_model(model, data, show_progress=False))(model)


def branch_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if AFFINE_BRANCH_KEY in node.meta]


def test_exclusive_layer_norm_takes_the_shift_in_beta_and_the_biases_take_z_times_w():
    rng = np.random.default_rng(0)
    model = ln_qkv(rng)
    reference = model.clone()
    h_stats = Calibrator.for_model(model, CALIB, show_progress=False).collect(model, ["h"])["h"]
    gamma, beta = initializer(model, "ln_gamma"), initializer(model, "ln_beta")
    wq, bq = initializer(model, "wq"), initializer(model, "bq")
    before = ops(model)

    assert symmetrize(model).modified
    assert ops(model) == before  # no new Mul/Add: all of it went into the LN's beta and the bias Adds
    assert not branch_nodes(model)
    ln = by_name(model)["ln"]
    shift = ln.outputs[0].meta[SHIFT_KEY]
    assert set(np.flatnonzero(np.abs(shift) > 10)) == set(OUTLIER_CHANNELS)
    midpoint = (h_stats.channel_min + h_stats.channel_max) / 2  # the calibrated channel midpoint
    np.testing.assert_allclose(shift[list(OUTLIER_CHANNELS)], midpoint[list(OUTLIER_CHANNELS)], rtol=1e-6)
    assert np.all(np.sign(shift[list(OUTLIER_CHANNELS)]) == np.sign(beta[list(OUTLIER_CHANNELS)]))
    np.testing.assert_array_equal(ln.inputs[1].const_value.numpy(), gamma)  # a pure shift keeps gamma
    np.testing.assert_allclose(ln.inputs[2].const_value.numpy(), beta - shift, rtol=1e-6)
    q_bias = by_name(model)["q_bias"]
    assert q_bias.inputs[0].producer().name == "q_proj"
    np.testing.assert_allclose(
        q_bias.inputs[1].const_value.numpy(), bq + shift.astype(np.float64) @ wq, rtol=1e-5, atol=1e-5
    )
    assert_same_outputs(reference, model, HELD_OUT)


def test_layer_norm_that_also_feeds_a_residual_is_cloned_and_the_residual_keeps_original_values():
    model = post_ln(np.random.default_rng(1))
    gamma, beta = initializer(model, "ln_gamma"), initializer(model, "ln_beta")
    reference = model.clone()
    assert symmetrize(model).modified
    assert ops(model).count("LayerNormalization") == 2
    assert not branch_nodes(model)
    nodes = by_name(model)
    original, fc, residual = nodes["ln"], nodes["fc"], nodes["residual"]
    clone = fc.inputs[0].producer()
    assert clone.op_type == "LayerNormalization" and clone is not original
    assert clone.inputs[0] is original.inputs[0]  # both read x
    assert residual.inputs[0] is original.outputs[0]  # the residual reads the untouched LN...
    np.testing.assert_array_equal(original.inputs[1].const_value.numpy(), gamma)
    np.testing.assert_array_equal(original.inputs[2].const_value.numpy(), beta)
    shift = clone.outputs[0].meta[SHIFT_KEY]
    np.testing.assert_allclose(clone.inputs[2].const_value.numpy(), beta - shift, rtol=1e-6)  # ...the MatMul the copy
    assert_same_outputs(reference, model, HELD_OUT)


def test_gemm_trans_b_with_and_without_c():
    model = ln_gemms(np.random.default_rng(2))
    w1, c1, w2 = initializer(model, "w1"), initializer(model, "c1"), initializer(model, "w2")
    reference = model.clone()
    assert symmetrize(model).modified
    nodes = by_name(model)
    shift = nodes["ln"].outputs[0].meta[SHIFT_KEY].astype(np.float64)
    assert len(nodes["without_c"].inputs) == 3  # a C was created
    np.testing.assert_allclose(nodes["without_c"].inputs[2].const_value.numpy(), w2 @ shift, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nodes["with_c"].inputs[2].const_value.numpy(), c1 + w1 @ shift, rtol=1e-5, atol=1e-5)
    assert ops(model) == ["LayerNormalization", "Gemm", "Gemm"]
    assert_same_outputs(reference, model, HELD_OUT)


def test_graph_input_gets_an_add_branch_and_a_new_bias_add_keeps_the_output_name():
    model = input_layer(np.random.default_rng(3))
    w = initializer(model, "w")
    reference = model.clone()
    assert symmetrize(model, outlier_feeds(30)).modified
    branch = branch_nodes(model)
    assert [node.op_type for node in branch] == ["Add"]  # a pure shift: no Mul
    assert branch[0].inputs[0].name == "x"
    shift = -branch[0].inputs[1].const_value.numpy()
    assert np.all(shift[:3] > 20) and np.all(np.abs(shift[3:]) < 2)  # the +50 channels are re-centred
    fc = by_name(model)["fc"]
    assert fc.inputs[0] is branch[0].outputs[0]
    # The MatMul had no bias: a new Add carries z·W and its output took over the name "y".
    (bias_add,) = [node for node in model.graph if node.op_type == "Add" and node not in branch]
    assert bias_add.inputs[0] is fc.outputs[0] and fc.outputs[0].name != "y"
    assert bias_add.outputs[0].name == "y" and model.graph.outputs[0] is bias_add.outputs[0]
    expected_bias = shift.astype(np.float64) @ w
    np.testing.assert_allclose(bias_add.inputs[1].const_value.numpy(), expected_bias, rtol=1e-5, atol=1e-4)
    assert_same_outputs(reference, model, outlier_feeds(31, batches=2))


def test_activations_that_are_graph_outputs_keep_their_values():
    model = activation_outputs(np.random.default_rng(4))
    beta = initializer(model, "ln_beta")
    reference = model.clone()
    assert symmetrize(model).modified
    assert [value.name for value in model.graph.outputs] == ["a", "h", "y", "z"]
    nodes = by_name(model)
    # a: not exclusive (graph output), so the MatMul reads a shifted branch
    (branch,) = branch_nodes(model)
    assert branch.inputs[0] is nodes["offset"].outputs[0] and nodes["fc_a"].inputs[0] is branch.outputs[0]
    # h: the LayerNormalization is cloned and the graph output keeps the original
    assert ops(model).count("LayerNormalization") == 2
    assert nodes["fc_h"].inputs[0].producer() is not nodes["ln"]
    np.testing.assert_array_equal(nodes["ln"].inputs[2].const_value.numpy(), beta)
    assert_same_outputs(reference, model, HELD_OUT)


MIXED = """
<ir_version: 8, opset_import: ["" : 17]>
mixed (float[N, 16] x) => (float[N, 8] y) {
  [ln] h = LayerNormalization<axis: int = -1>(x, ln_gamma, ln_beta)
  [fc1] f = MatMul(h, w1)
  [fc1_bias] fb = Add(f, b1)
  [act] r = Relu(fb)
  [fc2] y = MatMul(r, w2)
}
"""


def test_one_sided_sparse_relu_channels_stay_unshifted_while_the_layer_norm_output_is_shifted():
    rng = np.random.default_rng(5)
    gamma, beta = outlier_layer_norm(rng)
    w1 = weights(rng, 16, 16, scale=0.3)  # fc1 outputs about N(0, 1) per channel
    w1[list(OUTLIER_CHANNELS)] = 0.0
    b1 = np.full(16, -1.0, np.float32)  # ReLU(N(-1, 1)): mostly zero, sometimes large
    w2 = weights(rng, 16, 8)
    model = build(MIXED, {"ln_gamma": gamma, "ln_beta": beta, "w1": w1, "b1": b1, "w2": w2})
    reference = model.clone()
    calibrator = Calibrator.for_model(model, CALIB, show_progress=False)
    stats = calibrator.collect(model, ["h", "r"])
    relu_midpoint = (stats["r"].channel_min + stats["r"].channel_max) / 2
    assert np.all(relu_midpoint > 0.2)  # the naive midpoint shift would move every ReLU channel...
    np.testing.assert_array_equal(useful_shift(stats["r"]), np.zeros(16))  # ...but it would raise E[x^2]
    assert np.all(np.abs(useful_shift(stats["h"])[list(OUTLIER_CHANNELS)]) > 20)

    assert SymmetrizePass(calibrator)(model).modified
    nodes = by_name(model)
    assert SHIFT_KEY in nodes["ln"].outputs[0].meta
    assert nodes["fc2"].inputs[0] is nodes["act"].outputs[0] and SHIFT_KEY not in nodes["act"].outputs[0].meta
    np.testing.assert_array_equal(nodes["fc2"].inputs[1].const_value.numpy(), w2)
    assert nodes["fc2"].outputs[0].name == "y" and model.graph.outputs[0].producer() is nodes["fc2"]  # no bias added
    assert_same_outputs(reference, model, HELD_OUT)


def test_useful_shift_keeps_only_shifts_that_lower_the_mean_square():
    rng = np.random.default_rng(6)
    data = np.stack(
        [
            rng.standard_normal(4096) + 40.0,  # off-centre: shifted
            np.maximum(rng.standard_normal(4096) - 1.0, 0.0),  # one-sided sparse: kept
            rng.standard_normal(4096),  # centred: the tiny midpoint shift may or may not help, never by much
        ],
        axis=1,
    )
    stats = TensorStats.from_batch(data)
    shift = useful_shift(stats)
    assert shift.dtype == np.float32
    np.testing.assert_allclose(shift[0], (data[:, 0].min() + data[:, 0].max()) / 2, rtol=1e-6)
    assert shift[1] == 0.0
    assert np.mean((data[:, 2] - shift[2]) ** 2) <= np.mean(data[:, 2] ** 2)


def test_no_matmul_means_not_modified():
    model = relu_only()
    assert not symmetrize(model, [{"x": np.ones((2, 4), np.float32)}]).modified
    assert ops(model) == ["Relu"]


def test_centred_channels_are_not_modified():
    rng = np.random.default_rng(7)
    model = input_layer(rng)
    x = rng.standard_normal((64, 16)).astype(np.float32) * 10
    # x and -x: every channel's midpoint is exactly zero
    assert not symmetrize(model, [{"x": x}, {"x": -x}]).modified
    assert ops(model) == ["MatMul"]


def test_running_twice_changes_nothing_the_second_time():
    rng = np.random.default_rng(8)
    model = ln_qkv(rng)
    reference = model.clone()
    assert symmetrize(model).modified
    beta = by_name(model)["ln"].inputs[2].const_value.numpy().copy()
    before = ops(model)
    assert not symmetrize(model).modified  # SHIFT_KEY marks the group as done
    assert ops(model) == before
    np.testing.assert_array_equal(by_name(model)["ln"].inputs[2].const_value.numpy(), beta)
    assert_same_outputs(reference, model, HELD_OUT)


def test_gemm_with_alpha_is_left_alone():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    scaled_gemm (float[N, 16] x) => (float[N, 8] y) {
      [g] y = Gemm<alpha: float = 2.0>(x, w, c)
    }
    """
    rng = np.random.default_rng(9)
    model = build(text, {"w": weights(rng, 16, 8), "c": weights(rng, 8)})
    reference = model.clone()
    assert not symmetrize(model, outlier_feeds(32)).modified
    assert ops(model) == ["Gemm"]
    assert_same_outputs(reference, model, outlier_feeds(33, batches=1))


def test_without_calibration_is_a_precondition_error():
    with pytest.raises(ir.passes.PreconditionError, match="calibration"):
        SymmetrizePass(None)(relu_only())
