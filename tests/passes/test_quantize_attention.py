"""Attention matmul quantization: the specs it picks, onnxruntime numerics after QDQ, and int8 kernels in OpenVINO."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import attention, build, mlp, run
from builders import attention_feeds as feeds

from graphquant.analysis import openvino_run
from graphquant.analysis.calibration import Calibrator
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize_attention import QuantizeAttentionPass
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY

F32 = np.float32


def quantized(model: ir.Model, data: list[dict[str, np.ndarray]]) -> ir.passes.PassResult:
    return QuantizeAttentionPass(Calibrator.for_model(model, data, False))(model)


def test_both_attention_matmuls_get_per_tensor_specs_from_calibration():
    rng = np.random.default_rng(0)
    model, data = attention(rng), feeds(rng)
    float_model = model.clone()
    assert quantized(model, data).modified
    nodes = {node.name: node for node in model.graph}
    assert all(INPUT_SPECS_KEY not in nodes[name].meta for name in ("q_proj", "k_proj", "v_proj"))
    q, kt, p, _ = (np.concatenate(arrays) for arrays in zip(*(run_tensors(float_model, feed) for feed in data)))
    scores, context = nodes["scores"].meta[INPUT_SPECS_KEY], nodes["context"].meta[INPUT_SPECS_KEY]
    assert float(scores[0].scale) == pytest.approx(np.abs(q).max() / 127, rel=1e-6)
    assert float(scores[1].scale) == pytest.approx(np.abs(kt).max() / 127, rel=1e-6)
    # Softmax probabilities are never negative: unsigned [0, max p].
    assert (context[0].signed, int(context[0].zero_point)) == (False, 0)
    assert float(context[0].scale) == pytest.approx(p.max() / 255, rel=1e-6)
    assert nodes["context"].meta[DECISION_KEY].scheme == "A8 x A8 per-tensor minmax"


def run_tensors(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """q, kᵀ, the probabilities and v of the float model for one feed."""
    probe = model.clone()
    for name in ("q", "kt", "p", "v"):
        value = next(out for node in probe.graph for out in node.outputs if out.name == name)
        probe.graph.outputs.append(value)
    return run(probe, feed)[2:]


def test_lowered_qdq_attention_matches_onnxruntime_float_within_the_grid():
    rng = np.random.default_rng(1)
    model, data = attention(rng), feeds(rng)
    float_model = model.clone()
    quantized(model, data)
    QdqLoweringPass()(model)
    assert [node.op_type for node in model.graph].count("QuantizeLinear") == 4
    for feed in feeds(rng, 2):
        expected, actual = run(float_model, feed)[0], run(model, feed)[0]
        error = np.abs(expected - actual)
        # Rounding q, kᵀ, p and v at 8 bits: a few percent of the output's range at most, ~1% on average.
        assert error.max() < 0.05 * np.abs(expected).max()
        assert np.sqrt((error**2).mean()) < 0.01 * np.abs(expected).max()
        assert error.max() > 0  # the Q/DQ pairs really round


def test_openvino_runs_both_attention_matmuls_on_int8_inputs():
    rng = np.random.default_rng(2)
    model, data = attention(rng), feeds(rng)
    float_kinds = openvino_run.layer_precisions(model.clone(), openvino_run.UNFUSED)
    quantized(model, data)
    QdqLoweringPass()(model)
    kinds = openvino_run.layer_precisions(model, openvino_run.UNFUSED)
    assert sum(count for (kind, precision), count in float_kinds.items() if kind == "MatMul") == 2
    assert not any(precision in ("i8", "u8") for kind, precision in float_kinds if kind == "MatMul")
    # Q·Kᵀ on signed codes, softmax·V on the probabilities' unsigned codes.
    assert kinds[("MatMul", "i8")] == 1
    assert kinds[("MatMul", "u8")] == 1


def test_batches_of_different_sequence_lengths_calibrate_one_range_per_tensor():
    rng = np.random.default_rng(5)
    model = attention(rng)
    float_model = model.clone()
    data = [feed for seq in (5, 9, 7) for feed in feeds(rng, 1, seq)]
    assert quantized(model, data).modified
    # The scores' last axis is the sequence: its range is one per tensor, over every batch.
    p = np.concatenate([run_tensors(float_model, feed)[2].ravel() for feed in data])
    spec = model.graph.node("context").meta[INPUT_SPECS_KEY][0]
    assert float(spec.scale) == pytest.approx(p.max() / 255, rel=1e-6)


def test_a_graph_without_activation_matmuls_is_left_alone():
    rng = np.random.default_rng(3)
    model = mlp(rng)
    data = [{"x": rng.standard_normal((4, 16)).astype(F32)}]
    assert not quantized(model, data).modified
    assert not any(INPUT_SPECS_KEY in node.meta for node in model.graph)


SHARED = """
<ir_version: 8, opset_import: ["" : 17]>
shared (float[4, 8] a, float[8, 4] b) => (float[4, 4] y, float[4, 4] z) {
  [first] y = MatMul(a, b)
  [second] z = MatMul(a, b)
}
"""


def test_matmuls_sharing_inputs_get_the_same_specs():
    rng = np.random.default_rng(4)
    model = build(SHARED)
    data = [{"a": rng.standard_normal((4, 8)).astype(F32), "b": rng.standard_normal((8, 4)).astype(F32)}]
    assert quantized(model, data).modified
    first, second = (model.graph.node(name).meta[INPUT_SPECS_KEY] for name in ("first", "second"))
    assert [spec.key for spec in first.values()] == [spec.key for spec in second.values()]
    QdqLoweringPass()(model)
    # One Q/DQ pair per tensor and spec, shared by both MatMuls.
    assert [node.op_type for node in model.graph].count("QuantizeLinear") == 2
    y, z = run(model, data[0])
    np.testing.assert_array_equal(y, z)


def test_it_needs_calibration_data():
    with pytest.raises(ir.passes.PreconditionError, match="quantize-attention needs calibration data"):
        QuantizeAttentionPass()(attention(np.random.default_rng(6)))


def test_bits_outside_the_grid_range_are_refused():
    with pytest.raises(ValueError, match="attention_bits"):
        QuantizeAttentionPass(attention_bits=9)
