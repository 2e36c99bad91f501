"""Calibrator: intermediate-tensor statistics from one onnxruntime pass, non-finite handling."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from builders import build, initializer, weights
from graphquant.analysis.calibration import Calibrator, NonFiniteCalibrationWarning
from graphquant.analysis.stats import HIST_BINS
from graphquant.errors import CalibrationError

GRAPH = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 6] x) => (float[N, 3] y) {
  h = MatMul(x, w)
  a = Add(h, b)
  r = Relu(a)
  y = MatMul(r, w2)
  s = Shape(x)
}
"""


@pytest.fixture
def model():
    rng = np.random.default_rng(0)
    return build(GRAPH, {"w": weights(rng, 6, 5), "b": weights(rng, 5), "w2": weights(rng, 5, 3)})


def numpy_intermediates(model, x: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's tensors computed in numpy."""
    h = x @ initializer(model, "w")
    a = h + initializer(model, "b")
    r = np.maximum(a, 0)
    return {"x": x, "h": h, "a": a, "r": r, "y": r @ initializer(model, "w2")}


def test_collect_matches_numpy_on_intermediates(model):
    rng = np.random.default_rng(1)
    data = [{"x": (rng.standard_normal((n, 6)) * 3).astype(np.float32)} for n in (4, 7, 1)]
    stats = Calibrator.for_model(model, data, show_progress=False).collect(model, ["h", "r", "x", "y", "h", "s"])
    assert stats.batches == 3
    assert sorted(stats.tensors) == ["h", "r", "x", "y"]  # duplicates collapse; the int64 Shape output is skipped
    whole = numpy_intermediates(model, np.concatenate([feed["x"] for feed in data]))
    for name, stat in stats.tensors.items():
        np.testing.assert_allclose(stat.channel_min, whole[name].min(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stat.channel_max, whole[name].max(axis=0), rtol=1e-5, atol=1e-6)
        assert stat.count == 12
        assert int(stat.abs_histogram.sum()) == whole[name].size
        assert stat.nonfinite == 0
    assert stats["r"].minimum == 0.0  # Relu output: some channel hits exactly zero
    np.testing.assert_allclose(stats["h"].absmax, np.abs(whole["h"]).max(), rtol=1e-5)


def test_collect_with_no_names_returns_empty_stats(model):
    data = [{"x": np.ones((2, 6), np.float32)}]
    stats = Calibrator.for_model(model, data, show_progress=False).collect(model, [])
    assert stats.tensors == {} and stats.batches == 0


def test_nan_in_data_warns_and_keeps_the_stats_finite(model):
    rng = np.random.default_rng(2)
    clean = rng.standard_normal((5, 6)).astype(np.float32)
    dirty = rng.standard_normal((5, 6)).astype(np.float32)
    dirty[1, 2] = np.nan  # poisons row 1 of h (every channel) once it goes through the MatMul
    data = [{"x": clean}, {"x": dirty}]
    with pytest.warns(NonFiniteCalibrationWarning, match="NaN/Inf values"):
        stats = Calibrator.for_model(model, data, show_progress=False).collect(model, ["h"])
    h = numpy_intermediates(model, np.concatenate([clean, dirty]))["h"]
    assert stats["h"].nonfinite == int(np.isnan(h).sum()) == 5
    assert np.all(np.isfinite(stats["h"].channel_min)) and np.all(np.isfinite(stats["h"].channel_max))
    np.testing.assert_allclose(stats["h"].channel_min, np.nanmin(h, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["h"].channel_max, np.nanmax(h, axis=0), rtol=1e-5, atol=1e-6)


def test_clean_data_gives_no_warning(model):
    data = [{"x": np.ones((2, 6), np.float32)}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Calibrator.for_model(model, data, show_progress=False).collect(model, ["h", "r"])


def test_tensor_with_no_finite_value_is_refused(model):
    data = [{"x": np.full((3, 6), np.nan, np.float32)}]
    with pytest.raises(CalibrationError, match="input 'x' has no finite value"):
        Calibrator.for_model(model, data, show_progress=False).collect(model, ["h"])


def test_stats_size_does_not_grow_with_the_sample_count(model):
    def shapes(count: int) -> dict[str, tuple]:
        rng = np.random.default_rng(count)
        data = [{"x": rng.standard_normal((8, 6)).astype(np.float32)} for _ in range(count // 8)]
        stats = Calibrator.for_model(model, data, show_progress=False).collect(model, ["h", "r"])
        assert stats["h"].count == count
        return {
            (name, field.name): np.shape(getattr(stat, field.name))
            for name, stat in stats.tensors.items()
            for field in dataclasses.fields(stat)
        }

    small, large = shapes(8), shapes(64)
    assert small == large
    assert small[("h", "abs_histogram")] == (HIST_BINS,)
    assert small[("h", "channel_min")] == (5,)


def test_for_model_checks_the_data_against_the_model(model):
    with pytest.raises(CalibrationError, match="'x': shape"):
        Calibrator.for_model(model, [{"x": np.zeros((2, 5), np.float32)}], show_progress=False)


def stats_bytes(stats) -> dict[str, int]:
    """The bytes each tensor's statistics hold (every numpy field, the row sample included)."""
    return {
        name: sum(field.nbytes for field in dataclasses.astuple(tensor) if isinstance(field, np.ndarray))
        for name, tensor in stats.tensors.items()
    }


def test_statistics_do_not_grow_with_the_number_of_samples(model):
    rng = np.random.default_rng(5)
    few = [{"x": rng.standard_normal((32, 6)).astype(np.float32)} for _ in range(4)]
    many = [{"x": rng.standard_normal((32, 6)).astype(np.float32)} for _ in range(16)]
    sizes = []
    for data in (few, many):
        stats = Calibrator.for_model(model, iter(data), show_progress=False).collect(model, ["h", "r"], sample_rows=64)
        assert all(tensor.sample.shape == (64, 5) for tensor in stats.tensors.values())
        sizes.append(stats_bytes(stats))
    assert sizes[0] == sizes[1]
