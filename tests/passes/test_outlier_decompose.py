"""OutlierDecomposePass: static LLM.int8() decomposition, exact in fp32, with the outlier set from calibration."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import (
    OUTLIER_CHANNELS,
    assert_same_outputs,
    gaussian_feeds,
    input_layer,
    ln_qkv,
    ops,
    post_ln,
    relu_only,
    run,
    sqnr_db,
)

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.cost import split_costs
from graphquant.passes import OutlierDecomposePass, PreexecuteDequantPass, SymmetrizePass
from graphquant.quant_spec import SCHEME_NOTE_KEY

CALIB = gaussian_feeds(seed=300)
HELD_OUT = gaussian_feeds(seed=301, batches=2)


def calibrator(model) -> Calibrator:
    return Calibrator.for_model(model, CALIB, show_progress=False)


@pytest.mark.parametrize("build_model", [ln_qkv, post_ln], ids=["exclusive-ln", "post-ln-residual"])
def test_decomposition_is_exact_and_routes_exactly_the_outlier_channels(build_model):
    model = build_model(np.random.default_rng(0))
    reference = model.clone()
    result = OutlierDecomposePass(calibrator(model), max_fraction=0.25, max_overhead=0.25)(model)
    assert result.modified
    assert ops(model).count("Gather") == 1  # one gather shared by the group
    gather = next(node for node in model.graph if node.op_type == "Gather")
    np.testing.assert_array_equal(gather.inputs[1].const_value.numpy(), np.array(OUTLIER_CHANNELS))
    notes = {node.meta[SCHEME_NOTE_KEY] for node in model.graph if SCHEME_NOTE_KEY in node.meta}
    assert notes == {"LLM.int8(): 2 of 16 input channels in float (12.5% of MACs)"}
    assert_same_outputs(reference, model, HELD_OUT)


def test_threshold_above_every_channel_changes_nothing():
    model = ln_qkv(np.random.default_rng(1))
    assert not OutlierDecomposePass(calibrator(model), threshold=1e6)(model).modified
    assert "Gather" not in ops(model)


def test_max_fraction_caps_the_routed_channels():
    model = ln_qkv(np.random.default_rng(2))
    reference = model.clone()
    OutlierDecomposePass(calibrator(model), threshold=1e-3, max_fraction=0.25, max_overhead=0.25)(model)
    gather = next(node for node in model.graph if node.op_type == "Gather")
    assert gather.inputs[1].const_value.numpy().size == 4
    assert_same_outputs(reference, model, HELD_OUT)


def test_decomposition_composes_with_symmetrize_and_preexecution_exactly():
    model = post_ln(np.random.default_rng(3))
    reference = model.clone()
    shared = calibrator(model)
    for pass_ in (
        OutlierDecomposePass(shared, max_fraction=0.25, max_overhead=0.25),
        SymmetrizePass(shared),
        PreexecuteDequantPass(shared),
    ):
        pass_(model)
    assert ops(model).count("Gather") == 1
    assert_same_outputs(reference, model, HELD_OUT)


def test_no_matmul_is_not_modified_and_calibration_is_required():
    model = relu_only()
    data = gaussian_feeds(seed=302, features=4)
    assert not OutlierDecomposePass(Calibrator.for_model(model, data, show_progress=False))(model).modified
    with pytest.raises(ValueError):
        OutlierDecomposePass(None, threshold=0)


def test_llm_int8_recipe_beats_w8a8_on_planted_outliers():
    model = ln_qkv(np.random.default_rng(5))
    errors = {}
    for recipe in ("w8a8", "llm-int8"):
        chosen = graphquant.Recipe.named(recipe)
        if recipe == "llm-int8":  # 2 of this model's 16 channels are outliers: more than the default 10% cap
            chosen = chosen.with_options(max_fraction=0.25, max_overhead=0.25)
        result = graphquant.optimize(model, chosen, calibration=CALIB, validation=HELD_OUT, show_progress=False)
        errors[recipe] = min(c.sqnr_db for c in result.report.outputs.values())
        assert len(result.report.quantized) == 3
    assert errors["llm-int8"] >= errors["w8a8"] + 10
    assert np.isfinite(run(model, HELD_OUT[0])[0]).all()


def test_routed_layers_are_measured_at_their_full_output():
    model = post_ln(np.random.default_rng(6))
    recipe = graphquant.Recipe.named("llm-int8").with_options(max_fraction=0.25, max_overhead=0.25)
    result = graphquant.optimize(model, recipe, calibration=CALIB, validation=HELD_OUT, show_progress=False)
    (layer,) = result.report.quantized
    assert layer.output == "fb"  # the sum of the int and float paths keeps the bias Add's original name
    assert result.report.layer_metrics[layer.node].sqnr_db > 20


def _int_path(model) -> ir.Value:
    """The activation the int path of a per-batch decomposition reads (the Where output)."""
    return next(node for node in model.graph if node.op_type == "Where").outputs[0]


def test_dynamic_mode_is_exact_with_and_without_outliers_in_the_batch():
    model = ln_qkv(np.random.default_rng(7))
    reference = model.clone()
    assert OutlierDecomposePass(calibrator(model), mode="dynamic", max_overhead=0.25)(model).modified
    assert ops(model).count("NonZero") == 1 and ops(model).count("Where") == 1  # one detector for the shared input
    assert_same_outputs(reference, model, HELD_OUT)
    quiet = [{"x": feed["x"] * 1e-3} for feed in HELD_OUT]  # no channel reaches the threshold: empty float path
    assert_same_outputs(reference, model, quiet)


def test_dynamic_mode_routes_a_new_outlier_channel_of_the_batch_to_float():
    model = input_layer(np.random.default_rng(8))
    calm = gaussian_feeds(seed=303)  # |x| stays below 6 in calibration: no channel is an outlier there
    reference = model.clone()
    OutlierDecomposePass(Calibrator.for_model(model, calm, show_progress=False), mode="dynamic")(model)
    probe = model.clone()
    probe.graph.outputs.append(_int_path(probe))
    batch = calm[0]["x"].copy()
    batch[:, 5] = 40.0
    output, int_path = run(probe, {"x": batch})
    np.testing.assert_array_equal(int_path[:, 5], 0.0)
    np.testing.assert_array_equal(np.delete(int_path, 5, axis=1), np.delete(batch, 5, axis=1))
    np.testing.assert_allclose(output, run(reference, {"x": batch})[0], rtol=1e-4, atol=1e-4)
    errors = {}
    for recipe in (graphquant.Recipe.named("w8a8"), graphquant.Recipe.named("llm-int8").with_options(mode="dynamic")):
        result = graphquant.optimize(reference, recipe, calibration=calm, show_progress=False)
        errors[recipe.name] = sqnr_db(run(reference, {"x": batch})[0], run(result.model, {"x": batch})[0])
    assert errors["llm-int8"] >= errors["w8a8"] + 10  # the calibrated int8 range would clip the new outlier channel


def test_dynamic_mode_int_path_is_calibrated_below_the_threshold():
    model = ln_qkv(np.random.default_rng(9))
    OutlierDecomposePass(calibrator(model), mode="dynamic", max_overhead=0.25)(model)
    stats = calibrator(model).collect(model, [_int_path(model).name])
    assert stats[_int_path(model).name].absmax < 6.0


def test_split_costs_record_the_float_path_and_the_budget_can_refuse_it():
    model = ln_qkv(np.random.default_rng(10))
    OutlierDecomposePass(calibrator(model), max_fraction=0.25, max_overhead=0.25)(model)
    costs = split_costs(model)
    assert [cost.layer for cost in costs] == ["q_proj", "k_proj", "v_proj"]
    assert all(cost.added_macs == 2 * 16 and cost.gain_db > 0 for cost in costs)
    untouched = ln_qkv(np.random.default_rng(10))
    assert not OutlierDecomposePass(calibrator(untouched), max_fraction=0.25, max_overhead=0.1)(untouched).modified
