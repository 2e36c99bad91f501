"""The OutlierTune-family presets end to end: listing, pipelines, bit-width options, and accuracy in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from builders import (
    assert_same_outputs,
    gaussian_feeds,
    input_layer,
    ln_qkv,
    ops,
    output_sqnr_db,
    post_ln,
    run,
    save_model,
    token_feeds,
)

import graphquant
from graphquant import rewrites, validate
from graphquant.analysis import runner
from graphquant.analysis.layers import migratable_groups
from graphquant.analysis.stats_cache import CachingCalibrator
from graphquant.cli import main
from graphquant.passes.preexecute_dequant import PreexecuteDequantPass
from graphquant.passes.quantize import QuantizePass
from graphquant.passes.symmetrize import SymmetrizePass
from graphquant.recipes import Recipe, preset_names

MIGRATING = ("outliertune", "smoothquant", "os-plus")
CALIB = gaussian_feeds(seed=700)
HELD_OUT = gaussian_feeds(seed=701, batches=3)

PROLOGUE = ["UpgradeOpsetPass", "FoldConstantsPass", "NameFixPass", "FoldBatchNormPass"]
EXPECTED_PIPELINES = {
    "outliertune": [*PROLOGUE, "SymmetrizePass", "PreexecuteDequantPass", "QuantizePass"],
    "os-plus": [*PROLOGUE, "SymmetrizePass", "PreexecuteDequantPass", "QuantizePass"],
    "smoothquant": [*PROLOGUE, "PreexecuteDequantPass", "QuantizePass"],
}
EXPECTED_METHODS = {"outliertune": "outliertune", "os-plus": "os-plus", "smoothquant": "smoothquant"}


def test_recipes_command_lists_the_migrating_presets(capsys):
    assert main(["recipes"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and not line[0].isspace()}
    assert set(MIGRATING) <= set(preset_names())
    assert "[symmetrize -> preexecute-dequant -> quantize -> qdq]" in lines["outliertune"]
    assert "[symmetrize -> preexecute-dequant -> quantize -> qdq]" in lines["os-plus"]
    assert "[preexecute-dequant -> quantize -> qdq]" in lines["smoothquant"]


@pytest.mark.parametrize("name", MIGRATING)
def test_each_preset_builds_its_pipeline(name):
    model = ln_qkv(np.random.default_rng(0))
    calibrator = graphquant.Calibrator.for_model(model, CALIB, show_progress=False)
    ort_cpu = [
        "FuseActivationPass",
        "MatMulNBitsLoweringPass",
        "GatherBlockQuantizedLoweringPass",
        "OrtCpuLoweringPass",
        "QLinearConvLoweringPass",
        "QdqLoweringPass",
        "ContiguousFloatRoutesPass",
        "FoldChannelScalesPass",
        "DropSoftmaxNanGuardPass",
        "UnsignedWeightsPass",
    ]
    for target, lowering in (("qdq", ["QdqLoweringPass", "UnsignedWeightsPass"]), ("ort-cpu", ort_cpu)):
        pipeline = Recipe.named(name).with_target(target).to_pipeline(calibrator)
        assert pipeline.describe() == [
            *EXPECTED_PIPELINES[name],
            *lowering,
            "RemoveUnusedNodesPass",
            "TopologicalSortPass",
        ]
    passes = {type(p).__name__: p for p in pipeline.passes}
    migrate = passes["PreexecuteDequantPass"]
    assert isinstance(migrate, PreexecuteDequantPass)
    assert migrate.method == EXPECTED_METHODS[name] and migrate.calibrator is calibrator
    assert (migrate.wbits, migrate.abits) == (8, 8)
    quantize = passes["QuantizePass"]
    assert isinstance(quantize, QuantizePass) and quantize.weight_clip_search
    assert (quantize.defaults.wbits, quantize.defaults.abits) == (8, 8)
    if "SymmetrizePass" in passes:
        symmetrize = passes["SymmetrizePass"]
        assert isinstance(symmetrize, SymmetrizePass) and symmetrize.calibrator is calibrator


@pytest.mark.parametrize("name", MIGRATING)
def test_bit_width_options_reach_migration_and_quantize(name):
    recipe = Recipe.named(name).with_options(wbits=6, abits=6)
    options = {step.name: step.options for step in recipe.steps}
    assert options["preexecute-dequant"]["wbits"] == options["preexecute-dequant"]["abits"] == 6
    assert options["quantize"]["wbits"] == options["quantize"]["abits"] == 6
    passes = {type(p).__name__: p for p in recipe.to_pipeline(None).passes}
    assert (passes["PreexecuteDequantPass"].wbits, passes["PreexecuteDequantPass"].abits) == (6, 6)
    assert (passes["QuantizePass"].defaults.wbits, passes["QuantizePass"].defaults.abits) == (6, 6)


def test_outliertune_preset_routes_outlier_channels_only_below_its_target():
    step = {s.name: s for s in Recipe.named("outliertune").steps}["preexecute-dequant"]
    assert step.options["float_channels"] > 0 and step.options["float_route_below_db"] == 30.0


@pytest.mark.parametrize("name", MIGRATING)
def test_migration_passes_of_a_preset_are_exact(name):
    model = post_ln(np.random.default_rng(1))
    migrating_only = [s.name for s in Recipe.named(name).steps if s.name != "quantize"]
    result = graphquant.optimize(model, name, CALIB, passes=migrating_only, show_progress=False)
    assert not result.report.quantized
    assert ops(result.model) != ops(model)  # the LN was cloned for the MatMul
    assert_same_outputs(model, result.model, HELD_OUT)


@pytest.fixture(scope="module")
def outlier_model() -> ir.Model:
    """LN with planted outlier channels feeding q/k/v projections whose outlier rows are damped."""
    return ln_qkv(np.random.default_rng(2), damped=True)


@pytest.fixture(scope="module")
def w8a8_sqnr(outlier_model) -> dict[int, float]:
    """The plain baseline's SQNR; it fails validation on these outliers (kept to compare with)."""
    return {
        bits: output_sqnr_db(
            outlier_model,
            graphquant.optimize(
                outlier_model, "w8a8", CALIB, wbits=bits, abits=bits, show_progress=False, keep_failed=True
            ).model,
            HELD_OUT,
        )
        for bits in (8, 6)
    }


