"""CalibrationData: .npz files, ONNX test-data folders, iterables, random inputs, and the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from builders import build
from graphquant.analysis.data import (
    RANDOM_BATCHES,
    RANDOM_SYMBOLIC_DIM,
    CalibrationData,
    InputSpec,
    RandomCalibrationWarning,
)
from graphquant.errors import CalibrationError

TWO_INPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
two (float[N, 4] x, int64[N, 3] ids) => (float[N, 4] y, int64[N, 3] z) {
  y = Relu(x)
  z = Identity(ids)
}
"""

X = InputSpec("x", np.dtype(np.float32), (None, 4))
IDS = InputSpec("ids", np.dtype(np.int64), (None, 3))


def samples(count: int) -> dict[str, np.ndarray]:
    """``count`` distinct samples for both inputs (values encode the sample index)."""
    return {
        "x": np.arange(count * 4, dtype=np.float32).reshape(count, 4),
        "ids": np.arange(count * 3, dtype=np.int64).reshape(count, 3),
    }


def write_pb(path, array: np.ndarray, name: str = "") -> None:
    """One TensorProto file, as the ONNX test-data layout has them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx.numpy_helper.from_array(array, name).SerializeToString())


def test_input_specs_of_a_model():
    specs = InputSpec.of_model(build(TWO_INPUTS))
    assert [(s.name, s.dtype, s.shape) for s in specs] == [
        ("x", np.dtype(np.float32), (None, 4)),
        ("ids", np.dtype(np.int64), (None, 3)),
    ]


def test_npz_is_batched_along_the_first_axis(tmp_path):
    path = tmp_path / "calib.npz"
    arrays = samples(20)
    np.savez(path, **arrays)
    data = CalibrationData(path, [X, IDS])  # symbolic batch: the default batch size of 8
    batches = list(data)
    assert [b["x"].shape for b in batches] == [(8, 4), (8, 4), (4, 4)]
    assert [b["ids"].shape for b in batches] == [(8, 3), (8, 3), (4, 3)]
    assert len(data) == 3
    for name in arrays:
        np.testing.assert_array_equal(np.concatenate([b[name] for b in batches]), arrays[name])
    assert [b["x"].shape[0] for b in CalibrationData(str(path), [X, IDS], batch_size=6)] == [6, 6, 6, 2]


def test_npz_respects_a_static_batch_dim(tmp_path):
    path = tmp_path / "calib.npz"
    arrays = samples(12)
    np.savez(path, **arrays)
    static = [InputSpec("x", np.dtype(np.float32), (3, 4)), InputSpec("ids", np.dtype(np.int64), (3, 3))]
    batches = list(CalibrationData(path, static))
    assert [b["x"].shape for b in batches] == [(3, 4)] * 4
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), arrays["x"])


def test_npz_that_does_not_fill_the_static_batch_is_refused_up_front(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, **samples(10))
    static = [InputSpec("x", np.dtype(np.float32), (4, 4)), InputSpec("ids", np.dtype(np.int64), (4, 3))]
    with pytest.raises(CalibrationError, match="10 samples .* static batch size 4"):
        CalibrationData(path, static)


def test_npz_arrays_must_agree_on_the_sample_count(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((5, 4), np.float32), ids=np.zeros((6, 3), np.int64))
    with pytest.raises(CalibrationError, match="disagree on the number of samples"):
        CalibrationData(path, [X, IDS])


def test_onnx_test_data_folder(tmp_path):
    rng = np.random.default_rng(0)
    expected = []
    for index in range(3):
        x = rng.standard_normal((2, 4)).astype(np.float32)
        ids = rng.integers(0, 9, (2, 3)).astype(np.int64)
        # input_0 carries its name; input_1 is unnamed and is matched to the model's second input by position.
        write_pb(tmp_path / f"test_data_set_{index}" / "input_0.pb", x, "x")
        write_pb(tmp_path / f"test_data_set_{index}" / "input_1.pb", ids)
        expected.append({"x": x, "ids": ids})
    (tmp_path / "test_data_set_0" / "output_0.pb").write_bytes(b"ignored")
    feeds = list(CalibrationData(tmp_path, InputSpec.of_model(build(TWO_INPUTS))))
    assert len(feeds) == 3
    for got, want in zip(feeds, expected):
        assert sorted(got) == ["ids", "x"]
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
            assert got[name].dtype == want[name].dtype


def test_test_data_folder_refusals(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no test_data_set_"):
        CalibrationData(tmp_path / "empty", [X])
    bad = tmp_path / "bad"
    (bad / "test_data_set_0").mkdir(parents=True)
    (bad / "test_data_set_0" / "input_0.pb").write_bytes(b"\xff\xff\xff\xff not a tensor")
    with pytest.raises(CalibrationError, match="not a serialized TensorProto"):
        CalibrationData(bad, [X])


def test_list_of_dicts_is_re_iterable():
    rng = np.random.default_rng(1)
    source = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(3)]
    data = CalibrationData(source, [X])
    first, second = list(data), list(data)
    assert len(first) == len(second) == len(data) == 3
    for a, b, want in zip(first, second, source):
        np.testing.assert_array_equal(a["x"], want["x"])
        np.testing.assert_array_equal(b["x"], want["x"])


def test_one_shot_generator_is_kept_for_later_passes():
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((2, 4)).astype(np.float32) for _ in range(4)]
    generator = ({"x": a} for a in arrays)
    data = CalibrationData(generator, [X])
    assert next(generator, None) is None  # consumed once, at construction
    for _ in range(2):  # yet every pass over the data sees all four feeds
        got = [feed["x"] for feed in data]
        assert len(got) == 4
        for a, b in zip(got, arrays):
            np.testing.assert_array_equal(a, b)


def test_random_warns_and_fits_the_inputs():
    specs = [X, IDS, InputSpec("mask", np.dtype(np.bool_), (2, None)), InputSpec("half", np.dtype(np.float16), (5,))]
    with pytest.warns(RandomCalibrationWarning, match="RANDOM"):
        data = CalibrationData("random", specs)
    assert data.is_random
    feeds = list(data)
    assert len(feeds) == RANDOM_BATCHES
    for feed in feeds:
        assert feed["x"].dtype == np.float32 and feed["x"].shape == (RANDOM_SYMBOLIC_DIM, 4)
        assert feed["ids"].dtype == np.int64 and feed["ids"].shape == (RANDOM_SYMBOLIC_DIM, 3)
        assert set(np.unique(feed["ids"])) <= {0, 1}
        assert feed["mask"].dtype == np.bool_ and feed["mask"].shape == (2, RANDOM_SYMBOLIC_DIM)
        assert feed["half"].dtype == np.float16 and feed["half"].shape == (5,)
    assert np.std(np.concatenate([f["x"] for f in feeds])) > 0.5
    np.testing.assert_array_equal(feeds[0]["x"], next(iter(data))["x"])  # seeded: the same on every pass


def test_unknown_input_name_is_refused_and_named():
    with pytest.raises(CalibrationError, match="'tokens' is not an input of the model"):
        CalibrationData([{"x": np.zeros((2, 4), np.float32), "tokens": np.zeros(2, np.int64)}], [X])


def test_missing_input_is_refused_and_named():
    with pytest.raises(CalibrationError, match="'ids' is missing"):
        CalibrationData([{"x": np.zeros((2, 4), np.float32)}], [X, IDS])


def test_wrong_dtype_is_refused():
    with pytest.raises(CalibrationError, match=r"input 'x': dtype float64 given, model expects float32"):
        CalibrationData([{"x": np.zeros((2, 4))}], [X])


@pytest.mark.parametrize("shape", [(4,), (2, 4, 1), (2, 5)], ids=["rank-1", "rank-3", "static-dim"])
def test_wrong_rank_or_static_dim_is_refused(shape):
    with pytest.raises(CalibrationError, match=r"input 'x': shape .* given, model expects \('\?', 4\)"):
        CalibrationData([{"x": np.zeros(shape, np.float32)}], [X])


def test_a_bad_feed_after_the_first_is_refused_while_iterating():
    data = CalibrationData([{"x": np.zeros((2, 4), np.float32)}, {"x": np.zeros((2, 3), np.float32)}], [X])
    with pytest.raises(CalibrationError, match="shape"):
        list(data)


@pytest.mark.parametrize("source", [[], (), iter([])], ids=["list", "tuple", "generator"])
def test_empty_data_set_is_refused(source):
    with pytest.raises(CalibrationError, match="empty"):
        CalibrationData(source, [X])


def test_empty_npz_is_refused(tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path)
    with pytest.raises(CalibrationError, match="no arrays"):
        CalibrationData(path, [X])


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        CalibrationData(tmp_path / "nowhere.npz", [X])
    with pytest.raises(CalibrationError, match="not found"):
        CalibrationData("rnadom", [X])  # a typo of "random" is a missing path, not random data


def test_wrong_file_kind_and_unsupported_source_are_refused(tmp_path):
    table = tmp_path / "calib.csv"
    table.write_text("1 2 3")
    with pytest.raises(CalibrationError, match=r"must be an \.npz file, a test-data or image folder, or a text file"):
        CalibrationData(table, [X])
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK not really a zip")
    with pytest.raises(CalibrationError, match="cannot read .npz"):
        CalibrationData(corrupt, [X])
    with pytest.raises(CalibrationError, match="not supported"):
        CalibrationData(42, [X])  # type: ignore[arg-type]
