"""Weight grids (per-channel, blocks, asymmetric, clip search) against numpy references and onnxruntime."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest
from builders import build, run

from graphquant.analysis import weight_fit
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import Layer, classify
from graphquant.analysis.weight_fit import WeightScheme, fit_ranges, fit_weight_spec, in_major, round_trip, row_energy
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import QuantizePass

F32 = np.float32

HEAVY = """
<ir_version: 8, opset_import: ["" : 17]>
heavy (float[N, 70] x) => (float[N, 32] y, float[N, 32] z) {
  [fc] y = MatMul(x, w)
  [fc_t] z = Gemm<transB: int = 1>(x, wt)
}
"""


def heavy_tailed_model(rng: np.random.Generator, rows: int = 70) -> ir.Model:
    """A MatMul and a Gemm(transB) reading the same Laplace-distributed weight (heavier tails than a Gaussian)."""
    w = (rng.laplace(size=(rows, 32)) * 0.1).astype(F32)
    return build(HEAVY.replace("70", str(rows)), {"w": w, "wt": np.ascontiguousarray(w.T)})


def layers_of(model: ir.Model) -> list[Layer]:
    layers = [classify(node).layer for node in model.graph]
    assert all(layer is not None for layer in layers)
    return layers  # type: ignore[return-value]


def weighted_error(matrix: np.ndarray, rounded: np.ndarray, energy: np.ndarray) -> np.ndarray:
    return np.sum(energy * (matrix - rounded) ** 2, axis=0)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_clip_search_stays_inside_the_range_and_lowers_the_weighted_error(bits):
    rng = np.random.default_rng(4)
    matrix = in_major(layers_of(heavy_tailed_model(rng, rows=128))[0])
    energy = rng.uniform(0.5, 2.0, (128, 1))
    absmax = np.abs(matrix).max(axis=0)
    low, high = fit_ranges(matrix, energy, bits, True, 128, clip_search=True)
    assert high.shape == (1, 32)
    np.testing.assert_array_equal(low, -high)
    assert np.all(high[0] <= absmax) and np.all(high[0] >= 0.5 * absmax - 1e-12)
    clipped = weighted_error(matrix, round_trip(matrix, low, high, bits, True), energy)
    unclipped = weighted_error(matrix, round_trip(matrix, -absmax, absmax, bits, True), energy)
    assert np.all(clipped <= unclipped)
    if bits <= 4:
        assert clipped.sum() < 0.85 * unclipped.sum()  # heavy tails: clipping pays off clearly at low bits


def test_no_clipping_for_uniform_weights_at_eight_bits():
    """Weights spread evenly up to their max leave clipping nothing to win at 8 bits."""
    rng = np.random.default_rng(6)
    matrix = rng.uniform(-1, 1, (128, 32))
    matrix[0] = 1.0
    _, high = fit_ranges(matrix, np.ones((128, 1)), 8, True, 128, clip_search=True)
    assert np.mean(high >= 0.95) > 0.8


def test_asymmetric_grid_beats_symmetric_on_one_sided_weights():
    rng = np.random.default_rng(7)
    matrix = rng.uniform(0.2, 1.0, (64, 16))
    energy = np.ones((64, 1))
    errors = {}
    for symmetric in (True, False):
        low, high = fit_ranges(matrix, energy, 4, symmetric, 64, clip_search=False)
        errors[symmetric] = weighted_error(matrix, round_trip(matrix, low, high, 4, symmetric), energy).sum()
    # the symmetric grid spends half its codes on negative values no weight takes
    assert errors[False] < 0.3 * errors[True]


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_spec_layout_matches_onnx_blocked_dequantize_for_matmul_and_gemm_transb(symmetric):
    rng = np.random.default_rng(8)
    matmul, gemm = layers_of(heavy_tailed_model(rng))  # 70 input channels: blocks of 32, 32 and a padded 6
    scheme = WeightScheme(bits=4, symmetric=symmetric, block_size=32)
    specs = [fit_weight_spec(layer, scheme, row_energy(layer, None)) for layer in (matmul, gemm)]
    assert (specs[0].axis, specs[0].block_size, specs[0].scale.shape) == (0, 32, (3, 32))
    assert (specs[1].axis, specs[1].block_size, specs[1].scale.shape) == (1, 32, (32, 3))
    np.testing.assert_array_equal(specs[0].scale, specs[1].scale.T)
    for layer, spec in zip((matmul, gemm), specs):
        weight = layer.weight_array
        error = np.abs(spec.dequantize(spec.quantize(weight)) - weight)
        # without clipping every weight lies inside its block's grid: rounding error at most half a step
        assert np.all(error <= spec.expand(spec.scale, weight.shape) / 2 + 1e-6)
    # each block's range is its own: blocks are finer than one range per column
    per_channel = fit_weight_spec(matmul, WeightScheme(bits=4, symmetric=symmetric), row_energy(matmul, None))
    blocked_error = np.abs(specs[0].dequantize(specs[0].quantize(matmul.weight_array)) - matmul.weight_array)
    channel_error = np.abs(per_channel.dequantize(per_channel.quantize(matmul.weight_array)) - matmul.weight_array)
    assert blocked_error.mean() < channel_error.mean()


def test_conv_weights_stay_per_output_channel_when_blocks_are_asked_for():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    conv (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) {
      [c] y = Conv(x, w)
    }
    """
    rng = np.random.default_rng(9)
    model = build(text, {"w": rng.standard_normal((4, 3, 3, 3)).astype(F32)})
    layer = layers_of(model)[0]
    scheme = WeightScheme(bits=4, block_size=32)
    spec = fit_weight_spec(layer, scheme, row_energy(layer, np.ones(3)))
    assert (spec.axis, spec.block_size, spec.scale.shape) == (0, None, (4,))
    np.testing.assert_allclose(spec.scale, np.abs(layer.weight_array).reshape(4, -1).max(axis=1) / 7, rtol=1e-6)
    assert scheme.describe(layer) == "W4 per-channel"


