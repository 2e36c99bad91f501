"""onnxruntime sessions: weights shared above a size, outputs read without copies, runs recorded and replayed mapped."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import build, feeds, mlp, mlp_reference, weights

from graphquant.analysis import runner


def test_models_above_the_size_share_their_weights_and_compute_the_same(monkeypatch):
    model = mlp(np.random.default_rng(0))
    x = feeds(np.random.default_rng(1), batches=1, rows=6, features=16)[0]
    with runner.open_session(model) as session:
        copied = session.run(None, x)[0]
    shared = []
    choose = runner._shared_initializers
    monkeypatch.setattr(runner, "_shared_initializers", lambda m: shared.append(choose(m)) or shared[-1])
    monkeypatch.setattr(runner, "SHARED_MODEL_BYTES", 0)
    monkeypatch.setattr(runner, "SHARED_INITIALIZER_BYTES", 64)
    with runner.open_session(model) as session:
        got = session.run(None, x)[0]
    assert [sorted(names) for names in shared] == [["w1", "w2"]]  # 512 and 128 bytes; the biases are smaller
    np.testing.assert_allclose(got, copied, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, mlp_reference(model, x["x"]), rtol=1e-5, atol=1e-5)


def test_run_views_are_the_outputs_without_a_copy():
    model = mlp(np.random.default_rng(2))
    x = feeds(np.random.default_rng(3), batches=1, rows=4, features=16)[0]
    with runner.open_session(model, ["h"]) as session:
        want = session.run(["y", "h"], x)
        got = runner.run_views(session, ["y", "h"], x)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
        assert not a.flags.owndata


@pytest.mark.parametrize("batches", [0, 3])
def test_recorded_runs_replay_every_feed_with_its_outputs(batches):
    model = mlp(np.random.default_rng(4))
    data = feeds(np.random.default_rng(5), batches=batches, rows=2, features=16)
    with runner.recorded_runs(model, ["y"], iter(data)) as runs:
        replayed = list(runs)
    assert len(replayed) == batches
    for (feed, outputs), original in zip(replayed, data):
        np.testing.assert_array_equal(feed["x"], original["x"])
        np.testing.assert_allclose(outputs[0], mlp_reference(model, original["x"]), rtol=1e-5, atol=1e-5)
        assert isinstance(outputs[0].base, np.memmap)  # read from the file when compared, not held in memory


def test_a_large_reference_run_parks_the_other_models_own_weights_and_gives_them_back(monkeypatch):
    reference = mlp(np.random.default_rng(6))
    candidate = reference.clone()
    candidate.graph.initializers["w1"].const_value = ir.tensor(np.full((16, 8), 0.5, np.float32), name="w1")
    data = feeds(np.random.default_rng(7), batches=2, rows=2, features=16)
    monkeypatch.setattr(runner, "SHARED_MODEL_BYTES", 0)
    monkeypatch.setattr(runner, "SHARED_INITIALIZER_BYTES", 64)
    seen = {}
    run_views = runner.run_views

    def spying(session, names, feed):
        seen.update(
            (name, isinstance(v.const_value, ir.ExternalTensor)) for name, v in candidate.graph.initializers.items()
        )
        return run_views(session, names, feed)

    monkeypatch.setattr(runner, "run_views", spying)
    with runner.recorded_runs(reference, ["y"], iter(data), parked=candidate) as runs:
        replayed = list(runs)
    # Only w1 is the candidate's own (the rest it shares with the reference); it waited in the file, mapped.
    assert seen == {"w1": True, "b1": False, "w2": False, "b2": False}
    np.testing.assert_array_equal(candidate.graph.initializers["w1"].const_value.numpy(), np.full((16, 8), 0.5))
    assert type(candidate.graph.initializers["w1"].const_value) is ir.Tensor
    for (feed, outputs), original in zip(replayed, data):
        np.testing.assert_allclose(outputs[0], mlp_reference(reference, original["x"]), rtol=1e-5, atol=1e-5)
    with runner.open_session(candidate) as session:
        got = session.run(None, data[0])[0]
    np.testing.assert_allclose(got, mlp_reference(candidate, data[0]["x"]), rtol=1e-5, atol=1e-5)


def test_a_graph_input_read_back_from_a_non_contiguous_feed_stays_valid():
    """A graph input asked for as an output is onnxruntime's view of the feed's contiguous copy: it must outlive the run."""
    model = mlp(np.random.default_rng(6))
    feed = {"x": np.asfortranarray(np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))}
    with runner.open_session(model, ["x"]) as session:
        (view,) = runner.run_views(session, ["x"], feed)
        _ = [np.full((64, 16), 7.0, np.float32) for _ in range(20)]  # reuses freed buffers of the same size
        np.testing.assert_array_equal(view, feed["x"])


def test_a_weight_sharing_model_runs_in_segments_with_the_same_outputs_as_one_session(monkeypatch):
    model = mlp(np.random.default_rng(20))
    data = feeds(np.random.default_rng(21), batches=2, rows=3, features=16)
    with runner.open_session(model, ["h"]) as session:
        whole = [runner.run_views(session, ["y", "h"], feed) for feed in data]
        whole = [[np.array(a) for a in outputs] for outputs in whole]
    monkeypatch.setattr(runner, "SHARED_MODEL_BYTES", 0)
    monkeypatch.setattr(runner, "SHARED_INITIALIZER_BYTES", 64)
    monkeypatch.setattr(runner, "SEGMENTS", 2)  # MatMul(w1), then Add, Relu and Gemm(w2)
    loaded = []
    load = runner.load_session
    monkeypatch.setattr(
        runner, "load_session", lambda path, options: loaded.append(onnx.load(path)) or load(path, options)
    )
    with runner.open_segmented(model, ["y", "h", "x"]) as run:
        parts = [[{name: np.array(a) for name, a in part.items()} for part in run(feed)] for feed in data]
    # One session per segment, each naming only its own weights; the crossing value h is also asked for here.
    assert [sorted(t.name for t in proto.graph.initializer) for proto in loaded] == [["w1"], ["b1", "b2", "w2"]]
    assert [[list(part) for part in feed_parts] for feed_parts in parts] == [[["x", "h"], ["y"]]] * 2
    for feed, feed_parts, (y, h) in zip(data, parts, whole):
        np.testing.assert_array_equal(feed_parts[1]["y"], y)  # bit for bit: the same kernels run
        np.testing.assert_array_equal(feed_parts[0]["h"], h)
        np.testing.assert_array_equal(feed_parts[0]["x"], feed["x"])


def test_a_segmented_recorded_run_replays_its_outputs_in_the_order_asked(monkeypatch):
    model = mlp(np.random.default_rng(22))
    data = feeds(np.random.default_rng(23), batches=2, rows=2, features=16)
    monkeypatch.setattr(runner, "SHARED_MODEL_BYTES", 0)
    monkeypatch.setattr(runner, "SHARED_INITIALIZER_BYTES", 64)
    monkeypatch.setattr(runner, "SEGMENTS", 2)
    with runner.recorded_runs(model, ["y", "h"], iter(data)) as runs:  # h comes from the first segment
        replayed = [(feed, [np.array(a) for a in outputs]) for feed, outputs in runs]
    for (feed, (y, h)), original in zip(replayed, data):
        np.testing.assert_allclose(y, mlp_reference(model, original["x"]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h, original["x"] @ model.graph.initializers["w1"].const_value.numpy(), rtol=1e-5)


def test_a_parked_session_runs_without_the_arena_that_would_keep_its_largest_buffers(monkeypatch):
    model = mlp(np.random.default_rng(24))
    monkeypatch.setattr(runner, "PARKED_MODEL_BYTES", 0)
    with runner.open_session(model, park=True) as session:
        assert not session.get_session_options().enable_cpu_mem_arena
    with runner.open_session(model) as session:
        assert session.get_session_options().enable_cpu_mem_arena


def test_only_a_model_with_large_weights_pays_for_a_full_garbage_collection(monkeypatch):
    model = mlp(np.random.default_rng(25))
    collections = []
    monkeypatch.setattr(runner.gc, "collect", lambda: collections.append(1) or 0)
    with runner.open_session(model):
        pass
    assert collections == []
    monkeypatch.setattr(runner, "PARKED_MODEL_BYTES", 0)
    with runner.open_session(model):
        pass
    assert collections == [1]


def test_sessions_let_idle_threads_sleep_and_still_match_numpy():
    model = mlp(np.random.default_rng(25))
    x = np.random.default_rng(26).standard_normal((8, 16)).astype(np.float32)
    with runner.open_session(model) as session:
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        (y,) = runner.run_views(session, ["y"], {"x": x})
    np.testing.assert_allclose(y, mlp_reference(model, x), rtol=1e-5, atol=1e-5)


TRANSPOSED = """
<ir_version: 8, opset_import: ["" : 17]>
transposed (float[N, 16] x) => (float[N, 8] y) {
  wt = Transpose(w)
  y = MatMul(x, wt)
}
"""


def test_a_small_models_weights_reach_the_session_unserialized_and_optimized_as_from_the_full_proto(monkeypatch):
    model = build(TRANSPOSED, {"w": weights(np.random.default_rng(27), 8, 16)})
    x = feeds(np.random.default_rng(28), batches=1, rows=5, features=16)[0]
    full = runner.load_session(ir.to_proto(model).SerializeToString(), runner.session_options())
    saved = []
    save = runner.onnx.save
    monkeypatch.setattr(runner.onnx, "save", lambda proto, path: saved.append(proto) or save(proto, path))
    monkeypatch.setattr(runner, "SHARED_INITIALIZER_BYTES", 64)
    with runner.open_session(model) as session:
        got = session.run(None, x)[0]
        level = session.get_session_options().graph_optimization_level
    (written,) = [tensor for tensor in saved[0].graph.initializer if tensor.name == "w"]
    assert written.data_location == onnx.TensorProto.EXTERNAL and not written.raw_data
    assert level == runner.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Constant folding computed Transpose(w) from the real weight (a placeholder's zeros would give zeros).
    np.testing.assert_array_equal(got, full.run(None, x)[0])
    np.testing.assert_allclose(got, x["x"] @ model.graph.initializers["w"].const_value.numpy().T, rtol=1e-5)


def _weight_only(accuracy_level: int) -> ir.Model:
    """x[16, 64] @ an 8-bit MatMulNBits weight [64 -> 8] in blocks of 32, with the given accuracy_level."""
    rng = np.random.default_rng(4)
    node = onnx.helper.make_node(
        "MatMulNBits",
        ["x", "b", "s"],
        ["y"],
        domain="com.microsoft",
        K=64,
        N=8,
        bits=8,
        block_size=32,
        accuracy_level=accuracy_level,
    )
    graph = onnx.helper.make_graph(
        [node],
        "weight_only",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [16, 8])],
        [
            onnx.numpy_helper.from_array(rng.integers(0, 256, (8, 2, 32), dtype=np.uint8), "b"),
            onnx.numpy_helper.from_array((rng.random(16) + 0.5).astype(np.float32) * 0.01, "s"),
        ],
    )
    opsets = [onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)]
    return ir.from_proto(onnx.helper.make_model(graph, opset_imports=opsets))


def test_sessions_compute_matmul_nbits_as_a_deployed_session_does():
    # accuracy_level 4 rounds x to int8 per block only with its weight prepacked (onnxruntime's default); a channel
    # 50x the others makes that rounding visible against the float compute of level 0.
    x = {"x": np.random.default_rng(5).standard_normal((16, 64)).astype(np.float32)}
    x["x"][:, 3] *= 50
    deployed = ort.InferenceSession(
        ir.to_proto(_weight_only(4)).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    with runner.open_session(_weight_only(4)) as session:
        got = session.run(None, x)[0]
    with runner.open_session(_weight_only(0)) as session:
        float_compute = session.run(None, x)[0]
    np.testing.assert_array_equal(got, deployed.run(None, x)[0])
    assert np.abs(got - float_compute).max() > 1e-3 * np.abs(float_compute).max()
    assert runner.runs_prepacked(_weight_only(4)) and not runner.runs_prepacked(mlp(np.random.default_rng(0)))
