"""PreexecuteDequantPass: exact X/d, diag(d)·W migrations for each method, float routing, and quantize's step 1."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import (
    OUTLIER_CHANNELS,
    activation_outputs,
    assert_same_outputs,
    by_name,
    gaussian_feeds,
    initializer,
    input_layer,
    ln_gemms,
    ln_qkv,
    mlp,
    ops,
    outlier_feeds,
    post_ln,
    qkv,
    relu_only,
    run,
    sqnr_db,
    token_feeds,
)

from graphquant import rewrites
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.simulate import GroupSimulator
from graphquant.analysis.stats_cache import CachingCalibrator
from graphquant.lowering import TARGETS
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes import preexecute_dequant
from graphquant.passes.preexecute_dequant import MIGRATED_KEY, PreexecuteDequantPass
from graphquant.passes.quantize import QuantizePass
from graphquant.passes.symmetrize import SHIFT_KEY, SymmetrizePass
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, KEEP_FLOAT_KEY, PREEXECUTED_KEY, SCHEME_NOTE_KEY
from graphquant.rewrites import AFFINE_BRANCH_KEY

CALIB = gaussian_feeds(seed=200)
HELD_OUT = gaussian_feeds(seed=201, batches=2)

METHODS = {
    "outliertune": {"method": "outliertune"},
    "smoothquant": {"method": "smoothquant"},
    "smoothquant-alpha-search": {"method": "smoothquant", "alpha_search": True},
    "os-plus": {"method": "os-plus"},
}

# name -> (builder, calibration feeds, held-out feeds)
GRAPHS = {
    "ln-qkv": (ln_qkv, CALIB, HELD_OUT),
    "post-ln-residual": (post_ln, CALIB, HELD_OUT),
    "gemm-trans-b": (ln_gemms, CALIB, HELD_OUT),
    "graph-input": (input_layer, outlier_feeds(202), outlier_feeds(203, batches=2)),
    "activation-outputs": (activation_outputs, CALIB, HELD_OUT),
}


def calibrator(model: ir.Model, data=CALIB) -> Calibrator:
    return Calibrator.for_model(model, data, show_progress=False)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_migration_alone_is_exact(graph, method):
    build_graph, calib, held_out = GRAPHS[graph]
    model = build_graph(np.random.default_rng(10))
    reference = model.clone()
    result = PreexecuteDequantPass(calibrator(model, calib), **METHODS[method])(model)
    assert result.modified  # every graph has channels worth migrating
    layers = [node for node in model.graph if SCHEME_NOTE_KEY in node.meta]
    assert layers and all("simulated SQNR" in node.meta[SCHEME_NOTE_KEY] for node in layers)
    assert_same_outputs(reference, model, held_out)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_symmetrize_then_migration_is_exact(graph, method):
    build_graph, calib, held_out = GRAPHS[graph]
    model = build_graph(np.random.default_rng(11))
    reference = model.clone()
    shared = calibrator(model, calib)
    assert SymmetrizePass(shared)(model).modified
    assert PreexecuteDequantPass(shared, **METHODS[method])(model).modified
    assert_same_outputs(reference, model, held_out)
    # No activation carries more than one Mul and one Add: the second affine composes into the first.
    for node in model.graph:
        producer = node.inputs[0].producer() if AFFINE_BRANCH_KEY in node.meta else None
        if producer is not None and AFFINE_BRANCH_KEY in producer.meta:
            assert (producer.op_type, node.op_type) == ("Mul", "Add")


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_after_symmetrize_the_search_runs_on_derived_statistics_and_chooses_as_a_fresh_calibration(graph):
    build_graph, calib, _ = GRAPHS[graph]
    derived = build_graph(np.random.default_rng(15))
    caching = CachingCalibrator.for_model(derived, calib, show_progress=False)
    SymmetrizePass(caching)(derived)
    fresh = derived.clone()
    PreexecuteDequantPass(caching)(derived)
    assert caching.runs == 1  # symmetrize's calibration only
    PreexecuteDequantPass(calibrator(fresh, calib))(fresh)
    notes = [{node.name: node.meta.get(SCHEME_NOTE_KEY) for node in model.graph} for model in (derived, fresh)]
    assert notes[0] == notes[1] and any(notes[0].values())


@pytest.mark.parametrize("row_scales_below_db", [None, 100.0])
def test_the_statistics_it_derives_for_quantize_match_a_fresh_calibration(row_scales_below_db):
    model = ln_qkv(np.random.default_rng(16))
    feeds = outlier_feeds(17)
    caching = CachingCalibrator.for_model(model, feeds, show_progress=False)
    SymmetrizePass(caching)(model)
    PreexecuteDequantPass(caching, row_scales_below_db=row_scales_below_db)(model)
    names = sorted({node.inputs[0].name for node in model.graph if node.op_type == "MatMul"})
    derived = caching.collect(model, names)
    assert caching.runs == 1
    fresh = calibrator(model, feeds).collect(model, names)
    for name in names:
        np.testing.assert_allclose(derived[name].channel_max, fresh[name].channel_max, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(derived[name].channel_min, fresh[name].channel_min, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            derived[name].channel_mean_square(), fresh[name].channel_mean_square(), rtol=1e-4, atol=1e-9
        )
    per_row = [node for node in model.graph if node.op_type == "Div"]
    assert bool(per_row) == (row_scales_below_db is not None)


@pytest.mark.parametrize("method", list(METHODS))
def test_exclusive_layer_norm_takes_the_divisor_in_gamma_and_beta(method):
    model = ln_qkv(np.random.default_rng(12))
    reference = model.clone()
    gamma, beta = initializer(model, "ln_gamma"), initializer(model, "ln_beta")
    weights = {name: initializer(model, name) for name in ("wq", "wk", "wv")}
    before = ops(model)
    assert PreexecuteDequantPass(calibrator(model), **METHODS[method])(model).modified
    assert ops(model) == before  # folded: no Mul, no Add
    ln = by_name(model)["ln"]
    assert ln.outputs[0].meta[MIGRATED_KEY]
    new_gamma = ln.inputs[1].const_value.numpy()
    divisor = gamma / new_gamma
    np.testing.assert_allclose(ln.inputs[2].const_value.numpy(), beta / divisor, rtol=1e-5)
    assert divisor[list(OUTLIER_CHANNELS)].min() > divisor.max() / 10  # the outlier channels are divided most
    nodes = by_name(model)
    for layer, weight_name in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv")):
        new_weight = nodes[layer].inputs[1].const_value.numpy()
        np.testing.assert_allclose(new_weight, weights[weight_name] * divisor[:, None], rtol=1e-5, atol=1e-7)
        assert weight_name not in model.graph.initializers  # the replaced weight is gone
    assert_same_outputs(reference, model, HELD_OUT)


def test_graph_input_gets_a_mul_branch():
    model = input_layer(np.random.default_rng(13))
    reference = model.clone()
    w = initializer(model, "w")
    assert PreexecuteDequantPass(calibrator(model, outlier_feeds(204)), method="os-plus")(model).modified
    (branch,) = [node for node in model.graph if AFFINE_BRANCH_KEY in node.meta]
    assert branch.op_type == "Mul" and branch.inputs[0].name == "x"
    scale = branch.inputs[1].const_value.numpy()
    assert np.all(scale[:3] < 1) and np.all(scale[3:] == 1)  # OS+ only scales channels above its threshold down
    fc = by_name(model)["fc"]
    assert fc.inputs[0] is branch.outputs[0]
    np.testing.assert_allclose(fc.inputs[1].const_value.numpy(), w / scale[:, None], rtol=1e-5)
    assert_same_outputs(reference, model, outlier_feeds(205, batches=2))


def test_symmetrize_then_migration_on_a_graph_input_composes_into_one_mul_and_one_add():
    model = input_layer(np.random.default_rng(14))
    reference = model.clone()
    shared = calibrator(model, outlier_feeds(206))
    SymmetrizePass(shared)(model)
    PreexecuteDequantPass(shared, method="smoothquant")(model)
    branch = [node for node in model.graph if AFFINE_BRANCH_KEY in node.meta]
    assert [node.op_type for node in branch] == ["Mul", "Add"]
    assert branch[0].inputs[0].name == "x" and branch[1].inputs[0] is branch[0].outputs[0]
    assert branch[1].outputs[0].meta[MIGRATED_KEY]
    assert_same_outputs(reference, model, outlier_feeds(207, batches=2))


@pytest.mark.parametrize("method", ["outliertune", "smoothquant", "os-plus"])
def test_forced_float_routing_adds_a_gather_and_a_float_matmul_per_layer(method):
    model = ln_qkv(np.random.default_rng(15))
    reference = model.clone()
    originals = {name: initializer(model, name) for name in ("wq", "wk", "wv")}
    routed = PreexecuteDequantPass(
        calibrator(model), method=method, float_channels=2, float_route_below_db=1000, max_float_fraction=0.5
    )
    assert routed(model).modified
    assert ops(model).count("Gather") == 1
    assert ops(model).count("MatMul") == 6  # three integer-path layers, three float-path MatMuls
    (gather,) = [node for node in model.graph if node.op_type == "Gather"]
    channels = gather.inputs[1].const_value.numpy()
    np.testing.assert_array_equal(channels, OUTLIER_CHANNELS)
    nodes = by_name(model)
    assert gather.inputs[0] is nodes["ln"].outputs[0]  # the float path reads the original LN output
    for layer, weight_name in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv")):
        int_weight = nodes[layer].inputs[1].const_value.numpy()
        np.testing.assert_array_equal(int_weight[channels], 0.0)  # routed rows are zero on the int path
        assert np.all(np.abs(int_weight[np.setdiff1d(np.arange(16), channels)]).max(axis=1) > 0)
        (float_matmul,) = [n for n in gather.outputs[0].consumers() if n.inputs[1].name.startswith(weight_name)]
        np.testing.assert_array_equal(float_matmul.inputs[1].const_value.numpy(), originals[weight_name][channels])
        assert "outlier channels in float" in nodes[layer].meta[SCHEME_NOTE_KEY]
    # The int path reads a copy of the LN whose routed channels are exactly zero.
    clone = nodes["q_proj"].inputs[0].producer()
    assert clone.op_type == "LayerNormalization" and clone is not nodes["ln"]
    np.testing.assert_array_equal(clone.inputs[1].const_value.numpy()[channels], 0.0)
    np.testing.assert_array_equal(clone.inputs[2].const_value.numpy()[channels], 0.0)
    assert [value.name for value in model.graph.outputs] == ["q", "k", "v"]
    assert_same_outputs(reference, model, HELD_OUT)


def test_quantize_keeps_the_float_path_float():
    model = ln_qkv(np.random.default_rng(15))
    reference = model.clone()
    shared = calibrator(model)
    PreexecuteDequantPass(shared, float_channels=2, float_route_below_db=1000, max_float_fraction=0.5)(model)
    float_paths = [
        node for node in model.graph if node.op_type == "MatMul" and node.inputs[0].producer().op_type == "Gather"
    ]
    assert len(float_paths) == 3
    QuantizePass(shared)(model)
    for node in float_paths:
        decision = node.meta[DECISION_KEY]
        assert decision.status == "float" and decision.reason.startswith("float path of 2 outlier channels")
        assert INPUT_SPECS_KEY not in node.meta
    nodes = by_name(model)
    assert all(nodes[name].meta[DECISION_KEY].status == "quantized" for name in ("q_proj", "k_proj", "v_proj"))
    QdqLoweringPass()(model)
    assert all(node.inputs[1].producer() is None for node in float_paths)  # float weights, no DequantizeLinear
    for feed in HELD_OUT:
        for expected, got in zip(run(reference, feed), run(model, feed)):
            assert np.linalg.norm(expected - got) < 0.02 * np.linalg.norm(expected)


def test_forced_float_routing_after_symmetrize_is_exact():
    model = post_ln(np.random.default_rng(16))
    reference = model.clone()
    shared = calibrator(model)
    SymmetrizePass(shared)(model)
    PreexecuteDequantPass(shared, float_channels=2, float_route_below_db=1000, max_float_fraction=0.5)(model)
    assert ops(model).count("Gather") == 1
    assert_same_outputs(reference, model, HELD_OUT)


def test_no_routing_when_the_integer_scheme_meets_the_target():
    model = ln_qkv(np.random.default_rng(17))
    PreexecuteDequantPass(calibrator(model), float_channels=2, float_route_below_db=0.0, max_float_fraction=0.5)(model)
    assert "Gather" not in ops(model)
    assert ops(model).count("MatMul") == 3


def test_preexecuted_activation_is_quantized_with_step_exactly_one():
    model = ln_qkv(np.random.default_rng(18), damped=True)
    reference = model.clone()
    shared = calibrator(model)
    SymmetrizePass(shared)(model)
    PreexecuteDequantPass(shared, method="outliertune")(model)
    nodes = by_name(model)
    h = nodes["q_proj"].inputs[0]
    assert h.meta[PREEXECUTED_KEY] == 8  # damped outlier rows make the per-channel step the best choice
    assert "step pre-executed" in nodes["q_proj"].meta[SCHEME_NOTE_KEY]
    # Divided by its per-channel steps, the LN output spans ±127/ratio on the calibration data: step 1 is its grid.
    ratio = float(nodes["q_proj"].meta[SCHEME_NOTE_KEY].split("clipped at ")[1].split("x")[0])
    probe = model_with_output(model, h.name)
    h_values = np.concatenate([run(probe, feed)[-1] for feed in CALIB])
    np.testing.assert_allclose(np.abs(h_values).max(), 127.0 / ratio, rtol=1e-4)

    QuantizePass(shared, weight_clip_search=True)(model)
    for layer in ("q_proj", "k_proj", "v_proj"):
        spec = nodes[layer].meta[INPUT_SPECS_KEY][0]
        assert spec.scale.shape == () and spec.scale == np.float32(1.0)
        assert (spec.bits, spec.signed, spec.axis) == (8, True, None)
        assert spec.zero_point == 0
        assert nodes[layer].meta[DECISION_KEY].scheme.endswith("A8 per-channel (step pre-executed into W)")
    QdqLoweringPass()(model)
    for feed in HELD_OUT:
        for expected, got in zip(run(reference, feed), run(model, feed)):
            assert np.linalg.norm(expected - got) < 0.05 * np.linalg.norm(expected)  # quantized, but close


def test_preexecuted_step_one_at_six_bits():
    model = ln_qkv(np.random.default_rng(18), damped=True)
    shared = calibrator(model)
    PreexecuteDequantPass(shared, method="outliertune", abits=6, wbits=6)(model)
    h = by_name(model)["q_proj"].inputs[0]
    assert h.meta[PREEXECUTED_KEY] == 6
    QuantizePass(shared, wbits=6, abits=6)(model)
    spec = by_name(model)["q_proj"].meta[INPUT_SPECS_KEY][0]
    assert spec.scale == np.float32(1.0) and (spec.bits, spec.qmin, spec.qmax) == (6, -31, 31)


def model_with_output(model: ir.Model, name: str) -> ir.Model:
    """A copy of the model that also outputs the named value (last)."""
    copy = model.clone()
    value = next(v for node in copy.graph for v in node.outputs if v.name == name)
    copy.graph.outputs.append(value)
    return copy


def test_min_sqnr_keeps_the_group_float():
    model = ln_qkv(np.random.default_rng(19))
    reference = model.clone()
    shared = calibrator(model)
    assert not PreexecuteDequantPass(shared, min_sqnr_db=500.0)(model).modified
    nodes = by_name(model)
    assert all("below 500 dB" in nodes[name].meta[KEEP_FLOAT_KEY] for name in ("q_proj", "k_proj", "v_proj"))
    QuantizePass(shared)(model)
    assert all(nodes[name].meta[DECISION_KEY].status == "float" for name in ("q_proj", "k_proj", "v_proj"))
    QdqLoweringPass()(model)
    assert_same_outputs(reference, model, HELD_OUT)


def test_no_matmul_means_not_modified():
    model = relu_only()
    assert not PreexecuteDequantPass(calibrator(model, [{"x": np.ones((2, 4), np.float32)}]))(model).modified
    assert ops(model) == ["Relu"]


def test_running_twice_changes_nothing_the_second_time():
    model = post_ln(np.random.default_rng(20))
    reference = model.clone()
    assert PreexecuteDequantPass(calibrator(model))(model).modified
    before = ops(model)
    assert not PreexecuteDequantPass(calibrator(model))(model).modified  # MIGRATED_KEY marks the group as done
    assert ops(model) == before
    assert_same_outputs(reference, model, HELD_OUT)


def test_shift_key_survives_migration():
    model = ln_qkv(np.random.default_rng(21))
    shared = calibrator(model)
    SymmetrizePass(shared)(model)
    PreexecuteDequantPass(shared)(model)
    h = by_name(model)["ln"].outputs[0]
    assert SHIFT_KEY in h.meta and h.meta[MIGRATED_KEY]
    assert not SymmetrizePass(shared)(model).modified


def test_bad_method_and_missing_calibration_are_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        PreexecuteDequantPass(None, method="awq")
    with pytest.raises(ir.passes.PreconditionError, match="calibration"):
        PreexecuteDequantPass(None)(relu_only())


def test_outliertune_migrations_on_a_llama_are_exact_and_add_no_mul_outside_attention(tiny_llama):
    model = ir.load(tiny_llama)
    reference = model.clone()
    calibrator = Calibrator.for_model(model, token_feeds(10), show_progress=False)
    SymmetrizePass(calibrator)(model)
    result = PreexecuteDequantPass(calibrator, float_channels=0)(model)
    assert result.modified
    notes = [node.meta[SCHEME_NOTE_KEY] for node in model.graph if SCHEME_NOTE_KEY in node.meta]
    assert any("no migration" not in note for note in notes)
    # RMSNorm weights and up_proj's columns take the divisors; only o_proj's input (the attention output, reshaped)
    # needs a Mul at run time.
    branch_muls = [node for node in model.graph if node.op_type == "Mul" and AFFINE_BRANCH_KEY in node.meta]
    assert all(node.inputs[0].producer().op_type == "Reshape" for node in branch_muls)
    assert_same_outputs(reference, model, token_feeds(11))


def test_a_group_whose_sampled_rows_are_all_nan_or_inf_is_left_per_tensor():
    rng = np.random.default_rng(7)
    model = mlp(rng)
    w1 = initializer(model, "w1").copy()
    w1[:, 3] = np.inf  # fc1's output channel 3, and so every row fc2 reads, holds Inf
    model.graph.initializers["w1"].const_value = ir.Tensor(w1, name="w1")
    feeds = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(2)]
    result = PreexecuteDequantPass(calibrator(model, feeds), method="outliertune")(model)
    assert not result.modified  # per-tensor (no migration) is the only scheme the empty sample can score


def massive_token_feeds(seed: int, batches: int = 3, rows: int = 64) -> list[dict[str, np.ndarray]]:
    """Gaussian rows for ``x`` whose first row, like an attention sink's, is 500x larger in every channel."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(batches):
        x = rng.standard_normal((rows, 8)).astype(np.float32)
        x[0] *= 500
        feeds.append({"x": x})
    return feeds


