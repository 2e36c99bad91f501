"""FlexRound against RTN with clip search and GPTQ: in numpy on the Gram, and through QuantizePass in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
from builders import build, run, save_model

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.flexround import FlexRoundSettings, damped, flexround_round
from graphquant.analysis.gptq import gptq_round
from graphquant.analysis.weight_fit import fit_ranges, round_trip
from graphquant.cli import main
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import QuantizePass

F32 = np.float32

TWO_LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
two (float[N, 64] x) => (float[N, 32] y, float[N, 16] z) {
  [fc1] y = MatMul(x, w1)
  [fc2] z = Gemm<transB: int = 1>(x, w2)
}
"""


def correlated_inputs(rng: np.random.Generator, rows: int, channels: int) -> np.ndarray:
    """Activations with correlated channels of unequal energy."""
    mixing = rng.standard_normal((channels, channels)) * 0.3 + np.eye(channels)
    scales = rng.lognormal(0.0, 0.5, channels)
    return (rng.standard_normal((rows, channels)) @ mixing) * scales


def gram_loss(gram: np.ndarray, weight: np.ndarray, rounded: np.ndarray) -> float:
    """tr(Dᵀ H D) on the damped Gram FlexRound minimizes."""
    error = weight - rounded
    return float(np.sum(error * (damped(gram) @ error)))


def rtn_clip(weight: np.ndarray, gram: np.ndarray, bits: int, symmetric: bool, block: int) -> np.ndarray:
    """RTN on the clip-searched grids weighted by the Gram's diagonal (FlexRound's starting point)."""
    low, high = fit_ranges(weight, np.diag(gram)[:, None], bits, symmetric, block, clip_search=True)
    rows = weight.shape[0]
    return round_trip(weight, np.repeat(low, block, 0)[:rows], np.repeat(high, block, 0)[:rows], bits, symmetric)


