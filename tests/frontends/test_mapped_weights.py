"""Large inline models: their weights are memory-mapped from the model file itself, with numerics unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import mlp, save_model

from graphquant import api
from graphquant.analysis.runner import has_external_data, has_mapped_data, open_session
from graphquant.errors import InvalidModelError
from graphquant.frontends import mapped_weights


@pytest.fixture
def mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Map the inline weights of every file (and every tensor of 64 bytes or more)."""
    monkeypatch.setattr(mapped_weights, "MAPPED_FILE_BYTES", 0)
    monkeypatch.setattr(mapped_weights, "MAPPED_TENSOR_BYTES", 64)


def test_inline_weights_are_mapped_from_the_model_file(tmp_path, mapped):
    path = save_model(mlp(np.random.default_rng(0)), tmp_path / "mlp.onnx")
    model = api.load(path)
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    tensors = {name: value.const_value for name, value in model.graph.initializers.items()}
    mapped_names = {name for name, tensor in tensors.items() if isinstance(tensor, ir.ExternalTensor)}
    assert mapped_names == {name for name, array in expected.items() if array.nbytes >= 64}
    assert all(tensors[name].meta.get(mapped_weights.INLINE_KEY) for name in mapped_names)
    assert all(tensors[name].location == "mlp.onnx" for name in mapped_names)
    for name, array in expected.items():
        np.testing.assert_array_equal(tensors[name].numpy(), array)
    assert has_mapped_data(model) and not has_external_data(model)


def test_mapped_model_runs_as_the_file_does(tmp_path, mapped):
    path = save_model(mlp(np.random.default_rng(1)), tmp_path / "mlp.onnx")
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with open_session(api.load(path)) as session:
        got = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_saving_a_mapped_model_writes_one_inline_file(tmp_path, mapped):
    path = save_model(mlp(np.random.default_rng(3)), tmp_path / "mlp.onnx")
    (tmp_path / "out").mkdir()
    written = api.save(api.load(path), tmp_path / "out" / "copy.onnx")
    assert sorted(p.name for p in written.parent.iterdir()) == ["copy.onnx"]
    original, copy = onnx.load(path), onnx.load(str(written))
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in copy.graph.initializer)
    for a, b in zip(original.graph.initializer, copy.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_a_truncated_large_file_is_refused_in_one_line(tmp_path, mapped):
    path = tmp_path / "mlp.onnx"
    data = onnx.load(save_model(mlp(np.random.default_rng(4)), path)).SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError, match="mlp.onnx: not a valid ONNX model"):
        api.load(path)


def test_small_files_are_parsed_whole(tmp_path):
    path = save_model(mlp(np.random.default_rng(5)), tmp_path / "mlp.onnx")
    assert not has_mapped_data(api.load(path))