def quantized_sqnr_db(model: ir.Model, reference: ir.Model, target: str, **options) -> float:
    """Output SQNR against float on held-out massive-token rows after outliertune's passes and a target's lowering."""
    shared = calibrator(model, massive_token_feeds(30))
    PreexecuteDequantPass(shared, **options)(model)
    QuantizePass(shared)(model)
    for lowering in TARGETS[target]:
        lowering()(model)
    # q, k and v on the ordinary rows: the sink row's own error is small next to its size under either scheme.
    pairs = [(run(reference, feed)[:3], run(model, feed)[:3]) for feed in massive_token_feeds(31)]
    expected = np.concatenate([out[1:].ravel() for want, _ in pairs for out in want])
    got = np.concatenate([out[1:].ravel() for _, have in pairs for out in have])
    return sqnr_db(expected, got)


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
def test_per_token_scales_win_where_one_token_dwarfs_the_rest(target):
    rng = np.random.default_rng(32)
    model = qkv(rng)
    reference = model.clone()
    static = quantized_sqnr_db(model.clone(), reference, target)
    dynamic_model = model.clone()
    dynamic = quantized_sqnr_db(dynamic_model, reference, target, row_scales_below_db=60.0)
    nodes = by_name(dynamic_model)
    notes = {nodes[name].meta[DECISION_KEY].reason for name in ("q_proj", "k_proj", "v_proj")}
    assert len(notes) == 1 and next(iter(notes)).startswith("per-token dynamic")
    assert sum(rewrites.ROW_SCALE_KEY in node.meta for node in dynamic_model.graph) == 3
    # The sink row sets a static step 500x too wide for the other rows; per-token steps quantize each row on its own.
    assert dynamic > static + 20, (dynamic, static)
    assert dynamic > 35


