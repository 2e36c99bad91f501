"""DualBinarizePass: two 1-bit branches whose sum equals the numpy α1·B1 + α2·B2, checked in onnxruntime.

The graphs run unoptimized: onnxruntime would fuse each blocked DequantizeLinear -> MatMul into MatMulNBits with
int8 compute, which is not the exact QDQ semantics compared here.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import build, by_name, initializer, ops, run, weights

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.data import CalibrationData, InputSpec
from graphquant.analysis.dual_binarization import dual_binarize, objective, rtn_2bit
from graphquant.passes import DualBinarizePass
from graphquant.quant_spec import DECISION_KEY

K, N = 96, 24
LAYERS = f"""
<ir_version: 8, opset_import: ["" : 17]>
layers (float[R, {K}] x) => (float[R, {N}] y, float[R, {N}] z) {{
  [fc] f = MatMul(x, w)
  [fc_bias] y = Add(f, b)
  [gemm] z = Gemm<transB: int = 1>(x, wt, c)
}}
"""


_MIXING_RNG = np.random.default_rng(0)
# One fixed channel mixing, so that calibration and held-out rows share a distribution.
MIXING = _MIXING_RNG.standard_normal((K, K)) * np.exp(_MIXING_RNG.standard_normal(K))[:, None] / np.sqrt(K)


def correlated_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Rows with correlated channels of unequal scale, so that the Gram is far from diagonal."""
    return (rng.standard_normal((rows, K)) @ MIXING).astype(np.float32)


