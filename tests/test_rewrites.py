"""The exact rewrite primitives (channel affines, weight rows, biases, float routing), checked in onnxruntime."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest
from builders import (
    LLAMA_LAYERS,
    assert_same_outputs,
    build,
    by_name,
    initializer,
    mlp,
    ops,
    outlier_layer_norm,
    run,
    token_feeds,
    weights,
)

from graphquant import graph_edit, rewrites
from graphquant.analysis.layers import ScaleGroup, classify, constant_array, migratable_groups
from graphquant.graph_edit import NameScope
from graphquant.rewrites import (
    AFFINE_BRANCH_KEY,
    add_to_layer_bias,
    apply_channel_affine,
    bias_add_of,
    layer_bias,
    route_channels_to_float,
    scale_weight_rows,
    weight_times,
)

F32 = np.float32


def value(model: ir.Model, name: str) -> ir.Value:
    for graph_input in model.graph.inputs:
        if graph_input.name == name:
            return graph_input
    return next(v for node in model.graph for v in node.outputs if v.name == name)


def layer(model: ir.Model, name: str):
    found = classify(by_name(model)[name]).layer
    assert found is not None
    return found


def affine(rng: np.random.Generator, channels: int = 16) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0.2, 3.0, channels).astype(F32), rng.uniform(-5.0, 5.0, channels).astype(F32)


def x_feed(rng: np.random.Generator, *shape: int) -> dict[str, np.ndarray]:
    return {"x": (rng.standard_normal(shape) * 2 + 1).astype(F32)}


# --- apply_channel_affine ---

LN_READERS = """
<ir_version: 8, opset_import: ["" : 17]>
ln_readers (float[N, 16] x) => (float[N, 16] y, float[N, 16] z) {
  [ln] h = LayerNormalization<axis: int = -1, epsilon: float = 0.001>(x, gamma, beta)
  [reader] y = Identity(h)
  [other] z = Neg(h)
}
"""


def ln_readers(rng: np.random.Generator, text: str = LN_READERS) -> ir.Model:
    gamma, beta = outlier_layer_norm(rng)
    return build(text, {"gamma": gamma, "beta": beta})


@pytest.mark.parametrize("exclusive", [True, False], ids=["exclusive", "shared"])
def test_affine_on_a_layer_norm_folds_into_gamma_and_beta(exclusive):
    rng = np.random.default_rng(0)
    model = ln_readers(rng)
    reference = model.clone()
    nodes = by_name(model)
    readers = [nodes["reader"], nodes["other"]] if exclusive else [nodes["reader"]]
    scale, offset = affine(rng)
    before = ops(model)
    names = NameScope(model.graph)
    new_value, how = apply_channel_affine(model.graph, names, value(model, "h"), readers, scale, offset)
    if exclusive:
        assert how == "folded into LayerNormalization"
        assert ops(model) == before and new_value is nodes["ln"].outputs[0]
    else:
        assert how == "folded into a copy of LayerNormalization"
        assert ops(model) == ["LayerNormalization", "LayerNormalization", "Identity", "Neg"]
        clone = new_value.producer()
        assert clone is not nodes["ln"] and clone.attributes["epsilon"].value == pytest.approx(0.001)
        assert nodes["other"].inputs[0] is nodes["ln"].outputs[0]
        assert nodes["reader"].inputs[0] is new_value
    feed = x_feed(rng, 32, 16)
    (y_ref, z_ref), (y, z) = run(reference, feed), run(model, feed)
    np.testing.assert_allclose(y, y_ref * scale + offset, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z, -(y_ref * scale + offset) if exclusive else z_ref, rtol=1e-4, atol=1e-4)


def test_affine_on_a_layer_norm_without_beta_creates_one():
    text = LN_READERS.replace("(x, gamma, beta)", "(x, gamma)")
    rng = np.random.default_rng(1)
    gamma, _ = outlier_layer_norm(rng)
    model = build(text, {"gamma": gamma})
    reference = model.clone()
    nodes = by_name(model)
    scale, offset = affine(rng)
    _, how = apply_channel_affine(
        model.graph, NameScope(model.graph), value(model, "h"), [nodes["reader"], nodes["other"]], scale, offset
    )
    assert how == "folded into LayerNormalization" and len(nodes["ln"].inputs) == 3
    feed = x_feed(rng, 8, 16)
    np.testing.assert_allclose(run(model, feed)[0], run(reference, feed)[0] * scale + offset, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "text",
    [
        LN_READERS.replace("axis: int = -1", "axis: int = 1"),  # same axis, but not spelled -1
        LN_READERS.replace("[ln] h = LayerNormalization", "[ln] h, mean = LayerNormalization").replace(
            "float[N, 16] z)", "float[N, 16] z, float[N, 1] mean)"
        ),  # its mean output is used
    ],
    ids=["positive-axis", "mean-output-used"],
)
def test_affine_on_an_unfoldable_layer_norm_uses_a_mul_add_branch(text):
    rng = np.random.default_rng(2)
    model = ln_readers(rng, text)
    reference = model.clone()
    nodes = by_name(model)
    scale, offset = affine(rng)
    new_value, how = apply_channel_affine(
        model.graph, NameScope(model.graph), value(model, "h"), [nodes["reader"]], scale, offset
    )
    assert how == "Mul/Add on the quantized branch"
    branch = [node for node in model.graph if AFFINE_BRANCH_KEY in node.meta]
    assert [node.op_type for node in branch] == ["Mul", "Add"] and new_value is branch[1].outputs[0]
    np.testing.assert_array_equal(initializer(model, "gamma"), nodes["ln"].inputs[1].const_value.numpy())
    feed = x_feed(rng, 8, 16)
    got, expected = run(model, feed), run(reference, feed)
    np.testing.assert_allclose(got[0], expected[0] * scale + offset, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6)


INPUT_READERS = """
<ir_version: 8, opset_import: ["" : 17]>
input_readers (float[N, 16] x) => (float[N, 16] y, float[N, 16] z) {
  [reader] y = Identity(x)
  [other] z = Neg(x)
}
"""


def test_identity_affine_changes_nothing():
    model = build(INPUT_READERS)
    x = value(model, "x")
    result = apply_channel_affine(
        model.graph, NameScope(model.graph), x, [by_name(model)["reader"]], np.ones(16, F32), np.zeros(16, F32)
    )
    assert result == (x, "identity") and ops(model) == ["Identity", "Neg"]


def test_pure_scale_and_pure_offset_insert_one_node_each():
    rng = np.random.default_rng(3)
    for scale, offset, expected in (
        (affine(rng)[0], np.zeros(16, F32), ["Mul"]),
        (np.ones(16, F32), affine(rng)[1], ["Add"]),
    ):
        model = build(INPUT_READERS)
        reference = model.clone()
        reader = by_name(model)["reader"]
        apply_channel_affine(model.graph, NameScope(model.graph), value(model, "x"), [reader], scale, offset)
        assert [node.op_type for node in model.graph if AFFINE_BRANCH_KEY in node.meta] == expected
        feed = x_feed(rng, 4, 16)
        got, want = run(model, feed), run(reference, feed)
        np.testing.assert_allclose(got[0], want[0] * scale + offset, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[1], want[1])


def test_a_second_affine_on_an_exclusive_branch_composes_into_it():
    rng = np.random.default_rng(4)
    model = build(INPUT_READERS)
    reference = model.clone()
    names = NameScope(model.graph)
    reader = by_name(model)["reader"]
    first_scale, first_offset = affine(rng)
    second_scale, second_offset = affine(rng)
    branch_out, _ = apply_channel_affine(model.graph, names, value(model, "x"), [reader], first_scale, first_offset)
    final, how = apply_channel_affine(model.graph, names, branch_out, [reader], second_scale, second_offset)
    assert how == "Mul/Add on the quantized branch"
    branch = [node for node in model.graph if AFFINE_BRANCH_KEY in node.meta]
    assert [node.op_type for node in branch] == ["Mul", "Add"]  # composed, not stacked
    assert branch[0].inputs[0].name == "x" and reader.inputs[0] is final
    np.testing.assert_allclose(branch[0].inputs[1].const_value.numpy(), first_scale * second_scale, rtol=1e-6)
    feed = x_feed(rng, 4, 16)
    got, want = run(model, feed), run(reference, feed)
    expected = (want[0] * first_scale + first_offset) * second_scale + second_offset
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[1], want[1])


def test_affine_on_a_graph_output_leaves_the_output_alone():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    output_reader (float[N, 16] x) => (float[N, 16] a, float[N, 16] y) {
      [relu] a = Relu(x)
      [reader] y = Identity(a)
    }
    """
    rng = np.random.default_rng(5)
    model = build(text)
    reference = model.clone()
    scale, offset = affine(rng)
    _, how = apply_channel_affine(
        model.graph, NameScope(model.graph), value(model, "a"), [by_name(model)["reader"]], scale, offset
    )
    assert how == "Mul/Add on the quantized branch"
    feed = x_feed(rng, 4, 16)
    got, want = run(model, feed), run(reference, feed)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1] * scale + offset, rtol=1e-5, atol=1e-5)


