"""FoldBatchNormPass: inference BatchNormalization into Conv/ConvTranspose/Gemm/MatMul+Add, exact in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from builders import build, by_name, ops, run, weights
from graphquant.passes.fold_batchnorm import FoldBatchNormPass

# Folding changes the float rounding only: outputs of order 1 agree to rtol 1e-5 and atol 1e-5.
RTOL = ATOL = 1e-5


def bn_parameters(rng: np.random.Generator, channels: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    """BatchNormalization gamma, beta, running mean and variance far from the identity."""
    return {
        f"{prefix}_gamma": (1.0 + rng.standard_normal(channels)).astype(np.float32),
        f"{prefix}_beta": rng.standard_normal(channels).astype(np.float32),
        f"{prefix}_mean": rng.standard_normal(channels).astype(np.float32),
        f"{prefix}_var": (0.1 + rng.random(channels) * 3).astype(np.float32),
    }


def assert_exact(reference: ir.Model, folded: ir.Model, feed: dict[str, np.ndarray]) -> None:
    onnx.checker.check_model(ir.to_proto(folded))
    for expected, got in zip(run(reference, feed), run(folded, feed), strict=True):
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def fold(model: ir.Model) -> tuple[ir.Model, ir.passes.PassResult]:
    reference = model.clone()
    return reference, FoldBatchNormPass()(model)


CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
conv_bn (float[2, 3, 8, 8] x) => (float[2, 6, 8, 8] y) {
  [conv] c = Conv<pads: ints = [1, 1, 1, 1]>(x, w, b)
  [bn] n = BatchNormalization<epsilon: float = 0.001>(c, bn_gamma, bn_beta, bn_mean, bn_var)
  [act] y = Relu(n)
}
"""


