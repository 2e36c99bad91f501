"""Scheme simulation (GroupSimulator) against onnxruntime, and the stats it relies on."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest
from builders import build, run, weights
from threadpoolctl import threadpool_info

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import classify
from graphquant.analysis.simulate import GroupSimulator, fake_quantize, one_blas_thread, scored_columns
from graphquant.analysis.stats import CalibrationStats, TensorStats
from graphquant.graph_edit import NameScope
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.passes.quantize import QuantizePass
from graphquant.quant_spec import PREEXECUTED_KEY
from graphquant.rewrites import apply_channel_affine, route_channels_to_float, scale_rows_at_run_time, scale_weight_rows

F32 = np.float32

GROUP = """
<ir_version: 8, opset_import: ["" : 17]>
group (float[N, 16] x) => (float[N, 8] y, float[N, 8] z) {
  [fc1] y_raw = MatMul(x, w1)
  [fc1_bias] y = Add(y_raw, b1)
  [fc2] z = Gemm<transB: int = 1>(x, w2, c2)
}
"""


def group_model(rng: np.random.Generator, w1=None, b1=None) -> ir.Model:
    return build(
        GROUP,
        {
            "w1": weights(rng, 16, 8) if w1 is None else w1,
            "b1": weights(rng, 8) if b1 is None else b1,
            "w2": weights(rng, 8, 16),
            "c2": weights(rng, 8),
        },
    )


def layers_of(model: ir.Model):
    return [classify(node).layer for node in model.graph if node.op_type in ("MatMul", "Gemm")]


def outlier_rows(rng: np.random.Generator, rows: int = 512) -> np.ndarray:
    x = rng.standard_normal((rows, 16)).astype(F32)
    x[:, [2, 9]] = x[:, [2, 9]] * 25 + 30
    return x


def channel_averaged_sqnr_db(references: list[np.ndarray], candidates: list[np.ndarray]) -> float:
    """The simulation's metric on real outputs: the mean over output channels of |error|²/|signal|²."""
    errors = [
        np.sum((ref.astype(np.float64) - cand) ** 2, axis=0) / np.sum(ref.astype(np.float64) ** 2, axis=0)
        for ref, cand in zip(references, candidates)
    ]
    return -10 * math.log10(float(np.mean(np.concatenate(errors))))


# --- GroupSimulator ---


def group_sqnr_db(rows, layers, divisor, abits, wbits, activation_step=None, float_channels=None):
    return GroupSimulator(rows, layers).sqnr_db(divisor, abits, wbits, activation_step, float_channels)


def test_exactly_representable_group_has_infinite_sqnr():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (16, 8)).astype(F32)
    w[0] = 127  # every column reaches ±127: its step is exactly 1
    model = group_model(rng, w1=w, b1=np.zeros(8, F32))
    layer = layers_of(model)[0]
    rows = rng.integers(-127, 128, (64, 16)).astype(F32)
    rows[0, 0] = -127  # the per-tensor step is exactly 1 too
    ones = np.ones(16)
    assert group_sqnr_db(rows, [layer], ones, abits=8, wbits=8) == math.inf
    assert group_sqnr_db(rows, [layer], ones, abits=8, wbits=8, activation_step=1.0) == math.inf
    assert group_sqnr_db(rows, [layer], ones, abits=8, wbits=8, activation_step=2.0) < 60  # a coarser grid is not exact
    assert group_sqnr_db(rows, [layer], ones, abits=7, wbits=8) < math.inf


def test_sqnr_decreases_with_fewer_bits():
    rng = np.random.default_rng(1)
    model = group_model(rng)
    rows = outlier_rows(rng)
    layers = layers_of(model)
    divisor = np.ones(16)
    by_bits = [group_sqnr_db(rows, layers, divisor, bits, bits) for bits in (8, 7, 6, 5, 4, 3)]
    assert all(a > b for a, b in itertools.pairwise(by_bits)), by_bits
    assert by_bits[0] - by_bits[-1] > 20
    weight_only = [group_sqnr_db(rows, layers, divisor, 8, bits) for bits in (8, 6, 4)]
    assert weight_only[0] > weight_only[1] > weight_only[2]


