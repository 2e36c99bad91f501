"""OcsPass: outlier channel splitting, exact in fp32, plain halving and the quantization-aware (grid) split."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import (
    assert_same_outputs,
    build,
    gaussian_feeds,
    initializer,
    input_layer,
    ln_qkv,
    mlp,
    named_mlp,
    ops,
    qkv,
    relu_only,
    save_model,
    weights,
)

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.cost import per_channel_rtn, split_costs
from graphquant.cli import main
from graphquant.passes import OcsPass, QuantizePass
from graphquant.passes.ocs import OCS_KEY, fold_duplicates, grid_aware_split, grid_aware_step, halving_plan
from graphquant.quant_spec import INPUT_SPECS_KEY

CONV = """
<ir_version: 8, opset_import: ["" : 17]>
conv (float[N, 8, 6, 6] x) => (float[N, 4, 6, 6] y) {
  [conv] y = Conv<pads: ints = [1, 1, 1, 1]>(x, w, b)
}
"""

GEMM_TRANS_B = """
<ir_version: 8, opset_import: ["" : 17]>
gemm (float[N, 16] x) => (float[N, 8] y) {
  [fc] y = Gemm<transB: int = 1>(x, w, c)
}
"""

HELD_OUT = gaussian_feeds(seed=501, batches=2)
EVERYTHING = 10.0


def conv(rng: np.random.Generator) -> ir.Model:
    """One 3x3 Conv with a bias, 8 -> 4 channels."""
    return build(CONV, {"w": weights(rng, 4, 8, 3, 3), "b": weights(rng, 4)})


def gemm_trans_b(rng: np.random.Generator) -> ir.Model:
    """One Gemm(transB) with a 1-D C."""
    return build(GEMM_TRANS_B, {"w": weights(rng, 8, 16), "c": weights(rng, 8)})


def conv_feeds(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 8, 6, 6)).astype(np.float32)} for _ in range(2)]


@pytest.mark.parametrize("grid_aware", [False, True], ids=["halving", "grid-aware"])
@pytest.mark.parametrize(
    ("build_model", "data", "groups"),
    [
        (input_layer, HELD_OUT, 1),
        (gemm_trans_b, HELD_OUT, 1),
        (mlp, HELD_OUT, 2),
        (qkv, gaussian_feeds(seed=502, batches=2, features=8), 1),
        (conv, conv_feeds(503), 1),
    ],
    ids=["matmul", "gemm-transB", "matmul-add-and-gemm", "shared-input", "conv"],
)
def test_ocs_is_exact(build_model, data, groups, grid_aware):
    model = build_model(np.random.default_rng(0))
    reference = model.clone()
    assert OcsPass(expand_ratio=0.25, grid_aware=grid_aware, wbits=4, max_overhead=EVERYTHING)(model).modified
    assert ops(model).count("Concat") == groups  # one expanded activation per group, shared by its layers
    assert_same_outputs(reference, model, data)


def test_duplicated_channels_are_the_largest_rows_and_both_copies_are_halved():
    model = input_layer(np.random.default_rng(1))
    weight = initializer(model, "w").copy()
    weight[5] *= 10  # one dominant input channel
    model.graph.initializers["w"].const_value = ir.tensor(weight, name="w")
    OcsPass(expand_ratio=1 / 16, max_overhead=EVERYTHING)(model)
    gather = next(node for node in model.graph if node.op_type == "Gather")
    np.testing.assert_array_equal(gather.inputs[1].const_value.numpy(), [5])
    matmul = next(node for node in model.graph if node.op_type == "MatMul")
    expanded = matmul.inputs[1].const_value.numpy()
    assert expanded.shape == (17, 8)
    np.testing.assert_array_equal(expanded[5], weight[5] / 2)
    np.testing.assert_array_equal(expanded[16], weight[5] / 2)
    assert OCS_KEY in matmul.inputs[0].meta


def test_halving_repeats_on_a_row_that_stays_the_largest():
    sources, factors = halving_plan(np.array([1.0, 8.0, 2.0]), 3)
    # 8 -> 4 + 4, then the first 4 -> 2 + 2, then the other 4 -> 2 + 2: channel 1 ends as four quarters
    np.testing.assert_array_equal(sources, [0, 1, 2, 1, 1, 1])
    np.testing.assert_array_equal(factors, [1, 0.25, 1, 0.25, 0.25, 0.25])


def test_grid_aware_halves_sum_exactly_and_land_on_the_step_quantize_uses():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((32, 6))
    weight[[3, 9]] *= 6
    duplicates = np.array([3, 9])
    for bits in (3, 4, 8):
        expanded = grid_aware_split(weight, duplicates, bits)
        np.testing.assert_allclose(fold_duplicates(expanded, duplicates), weight, rtol=0, atol=1e-12)
        qmax = 2 ** (bits - 1) - 1
        step = np.abs(expanded).max(axis=0) / qmax
        plain_halves = np.concatenate([weight, weight[duplicates] / 2])
        plain_halves[duplicates] /= 2
        grid_error = np.abs(fold_duplicates(per_channel_rtn(expanded, bits), duplicates) - weight)
        plain_error = np.abs(fold_duplicates(per_channel_rtn(plain_halves, bits), duplicates) - weight)
        assert np.all(step > 0)
        assert grid_error[duplicates].mean() < plain_error[duplicates].mean()


def test_quantize_uses_the_grid_aware_step():
    model = input_layer(np.random.default_rng(3))
    weight = initializer(model, "w")
    calibration = gaussian_feeds(seed=503)
    OcsPass(expand_ratio=0.125, grid_aware=True, wbits=4, max_overhead=EVERYTHING)(model)
    QuantizePass(Calibrator.for_model(model, calibration, show_progress=False), wbits=4, abits=8)(model)
    matmul = next(node for node in model.graph if node.op_type == "MatMul")
    duplicates = next(node for node in model.graph if node.op_type == "Gather").inputs[1].const_value.numpy()
    np.testing.assert_array_equal(duplicates, np.sort(np.argsort(-np.abs(weight).max(axis=1))[:2]))
    spec = matmul.meta[INPUT_SPECS_KEY][1]
    np.testing.assert_allclose(spec.scale, grid_aware_step(weight, duplicates, 4), rtol=1e-6)


def test_ocs_composes_with_outliertune_passes():
    model = ln_qkv(np.random.default_rng(4), damped=True)
    calibration = gaussian_feeds(seed=504)
    recipe = graphquant.Recipe.named("outliertune").with_passes(["symmetrize", "preexecute-dequant", "ocs", "quantize"])
    result = graphquant.optimize(
        model,
        recipe.with_options(max_overhead=EVERYTHING),
        calibration=calibration,
        validation=HELD_OUT,
        show_progress=False,
    )
    assert "Concat" in ops(result.model)
    assert len(result.report.quantized) == 3
    assert min(c.sqnr_db for c in result.report.outputs.values()) > 25
    assert {cost.pass_name for cost in result.report.split_costs} == {"ocs"}


def test_preexecuted_steps_follow_the_duplicated_channels():
    model = ln_qkv(np.random.default_rng(5), damped=True)
    shared = Calibrator.for_model(model, gaussian_feeds(seed=505), show_progress=False)
    reference = model.clone()
    for name in ("symmetrize", "preexecute-dequant"):
        graphquant.passes.PASSES[name](shared)(model)
    OcsPass(shared, max_overhead=EVERYTHING)(model)
    assert_same_outputs(reference, model, HELD_OUT)
    QuantizePass(shared, wbits=8, abits=8)(model)
    specs = [node.meta[INPUT_SPECS_KEY][0] for node in model.graph if INPUT_SPECS_KEY in node.meta]
    assert specs and all(float(spec.scale) == 1.0 for spec in specs)


def test_budget_drops_the_group_with_least_gain_per_added_mac():
    model = named_mlp(np.random.default_rng(6))
    every = model.clone()
    OcsPass(expand_ratio=0.25, max_overhead=EVERYTHING)(every)
    costs = {cost.layer: cost for cost in split_costs(every)}
    assert {name: cost.added_macs for name, cost in costs.items()} == {"fc1": 4 * 8, "fc2": 2 * 4}
    worst = min(costs, key=lambda name: costs[name].gain_db / costs[name].added_macs)
    best = next(name for name in costs if name != worst)
    total = sum(cost.layer_macs for cost in costs.values())
    OcsPass(expand_ratio=0.25, max_overhead=costs[best].added_macs / total)(model)
    assert [cost.layer for cost in split_costs(model)] == [best]


def test_no_layer_is_not_modified_and_an_expanded_input_is_not_expanded_again():
    assert not OcsPass(max_overhead=EVERYTHING)(relu_only()).modified
    model = input_layer(np.random.default_rng(7))
    OcsPass(max_overhead=EVERYTHING)(model)
    before = ops(model)
    assert not OcsPass(max_overhead=EVERYTHING)(model).modified
    assert ops(model) == before
    with pytest.raises(ValueError):
        OcsPass(expand_ratio=0)


def test_cli_passes_list_with_ocs_and_max_overhead(tmp_path, capsys):
    model_path, out, calib = tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    save_model(ln_qkv(np.random.default_rng(8), damped=True), model_path)
    np.savez(calib, x=np.random.default_rng(9).standard_normal((64, 16)).astype(np.float32))
    arguments = ["optimize", str(model_path), "-o", str(out), "--calib", str(calib), "--recipe", "outliertune"]
    passes = ["--passes", "symmetrize,preexecute-dequant,ocs,quantize"]
    assert main([*arguments, *passes, "--max-overhead", "0.5"]) == 0
    stdout = capsys.readouterr().out
    assert "splitting: +" in stdout and "ocs" in stdout
    assert "Concat" in ops(graphquant.load(out))
    assert main([*arguments, *passes, "--max-overhead", "0"]) == 0  # no budget: nothing is split
    assert "Concat" not in ops(graphquant.load(out))
