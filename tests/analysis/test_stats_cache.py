"""CachingCalibrator: statistics reused while a tensor's producers are unchanged, recollected when they change."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import build, run, weights

from graphquant.analysis import runner, stats_cache
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.stats_cache import CachingCalibrator, value_digests

GRAPH = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 6] x) => (float[N, 4] y, float[N, 4] z) {
  [left] a = MatMul(x, w1)
  r = Relu(a)
  [left2] y = MatMul(r, w2)
  [right] z = MatMul(x, w3)
}
"""
NAMES = ["a", "r", "y", "z"]


@pytest.fixture
def model() -> ir.Model:
    rng = np.random.default_rng(0)
    return build(GRAPH, {"w1": weights(rng, 6, 4), "w2": weights(rng, 4, 4), "w3": weights(rng, 6, 4)})


@pytest.fixture
def data() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((16, 6)).astype(np.float32)} for _ in range(3)]


def replace_initializer(model: ir.Model, name: str, array: np.ndarray) -> None:
    """Give an initializer new content (a new tensor object, as the passes do)."""
    model.graph.initializers[name].const_value = ir.tensor(array, name=name)


def assert_same_stats(first, second, names) -> None:
    for name in names:
        np.testing.assert_array_equal(first[name].channel_max, second[name].channel_max)
        np.testing.assert_array_equal(first[name].channel_min, second[name].channel_min)
        np.testing.assert_array_equal(first[name].abs_histogram, second[name].abs_histogram)


def test_a_second_request_on_the_same_graph_runs_nothing(model, data):
    calibrator = CachingCalibrator.for_model(model, data, False)
    first = calibrator.collect(model, NAMES)
    second = calibrator.collect(model.clone(), NAMES)  # a clone has the same content
    assert (calibrator.runs, calibrator.hits) == (1, len(NAMES))
    assert_same_stats(first, Calibrator.for_model(model, data, False).collect(model, NAMES), NAMES)
    assert_same_stats(first, second, NAMES)
    assert second.batches == first.batches == len(data)


def test_changing_a_weight_recollects_only_what_it_feeds(model, data):
    calibrator = CachingCalibrator.for_model(model, data, False)
    calibrator.collect(model, NAMES)
    replace_initializer(model, "w2", np.full((4, 4), 3.0, np.float32))
    stats = calibrator.collect(model, NAMES)
    assert calibrator.runs == 2 and calibrator.hits == 3  # a, r and z are upstream or apart from w2
    assert_same_stats(stats, Calibrator.for_model(model, data, False).collect(model, NAMES), NAMES)


def test_a_changed_op_or_attribute_changes_the_key(model):
    before = value_digests(model.graph, NAMES)
    relu = next(node for node in model.graph if node.op_type == "Relu")
    relu.op_type = "Sigmoid"
    after = value_digests(model.graph, NAMES)
    assert before["a"] == after["a"] and before["z"] == after["z"]
    assert before["r"] != after["r"] and before["y"] != after["y"]


def test_a_different_row_sample_or_a_gram_request_is_collected_again(model, data):
    calibrator = CachingCalibrator.for_model(model, data, False)
    calibrator.collect(model, ["a"], sample_rows=8)
    assert calibrator.collect(model, ["a"], sample_rows=8)["a"].sample.shape == (8, 4)
    assert calibrator.runs == 1
    assert calibrator.collect(model, ["a"], sample_rows=4)["a"].sample.shape == (4, 4)
    assert calibrator.runs == 2
    assert calibrator.collect(model, ["a"])["a"].sample is not None  # no sample asked: any cached entry answers
    assert calibrator.collect(model, ["a"], gram_names=["a"])["a"].gram.shape == (4, 4)
    assert calibrator.runs == 3


