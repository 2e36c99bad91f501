"""The im2col Gram of conv inputs: w_o^T G w_o must equal onnxruntime's ||y_o||^2 for every output channel."""

from __future__ import annotations

import numpy as np
import pytest

from builders import build, run, weights
from graphquant.analysis.conv_gram import ConvGeometry, ConvGrams, paired_moments, patch_gram
from graphquant.analysis.layers import classify
from graphquant.analysis.weight_fit import in_major

# (op, attributes, weight shape [.., .., k...], input channels, spatial size)
GEOMETRIES = [
    ("Conv", "kernel_shape: ints = [3, 3], pads: ints = [0, 0, 1, 1], strides: ints = [2, 2]", (6, 4, 3, 3), 4, 7),
    ("Conv", "kernel_shape: ints = [3, 3], pads: ints = [2, 1, 2, 1], dilations: ints = [2, 1]", (6, 4, 3, 3), 4, 7),
    ("Conv", "kernel_shape: ints = [3, 3], group: int = 2, pads: ints = [1, 1, 1, 1]", (6, 2, 3, 3), 4, 6),
    ("Conv", "kernel_shape: ints = [5, 5], group: int = 4, pads: ints = [2, 2, 2, 2]", (8, 1, 5, 5), 4, 6),
    (
        "Conv",
        'kernel_shape: ints = [3, 2], auto_pad: string = "SAME_UPPER", strides: ints = [2, 2]',
        (5, 4, 3, 2),
        4,
        7,
    ),
    ("Conv", 'kernel_shape: ints = [2, 3], auto_pad: string = "SAME_LOWER"', (5, 4, 2, 3), 4, 5),
    ("Conv", "kernel_shape: ints = [3], pads: ints = [1, 0], strides: ints = [2]", (3, 4, 3), 4, 9),
    (
        "ConvTranspose",
        "kernel_shape: ints = [3, 3], strides: ints = [2, 2], pads: ints = [1, 0, 0, 1]",
        (4, 5, 3, 3),
        4,
        5,
    ),
    (
        "ConvTranspose",
        "kernel_shape: ints = [3, 3], strides: ints = [2, 1], dilations: ints = [1, 2], output_padding: ints = [1, 0]",
        (4, 3, 3, 3),
        4,
        5,
    ),
]


def conv_model(op: str, attributes: str, shape: tuple[int, ...], channels: int, size: int):
    spatial = ", ".join([str(size)] * (len(shape) - 2))
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {channels}, {spatial}] x) => (float[N, ?, ?] y) {{
      [layer] y = {op}<{attributes}>(x, w)
    }}
    """.replace("float[N, ?, ?]", "float" if len(shape) != 4 else "float[N, ?, ?, ?]")
    return build(text, {"w": weights(np.random.default_rng(len(attributes)), *shape)})


@pytest.mark.parametrize(("op", "attributes", "shape", "channels", "size"), GEOMETRIES)
def test_the_gram_gives_each_output_channels_energy_as_onnxruntime_computes_it(op, attributes, shape, channels, size):
    model = conv_model(op, attributes, shape, channels, size)
    layer = classify(next(iter(model.graph))).layer
    geometry = ConvGeometry.of_layer(layer)
    x = np.random.default_rng(1).standard_normal((3, channels, *([size] * (len(shape) - 2)))).astype(np.float32)
    (y,) = run(model, {"x": x})
    gram = patch_gram(x, geometry)
    columns = in_major(layer)
    per_group = columns.shape[1] // geometry.group
    predicted = [columns[:, o] @ gram[o // per_group] @ columns[:, o] for o in range(columns.shape[1])]
    energy = np.sum(y.astype(np.float64) ** 2, axis=tuple(i for i in range(y.ndim) if i != 1))
    np.testing.assert_allclose(predicted, energy, rtol=1e-4)


@pytest.mark.parametrize("index", [0, 2, 3, 7])
def test_paired_moments_give_the_cross_products_and_means_of_two_inputs_outputs_as_onnxruntime_computes_them(index):
    op, attributes, shape, channels, size = GEOMETRIES[index]
    model = conv_model(op, attributes, shape, channels, size)
    layer = classify(next(iter(model.graph))).layer
    geometry = ConvGeometry.of_layer(layer)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, channels, size, size)).astype(np.float32)
    x_tilde = (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    (y,), (y_tilde,) = run(model, {"x": x}), run(model, {"x": x_tilde})
    moments = paired_moments(x_tilde, x, geometry)
    columns = in_major(layer)
    per_group = columns.shape[1] // geometry.group
    outputs = range(columns.shape[1])
    cross = [columns[:, o] @ moments.cross[o // per_group] @ columns[:, o] for o in outputs]
    means = [moments.float_sum[o // per_group] @ columns[:, o] / moments.count for o in outputs]
    tilde_means = [moments.quantized_sum[o // per_group] @ columns[:, o] / moments.count for o in outputs]
    axes = tuple(i for i in range(y.ndim) if i != 1)
    np.testing.assert_allclose(cross, np.sum(y_tilde.astype(np.float64) * y, axis=axes), rtol=1e-4)
    np.testing.assert_allclose(means, y.mean(axis=axes), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tilde_means, y_tilde.mean(axis=axes), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(moments.gram, patch_gram(x_tilde, geometry), rtol=1e-12)
    assert moments.count * columns.shape[1] == y.size


def test_batches_stream_into_one_gram_per_layer_and_non_finite_values_count_as_zero():
    model = conv_model(*GEOMETRIES[0])
    layer = classify(next(iter(model.graph))).layer
    x = np.random.default_rng(2).standard_normal((4, 4, 7, 7)).astype(np.float32)
    grams = ConvGrams([layer])
    assert grams.input_names == ["x"]
    dirty = x[2:].copy()
    dirty[0, 1, 3, 3] = np.nan
    grams.observe("x", x[:2])
    grams.observe("x", dirty)
    grams.observe("other", x)
    clean = x.copy()
    clean[2, 1, 3, 3] = 0.0
    np.testing.assert_allclose(grams.gram(layer), patch_gram(clean, ConvGeometry.of_layer(layer)), rtol=1e-12)


def test_a_grouped_conv_transpose_and_explicit_output_shapes_have_no_geometry():
    grouped = conv_model("ConvTranspose", "kernel_shape: ints = [2, 2], group: int = 2", (4, 3, 2, 2), 4, 5)
    shaped = conv_model("ConvTranspose", "kernel_shape: ints = [2, 2], output_shape: ints = [6, 6]", (4, 3, 2, 2), 4, 5)
    for model in (grouped, shaped):
        assert ConvGeometry.of_layer(classify(next(iter(model.graph))).layer) is None
