"""QuantSpec.quantize: the same codes whatever its chunk size, computed without a float64 copy of the tensor."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from graphquant import quant_spec
from graphquant.quant_spec import asymmetric_spec, symmetric_spec


@pytest.mark.parametrize("chunk", [1 << 20, 100])
def test_codes_are_the_whole_tensor_formula_whatever_the_chunk(monkeypatch, chunk):
    monkeypatch.setattr(quant_spec, "QUANTIZE_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(0)
    w = rng.laplace(size=(64, 48)).astype(np.float32)
    spec = symmetric_spec(np.abs(w).max(axis=0) * 0.7, 8, axis=1)  # clipped, so saturation is exercised
    want = np.clip(np.rint(w.astype(np.float64) / spec.scale.astype(np.float64)), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(spec.quantize(w), want)
    assert (want == 127).any() and (want == -127).any()


def test_blocked_asymmetric_codes_do_not_depend_on_the_chunk(monkeypatch):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    blocks = w.reshape(3, 32, 40)
    spec = asymmetric_spec(blocks.min(axis=1), blocks.max(axis=1), 4, axis=0, block_size=32)
    whole = spec.quantize(w)
    monkeypatch.setattr(quant_spec, "QUANTIZE_CHUNK_ELEMENTS", 50)
    np.testing.assert_array_equal(spec.quantize(w), whole)
    assert whole.dtype == np.uint8 and whole.min() == 0 and whole.max() == 15


def test_quantizing_a_large_weight_makes_no_float64_copy_of_it():
    w = np.random.default_rng(2).standard_normal((4096, 2048)).astype(np.float32)
    spec = symmetric_spec(np.abs(w).max(axis=0), 8, axis=1)
    tracemalloc.start()
    try:
        codes = spec.quantize(w)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert codes.nbytes == w.nbytes // 4
    assert peak < w.nbytes  # a float64 copy alone would be twice the weight
