"""The numpy L-Mul reference: format rounding against ml_dtypes, the product against hand-checked values."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from graphquant.analysis.lmul import (
    FORMATS,
    exact_matmul,
    exact_product,
    lmul,
    lmul_formula,
    lmul_matmul,
    pow2_scale,
    round_to_format,
)

ML_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "bf16": ml_dtypes.bfloat16}


def spread(rng: np.random.Generator, n: int) -> np.ndarray:
    """Float32 values of both signs spread over 2^-30 .. 2^12."""
    return (rng.choice([-1, 1], n) * np.exp2(rng.uniform(-30, 12, n))).astype(np.float32)


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_rounding_matches_ml_dtypes_inside_the_range(name: str) -> None:
    fmt = FORMATS[name]
    values = np.clip(spread(np.random.default_rng(0), 200_000), -fmt.max_finite, fmt.max_finite)
    if not fmt.subnormals:
        values = values[np.abs(values) >= fmt.min_normal]
    expected = values.astype(ML_DTYPES[name]).astype(np.float32)
    np.testing.assert_array_equal(round_to_format(values, fmt).view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_rounding_saturates_keeps_inf_and_nan_and_underflows(name: str) -> None:
    fmt = FORMATS[name]
    top = np.float32(fmt.max_finite)
    over = np.float32(min(fmt.max_finite * 1.5, float(np.finfo(np.float32).max)))
    values = np.array([over, -over, np.inf, -np.inf, np.nan, fmt.min_step * 0.49, -0.0], np.float32)
    rounded = round_to_format(values, fmt)
    np.testing.assert_array_equal(rounded[:4], [top, -top, np.inf, -np.inf])
    assert np.isnan(rounded[4])
    assert rounded[5] == 0 and np.signbit(rounded[6])


def test_the_four_bit_mantissa_grid_rounds_ties_to_even() -> None:
    fmt = FORMATS["e4m4"]
    values = np.array([1 + 1 / 16, 1 + 1 / 32, 1 + 3 / 32, 480.0, 470.0, 2.0**-10, 2.0**-11 * 1.01], np.float32)
    expected = np.array([1 + 1 / 16, 1.0, 1 + 1 / 8, 480.0, 464.0, 2.0**-10, 2.0**-10], np.float32)
    np.testing.assert_array_equal(round_to_format(values, fmt), expected)


@pytest.mark.parametrize(
    "name,x,y,expected",
    [
        ("e4m3", 1.5, 1.25, 1.875),  # 1 + 0.5 + 0.25 + 2^-3
        ("e4m3", -1.5, 1.25, -1.875),
        ("e4m3", 3.0, 0.3125, 0.9375),  # (1.5·2) · (1.25·2^-2): exponents add
        ("e4m3", 1.75, 1.5, 2.75),  # t = 0.75 + 0.5 + 2^-3 = 1.375 carries: t · 2
        ("e5m2", 1.5, 1.5, 2.5),  # l(2) = 2: t = 1.25 carries
        ("e5m2", 1.25, 1.25, 1.75),
        ("e4m4", 1.9375, 1.9375, 4.0),  # t = 2·15/16 + 2^-3 = 2: carries twice, fraction 0
        ("e4m4", 1.0625, 1.0, 1.1875),  # l(4) = 3
        ("bf16", 1.0, 1.0, 1.0625),  # l(7) = 4
        ("e4m3", 2.0**-9, 1.0, 2.0**-9 * 1.125),  # the smallest subnormal enters normalized
        ("bf16", 2.0**-100, -(2.0**-100), -0.0),  # under float32's smallest normal: signed zero
        ("bf16", 2.0**100, 2.0**100, np.inf),  # over float32's largest finite
    ],
)
def test_lmul_matches_hand_checked_values(name: str, x: float, y: float, expected: float) -> None:
    got = lmul(np.float32(x), np.float32(y), FORMATS[name])
    assert got == np.float32(expected) and np.signbit(got) == np.signbit(expected)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_special_operands_follow_ieee_multiplication(name: str) -> None:
    fmt = FORMATS[name]
    big = np.finfo(np.float32).max
    x = np.array([0.0, -0.0, 0.0, np.inf, -np.inf, np.inf, np.nan, 0.0, big], np.float32)
    y = np.array([3.0, 3.0, -0.0, 2.0, -3.0, 0.0, 1.0, np.nan, 1.0], np.float32)
    got = lmul(x, y, fmt)
    expected = np.array([0.0, -0.0, -0.0, np.inf, np.inf, np.nan, np.nan, np.nan, 0], np.float32)
    np.testing.assert_array_equal(got[:8], expected[:8])
    np.testing.assert_array_equal(np.signbit(got[:5]), np.signbit(expected[:5]))
    # A finite value beyond the range saturates first: L-Mul(max, 1) = max · (1 + 2^-l) within the carry rule.
    assert got[8] == lmul(np.float32(fmt.max_finite), np.float32(1.0), fmt)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_bit_form_equals_the_formula_on_random_operands(name: str) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 50_000)).astype(np.float32) * 3
    np.testing.assert_array_equal(lmul(x, y, FORMATS[name]), lmul_formula(x, y, FORMATS[name]))


def test_pow2_scale_puts_the_largest_magnitude_under_the_format_max() -> None:
    fmt = FORMATS["e4m3"]
    assert pow2_scale(np.array([448.0, -3.0], np.float32), fmt) == 1.0
    assert pow2_scale(np.array([449.0], np.float32), fmt) == 2.0
    assert pow2_scale(np.array([1.0, np.inf, np.nan], np.float32), fmt) == 2.0**-8  # 1/448 -> 2^-8; inf, NaN skipped


def test_matmul_references_sum_the_elementwise_products() -> None:
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal((7, 3)).astype(np.float32)
    fmt = FORMATS["e4m3"]
    np.testing.assert_allclose(lmul_matmul(x, w, fmt, scaled=False, rows=2), lmul(x[:, :, None], w[None], fmt).sum(1))
    sx, sw = pow2_scale(x, fmt), pow2_scale(w, fmt)
    scaled = lmul(x[:, :, None] / sx, w[None] / sw, fmt).astype(np.float64).sum(1) * sx * sw
    np.testing.assert_allclose(lmul_matmul(x, w, fmt), scaled, rtol=1e-12)
    np.testing.assert_allclose(exact_matmul(x, w, fmt, scaled=False), exact_product(x[:, :, None], w[None], fmt).sum(1))
