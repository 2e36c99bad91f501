"""GPTQ rounding against plain rounding on the same grids, in numpy and through QuantizePass in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from builders import build, run, weights

from graphquant.analysis import gptq as gptq_module
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.conv_gram import PairedMoments
from graphquant.analysis.gptq import gptq_round, mean_shift, sequential_target
from graphquant.analysis.weight_fit import fit_ranges, round_trip
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import QuantizePass

F32 = np.float32


def correlated_inputs(rng: np.random.Generator, rows: int, channels: int) -> np.ndarray:
    """Activations whose channels are strongly correlated (the case GPTQ exploits)."""
    mixing = rng.standard_normal((channels, channels)) * 0.3 + np.eye(channels)
    return (
        rng.standard_normal((rows, 8)) @ rng.standard_normal((8, channels))
        + rng.standard_normal((rows, channels)) @ mixing
    )


def output_error(x: np.ndarray, weight: np.ndarray, rounded: np.ndarray) -> float:
    return float(np.sum((x @ weight - x @ rounded) ** 2))


@pytest.mark.parametrize(("bits", "symmetric", "block"), [(3, True, 16), (4, False, 16), (3, False, 64)])
def test_gptq_lowers_the_output_error_below_plain_rounding(bits, symmetric, block):
    rng = np.random.default_rng(1)
    x = correlated_inputs(rng, 512, 64)
    weight = rng.standard_normal((64, 24))
    rounded, lows, highs = gptq_round(weight, x.T @ x, bits, symmetric, block, clip_search=False)
    assert lows.shape == highs.shape == (64 // block, 24)
    low, high = fit_ranges(weight, np.ones((64, 1)), bits, symmetric, block, clip_search=False)
    plain = round_trip(weight.reshape(-1, block, 24), low[:, None], high[:, None], bits, symmetric).reshape(64, 24)
    assert output_error(x, weight, rounded) < 0.7 * output_error(x, weight, plain)


def test_gptq_values_lie_on_the_grids_it_returns():
    rng = np.random.default_rng(2)
    x = correlated_inputs(rng, 256, 48)
    rounded, lows, highs = gptq_round(rng.standard_normal((48, 8)), x.T @ x, 4, False, 16, clip_search=True)
    blocks = rounded.reshape(3, 16, 8)
    np.testing.assert_allclose(round_trip(blocks, lows[:, None], highs[:, None], 4, False), blocks, atol=1e-12)


def test_uncorrelated_equal_energy_inputs_make_gptq_plain_rounding():
    """With X^T X = c·I the inverse Hessian is diagonal: no error moves, so GPTQ rounds like RTN."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((32, 8))
    rounded, _, _ = gptq_round(weight, 5.0 * np.eye(32), 4, True, 8, clip_search=False)
    low, high = fit_ranges(weight, np.ones((32, 1)), 4, True, 8, clip_search=False)
    expected = round_trip(weight.reshape(4, 8, 8), low[:, None], high[:, None], 4, True).reshape(32, 8)
    np.testing.assert_allclose(rounded, expected, atol=1e-12)


def test_channels_that_never_fire_keep_their_weights_rounded_to_nearest():
    """Zero on the calibration data is not zero on all data: such a row is rounded, and no error is pushed into it."""
    rng = np.random.default_rng(4)
    x = correlated_inputs(rng, 128, 16)
    x[:, 5] = 0.0
    weight = rng.standard_normal((16, 4))
    rounded, lows, highs = gptq_round(weight, x.T @ x, 4, True, 16, clip_search=False)
    np.testing.assert_array_equal(rounded[5], round_trip(weight[5], lows[0], highs[0], 4, True))
    assert np.abs(rounded[5]).max() > 0