# --- biases ---

LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
layers (float[N, 16] x) => (float[N, 8] plain, float[N, 8] biased, float[N, 8] flipped, float[N, 8] gemm_c,
                            float[N, 8] gemm_no_c, float[N, 8] scaled) {
  [plain_mm] plain = MatMul(x, w1)
  [biased_mm] biased_raw = MatMul(x, w2)
  [biased_add] biased = Add(biased_raw, b2)
  [flipped_mm] flipped_raw = MatMul(x, w3)
  [flipped_add] flipped = Add(b3, flipped_raw)
  [gemm_c] gemm_c = Gemm<transB: int = 1>(x, w4, c4)
  [gemm_no_c] gemm_no_c = Gemm<transB: int = 1>(x, w5)
  [scaled] scaled = Gemm<beta: float = 0.5>(x, w6, c6)
}
"""


def layers_model(rng: np.random.Generator) -> ir.Model:
    return build(
        LAYERS,
        {
            "w1": weights(rng, 16, 8),
            "w2": weights(rng, 16, 8),
            "b2": weights(rng, 8),
            "w3": weights(rng, 16, 8),
            "b3": weights(rng, 1, 8),  # a [1, 8] bias as the Add's first input
            "w4": weights(rng, 8, 16),
            "c4": weights(rng, 8),
            "w5": weights(rng, 8, 16),
            "w6": weights(rng, 16, 8),
            "c6": weights(rng, 8),
        },
    )


def test_bias_add_of_and_layer_bias():
    model = layers_model(np.random.default_rng(6))
    nodes = by_name(model)
    assert bias_add_of(nodes["plain_mm"]) is None
    assert bias_add_of(nodes["biased_mm"]) == (nodes["biased_add"], 1)
    assert bias_add_of(nodes["flipped_mm"]) == (nodes["flipped_add"], 0)
    np.testing.assert_array_equal(layer_bias(layer(model, "plain_mm")), np.zeros(8))
    np.testing.assert_allclose(layer_bias(layer(model, "biased_mm")), initializer(model, "b2"))
    np.testing.assert_allclose(layer_bias(layer(model, "flipped_mm")), initializer(model, "b3")[0])
    np.testing.assert_allclose(layer_bias(layer(model, "gemm_c")), initializer(model, "c4"))
    np.testing.assert_array_equal(layer_bias(layer(model, "gemm_no_c")), np.zeros(8))


def test_bias_add_of_refuses_non_bias_adds():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    not_bias (float[N, 16] x, float[N, 8] r) => (float[N, 8] a, float[N, 8] b, float[N, 8] c, float[N, 8] c_raw) {
      [residual_mm] a_raw = MatMul(x, w1)
      [residual] a = Add(a_raw, r)
      [two_readers_mm] b_raw = MatMul(x, w2)
      [two_readers_add] b = Add(b_raw, bias)
      [two_readers_neg] b_neg = Neg(b_raw)
      [output_mm] c_raw = MatMul(x, w3)
      [output_add] c = Add(c_raw, bias)
    }
    """
    rng = np.random.default_rng(7)
    model = build(
        text, {"w1": weights(rng, 16, 8), "w2": weights(rng, 16, 8), "w3": weights(rng, 16, 8), "bias": weights(rng, 8)}
    )
    nodes = by_name(model)
    for name in ("residual_mm", "two_readers_mm", "output_mm"):
        assert bias_add_of(nodes[name]) is None, name


