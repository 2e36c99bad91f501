"""Unsigned int8 weights: the same grid shifted by 128, exact, and what onnxruntime's saturating kernel needs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import feeds, named_mlp, ops, run

from graphquant.analysis.calibration import Calibrator
from graphquant.lowering import unsigned_weights
from graphquant.lowering.ort_cpu import OrtCpuLoweringPass
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.lowering.unsigned_weights import UnsignedWeightsPass, uint8_int8_saturates
from graphquant.passes.quantize import QuantizePass

SEED = 0


def _quantized(target: str, **options) -> tuple[ir.Model, list[dict[str, np.ndarray]]]:
    """named_mlp quantized W8A8 (uint8 activations after the Relu) and lowered for the target, with its feeds."""
    rng = np.random.default_rng(SEED)  # tests/lowering/test_ort_cpu.py's mlp_pair: its pairs saturate on AVX2
    data = feeds(rng, batches=4, rows=8, features=16)
    model = named_mlp(np.random.default_rng(int(rng.integers(1 << 30))))
    QuantizePass(Calibrator.for_model(model, data, show_progress=False), **options)(model)
    if target == "ort-cpu":
        OrtCpuLoweringPass()(model)
    QdqLoweringPass()(model)
    return model, data


def _copy(model: ir.Model) -> ir.Model:
    """A deep copy through the proto."""
    return ir.from_proto(ir.to_proto(model))


def _initializer_dtypes(model: ir.Model) -> dict[str, np.dtype]:
    """Each initializer's numpy dtype."""
    return {name: value.const_value.numpy().dtype for name, value in model.graph.initializers.items()}


def test_qdq_weights_move_to_uint8_with_zero_point_128_and_the_same_dequantized_values():
    model, data = _quantized("qdq")
    shifted = _copy(model)
    assert UnsignedWeightsPass(enabled=True)(shifted).modified
    onnx.checker.check_model(ir.to_proto(shifted))
    weight_dequantizers = [
        node for node in shifted.graph if node.op_type == "DequantizeLinear" and node.inputs[0].is_initializer()
    ]
    assert weight_dequantizers
    for node in weight_dequantizers:
        codes, zero = node.inputs[0].const_value.numpy(), node.inputs[2].const_value.numpy()
        assert codes.dtype == np.uint8 and zero.dtype == np.uint8 and np.all(zero == 128)
    for feed in data:  # unoptimized, the float weights that reach the MatMuls are bit-identical
        for before, after in zip(run(model, feed, optimize=False), run(shifted, feed, optimize=False)):
            np.testing.assert_array_equal(before, after)


def _close(got: np.ndarray, exact: np.ndarray) -> bool:
    """Within a ten-thousandth of the output's range (float rounding of the scales, not a saturated pair)."""
    return bool(np.allclose(got, exact, atol=1e-4 * float(np.abs(exact).max())))


def test_ort_cpu_integer_layers_with_uint8_activations_compute_the_exact_integer_product():
    model, data = _quantized("ort-cpu")  # builders.run shifts unshifted weights too: the dtype checks test the pass
    exact_model, _ = _quantized("qdq")  # unoptimized QDQ: float MatMuls of the dequantized grids
    UnsignedWeightsPass(enabled=True)(model)
    fused = [node for node in model.graph if node.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 2
    for node in fused:
        assert node.inputs[1].const_value.numpy().dtype == np.uint8
        assert np.all(node.inputs[5].const_value.numpy() == 128)
    for feed in data:
        (got,) = run(model, feed)
        (exact,) = run(exact_model, feed, optimize=False)
        assert _close(got, exact)


def test_small_codes_and_disabled_runs_are_left_alone():
    model, _ = _quantized("ort-cpu", wbits=4)  # 4-bit codes in int8 cannot saturate
    before = _initializer_dtypes(model)
    assert not UnsignedWeightsPass(enabled=True)(model).modified
    assert _initializer_dtypes(model) == before
    model, _ = _quantized("qdq")
    assert not UnsignedWeightsPass(enabled=False)(model).modified


def test_int8_activations_keep_int8_weights_in_integer_ops():
    model, _ = _quantized("ort-cpu")
    first = next(node for node in model.graph if node.op_type == "MatMulIntegerToFloat")
    first.inputs[0].type = ir.TensorType(ir.DataType.INT8)  # as if the activation grid were signed
    UnsignedWeightsPass(enabled=True)(model)
    assert first.inputs[1].const_value.numpy().dtype == np.int8  # int8 x int8 has its own exact kernel
    assert ops(model).count("MatMulIntegerToFloat") == 2


@pytest.mark.parametrize("forced, expected", [("1", True), ("0", False)])
def test_the_environment_forces_the_choice(monkeypatch, forced, expected):
    monkeypatch.setenv(unsigned_weights.FORCE_ENV, forced)
    uint8_int8_saturates.cache_clear()
    try:
        assert uint8_int8_saturates() is expected
    finally:
        uint8_int8_saturates.cache_clear()


def test_the_probe_answers_whether_this_machine_saturates_the_int8_weights():
    uint8_int8_saturates.cache_clear()
    model, data = _quantized("ort-cpu")
    exact_model, _ = _quantized("qdq")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    deviates = any(not _close(session.run(None, feed)[0], run(exact_model, feed, optimize=False)[0]) for feed in data)
    assert uint8_int8_saturates() is deviates