TWO_LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
two (float[N, 64] x) => (float[N, 32] y, float[N, 16] z) {
  [fc1] y = MatMul(x, w1)
  [fc2] z = Gemm<transB: int = 1>(x, w2)
}
"""


def test_gptq_through_quantize_beats_rtn_in_onnxruntime():
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((64, 32)).astype(F32), rng.standard_normal((16, 64)).astype(F32)
    reference = build(TWO_LAYERS, {"w1": w1, "w2": w2})
    data = [{"x": rows} for rows in np.split(correlated_inputs(rng, 512, 64).astype(F32), 4)]
    errors = {}
    for gptq in (False, True):
        model = reference.clone()
        calibrator = Calibrator.for_model(model, data, show_progress=False)
        QuantizePass(calibrator, wbits=3, abits=0, block_size=16, weight_symmetric=False, gptq=gptq)(model)
        schemes = [node.meta["graphquant.decision"].scheme for node in model.graph]
        QdqLoweringPass()(model)
        errors[gptq] = [
            sum(float(np.sum((expected - got) ** 2)) for expected, got in zip(run(reference, f), run(model, f)))
            for f in data
        ]
    assert schemes == ["W3 asym block 16 GPTQ"] * 2
    assert sum(errors[True]) < 0.7 * sum(errors[False])


def test_a_gram_of_fewer_rows_than_inputs_rounds_to_nearest_and_keeps_unseen_inputs_safe():
    # 32 calibration rows over 64 inputs: GPTQ fits them (error ~0 there) by moving error where no row reaches.
    rng = np.random.default_rng(6)
    w1, w2 = rng.standard_normal((64, 32)).astype(F32), rng.standard_normal((16, 64)).astype(F32)
    reference = build(TWO_LAYERS, {"w1": w1, "w2": w2})
    data = [{"x": correlated_inputs(rng, 32, 64).astype(F32)}]
    unseen = [{"x": correlated_inputs(np.random.default_rng(7), 256, 64).astype(F32)}]
    errors, schemes = {}, {}
    for min_rows in (0.0, 1.0):
        model = reference.clone()
        calibrator = Calibrator.for_model(model, data, show_progress=False)
        QuantizePass(calibrator, wbits=3, abits=0, block_size=16, gptq=True, gptq_min_rows=min_rows)(model)
        schemes[min_rows] = [node.meta["graphquant.decision"].scheme for node in model.graph]
        QdqLoweringPass()(model)
        expected, got = run(reference, unseen[0])[0], run(model, unseen[0])[0]
        errors[min_rows] = float(np.sum((expected - got) ** 2) / np.sum(expected**2))
    assert schemes[0.0] == ["W3 block 16 GPTQ"] * 2 and not any("GPTQ" in s for s in schemes[1.0])
    assert gptq_module.gram_determined(64, 64, 1.0) and not gptq_module.gram_determined(63, 64, 1.0)
    assert errors[1.0] < errors[0.0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_spec_reproduces_the_gptq_weights_exactly(symmetric):
    """Lowering re-quantizes the weight with the spec: it must give back GPTQ's values, not round them again."""
    rng = np.random.default_rng(6)
    w1, w2 = rng.standard_normal((64, 32)).astype(F32), rng.standard_normal((16, 64)).astype(F32)
    model = build(TWO_LAYERS, {"w1": w1, "w2": w2})
    data = [{"x": rows} for rows in np.split(correlated_inputs(rng, 256, 64).astype(F32), 2)]
    calibrator = Calibrator.for_model(model, data, show_progress=False)
    QuantizePass(calibrator, wbits=3, abits=0, block_size=16, weight_symmetric=symmetric, gptq=True)(model)
    for node in model.graph:
        layer_weight = node.inputs[1].const_value.numpy()
        spec = node.meta["graphquant.input_specs"][1]
        np.testing.assert_array_equal(spec.dequantize(spec.quantize(layer_weight)), layer_weight)


CONV_LAYERS = """
<ir_version: 8, opset_import: ["" : 17]>
convs (float[N, 16, 8, 8] x) => (float[N, 12, 8, 8] y, float[N, 16, 8, 8] z, float[N, 8, 8, 8] u) {
  [full] y = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, w1)
  [depthwise] z = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1], group: int = 16>(x, w2)
  [grouped] u = Conv<kernel_shape: ints = [1, 1], group: int = 2>(x, w3)
}
"""


