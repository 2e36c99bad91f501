"""BitMoD grids and per-group type selection, against a brute-force nearest-value reference."""

from __future__ import annotations

import numpy as np
import pytest

from graphquant.analysis.bitmod import BITMOD_TYPES, CLIP_RATIOS, GridType, int_type, quantize_weight

FP4 = {0, 1, 2, 3, 4, 6, 8, 12}
FP3 = {0, 1, 2, 4}


def symmetric(base: set[int]) -> set[float]:
    return {float(v) for v in base} | {-float(v) for v in base}


def brute_force_errors(groups: np.ndarray, types: tuple[GridType, ...], ratios: tuple[float, ...]) -> np.ndarray:
    """[groups, types]: the best squared error of each type over the ratios, rounding by an explicit argmin."""
    errors = np.full((groups.shape[0], len(types)), np.inf)
    for t, grid_type in enumerate(types):
        grid = np.asarray(grid_type.values, np.float64)
        for group, values in enumerate(groups.astype(np.float64)):
            positive, negative = max(values.max(), 0.0), max(-values.min(), 0.0)
            cover = max(positive / grid[-1], negative / -grid[0])
            for ratio in ratios:
                scale = cover * ratio
                nearest = grid[np.argmin(np.abs(values[:, None] / scale - grid[None, :]), axis=1)] * scale
                errors[group, t] = min(errors[group, t], float(np.sum((nearest - values) ** 2)))
    return errors


def group_errors(weight: np.ndarray, bits: int, group_size: int, **options) -> np.ndarray:
    """Squared error per (group, column) of quantize_weight's dequantization, [groups, N]."""
    error = (quantize_weight(weight, bits, group_size, **options).dequantize() - weight).astype(np.float64) ** 2
    return error.reshape(-1, group_size, weight.shape[1]).sum(axis=1)


def test_grids_are_the_design_grids_each_with_one_extra_value():
    expected4 = {"er+": 10.0, "er-": -10.0, "ea+": 16.0, "ea-": -16.0}
    expected3 = {"er+": 3.0, "er-": -3.0, "ea+": 6.0, "ea-": -6.0}
    for bits, base, extras in ((4, FP4, expected4), (3, FP3, expected3)):
        types = BITMOD_TYPES[bits]
        assert [t.name for t in types] == list(extras)
        for grid_type in types:
            assert len(grid_type.values) == 2**bits
            assert set(grid_type.values) == symmetric(base) | {extras[grid_type.name]}
            assert list(grid_type.values) == sorted(grid_type.values)
    assert int_type(4).values == tuple(float(v) for v in range(-8, 8))


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("ratios", [(1.0,), CLIP_RATIOS], ids=["cover", "clip-search"])
def test_each_group_gets_the_lowest_mse_type_and_scale(bits, ratios):
    rng = np.random.default_rng(bits)
    weight = rng.standard_normal((64, 12)).astype(np.float32)
    weight[:, ::3] = np.abs(weight[:, ::3])  # some one-signed groups, where extra asymmetry pays
    weight[5, 1] = -6.0  # an outlier on the negative side
    quantized = quantize_weight(weight, bits, group_size=32, clip_ratios=ratios)
    groups = weight.reshape(2, 32, 12).transpose(0, 2, 1).reshape(-1, 32)
    reference = brute_force_errors(groups, BITMOD_TYPES[bits], ratios)
    chosen = group_errors(weight, bits, 32, clip_ratios=ratios).ravel()
    np.testing.assert_allclose(chosen, reference.min(axis=1), rtol=1e-4)
    picked = reference[np.arange(reference.shape[0]), quantized.type_ids.ravel()]
    np.testing.assert_allclose(picked, reference.min(axis=1), rtol=1e-4)
    assert len(set(quantized.type_ids.ravel())) > 1