def test_conv_bn_folds_into_weight_and_bias():
    rng = np.random.default_rng(0)
    model = build(CONV_BN, {"w": weights(rng, 6, 3, 3, 3), "b": weights(rng, 6), **bn_parameters(rng, 6)})
    reference, result = fold(model)
    assert result.modified
    assert ops(model) == ["Conv", "Relu"]
    conv = by_name(model)["conv"]
    assert conv.outputs[0].name == "n"  # the layer output takes the BN output's name (per-layer checks key on it)
    assert not {"w", "b", "bn_gamma", "bn_beta", "bn_mean", "bn_var"} & set(model.graph.initializers)
    params = {k: v.const_value.numpy() for k, v in reference.graph.initializers.items()}
    a = params["bn_gamma"] / np.sqrt(params["bn_var"] + np.float32(0.001))
    np.testing.assert_allclose(conv.inputs[1].const_value.numpy(), params["w"] * a[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(
        conv.inputs[2].const_value.numpy(), (params["b"] - params["bn_mean"]) * a + params["bn_beta"], rtol=1e-5
    )
    assert_exact(reference, model, {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)})


CONV_NO_BIAS_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
conv_chain (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y) {
  [conv] c = Conv<group: int = 4, kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, w)
  [bn1] n = BatchNormalization(c, a_gamma, a_beta, a_mean, a_var)
  [bn2] y = BatchNormalization(n, b_gamma, b_beta, b_mean, b_var)
}
"""


def test_depthwise_conv_without_bias_takes_two_batchnorms_in_a_row_and_the_graph_output_name():
    rng = np.random.default_rng(1)
    model = build(
        CONV_NO_BIAS_CHAIN, {"w": weights(rng, 4, 1, 3, 3), **bn_parameters(rng, 4, "a"), **bn_parameters(rng, 4, "b")}
    )
    reference, result = fold(model)
    assert result.modified
    assert ops(model) == ["Conv"]
    assert [value.name for value in model.graph.outputs] == ["y"]
    assert len(by_name(model)["conv"].inputs) == 3  # a bias was created
    assert_exact(reference, model, {"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)})


CONV_TRANSPOSE_BN = """
<ir_version: 8, opset_import: ["" : 17]>
deconv_bn (float[2, 4, 5, 5] x) => (float[2, 6, 10, 10] y) {
  [deconv] c = ConvTranspose<group: int = 2, strides: ints = [2, 2], kernel_shape: ints = [2, 2]>(x, w, b)
  [bn] y = BatchNormalization(c, bn_gamma, bn_beta, bn_mean, bn_var)
}
"""


def test_grouped_conv_transpose_scales_each_group_s_output_columns():
    rng = np.random.default_rng(2)
    # W is [C_in = 4, C_out/group = 3, 2, 2]; output channel g*3 + j comes from rows of group g, column j.
    model = build(CONV_TRANSPOSE_BN, {"w": weights(rng, 4, 3, 2, 2), "b": weights(rng, 6), **bn_parameters(rng, 6)})
    reference, result = fold(model)
    assert result.modified and ops(model) == ["ConvTranspose"]
    assert_exact(reference, model, {"x": rng.standard_normal((2, 4, 5, 5)).astype(np.float32)})


DENSE_BN = """
<ir_version: 8, opset_import: ["" : 17]>
dense_bn (float[N, 8] x) => (float[N, 6] y, float[N, 6] z) {
  [gemm] g = Gemm<transB: int = 1, alpha: float = 0.5>(x, wg, cg)
  [bn_g] y = BatchNormalization(g, g_gamma, g_beta, g_mean, g_var)
  [matmul] m = MatMul(x, wm)
  [bias] mb = Add(m, bm)
  [bn_m] z = BatchNormalization(mb, m_gamma, m_beta, m_mean, m_var)
}
"""


def test_gemm_and_matmul_with_bias_add_fold_on_the_column_axis():
    rng = np.random.default_rng(3)
    initializers = {"wg": weights(rng, 6, 8), "cg": weights(rng, 6), "wm": weights(rng, 8, 6), "bm": weights(rng, 1, 6)}
    model = build(DENSE_BN, {**initializers, **bn_parameters(rng, 6, "g"), **bn_parameters(rng, 6, "m")})
    reference, result = fold(model)
    assert result.modified
    assert ops(model) == ["Gemm", "MatMul", "Add"]
    assert_exact(reference, model, {"x": rng.standard_normal((5, 8)).astype(np.float32)})


NOT_FOLDABLE = """
<ir_version: 8, opset_import: ["" : 17]>
not_foldable (float[2, 3, 4, 4] x, float[2, 4, 3] s) => (float[2, 4, 4, 4] y, float[2, 4, 4] z) {
  [conv] c = Conv<kernel_shape: ints = [1, 1]>(x, w)
  [act] r = Relu(c)
  [bn] y = BatchNormalization(r, bn_gamma, bn_beta, bn_mean, bn_var)
  [matmul] m = MatMul(s, wm)
  [bias] mb = Add(m, bm)
  [bn_rank3] z = BatchNormalization(mb, bn_gamma, bn_beta, bn_mean, bn_var)
}
"""


def test_batchnorm_after_a_relu_or_on_a_rank_3_matmul_is_left_alone():
    rng = np.random.default_rng(4)
    # At rank 3 BN's channel axis 1 is the MatMul's row axis, not its output column: no fold is possible.
    model = build(
        NOT_FOLDABLE,
        {"w": weights(rng, 4, 3, 1, 1), "wm": weights(rng, 3, 4), "bm": weights(rng, 4), **bn_parameters(rng, 4)},
    )
    before = ops(model)
    assert not FoldBatchNormPass()(model).modified
    assert ops(model) == before


SHARED = """
<ir_version: 8, opset_import: ["" : 17]>
shared (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y, float[1, 4, 4, 4] c, float[1, 4, 4, 4] z) {
  [conv] c = Conv<kernel_shape: ints = [1, 1]>(x, w)
  [bn] y = BatchNormalization(c, bn_gamma, bn_beta, bn_mean, bn_var)
  [conv2] d = Conv<kernel_shape: ints = [1, 1]>(x, w)
  [bn2] n = BatchNormalization(d, bn_gamma, bn_beta, bn_mean, bn_var)
  [act] r = Relu(d)
  [sum] z = Add(n, r)
}
"""


def test_a_conv_output_with_other_readers_keeps_its_batchnorm():
    rng = np.random.default_rng(5)
    model = build(SHARED, {"w": weights(rng, 4, 3, 1, 1), **bn_parameters(rng, 4)})
    before = ops(model)
    assert not FoldBatchNormPass()(model).modified  # c is a graph output; d is read by the Relu too
    assert ops(model) == before


SHARED_WEIGHT = """
<ir_version: 8, opset_import: ["" : 17]>
shared_weight (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y, float[1, 4, 4, 4] z) {
  [conv1] c1 = Conv<kernel_shape: ints = [1, 1]>(x, w)
  [bn1] y = BatchNormalization(c1, a_gamma, a_beta, a_mean, a_var)
  [conv2] z = Conv<kernel_shape: ints = [1, 1]>(x, w)
}
"""


def test_a_weight_shared_with_an_unfolded_conv_is_copied_not_changed():
    rng = np.random.default_rng(6)
    model = build(SHARED_WEIGHT, {"w": weights(rng, 4, 3, 1, 1), **bn_parameters(rng, 4, "a")})
    reference, result = fold(model)
    assert result.modified
    assert by_name(model)["conv2"].inputs[1].name == "w"
    assert by_name(model)["conv1"].inputs[1].name != "w"
    assert_exact(reference, model, {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)})


TRAINING = """
<ir_version: 8, opset_import: ["" : 15]>
training (float[2, 4, 3, 3] x) => (float[2, 4, 3, 3] y, float[4] running_mean) {
  [conv] c = Conv<kernel_shape: ints = [1, 1]>(x, w)
  [bn] y, running_mean, running_var = BatchNormalization<training_mode: int = 1>(c, g, b, m, v)
}
"""

INPUT_PARAMETERS = """
<ir_version: 8, opset_import: ["" : 17]>
input_parameters (float[2, 4, 3, 3] x, float[4] g) => (float[2, 4, 3, 3] y) {
  [conv] c = Conv<kernel_shape: ints = [1, 1]>(x, w)
  [bn] y = BatchNormalization(c, g, b, m, v)
}
"""


@pytest.mark.parametrize("text", [TRAINING, INPUT_PARAMETERS], ids=["training_mode", "gamma_is_an_input"])
def test_training_mode_and_non_constant_parameters_are_not_folded(text):
    rng = np.random.default_rng(7)
    params = {"w": weights(rng, 4, 4, 1, 1), "b": weights(rng, 4), "m": weights(rng, 4), "v": np.ones(4, np.float32)}
    if text == TRAINING:
        params["g"] = np.ones(4, np.float32)
    model = build(text, params)
    before = ops(model)
    assert not FoldBatchNormPass()(model).modified
    assert ops(model) == before
