"""inspect's summaries: graph inputs, and activation channels on the consumer's channel axis."""

from __future__ import annotations

import numpy as np
import pytest
from builders import build, run, weights

import graphquant
from graphquant.summary import activation_summaries, graph_inputs

CONV = """
<ir_version: 8, opset_import: ["" : 17]>
conv (float[N, 4, 6, 10] x) => (float[N, 8, 6, 10] c) {
  [conv] c = Conv<pads: ints = [1, 1, 1, 1]>(x, w)
}
"""
CONV_THEN_MATMUL = CONV.replace("(float[N, 8, 6, 10] c)", "(float[N, 8, 6, 3] y)").replace(
    "}", "  [matmul] y = MatMul(c, m)\n}"
)


def channel_spread(absmax: np.ndarray) -> float:
    """max over channels of max|x| divided by the median channel's."""
    return float(absmax.max() / np.median(absmax))


def test_conv_inputs_count_channels_on_axis_1():
    rng = np.random.default_rng(0)
    w = weights(rng, 8, 4, 3, 3)
    model = build(CONV_THEN_MATMUL, {"w": w, "m": weights(rng, 10, 3)})
    x = rng.standard_normal((16, 4, 6, 10)).astype(np.float32)
    x[:, 2] *= 40.0  # one outlier channel of the four; the last axis (width 10) has none
    summaries = {s.layer: s for s in activation_summaries(model, graphquant.Calibrator.for_model(model, [{"x": x}]))}

    conv = summaries["conv"]
    assert (conv.tensor, conv.channels, conv.outlier_channels) == ("x", 4, 1)
    assert conv.minimum == pytest.approx(x.min()) and conv.maximum == pytest.approx(x.max())
    assert conv.spread == pytest.approx(channel_spread(np.abs(x).max(axis=(0, 2, 3))), rel=1e-6)

    (c,) = run(build(CONV, {"w": w}), {"x": x})
    matmul = summaries["matmul"]  # a MatMul reads its channels on the last axis
    assert (matmul.tensor, matmul.channels) == ("c", 10)
    assert matmul.spread == pytest.approx(channel_spread(np.abs(c).max(axis=(0, 1, 2))), rel=1e-5)
    assert [node.op_type for node in model.graph] == ["Conv", "MatMul"]  # the probe Transpose went on a copy


def test_graph_inputs_name_dtype_and_shape_but_not_initializers():
    text = """
    <ir_version: 3, opset_import: ["" : 9]>
    old (float[batch, 16] x, int64[2, ?] ids, float[16, 4] w) => (float[batch, 4] y) {
      y = MatMul(x, w)
    }
    """
    model = build(text, {"w": weights(np.random.default_rng(1), 16, 4)})
    assert graph_inputs(model) == [("x", "float32", "[batch, 16]"), ("ids", "int64", "[2, ?]")]