@pytest.mark.parametrize("grid_type", BITMOD_TYPES[4] + BITMOD_TYPES[3], ids=lambda t: f"{len(t.values)}-{t.name}")
def test_a_group_on_one_types_grid_picks_it_and_is_exact(grid_type):
    bits = 4 if len(grid_type.values) == 16 else 3
    grid = np.asarray(grid_type.values, np.float32)
    weight = np.resize(grid * np.float32(0.03125), 32)[:, None]
    quantized = quantize_weight(weight, bits, group_size=32)
    assert BITMOD_TYPES[bits][quantized.type_ids[0, 0]] == grid_type
    np.testing.assert_array_equal(quantized.dequantize(), weight)
    assert quantized.scales[0, 0] == np.float32(0.03125)


def test_extra_asymmetry_scale_covers_the_side_of_the_extra_value():
    weight = np.zeros((16, 1), np.float32)
    weight[:4, 0] = [1.6, -1.2, 0.8, -0.3]  # +16 and -12 units at scale 0.1
    quantized = quantize_weight(weight, 4, group_size=16, clip_ratios=(1.0,))
    assert BITMOD_TYPES[4][quantized.type_ids[0, 0]].name == "ea+"
    np.testing.assert_allclose(quantized.scales[0, 0], 0.1, rtol=1e-6)
    np.testing.assert_allclose(quantized.dequantize(), weight, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 3])
def test_with_int_as_a_candidate_no_group_is_worse_than_int_alone(bits):
    rng = np.random.default_rng(10 + bits)
    weight = (rng.standard_normal((128, 16)) * rng.uniform(0.1, 2, 16)).astype(np.float32)
    weight[:, :4] = rng.uniform(-1, 1, (128, 4))  # uniform groups, where INT wins
    mixed = (*BITMOD_TYPES[bits], int_type(bits))
    with_int = group_errors(weight, bits, 32, types=mixed)
    int_only = group_errors(weight, bits, 32, types=(int_type(bits),))
    without_int = group_errors(weight, bits, 32)
    assert np.all(with_int <= int_only * (1 + 1e-5) + 1e-12)
    assert np.all(with_int <= without_int * (1 + 1e-5) + 1e-12)
    assert np.any(quantize_weight(weight, bits, 32, types=mixed).type_ids == len(mixed) - 1)


def test_selection_is_deterministic_and_each_column_independent():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((256, 10)).astype(np.float32)
    first, second = quantize_weight(weight, 4), quantize_weight(weight.copy(), 4)
    for name in ("codes", "type_ids", "scales"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    order = rng.permutation(10)
    permuted = quantize_weight(weight[:, order], 4)
    np.testing.assert_array_equal(permuted.dequantize(), first.dequantize()[:, order])


@pytest.mark.parametrize("bits", [4, 3])
def test_rows_not_a_multiple_of_the_group_are_zero_padded(bits):
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((200, 6)).astype(np.float32)
    quantized = quantize_weight(weight, bits, group_size=128)
    assert quantized.codes.shape == (256, 6) and quantized.scales.shape == (2, 6) and quantized.rows == 200
    padded = np.zeros((256, 6), np.float32)
    padded[:200] = weight
    np.testing.assert_array_equal(quantized.dequantize(), quantize_weight(padded, bits).dequantize()[:200])
    assert quantized.dequantize().shape == (200, 6)
    assert np.all(quantized.lut[quantized.lut_indices()[200:]] == 0)  # the padding decodes to exact zeros


def test_zero_groups_get_scale_one_and_decode_to_zero():
    weight = np.zeros((32, 2), np.float32)
    weight[:, 1] = np.linspace(-1, 1, 32)
    quantized = quantize_weight(weight, 4, group_size=32)
    assert quantized.scales[0, 0] == 1.0
    assert np.all(quantized.dequantize()[:, 0] == 0)


def test_bad_types_are_refused():
    with pytest.raises(ValueError):
        GridType("gap", (-1.0, 0.0, 1.25))
    with pytest.raises(ValueError):
        quantize_weight(np.ones((8, 1), np.float32), 3, types=BITMOD_TYPES[4])