def correlated_images(rng: np.random.Generator, images: int) -> np.ndarray:
    """[images, 16, 8, 8] inputs, smooth in space and correlated across channels (what GPTQ and the Gram exploit)."""
    base = correlated_inputs(rng, images * 64, 16).reshape(images, 8, 8, 16).transpose(0, 3, 1, 2)
    return (base + np.roll(base, 1, axis=2) + np.roll(base, 1, axis=3)).astype(F32)


def conv_errors(gptq: bool, **options) -> tuple[list[str], dict[str, float]]:
    rng = np.random.default_rng(7)
    arrays = {"w1": rng.standard_normal((12, 16, 3, 3)), "w2": rng.standard_normal((16, 1, 3, 3))}
    arrays["w3"] = rng.standard_normal((8, 8, 1, 1))
    reference = build(CONV_LAYERS, {name: array.astype(F32) for name, array in arrays.items()})
    data = [{"x": images} for images in np.split(correlated_images(rng, 8), 2)]
    model = reference.clone()
    calibrator = Calibrator.for_model(model, data, show_progress=False)
    QuantizePass(calibrator, wbits=3, abits=0, weight_symmetric=False, gptq=gptq, **options)(model)
    schemes = [node.meta["graphquant.decision"].scheme for node in model.graph]
    QdqLoweringPass()(model)
    errors = dict.fromkeys(("full", "depthwise", "grouped"), 0.0)
    for feed in data:
        for name, expected, got in zip(errors, run(reference, feed), run(model, feed)):
            errors[name] += float(np.sum((expected - got) ** 2))
    return schemes, errors


def test_conv_gptq_and_depthwise_output_error_grids_beat_rtn_in_onnxruntime():
    schemes, gptq = conv_errors(True)
    _, rtn = conv_errors(False)
    assert schemes == ["W3 asym per-channel GPTQ", "W3 asym per-channel output-error grids", "W3 asym per-channel GPTQ"]
    assert gptq["full"] < 0.7 * rtn["full"]
    assert gptq["grouped"] < 0.95 * rtn["grouped"]
    assert gptq["depthwise"] < rtn["depthwise"]


def test_without_gptq_convs_the_convs_round_as_without_gptq():
    schemes, errors = conv_errors(True, gptq_convs=False)
    expected_schemes, expected = conv_errors(False)
    assert schemes == expected_schemes and not any("GPTQ" in scheme for scheme in schemes)
    assert errors == pytest.approx(expected, rel=1e-12)


def test_blocked_conv_gptq_lowers_to_blocked_dequantize_linear_on_axis_1():
    schemes, blocked = conv_errors(True, block_size=8)
    _, per_channel = conv_errors(True)
    assert schemes[0] == "W3 asym block 8 GPTQ" and schemes[1] == "W3 asym per-channel output-error grids"
    assert blocked["full"] < per_channel["full"]


def test_conv_gptq_weights_lie_on_the_lowered_grid_and_depthwise_weights_are_kept():
    rng = np.random.default_rng(8)
    arrays = {"w1": weights(rng, 12, 16, 3, 3), "w2": weights(rng, 16, 1, 3, 3), "w3": weights(rng, 8, 8, 1, 1)}
    model = build(CONV_LAYERS, arrays)
    data = [{"x": correlated_images(rng, 4)}]
    QuantizePass(Calibrator.for_model(model, data, show_progress=False), wbits=4, abits=0, block_size=8, gptq=True)(
        model
    )
    full, depthwise, grouped = (node.inputs[1].const_value.numpy() for node in model.graph)
    np.testing.assert_array_equal(depthwise, arrays["w2"])  # only its grid was chosen
    for node, weight in zip(list(model.graph)[::2], (full, grouped)):
        spec = node.meta["graphquant.input_specs"][1]
        np.testing.assert_array_equal(spec.dequantize(spec.quantize(weight)), weight)
        assert not np.array_equal(weight, arrays[node.inputs[1].name.split("_")[0]])


