"""The ONNX-node torch interpreter against onnxruntime, op by op on one graph, and its refusal of unknown ops."""

from __future__ import annotations

import numpy as np
import pytest
from builders import build, run

torch = pytest.importorskip("torch")

from graphquant.analysis.torch_graph import run_nodes, supported

F32 = np.float32

OPS = """
<ir_version: 8, opset_import: ["" : 18]>
ops (float[2, 6, 8] x, int64[2, 6] ids) => (float[A, B, C] y, float[D, E, F] z, int64[G] shape, float[H, I] w) {
  table_rows = Gather<axis: int = 0>(table, ids)
  summed = Add(x, table_rows)
  normed = LayerNormalization<axis: int = -1, epsilon: float = 1e-5>(summed, gamma, beta)
  mean = ReduceMean<keepdims: int = 1>(normed, last_axis)
  centred = Sub(normed, mean)
  squared = Pow(centred, two)
  magnitude = Sqrt(squared)
  bent = Tanh(magnitude)
  flat = Reshape(bent, rows_by_8)
  projected = Gemm<transB: int = 1, alpha: float = 0.5, beta: float = 2.0>(flat, gemm_w, gemm_b)
  shape = Shape(x)
  back = Reshape(projected, shape)
  probabilities = Softmax<axis: int = 1>(back)
  swapped = Transpose<perm: ints = [0, 2, 1]>(probabilities)
  lifted = Unsqueeze(swapped, first_axis)
  dropped = Squeeze(lifted, first_axis)
  doubled = Concat<axis: int = 2>(dropped, dropped)
  strided = Slice(doubled, slice_starts, slice_ends, slice_axes, slice_steps)
  positive = Greater(x, zero)
  curved = Erf(x)
  cosine = Cos(x)
  sine = Sin(curved)
  waves = Add(cosine, sine)
  chosen = Where(positive, waves, curved)
  half = Constant<value = float[1] {0.5}>()
  scaled = Mul(chosen, half)
  ratio = Div(scaled, three)
  as_float = Cast<to: int = 1>(ids)
  column = Unsqueeze(as_float, last_axis)
  spread = Expand(column, expand_shape)
  y = Add(ratio, spread)
  z = MatMul(strided, mixing)
  w = Gather<axis: int = 1>(flat, picked)
}
"""


def ops_model(rng: np.random.Generator):
    """The op-coverage graph with random weights."""
    return build(
        OPS,
        {
            "table": rng.standard_normal((10, 8)).astype(F32),
            "gamma": rng.standard_normal(8).astype(F32),
            "beta": rng.standard_normal(8).astype(F32),
            "last_axis": np.array([-1], np.int64),
            "first_axis": np.array([0], np.int64),
            "two": np.array(2.0, F32),
            "three": np.array(3.0, F32),
            "zero": np.array(0.0, F32),
            "rows_by_8": np.array([-1, 8], np.int64),
            "gemm_w": rng.standard_normal((8, 8)).astype(F32),
            "gemm_b": rng.standard_normal(8).astype(F32),
            "slice_starts": np.array([10, 1], np.int64),
            "slice_ends": np.array([-100, 100], np.int64),
            "slice_axes": np.array([2, 1], np.int64),
            "slice_steps": np.array([-3, 2], np.int64),
            "mixing": rng.standard_normal((4, 8)).astype(F32),
            "expand_shape": np.array([2, 6, 8], np.int64),
            "picked": np.array([-1, 0, 3], np.int64),
        },
    )


def test_the_interpreter_matches_onnxruntime_on_every_op():
    rng = np.random.default_rng(0)
    model = ops_model(rng)
    feed = {"x": rng.standard_normal((2, 6, 8)).astype(F32), "ids": rng.integers(0, 10, (2, 6)).astype(np.int64)}
    expected = run(model, feed, optimize=False)
    values = {name: torch.from_numpy(array) for name, array in feed.items()}
    run_nodes(list(model.graph), values)
    for output, reference in zip(model.graph.outputs, expected):
        got = values[output.name].numpy()
        assert got.shape == reference.shape and got.dtype == reference.dtype
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_an_op_without_a_torch_form_is_refused_with_its_name():
    model = build(
        """
<ir_version: 8, opset_import: ["" : 17]>
e (float[2, 3] x) => (float[2, 3] y) {
  [hard] y = HardSwish(x)
}
"""
    )
    assert supported(list(model.graph)) == "hard: op HardSwish has no torch form here"
    with pytest.raises(NotImplementedError, match="HardSwish"):
        run_nodes(list(model.graph), {"x": torch.zeros(2, 3)})


