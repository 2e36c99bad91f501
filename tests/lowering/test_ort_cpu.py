"""ort-cpu lowering: com.microsoft MatMulIntegerToFloat with fused bias, checked against the QDQ form in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphquant
from builders import (
    build,
    by_name,
    feeds,
    gaussian_feeds,
    initializer,
    ln_qkv,
    named_mlp,
    ops,
    outlier_feeds,
    run,
    sqnr_db,
    weights,
)
from graphquant.analysis.calibration import Calibrator
from graphquant.lowering.ort_cpu import MICROSOFT_DOMAIN, OrtCpuLoweringPass
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import QuantizePass
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY
from graphquant.report import layer_decisions

F32 = np.float32


def annotate(model: ir.Model, data, **options) -> dict[str, dict]:
    """Run QuantizePass; return each annotated node's specs (lowering pops them)."""
    QuantizePass(Calibrator.for_model(model, data, show_progress=False), **options)(model)
    return {node.name: dict(node.meta[INPUT_SPECS_KEY]) for node in model.graph if INPUT_SPECS_KEY in node.meta}


def lowered_pair(make, data, **options):
    """The same quantization lowered to ort-cpu (OrtCpu then QDQ for the rest) and to plain QDQ."""
    ort_cpu, qdq = make(), make()
    specs = annotate(ort_cpu, data, **options)
    assert {k: [s.key for s in v.values()] for k, v in annotate(qdq, data, **options).items()} == {
        k: [s.key for s in v.values()] for k, v in specs.items()
    }
    result = OrtCpuLoweringPass()(ort_cpu)
    QdqLoweringPass()(ort_cpu)
    QdqLoweringPass()(qdq)
    return ort_cpu, qdq, specs, result


def assert_within_one_step(ort_cpu: ir.Model, qdq: ir.Model, data, steps: list[np.ndarray]) -> None:
    """Each output column differs by at most one accumulator step (activation scale x weight scale)."""
    for feed in data:
        for got, expected, step in zip(run(ort_cpu, feed), run(qdq, feed), steps):
            assert np.all(np.abs(got - expected) <= step), np.abs(got - expected).max()
            assert sqnr_db(expected, got) >= 40.0


def accumulator_step(fused: ir.Node) -> np.ndarray:
    """A MatMulIntegerToFloat's output step per column: activation scale x weight scale."""
    return float(fused.inputs[2].const_value.numpy()) * fused.inputs[3].const_value.numpy()


def fused_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.op_type == "MatMulIntegerToFloat"]


@pytest.fixture
def mlp_pair():
    rng = np.random.default_rng(0)
    data = feeds(rng, batches=4, rows=8, features=16)
    seed = int(rng.integers(1 << 30))
    reference = named_mlp(np.random.default_rng(seed))
    ort_cpu, qdq, specs, result = lowered_pair(lambda: named_mlp(np.random.default_rng(seed)), data)
    return reference, ort_cpu, qdq, specs, result, data


def test_layers_become_matmul_integer_to_float_with_the_bias_fused(mlp_pair):
    reference, model, _, specs, result, _ = mlp_pair
    assert result.modified
    onnx.checker.check_model(ir.to_proto(model))
    assert ops(model) == ["QuantizeLinear", "MatMulIntegerToFloat", "Relu", "QuantizeLinear", "MatMulIntegerToFloat"]
    assert model.graph.opset_imports[MICROSOFT_DOMAIN] == 1
    nodes = by_name(model)
    for name, weight_name, bias_name in (("fc1", "w1", "b1"), ("fc2", "w2", "b2")):
        fused = nodes[name]
        assert (fused.op_type, fused.domain) == ("MatMulIntegerToFloat", MICROSOFT_DOMAIN)
        codes, weight_codes, a_scale, b_scale, a_zero_point, b_zero_point, bias = fused.inputs
        quantize = codes.producer()
        assert quantize.op_type == "QuantizeLinear" and codes.dtype == ir.DataType.UINT8
        assert quantize.inputs[1] is a_scale and quantize.inputs[2] is a_zero_point
        # uint8 codes: a signed grid moves up by 128; fc2's input is a Relu output, with an unsigned grid from 0.
        assert specs[name][0].signed is (name == "fc1")
        expected_zero_point = 128 if name == "fc1" else 0
        assert a_zero_point.const_value.numpy().dtype == np.uint8
        assert int(a_zero_point.const_value.numpy()) == expected_zero_point
        assert float(a_scale.const_value.numpy()) == float(specs[name][0].scale)
        assert b_zero_point is None  # symmetric int8 weights
        np.testing.assert_array_equal(b_scale.const_value.numpy(), specs[name][1].scale)
        assert weight_codes.const_value.numpy().dtype == np.int8
        np.testing.assert_array_equal(bias.const_value.numpy(), initializer(reference, bias_name))
        assert weight_name not in model.graph.initializers  # the float weight is gone
    assert "Add" not in ops(model) and "MatMul" not in ops(model) and "Gemm" not in ops(model)
    assert [value.name for value in model.graph.outputs] == ["y"]