def test_groups_that_meet_the_row_scale_target_stay_static():
    model = qkv(np.random.default_rng(33))
    PreexecuteDequantPass(calibrator(model, gaussian_feeds(seed=34, features=8)), row_scales_below_db=0.0)(model)
    assert not any(rewrites.ROW_SCALE_KEY in node.meta for node in model.graph)


def test_a_gemm_with_a_bias_input_keeps_static_steps_and_its_outputs():
    model = ln_gemms(np.random.default_rng(35))
    reference = model.clone()
    assert PreexecuteDequantPass(calibrator(model), row_scales_below_db=float("inf"))(model).modified
    # Gemm adds C inside the op, where a per-row factor on its output would scale it too.
    assert not any(rewrites.ROW_SCALE_KEY in node.meta for node in model.graph)
    assert_same_outputs(reference, model, HELD_OUT)


def scheme_notes(model: ir.Model) -> dict[str, str]:
    """Each annotated layer's scheme note (the chosen candidate and its SQNR)."""
    return {node.name or "": node.meta[SCHEME_NOTE_KEY] for node in model.graph if SCHEME_NOTE_KEY in node.meta}


@pytest.mark.parametrize(
    "options", [{}, {"row_scales_below_db": 100.0, "float_channels": 2, "max_float_fraction": 0.5}]
)
def test_the_screened_search_chooses_what_scoring_every_candidate_on_every_row_chooses(monkeypatch, options):
    model = ln_qkv(np.random.default_rng(36))
    feeds = outlier_feeds(37)
    screened = model.clone()
    PreexecuteDequantPass(calibrator(screened, feeds), **options)(screened)
    monkeypatch.setattr(preexecute_dequant, "SCREEN_KEPT", 10**9)
    PreexecuteDequantPass(calibrator(model, feeds), **options)(model)
    assert scheme_notes(screened) == scheme_notes(model) and len(scheme_notes(model)) == 3


