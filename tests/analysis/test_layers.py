"""Layer classification (which MatMul/Gemm/Conv nodes are weight layers) and activation-sharing groups."""

from __future__ import annotations

import numpy as np

from builders import build, by_name, qkv, weights
from graphquant.analysis.layers import candidates, channel_scale_input, classify, scale_groups

LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
layers (float[2, 8] x, float[2, 3, 8] seq, float[8, 2] other, float[1, 3, 8, 8] img, float16[2, 8] xh)
    => (float[2, 4] mm, float[2, 6] gt, float[2, 6] gn, float[1, 5, 6, 6] cv, float[2, 2] aa,
        float[2, 3, 4] r3, float[6, 8] cl, float[6, 2] ta, float16[2, 4] hm, float[2, 8] rl) {
  [matmul] mm = MatMul(x, w_mm)
  [gemm_t] gt = Gemm<transB: int = 1>(x, w_gt, b_gt)
  [gemm_n] gn = Gemm(x, w_gn)
  [conv] cv = Conv(img, w_cv)
  [act_act] aa = MatMul(x, other)
  [rank3] r3 = MatMul(seq, w_r3)
  x_t = Transpose(x)
  [const_left] cl = MatMul(w_cl, x_t)
  [gemm_ta] ta = Gemm<transA: int = 1>(w_ta, other)
  [half] hm = MatMul(xh, w_h)
  [relu] rl = Relu(x)
}
"""


def layers_model():
    rng = np.random.default_rng(0)
    return build(
        LAYERS,
        {
            "w_mm": weights(rng, 8, 4),
            "w_gt": weights(rng, 6, 8),
            "b_gt": weights(rng, 6),
            "w_gn": weights(rng, 8, 6),
            "w_cv": weights(rng, 5, 3, 3, 3),
            "w_r3": weights(rng, 3, 8, 4),
            "w_cl": weights(rng, 6, 8),
            "w_ta": weights(rng, 8, 6),
            "w_h": weights(rng, 8, 4).astype(np.float16),
        },
    )


def test_matmul_with_constant_weight():
    model = layers_model()
    candidate = classify(by_name(model)["matmul"])
    layer = candidate.layer
    assert layer is not None and candidate.reason == ""
    assert (layer.activation_index, layer.weight_index, layer.out_axis, layer.in_axis) == (0, 1, 1, 0)
    assert layer.activation.name == "x" and layer.weight.name == "w_mm"
    np.testing.assert_array_equal(layer.weight_array, model.graph.initializers["w_mm"].const_value.numpy())


def test_gemm_out_axis_follows_trans_b():
    nodes = by_name(layers_model())
    transposed = classify(nodes["gemm_t"]).layer
    plain = classify(nodes["gemm_n"]).layer
    assert (transposed.out_axis, transposed.in_axis) == (0, 1)
    assert (plain.out_axis, plain.in_axis) == (1, 0)
    assert transposed.weight_array.shape == (6, 8)


def test_conv_weight_axes():
    layer = classify(by_name(layers_model())["conv"]).layer
    assert (layer.activation_index, layer.weight_index, layer.out_axis, layer.in_axis) == (0, 1, 0, 1)
    assert layer.activation.name == "img"


def test_refused_layers_carry_their_reason():
    nodes = by_name(layers_model())
    reasons = {name: classify(nodes[name]) for name in ("act_act", "rank3", "const_left", "gemm_ta", "half", "relu")}
    assert all(candidate.layer is None for candidate in reasons.values())
    assert reasons["act_act"].reason == "activation x activation MatMul (left float)"
    assert reasons["rank3"].reason == "weight of rank 3; only 2-D weights are quantized"
    assert reasons["const_left"].reason == "constant left operand"
    assert reasons["gemm_ta"].reason == "Gemm with transA"
    assert "float16" in reasons["half"].reason.lower() and "only float32" in reasons["half"].reason
    assert reasons["relu"].reason == "Relu is not a quantizable op"


def test_candidates_lists_only_matmul_gemm_conv_in_graph_order():
    found = [(c.node.name, c.layer is not None) for c in candidates(layers_model().graph)]
    assert found == [
        ("matmul", True),
        ("gemm_t", True),
        ("gemm_n", True),
        ("conv", True),
        ("act_act", False),
        ("rank3", False),
        ("const_left", False),
        ("gemm_ta", False),
        ("half", False),
    ]


def test_scale_groups_group_layers_sharing_one_input():
    model = qkv(np.random.default_rng(1))
    layers = [c.layer for c in candidates(model.graph) if c.layer is not None]
    (group,) = scale_groups(layers)
    assert group.activation.name == "x"
    assert [layer.node.name for layer in group.layers] == ["q_proj", "k_proj", "v_proj"]
    assert [node.name for node in group.other_consumers] == ["residual"]
    assert group.producer is None  # a graph input
    assert not group.is_graph_output


SEPARATE = """
<ir_version: 8, opset_import: ["" : 17]>
separate (float[N, 4] x) => (float[N, 4] y, float[N, 4] h) {
  [first] h = MatMul(x, w1)
  [second] g = MatMul(h, w2)
  [third] y = Gemm(h, w3)
}
"""


def test_scale_groups_keep_layer_order_and_see_graph_outputs():
    rng = np.random.default_rng(2)
    model = build(SEPARATE, {name: weights(rng, 4, 4) for name in ("w1", "w2", "w3")})
    layers = [c.layer for c in candidates(model.graph) if c.layer is not None]
    groups = scale_groups(layers)
    assert [[layer.node.name for layer in g.layers] for g in groups] == [["first"], ["second", "third"]]
    assert groups[1].activation.name == "h"
    assert groups[1].producer.name == "first"
    assert groups[1].is_graph_output
    assert groups[1].other_consumers == ()
    # Given a subset (e.g. after overrides), only those layers are grouped.
    assert [[layer.node.name for layer in g.layers] for g in scale_groups(layers[2:])] == [["third"]]


CHANNEL_SCALES = """
<ir_version: 10, opset_import: ["" : 23]>
scales (float[N, 8] x) => (float[N, 8] a, float[N, 8] b, float[2, 8] c, float[N, 8] d, float[N, 8] e, float[N, 8] f) {
  [weight_first] a = Mul(g, x)
  [weight_last] b = Mul(x, g3)
  [two_constants] c = Mul(g, g2)
  [per_row] d = Mul(x, rows)
  [rms] e = RMSNormalization<axis: int = -1>(x, g)
  [activations] f = Mul(x, x)
}
"""


def test_channel_scale_input_finds_the_per_channel_weight_of_rms_norms_and_muls():
    rng = np.random.default_rng(0)
    model = build(
        CHANNEL_SCALES,
        {
            "g": weights(rng, 8),
            "g3": weights(rng, 1, 1, 8),
            "g2": weights(rng, 2, 8),
            "rows": weights(rng, 2, 8),
        },
    )
    nodes = by_name(model)
    found = {name: channel_scale_input(node, 8) for name, node in nodes.items()}
    assert found == {
        "weight_first": 0,
        "weight_last": 1,
        "two_constants": None,
        "per_row": None,
        "rms": 1,
        "activations": None,
    }
    assert channel_scale_input(nodes["rms"], 16) is None  # the weight must match the activation's channels