def test_gemm_trans_b_weight_is_transposed(mlp_pair):
    reference, model, _, specs, _, _ = mlp_pair
    w2 = initializer(reference, "w2")  # [4, 8] with transB
    codes = by_name(model)["fc2"].inputs[1].const_value.numpy()
    assert codes.shape == (8, 4)  # [K, N] as MatMulIntegerToFloat wants
    np.testing.assert_array_equal(codes, specs["fc2"][1].quantize(w2).T)
    w1 = initializer(reference, "w1")
    np.testing.assert_array_equal(by_name(model)["fc1"].inputs[1].const_value.numpy(), specs["fc1"][1].quantize(w1))


def test_output_matches_qdq_and_the_integer_reference(mlp_pair):
    reference, model, qdq, specs, _, data = mlp_pair
    fc2_a, fc2_w = specs["fc2"][0], specs["fc2"][1]
    assert_within_one_step(model, qdq, data, [fc2_a.scale * fc2_w.scale])
    w = {name: initializer(reference, name) for name in ("w1", "b1", "w2", "b2")}
    for feed in data:
        # int32 accumulation of (uint8 - zero point) x int8, scaled, plus the bias: what the kernel computes
        a1 = specs["fc1"][0].quantize(feed["x"]).astype(np.int32)
        fc1_a, fc1_w = specs["fc1"][0], specs["fc1"][1]
        hidden = (a1 @ fc1_w.quantize(w["w1"]).astype(np.int32)) * (fc1_a.scale * fc1_w.scale)
        hidden = np.maximum(hidden + w["b1"], 0).astype(F32)
        a2 = fc2_a.quantize(hidden).astype(np.int32)
        expected = (a2 @ fc2_w.quantize(w["w2"]).T.astype(np.int32)) * (fc2_a.scale * fc2_w.scale) + w["b2"]
        (got,) = run(model, feed)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2 * float((fc2_a.scale * fc2_w.scale).max()))
        float_out = run(reference, feed)[0]
        assert np.abs(got - float_out).max() > 1e-3  # quantized for real
        assert sqnr_db(float_out, got) > 25


def test_decisions_survive_lowering(mlp_pair):
    _, model, _, _, _, _ = mlp_pair
    decisions = {d.node: d for d in layer_decisions(model)}
    assert set(decisions) == {"fc1", "fc2"}
    assert all(d.status == "quantized" and d.scheme.startswith("W8 per-channel") for d in decisions.values())
    assert all(DECISION_KEY in node.meta for node in fused_nodes(model))


def test_lowering_again_is_a_no_op(mlp_pair):
    _, model, _, _, _, _ = mlp_pair
    before = ops(model)
    assert not OrtCpuLoweringPass()(model).modified
    assert ops(model) == before


CONV_MLP = """
<ir_version: 8, opset_import: ["" : 17]>
conv_mlp (float[N, 2, 6, 6] x) => (float[N, 4] y) {
  [conv] c = Conv<pads: ints = [1, 1, 1, 1]>(x, cw, cb)
  [act] r = Relu(c)
  [flat] f = Flatten(r)
  [fc] y = Gemm<transB: int = 1>(f, w, b)
}
"""


def test_conv_stays_qdq_under_ort_cpu():
    rng = np.random.default_rng(1)
    init = {"cw": weights(rng, 3, 2, 3, 3), "cb": weights(rng, 3), "w": weights(rng, 4, 108), "b": weights(rng, 4)}
    data = [{"x": rng.standard_normal((4, 2, 6, 6)).astype(F32)} for _ in range(3)]
    ort_cpu, qdq, specs, _ = lowered_pair(lambda: build(CONV_MLP, init), data)
    nodes = by_name(ort_cpu)
    assert nodes["conv"].op_type == "Conv" and nodes["conv"].inputs[1].producer().op_type == "DequantizeLinear"
    assert nodes["conv"].inputs[0].producer().op_type == "DequantizeLinear"
    assert nodes["fc"].op_type == "MatMulIntegerToFloat"
    assert ops(ort_cpu).count("QuantizeLinear") == 2 and ops(ort_cpu).count("DequantizeLinear") == 2
    assert {d.node: d.status for d in layer_decisions(ort_cpu)} == {"conv": "quantized", "fc": "quantized"}
    assert_within_one_step(ort_cpu, qdq, data, [specs["fc"][0].scale * specs["fc"][1].scale])


