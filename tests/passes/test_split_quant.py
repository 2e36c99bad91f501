"""SplitQuantPass: k-means (k = 3) weight splitting, exact in fp32, each part quantized with its own scale."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import (
    assert_same_outputs,
    build,
    gaussian_feeds,
    input_layer,
    mlp,
    named_mlp,
    ops,
    qkv,
    relu_only,
    weights,
)

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.cost import split_costs
from graphquant.passes import QuantizePass, SplitQuantPass
from graphquant.passes.split_quant import SPLIT_PART_KEY, cluster_masks, kmeans3_boundaries
from graphquant.quant_spec import INPUT_SPECS_KEY

CONV = """
<ir_version: 8, opset_import: ["" : 17]>
conv (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
  [conv] y = Conv<pads: ints = [1, 1, 1, 1]>(x, w, b)
}
"""

GEMM_TRANS_B = """
<ir_version: 8, opset_import: ["" : 17]>
gemm (float[N, 16] x) => (float[N, 8] y) {
  [fc] y = Gemm<transB: int = 1, alpha: float = 0.5>(x, w, c)
}
"""


def conv(rng: np.random.Generator) -> ir.Model:
    """One 3x3 Conv with a bias, 3 -> 4 channels."""
    return build(CONV, {"w": weights(rng, 4, 3, 3, 3), "b": weights(rng, 4)})


def gemm_trans_b(rng: np.random.Generator) -> ir.Model:
    """One Gemm(transB, alpha 0.5) with a 1-D C."""
    return build(GEMM_TRANS_B, {"w": weights(rng, 8, 16), "c": weights(rng, 8)})


def conv_feeds(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(2)]


HELD_OUT = gaussian_feeds(seed=401, batches=2)
EVERYTHING = 10.0  # a MAC budget that splits every layer


@pytest.mark.parametrize(
    ("build_model", "data", "layers"),
    [
        (input_layer, HELD_OUT, 1),
        (gemm_trans_b, HELD_OUT, 1),
        (mlp, HELD_OUT, 2),
        (qkv, gaussian_feeds(seed=402, batches=2, features=8), 3),
        (conv, conv_feeds(403), 1),
    ],
    ids=["matmul", "gemm-transB", "matmul-add-and-gemm", "shared-input", "conv"],
)
def test_split_is_exact_and_makes_three_parts_per_layer(build_model, data, layers):
    model = build_model(np.random.default_rng(0))
    reference = model.clone()
    assert SplitQuantPass(max_overhead=EVERYTHING)(model).modified
    parts = [node for node in model.graph if SPLIT_PART_KEY in node.meta]
    assert len(parts) == 3 * layers
    assert ops(model).count("Sum") == layers
    assert_same_outputs(reference, model, data)
    assert [cost.added_macs for cost in split_costs(model)] == [2 * cost.layer_macs for cost in split_costs(model)]


def test_parts_are_the_masked_clusters_and_sum_to_the_weight():
    model = input_layer(np.random.default_rng(1))
    weight = model.graph.initializers["w"].const_value.numpy()
    SplitQuantPass(max_overhead=EVERYTHING)(model)
    parts = {
        node.meta[SPLIT_PART_KEY]: node.inputs[1].const_value.numpy()
        for node in model.graph
        if node.op_type == "MatMul"
    }
    np.testing.assert_array_equal(parts["lower"] + parts["middle"] + parts["upper"], weight)
    low, high = kmeans3_boundaries(weight)
    assert parts["lower"][parts["lower"] != 0].max() <= low < parts["middle"].min()
    assert parts["middle"].max() < high <= parts["upper"][parts["upper"] != 0].min()
    assert "w" not in model.graph.initializers  # the unsplit weight is dropped


def test_kmeans_is_order_independent_and_finds_planted_clusters():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(-10, 0.1, 50), rng.normal(0, 0.1, 200), rng.normal(10, 0.1, 50)])
    low, high = kmeans3_boundaries(values)
    assert -6 < low < -4 and 4 < high < 6
    assert kmeans3_boundaries(rng.permutation(values)) == (low, high)
    masks = cluster_masks(values, low, high)
    assert [int(mask.sum()) for mask in masks] == [50, 200, 50]


def test_bias_is_split_by_the_same_boundaries_even_when_it_is_zero():
    rng = np.random.default_rng(3)
    model = mlp(rng)
    model.graph.initializers["b1"].const_value = ir.tensor(np.zeros(8, np.float32), name="b1")
    reference = model.clone()
    SplitQuantPass(max_overhead=EVERYTHING)(model)
    assert len([node for node in model.graph if SPLIT_PART_KEY in node.meta]) == 6  # the zero-bias layer is split too
    gemm_biases = [node.inputs[2] for node in model.graph if node.op_type == "Gemm" and len(node.inputs) > 2]
    original = reference.graph.initializers["b2"].const_value.numpy()
    np.testing.assert_allclose(sum(value.const_value.numpy() for value in gemm_biases), original)
    assert_same_outputs(reference, model, HELD_OUT)


def test_each_part_gets_its_own_weight_scale_and_they_share_the_activation_spec():
    model = input_layer(np.random.default_rng(4))
    calibration = gaussian_feeds(seed=404)
    SplitQuantPass(max_overhead=EVERYTHING)(model)
    QuantizePass(Calibrator.for_model(model, calibration, show_progress=False), wbits=4, abits=8)(model)
    parts = [node for node in model.graph if SPLIT_PART_KEY in node.meta]
    weight_scales = [node.meta[INPUT_SPECS_KEY][1].scale for node in parts]
    activation_specs = {node.meta[INPUT_SPECS_KEY][0].key for node in parts}
    assert len(activation_specs) == 1
    middle = next(n for n in parts if n.meta[SPLIT_PART_KEY] == "middle").meta[INPUT_SPECS_KEY][1].scale
    upper = next(n for n in parts if n.meta[SPLIT_PART_KEY] == "upper").meta[INPUT_SPECS_KEY][1].scale
    assert np.all(middle < upper)  # the middle cluster's narrow range gets a finer grid
    assert len({scale.tobytes() for scale in weight_scales}) == 3


def test_splitquant_recipe_beats_plain_rtn_at_three_bits():
    model = mlp(np.random.default_rng(5))
    calibration = gaussian_feeds(seed=405)
    errors = {}
    for passes in (["quantize"], ["split-quant", "quantize"]):
        recipe = graphquant.Recipe.named("splitquant").with_passes(passes).with_options(wbits=3)
        result = graphquant.optimize(model, recipe, calibration=calibration, validation=HELD_OUT, show_progress=False)
        errors[len(passes)] = min(c.sqnr_db for c in result.report.outputs.values())
    assert errors[2] >= errors[1] + 3


def test_activation_chunks_are_exact_and_each_chunk_has_its_own_activation_scale():
    model = qkv(np.random.default_rng(6))
    reference = model.clone()
    data = gaussian_feeds(seed=406, batches=2, features=8)
    calibrator = Calibrator.for_model(model, data, show_progress=False)
    SplitQuantPass(calibrator, activation_chunks=2, max_overhead=EVERYTHING)(model)
    assert ops(model).count("Gather") == 2  # two chunks of x, shared by the three projections
    assert len([node for node in model.graph if SPLIT_PART_KEY in node.meta]) == 3 * 3 * 2
    assert_same_outputs(reference, model, data)
    QuantizePass(Calibrator.for_model(model, data, show_progress=False), wbits=8, abits=8)(model)
    scales = {node.meta[INPUT_SPECS_KEY][0].scale.item() for node in model.graph if SPLIT_PART_KEY in node.meta}
    assert len(scales) == 2


def test_budget_keeps_the_layers_with_most_gain_per_added_mac():
    model = named_mlp(np.random.default_rng(7))  # fc1: 16x8 = 128 MACs per row, fc2: 8x4 = 32
    costs_all = split_costs(_split_copy(model, EVERYTHING))
    by_layer = {cost.layer: cost for cost in costs_all}
    assert {name: cost.layer_macs for name, cost in by_layer.items()} == {"fc1": 128, "fc2": 32}
    total = sum(cost.layer_macs for cost in costs_all)
    ratios = {name: cost.gain_db / cost.added_macs for name, cost in by_layer.items()}
    best = max(ratios, key=ratios.__getitem__)
    budget = max(by_layer[best].added_macs, 1) / total
    kept = split_costs(_split_copy(model, budget))
    assert [cost.layer for cost in kept] == [best]
    assert sum(cost.added_macs for cost in kept) <= budget * total
    assert not SplitQuantPass()(mlp(np.random.default_rng(7))).modified  # 10% cannot pay for tripling a layer


def _split_copy(model: ir.Model, max_overhead: float) -> ir.Model:
    copy = model.clone()
    SplitQuantPass(max_overhead=max_overhead)(copy)
    return copy


def test_no_layer_is_not_modified_and_parts_are_not_split_again():
    assert not SplitQuantPass(max_overhead=EVERYTHING)(relu_only()).modified
    model = input_layer(np.random.default_rng(8))
    SplitQuantPass(max_overhead=EVERYTHING)(model)
    before = ops(model)
    assert not SplitQuantPass(max_overhead=EVERYTHING)(model).modified
    assert ops(model) == before


def test_options_are_checked():
    with pytest.raises(ValueError):
        SplitQuantPass(activation_chunks=0)
    with pytest.raises(ValueError):
        SplitQuantPass(wbits=1)


CONVS = """
<ir_version: 8, opset_import: ["" : 17]>
convs (float[N, 8, 6, 6] x) => (float[N, 8, 6, 6] y) {
  [depthwise] d = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1], group: int = 8>(x, wd, bd)
  r = Relu(d)
  [pointwise] y = Conv<kernel_shape: ints = [1, 1]>(r, wp)
}
"""


def depthwise_separable(rng: np.random.Generator) -> ir.Model:
    """A depthwise 3x3 Conv with a bias, a Relu, and a pointwise Conv (a mobile CNN block)."""
    heavy = weights(rng, 8, 8, 1, 1) * np.where(rng.random((8, 8, 1, 1)) < 0.1, 8.0, 1.0).astype(np.float32)
    return build(CONVS, {"wd": weights(rng, 8, 1, 3, 3), "bd": weights(rng, 8), "wp": heavy})


def test_depthwise_and_pointwise_convs_split_exactly_and_beat_plain_w3_in_onnxruntime():
    model = depthwise_separable(np.random.default_rng(7))
    reference = model.clone()
    assert SplitQuantPass(max_overhead=EVERYTHING)(model).modified
    assert len([node for node in model.graph if SPLIT_PART_KEY in node.meta]) == 6
    assert_same_outputs(reference, model, conv_feeds_8(407))
    errors = {}
    for passes in (["quantize"], ["split-quant", "quantize"]):
        recipe = graphquant.Recipe.named("splitquant").with_passes(passes).with_options(wbits=3)
        result = graphquant.optimize(
            reference, recipe, calibration=conv_feeds_8(408), validation=conv_feeds_8(409), show_progress=False
        )
        errors[len(passes)] = min(c.sqnr_db for c in result.report.outputs.values())
    assert errors[2] >= errors[1] + 3


def conv_feeds_8(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 8, 6, 6)).astype(np.float32)} for _ in range(2)]
