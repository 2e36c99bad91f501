"""BitModPass: weights rebuilt in-graph from packed codes, type ids and scales; checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import build, by_name, gaussian_feeds, initializer, ops, relu_only, run, weights

import graphquant
from graphquant.analysis.bitmod import quantize_weight
from graphquant.analysis.runner import initializer_bytes
from graphquant.passes import BitModPass, QuantizePass
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, KEEP_FLOAT_KEY, symmetric_spec

LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
layers (float[N, {k}] x, float[{k}, 24] xt) => (float[N, 24] y, float[N, 24] z, float[N, 24] s) {{
  [fc] f = MatMul(x, w)
  [fc_bias] y = Add(f, b)
  [gemm] z = Gemm<transB: int = 1>(x, wt, c)
  [scores] s = MatMul(x, xt)
}}
"""


def layers(rng: np.random.Generator, k: int) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """MatMul+Add, Gemm(transB) and an activation x activation MatMul (x times the graph input xt), with K = k."""
    arrays = {"w": weights(rng, k, 24), "b": weights(rng, 24), "wt": weights(rng, 24, k), "c": weights(rng, 24)}
    return build(LAYERS.format(k=k), arrays), arrays


def reference(arrays: dict[str, np.ndarray], x: np.ndarray, xt: np.ndarray, bits: int) -> list[np.ndarray]:
    """y, z, s in numpy with each weight replaced by the numpy dequantization of its BitMoD form."""
    w = quantize_weight(arrays["w"], bits).dequantize()
    wt = quantize_weight(arrays["wt"].T, bits).dequantize()
    return [x @ w + arrays["b"], x @ wt + arrays["c"], x @ xt]