UNLOWERABLE = """
<ir_version: 8, opset_import: ["" : 17]>
unlowerable (float[N, 16] x) => (float[N, 8] y, float[N, 8] z, float[N, 8] z_raw) {
  [scaled] y = Gemm<alpha: float = 0.5, transB: int = 1>(x, w1, c1)
  [shared_out] z_raw = MatMul(x, w2)
  [bias] z = Add(z_raw, b2)
}
"""


def test_gemm_with_alpha_stays_qdq_and_a_matmul_output_that_is_a_graph_output_keeps_its_add():
    rng = np.random.default_rng(2)
    init = {"w1": weights(rng, 8, 16), "c1": weights(rng, 8), "w2": weights(rng, 16, 8), "b2": weights(rng, 8)}
    data = feeds(rng, batches=2, rows=8, features=16)
    ort_cpu, qdq, specs, _ = lowered_pair(lambda: build(UNLOWERABLE, init), data)
    nodes = by_name(ort_cpu)
    assert nodes["scaled"].op_type == "Gemm" and nodes["scaled"].inputs[1].producer().op_type == "DequantizeLinear"
    fused = nodes["shared_out"]
    assert fused.op_type == "MatMulIntegerToFloat" and len(fused.inputs) == 6  # no bias to fuse...
    assert nodes["bias"].op_type == "Add" and nodes["bias"].inputs[0] is fused.outputs[0]  # ...the Add stays
    assert [v.name for v in ort_cpu.graph.outputs] == ["y", "z", "z_raw"]
    step = specs["shared_out"][0].scale * specs["shared_out"][1].scale
    assert_within_one_step(ort_cpu, qdq, data, [np.full(8, 1e-5), step, step])


def test_weight_only_annotations_are_left_to_qdq():
    rng = np.random.default_rng(3)
    seed = int(rng.integers(1 << 30))
    model = named_mlp(np.random.default_rng(seed))
    QuantizePass(None, abits=None)(model)
    assert not OrtCpuLoweringPass()(model).modified
    QdqLoweringPass()(model)
    assert "MatMulIntegerToFloat" not in ops(model) and ops(model).count("DequantizeLinear") == 2