def quantized_copy(model: ir.Model, rows: np.ndarray, activation_symmetric: bool = True) -> ir.Model:
    """W8A8 QDQ (per-tensor MinMax, per-channel absmax) calibrated on exactly ``rows``."""
    copy = model.clone()
    calibrator = Calibrator.for_model(copy, [{"x": rows}], show_progress=False)
    QuantizePass(calibrator, activation_symmetric=activation_symmetric)(copy)
    QdqLoweringPass()(copy)
    return copy


def migrated(model: ir.Model, divisor: np.ndarray, float_channels: np.ndarray | None = None) -> ir.Model:
    """The exact X/d, diag(d)·W rewrite (with channels routed to float), as the pass applies it."""
    copy = model.clone()
    graph = copy.graph
    names = NameScope(graph)
    layers = layers_of(copy)
    x = graph.inputs[0]
    scale = (1 / divisor).astype(F32)
    if float_channels is not None:
        route_channels_to_float(graph, names, x, layers, float_channels)
        scale[float_channels] = 0
    for layer in layers:
        scale_weight_rows(graph, names, layer, divisor.astype(F32))
    apply_channel_affine(graph, names, x, [layer.node for layer in layers], scale, np.zeros(16, F32))
    return copy


@pytest.mark.parametrize("scheme", ["per-tensor", "divided", "divided+float-channels"])
def test_simulated_sqnr_matches_the_quantized_model_in_onnxruntime(scheme):
    rng = np.random.default_rng(2)
    model = group_model(rng)
    rows = outlier_rows(rng)
    layers = layers_of(model)
    divisor = np.ones(16)
    float_channels = None
    if scheme != "per-tensor":
        absmax = np.abs(rows).max(axis=0)
        divisor = np.sqrt(absmax / absmax.min())  # SmoothQuant-like
    if scheme == "divided+float-channels":
        float_channels = np.array([2, 9])
    simulated = group_sqnr_db(rows, layers, divisor, 8, 8, None, float_channels)
    candidate = quantized_copy(migrated(model, divisor, float_channels), rows)
    measured = channel_averaged_sqnr_db(run(model, {"x": rows}), run(candidate, {"x": rows}))
    assert simulated == pytest.approx(measured, abs=0.2)


def test_simulated_asymmetric_sqnr_matches_the_zero_point_grid_in_onnxruntime():
    rng = np.random.default_rng(12)
    model = group_model(rng)
    rows = outlier_rows(rng)  # channels 2 and 9 centred on +30: a lopsided tensor
    layers = layers_of(model)
    ones = np.ones(16)
    simulated = GroupSimulator(rows, layers).sqnr_db(ones, 8, 8, asymmetric=True)
    candidate = quantized_copy(model, rows, activation_symmetric=False)
    measured = channel_averaged_sqnr_db(run(model, {"x": rows}), run(candidate, {"x": rows}))
    assert simulated == pytest.approx(measured, abs=0.2)
    assert simulated > GroupSimulator(rows, layers).sqnr_db(ones, 8, 8) + 2  # the signed grid wastes codes


def test_routing_the_outlier_channels_beats_per_tensor_in_simulation():
    rng = np.random.default_rng(3)
    model = group_model(rng)
    rows = outlier_rows(rng)
    layers = layers_of(model)
    ones = np.ones(16)
    routed = group_sqnr_db(rows, layers, ones, 8, 8, None, np.array([2, 9]))
    assert routed > group_sqnr_db(rows, layers, ones, 8, 8) + 10


WIDE = """
<ir_version: 8, opset_import: ["" : 17]>
wide (float[N, 16] x) => (float[N, 3000] y) {
  [head] y = MatMul(x, w)
}
"""


def test_a_wide_layer_is_scored_on_evenly_spaced_columns_close_to_all_of_them():
    rng = np.random.default_rng(4)
    model = build(WIDE, {"w": weights(rng, 16, 3000)})
    rows = outlier_rows(rng)
    layers = layers_of(model)
    capped = GroupSimulator(rows, layers, max_columns=512)
    assert capped.weight.shape == (16, 512)
    np.testing.assert_array_equal(scored_columns(3000, 512)[[0, -1]], [0, 2999])
    full = GroupSimulator(rows, layers, max_columns=3000)
    for divisor in (np.ones(16), np.sqrt(np.abs(rows).max(axis=0))):
        assert capped.sqnr_db(divisor, 8, 8) == pytest.approx(full.sqnr_db(divisor, 8, 8), abs=0.3)