@pytest.mark.parametrize("bits,k", [(4, 256), (4, 200), (3, 256), (3, 300)])
def test_onnxruntime_matches_the_numpy_dequantization(bits, k):
    rng = np.random.default_rng(bits * 1000 + k)
    model, arrays = layers(rng, k)
    result = BitModPass(wbits=bits)(model)
    assert result.modified
    x = rng.standard_normal((6, k)).astype(np.float32)
    xt = rng.standard_normal((k, 24)).astype(np.float32)
    for got, expected in zip(run(model, {"x": x, "xt": xt}), reference(arrays, x, xt, bits), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert ops(model).count("Gather") == 2 and "w" not in model.graph.initializers
    nodes = by_name(model)
    assert nodes["gemm"].attributes["transB"].as_int() == 0
    assert nodes["fc"].meta[DECISION_KEY].scheme.startswith(f"BitMoD W{bits} g128 (types: er+ ")
    assert nodes["fc"].meta[DECISION_KEY].output == "y"
    assert KEEP_FLOAT_KEY in nodes["gemm"].meta
    assert nodes["scores"].meta[DECISION_KEY].status == "float"


NO_BIAS = """
<ir_version: 8, opset_import: ["" : 17]>
no_bias (float[N, 200] x) => (float[N, 24] y, float[N, 24] z) {
  [fc] y = MatMul(x, w)
  [gemm] z = Gemm<transB: int = 1>(x, wt)
}
"""


@pytest.mark.parametrize("bits", [4, 3])
def test_an_identity_input_reads_back_the_dequantized_weight_exactly(bits):
    rng = np.random.default_rng(1)
    w, wt = weights(rng, 200, 24), weights(rng, 24, 200)
    model = build(NO_BIAS, {"w": w, "wt": wt})
    BitModPass(wbits=bits)(model)
    y, z = run(model, {"x": np.eye(200, dtype=np.float32)})
    np.testing.assert_array_equal(y, quantize_weight(w, bits).dequantize())
    np.testing.assert_array_equal(z, quantize_weight(wt.T, bits).dequantize())


@pytest.mark.parametrize("bits,bits_per_weight", [(4, 4.0), (3, 3.2)])
def test_codes_are_packed_into_uint32_words(bits, bits_per_weight):
    rng = np.random.default_rng(2)
    model, _ = layers(rng, 640)
    BitModPass(wbits=bits)(model)
    words = [v.const_value for name, v in model.graph.initializers.items() if name.endswith("_bitmod_words")]
    assert len(words) == 2 and all(tensor.numpy().dtype == np.uint32 for tensor in words)
    assert sum(tensor.nbytes for tensor in words) * 8 == 2 * 640 * 24 * bits_per_weight
    # Per group of 128 weights a float32 scale and a uint8 type offset; then two biases, two LUTs and a few shapes.
    per_group = 2 * (640 // 128) * 24 * (4 + 1)
    luts = 2 * 4 * 2**bits * 4
    assert initializer_bytes(model) <= sum(tensor.nbytes for tensor in words) + per_group + 2 * 24 * 4 + luts + 256


SHARED = """
<ir_version: 8, opset_import: ["" : 17]>
shared (float[N, 128] x, float[N, 128] x2) => (float[N, 16] y, float[N, 16] y2) {
  [first] y = MatMul(x, w)
  [second] y2 = MatMul(x2, w)
}
"""


def test_a_shared_weight_gets_one_dequantizer():
    rng = np.random.default_rng(3)
    w = weights(rng, 128, 16)
    model = build(SHARED, {"w": w})
    BitModPass()(model)
    assert ops(model).count("Gather") == 1
    nodes = by_name(model)
    assert nodes["first"].inputs[1] is nodes["second"].inputs[1]
    feed = {
        "x": rng.standard_normal((4, 128)).astype(np.float32),
        "x2": rng.standard_normal((4, 128)).astype(np.float32),
    }
    deq = quantize_weight(w, 4).dequantize()
    for got, x in zip(run(model, feed), (feed["x"], feed["x2"]), strict=True):
        np.testing.assert_allclose(got, x @ deq, rtol=1e-5, atol=1e-5)


TIED = """
<ir_version: 8, opset_import: ["" : 17]>
tied (float[N, 128] x) => (float[N, 128] y, float[N, 128] z, float[128, 128] w_out) {
  [plain] y = MatMul(x, w)
  [transposed] z = Gemm<transB: int = 1>(x, w)
  [peek] w_out = Identity(w)
}
"""


def test_a_weight_read_in_two_layouts_and_by_another_node():
    rng = np.random.default_rng(8)
    w = weights(rng, 128, 128)
    model = build(TIED, {"w": w})
    BitModPass()(model)
    assert ops(model).count("Gather") == 2  # one dequantizer per layout: groups run along K of each
    x = rng.standard_normal((4, 128)).astype(np.float32)
    y, z, w_out = run(model, {"x": x})
    np.testing.assert_allclose(y, x @ quantize_weight(w, 4).dequantize(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z, x @ quantize_weight(w.T, 4).dequantize(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(w_out, w)  # the float weight stays for its other reader


def test_nothing_to_rewrite_is_not_modified():
    assert not BitModPass()(relu_only()).modified
    model, _ = layers(np.random.default_rng(4), 128)
    BitModPass()(model)
    assert not BitModPass()(model).modified  # its own layers are no longer constant-weight layers


def test_annotated_and_keep_float_layers_are_left_alone():
    rng = np.random.default_rng(5)
    model, arrays = layers(rng, 128)
    nodes = by_name(model)
    nodes["fc"].meta[INPUT_SPECS_KEY] = {1: symmetric_spec(np.abs(arrays["w"]).max(axis=0), 8, axis=1)}
    nodes["gemm"].meta[KEEP_FLOAT_KEY] = "float path"
    assert not BitModPass()(model).modified
    np.testing.assert_array_equal(initializer(model, "w"), arrays["w"])
    assert nodes["gemm"].meta[DECISION_KEY].reason == "float path"
    assert DECISION_KEY not in nodes["fc"].meta


def test_quantize_pass_after_bitmod_leaves_its_layers_float():
    rng = np.random.default_rng(6)
    model, _ = layers(rng, 128)
    BitModPass()(model)
    QuantizePass(wbits=8, abits=None)(model)
    assert not any(INPUT_SPECS_KEY in node.meta for node in model.graph)


def test_options_are_checked():
    with pytest.raises(ValueError):
        BitModPass(wbits=5)
    with pytest.raises(ValueError):
        BitModPass(group_size=0)


MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 256] x) => (float[N, 64] y) {
  [fc1] h = MatMul(x, w1)
  [fc1_bias] hb = Add(h, b1)
  [act] r = Relu(hb)
  [fc2] y = Gemm<transB: int = 1>(r, w2, b2)
}
"""


@pytest.mark.parametrize("wbits", [None, 3])
def test_the_recipe_runs_through_optimize_and_reports_the_layers(wbits):
    rng = np.random.default_rng(7)
    arrays = {"w1": weights(rng, 256, 192, scale=0.1), "b1": weights(rng, 192), "w2": weights(rng, 64, 192, scale=0.1)}
    model = build(MLP, {**arrays, "b2": weights(rng, 64)})
    data = gaussian_feeds(seed=70, batches=2, rows=16, features=256)
    result = graphquant.optimize(model, "bitmod", calibration=data, wbits=wbits, show_progress=False)
    report = result.report
    bits = wbits or 4
    assert [layer.node for layer in report.quantized] == ["fc1", "fc2"]
    assert all(layer.scheme.startswith(f"BitMoD W{bits} g128") for layer in report.quantized)
    assert report.bytes_after < report.bytes_before / 5
    assert report.outputs["y"].cosine > (0.99 if bits == 4 else 0.97)
    assert set(report.layer_metrics) == {"fc1", "fc2"}
    hidden = np.maximum(data[0]["x"] @ quantize_weight(arrays["w1"], bits).dequantize() + arrays["b1"], 0)
    expected = hidden @ quantize_weight(arrays["w2"].T, bits).dequantize() + initializer(model, "b2")
    np.testing.assert_allclose(run(result.model, data[0])[0], expected, rtol=1e-4, atol=1e-4)


CONVS = """
<ir_version: 8, opset_import: ["" : 17]>
convs (float[N, 8, 6, 6] x) => (float[N, 6, 6, 6] a, float[N, 8, 6, 6] b, float[N, 4, 7, 7] c, float[N, 4, 12, 12] d) {
  [full] a = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, wa, ba)
  [depthwise] b = Conv<kernel_shape: ints = [5, 5], pads: ints = [2, 2, 2, 2], group: int = 8>(x, wb)
  [up] c = ConvTranspose<kernel_shape: ints = [2, 2]>(x, wc)
  [up_grouped] d = ConvTranspose<kernel_shape: ints = [2, 2], strides: ints = [2, 2], group: int = 2>(x, wd)
}
"""


@pytest.mark.parametrize("bits", [4, 3])
def test_conv_weights_are_flattened_per_output_kernel_and_rebuilt_in_their_layout(bits):
    from graphquant.analysis.layers import classify
    from graphquant.analysis.weight_fit import from_in_major, in_major

    rng = np.random.default_rng(9)
    shapes = {"wa": (6, 8, 3, 3), "wb": (8, 1, 5, 5), "wc": (8, 4, 2, 2), "wd": (8, 2, 2, 2)}
    arrays = {**{name: weights(rng, *shape) for name, shape in shapes.items()}, "ba": weights(rng, 6)}
    model = build(CONVS, arrays)
    expected = dict(arrays)
    for node in model.graph:
        layer = classify(node).layer
        matrix = quantize_weight(in_major(layer, np.float32), bits, group_size=32).dequantize()
        expected[node.inputs[1].name] = from_in_major(layer, matrix).astype(np.float32)
    assert BitModPass(wbits=bits, group_size=32)(model).modified
    x = {"x": rng.standard_normal((2, 8, 6, 6)).astype(np.float32)}
    for got, want in zip(run(model, x), run(build(CONVS, expected), x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not any(name in model.graph.initializers for name in shapes)
    decisions = [node.meta[DECISION_KEY] for node in model.graph if DECISION_KEY in node.meta]
    assert [d.status for d in decisions] == ["quantized"] * 4
    assert all("transB" not in node.attributes for node in model.graph if node.op_type.startswith("Conv"))