@pytest.mark.parametrize("name", MIGRATING)
def test_migrating_presets_beat_w8a8_on_held_out_data(name, outlier_model, w8a8_sqnr):
    result = graphquant.optimize(outlier_model, name, CALIB, validation=HELD_OUT, show_progress=False)
    sqnr = output_sqnr_db(outlier_model, result.model, HELD_OUT)
    assert w8a8_sqnr[8] < 20  # the planted outliers hurt per-tensor activations badly...
    assert sqnr >= w8a8_sqnr[8] + 10, (sqnr, w8a8_sqnr[8])  # ...and migration recovers them
    assert sqnr > 30
    assert len(result.report.quantized) == 3
    for comparison in result.report.outputs.values():  # the report's own validation agrees
        assert comparison.sqnr_db > 30


def test_outliertune_pre_executes_the_activation_step(outlier_model):
    result = graphquant.optimize(outlier_model, "outliertune", CALIB, show_progress=False)
    schemes = {layer.node: layer.scheme for layer in result.report.quantized}
    assert all(scheme.endswith("A8 per-channel (step pre-executed into W)") for scheme in schemes.values())
    (scale,) = [node.inputs[1] for node in result.model.graph if node.op_type == "QuantizeLinear"]
    assert scale.const_value.numpy() == np.float32(1.0)


def test_w6a6_outliertune(outlier_model, w8a8_sqnr):
    result = graphquant.optimize(outlier_model, "outliertune", CALIB, wbits=6, abits=6, show_progress=False)
    model = result.model
    codes = [
        node.inputs[0].const_value.numpy()
        for node in model.graph
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None
    ]
    assert len(codes) == 3
    for weight_codes in codes:
        assert weight_codes.dtype == np.int8
        assert weight_codes.min() >= -31 and weight_codes.max() <= 31
        assert np.abs(weight_codes).max() == 31
    for layer in result.report.quantized:  # A6 with step 1: preexecute-dequant got abits=6 too
        assert layer.scheme == "W6 per-channel clip-searched, A6 per-channel (step pre-executed into W)"
    # The activation codes stay on the 6-bit grid on held-out data too (QuantizeLinear alone saturates at int8).
    (dequantize,) = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is None]
    assert dequantize.inputs[0].producer().op_type == "Clip"
    codes = np.concatenate([outputs[-1] for outputs in run_with_output(model, dequantize.inputs[0], HELD_OUT)])
    assert codes.min() >= -31 and codes.max() <= 31
    sqnr = output_sqnr_db(outlier_model, model, HELD_OUT)
    assert w8a8_sqnr[6] < 10
    assert sqnr >= w8a8_sqnr[6] + 10 and sqnr > 25, (sqnr, w8a8_sqnr[6])


