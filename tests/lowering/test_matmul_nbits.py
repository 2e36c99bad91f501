"""MatMulNBits lowering against the QDQ lowering of the same weight specs, in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import build, run, weights

from graphquant.analysis.calibration import Calibrator
from graphquant.lowering.matmul_nbits import (
    MatMulNBitsLoweringPass,
    container_bits,
    pack_low_first,
    per_channel_block,
)
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import QuantizePass

F32 = np.float32

LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
layers (float[N, 80] x) => (float[N, 24] y, float[N, 24] z) {
  [fc1] h = MatMul(x, w1)
  [fc1_bias] y = Add(h, b1)
  [fc2] z = Gemm<transB: int = 1>(x, w2, b2)
}
"""


def layers_model(rng: np.random.Generator) -> ir.Model:
    """A MatMul+Add and a Gemm(transB) with K = 80 (not a multiple of 32: a padded last block)."""
    return build(
        LAYERS, {"w1": weights(rng, 80, 24), "b1": weights(rng, 24), "w2": weights(rng, 24, 80), "b2": weights(rng, 24)}
    )


def lowered_pair(options: dict, accuracy_level: int, rng_seed: int = 0) -> tuple[ir.Model, ir.Model, list[dict]]:
    """(QDQ reference, MatMulNBits form) of one annotated model, and the feeds."""
    rng = np.random.default_rng(rng_seed)
    model = layers_model(rng)
    data = [{"x": rng.standard_normal((16, 80)).astype(F32)} for _ in range(2)]
    QuantizePass(Calibrator.for_model(model, data, show_progress=False), **options)(model)
    reference = model.clone()  # annotations included
    QdqLoweringPass()(reference)
    MatMulNBitsLoweringPass(accuracy_level)(model)
    QdqLoweringPass()(model)
    return reference, model, data


@pytest.mark.parametrize(
    "options",
    [
        {"wbits": 4, "block_size": 32},
        {"wbits": 4, "block_size": 32, "weight_symmetric": False},
        {"wbits": 3, "block_size": 16, "weight_symmetric": False},
        {"wbits": 2, "block_size": 64, "weight_symmetric": False},
        {"wbits": 8, "block_size": 32},
        {"wbits": 4},
        {"wbits": 8, "weight_symmetric": False},
    ],
    ids=["w4-sym", "w4-asym", "w3-asym-in-4", "w2-asym", "w8-sym", "w4-per-channel", "w8-asym-per-channel"],
)
def test_matmul_nbits_equals_the_qdq_form_of_the_same_specs(options):
    reference, model, data = lowered_pair({**options, "abits": 0}, accuracy_level=0)
    onnx.checker.check_model(ir.to_proto(model))
    assert [node.op_type for node in model.graph] == ["MatMulNBits", "MatMulNBits"]  # the bias Add fused
    fused = model.graph.node("fc1")
    assert fused.attributes.get_int("bits") == container_bits(options["wbits"])
    # per channel, K = 80: blocks of 32 at 4 bits (16 codes of padding), of 16 at 8; the column's scale repeated
    per_channel = {4: 32, 8: 16}.get(options["wbits"])
    assert fused.attributes.get_int("block_size") == options.get("block_size", per_channel)
    for feed in data:
        for expected, got in zip(run(reference, feed, optimize=False), run(model, feed)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_int8_compute_stays_within_activation_rounding_of_the_qdq_form():
    reference, model, data = lowered_pair({"wbits": 4, "abits": 0, "block_size": 32}, accuracy_level=4)
    assert model.graph.node("fc2").attributes.get_int("accuracy_level") == 4
    for feed in data:
        for expected, got in zip(run(reference, feed, optimize=False), run(model, feed)):
            # A is rounded to int8 per block of 32 at run time: about 0.5% of the output scale
            assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


@pytest.mark.parametrize("wbits", [4, 8], ids=["w4a8", "w8a8"])
def test_blocked_weights_with_int8_activations_keep_the_quantization_in_front_of_matmul_nbits(wbits):
    reference, model, data = lowered_pair({"wbits": wbits, "abits": 8, "block_size": 32}, accuracy_level=0)
    ops = [node.op_type for node in model.graph]
    assert ops.count("MatMulNBits") == 2 and ops.count("QuantizeLinear") == 1  # one Q/DQ shared by both readers of x
    for feed in data:
        for expected, got in zip(run(reference, feed, optimize=False), run(model, feed)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_w8a8_layers_are_left_for_matmul_integer_to_float():
    rng = np.random.default_rng(1)
    model = layers_model(rng)
    data = [{"x": rng.standard_normal((16, 80)).astype(F32)}]
    QuantizePass(Calibrator.for_model(model, data, show_progress=False), wbits=8, abits=8)(model)
    assert not MatMulNBitsLoweringPass()(model).modified


@pytest.mark.parametrize(
    ("depth", "width", "block"), [(384, 8, 128), (1536, 8, 512), (384, 4, 128), (80, 4, 32), (80, 8, 16), (10, 8, 16)]
)
def test_per_channel_codes_take_the_block_that_stores_them_in_the_fewest_bytes(depth, width, block):
    assert per_channel_block(depth, width) == block


def test_packing_puts_the_first_code_in_the_low_bits():
    codes = np.array([[1, 2, 3, 0, 3]], np.uint8)
    np.testing.assert_array_equal(pack_low_first(codes, 2), [[1 | 2 << 2 | 3 << 4, 3]])
    np.testing.assert_array_equal(pack_low_first(codes, 4), [[0x21, 0x03, 0x03]])
    np.testing.assert_array_equal(pack_low_first(codes, 8), codes)