def test_add_to_layer_bias_on_every_kind_of_layer():
    rng = np.random.default_rng(8)
    model = layers_model(rng)
    reference = model.clone()
    names = NameScope(model.graph)
    deltas = {name: weights(rng, 8) for name in ("plain_mm", "biased_mm", "flipped_mm", "gemm_c", "gemm_no_c")}
    for name, delta in deltas.items():
        assert add_to_layer_bias(model.graph, names, layer(model, name), delta)
    assert not add_to_layer_bias(model.graph, names, layer(model, "scaled"), weights(rng, 8))  # beta != 1
    # plain_mm gained an Add that took over the output name; the Adds that were there were reused
    assert ops(model).count("Add") == 3
    assert model.graph.outputs[0].name == "plain" and model.graph.outputs[0].producer().op_type == "Add"
    assert initializer(model, "b3").shape == (1, 8)
    assert by_name(model)["flipped_add"].inputs[0].const_value.numpy().shape == (1, 8)
    assert len(by_name(model)["gemm_no_c"].inputs) == 3
    feed = x_feed(rng, 8, 16)
    got, want = run(model, feed), run(reference, feed)
    for index, name in enumerate(("plain_mm", "biased_mm", "flipped_mm", "gemm_c", "gemm_no_c")):
        np.testing.assert_allclose(got[index], want[index] + deltas[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[5], want[5])


def test_weight_times_contracts_the_input_axis():
    rng = np.random.default_rng(9)
    model = layers_model(rng)
    vector = weights(rng, 16)
    w1, w4 = initializer(model, "w1"), initializer(model, "w4")
    np.testing.assert_allclose(weight_times(layer(model, "plain_mm"), vector), vector @ w1, rtol=1e-5)
    np.testing.assert_allclose(weight_times(layer(model, "gemm_c"), vector), w4 @ vector, rtol=1e-5)  # transB


def test_weight_times_a_few_rows_at_a_time_and_without_a_float64_copy(monkeypatch):
    rng = np.random.default_rng(10)
    model = layers_model(rng)
    vector = weights(rng, 16)
    whole = [weight_times(layer(model, name), vector) for name in ("plain_mm", "gemm_c")]
    monkeypatch.setattr(rewrites, "WEIGHT_CHUNK_ELEMENTS", 20)  # 2 or 3 input rows per chunk
    for name, want in zip(("plain_mm", "gemm_c"), whole):
        np.testing.assert_allclose(weight_times(layer(model, name), vector), want, rtol=1e-12)
    monkeypatch.undo()
    big = rng.standard_normal((4096, 2048)).astype(np.float32)
    model.graph.initializers["w1"].const_value = ir.Tensor(big, name="w1")
    vector = rng.standard_normal(4096).astype(np.float32)
    tracemalloc.start()
    try:
        got = weight_times(classify(by_name(model)["plain_mm"]).layer, vector)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(got, vector.astype(np.float64) @ big.astype(np.float64), rtol=1e-10, atol=1e-9)
    assert peak < big.nbytes  # one float64 copy alone would be twice the weight


# --- weight rows ---


def test_scale_weight_rows_with_the_inverse_activation_scale_is_exact():
    rng = np.random.default_rng(10)
    model = layers_model(rng)
    reference = model.clone()
    names = NameScope(model.graph)
    factors = rng.uniform(0.1, 10.0, 16).astype(F32)
    x = value(model, "x")
    readers = [node for node in model.graph if node.op_type in ("MatMul", "Gemm")]
    for node in readers:
        scale_weight_rows(model.graph, names, classify(node).layer, factors)
    apply_channel_affine(model.graph, names, x, readers, 1 / factors, np.zeros(16, F32))
    for name in ("w1", "w4", "w6"):
        assert name not in model.graph.initializers  # replaced weights are dropped
    gemm_weight = by_name(model)["gemm_c"].inputs[1].const_value.numpy()
    w4 = initializer(reference, "w4")
    np.testing.assert_allclose(gemm_weight, w4 * factors[None, :], rtol=1e-6)  # transB: columns
    assert_same_outputs(reference, model, [x_feed(rng, 8, 16)])


def test_scale_weight_rows_makes_one_new_weight_and_no_second_copy():
    rng = np.random.default_rng(12)
    model = layers_model(rng)
    big = rng.standard_normal((4096, 2048)).astype(np.float32)
    model.graph.initializers["w1"].const_value = ir.Tensor(big, name="w1")
    factors = rng.uniform(0.5, 2.0, 4096).astype(F32)
    tracemalloc.start()
    try:
        scale_weight_rows(model.graph, NameScope(model.graph), classify(by_name(model)["plain_mm"]).layer, factors)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(by_name(model)["plain_mm"].inputs[1].const_value.numpy(), big * factors[:, None])
    assert peak < 1.5 * big.nbytes  # W' itself, not W' and a copy of it


def test_a_mapped_weight_is_scaled_slice_by_slice_to_the_same_bits_its_pages_dropped_as_read(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    ir.save(mlp(np.random.default_rng(14)), path, external_data="model.onnx.data", size_threshold_bytes=0)
    model = ir.load(path)
    originals = {name: np.array(initializer(model, name)) for name in ("w1", "w2")}
    factors = np.random.default_rng(15).uniform(0.5, 2.0, 16).astype(F32)
    monkeypatch.setattr(graph_edit, "SLICE_ELEMENTS", 24)  # 3 rows of w1 (16 x 8) or of w2 (4 x 8)
    dropped = []
    release = graph_edit.release_pages
    monkeypatch.setattr(graph_edit, "release_pages", lambda t, a, b: dropped.append(t.name) or release(t, a, b))
    names = NameScope(model.graph)
    for node in [node for node in model.graph if node.op_type in ("MatMul", "Gemm")]:
        scale_weight_rows(model.graph, names, classify(node).layer, factors[: 16 if node.op_type == "MatMul" else 8])
    scaled = [node.inputs[1].const_value.numpy() for node in model.graph if node.op_type in ("MatMul", "Gemm")]
    np.testing.assert_array_equal(scaled[0], originals["w1"] * factors[:, None])  # rows: the leading axis
    np.testing.assert_array_equal(scaled[1], originals["w2"] * factors[None, :8])  # transB: across each slice
    assert dropped == ["w1"] * 6 + ["w2"] * 2  # 16 rows in slices of 3, then 4 rows


def test_scale_weight_rows_keeps_a_tied_weight_for_its_other_reader():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    tied (float[N, 16] x, float[N, 16] u) => (float[N, 8] y, float[N, 8] z) {
      [left] y = MatMul(x, w)
      [right] z = MatMul(u, w)
    }
    """
    rng = np.random.default_rng(11)
    w = weights(rng, 16, 8)
    model = build(text, {"w": w})
    factors = rng.uniform(0.5, 2.0, 16).astype(F32)
    scale_weight_rows(model.graph, NameScope(model.graph), layer(model, "left"), factors)
    np.testing.assert_array_equal(initializer(model, "w"), w)
    assert by_name(model)["right"].inputs[1].name == "w"
    np.testing.assert_allclose(by_name(model)["left"].inputs[1].const_value.numpy(), w * factors[:, None], rtol=1e-6)


# --- float routing ---

ROUTED = """
<ir_version: 8, opset_import: ["" : 17]>
routed (float[B, S, 16] x) => (float[B, S, 8] y, float[B, S, 8] z, float[B, S, 8] g) {
  [ln] h = LayerNormalization<axis: int = -1>(x, gamma, beta)
  [plain] y = MatMul(h, w1)
  [biased_mm] z_raw = MatMul(h, w2)
  [biased_add] z = Add(z_raw, b2)
  [unbiased_mm] g_raw = MatMul(h, w3)
  [after] g = Identity(g_raw)
}
"""


def test_route_channels_to_float_is_exact_with_the_channels_zeroed_on_the_int_path():
    rng = np.random.default_rng(12)
    gamma, beta = outlier_layer_norm(rng)
    model = build(
        ROUTED,
        {
            "gamma": gamma,
            "beta": beta,
            "w1": weights(rng, 16, 8),
            "w2": weights(rng, 16, 8),
            "b2": weights(rng, 8),
            "w3": weights(rng, 16, 8),
        },
    )
    reference = model.clone()
    names = NameScope(model.graph)
    layers = [layer(model, name) for name in ("plain", "biased_mm", "unbiased_mm")]
    channels = np.array([3, 11])
    route_channels_to_float(model.graph, names, value(model, "h"), layers, channels)
    scale = np.ones(16, F32)
    scale[channels] = 0.0
    apply_channel_affine(
        model.graph, names, value(model, "h"), [item.node for item in layers], scale, np.zeros(16, F32)
    )
    assert ops(model).count("Gather") == 1 and ops(model).count("MatMul") == 6
    assert [v.name for v in model.graph.outputs] == ["y", "z", "g"]
    assert model.graph.outputs[1].producer().inputs[0].producer() is by_name(model)["biased_add"]  # after the bias
    for item in layers:
        np.testing.assert_array_equal(item.node.inputs[1].const_value.numpy()[channels], 0.0)
    assert_same_outputs(reference, model, [x_feed(rng, 2, 5, 16)])


def test_route_channels_to_float_on_a_gemm_with_trans_b():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    routed_gemm (float[N, 16] x) => (float[N, 8] y) {
      [gemm] y = Gemm<transB: int = 1>(x, w, c)
    }
    """
    rng = np.random.default_rng(13)
    model = build(text, {"w": weights(rng, 8, 16), "c": weights(rng, 8)})
    reference = model.clone()
    names = NameScope(model.graph)
    gemm = layer(model, "gemm")
    channels = np.array([0, 5, 9])
    route_channels_to_float(model.graph, names, value(model, "x"), [gemm], channels)
    scale = np.ones(16, F32)
    scale[channels] = 0.0
    apply_channel_affine(model.graph, names, value(model, "x"), [gemm.node], scale, np.zeros(16, F32))
    np.testing.assert_array_equal(gemm.node.inputs[1].const_value.numpy()[:, channels], 0.0)  # transB: columns
    (float_matmul,) = [node for node in model.graph if node.op_type == "MatMul"]
    rows = initializer(reference, "w")[:, channels].T
    np.testing.assert_array_equal(float_matmul.inputs[1].const_value.numpy(), rows)
    assert_same_outputs(reference, model, [x_feed(rng, 8, 16)])


RELU_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
relu_chain (float[N, 16] x) => (float[N, 4] y) {
  [fc1] h = MatMul(x, w1)
  [bias1] hb = Add(h, b1)
  [relu] r = Relu(hb)
  [fc2] y = MatMul(r, w2)
}
"""


def test_a_positive_scale_folds_through_relu_into_the_producing_layer():
    rng = np.random.default_rng(5)
    w1, b1, w2 = weights(rng, 16, 8), weights(rng, 8), weights(rng, 8, 4)
    model = build(RELU_CHAIN, {"w1": w1, "b1": b1, "w2": w2})
    scale = rng.uniform(0.1, 4.0, 8).astype(F32)
    relu_out = value(model, "r")
    new_value, how = apply_channel_affine(
        model.graph, NameScope(model.graph), relu_out, [by_name(model)["fc2"]], scale, np.zeros(8, F32)
    )
    assert how == "folded through Relu into the producing layer"
    assert new_value is relu_out
    assert not any(AFFINE_BRANCH_KEY in node.meta for node in model.graph)
    np.testing.assert_allclose(layer(model, "fc1").weight_array, w1 * scale, rtol=1e-6)
    feed = x_feed(rng, 4, 16)
    # fc2 now reads Relu(x·W1·diag(s) + b1·s) = Relu(x·W1 + b1)·s.
    expected = (np.maximum(feed["x"] @ w1 + b1, 0) * scale) @ w2
    np.testing.assert_allclose(run(model, feed)[0], expected, rtol=1e-4, atol=1e-4)


def test_relu_fold_is_refused_for_a_negative_scale_or_an_offset():
    rng = np.random.default_rng(6)
    for scale, offset in ((-np.ones(8, F32), np.zeros(8, F32)), (np.ones(8, F32) * 2, np.ones(8, F32))):
        model = build(RELU_CHAIN, {"w1": weights(rng, 16, 8), "b1": weights(rng, 8), "w2": weights(rng, 8, 4)})
        _, how = apply_channel_affine(
            model.graph, NameScope(model.graph), value(model, "r"), [by_name(model)["fc2"]], scale, offset
        )
        assert how == "Mul/Add on the quantized branch"


# --- Llama structure: RMSNorm weights and SwiGLU products absorb per-channel scales ---

RMS_NORM = "folded into the per-channel Mul weight (RMSNorm)"
GATED = "folded into the output columns of the layer making one factor of the product"


def migrate(model: ir.Model, group: ScaleGroup, rng: np.random.Generator, offset: bool = False) -> str:
    """Readers see (x + o)*s, layers take b <- b - o·W and W <- diag(1/s)·W: exact as a whole; returns how."""
    graph = model.graph
    names = NameScope(graph)
    channels = group.layers[0].weight_array.shape[group.layers[0].in_axis]
    scale = rng.uniform(0.25, 4.0, channels).astype(F32)
    shift = rng.uniform(-1.0, 1.0, channels).astype(F32) if offset else np.zeros(channels, F32)
    for member in group.layers:
        if offset:
            add_to_layer_bias(graph, names, member, -weight_times(member, shift).astype(F32))
        scale_weight_rows(graph, names, member, 1 / scale)
    readers = [member.node for member in group.layers]
    return apply_channel_affine(graph, names, group.activation, readers, scale, shift * scale)[1]


def is_product(node: ir.Node | None) -> bool:
    """A Mul of two activations (SwiGLU's SiLU(gate) * up)."""
    return node is not None and node.op_type == "Mul" and all(constant_array(v) is None for v in node.inputs)


def lm_head_is_a_layer(model: ir.Model) -> bool:
    """The legacy exporter reads the tied embedding as a constant lm_head weight; dynamo transposes it at run time."""
    last_matmul = [node for node in model.graph if node.op_type == "MatMul"][-1]
    return classify(last_matmul).layer is not None


def test_rms_norm_weights_absorb_the_scales_of_q_k_v_gate_up_and_lm_head(tiny_llama):
    rng = np.random.default_rng(0)
    model = ir.load(tiny_llama)
    reference = model.clone()
    before = ops(model)
    hows = [migrate(model, group, rng) for group in reversed(migratable_groups(model.graph)) if len(group.layers) > 1]
    assert hows == [RMS_NORM] * (2 * LLAMA_LAYERS)  # gate/up and q/k/v of each layer
    if lm_head_is_a_layer(reference):
        (last,) = [group for group in migratable_groups(model.graph) if group.layers[0].node.op_type == "MatMul"][-1:]
        assert migrate(model, last, rng) == RMS_NORM
    assert ops(model) == before  # no Mul at run time: every scale lives in an RMSNorm weight
    assert_same_outputs(reference, model, token_feeds(1))


def test_a_shift_on_an_rms_norm_output_stays_an_add_while_its_scale_folds(tiny_llama):
    rng = np.random.default_rng(1)
    model = ir.load(tiny_llama)
    reference = model.clone()
    before = ops(model)
    (qkv, *_) = [group for group in migratable_groups(model.graph) if len(group.layers) == 3]
    assert migrate(model, qkv, rng, offset=True) == f"{RMS_NORM}, shift as an Add on the quantized branch"
    # One Add for the shift and one bias Add per projection (an RMSNorm has no bias to take the shift).
    assert sorted(ops(model)) == sorted(before + ["Add"] * 4)
    assert_same_outputs(reference, model, token_feeds(2))


def test_down_proj_scale_folds_into_up_proj_output_columns(tiny_llama):
    rng = np.random.default_rng(2)
    model = ir.load(tiny_llama)
    reference = model.clone()
    before = ops(model)
    downs = [group for group in migratable_groups(model.graph) if is_product(group.producer)]
    assert len(downs) == LLAMA_LAYERS
    assert [migrate(model, group, rng) for group in reversed(downs)] == [GATED] * LLAMA_LAYERS
    assert ops(model) == before
    assert_same_outputs(reference, model, token_feeds(3))


def test_a_product_whose_factor_another_node_reads_keeps_a_mul_branch():
    rng = np.random.default_rng(3)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    glu (float[N, 16] x) => (float[N, 8] y, float[N, 16] u) {
      [gate] g = MatMul(x, wg)
      [up] u = MatMul(x, wu)
      [silu] a = Sigmoid(g)
      [product] h = Mul(a, u)
      [down] y = MatMul(h, wd)
    }
    """
    model = build(text, {"wg": weights(rng, 16, 16), "wu": weights(rng, 16, 16), "wd": weights(rng, 16, 8)})
    reference = model.clone()
    (group,) = [g for g in migratable_groups(model.graph) if g.layers[0].node.name == "down"]
    assert migrate(model, group, rng) == "Mul/Add on the quantized branch"  # u is a graph output: it keeps its values
    assert_same_outputs(reference, model, [x_feed(rng, 8, 16)])


RMS_NORMALIZATION = """
<ir_version: 10, opset_import: ["" : 23]>
rms (float[N, 16] x) => (float[N, 8] y, float[N, 16] n) {
  [norm] n = RMSNormalization<axis: int = -1>(x, gamma)
  [fc] y = MatMul(n, w)
}
"""


@pytest.mark.parametrize("exclusive", [True, False], ids=["exclusive", "shared"])
def test_a_fused_rms_normalization_absorbs_the_scale_into_its_scale_input(exclusive):
    rng = np.random.default_rng(4)
    text = RMS_NORMALIZATION if not exclusive else RMS_NORMALIZATION.replace(", float[N, 16] n)", ")")
    model = build(text, {"gamma": rng.uniform(0.5, 2, 16).astype(F32), "w": weights(rng, 16, 8)})
    reference = model.clone()
    (group,) = migratable_groups(model.graph)
    how = migrate(model, group, rng)
    assert how == ("folded into the RMSNorm scale" if exclusive else "folded into a copy of the RMSNorm scale")
    assert ops(model) == (["RMSNormalization", "MatMul"] if exclusive else ["RMSNormalization"] * 2 + ["MatMul"])
    assert_same_outputs(reference, model, [x_feed(rng, 8, 16)])


def test_run_time_row_scales_are_exact_on_every_llama_group_and_keep_biases_after_them(tiny_llama):
    model = ir.load(tiny_llama)
    reference = model.clone()
    names = NameScope(model.graph)
    groups = migratable_groups(model.graph)
    for group in reversed(groups):
        for layer in group.layers:
            columns = layer.weight_array.shape[layer.out_axis]
            assert add_to_layer_bias(model.graph, names, layer, np.linspace(-1, 1, columns, dtype=F32))
    expected = run(model.clone(), token_feeds(4)[0])
    for group in reversed(migratable_groups(model.graph)):
        rewrites.scale_rows_at_run_time(model.graph, names, group.activation, group.layers, 127)
    muls = [node for node in model.graph if rewrites.ROW_SCALE_KEY in node.meta]
    assert len(muls) == sum(len(group.layers) for group in groups)
    for mul in muls:  # the bias Add reads the rescaled output, and layer_output steps over the Mul to the sum
        (reader,) = mul.outputs[0].consumers()
        assert reader.op_type == "Add" and rewrites.layer_output(mul.inputs[0].producer()) is reader.outputs[0]
    for got, want in zip(run(model, token_feeds(4)[0]), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(run(reference, token_feeds(4)[0])[0], expected[0])  # the biases did change the logits


def test_an_all_zero_row_stays_zero_under_run_time_row_scales():
    model = build(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 8] x) => (float[N, 4] y) {
          [fc] y = MatMul(x, w)
        }
        """,
        {"w": weights(np.random.default_rng(5), 8, 4)},
    )
    (group,) = migratable_groups(model.graph)
    rewrites.scale_rows_at_run_time(model.graph, NameScope(model.graph), group.activation, group.layers, 127)
    x = np.random.default_rng(6).standard_normal((3, 8)).astype(F32)
    x[1] = 0
    (y,) = run(model, {"x": x})
    np.testing.assert_allclose(y, x @ initializer(model, "w"), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(y)) and not np.any(y[1])
