"""TensorComparison metrics on hand-computed arrays, and compare_models on models with known differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from builders import build, feeds, mlp

from graphquant import validate
from graphquant.analysis import runner
from graphquant.analysis.stats_cache import CachingCalibrator
from graphquant.validate import TensorComparison, compare_models


def compare(reference, candidate, rtol: float = 1e-4, atol: float = 1e-5) -> TensorComparison:
    comparison = TensorComparison()
    comparison.update(np.asarray(reference, np.float32), np.asarray(candidate, np.float32), rtol, atol)
    return comparison


def test_metrics_of_known_arrays():
    c = compare([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    # dot = 1 + 4 + 12 = 17, |ref|^2 = 14, |cand|^2 = 21, |error|^2 = 1
    assert c.cosine == pytest.approx(17 / math.sqrt(14 * 21), abs=1e-12)
    assert c.cosine == pytest.approx(0.991460, abs=1e-6)
    assert c.sqnr_db == pytest.approx(10 * math.log10(14), abs=1e-12)
    assert c.sqnr_db == pytest.approx(11.4613, abs=1e-4)
    assert c.max_abs_error == 1.0
    assert not c.within_tolerance
    assert c.as_dict() == {
        "cosine": c.cosine,
        "sqnr_db": c.sqnr_db,
        "max_abs_error": 1.0,
        "within_tolerance": False,
        "nonfinite": 0,
    }


def test_cosine_of_orthogonal_and_opposite_vectors():
    assert compare([1.0, 0.0], [0.0, 5.0]).cosine == 0.0
    opposite = compare([1.0, -2.0], [-1.0, 2.0])
    assert opposite.cosine == pytest.approx(-1.0)
    assert opposite.sqnr_db == pytest.approx(10 * math.log10(5 / 20))  # error energy is 4x the signal: -6.02 dB


def test_batches_fold_in_like_one_big_batch():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((6, 5)).astype(np.float32)
    candidate = reference + rng.normal(0, 0.1, (6, 5)).astype(np.float32)
    whole = compare(reference, candidate)
    folded = TensorComparison()
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        folded.update(reference[rows], candidate[rows], 1e-4, 1e-5)
    assert folded.cosine == pytest.approx(whole.cosine, abs=1e-12)
    assert folded.sqnr_db == pytest.approx(whole.sqnr_db, abs=1e-9)
    assert folded.max_abs_error == whole.max_abs_error
    ref64, err64 = reference.astype(np.float64), (candidate - reference).astype(np.float64)
    assert whole.sqnr_db == pytest.approx(10 * math.log10((ref64**2).sum() / (err64**2).sum()), abs=1e-6)


def test_identical_and_degenerate_tensors():
    same = compare([0.5, -1.5, 2.0], [0.5, -1.5, 2.0])
    assert same.sqnr_db == math.inf
    assert same.cosine == pytest.approx(1.0)
    assert same.max_abs_error == 0.0 and same.within_tolerance
    zeros = compare([0.0, 0.0], [0.0, 0.0])
    assert (zeros.cosine, zeros.sqnr_db) == (1.0, math.inf)
    noise_on_zero = compare([0.0, 0.0], [0.0, 1.0])
    assert noise_on_zero.sqnr_db == -math.inf and noise_on_zero.cosine == 0.0
    assert TensorComparison().within_tolerance  # nothing compared, nothing violated


def test_tolerance_is_atol_plus_rtol_times_reference():
    assert compare([1.0, 100.0], [1.0 + 5e-6, 100.009], rtol=1e-4, atol=1e-5).within_tolerance
    assert not compare([1.0, 100.0], [1.0, 100.02], rtol=1e-4, atol=1e-5).within_tolerance
    assert not compare([0.0], [2e-5], rtol=1e-4, atol=1e-5).within_tolerance


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        TensorComparison().update(np.zeros((2, 3)), np.zeros((3, 2)), 1e-4, 1e-5)


SCALED = """
<ir_version: 8, opset_import: ["" : 17]>
scaled (float[N, 4] x) => (float[N, 4] y) {
  h = Mul(x, c)
  y = Relu(h)
}
"""


def scaled(factor: float):
    return build(SCALED, {"c": np.array(factor, np.float32)})


def test_compare_models_on_two_different_models():
    rng = np.random.default_rng(1)
    data = feeds(rng, batches=3, rows=5, features=4)
    results = compare_models(scaled(2.0), scaled(2.1), data, tensors=["h", "y", "h"])
    assert list(results) == ["y", "h"]  # outputs first, named tensors once
    x = np.concatenate([feed["x"] for feed in data])
    # candidate = 1.05 x reference everywhere: cosine 1, SQNR = 10 log10(1 / 0.05^2) = 26.02 dB.
    for name in ("h", "y"):
        assert results[name].cosine == pytest.approx(1.0, abs=1e-9)
        assert results[name].sqnr_db == pytest.approx(10 * math.log10(400), abs=1e-3)
        assert not results[name].within_tolerance
    assert results["h"].max_abs_error == pytest.approx(0.1 * np.abs(x).max(), rel=1e-5)
    assert results["y"].max_abs_error == pytest.approx(0.1 * x.max(), rel=1e-5)


def test_a_reference_recorded_while_calibrating_compares_as_its_own_run(monkeypatch):
    monkeypatch.setattr(runner, "SHARED_MODEL_BYTES", 0)  # unoptimized sessions, as for a large model
    rng = np.random.default_rng(3)
    data = feeds(rng, batches=3, rows=5, features=4)
    reference, candidate = scaled(2.0), scaled(2.1)
    ran = compare_models(reference, candidate, data, tensors=["h"])
    calibrator = CachingCalibrator.for_model(reference, data, False)
    calibrator.expect_reference(reference, ["y", "h"])
    calibrator.collect(reference.clone(), ["x"])
    monkeypatch.setattr(validate, "recorded_runs", None)  # no reference run: it would fail
    reused = compare_models(reference, candidate, data, tensors=["h"], recorded=calibrator.reference_outputs())
    assert {name: c.as_dict() for name, c in reused.items()} == {name: c.as_dict() for name, c in ran.items()}
    calibrator.drop_reference()


def test_compare_models_on_identical_models():
    rng = np.random.default_rng(2)
    model = mlp(rng)
    results = compare_models(model, model.clone(), feeds(rng, batches=2, rows=3, features=16))
    assert list(results) == ["y"]
    assert results["y"].sqnr_db == math.inf
    assert results["y"].within_tolerance
    assert results["y"].max_abs_error == 0.0
    assert results["y"].cosine == pytest.approx(1.0, abs=1e-12)


def test_chunked_sums_match_whole_array_float64_sums(monkeypatch):
    monkeypatch.setattr(validate, "COMPARED_CHUNK", 1000)  # 37 chunks, the NaN and the Inf in different ones
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((6, 6000)).astype(np.float32)
    candidate = (reference + 0.01 * rng.standard_normal(reference.shape)).astype(np.float32)
    candidate[1, 2500], candidate[4, 10] = np.nan, np.inf
    comparison = TensorComparison()
    comparison.update(reference, candidate, rtol=1e-4, atol=1e-5)
    finite = np.isfinite(candidate)
    ref, cand = reference[finite].astype(np.float64), candidate[finite].astype(np.float64)
    assert comparison.nonfinite == 2 and not comparison.within_tolerance
    assert comparison.cosine == pytest.approx(ref @ cand / np.sqrt((ref @ ref) * (cand @ cand)), rel=1e-12)
    assert comparison.sqnr_db == pytest.approx(10 * np.log10((ref @ ref) / np.sum((ref - cand) ** 2)), rel=1e-12)
    assert comparison.max_abs_error == np.abs(ref - cand).max()