def output_sqnr_db(reference: ir.Model, model: ir.Model, data: list[dict[str, np.ndarray]]) -> float:
    expected = np.concatenate([run(reference, feed)[0] for feed in data])
    got = np.concatenate([run(model, feed)[0] for feed in data])
    return -10 * math.log10(np.sum((expected - got) ** 2) / np.sum(expected**2))


def test_clip_search_improves_the_weight_only_model_in_onnxruntime():
    rng = np.random.default_rng(5)
    reference = heavy_tailed_model(rng, rows=128)
    data = [{"x": rng.standard_normal((64, 128)).astype(F32)} for _ in range(2)]
    sqnr = {}
    for search in (False, True):
        model = reference.clone()
        calibrator = Calibrator.for_model(model, data, show_progress=False)
        QuantizePass(calibrator, wbits=4, abits=0, weight_clip_search=search)(model)
        QdqLoweringPass()(model)
        sqnr[search] = output_sqnr_db(reference, model, data)
    assert sqnr[True] > sqnr[False] + 0.4


def _fit_ranges_float64(matrix, energy, bits, symmetric, block, clip_search):
    """The whole-matrix float64 search that fit_ranges does a few columns at a time."""
    rows, columns = matrix.shape
    count = -(-rows // block)
    blocks = np.zeros((count * block, columns))
    blocks[:rows] = matrix
    blocks = blocks.reshape(count, block, columns)
    weights = np.zeros((count * block, 1))
    weights[:rows] = energy
    weights = weights.reshape(count, block, 1)
    low, high = np.minimum(blocks.min(axis=1), 0.0), np.maximum(blocks.max(axis=1), 0.0)
    if symmetric:
        high = np.maximum(-low, high)
        low = -high
    if not clip_search:
        return low, high
    best, best_low, best_high = np.full(low.shape, np.inf), low, high
    for ratio in np.linspace(1.0, 0.5, 21):
        rounded = round_trip(blocks, low[:, None, :] * ratio, high[:, None, :] * ratio, bits, symmetric)
        error = np.sum(weights * (blocks - rounded) ** 2, axis=1)
        best_low, best_high = (
            np.where(error < best, low * ratio, best_low),
            np.where(error < best, high * ratio, best_high),
        )
        best = np.minimum(error, best)
    return best_low, best_high


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [32, 300])
def test_chunked_clip_search_equals_the_whole_matrix_search(monkeypatch, symmetric, block):
    monkeypatch.setattr(weight_fit, "SEARCH_CHUNK_ELEMENTS", 1000)  # 3 columns of 300 rows per chunk
    rng = np.random.default_rng(7)
    matrix = rng.laplace(size=(300, 40)).astype(F32)
    energy = rng.uniform(0.1, 2.0, (300, 1))
    got = fit_ranges(matrix, energy, 4, symmetric, block, clip_search=True)
    want = _fit_ranges_float64(matrix.astype(np.float64), energy, 4, symmetric, block, clip_search=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert (got[1] < np.abs(matrix).max(axis=0)).any()  # the search clipped some ranges


def test_fitting_a_large_weight_makes_no_float64_copy_of_it():
    rng = np.random.default_rng(8)
    model = heavy_tailed_model(rng, rows=2048)
    weight = rng.standard_normal((2048, 2048)).astype(F32)
    model.graph.initializers["w"].const_value = ir.Tensor(weight, name="w")
    layer = layers_of(model)[0]
    tracemalloc.start()
    try:
        spec = fit_weight_spec(layer, WeightScheme(8), row_energy(layer, None))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(spec.scale, np.abs(weight).max(axis=0) / np.float32(127))
    assert peak < weight.nbytes / 4  # a float64 copy alone would be twice the weight


def test_clip_search_reuses_ranges_of_the_same_content_only(monkeypatch):
    calls = []
    search = weight_fit._clip_search
    monkeypatch.setattr(weight_fit, "_clip_search", lambda *args: calls.append(1) or search(*args))
    monkeypatch.setattr(weight_fit, "_SEARCHED", weight_fit.collections.OrderedDict())
    rng = np.random.default_rng(11)
    matrix = rng.laplace(size=(64, 24)).astype(F32)
    energy = rng.uniform(0.1, 2.0, (64, 1))
    first = fit_ranges(matrix, energy, 4, True, 32, clip_search=True)
    first[1][:] = 0  # the caller's copy: the memo keeps its own
    again = fit_ranges(matrix.copy(), energy, 4, True, 32, clip_search=True)
    assert len(calls) == 1
    want = _fit_ranges_float64(matrix.astype(np.float64), energy, 4, True, 32, clip_search=True)
    np.testing.assert_array_equal(again[1], want[1])
    matrix[5, 3] *= 3
    changed = fit_ranges(matrix, energy, 4, True, 32, clip_search=True)
    assert len(calls) == 2
    want = _fit_ranges_float64(matrix.astype(np.float64), energy, 4, True, 32, clip_search=True)
    np.testing.assert_array_equal(changed[1], want[1])
    fit_ranges(matrix, energy * 2, 4, True, 32, clip_search=True)
    assert len(calls) == 3


def test_a_layer_fit_again_finds_the_memo_by_its_tensors_digest_without_rehashing_the_weight(monkeypatch):
    monkeypatch.setattr(weight_fit, "_SEARCHED", weight_fit.collections.OrderedDict())
    monkeypatch.setattr(weight_fit, "WEIGHT_DIGESTS", weight_fit.TensorDigests())
    digested = []
    digest = weight_fit.TensorDigests.__call__
    monkeypatch.setattr(weight_fit.TensorDigests, "__call__", lambda self, t: digested.append(t) or digest(self, t))
    searched = []
    search = weight_fit._clip_search
    monkeypatch.setattr(weight_fit, "_clip_search", lambda *args: searched.append(1) or search(*args))
    matmul, gemm = layers_of(heavy_tailed_model(np.random.default_rng(12)))
    scheme = WeightScheme(4, True, 32, True)
    energy = np.random.default_rng(13).uniform(0.1, 2.0, (70, 1))
    first = fit_weight_spec(matmul, scheme, energy)
    hashed = []
    monkeypatch.setattr(weight_fit.hashlib, "blake2b", lambda **kw: hashed.append(1) or _Counting(kw))
    again = fit_weight_spec(matmul, scheme, energy)
    assert searched == [1] and len(digested) == 2 and digested[0] is digested[1]
    assert sum(hashed) == 1 and _Counting.largest < matmul.weight_array.nbytes  # the key, not the weight's bytes
    np.testing.assert_array_equal(again.scale, first.scale)
    # The same values through the matrix-hashed key, and the transposed copy (its own tensor) with its own key.
    low, high = fit_ranges(in_major(matmul, F32), energy, 4, True, 32, True)
    np.testing.assert_array_equal(weight_fit.spec_from_ranges(matmul, scheme, low, high).scale, again.scale)
    fit_weight_spec(gemm, scheme, energy)
    assert len(searched) == 3


class _Counting:
    """A blake2b that records the largest update it is given."""

    largest = 0

    def __init__(self, options: dict) -> None:
        self.hasher = weight_fit.hashlib.new("blake2b", **options)

    def update(self, data) -> None:
        _Counting.largest = max(_Counting.largest, memoryview(data).nbytes)
        self.hasher.update(data)

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


def test_stored_codes_are_the_specs_codes_kept_only_inside_remembered_codes(monkeypatch):
    matmul, _ = layers_of(heavy_tailed_model(np.random.default_rng(14)))
    spec = fit_weight_spec(matmul, WeightScheme(8), row_energy(matmul, None))
    other = fit_weight_spec(matmul, WeightScheme(4, True, 32), row_energy(matmul, None))
    quantized = []
    quantize = type(spec).quantize
    monkeypatch.setattr(type(spec), "quantize", lambda self, values: quantized.append(1) or quantize(self, values))
    want = quantize(spec, matmul.weight_array)
    weight_fit.stored_codes(spec, matmul.weight)
    with weight_fit.remembered_codes():
        first = weight_fit.stored_codes(spec, matmul.weight)
        first[:] = 0  # the caller's copy: the memo keeps its own
        again = weight_fit.stored_codes(spec, matmul.weight)
        assert len(quantized) == 2
        np.testing.assert_array_equal(again, want)
        np.testing.assert_array_equal(
            weight_fit.stored_codes(other, matmul.weight), quantize(other, matmul.weight_array)
        )
        assert len(quantized) == 3
    assert not weight_fit._CODES  # dropped on leaving