def layers(rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """MatMul + bias Add and Gemm(transB) with C, reading one input."""
    arrays = {"w": weights(rng, K, N), "b": weights(rng, N), "wt": weights(rng, N, K), "c": weights(rng, N)}
    return build(LAYERS, arrays), arrays


def calibrator(model: ir.Model, batches: list[np.ndarray]) -> Calibrator:
    """A calibrator over the given batches of x."""
    return Calibrator(CalibrationData([{"x": batch} for batch in batches], InputSpec.of_model(model)), False)


def reconstructions(arrays: dict[str, np.ndarray], gram: np.ndarray | None, block: int | None) -> list[np.ndarray]:
    """numpy α1·B1 + α2·B2 of w [K, N] and of wt as [K, N], fitted on the same Gram."""
    size = block or K
    return [
        dual_binarize(matrix.astype(np.float64), gram, size).reconstruct() for matrix in (arrays["w"], arrays["wt"].T)
    ]


@pytest.mark.parametrize("block", [32, None])
@pytest.mark.parametrize("calibrated", [True, False])
def test_onnxruntime_matches_the_numpy_dual_binary_reconstruction(block, calibrated):
    rng = np.random.default_rng(7 + (block or 0))
    model, arrays = layers(rng)
    rows = correlated_rows(rng, 256)
    result = DualBinarizePass(calibrator(model, [rows]) if calibrated else None, block_size=block)(model)
    assert result.modified
    gram = rows.astype(np.float64).T @ rows.astype(np.float64) if calibrated else None
    w, wt = reconstructions(arrays, gram, block)
    x = correlated_rows(rng, 40)
    y, z = run(model, {"x": x}, optimize=False)
    for got, expected in ((y, x @ w + arrays["b"]), (z, x @ wt + arrays["c"])):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert ops(model).count("MatMul") == 2 and ops(model).count("Gemm") == 2 and ops(model).count("Add") == 3


@pytest.mark.parametrize(("container_bits", "dtype", "opset"), [(2, ir.DataType.UINT2, 25), (4, ir.DataType.UINT4, 21)])
def test_the_branch_weights_are_binary_codes_behind_dequantize_linear(container_bits, dtype, opset):
    rng = np.random.default_rng(3)
    model, arrays = layers(rng)
    reference = build(LAYERS, arrays)
    DualBinarizePass(calibrator(model, [correlated_rows(rng, 256)]), container_bits=container_bits)(model)
    dequantizers = [node for node in model.graph if node.op_type == "DequantizeLinear"]
    assert len(dequantizers) == 4 and model.graph.opset_imports[""] == opset
    for node in dequantizers:
        codes, scale, zero_point = (value.const_value for value in node.inputs)
        assert codes.dtype == zero_point.dtype == dtype
        assert set(np.unique(codes.numpy())) <= {0, 1} and set(np.unique(zero_point.numpy())) <= {0, 1}
        assert np.all(scale.numpy() > 0) and node.attributes["block_size"].as_int() == 32
        assert len(codes.tobytes()) == codes.size * container_bits // 8
    x = correlated_rows(rng, 16)
    for got, exact in zip(run(model, {"x": x}, optimize=False), run(reference, {"x": x}), strict=True):
        assert np.sum((got - exact) ** 2) < 0.5 * np.sum(exact**2)
    assert not {"w", "wt"} & set(model.graph.initializers)
    decisions = [node.meta[DECISION_KEY] for node in model.graph if DECISION_KEY in node.meta]
    assert [d.status for d in decisions] == ["quantized"] * 4
    assert {d.output for d in decisions} == {"y", "z"}
    assert by_name(model)["fc_bias"].inputs[0].name == "f"


@pytest.mark.parametrize("block", [32, None])
def test_layer_output_error_is_below_plain_2bit_rtn_with_clip_search(block):
    rng = np.random.default_rng(11)
    model, arrays = layers(rng)
    reference = build(LAYERS, arrays)
    calibration = correlated_rows(rng, 512)
    DualBinarizePass(calibrator(model, [calibration]), block_size=block)(model)
    x = correlated_rows(rng, 512)
    gram = calibration.astype(np.float64).T @ calibration
    energy = np.diag(gram)[:, None]
    rtn = [rtn_2bit(matrix.astype(np.float64), energy, block or K, True) for matrix in (arrays["w"], arrays["wt"].T)]
    exact = run(reference, {"x": x})
    rtn_outputs = [x @ rtn[0] + arrays["b"], x @ rtn[1] + arrays["c"]]
    for got, rounded, expected in zip(run(model, {"x": x}, optimize=False), rtn_outputs, exact, strict=True):
        dual_error, rtn_error = np.sum((got - expected) ** 2), np.sum((rounded - expected) ** 2)
        assert dual_error < 0.9 * rtn_error


def test_the_fit_never_does_worse_than_its_2bit_start_on_the_gram():
    rng = np.random.default_rng(5)
    matrix = weights(rng, K, N).astype(np.float64)
    rows = correlated_rows(rng, 300).astype(np.float64)
    gram = rows.T @ rows
    start = dual_binarize(matrix, gram, 32, iterations=0).reconstruct().astype(np.float64)
    np.testing.assert_allclose(start, rtn_2bit(matrix, np.diag(gram)[:, None], 32, True), rtol=1e-6, atol=1e-7)
    fitted = dual_binarize(matrix, gram, 32).reconstruct().astype(np.float64)
    assert objective(matrix, gram, fitted) < 0.9 * objective(matrix, gram, start)


def test_deviation_aware_distillation_fits_on_the_deviation_weighted_gram():
    rng = np.random.default_rng(9)
    model, arrays = layers(rng)
    batches = [correlated_rows(rng, 128) for _ in range(3)]
    DualBinarizePass(calibrator(model, batches), distill=True)(model)
    rows = np.concatenate(batches).astype(np.float64)
    x = correlated_rows(rng, 40)
    y, z = run(model, {"x": x}, optimize=False)
    for got, matrix, bias in ((y, arrays["w"], arrays["b"]), (z, arrays["wt"].T, arrays["c"])):
        exact = rows @ matrix
        rounded = rows @ rtn_2bit(matrix.astype(np.float64), np.ones((K, 1)), 32, True)
        deviation = np.sum((exact - rounded) ** 2, axis=1) / np.sum(exact**2, axis=1)
        gram = (rows * (deviation / deviation.mean())[:, None]).T @ rows
        expected = x @ dual_binarize(matrix.astype(np.float64), gram, 32).reconstruct() + bias
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_an_unknown_container_is_refused():
    with pytest.raises(ValueError, match="container_bits"):
        DualBinarizePass(container_bits=1)


def test_distillation_without_calibration_is_refused():
    rng = np.random.default_rng(1)
    model, _ = layers(rng)
    with pytest.raises(ir.passes.PreconditionError, match="calibration"):
        DualBinarizePass(distill=True)(model)


def test_a_shared_weight_stays_float_with_the_reason():
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    tied (float[R, {K}] x, float[R, {K}] x2) => (float[R, {N}] y, float[R, {N}] y2) {{
      [first] y = MatMul(x, w)
      [second] y2 = MatMul(x2, w)
    }}
    """
    model = build(text, {"w": weights(np.random.default_rng(2), K, N)})
    assert not DualBinarizePass()(model).modified
    decision = by_name(model)["first"].meta[DECISION_KEY]
    assert decision.status == "float" and "shared" in decision.reason
    assert initializer(model, "w").shape == (K, N)
