"""ContiguousFloatRoutesPass: a float route's Gather becomes a Slice of renumbered channels, outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import GELU_HIDDEN, GELU_OUTLIERS, gaussian_feeds, gelu_mlp, ops, run

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.lowering import TARGETS
from graphquant.lowering.contiguous_routes import ContiguousFloatRoutesPass
from graphquant.lowering.ort_cpu import OrtCpuLoweringPass
from graphquant.passes.preexecute_dequant import PreexecuteDequantPass
from graphquant.passes.quantize import QuantizePass
from graphquant.quant_spec import CHANNEL_ORDER_KEY


def routed_and_lowered(model: ir.Model) -> ir.Model:
    """outliertune's migration with forced float routes (two channels per group), quantized, lowered to ort-cpu."""
    shared = Calibrator.for_model(model, gaussian_feeds(900, batches=4, features=8), show_progress=False)
    PreexecuteDequantPass(shared, float_channels=2, float_route_below_db=1000, max_float_fraction=0.5)(model)
    QuantizePass(shared)(model)
    OrtCpuLoweringPass()(model)
    return model


def outputs(model: ir.Model) -> list[np.ndarray]:
    """Every output on three held-out batches, run in onnxruntime."""
    return [out for feed in gaussian_feeds(901, batches=3, features=8) for out in run(model, feed)]


def test_the_hidden_route_reads_a_slice_of_the_last_channels_and_outputs_are_identical():
    lowered = routed_and_lowered(gelu_mlp(1))
    reference = lowered.clone()
    gathers = [node for node in lowered.graph if node.op_type == "Gather"]
    assert len(gathers) == 2  # the route of x (a graph input: its channels cannot move) and of the hidden layer
    hidden = next(node for node in gathers if node.inputs[0].name == "gs")
    routed = hidden.inputs[1].const_value.numpy()
    assert len(set(routed.tolist()) & set(GELU_OUTLIERS)) == 2  # the two widest hidden channels
    result = ContiguousFloatRoutesPass()(lowered)
    assert result.modified
    onnx.checker.check_model(ir.to_proto(lowered))
    assert ops(lowered).count("Gather") == 1 and ops(lowered).count("Slice") == 1
    (sliced,) = [node for node in lowered.graph if node.op_type == "Slice"]
    starts, ends, axes = (value.const_value.numpy().tolist() for value in sliced.inputs[1:])
    assert (starts, ends, axes) == ([GELU_HIDDEN - len(routed)], [GELU_HIDDEN], [-1])
    assert sliced.inputs[0].name == "gs" and {n.op_type for n in sliced.outputs[0].consumers()} == {"MatMul"}
    fc1 = next(node for node in lowered.graph if node.name == "fc1")
    weight_before = next(node for node in reference.graph if node.name == "fc1").inputs[1].const_value.numpy()
    np.testing.assert_array_equal(fc1.inputs[1].const_value.numpy()[:, -len(routed) :], weight_before[:, routed])
    used = {v.name for node in lowered.graph for v in node.inputs if v is not None}
    assert set(lowered.graph.initializers) <= used  # the old weights, bias and shift went with their last reader
    for expected, got in zip(outputs(reference), outputs(lowered)):
        np.testing.assert_array_equal(expected, got)


def test_a_reader_that_is_not_a_layer_keeps_the_gather():
    lowered = routed_and_lowered(gelu_mlp(2, extra_reader="  r = ReduceMax<axes: ints = [1], keepdims: int = 0>(gs)"))
    before = ops(lowered)
    assert not ContiguousFloatRoutesPass()(lowered).modified
    assert ops(lowered) == before and "Slice" not in before


def test_the_ort_cpu_target_renumbers_and_matches_the_unrenumbered_lowering(monkeypatch):
    assert ContiguousFloatRoutesPass in TARGETS["ort-cpu"]
    recipe = graphquant.Recipe.named("outliertune").with_options(
        float_channels=2, float_route_below_db=1000.0, max_float_fraction=0.5
    )
    calib = gaussian_feeds(902, batches=4, features=8)
    renumbered = graphquant.optimize(gelu_mlp(3), recipe, calib, target="ort-cpu", show_progress=False).model
    without = tuple(step for step in TARGETS["ort-cpu"] if step is not ContiguousFloatRoutesPass)
    monkeypatch.setitem(TARGETS, "ort-cpu", without)
    plain = graphquant.optimize(gelu_mlp(3), recipe, calib, target="ort-cpu", show_progress=False).model
    assert ops(renumbered).count("Slice") == ops(plain).count("Gather") - ops(renumbered).count("Gather") == 1
    routes = [node for node in renumbered.graph if node.op_type in ("Gather", "Slice")]
    assert all(node.outputs[0].consumers()[0].op_type == "MatMul" for node in routes)
    held_out = gaussian_feeds(903, batches=2, features=8)
    for feed in held_out:
        np.testing.assert_array_equal(run(plain, feed)[0], run(renumbered, feed)[0])


def test_a_renumbered_layer_output_is_validated_against_the_reference_in_its_new_channel_order(monkeypatch):
    # Compared by name alone, fc1's renumbered output would be a permutation of the reference's: about 0 dB.
    recipe = graphquant.Recipe.named("outliertune").with_options(
        float_channels=2, float_route_below_db=1000.0, max_float_fraction=0.5
    )
    calib = gaussian_feeds(904, batches=4, features=8)
    renumbered = graphquant.optimize(gelu_mlp(4), recipe, calib, target="ort-cpu", show_progress=False)
    (order,) = [
        v.meta[CHANNEL_ORDER_KEY] for n in renumbered.model.graph for v in n.outputs if CHANNEL_ORDER_KEY in v.meta
    ][:1]
    assert sorted(order.tolist()) == list(range(GELU_HIDDEN)) and order.tolist() != list(range(GELU_HIDDEN))
    without = tuple(step for step in TARGETS["ort-cpu"] if step is not ContiguousFloatRoutesPass)
    monkeypatch.setitem(TARGETS, "ort-cpu", without)
    plain = graphquant.optimize(gelu_mlp(4), recipe, calib, target="ort-cpu", show_progress=False)
    measured, expected = renumbered.report.layer_metrics["fc1"], plain.report.layer_metrics["fc1"]
    assert expected.sqnr_db > 20 and measured.sqnr_db == pytest.approx(expected.sqnr_db, abs=1e-6)