def run_with_output(model: ir.Model, value: ir.Value, data) -> list[list[np.ndarray]]:
    """Run the model with ``value`` added as its last output (the model itself is left as it was)."""
    model.graph.outputs.append(value)
    try:
        return [run(model, feed) for feed in data]
    finally:
        model.graph.outputs.pop()


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
def test_six_bit_activation_codes_saturate_on_their_grid(target):
    """Inputs far beyond the calibrated range: the codes stop at ±31 (uint8: 128 ± 31) instead of the int8 limits."""
    model = input_layer(np.random.default_rng(3))
    calib = gaussian_feeds(702)
    result = graphquant.optimize(model, "w8a8", calib, wbits=6, abits=6, target=target, show_progress=False)
    lowered = result.model
    (clip,) = [node for node in lowered.graph if node.op_type == "Clip"]
    assert clip.inputs[0].producer().op_type == "QuantizeLinear"
    loud = [{"x": feed["x"] * 4} for feed in HELD_OUT]
    codes = np.concatenate([outputs[-1] for outputs in run_with_output(lowered, clip.outputs[0], loud)]).astype(int)
    centre = 128 if target == "ort-cpu" else 0
    assert codes.min() == centre - 31 and codes.max() == centre + 31
    unclipped = np.concatenate([outputs[-1] for outputs in run_with_output(lowered, clip.inputs[0], loud)]).astype(int)
    assert np.abs(unclipped - centre).max() > 31  # QuantizeLinear alone would have let them through


def test_cli_wbits_abits_reach_both_passes(tmp_path, outlier_model, capsys):
    model_path = save_model(outlier_model, tmp_path / "model.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([feed["x"] for feed in CALIB]))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    argv = ["optimize", model_path, "-o", str(out), "--calib", str(calib), "--recipe", "outliertune"]
    assert main([*argv, "--wbits", "6", "--abits", "6", "--report", str(report)]) == 0
    assert "recipe outliertune" in capsys.readouterr().out
    layers = json.loads(report.read_text())["layers"]
    assert len(layers) == 3
    for layer in layers:
        assert layer["status"] == "quantized"
        assert layer["scheme"] == "W6 per-channel clip-searched, A6 per-channel (step pre-executed into W)"
        assert "simulated SQNR" in layer["reason"]  # chosen by preexecute-dequant
    written = graphquant.load(out)
    for value in written.graph.initializers.values():
        array = value.const_value.numpy()
        if array.dtype == np.int8 and array.ndim == 2:
            assert np.abs(array).max() <= 31
    assert output_sqnr_db(outlier_model, written, HELD_OUT) > 25


def test_llm_w8a8_tries_per_token_scales_where_static_steps_stay_below_35_db():
    step = {s.name: s for s in Recipe.named("llm-w8a8").steps}["preexecute-dequant"]
    # SmolLM2: 53 of 121 groups (every down_proj among them); at 30 dB none, 15% above FP32 perplexity
    assert step.options["row_scales_below_db"] == 35.0


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
def test_llm_w8a8_with_per_token_scales_on_every_llama_group_stays_close_to_float(tiny_llama, target):
    model = ir.load(tiny_llama)
    calib, held_out = token_feeds(40), token_feeds(41)
    options = {"calibration": calib, "target": target, "show_progress": False}
    dynamic = graphquant.optimize(model, "llm-w8a8", row_scales_below_db=1000.0, float_route_below_db=1000.0, **options)
    static = graphquant.optimize(model, "outliertune", **options)
    groups = migratable_groups(model.graph)
    row_scaled = sum(rewrites.ROW_SCALE_KEY in node.meta for node in dynamic.model.graph)
    assert row_scaled >= sum(len(group.layers) for group in groups) - 1  # every layer (lm_head may be no layer)
    assert output_sqnr_db(model, dynamic.model, held_out) > output_sqnr_db(model, static.model, held_out)
    assert output_sqnr_db(model, dynamic.model, held_out) > 30


def test_a_large_llms_validation_reuses_the_float_outputs_its_calibration_recorded(llama_exports, monkeypatch):
    """The first calibration run records the float model's outputs (lm_head reads the tied embedding through a
    Transpose there, an initializer after fold-constants), so validation runs only the candidate: the same metrics
    and the same model. (The legacy export's attention mask folds through arithmetic: its reference still runs.)"""
    monkeypatch.setattr(runner, "SHARED_MODEL_BYTES", 0)  # unoptimized sessions, as for a large model
    model = ir.load(llama_exports("prefill", "dynamo"))
    options = {"calibration": token_feeds(40), "target": "ort-cpu", "show_progress": False}
    with monkeypatch.context() as patch:
        patch.setattr(CachingCalibrator, "expect_reference", lambda self, model, names: None)
        ran = graphquant.optimize(model, "outliertune", **options)
    monkeypatch.setattr(validate, "recorded_runs", None)  # the reference run would fail
    reused = graphquant.optimize(model, "outliertune", **options)
    assert ir.to_proto(reused.model).SerializeToString() == ir.to_proto(ran.model).SerializeToString()
    for got, expected in (
        (reused.report.outputs, ran.report.outputs),
        (reused.report.layer_metrics, ran.report.layer_metrics),
    ):
        assert {name: c.as_dict() for name, c in got.items()} == {name: c.as_dict() for name, c in expected.items()}
    assert len(reused.report.layer_metrics) == len(reused.report.quantized) > 0
