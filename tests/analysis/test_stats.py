"""TensorStats and CalibrationStats: ranges, merging, the |x| histogram, non-finite values, persistence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from graphquant.analysis.stats import BINS_PER_OCTAVE, HIST_BINS, CalibrationStats, TensorStats

ONE_BIN = 2.0 ** (1.0 / BINS_PER_OCTAVE)  # the width of one histogram bin as a ratio (about 1.044)


def assert_same_stats(a: TensorStats, b: TensorStats) -> None:
    """Field-by-field equality of two TensorStats (ranges, histogram and counts)."""
    np.testing.assert_array_equal(a.channel_min, b.channel_min)
    np.testing.assert_array_equal(a.channel_max, b.channel_max)
    np.testing.assert_array_equal(a.abs_histogram, b.abs_histogram)
    assert a.count == b.count
    assert a.nonfinite == b.nonfinite


def test_from_batch_reduces_every_axis_but_the_last_like_numpy():
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((3, 5, 6)) * np.arange(1, 7)).astype(np.float32)
    stats = TensorStats.from_batch(values)
    rows = values.reshape(-1, 6)
    np.testing.assert_array_equal(stats.channel_min, rows.min(axis=0))
    np.testing.assert_array_equal(stats.channel_max, rows.max(axis=0))
    np.testing.assert_array_equal(stats.channel_absmax, np.abs(rows).max(axis=0))
    assert stats.absmax == float(np.abs(values).max())
    assert stats.minimum == float(values.min())
    assert stats.maximum == float(values.max())
    assert stats.count == 15
    assert stats.nonfinite == 0
    assert stats.abs_histogram.shape == (HIST_BINS,)
    assert int(stats.abs_histogram.sum()) == values.size


def test_from_batch_of_a_scalar_is_one_channel():
    stats = TensorStats.from_batch(np.float32(-3.0))
    assert stats.channel_min.shape == (1,)
    assert stats.absmax == 3.0
    assert stats.count == 1


def test_merge_is_associative_commutative_and_equals_the_concatenation():
    rng = np.random.default_rng(1)
    a, b, c = (rng.standard_normal((n, 4)).astype(np.float32) * s for n, s in ((7, 1.0), (3, 10.0), (11, 0.01)))
    sa, sb, sc = (TensorStats.from_batch(x) for x in (a, b, c))
    left = sa.merge(sb).merge(sc)
    right = sa.merge(sb.merge(sc))
    whole = TensorStats.from_batch(np.concatenate([a, b, c]))
    assert_same_stats(left, right)
    assert_same_stats(left, whole)
    assert_same_stats(sb.merge(sa), sa.merge(sb))
    assert whole.count == 21


def test_merge_with_an_empty_batch_is_the_identity():
    rng = np.random.default_rng(2)
    values = rng.standard_normal((5, 3)).astype(np.float32)
    empty = TensorStats.from_batch(np.zeros((0, 3), np.float32))
    assert empty.count == 0
    assert not empty.has_finite_values
    assert empty.absmax == 0.0
    assert_same_stats(TensorStats.from_batch(values).merge(empty), TensorStats.from_batch(values))


def test_merge_refuses_different_channel_counts():
    with pytest.raises(ValueError, match="channel counts differ"):
        TensorStats.from_batch(np.ones((2, 3), np.float32)).merge(TensorStats.from_batch(np.ones((2, 4), np.float32)))


@pytest.mark.parametrize("percentile", [50.0, 90.0, 99.0, 99.9])
def test_abs_percentile_is_within_one_bin_above_numpy(percentile):
    rng = np.random.default_rng(3)
    values = rng.standard_normal((50_000, 4)).astype(np.float32)
    stats = TensorStats.from_batch(values)
    exact = float(np.percentile(np.abs(values), percentile))
    got = stats.abs_percentile(percentile)
    # The answer is the upper edge of the bin holding the exact percentile: never below it, at most one bin above.
    assert exact * (1 - 1e-3) <= got <= exact * ONE_BIN * (1 + 1e-3)
    assert got / exact - 1 < 0.045


def test_abs_percentile_is_capped_by_absmax_and_merges():
    rng = np.random.default_rng(4)
    first = rng.uniform(-2.0, 2.0, (4000, 2)).astype(np.float32)
    second = rng.uniform(-8.0, 8.0, (4000, 2)).astype(np.float32)
    merged = TensorStats.from_batch(first).merge(TensorStats.from_batch(second))
    assert merged.abs_percentile(100.0) == merged.absmax == float(np.abs(second).max())
    exact = float(np.percentile(np.abs(np.concatenate([first, second])), 75.0))
    assert exact <= merged.abs_percentile(75.0) <= exact * ONE_BIN * (1 + 1e-3)


def test_nan_and_inf_are_left_out_and_counted():
    values = np.array(
        [[1.0, -2.0, np.nan], [np.inf, 4.0, 0.5], [-3.0, -np.inf, np.nan], [0.25, 0.0, -6.0]], dtype=np.float32
    )
    stats = TensorStats.from_batch(values)
    assert stats.nonfinite == 4
    assert stats.count == 4
    np.testing.assert_array_equal(stats.channel_min, [-3.0, -2.0, -6.0])
    np.testing.assert_array_equal(stats.channel_max, [1.0, 4.0, 0.5])
    assert stats.absmax == 6.0
    assert int(stats.abs_histogram.sum()) == 8  # only the finite values are binned
    assert np.all(np.isfinite(stats.channel_absmax))


def test_a_channel_with_no_finite_value_has_absmax_zero():
    values = np.array([[1.5, np.nan], [-0.5, np.inf]], dtype=np.float32)
    stats = TensorStats.from_batch(values)
    np.testing.assert_array_equal(stats.channel_absmax, [1.5, 0.0])
    assert stats.has_finite_values
    all_nan = TensorStats.from_batch(np.full((3, 2), np.nan, np.float32))
    assert not all_nan.has_finite_values
    assert all_nan.absmax == 0.0
    assert all_nan.nonfinite == 6


def test_all_zero_tensor_gives_absmax_zero_without_numpy_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # log2(0) must not leak a RuntimeWarning to users
        stats = TensorStats.from_batch(np.zeros((4, 3), np.float32))
    np.testing.assert_array_equal(stats.channel_absmax, np.zeros(3))
    assert stats.absmax == 0.0
    assert stats.abs_histogram[0] == 12  # zeros land in the lowest bin
    assert stats.abs_percentile(99.0) == 0.0
    assert stats.has_finite_values


def test_zero_range_tensor_has_equal_min_and_max():
    stats = TensorStats.from_batch(np.full((5, 2), -0.75, np.float32))
    np.testing.assert_array_equal(stats.channel_min, stats.channel_max)
    assert stats.absmax == 0.75
    assert stats.abs_percentile(50.0) == 0.75  # capped at absmax, not the bin edge


def test_calibration_stats_update_merges_batches():
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    stats = CalibrationStats()
    for batch in batches:
        stats.update("t", batch)
    assert "t" in stats and "u" not in stats
    assert_same_stats(stats["t"], TensorStats.from_batch(np.concatenate(batches)))


def test_calibration_stats_merge_of_shards():
    rng = np.random.default_rng(6)
    a, b, c = (rng.standard_normal((4, 2)).astype(np.float32) for _ in range(3))
    first, second = CalibrationStats(batches=2), CalibrationStats(batches=3)
    first.update("shared", a)
    first.update("only_first", c)
    second.update("shared", b)
    merged = first.merge(second)
    assert merged.batches == 5
    assert sorted(merged.tensors) == ["only_first", "shared"]
    assert_same_stats(merged["shared"], TensorStats.from_batch(np.concatenate([a, b])))
    assert_same_stats(merged["only_first"], TensorStats.from_batch(c))


def test_calibration_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    stats = CalibrationStats(batches=4)
    stats.update("/encoder/layer.0/MatMul_output_0", rng.standard_normal((6, 5)).astype(np.float32))
    stats.update("with_nan", np.array([[np.nan, 1.0], [2.0, -np.inf]], np.float32))
    stats.update("zeros", np.zeros((2, 3), np.float32))
    path = tmp_path / "stats.npz"
    stats.save(str(path))
    loaded = CalibrationStats.load(str(path))
    assert loaded.batches == 4
    assert sorted(loaded.tensors) == sorted(stats.tensors)
    for name in stats.tensors:
        assert_same_stats(loaded[name], stats[name])
        assert loaded[name].absmax == stats[name].absmax
        assert loaded[name].abs_percentile(90.0) == stats[name].abs_percentile(90.0)
    assert loaded["with_nan"].nonfinite == 2


def test_empty_calibration_stats_round_trip(tmp_path):
    path = tmp_path / "empty.npz"
    CalibrationStats().save(str(path))
    loaded = CalibrationStats.load(str(path))
    assert loaded.tensors == {}
    assert loaded.batches == 0


@pytest.mark.parametrize("shape", [(70_000, 1), (3, 50_000, 7), (40, 4_096), (2, 64, 56, 56), (0, 5)])
def test_from_batch_sums_in_slices_equal_one_float64_copy_bit_for_bit(shape):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(shape) * 10 ** rng.uniform(-3, 3, shape)).astype(np.float32)
    rows = values.reshape(-1, shape[-1]).astype(np.float64)
    stats = TensorStats.from_batch(values, sample_rows=5)
    np.testing.assert_array_equal(stats.channel_sum, rows.sum(axis=0))
    np.testing.assert_array_equal(stats.channel_sum_squares, np.square(rows).sum(axis=0))
    assert_same_stats(stats, TensorStats.from_batch(values, sample_rows=5, gram=True))
    np.testing.assert_array_equal(stats.sample, TensorStats.from_batch(values, sample_rows=5, gram=True).sample)


def test_from_batch_allocates_a_fraction_of_a_float64_copy():
    import tracemalloc

    values = np.random.default_rng(2).standard_normal((64, 224, 224), dtype=np.float32)
    tracemalloc.start()
    TensorStats.from_batch(values)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < values.nbytes / 2  # one float64 copy alone would be 2x the batch


def test_affine_of_fully_sampled_stats_equals_the_stats_of_the_transformed_rows():
    rng = np.random.default_rng(7)
    batches = [rng.normal(size=(3, 5, 4)).astype(np.float32) for _ in range(2)]
    scale, offset = np.array([1.0, 0.5, 2.0, 0.0], np.float32), np.array([-1.0, 0.0, 3.0, 0.25], np.float32)
    stats = CalibrationStats()
    moved = CalibrationStats()
    for batch in batches:
        stats.update("x", batch, sample_rows=64)
        moved.update("x", batch * scale + offset, sample_rows=64)
    derived = stats["x"].affine(scale, offset)
    assert derived.exact_histogram
    np.testing.assert_array_equal(derived.channel_min, moved["x"].channel_min)
    np.testing.assert_array_equal(derived.channel_max, moved["x"].channel_max)
    np.testing.assert_array_equal(derived.abs_histogram, moved["x"].abs_histogram)
    np.testing.assert_array_equal(derived.sample, moved["x"].sample)
    np.testing.assert_allclose(derived.channel_sum_squares, moved["x"].channel_sum_squares, rtol=1e-12)
    assert derived.count == moved["x"].count == 30


def test_affine_of_partly_sampled_stats_transforms_ranges_and_sums_and_marks_the_histogram_inexact():
    rng = np.random.default_rng(8)
    batch = rng.normal(size=(40, 3)).astype(np.float32)
    scale, offset = np.array([2.0, 0.0, 1.0], np.float32), np.array([0.5, 0.0, -4.0], np.float32)
    derived = TensorStats.from_batch(batch, sample_rows=8).affine(scale, offset)
    moved = TensorStats.from_batch(batch * scale + offset, sample_rows=8)
    assert not derived.exact_histogram and derived.gram is None
    np.testing.assert_allclose(derived.channel_min, moved.channel_min, rtol=1e-6)
    np.testing.assert_allclose(derived.channel_max, moved.channel_max, rtol=1e-6)
    np.testing.assert_allclose(derived.channel_mean_square(), moved.channel_mean_square(), rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(derived.sample, moved.sample)


def test_the_exactness_of_the_histogram_survives_save_and_load(tmp_path):
    stats = CalibrationStats()
    stats.update("x", np.arange(12, dtype=np.float32).reshape(4, 3), sample_rows=2)
    stats.tensors["x"] = stats["x"].affine(np.ones(3, np.float32), np.zeros(3, np.float32))
    stats.save(str(tmp_path / "s.npz"))
    assert not CalibrationStats.load(str(tmp_path / "s.npz"))["x"].exact_histogram


def edge_neighbours() -> np.ndarray:
    """The float32 values at and around every bin edge 2**(k/BINS_PER_OCTAVE), a few ulps either side."""
    from graphquant.analysis.stats import HIST_MAX_EXP, HIST_MIN_EXP

    edges = 2.0 ** (
        np.arange((HIST_MIN_EXP - 1) * BINS_PER_OCTAVE, (HIST_MAX_EXP + 1) * BINS_PER_OCTAVE + 1) / BINS_PER_OCTAVE
    )
    nearest = edges.astype(np.float32).view(np.int32)
    return (nearest[:, None] + np.arange(-4, 5, dtype=np.int32)[None, :]).ravel().view(np.float32)


def test_the_table_histogram_bins_every_value_as_its_log2_does():
    from graphquant.analysis.stats import TABLE_SHIFT, _bin_table, _histogram, _log2_bins

    rng = np.random.default_rng(21)
    spread = rng.standard_normal(1 << 18) * 10.0 ** rng.uniform(-16, 16, 1 << 18)
    special = np.array([0.0, 1e-45, 1.2e-38, 2.0**-40, 2.0**40, 3.4e38, np.inf, np.nan], np.float32)
    values = np.abs(np.concatenate([spread.astype(np.float32), special, edge_neighbours()]))
    np.testing.assert_array_equal(_histogram(values), np.bincount(_log2_bins(values), minlength=HIST_BINS))
    # Every run of the table is checked on its own: its first value, its last, and a value between them.
    table = _bin_table()
    runs = np.flatnonzero(table >= 0).astype(np.uint32) << TABLE_SHIFT
    for offset in (0, (1 << TABLE_SHIFT) // 2 + 1, (1 << TABLE_SHIFT) - 1):
        members = (runs + np.uint32(offset)).view(np.float32)
        np.testing.assert_array_equal(table[table >= 0], _log2_bins(members))