@pytest.mark.parametrize(("bits", "symmetric", "block"), [(4, False, 64), (3, True, 64), (3, False, 16)])
def test_flexround_lowers_the_gram_loss_below_rtn_and_stays_on_its_grids(bits, symmetric, block):
    rng = np.random.default_rng(0)
    x = correlated_inputs(rng, 512, 64)
    gram, weight = x.T @ x, rng.standard_normal((64, 24))
    rounded, lows, highs = flexround_round(weight, gram, bits, symmetric, block, clip_search=True)
    assert lows.shape == highs.shape == (64 // block, 24)
    assert gram_loss(gram, weight, rounded) < 0.97 * gram_loss(
        gram, weight, rtn_clip(weight, gram, bits, symmetric, block)
    )
    blocks = rounded.reshape(64 // block, block, 24)
    np.testing.assert_allclose(round_trip(blocks, lows[:, None], highs[:, None], bits, symmetric), blocks, atol=1e-12)


def test_flexround_is_deterministic():
    rng = np.random.default_rng(1)
    x = correlated_inputs(rng, 256, 32)
    weight = rng.standard_normal((32, 8))
    first, second = (flexround_round(weight, x.T @ x, 3, False, 32, True, FlexRoundSettings(50)) for _ in range(2))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_flexround_from_gptq_codes_is_never_worse_than_gptq():
    rng = np.random.default_rng(2)
    x = correlated_inputs(rng, 512, 64)
    gram, weight = x.T @ x, rng.standard_normal((64, 24))
    start = gptq_round(weight, gram, 3, False, 64, clip_search=True)
    rounded, _, _ = flexround_round(weight, gram, 3, False, 64, True, FlexRoundSettings(100), start)
    assert gram_loss(gram, weight, rounded) <= gram_loss(gram, weight, start[0]) * (1 + 1e-5)


def test_flexround_refuses_a_step_count_below_one():
    with pytest.raises(ValueError, match="steps >= 1"):
        FlexRoundSettings(0)


def quantized_errors(rounding: str, bits: int, data: list, held_out: list) -> tuple[list[str], float, float]:
    """The schemes and the squared output error in onnxruntime (calibration, held-out) of the lowered QDQ model."""
    rng = np.random.default_rng(3)
    reference = build(
        TWO_LAYERS, {"w1": rng.standard_normal((64, 32)).astype(F32), "w2": rng.standard_normal((16, 64)).astype(F32)}
    )
    model = reference.clone()
    calibrator = Calibrator.for_model(model, data, show_progress=False)
    QuantizePass(calibrator, wbits=bits, abits=0, weight_symmetric=False, weight_clip_search=True, rounding=rounding)(
        model
    )
    schemes = [node.meta["graphquant.decision"].scheme for node in model.graph]
    for node in model.graph:
        codes = node.meta["graphquant.input_specs"][1].quantize(node.inputs[1].const_value.numpy())
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    QdqLoweringPass()(model)
    errors = [
        sum(sum(float(np.sum((e - g) ** 2)) for e, g in zip(run(reference, f), run(model, f))) for f in feeds)
        for feeds in (data, held_out)
    ]
    return schemes, errors[0], errors[1]


@pytest.mark.parametrize("bits", [4, 3])
def test_flexround_through_quantize_beats_rtn_with_clip_search_in_onnxruntime(bits):
    rng = np.random.default_rng(4)
    inputs = correlated_inputs(rng, 1024, 64).astype(F32)
    data = [{"x": rows} for rows in np.split(inputs[:768], 3)]
    held_out = [{"x": inputs[768:]}]
    schemes, flex_calib, flex_held = quantized_errors("flexround", bits, data, held_out)
    _, rtn_calib, rtn_held = quantized_errors("nearest", bits, data, held_out)
    assert schemes == [f"W{bits} asym per-channel clip-searched FlexRound 300 steps"] * 2
    assert flex_calib < 0.95 * rtn_calib
    assert flex_held < rtn_held


def test_weight_only_with_flexround_validates_in_onnxruntime():
    rng = np.random.default_rng(5)
    reference = build(
        TWO_LAYERS, {"w1": rng.standard_normal((64, 32)).astype(F32), "w2": rng.standard_normal((16, 64)).astype(F32)}
    )
    data = [{"x": rows} for rows in np.split(correlated_inputs(rng, 512, 64).astype(F32), 4)]
    result = graphquant.optimize(
        reference,
        "weight-only",
        calibration=data,
        wbits=3,
        rounding="gptq-flexround",
        show_progress=False,
    )
    assert {layer.scheme for layer in result.report.layers} == {
        "W3 asym block 32 clip-searched GPTQ act-order FlexRound 300 steps"
    }
    assert not result.report.failures
    for feed in data:
        for expected, got in zip(run(reference, feed), run(result.model, feed)):
            cosine = np.sum(expected * got) / (np.linalg.norm(expected) * np.linalg.norm(got))
            assert cosine > 0.98


def test_an_unknown_rounding_is_refused():
    with pytest.raises(ValueError, match="rounding must be one of"):
        QuantizePass(None, abits=0, rounding="adaround")


def test_cli_rounding_flexround_writes_a_validated_model(tmp_path, capsys):
    rng = np.random.default_rng(6)
    reference = build(
        TWO_LAYERS, {"w1": rng.standard_normal((64, 32)).astype(F32), "w2": rng.standard_normal((16, 64)).astype(F32)}
    )
    model_path = save_model(reference, tmp_path / "two.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated_inputs(rng, 256, 64).astype(F32))
    output, report = tmp_path / "two.w4.onnx", tmp_path / "report.json"
    argv = ["optimize", model_path, "-o", str(output), "--recipe", "weight-only", "--calib", str(calib)]
    assert main([*argv, "--rounding", "flexround", "--report", str(report)]) == 0
    layers = {layer["node"]: layer["scheme"] for layer in json.loads(report.read_text())["layers"]}
    assert layers == {name: "W4 asym block 32 clip-searched FlexRound 300 steps" for name in ("fc1", "fc2")}
    assert json.loads(report.read_text())["validation"]["failures"] == []
