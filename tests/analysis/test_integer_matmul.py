"""Exact products of 8-bit codes (integer_matmul), on onnxruntime's integer GEMM and on its float fallback."""

from __future__ import annotations

import numpy as np
import pytest

from graphquant.analysis import integer_matmul as module


def extreme_codes(rng: np.random.Generator, rows: int, depth: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 codes at the grid's ends and middle, int8 weight codes at ±127 and between."""
    codes = rng.choice(np.array([0, 1, 127, 128, 254, 255], np.uint8), (rows, depth))
    codes[0] = 255
    weight_codes = rng.integers(-127, 128, (depth, columns)).astype(np.int8)
    weight_codes[:, 0] = 127
    weight_codes[:, 1] = -127
    return codes, weight_codes


@pytest.mark.parametrize("integer_gemm", [True, False], ids=["onnxruntime", "float-fallback"])
@pytest.mark.parametrize("zero_point", [0, 128, 37])
def test_products_are_exact_against_int64(monkeypatch, integer_gemm, zero_point):
    if not integer_gemm:
        monkeypatch.setattr(module, "_exact_on_this_cpu", lambda: False)
    elif not module._exact_on_this_cpu():
        pytest.skip("onnxruntime's uint8 x int8 GEMM is not exact on this CPU (the fallback is tested)")
    rng = np.random.default_rng(0)
    for rows, depth, columns in ((1, 1, 2), (33, 576, 70), (128, 1536, 17)):
        codes, weight_codes = extreme_codes(rng, rows, depth, columns)
        expected = (codes.astype(np.int64) - zero_point) @ weight_codes.astype(np.int64)
        product = module.integer_matmul(codes, zero_point, weight_codes)
        assert product.dtype == np.int32
        np.testing.assert_array_equal(product, expected)


def test_the_probe_agrees_with_an_exact_product():
    rng = np.random.default_rng(1)
    codes, weight_codes = extreme_codes(rng, 16, module.PROBE_DEPTH, 16)
    feeds = {"a": codes, "a_zero": np.array(128, np.uint8), "b": weight_codes}
    exact = np.array_equal(
        module._session().run(None, feeds)[0], (codes.astype(np.int64) - 128) @ weight_codes.astype(np.int64)
    )
    assert not exact or module._exact_on_this_cpu()  # where onnxruntime is exact here, the probe says so