def test_fake_quantize_is_symmetric_round_to_nearest_with_restricted_range():
    values = np.array([-300.0, -1.5, -0.5, 0.49, 0.5, 1.5, 2.5, 126.6, 300.0])
    np.testing.assert_array_equal(fake_quantize(values, 1.0, 8), [-127, -2, -0, 0, 0, 2, 2, 127, 127])
    np.testing.assert_array_equal(fake_quantize(values, 0.5, 4), [-3.5, -1.5, -0.5, 0.5, 0.5, 1.5, 2.5, 3.5, 3.5])


# --- stats: channel sums and row samples ---


def batches(rng: np.random.Generator, count: int, rows: int = 37, channels: int = 6) -> list[np.ndarray]:
    shifts = np.array([0.0, 5.0, -3.0, 50.0, 0.1, -20.0])[:channels]
    return [(rng.standard_normal((rows, channels)) * 2 + shifts).astype(F32) for _ in range(count)]


def merged(data: list[np.ndarray], sample_rows: int = 0) -> TensorStats:
    stats = TensorStats.from_batch(data[0], sample_rows)
    for batch in data[1:]:
        stats = stats.merge(TensorStats.from_batch(batch, sample_rows))
    return stats


def test_channel_mean_square_after_shift_matches_numpy():
    rng = np.random.default_rng(7)
    data = batches(rng, 20)
    stats = merged(data)
    everything = np.concatenate(data).astype(np.float64)
    shift = rng.uniform(-30, 30, 6)
    np.testing.assert_allclose(
        stats.channel_mean_square_after_shift(shift), np.mean((everything - shift) ** 2, axis=0), rtol=1e-9
    )
    np.testing.assert_allclose(stats.channel_mean_square(), np.mean(everything**2, axis=0), rtol=1e-9)
    midpoint = (everything.min(axis=0) + everything.max(axis=0)) / 2
    np.testing.assert_allclose(
        stats.channel_mean_square_after_shift(midpoint), np.mean((everything - midpoint) ** 2, axis=0), rtol=1e-9
    )


def test_channel_mean_square_survives_save_and_load(tmp_path):
    rng = np.random.default_rng(8)
    stats = CalibrationStats()
    for batch in batches(rng, 5):
        stats.update("h", batch[None], sample_rows=16)  # a leading batch axis is reduced too
    path = str(tmp_path / "stats.npz")
    stats.save(path)
    loaded = CalibrationStats.load(path)["h"]
    shift = np.arange(6.0)
    np.testing.assert_array_equal(
        loaded.channel_mean_square_after_shift(shift), stats["h"].channel_mean_square_after_shift(shift)
    )
    np.testing.assert_array_equal(loaded.sample, stats["h"].sample)


def test_channel_mean_square_needs_channel_sums():
    stats = TensorStats.from_batch(np.ones((3, 2), F32))
    empty = TensorStats(stats.channel_min, stats.channel_max, stats.abs_histogram, count=3)
    with pytest.raises(ValueError, match="no channel sums"):
        empty.channel_mean_square()


def test_row_sample_is_bounded_representative_and_deterministic():
    rng = np.random.default_rng(9)
    data = batches(rng, 60)
    limit = 64
    first = merged(data, sample_rows=limit)
    second = merged(data, sample_rows=limit)
    assert first.sample is not None and first.sample_limit == limit
    assert first.sample.shape == (limit, 6)
    np.testing.assert_array_equal(first.sample, second.sample)
    # Every sampled row is a real row, and the sample draws on the whole stream, not only its start.
    origin = {tuple(row): index for index, batch in enumerate(data) for row in batch}
    batches_seen = {origin[tuple(row)] for row in first.sample}
    assert min(batches_seen) == 0 and max(batches_seen) >= 55 and len(batches_seen) >= 40
    for count in (1, 2, 3, 10, 59):  # bounded after every merge
        assert merged(data[:count], sample_rows=limit).sample.shape[0] <= limit
    # A batch with fewer rows than the limit keeps them all.
    np.testing.assert_array_equal(TensorStats.from_batch(data[0], sample_rows=limit).sample, data[0])