UPSAMPLE = """
<ir_version: 8, opset_import: ["" : 17]>
up (float[N, 16, 8, 8] x) => (float[N, 6, 16, 16] y) {
  [up] y = ConvTranspose<kernel_shape: ints = [4, 4], strides: ints = [2, 2], pads: ints = [1, 1, 1, 1]>(x, w)
}
"""


def test_conv_transpose_gptq_beats_rtn_in_onnxruntime():
    rng = np.random.default_rng(9)
    reference = build(UPSAMPLE, {"w": weights(rng, 16, 6, 4, 4)})
    data = [{"x": images} for images in np.split(correlated_images(rng, 8), 2)]
    errors, schemes = {}, {}
    for gptq in (False, True):
        model = reference.clone()
        QuantizePass(Calibrator.for_model(model, data, show_progress=False), wbits=3, abits=0, gptq=gptq)(model)
        schemes[gptq] = next(iter(model.graph)).meta["graphquant.decision"].scheme
        QdqLoweringPass()(model)
        errors[gptq] = sum(float(np.sum((run(reference, f)[0] - run(model, f)[0]) ** 2)) for f in data)
    assert schemes[True] == "W3 per-channel GPTQ"
    assert errors[True] < 0.8 * errors[False]


def moments_of(x_tilde: np.ndarray, x: np.ndarray) -> PairedMoments:
    """The PairedMoments of [samples, K] row sets (one group)."""
    return PairedMoments(
        (x_tilde.T @ x_tilde)[None], (x_tilde.T @ x)[None], x_tilde.sum(0)[None], x.sum(0)[None], len(x)
    )


def test_the_sequential_target_is_the_weight_itself_when_the_inputs_are_the_float_ones():
    rng = np.random.default_rng(10)
    x, weight = correlated_inputs(rng, 200, 16), rng.standard_normal((16, 6))
    np.testing.assert_allclose(sequential_target(weight, moments_of(x, x)), weight, rtol=1e-9, atol=1e-12)


def test_the_sequential_target_maps_the_perturbed_input_onto_the_float_output():
    rng = np.random.default_rng(11)
    x, weight = correlated_inputs(rng, 400, 16), rng.standard_normal((16, 6))
    x_tilde = x + 0.2 * rng.standard_normal(x.shape)
    target = sequential_target(weight, moments_of(x_tilde, x))
    best = np.linalg.lstsq(x_tilde, x @ weight, rcond=None)[0]
    plain, fitted, optimum = (float(np.sum((x @ weight - x_tilde @ w) ** 2)) for w in (weight, target, best))
    assert optimum <= fitted < min(1.01 * optimum, 0.97 * plain)


def test_the_mean_shift_is_the_mean_output_difference():
    rng = np.random.default_rng(12)
    x, weight = correlated_inputs(rng, 100, 8), rng.standard_normal((8, 4))
    x_tilde, rounded = x + 0.1 + 0.1 * rng.standard_normal(x.shape), np.round(weight * 2) / 2
    expected = (x @ weight - x_tilde @ rounded).mean(axis=0)
    np.testing.assert_allclose(mean_shift(weight, rounded, moments_of(x_tilde, x)), expected, rtol=1e-10)


CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
chain (float[N, 8, 8, 8] x) => (float[N, 8, 8, 8] y) {
  [stem] a = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]>(x, w1, b1)
  ar = Relu(a)
  [depthwise] d = Conv<kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1], group: int = 16>(ar, w2, b2)
  dr = Relu(d)
  [expand] e = Conv<kernel_shape: ints = [1, 1]>(dr, w3)
  er = Relu(e)
  [project] y = Conv<kernel_shape: ints = [1, 1]>(er, w4, b4)
}
"""


def chain_error(sequential: bool, abits: int) -> tuple[list[str], float]:
    """The schemes and the summed squared output error in onnxruntime of the W3 conv chain on its calibration data."""
    rng = np.random.default_rng(0)
    arrays = {
        "w1": weights(rng, 16, 8, 3, 3, scale=1 / 8),
        "b1": weights(rng, 16, scale=0.1),
        "w2": weights(rng, 16, 1, 3, 3, scale=1 / 3),
        "b2": weights(rng, 16, scale=0.1),
        "w3": weights(rng, 24, 16, 1, 1, scale=1 / 4),
        "w4": weights(rng, 8, 24, 1, 1, scale=1 / 5),
        "b4": weights(rng, 8, scale=0.1),
    }
    reference = build(CHAIN, arrays)
    data = [{"x": images} for images in np.split(correlated_images(rng, 16)[:, :8], 4)]
    model = reference.clone()
    calibrator = Calibrator.for_model(model, data, show_progress=False)
    QuantizePass(calibrator, wbits=3, abits=abits, weight_symmetric=False, gptq=True, gptq_sequential=sequential)(model)
    schemes = [node.meta["graphquant.decision"].scheme.split(",")[0] for node in model.graph if node.op_type == "Conv"]
    QdqLoweringPass()(model)
    return schemes, sum(float(np.sum((run(reference, f)[0] - run(model, f)[0]) ** 2)) for f in data)


@pytest.mark.parametrize("abits", [0, 8])
def test_sequential_conv_gptq_undoes_the_error_of_the_layers_before_it_in_onnxruntime(abits):
    schemes, sequential = chain_error(True, abits)
    _, plain = chain_error(False, abits)
    assert schemes == [
        "W3 asym per-channel GPTQ sequential",
        "W3 asym per-channel output-error grids sequential",
        "W3 asym per-channel GPTQ sequential",
        "W3 asym per-channel GPTQ sequential",
    ]
    assert sequential < 0.8 * plain


def test_the_memoized_inverse_hessian_factor_follows_the_gram_and_the_order():
    """Layers reading one activation share its factor; another Gram or act-order must not get it."""
    rng = np.random.default_rng(7)
    x = correlated_inputs(rng, 256, 32)
    weight = rng.standard_normal((32, 8))
    scaled = x * np.linspace(1, 3, 32)
    calls = [(x.T @ x, False), (x.T @ x, True), (scaled.T @ scaled, False), (x.T @ x, False)]
    fresh = []
    for gram, act_order in calls:
        gptq_module._FACTORS.clear()
        gptq_module._ROUNDED.clear()
        fresh.append(gptq_round(weight, gram, 4, False, 16, False, act_order)[0])
    gptq_module._FACTORS.clear()
    gptq_module._ROUNDED.clear()
    memoized = [gptq_round(weight, gram, 4, False, 16, False, act_order)[0] for gram, act_order in calls]
    for expected, actual in zip(fresh, memoized):
        np.testing.assert_array_equal(actual, expected)
    assert not np.array_equal(fresh[0], fresh[1]) and not np.array_equal(fresh[0], fresh[2])


def test_a_factor_over_the_memo_size_is_not_kept(monkeypatch):
    rng = np.random.default_rng(8)
    x = correlated_inputs(rng, 128, 16)
    gptq_module._FACTORS.clear()
    monkeypatch.setattr(gptq_module, "FACTOR_MEMO_BYTES", 16 * 16 * 8 - 1)
    gptq_round(rng.standard_normal((16, 4)), x.T @ x, 4, False, 16, False, False)
    assert len(gptq_module._FACTORS) == 0
    monkeypatch.setattr(gptq_module, "FACTOR_MEMO_BYTES", 16 * 16 * 8)
    gptq_round(rng.standard_normal((16, 4)), x.T @ x, 4, False, 16, False, False)
    assert len(gptq_module._FACTORS) == 1


def test_the_memoized_rounding_follows_every_argument_and_hands_out_copies(monkeypatch):
    rng = np.random.default_rng(9)
    x = correlated_inputs(rng, 256, 32)
    weight = rng.standard_normal((32, 8))
    with gptq_module.remembered_roundings():
        first = gptq_round(weight, x.T @ x, 4, False, 16, True, True)
        first[0][:] = 0.0  # the caller's copy: the memo keeps its own
        again = gptq_round(weight, x.T @ x, 4, False, 16, True, True)
        gptq_module._ROUNDED.clear()
        for expected, actual in zip(gptq_round(weight, x.T @ x, 4, False, 16, True, True), again):
            np.testing.assert_array_equal(actual, expected)
        other = gptq_round(weight, x.T @ x, 3, False, 16, True, True)[0]
        assert not np.array_equal(other, again[0]) and len(gptq_module._ROUNDED) == 2
        monkeypatch.setattr(gptq_module, "ROUNDED_MEMO_BYTES", weight.nbytes)
        gptq_round(weight, x.T @ x, 2, False, 16, True, True)
        assert len(gptq_module._ROUNDED) == 2  # a result larger than the memo is not kept


def test_roundings_are_remembered_only_inside_the_context():
    """Outside remembered_roundings() nothing is kept; leaving the outermost one drops what it kept."""
    rng = np.random.default_rng(10)
    x = correlated_inputs(rng, 128, 16)
    weight = rng.standard_normal((16, 4))
    gptq_round(weight, x.T @ x, 4, False, 16, False, False)
    assert len(gptq_module._ROUNDED) == 0
    with gptq_module.remembered_roundings():
        with gptq_module.remembered_roundings():
            gptq_round(weight, x.T @ x, 4, False, 16, False, False)
        assert len(gptq_module._ROUNDED) == 1
    assert len(gptq_module._ROUNDED) == 0


def test_one_blas_thread_rounds_bit_for_bit_as_the_default_threads(monkeypatch):
    rng = np.random.default_rng(44)
    x = correlated_inputs(rng, 256, 160)
    weight = weights(rng, 160, 48)
    rounded = []
    for limit in (4096, 0):  # one thread, then the default ones
        monkeypatch.setattr(gptq_module, "ONE_THREAD_CHANNELS", limit)
        gptq_module._FACTORS.clear()
        rounded.append(gptq_round(weight, x.T @ x, 4, False, 32, True, act_order=True))
    for first, second in zip(*rounded):
        np.testing.assert_array_equal(first, second)


def textbook_gptq(matrix: np.ndarray, gram: np.ndarray, bits: int, block: int, act_order: bool) -> np.ndarray:
    """GPTQ without lazy batches: each row's error is pushed onto every later row at once (asymmetric grids)."""
    energy = np.diag(gram)[:, None]
    order = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(len(gram))
    hessian = gram[np.ix_(order, order)] + 0.01 * np.mean(np.diag(gram)) * np.eye(len(gram))
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T
    static = fit_ranges(matrix.astype(np.float64), energy, bits, False, block, False)
    weights, rounded, ranges = matrix.astype(np.float64)[order], np.zeros(matrix.shape), None
    for row in range(len(gram)):
        if act_order:
            ranges = static[0][order[row] // block], static[1][order[row] // block]
        elif row % block == 0:
            low, high = fit_ranges(
                weights[row : row + block], energy[order[row : row + block]], bits, False, block, False
            )
            ranges = low[0], high[0]
        rounded[row] = round_trip(weights[row], *ranges, bits, False)
        weights[row + 1 :] -= np.outer(upper[row, row + 1 :], (weights[row] - rounded[row]) / upper[row, row])
    restored = np.empty_like(rounded)
    restored[order] = rounded
    return restored


@pytest.mark.parametrize(("block", "act_order"), [(32, False), (32, True), (300, False)])
def test_the_lazy_batches_round_as_textbook_gptq(block: int, act_order: bool):
    rng = np.random.default_rng(11)
    x = correlated_inputs(rng, 400, 300)  # 300 rows: three lazy batches, the last one short and a block cut
    matrix, gram = weights(rng, 300, 40), x.T @ x
    rounded, _, _ = gptq_round(matrix, gram, 4, False, block, False, act_order)
    np.testing.assert_allclose(rounded, textbook_gptq(matrix, gram, 4, block, act_order), rtol=0, atol=1e-9)