def test_three_dimensional_activation():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    seq (float[B, S, 16] x) => (float[B, S, 8] y) {
      [fc] y_raw = MatMul(x, w)
      [fc_bias] y = Add(y_raw, b)
    }
    """
    rng = np.random.default_rng(4)
    init = {"w": weights(rng, 16, 8), "b": weights(rng, 1, 1, 8)}
    data = [{"x": rng.standard_normal((2, 5, 16)).astype(F32)} for _ in range(2)]
    ort_cpu, qdq, specs, _ = lowered_pair(lambda: build(text, init), data)
    assert ops(ort_cpu) == ["QuantizeLinear", "MatMulIntegerToFloat"]
    assert_within_one_step(ort_cpu, qdq, data, [specs["fc"][0].scale * specs["fc"][1].scale])


@pytest.mark.parametrize("recipe", ["w8a8", "outliertune", "smoothquant", "os-plus"])
def test_recipes_lowered_to_ort_cpu_match_their_qdq_form(recipe):
    rng = np.random.default_rng(5)
    model = ln_qkv(rng, damped=True)
    calib, held_out = gaussian_feeds(500), gaussian_feeds(501, batches=2)
    results = {
        target: graphquant.optimize(model, recipe, calib, target=target, validation=held_out, show_progress=False)
        for target in ("ort-cpu", "qdq")
    }
    lowered = results["ort-cpu"].model
    onnx.checker.check_model(ir.to_proto(lowered))
    fused = fused_nodes(lowered)
    assert sorted(node.name for node in fused) == ["k_proj", "q_proj", "v_proj"]
    assert not {"Add", "MatMul", "Gemm", "DequantizeLinear"} & set(ops(lowered))  # biases fused, nothing left in QDQ
    (quantize,) = [node for node in lowered.graph if node.op_type == "QuantizeLinear"]  # shared by q, k and v
    assert all(node.inputs[0] is quantize.outputs[0] for node in fused)
    assert int(quantize.inputs[2].const_value.numpy()) == 128 and quantize.outputs[0].dtype == ir.DataType.UINT8
    assert not {"wq", "wk", "wv"} & set(lowered.graph.initializers)
    used = {v.name for node in lowered.graph for v in node.inputs if v is not None}
    assert set(lowered.graph.initializers) <= used  # no dead initializers left behind
    assert [v.name for v in lowered.graph.outputs] == ["q", "k", "v"]
    report = results["ort-cpu"].report
    assert report.target == "ort-cpu"
    statuses = {layer.node: layer.status for layer in report.layers}
    assert statuses == dict.fromkeys(("q_proj", "k_proj", "v_proj"), "quantized")
    assert [layer.scheme for layer in report.layers] == [layer.scheme for layer in results["qdq"].report.layers]
    for name, comparison in report.outputs.items():  # the same fidelity as the QDQ form
        assert comparison.sqnr_db == pytest.approx(results["qdq"].report.outputs[name].sqnr_db, abs=0.05)
    steps = [accumulator_step(value.producer()) for value in lowered.graph.outputs]
    assert_within_one_step(lowered, results["qdq"].model, held_out, steps)


def test_float_routed_channels_stay_a_float_matmul_under_ort_cpu():
    model = ln_qkv(np.random.default_rng(7))
    recipe = graphquant.Recipe.named("outliertune").with_options(
        float_channels=2, float_route_below_db=1000.0, max_float_fraction=0.5
    )
    calib, held_out = gaussian_feeds(700), gaussian_feeds(701, batches=2)
    lowered = graphquant.optimize(model, recipe, calib, target="ort-cpu", show_progress=False)
    qdq = graphquant.optimize(model, recipe, calib, target="qdq", show_progress=False)
    assert ops(lowered.model).count("Gather") == 1
    assert ops(lowered.model).count("MatMulIntegerToFloat") == 3 and ops(lowered.model).count("MatMul") == 3
    float_paths = [node for node in lowered.model.graph if node.op_type == "MatMul"]
    assert all(node.inputs[0].producer().op_type == "Gather" for node in float_paths)
    assert all(node.inputs[1].const_value.numpy().dtype == np.float32 for node in float_paths)
    statuses = sorted(layer.status for layer in lowered.report.layers)
    assert statuses == ["float"] * 3 + ["quantized"] * 3
    steps = [accumulator_step(value.producer().inputs[0].producer()) for value in lowered.model.graph.outputs]
    assert_within_one_step(lowered.model, qdq.model, held_out, steps)


def test_graph_input_with_outliers_under_ort_cpu():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    input_gemm (float[N, 16] x) => (float[N, 8] y) {
      [fc] y = Gemm<transB: int = 1>(x, w, c)
    }
    """
    rng = np.random.default_rng(6)
    model = build(text, {"w": weights(rng, 8, 16), "c": weights(rng, 8)})
    calib, held_out = outlier_feeds(600), outlier_feeds(601, batches=2)
    lowered = graphquant.optimize(model, "outliertune", calib, target="ort-cpu", show_progress=False).model
    qdq = graphquant.optimize(model, "outliertune", calib, target="qdq", show_progress=False).model
    (fused,) = fused_nodes(lowered)
    assert_within_one_step(lowered, qdq, held_out, [accumulator_step(fused)])
    expected = np.concatenate([run(model, feed)[0] for feed in held_out])
    got = np.concatenate([run(lowered, feed)[0] for feed in held_out])
    assert sqnr_db(expected, got) > 30


OLD_OPSET = """
<ir_version: 7, opset_import: ["" : 11]>
old (float[N, 16] x) => (float[N, 8] y) {
  [fc] y = MatMul(x, w)
}
"""


def test_old_opset_models_are_upgraded_to_13_and_lowered():
    rng = np.random.default_rng(8)
    model = build(OLD_OPSET, {"w": weights(rng, 16, 8)})
    calib = gaussian_feeds(800, batches=2)
    result = graphquant.optimize(model, "w8a8", calib, target="ort-cpu", show_progress=False)
    assert result.model.graph.opset_imports[""] == 13
    assert model.graph.opset_imports[""] == 11  # the input model is left alone
    assert ops(result.model) == ["QuantizeLinear", "MatMulIntegerToFloat"]
    assert result.report.outputs["y"].sqnr_db > 30
    # A6 codes need an integer Clip (opset 12), which the upgrade makes available.
    narrow = graphquant.optimize(model, "w8a8", calib, wbits=6, abits=6, target="ort-cpu", show_progress=False)
    assert ops(narrow.model) == ["QuantizeLinear", "Clip", "MatMulIntegerToFloat"]
    assert narrow.report.outputs["y"].sqnr_db > 20


def test_four_bit_weights_are_stored_as_int4_behind_a_cast_and_match_qdq():
    data = gaussian_feeds(seed=12)
    ort_cpu, qdq, _, result = lowered_pair(lambda: ln_qkv(np.random.default_rng(13)), data, wbits=4, abits=8)
    assert result.modified and ort_cpu.graph.opset_imports[""] >= 21
    fused = fused_nodes(ort_cpu)
    for node in fused:
        cast = node.inputs[1].producer()
        assert cast.op_type == "Cast" and cast.inputs[0].const_value.dtype == ir.DataType.INT4
    onnx.checker.check_model(ir.to_proto(ort_cpu))
    assert_within_one_step(ort_cpu, qdq, data, [accumulator_step(node) for node in fused])