def test_calibrator_row_sample_is_bounded_across_many_batches():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    one (float[N, 6] x) => (float[N, 6] y) {
      [relu] y = Relu(x)
    }
    """
    model = build(text)
    rng = np.random.default_rng(10)
    data = [{"x": batch} for batch in batches(rng, 40, rows=25)]
    calibrator = Calibrator.for_model(model, data, show_progress=False)
    first, second = (calibrator.collect(model, ["y"], sample_rows=100)["y"] for _ in range(2))
    assert first.sample.shape == (100, 6) and first.count == 1000
    np.testing.assert_array_equal(first.sample, second.sample)
    assert np.all(first.sample >= 0)  # rows of the Relu output


def test_scoring_a_large_layer_makes_no_float64_copy_of_its_weight():
    rng = np.random.default_rng(12)
    model = group_model(rng)
    weight = rng.standard_normal((4096, 4096)).astype(F32)
    model.graph.initializers["w1"].const_value = ir.Tensor(weight, name="w1")
    model.graph.initializers["b1"].const_value = ir.Tensor(np.zeros(4096, F32), name="b1")
    layer = layers_of(model)[0]
    x = rng.standard_normal((64, 4096)).astype(F32)
    tracemalloc.start()
    try:
        score = group_sqnr_db(x, [layer], np.ones(4096), 8, 8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 30.0 < score < 50.0  # W8A8 per-tensor activations on Gaussian data
    assert peak < 2 * weight.nbytes  # a float64 copy of the weight alone would be twice its bytes


BIASED = """
<ir_version: 8, opset_import: ["" : 17]>
biased (float[N, 16] x) => (float[N, 8] y) {
  [fc1] y_raw = MatMul(x, w1)
  [fc1_bias] y = Add(y_raw, b1)
}
"""


def test_simulated_per_row_sqnr_matches_run_time_row_scales_in_onnxruntime():
    rng = np.random.default_rng(5)
    model = build(BIASED, {"w1": weights(rng, 16, 8), "b1": weights(rng, 8)})
    rows = outlier_rows(rng)
    rows[::16] *= 300  # sink-like tokens, every 16th row
    layers = layers_of(model)
    divisor = np.sqrt(np.abs(rows).max(axis=0))
    simulated = GroupSimulator(rows, layers).sqnr_db(divisor, 8, 8, per_row=True)
    candidate = migrated(model, divisor)
    graph = candidate.graph
    (layer,) = layers_of(candidate)
    scale_rows_at_run_time(graph, NameScope(graph), layer.activation, [layer], 127).meta[PREEXECUTED_KEY] = 8
    QuantizePass(Calibrator.for_model(candidate, [{"x": rows}], show_progress=False))(candidate)
    QdqLoweringPass()(candidate)
    measured = channel_averaged_sqnr_db(run(model, {"x": rows}), run(candidate, {"x": rows}))
    assert simulated == pytest.approx(measured, abs=0.2)
    assert simulated > GroupSimulator(rows, layers).sqnr_db(divisor, 8, 8) + 6  # per tensor, the tokens set the step


def test_a_strided_simulator_scores_as_one_built_on_those_rows():
    rng = np.random.default_rng(5)
    model = build(WIDE, {"w": weights(rng, 16, 300)})
    rows, layers = outlier_rows(rng), layers_of(model)
    strided, built = GroupSimulator(rows, layers).every(4), GroupSimulator(rows[::4], layers)
    assert strided.rows.shape == built.rows.shape == (-(-len(rows) // 4), 16)
    routed = np.array([0, 3])
    for divisor in (np.ones(16), np.sqrt(np.abs(rows).max(axis=0))):
        for options in ({}, {"per_row": True}, {"float_channels": routed}):
            assert strided.sqnr_db(divisor, 8, 8, **options) == pytest.approx(
                built.sqnr_db(divisor, 8, 8, **options), abs=1e-4
            )


def test_one_blas_thread_limits_blas_inside_and_restores_it_after():
    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    with one_blas_thread():
        inside = blas_threads()
    assert inside and set(inside) == {1}
    assert blas_threads() == before


# float32 rounding: 1e-4 dB is a 2.3e-5 relative change of the error energy.
TOLERANCE_DB = 1e-4


def textbook_sqnr_db(
    simulator: GroupSimulator, divisor, abits, wbits, step=None, routed=None, per_row=False, asym=False
):
    """The scoring as first written: X/d and W·d fake-quantized in float32 copies, one float GEMM, no shortcuts."""
    scaled = simulator.rows / divisor.astype(F32)
    if routed is not None:
        scaled[:, routed] = 0
    qmax = 2 ** (abits - 1) - 1
    if asym and step is None and not per_row:
        low, high = min(float(scaled.min()), 0.0), max(float(scaled.max()), 0.0)
        grid = max(high - low, 1e-12) / (2**abits - 1)
        zero = float(np.rint(-low / grid))
        x_q = np.clip(np.rint(scaled / grid), -zero, 2**abits - 1 - zero) * grid
    else:
        if step is None:
            absmax = np.abs(scaled).max(axis=1, keepdims=True) if per_row else float(np.abs(scaled).max())
            step = np.maximum(absmax, 1e-12) / qmax
        x_q = fake_quantize(scaled, step, abits)
    migrated = simulator.weight * divisor.astype(F32)[:, None]
    if routed is not None:
        migrated[routed, :] = 0
    w_q = fake_quantize(migrated, np.maximum(np.abs(migrated).max(axis=0), 1e-12) / (2 ** (wbits - 1) - 1), wbits)
    output = x_q @ w_q
    if routed is not None:
        output += simulator.rows[:, routed] @ simulator.weight[routed, :]
    error = (simulator.product - output).astype(np.float64)
    return -10 * math.log10(float(np.mean(np.sum(error**2, axis=0) / simulator.signal)))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"step": 1.0},
        {"step": 0.37},
        {"per_row": True},
        {"asym": True},
        {"routed": np.array([2, 9])},
        {"routed": np.array([2, 9]), "per_row": True},
        {"routed": np.array([2, 9]), "asym": True},
    ],
    ids=["per-tensor", "preexecuted", "given-step", "per-row", "asymmetric", "routed", "routed-per-row", "routed-asym"],
)
def test_fast_scoring_equals_the_textbook_definition(options):
    rng = np.random.default_rng(13)
    model = group_model(rng)
    rows = outlier_rows(rng, rows=300)
    rows[::7] *= 40  # sink-like tokens
    simulator = GroupSimulator(rows, layers_of(model))
    absmax = np.abs(rows).max(axis=0)
    divisors = [np.ones(16), np.sqrt(absmax / absmax.min()), absmax / 127, -np.sqrt(absmax)]  # a negative one too
    for abits, wbits in ((8, 8), (8, 4), (6, 8)):
        for divisor in divisors:
            step = options.get("step")
            if step == 1.0:
                divisor = divisor * 0 + absmax / (2 ** (abits - 1) - 1)  # the step pre-executed: codes are X/d
            fast = simulator.sqnr_db(
                divisor,
                abits,
                wbits,
                step,
                options.get("routed"),
                options.get("per_row", False),
                options.get("asym", False),
            )
            assert fast == pytest.approx(
                textbook_sqnr_db(simulator, divisor, abits, wbits, **options), abs=TOLERANCE_DB
            )
    assert simulator.every(3).sqnr_db(divisors[1], 8, 8) == pytest.approx(
        textbook_sqnr_db(simulator.every(3), divisors[1], 8, 8), abs=TOLERANCE_DB
    )


def test_a_zero_divisor_is_refused():
    rng = np.random.default_rng(14)
    simulator = GroupSimulator(outlier_rows(rng, rows=32), layers_of(group_model(rng)))
    with pytest.raises(ValueError, match="nonzero"):
        simulator.sqnr_db(np.r_[np.zeros(1), np.ones(15)], 8, 8)