CNN_OPS = """
<ir_version: 8, opset_import: ["" : 18]>
cnn (float[2, 4, 9, 10] x) => (float[A, B] y, float[C, D, E, F] t, float[G, H, I, J] p, float[K, L, M, N] s) {
  stem = Conv<pads: ints = [1, 0, 2, 1], strides: ints = [2, 1], dilations: ints = [1, 2]>(x, w_stem, b_stem)
  grouped = Conv<group: int = 2, pads: ints = [1, 1, 1, 1]>(stem, w_grouped)
  six = Clip(grouped, zero, six_bound)
  depthwise = Conv<group: int = 8, auto_pad: string = "SAME_UPPER", strides: ints = [2, 2]>(six, w_depth, b_depth)
  normed = BatchNormalization<epsilon: float = 1e-3>(depthwise, bn_scale, bn_bias, bn_mean, bn_var)
  leaky = LeakyRelu<alpha: float = 0.1>(normed)
  gate = HardSigmoid<alpha: float = 0.3, beta: float = 0.4>(leaky)
  gated = Mul(leaky, gate)
  relu = Relu(gated)
  pooled = GlobalAveragePool(relu)
  flat = Flatten<axis: int = 1>(pooled)
  y = Gemm<transB: int = 1>(flat, w_fc, b_fc)
  t = ConvTranspose<group: int = 2, strides: ints = [2, 2], pads: ints = [1, 0, 0, 1], output_padding: ints = [1, 0]>(
      six, w_up, b_up)
  maxed = MaxPool<kernel_shape: ints = [3, 2], strides: ints = [2, 2], pads: ints = [1, 0, 1, 1]>(stem)
  p = AveragePool<kernel_shape: ints = [3, 3], strides: ints = [2, 2], pads: ints = [1, 1, 0, 1]>(maxed)
  included = AveragePool<kernel_shape: ints = [2, 2], count_include_pad: int = 1, pads: ints = [1, 1, 1, 1]>(stem)
  biggest = GlobalMaxPool(included)
  s = Add(included, biggest)
}
"""


def cnn_ops_model(rng: np.random.Generator):
    """The CNN op-coverage graph with random weights."""

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(F32)

    return build(
        CNN_OPS,
        {
            "w_stem": normal(8, 4, 3, 2),
            "b_stem": normal(8),
            "w_grouped": normal(8, 4, 3, 3),
            "zero": np.array(0.0, F32),
            "six_bound": np.array(6.0, F32),
            "w_depth": normal(8, 1, 3, 3),
            "b_depth": normal(8),
            "bn_scale": normal(8),
            "bn_bias": normal(8),
            "bn_mean": normal(8),
            "bn_var": rng.uniform(0.5, 2.0, 8).astype(F32),
            "w_fc": normal(5, 8),
            "b_fc": normal(5),
            "w_up": normal(8, 3, 3, 2),
            "b_up": normal(6),
        },
    )


def test_the_interpreter_matches_onnxruntime_on_every_cnn_op():
    rng = np.random.default_rng(1)
    model = cnn_ops_model(rng)
    feed = {"x": rng.standard_normal((2, 4, 9, 10)).astype(F32)}
    expected = run(model, feed, optimize=False)
    values = {"x": torch.from_numpy(feed["x"])}
    run_nodes(list(model.graph), values)
    for output, reference in zip(model.graph.outputs, expected):
        got = values[output.name].numpy()
        assert got.shape == reference.shape
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)


def test_clip_reads_its_bounds_from_attributes_at_opset_6():
    model = build(
        """
<ir_version: 3, opset_import: ["" : 6]>
c (float[2, 3] x) => (float[2, 3] y) {
  y = Clip<min: float = -0.5, max: float = 0.25>(x)
}
"""
    )
    x = np.array([[-1.0, -0.2, 0.1], [0.3, 2.0, -0.6]], F32)
    values = {"x": torch.from_numpy(x)}
    run_nodes(list(model.graph), values)
    np.testing.assert_array_equal(values["y"].numpy(), run(model, {"x": x}, optimize=False)[0])
