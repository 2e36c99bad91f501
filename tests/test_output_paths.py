"""Output path rules: regular files or new paths only, never a file the run reads; staged (atomic) text writes."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graphquant
from graphquant.errors import OutputError
from graphquant.output_paths import (
    ReadFile,
    check_outputs,
    data_path,
    model_outputs,
    model_reads,
    source_reads,
    staged_text,
    writable_path,
)

EXTERNAL = """
<ir_version: 8, opset_import: ["" : 17]>
ext (float[N, 16] x) => (float[N, 16] y) {
  y = MatMul(x, w)
}
"""


def external_model(folder: Path, location: str = "weights.bin") -> tuple[Path, np.ndarray]:
    """A model file whose 1 KiB weight lives in ``location`` beside it."""
    w = (np.arange(256, dtype=np.float32).reshape(16, 16) - 128) / 64
    proto = onnx.parser.parse_model(EXTERNAL)
    tensor = onnx.numpy_helper.from_array(w, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    proto.graph.initializer.append(tensor)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / location).write_bytes(w.tobytes())
    (folder / "model.onnx").write_bytes(proto.SerializeToString())
    return folder / "model.onnx", w


def run_file(path: Path, x: np.ndarray) -> np.ndarray:
    """The model file's output in onnxruntime (external data resolved against its folder)."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.usefixtures("device_files")
@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_a_device_is_refused_and_stays_a_device(device):
    with pytest.raises(
        OutputError,
        match=f"^{device}: cannot write the output there: it is a character device, not a regular file or a new path$",
    ):
        writable_path(device, "the output")
    assert stat.S_ISCHR(os.stat(device).st_mode)


def test_a_fifo_a_socket_and_a_directory_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="cannot write the output there: it is a FIFO"):
        writable_path(fifo, "the output")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        with pytest.raises(OutputError, match="cannot write the report there: it is a socket"):
            writable_path(tmp_path / "sock", "the report")
    with pytest.raises(OutputError, match="cannot write the output there: it is a directory"):
        writable_path(tmp_path, "the output")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_new_path_or_a_regular_file_is_accepted_but_not_in_a_missing_folder(tmp_path):
    (tmp_path / "old.onnx").write_bytes(b"old")
    assert writable_path(tmp_path / "new.onnx", "the output") == (tmp_path / "new.onnx").resolve()
    assert writable_path(tmp_path / "old.onnx", "the output") == (tmp_path / "old.onnx").resolve()
    with pytest.raises(OutputError, match="output folder does not exist"):
        writable_path(tmp_path / "absent" / "new.onnx", "the output")
    with pytest.raises(OutputError, match="old.onnx: output folder does not exist"):
        writable_path(tmp_path / "old.onnx" / "new.onnx", "the output")


def test_a_folder_the_user_cannot_write_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: not (Path(path) == tmp_path and mode == os.W_OK))
    with pytest.raises(OutputError, match="new.onnx: cannot write the output there: its folder is not writable$"):
        writable_path(tmp_path / "new.onnx", "the output")


def test_the_input_model_may_be_replaced_only_with_overwrite(tmp_path):
    model_path, _ = external_model(tmp_path)
    reads = model_reads(graphquant.load(model_path))
    assert [(read.path, read.what) for read in reads] == [
        (model_path.resolve(), "the input model"),
        ((tmp_path / "weights.bin").resolve(), "external data of the input model"),
    ]
    with pytest.raises(OutputError, match="refusing to overwrite the input model"):
        check_outputs(model_outputs(model_path), reads)
    os.link(model_path, tmp_path / "hard.onnx")
    (tmp_path / "soft.onnx").symlink_to(model_path)
    for alias in ("hard.onnx", "soft.onnx"):
        with pytest.raises(OutputError, match="refusing to overwrite the input model"):
            check_outputs(model_outputs(tmp_path / alias), reads)
    assert check_outputs(model_outputs(model_path), reads, overwrite=True)["the output"] == model_path.resolve()


def test_the_inputs_external_data_is_never_replaced(tmp_path):
    model_path, _ = external_model(tmp_path, location="model.onnx.data")
    reads = model_reads(graphquant.load(model_path))
    with pytest.raises(OutputError, match="the output would overwrite external data of the input model"):
        check_outputs(model_outputs(tmp_path / "model.onnx.data"), reads, overwrite=True)
    # Replacing model.onnx would write model.onnx.data, the input's weights, beside it.
    with pytest.raises(OutputError, match="the output's external data would overwrite external data of the input"):
        check_outputs(model_outputs(model_path), reads, overwrite=True)
    with pytest.raises(OutputError, match="the report would overwrite external data"):
        check_outputs({"the report": tmp_path / "model.onnx.data"}, reads, overwrite=True)


