"""The low-bit presets end to end (weight-only, w4a8): options, schemes, sizes and accuracy in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import graphquant
from builders import build, output_sqnr_db, save_model
from graphquant.cli import main
from graphquant.errors import RecipeError

F32 = np.float32

ENCODER = """
<ir_version: 8, opset_import: ["" : 17]>
encoder (int64[B, S] ids) => (float[B, S, 64] y) {
  [embed] e = Gather(table, ids)
  [ln] n = LayerNormalization<axis: int = -1>(e, gamma, beta)
  [fc1] h = MatMul(n, w1)
  [fc1_bias] hb = Add(h, b1)
  r = Relu(hb)
  [fc2] o = MatMul(r, w2)
  [fc2_bias] y = Add(o, b2)
}
"""


def encoder(rng: np.random.Generator) -> ir.Model:
    """Embedding table -> LayerNorm -> MatMul+Add -> Relu -> MatMul+Add, with hidden 64 and 256 inner channels."""
    return build(
        ENCODER,
        {
            "table": rng.standard_normal((300, 64)).astype(F32),
            "gamma": rng.uniform(0.5, 1.5, 64).astype(F32),
            "beta": (rng.standard_normal(64) * 0.1).astype(F32),
            "w1": (rng.standard_normal((64, 256)) * 0.2).astype(F32),
            "b1": (rng.standard_normal(256) * 0.1).astype(F32),
            "w2": (rng.standard_normal((256, 64)) * 0.1).astype(F32),
            "b2": (rng.standard_normal(64) * 0.1).astype(F32),
        },
    )


def id_feeds(seed: int, batches: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, 300, (4, 16))} for _ in range(batches)]


CALIB, HELD_OUT = id_feeds(800), id_feeds(801, batches=2)


def schemes(result: graphquant.OptimizeResult) -> dict[str, str]:
    return {decision.node: decision.scheme for decision in result.report.quantized}


WEIGHT_SCHEMES = {
    "weight-only": "W4 asym block 32 clip-searched GPTQ act-order",
    "w4a8": "W4 per-channel clip-searched GPTQ act-order, A8",
}
# weight-only layers become MatMulNBits; W4A8 ones MatMulIntegerToFloat with the int4 weight cast to int8 at load.
ORT_CPU_LAYER_OPS = {"weight-only": "MatMulNBits", "w4a8": "MatMulIntegerToFloat"}
# Output SQNR in dB against FP32 on held-out ids: 19.1-19.2 dB measured on this model, less a margin of 2 dB.
MIN_SQNR_DB = 17.0


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
@pytest.mark.parametrize("recipe", ["weight-only", "w4a8"])
def test_low_bit_presets_shrink_the_model_and_stay_accurate(recipe, target):
    reference = encoder(np.random.default_rng(0))
    result = graphquant.optimize(reference, recipe, calibration=CALIB, target=target, show_progress=False)
    chosen = schemes(result)
    assert chosen["embed"] == "embedding W8 per-row clip-searched"
    assert chosen["fc1"].startswith(WEIGHT_SCHEMES[recipe])
    assert result.report.bytes_after < 0.4 * result.report.bytes_before
    ops = [node.op_type for node in result.model.graph]
    if target == "ort-cpu":
        assert ops.count(ORT_CPU_LAYER_OPS[recipe]) == 2 and "GatherBlockQuantized" in ops
    assert output_sqnr_db(reference, result.model, HELD_OUT) > MIN_SQNR_DB


def test_gptq_block_size_and_embedding_bits_are_options():
    reference = encoder(np.random.default_rng(0))
    rounded = graphquant.optimize(reference, "weight-only", calibration=CALIB, wbits=3, gptq=False, show_progress=False)
    tuned = graphquant.optimize(
        reference, "weight-only", calibration=CALIB, wbits=3, block_size=16, embed_bits=4, show_progress=False
    )
    assert schemes(rounded)["fc2"] == "W3 asym block 32 clip-searched"
    chosen = schemes(tuned)
    assert chosen["fc2"] == "W3 asym block 16 clip-searched GPTQ act-order"
    assert chosen["embed"] == "embedding W4 block 64 clip-searched"
    assert tuned.report.bytes_after < rounded.report.bytes_after  # int4 table
    assert output_sqnr_db(reference, tuned.model, HELD_OUT) > output_sqnr_db(reference, rounded.model, HELD_OUT)


def test_weight_only_without_calibration_rounds_to_nearest_with_a_warning():
    reference = encoder(np.random.default_rng(0))
    with pytest.warns(UserWarning, match="no calibration data, so no GPTQ"):
        result = graphquant.optimize(reference, "weight-only", show_progress=False)
    assert schemes(result)["fc1"] == "W4 asym block 32 clip-searched"
    assert output_sqnr_db(reference, result.model, HELD_OUT) > MIN_SQNR_DB


def test_an_option_no_pass_of_the_recipe_takes_is_refused():
    with pytest.raises(RecipeError, match="no pass takes option 'embed_bits'"):
        graphquant.optimize(encoder(np.random.default_rng(0)), "w8a8", calibration=CALIB, embed_bits=4)


def test_cli_maps_the_low_bit_flags_to_the_recipe(tmp_path, capsys):
    model_path = save_model(encoder(np.random.default_rng(0)), tmp_path / "encoder.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=np.concatenate([feed["ids"] for feed in CALIB]))
    output, report = tmp_path / "encoder.w4.onnx", tmp_path / "report.json"
    argv = [
        "optimize",
        model_path,
        "-o",
        str(output),
        "--recipe",
        "weight-only",
        "--calib",
        str(calib),
        "--block-size",
        "64",
        "--gptq",
        "--embed-bits",
        "4",
        "--target",
        "ort-cpu",
        "--report",
        str(report),
    ]
    assert main(argv) == 0
    layers = {layer["node"]: layer["scheme"] for layer in json.loads(report.read_text())["layers"]}
    assert layers["fc1"] == "W4 asym block 64 clip-searched GPTQ act-order"
    assert layers["embed"] == "embedding W4 block 64 clip-searched"
    assert output.stat().st_size < 0.4 * (tmp_path / "encoder.onnx").stat().st_size


def test_the_report_gives_each_layers_stored_bytes_before_and_after():
    result = graphquant.optimize(
        encoder(np.random.default_rng(0)), "weight-only", calibration=CALIB, show_progress=False
    )
    sizes = result.report.layer_bytes
    # fc1: a 64 x 256 float weight -> int4 codes, 2 x 256 float scales and 2 x 256 uint4 zero points
    assert sizes["fc1"] == (64 * 256 * 4, 64 * 256 // 2 + 2 * 256 * 4 + 2 * 256 // 2)
    # the embedding table: 300 x 64 float -> int8 codes, one float scale and one int8 zero point per row
    assert sizes["embed"] == (300 * 64 * 4, 300 * 64 + 300 * 4 + 300)
    layers = {layer["node"]: layer for layer in result.report.to_dict()["layers"]}
    assert (layers["fc2"]["bytes_before"], layers["fc2"]["bytes_after"]) == sizes["fc2"]
    assert "65.5 ->    10.5" in result.report.format_layers()


def test_embedding_quantization_joins_any_recipe_through_the_pass_list():
    reference = encoder(np.random.default_rng(0))
    passes = ["quantize-embeddings", "symmetrize", "preexecute-dequant", "quantize"]
    result = graphquant.optimize(reference, "outliertune", calibration=CALIB, passes=passes, show_progress=False)
    assert schemes(result)["embed"] == "embedding W8 per-row clip-searched"
    assert output_sqnr_db(reference, result.model, HELD_OUT) > 27.0  # 29.7 dB measured


def test_the_db_llm_preset_runs_through_the_cli_and_beats_2bit_rtn(tmp_path):
    reference = encoder(np.random.default_rng(0))
    model_path = save_model(reference, tmp_path / "encoder.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=np.concatenate([feed["ids"] for feed in CALIB]))
    output, report = tmp_path / "encoder.db.onnx", tmp_path / "report.json"
    argv = ["optimize", model_path, "-o", str(output), "--recipe", "db-llm", "--calib", str(calib)]
    assert main([*argv, "--report", str(report)]) == 0
    layers = {layer["node"]: layer["scheme"] for layer in json.loads(report.read_text())["layers"]}
    branches = [scheme for node, scheme in layers.items() if node.startswith("fc1_")]
    assert branches == ["DB-LLM dual binary W1+W1 (UINT2 codes in {0,1}) block 32"] * 2
    assert layers["embed"] == "embedding W8 per-row clip-searched"
    rtn = graphquant.optimize(reference, "weight-only", calibration=CALIB, wbits=2, gptq=False, show_progress=False)
    assert output_sqnr_db(reference, graphquant.load(output), HELD_OUT) > output_sqnr_db(reference, rtn.model, HELD_OUT)


CONVS = """
<ir_version: 8, opset_import: ["" : 17]>
convs (float[N, 4, 8, 8] x) => (float[N, 8, 8, 8] y) {
  [conv1] c = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, w1, b1)
  r = Relu(c)
  [conv2] y = Conv<kernel_shape: ints = [1, 1]>(r, w2, b2)
}
"""


def test_w4a8_puts_conv_weights_on_asymmetric_grids_and_still_runs_them_as_qlinear_conv():
    rng = np.random.default_rng(40)
    offsets = np.linspace(-0.4, 0.4, 8, dtype=F32)
    arrays = {
        "w1": (rng.standard_normal((8, 4, 3, 3)) * 0.3 + offsets.reshape(8, 1, 1, 1)).astype(F32),
        "b1": (rng.standard_normal(8) * 0.1).astype(F32),
        "w2": (rng.standard_normal((8, 8, 1, 1)) * 0.3 + offsets.reshape(8, 1, 1, 1)).astype(F32),
        "b2": (rng.standard_normal(8) * 0.1).astype(F32),
    }
    calib = [{"x": rng.standard_normal((4, 4, 8, 8)).astype(F32)} for _ in range(4)]
    models = {}
    for asymmetric in (True, False):
        result = graphquant.optimize(
            build(CONVS, arrays),
            "w4a8",
            calib,
            show_progress=False,
            asymmetric_conv_weights=None if asymmetric else False,
        )
        assert all(
            scheme.startswith("W4 asym" if asymmetric else "W4 per-channel") for scheme in schemes(result).values()
        )
        models[asymmetric] = result.model
    convs = [node for node in models[True].graph if node.op_type == "QLinearConv"]
    assert len(convs) == 2 and max(int(np.abs(node.inputs[3].const_value.numpy()).max()) for node in convs) > 7
    reference = build(CONVS, arrays)
    assert output_sqnr_db(reference, models[True], calib) > output_sqnr_db(reference, models[False], calib)