def test_only_the_screen_survivors_are_scored_on_every_sampled_row(monkeypatch):
    model = ln_qkv(np.random.default_rng(38))
    rows_scored: list[int] = []
    original = GroupSimulator.sqnr_db

    def counting(self, *args, **kwargs):
        rows_scored.append(len(self.rows))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GroupSimulator, "sqnr_db", counting)
    PreexecuteDequantPass(calibrator(model, outlier_feeds(39)), float_route_below_db=0.0)(model)
    full = max(rows_scored)
    # outliertune's nine static candidates, each on every SCREEN_STRIDE-th row; then the best three on all of them.
    assert rows_scored.count(full) == preexecute_dequant.SCREEN_KEPT == 3
    assert sorted(set(rows_scored)) == [-(-full // preexecute_dequant.SCREEN_STRIDE), full]
    assert len(rows_scored) == 9 + 3


def test_an_asymmetric_grid_is_scored_as_quantize_lowers_it():
    lopsided = [{"x": np.abs(feed["x"]) * 3 - 0.3} for feed in gaussian_feeds(seed=40, features=8)]
    held_out = [{"x": np.abs(feed["x"]) * 3 - 0.3} for feed in gaussian_feeds(seed=41, batches=2, features=8)]
    reference = qkv(np.random.default_rng(39))
    notes, measured = [], []
    for symmetric in (True, False):
        model = reference.clone()
        PreexecuteDequantPass(calibrator(model, lopsided), method="os-plus", activation_symmetric=symmetric)(model)
        notes.append(float(by_name(model)["q_proj"].meta[SCHEME_NOTE_KEY].split("SQNR ")[1].split(" dB")[0]))
        QuantizePass(calibrator(model, lopsided), activation_symmetric=symmetric)(model)
        QdqLoweringPass()(model)
        measured.append(sqnr_db(run(reference, held_out[0])[0], run(model, held_out[0])[0]))
    assert notes[1] > notes[0] + 2  # [-0.3, max] on 255 steps against ±max on 254
    assert measured[1] > measured[0] + 1  # on held-out data, q only


def test_float_routes_only_where_per_token_scales_stay_below_the_route_target():
    feeds = massive_token_feeds(42)
    options = {"row_scales_below_db": 60.0, "float_channels": 2, "max_float_fraction": 0.5}
    probe = qkv(np.random.default_rng(41))
    PreexecuteDequantPass(calibrator(probe, feeds), **options, float_route_below_db=0.0)(probe)
    note = by_name(probe)["q_proj"].meta[SCHEME_NOTE_KEY]
    assert note.startswith("per-token dynamic") and "in float" not in note
    per_token = float(note.split("SQNR ")[1].split(" dB")[0])
    static = float(note.split("best static ")[1].split(" dB")[0])
    assert per_token > static + 10, note
    for target, routed in ((static + 1.0, False), (per_token + 1.0, True)):  # static alone would be routed at both
        model = qkv(np.random.default_rng(41))
        PreexecuteDequantPass(calibrator(model, feeds), **options, float_route_below_db=target)(model)
        assert ("Gather" in ops(model)) is routed, (target, scheme_notes(model))
        assert sum(rewrites.ROW_SCALE_KEY in node.meta for node in model.graph) == 3
