"""conv_ranges: Conv activation statistics on axis 1, reduced in onnxruntime, and MSE-optimal grid bounds."""

from __future__ import annotations

import numpy as np
import pytest

from builders import build, run, weights
from graphquant.analysis import conv_ranges
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import candidates
from graphquant.analysis.stats import TensorStats

F32 = np.float32

# A conv whose output is also a graph output, so that onnxruntime gives the reference values; a Gemm after it.
CONV = """
<ir_version: 8, opset_import: ["" : 17]>
conv (float[N, 3, 9, 7] x) => (float[N, 5, 9, 7] c, float[N, 4] y) {
  [conv] c = Conv<pads: ints = [1, 1, 1, 1], kernel_shape: ints = [3, 3]>(x, w, b)
  g = GlobalAveragePool(c)
  f = Flatten(g)
  [fc] y = Gemm<transB: int = 1>(f, wf)
}
"""


@pytest.fixture(name="setup")
def fixture_setup():
    rng = np.random.default_rng(0)
    model = build(CONV, {"w": weights(rng, 5, 3, 3, 3), "b": weights(rng, 5), "wf": weights(rng, 4, 5)})
    data = [{"x": (rng.standard_normal((4, 3, 9, 7)) * (1 + i)).astype(F32)} for i in range(3)]
    return model, data


def test_conv_tensors_get_axis_1_statistics_matching_onnxruntime(setup):
    model, data = setup
    layers = [c.layer for c in candidates(model.graph) if c.layer is not None]
    ranks = conv_ranges.conv_activation_ranks(layers)
    assert ranks == {"x": 4, "c": 4}
    calibrator = Calibrator.for_model(model, data, show_progress=False)

    stats = conv_ranges.collect(calibrator, model, ["x", "c", "f"], ranks)

    outputs = [run(model, feed)[0] for feed in data]
    values = np.concatenate(outputs)
    found = stats["c"]
    np.testing.assert_allclose(found.channel_min, values.min(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(found.channel_max, values.max(axis=(0, 2, 3)), rtol=1e-6)
    batch_means = np.mean([v.mean(axis=(0, 2, 3)) for v in outputs], axis=0)
    np.testing.assert_allclose(found.channel_sum / found.count, batch_means, rtol=1e-5)
    np.testing.assert_allclose(
        found.channel_mean_square(), np.mean([(v**2).mean(axis=(0, 2, 3)) for v in outputs], axis=0), rtol=1e-5
    )
    assert found.absmax == pytest.approx(np.abs(values).max(), rel=1e-6)
    # Only every SUBSAMPLE-th row and column is histogrammed.
    sampled = values[:, :, :: conv_ranges.SUBSAMPLE, :: conv_ranges.SUBSAMPLE]
    assert found.abs_histogram.sum() == sampled.size
    inputs = np.concatenate([feed["x"] for feed in data])
    np.testing.assert_allclose(stats["x"].channel_max, inputs.max(axis=(0, 2, 3)), rtol=1e-6)
    # A name that is no Conv tensor keeps the calibrator's own statistics.
    plain = calibrator.collect(model, ["f"])["f"]
    np.testing.assert_allclose(stats["f"].channel_max, plain.channel_max, rtol=1e-6)
    np.testing.assert_array_equal(stats["f"].abs_histogram, plain.abs_histogram)
    assert [node.op_type for node in model.graph] == ["Conv", "GlobalAveragePool", "Flatten", "Gemm"]


def quantization_mse(values: np.ndarray, bound: float, bits: int, unsigned: bool) -> float:
    """Mean squared error of rounding |values| onto the grid of ``bound`` (clipped beyond it)."""
    levels = 2**bits - 1 if unsigned else 2 ** (bits - 1) - 1
    step = bound / levels
    low = 0 if unsigned else -levels
    return float(np.mean((np.clip(np.round(values / step), low, levels) * step - values) ** 2))


@pytest.mark.parametrize("unsigned", [False, True])
def test_mse_bound_clips_a_heavy_tail_and_beats_the_range(unsigned):
    # Laplace values: max|x| is about 12 scales for this many; the 4-bit MSE optimum is about 5 (Banner et al.).
    values = np.random.default_rng(1).laplace(size=200_000).astype(F32)
    if unsigned:
        values = np.abs(values)
    stats = TensorStats.from_batch(values[:, None])

    bound = conv_ranges.mse_bound(stats, 4, unsigned)

    assert bound < 0.7 * stats.absmax
    assert quantization_mse(values, bound, 4, unsigned) < 0.5 * quantization_mse(values, stats.absmax, 4, unsigned)


def test_mse_bound_keeps_the_range_of_uniform_values():
    values = np.random.default_rng(2).uniform(-1, 1, 100_000).astype(F32)
    stats = TensorStats.from_batch(values[:, None])
    assert conv_ranges.mse_bound(stats, 8, False) > 0.95 * stats.absmax