def test_integer_tensors_are_known_absent_not_missed(data):
    graph = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 6] x) => (int64[2] s) {
      s = Shape(x)
    }
    """
    model = build(graph)
    calibrator = CachingCalibrator.for_model(model, data, False)
    assert "s" not in calibrator.collect(model, ["s"])
    assert "s" not in calibrator.collect(model, ["s"])
    assert calibrator.runs == 1


def test_an_observer_sees_every_batch_even_when_the_statistics_are_cached(model, data):
    calibrator = CachingCalibrator.for_model(model, data, False)
    calibrator.collect(model, NAMES)
    seen: list[tuple[str, np.ndarray]] = []
    calibrator.collect(model, ["r"], observe=lambda name, batch: seen.append((name, batch.copy())))
    assert [name for name, _ in seen] == ["r"] * len(data) and calibrator.runs == 2
    for (_, batch), feed in zip(seen, data):
        w1 = model.graph.initializers["w1"].const_value.numpy()
        np.testing.assert_allclose(batch, np.maximum(feed["x"] @ w1, 0), rtol=1e-5, atol=1e-6)


def test_each_stored_tensor_is_read_once_while_it_lives(model, data, monkeypatch):
    read: list[str] = []
    original = stats_cache._tensor_digest
    monkeypatch.setattr(stats_cache, "_tensor_digest", lambda tensor: read.append(tensor.name) or original(tensor))
    calibrator = CachingCalibrator.for_model(model, data, False)
    calibrator.collect(model, NAMES)
    calibrator.collect(model, NAMES)
    assert sorted(read) == ["w1", "w2", "w3"]
    replace_initializer(model, "w2", np.full((4, 4), 3.0, np.float32))  # the old w2 tensor is dropped
    calibrator.collect(model, NAMES)
    assert sorted(read) == ["w1", "w2", "w2", "w3"] and calibrator.runs == 2


def test_recorded_statistics_answer_for_their_content_and_an_inexact_histogram_only_where_none_is_read(model, data):
    calibrator = CachingCalibrator.for_model(model, data, False)
    partly = calibrator.collect(model, ["a"], sample_rows=4)["a"]
    doubled = np.full(4, 2.0, np.float32)
    replace_initializer(model, "w1", 2 * model.graph.initializers["w1"].const_value.numpy())  # a = 2·(x·w1)
    calibrator.record(model, {"a": partly.affine(doubled, np.zeros(4, np.float32))})
    derived = calibrator.collect(model, ["a"], sample_rows=4, histogram=False)["a"]
    assert calibrator.runs == 1
    np.testing.assert_allclose(derived.channel_max, 2 * partly.channel_max)
    measured = calibrator.collect(model, ["a"], sample_rows=4)["a"]  # a histogram is read: calibrated afresh
    assert calibrator.runs == 2 and measured.exact_histogram
    np.testing.assert_allclose(measured.channel_max, derived.channel_max, rtol=1e-6)


TIED = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 6] x) => (float[N, 4] y) {
  wt = Transpose<perm = [1, 0]>(w)
  y = MatMul(x, wt)
}
"""
FOLDED = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 6] x) => (float[N, 4] y) {
  y = MatMul(x, wt)
}
"""


def test_a_transpose_of_a_stored_tensor_or_a_constant_is_keyed_as_the_tensor_it_computes(monkeypatch):
    monkeypatch.setattr(stats_cache, "DIGEST_SLICE_BYTES", 8)  # the strided transpose is read in slices
    w = weights(np.random.default_rng(0), 4, 6)
    tied = build(TIED, {"w": w})
    assert value_digests(tied.graph, ["y"]) == value_digests(build(FOLDED, {"wt": w.T.copy()}).graph, ["y"])
    assert value_digests(tied.graph, ["y"]) != value_digests(build(FOLDED, {"wt": w[:, :4].copy()}).graph, ["y"])
    constant = build(FOLDED, {"wt": w.T.copy()})
    lifted = constant.graph.initializers.pop("wt")
    node = ir.node("Constant", [], {"value": lifted.const_value}, outputs=[lifted])
    constant.graph.insert_before(constant.graph.node(0), node)
    assert value_digests(constant.graph, ["y"]) == value_digests(tied.graph, ["y"])


def test_the_first_calibration_records_the_float_models_outputs_where_it_computes_them_alike(model, data, monkeypatch):
    monkeypatch.setattr(runner, "SHARED_MODEL_BYTES", 0)  # an unoptimized run, as for a large model
    calibrator = CachingCalibrator.for_model(model, data, False)
    calibrator.expect_reference(model, ["y", "z"])
    calibrator.collect(model.clone(), ["a"])
    recorded = calibrator.reference_outputs()
    assert recorded is not None and recorded.holds(["y", "z"]) and not recorded.holds(["a"])
    replayed = list(recorded.replay(["z", "y"]))
    assert len(replayed) == len(data)
    for (feed, (z, y)), given in zip(replayed, data):
        np.testing.assert_array_equal(feed["x"], given["x"])
        expected = run(model, given, optimize=False)
        np.testing.assert_array_equal(y, expected[0])
        np.testing.assert_array_equal(z, expected[1])
    calibrator.drop_reference()
    assert calibrator.reference_outputs() is None and not recorded.path.exists()


def test_no_reference_is_recorded_from_a_graph_that_computes_it_differently(model, data, monkeypatch):
    monkeypatch.setattr(runner, "SHARED_MODEL_BYTES", 0)
    calibrator = CachingCalibrator.for_model(model, data, False)
    calibrator.expect_reference(model, ["y", "z"])
    changed = model.clone()
    replace_initializer(changed, "w3", np.ones((6, 4), np.float32))  # z differs
    calibrator.collect(changed, ["a"])
    calibrator.collect(model, ["r"])  # only the first calibration run may record
    assert calibrator.reference_outputs() is None


def test_an_optimized_run_records_no_reference(model, data):
    calibrator = CachingCalibrator.for_model(model, data, False)
    calibrator.expect_reference(model, ["y", "z"])  # a small model: onnxruntime optimizes its sessions
    calibrator.collect(model.clone(), ["a"])
    assert calibrator.reference_outputs() is None