def test_outputs_may_not_coincide_or_replace_data_files(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((2, 16), np.float32))
    data_folder = tmp_path / "data"
    (data_folder / "test_data_set_0").mkdir(parents=True)
    reads = [*source_reads(str(calib), "the calibration data"), *source_reads(data_folder, "the validation data")]
    assert reads == [
        ReadFile(calib.resolve(), "the calibration data"),
        ReadFile(data_folder.resolve(), "the validation data", folder=True),
    ]
    assert source_reads("random", "the calibration data") == source_reads(None, "the recipe") == []
    with pytest.raises(OutputError, match="the output would overwrite the calibration data"):
        check_outputs(model_outputs(calib), reads)
    with pytest.raises(OutputError, match="the report would overwrite the validation data"):
        check_outputs({"the report": data_folder / "test_data_set_0" / "input_0.pb"}, reads)
    out = tmp_path / "out.onnx"
    with pytest.raises(OutputError, match="the report would overwrite the output$"):
        check_outputs({**model_outputs(out), "the report": out}, [])
    with pytest.raises(OutputError, match="the report would overwrite the output's external data"):
        check_outputs({**model_outputs(out), "the report": data_path(out)}, [])


def test_external_data_read_inside_a_subgraph_is_protected(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    sub (bool c, float[4] x) => (float[4] y) {
      y = If(c) <then_branch = g1 () => (float[4] t) { t = Identity(x) },
                 else_branch = g2 () => (float[4] e) { k = Constant<value = float[4] {1, 2, 3, 4}>() e = Add(x, k) }>
    }
    """
    proto = onnx.parser.parse_model(text)
    constant = proto.graph.node[0].attribute[1].g.node[0].attribute[0].t
    constant.ClearField("float_data")
    constant.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "k.bin"), ("offset", "0"), ("length", "16")):
        entry = constant.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "k.bin").write_bytes(np.arange(1, 5, dtype=np.float32).tobytes())
    (tmp_path / "sub.onnx").write_bytes(proto.SerializeToString())
    model = graphquant.load(tmp_path / "sub.onnx")
    assert ReadFile((tmp_path / "k.bin").resolve(), "external data of the input model") in model_reads(model)
    with pytest.raises(OutputError, match="would overwrite external data of the input model"):
        graphquant.save(model, tmp_path / "k.bin")
    (y,) = ort.InferenceSession(str(tmp_path / "sub.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"c": np.array(False), "x": np.zeros(4, np.float32)}
    )
    np.testing.assert_array_equal(y, [1, 2, 3, 4])  # the weights that the refusal kept


def test_save_refuses_the_inputs_weights_even_after_quantizing_them_all(tmp_path):
    model_path, w = external_model(tmp_path)
    model = graphquant.load(model_path)
    data = [{"x": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)}]
    result = graphquant.optimize(model, calibration=data, show_progress=False)
    # The quantized model holds no reference to weights.bin any more: the files recorded at load time protect it.
    assert not any(isinstance(v.const_value, ir.ExternalTensor) for v in result.model.graph.initializers.values())
    with pytest.raises(OutputError, match="would overwrite external data of the input model"):
        graphquant.save(result, tmp_path / "weights.bin", overwrite=True)
    np.testing.assert_allclose(run_file(model_path, data[0]["x"]), data[0]["x"] @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("device_files")
def test_staged_text_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="the block failed"), staged_text(target, "new\n", "the report"):
        assert min(p.name for p in tmp_path.iterdir()).startswith(".report.json.")
        raise RuntimeError("the block failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"] and target.read_text() == "old\n"
    with staged_text(target, "new\n", "the report") as written:
        assert target.read_text() == "old\n"
    assert written == target.resolve() and target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # what a plain open() gives, not mkstemp's 0600
    with (
        pytest.raises(OutputError, match="cannot write the report there: it is a character device"),
        staged_text("/dev/null", "x", "the report"),
    ):
        pass
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_external_data_read_inside_a_function_is_protected(tmp_path, monkeypatch):
    text = """
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    main (float[4] x) => (float[4] y) {
      y = local.addk(x)
    }
    <domain: "local", opset_import: ["" : 17]>
    addk (a) => (b) {
      k = Constant<value = float[4] {1, 2, 3, 4}>()
      b = Add(a, k)
    }
    """
    proto = onnx.parser.parse_model(text)
    constant = proto.functions[0].node[0].attribute[0].t
    constant.ClearField("float_data")
    constant.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "f.bin"), ("offset", "0"), ("length", "16")):
        entry = constant.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "f.bin").write_bytes(np.arange(1, 5, dtype=np.float32).tobytes())
    (tmp_path / "in" / "fn.onnx").write_bytes(proto.SerializeToString())
    monkeypatch.chdir(tmp_path)  # not the model's folder: the function's tensor resolves against the model's
    model = graphquant.load(Path("in") / "fn.onnx")
    assert ReadFile((tmp_path / "in" / "f.bin").resolve(), "external data of the input model") in model_reads(model)
    with pytest.raises(OutputError, match="would overwrite external data of the input model"):
        graphquant.save(model, tmp_path / "in" / "f.bin")
    (y,) = ort.InferenceSession(str(tmp_path / "in" / "fn.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros(4, np.float32)}
    )
    np.testing.assert_array_equal(y, [1, 2, 3, 4])
