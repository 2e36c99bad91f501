"""Every bad input of the reliability issue, through the CLI (exit code, one error line, input untouched, no partial
output) and through the API (a typed exception from graphquant.errors)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import pytest
from builders import mlp, run, save_model

import graphquant
import graphquant.analysis.runner
from graphquant.cli import main
from graphquant.errors import CalibrationError, GraphQuantError, InvalidModelError, OutputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROWS, FEATURES = 32, 16


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """An input folder holding model.onnx (the builders' mlp) and calib.npz, and an empty output folder."""
    source, target = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    target.mkdir()
    rng = np.random.default_rng(0)
    save_model(mlp(rng), source / "model.onnx")
    np.savez(source / "calib.npz", x=rng.standard_normal((ROWS, FEATURES)).astype(np.float32))
    return source, target


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in a folder tree with its bytes (links not followed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    """main()'s exit code, its non-empty stderr lines, and stdout."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine similarity of two outputs, flattened."""
    return float(np.dot(reference.ravel(), candidate.ravel()) / (np.linalg.norm(reference) * np.linalg.norm(candidate)))


def assert_one_error_line(lines: list[str], *fragments: str) -> None:
    """Exactly one stderr line, a graphquant error naming every fragment, and no traceback."""
    (line,) = lines
    assert line.startswith("graphquant: error: ")
    assert "Traceback" not in line
    for fragment in fragments:
        assert fragment in line


# --- bad model files ---


MATMUL = """
<ir_version: 8, opset_import: ["" : 17]>
ext (float[N, 16] x) => (float[N, 16] y) {
  y = MatMul(x, w)
}
"""
WEIGHT = ((np.arange(256, dtype=np.float32).reshape(16, 16) - 128) / 64).astype(np.float32)


def write_external(model_path: Path, location: str, length: int = WEIGHT.nbytes) -> None:
    """A model whose 1 KiB weight is stored as external data at ``location`` (relative to the model's folder)."""
    proto = onnx.parser.parse_model(MATMUL)
    tensor = onnx.numpy_helper.from_array(WEIGHT, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    proto.graph.initializer.append(tensor)
    model_path.write_bytes(proto.SerializeToString())


def outside_secret(source: Path) -> Path:
    """A weight file beside (not inside) the model's folder."""
    secret = source.parent / "secret.bin"
    secret.write_bytes(WEIGHT.tobytes())
    return secret


def empty(path: Path) -> None:
    path.write_bytes(b"")


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def json_text(path: Path) -> None:
    path.write_text(json.dumps({"model": "not onnx", "layers": [1, 2, 3]}))


def npz_archive(path: Path) -> None:
    with path.open("wb") as file:
        np.savez(file, w=WEIGHT)


def folder_instead_of_file(path: Path) -> None:
    path.unlink()
    path.mkdir()


def absolute_location(path: Path) -> None:
    write_external(path, str(outside_secret(path.parent)))


def dotdot_location(path: Path) -> None:
    outside_secret(path.parent)
    write_external(path, "../secret.bin")


def symlinked_location(path: Path) -> None:
    (path.parent / "weights.bin").symlink_to(outside_secret(path.parent))
    write_external(path, "weights.bin")


def hardlinked_location(path: Path) -> None:
    (path.parent / "weights.bin").hardlink_to(outside_secret(path.parent))
    write_external(path, "weights.bin")


def missing_external(path: Path) -> None:
    write_external(path, "weights.bin")


def short_external(path: Path) -> None:
    (path.parent / "weights.bin").write_bytes(WEIGHT.tobytes()[:100])
    write_external(path, "weights.bin")


def write_proto(model_path: Path, text: str = MATMUL, change: Callable[[onnx.ModelProto], None] | None = None) -> None:
    """The onnx.parser model ``text`` with WEIGHT as its initializer ``w``, changed by ``change``, at ``model_path``."""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(WEIGHT, "w"))
    if change is not None:
        change(proto)
    model_path.write_bytes(proto.SerializeToString())


def external_entry(tensor: onnx.TensorProto, **entries: str) -> None:
    """Turn ``tensor`` into an external-data tensor with the given location/offset/length entries."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def external_weight(path: Path, **entries: str) -> None:
    """The MatMul model with its weight external, WEIGHT's bytes in weights.bin, and the given entries."""
    (path.parent / "weights.bin").write_bytes(WEIGHT.tobytes())
    write_proto(path, change=lambda proto: external_entry(proto.graph.initializer[0], **entries))


def cycle(path: Path) -> None:
    write_proto(
        path,
        '<ir_version: 8, opset_import: ["" : 17]>\ng (float[N, 16] x) => (float[N, 16] y) {\n'
        "  a = Add(x, b)\n  b = MatMul(a, w)\n  y = Relu(b)\n}",
    )


def dangling_input(path: Path) -> None:
    write_proto(path, MATMUL.replace("y = MatMul(x, w)", "h = MatMul(x, w)\n  y = Add(h, bias)"))


def unproduced_output(path: Path) -> None:
    write_proto(path, MATMUL.replace("(float[N, 16] y)", "(float[N, 16] y, float[N, 16] z)"))


def defined_twice(path: Path) -> None:
    write_proto(path, MATMUL.replace("y = MatMul(x, w)", "y = MatMul(x, w)\n  y = Relu(x)"))


def sparse_initializer(path: Path) -> None:
    def change(proto: onnx.ModelProto) -> None:
        del proto.graph.initializer[:]
        values = onnx.numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")
        indices = onnx.numpy_helper.from_array(np.array([0, 17], np.int64))
        proto.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, [16, 16]))

    write_proto(path, change=change)


def initializer_dims(path: Path) -> None:
    write_proto(path, change=lambda proto: proto.graph.initializer[0].dims.__setitem__(0, 17))


def location_is_the_model(path: Path) -> None:
    def change(proto: onnx.ModelProto) -> None:
        external_entry(proto.graph.initializer[0], location=path.name)
        proto.doc_string = "-" * WEIGHT.nbytes  # long enough to hold the tensor

    write_proto(path, change=change)


def function_dotdot_location(path: Path) -> None:
    """A model-local function whose Constant points at ../secret.bin."""
    outside_secret(path.parent)
    constant = onnx.numpy_helper.from_array(WEIGHT, "c")
    external_entry(constant, location="../secret.bin", offset="0", length=str(WEIGHT.nbytes))
    function = onnx.helper.make_function(
        "local",
        "Project",
        ["a"],
        ["b"],
        [
            onnx.helper.make_node("Constant", [], ["c"], value=constant),
            onnx.helper.make_node("MatMul", ["a", "c"], ["b"]),
        ],
        [onnx.helper.make_opsetid("", 17)],
    )

    def change(proto: onnx.ModelProto) -> None:
        proto.functions.append(function)
        proto.opset_import.append(onnx.helper.make_opsetid("local", 1))
        proto.graph.node[0].output[0] = "h"
        proto.graph.node.append(onnx.helper.make_node("Project", ["h"], ["y"], domain="local"))

    write_proto(path, change=change)


def subgraph_dotdot_location(path: Path) -> None:
    """An If whose then-branch Constant points at ../secret.bin."""
    outside_secret(path.parent)
    constant = onnx.numpy_helper.from_array(WEIGHT, "c")
    external_entry(constant, location="../secret.bin", offset="0", length=str(WEIGHT.nbytes))
    output = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [16, 16])
    branch = onnx.helper.make_graph([onnx.helper.make_node("Constant", [], ["c"], value=constant)], "b", [], [output])
    flag = onnx.numpy_helper.from_array(np.array(True), "flag")

    def change(proto: onnx.ModelProto) -> None:
        proto.graph.initializer.append(flag)
        proto.graph.node.insert(0, onnx.helper.make_node("If", ["flag"], ["v"], then_branch=branch, else_branch=branch))
        proto.graph.node[1].input[1] = "v"

    write_proto(path, change=change)


def not_utf8(text: bytes, spoiled: bytes, write: Callable[[Path], None]) -> Callable[[Path], None]:
    """Write a file with ``write``, then replace ``text`` in it by ``spoiled`` (same length, not UTF-8)."""

    def spoil(path: Path) -> None:
        write(path)
        data = path.read_bytes()
        assert data.count(text) == 1
        path.write_bytes(data.replace(text, spoiled))

    return spoil


def opset(version: int) -> Callable[[Path], None]:
    return lambda path: write_proto(path, MATMUL.replace('"" : 17', f'"" : {version}'))


def no_default_opset(path: Path) -> None:
    def change(proto: onnx.ModelProto) -> None:
        del proto.opset_import[:]
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))

    write_proto(path, change=change)


BAD_MODELS: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (empty, "file is empty"),
    "truncated": (truncated, "not a valid ONNX model"),
    "random-bytes": (random_bytes, "not a valid ONNX model"),
    "json-text": (json_text, "not a valid ONNX model"),
    "npz-archive": (npz_archive, "not a valid ONNX model"),
    "folder": (folder_instead_of_file, "no such file"),
    "absolute-location": (absolute_location, "outside the model directory"),
    "dotdot-location": (dotdot_location, "outside the model directory"),
    "symlinked-location": (symlinked_location, "outside the model directory"),
    "hardlinked-location": (hardlinked_location, "'weights.bin' has several hard links"),
    "missing-external-file": (missing_external, "'weights.bin' is missing"),
    "short-external-file": (short_external, "'weights.bin' is shorter"),
    "graph-cycle": (cycle, "the main graph: the graph has a cycle through an unnamed Add node"),
    "dangling-input": (dangling_input, "an unnamed Add node reads 'bias', which is undefined"),
    "unproduced-output": (unproduced_output, "output 'z' is produced by no node"),
    "value-defined-twice": (defined_twice, "value 'y' is defined more than once"),
    "input-listed-twice": (
        lambda path: write_proto(path, MATMUL.replace("(float[N, 16] x)", "(float[N, 16] x, float[N, 16] x)")),
        "value 'x' is defined more than once",
    ),
    "sparse-initializer": (sparse_initializer, "sparse initializer 'w' is not supported"),
    "initializer-dims-vs-data": (initializer_dims, "tensor 'w': dims (17, 16) need 1088 bytes, the data holds 1024"),
    "offset-not-an-integer": (
        lambda path: external_weight(path, location="weights.bin", offset="abc"),
        "external data offset 'abc' is not a non-negative integer",
    ),
    "negative-offset": (
        lambda path: external_weight(path, location="weights.bin", offset="-8"),
        "external data offset '-8' is not a non-negative integer",
    ),
    "length-not-an-integer": (
        lambda path: external_weight(path, location="weights.bin", length="1.5"),
        "external data length '1.5' is not a non-negative integer",
    ),
    "length-not-the-dims": (
        lambda path: external_weight(path, location="weights.bin", length="512"),
        "external data length 512 does not match its dims (1024 bytes)",
    ),
    "offset-past-the-end": (
        lambda path: external_weight(path, location="weights.bin", offset="4096"),
        "'weights.bin' is shorter than the tensor (5120 bytes)",
    ),
    "location-is-the-model": (
        location_is_the_model,
        "external data location 'model.onnx' is the file that holds the tensor",
    ),
    "nul-in-location": (
        lambda path: external_weight(path, location="weights.bin\0.txt"),
        "external data location 'weights.bin\\x00.txt' is not a file name",
    ),
    "function-dotdot-location": (function_dotdot_location, "'../secret.bin' is outside the model directory"),
    "subgraph-dotdot-location": (subgraph_dotdot_location, "'../secret.bin' is outside the model directory"),
    "unknown-op": (
        lambda path: write_proto(path, MATMUL.replace("MatMul(", "MatMull(")),
        "an unnamed MatMull node: opset 17 of the default domain has no op 'MatMull'",
    ),
    "op-type-not-utf8": (
        not_utf8(b"MatMul", b"Mat\xb4ul", write_proto),
        "the NodeProto field 'op_type' is not UTF-8 text",
    ),
    "location-not-utf8": (
        not_utf8(b"weights.bin", b"wei\xffhts.bin", lambda path: external_weight(path, location="weights.bin")),
        "the StringStringEntryProto field 'value' is not UTF-8 text",
    ),
    "ir-version-2": (
        lambda path: write_proto(path, MATMUL.replace("ir_version: 8", "ir_version: 2")),
        "IR version 2 is not one onnx reads",
    ),
    "ir-version-99": (
        lambda path: write_proto(path, MATMUL.replace("ir_version: 8", "ir_version: 99")),
        "IR version 99 is not one onnx reads",
    ),
    "opset-99": (opset(99), "default-domain opset 99 is not one onnx knows"),
    "opset-0": (opset(0), "default-domain opset 0 is not one onnx knows"),
    "no-default-opset": (no_default_opset, "the model imports no default-domain (ai.onnx) opset"),
}


@pytest.mark.parametrize("problem", sorted(BAD_MODELS))
def test_bad_model_file_cli(folders, capsys, caplog, problem):
    source, target = folders
    spoil, message = BAD_MODELS[problem]
    spoil(source / "model.onnx")
    before = snapshot(source.parent)
    argv = [
        "optimize",
        "--recipe",
        "w8a8",
        str(source / "model.onnx"),
        "-o",
        str(target / "q.onnx"),
        "--calib",
        str(source / "calib.npz"),
    ]
    code, lines, _ = run_cli(argv, capsys)
    assert code == 1
    assert_one_error_line(lines, f"{source / 'model.onnx'}: ", message)
    assert [record.getMessage() for record in caplog.records] == []  # the CLI has no log handler: they would print
    assert snapshot(source.parent) == before
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("problem", sorted(BAD_MODELS))
def test_bad_model_file_api(folders, problem):
    source, _ = folders
    spoil, message = BAD_MODELS[problem]
    spoil(source / "model.onnx")
    with pytest.raises(InvalidModelError, match=re.escape(message)):
        graphquant.load(source / "model.onnx")


def test_missing_model_file(folders, capsys):
    source, target = folders
    code, lines, _ = run_cli(
        ["optimize", "--recipe", "w8a8", str(source / "absent.onnx"), "-o", str(target / "q.onnx")], capsys
    )
    assert code == 1
    assert_one_error_line(lines, "absent.onnx: no such file")
    with pytest.raises(InvalidModelError, match="no such file"):
        graphquant.load(source / "absent.onnx")


def test_external_data_inside_the_folder_loads(folders):
    source, _ = folders
    (source / "weights.bin").write_bytes(WEIGHT.tobytes())
    write_external(source / "model.onnx", "weights.bin")
    model = graphquant.load(source / "model.onnx")
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), WEIGHT)


def test_graphquant_errors_share_one_base():
    for error in (InvalidModelError, CalibrationError, OutputError, graphquant.RecipeError):
        assert issubclass(error, GraphQuantError)


# --- bad calibration data ---


def rows(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((ROWS, FEATURES)).astype(np.float32)


def all_nan(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": np.full((ROWS, FEATURES), np.nan, np.float32)}


BAD_FEEDS: dict[str, tuple[Callable[[np.random.Generator], dict[str, np.ndarray]], str]] = {
    "wrong-name": (lambda rng: {"tokens": rows(rng)}, "input 'tokens' is not an input of the model"),
    "extra-name": (lambda rng: {"x": rows(rng), "mask": rows(rng)}, "input 'mask' is not an input of the model"),
    "wrong-dtype": (lambda rng: {"x": rows(rng).astype(np.float64)}, "input 'x': dtype float64 given"),
    "integer-dtype": (lambda rng: {"x": rows(rng).astype(np.int64)}, "input 'x': dtype int64 given"),
    "wrong-width": (lambda rng: {"x": rows(rng)[:, :15]}, "input 'x': shape (8, 15) given, model expects ('?', 16)"),
    "wrong-rank": (lambda rng: {"x": rows(rng).reshape(ROWS, 4, 4)}, "input 'x': shape (8, 4, 4) given"),
    "all-nan": (all_nan, "no finite value"),
    "all-inf": (lambda rng: {"x": np.full((ROWS, FEATURES), np.inf, np.float32)}, "no finite value"),
    "empty": (lambda rng: {"x": np.zeros((0, FEATURES), np.float32)}, "the calibration data set is empty"),
}


@pytest.mark.parametrize("problem", sorted(BAD_FEEDS))
def test_bad_calibration_data_cli(folders, capsys, problem):
    source, target = folders
    make, message = BAD_FEEDS[problem]
    np.savez(source / "bad.npz", **make(np.random.default_rng(1)))
    before = snapshot(source)
    argv = [
        "optimize",
        "--recipe",
        "w8a8",
        str(source / "model.onnx"),
        "-o",
        str(target / "q.onnx"),
        "--calib",
        str(source / "bad.npz"),
    ]
    code, lines, _ = run_cli(argv, capsys)
    assert code == 1
    assert_one_error_line(lines, f"{source / 'bad.npz'}: ", message)
    assert snapshot(source) == before
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("problem", sorted(BAD_FEEDS))
def test_bad_calibration_data_api(problem):
    make, message = BAD_FEEDS[problem]
    arrays = make(np.random.default_rng(1))
    feeds = [] if problem == "empty" else [{k: v[start : start + 8] for k, v in arrays.items()} for start in (0, 8)]
    model = mlp(np.random.default_rng(0))
    with pytest.raises(CalibrationError, match=re.escape(message)):
        graphquant.optimize(model, calibration=feeds, show_progress=False)


def test_bad_calibration_source_cli(folders, capsys):
    source, target = folders
    (source / "calib.txt").write_text("1 2 3\n")
    (source / "calib.csv").write_text("1 2 3\n")
    for calib, message in (
        ("absent.npz", "calibration data not found"),
        ("calib.csv", "must be an .npz file"),
        ("calib.txt", "a text file needs a tokenizer to calibrate from (--tokenizer DIR)"),
    ):
        argv = [
            "optimize",
            "--recipe",
            "w8a8",
            str(source / "model.onnx"),
            "-o",
            str(target / "q.onnx"),
            "--calib",
            str(source / calib),
        ]
        code, lines, _ = run_cli(argv, capsys)
        assert code == 1
        assert_one_error_line(lines, message)
    assert list(target.iterdir()) == []


def npy_member(header: dict[str, object], data: bytes = b"") -> bytes:
    """A .npy file with a hand-written header (its shape need not match the data)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def zip_members(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def object_array(path: Path) -> None:
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))


def truncated_zip(path: Path) -> None:
    np.savez(path, x=rows(np.random.default_rng(1)))
    path.write_bytes(path.read_bytes()[:-200])


def npy_renamed(path: Path) -> None:
    with path.open("wb") as file:
        np.save(file, rows(np.random.default_rng(1)))


def bytes_member(path: Path) -> None:
    zip_members(path, {"x.npy": b"not an array at all"})


def text_member(path: Path) -> None:
    zip_members(path, {"x.npy": npy_member({"descr": "<f4", "fortran_order": False, "shape": (0, 16)}), "a.txt": b"hi"})


def huge_shape(path: Path) -> None:
    """A member that declares 36 TiB of float32 (32 x 309237645312) and stores none of it."""
    zip_members(path, {"x.npy": npy_member({"descr": "<f4", "fortran_order": False, "shape": (32, 309237645312)})})


def short_member(path: Path) -> None:
    data = rows(np.random.default_rng(1)).tobytes()
    zip_members(
        path, {"x.npy": npy_member({"descr": "<f4", "fortran_order": False, "shape": (ROWS, FEATURES)}, data[:-64])}
    )


def bad_crc(path: Path) -> None:
    np.savez(path, x=rows(np.random.default_rng(1)))
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside the stored array: the zip's CRC no longer matches
    path.write_bytes(bytes(data))


BAD_NPZ: dict[str, tuple[Callable[[Path], None], str]] = {
    "object-array": (object_array, "member 'x.npy' holds Python objects (pickled data is never loaded)"),
    "truncated-zip": (truncated_zip, "cannot read .npz (not a zip archive: truncated, or another kind of file)"),
    "npy-renamed-npz": (npy_renamed, "cannot read .npz (a .npy file, not an .npz archive)"),
    "bytes-member": (bytes_member, "member 'x.npy' is not a .npy array"),
    "text-member": (text_member, "member 'a.txt' is not a .npy array"),
    "36-tib-shape": (
        huge_shape,
        "member 'x.npy' declares shape (32, 309237645312) of float32: 3.69e+04 GiB, more than",
    ),
    "short-member": (short_member, "member 'x.npy' stores 1984 bytes, its shape (32, 16) of float32 needs 2048"),
    "bad-crc": (bad_crc, "cannot read .npz (BadZipFile: Bad CRC-32 for file 'x.npy')"),
}


@pytest.mark.parametrize("problem", sorted(BAD_NPZ))
def test_bad_npz_file_cli(folders, capsys, problem):
    source, target = folders
    write, message = BAD_NPZ[problem]
    write(source / "bad.npz")
    before = snapshot(source)
    argv = [
        "optimize",
        "--recipe",
        "w8a8",
        str(source / "model.onnx"),
        "-o",
        str(target / "q.onnx"),
        "--calib",
        str(source / "bad.npz"),
    ]
    code, lines, _ = run_cli(argv, capsys)
    assert code == 1
    assert_one_error_line(lines, f"{source / 'bad.npz'}: ", message)
    assert snapshot(source) == before
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("problem", sorted(BAD_NPZ))
def test_bad_npz_file_api(folders, problem):
    source, _ = folders
    write, message = BAD_NPZ[problem]
    write(source / "bad.npz")
    with pytest.raises(CalibrationError, match=re.escape(message)):
        graphquant.optimize(graphquant.load(source / "model.onnx"), calibration=source / "bad.npz", show_progress=False)


def test_big_endian_calibration_is_converted(folders, capsys):
    source, target = folders
    x = rows(np.random.default_rng(6))
    np.savez(source / "native.npz", x=x)
    np.savez(source / "big.npz", x=x.astype(">f4"))
    outputs = {}
    for name in ("native", "big"):
        argv = ["optimize", "--recipe", "w8a8", str(source / "model.onnx"), "-o", str(target / f"{name}.onnx")]
        code, lines, _ = run_cli([*argv, "--calib", str(source / f"{name}.npz")], capsys)
        assert (code, lines) == (0, [])
        outputs[name] = run(graphquant.load(target / f"{name}.onnx"), {"x": rows(np.random.default_rng(7))})[0]
    np.testing.assert_array_equal(outputs["big"], outputs["native"])
    (reference,) = run(graphquant.load(source / "model.onnx"), {"x": rows(np.random.default_rng(7))})
    assert cosine(reference, outputs["big"]) > 0.99


# --- bad test-data folders (test_data_set_*/input_*.pb) ---


def write_data_set(folder: Path, files: dict[str, bytes]) -> Path:
    """A test-data folder with one data set holding the given files; returns the folder."""
    data_set = folder / "test_data_set_0"
    data_set.mkdir(parents=True)
    for name, data in files.items():
        (data_set / name).write_bytes(data)
    return folder


def input_tensor(x: np.ndarray, **external: str) -> onnx.TensorProto:
    tensor = onnx.numpy_helper.from_array(x, "x")
    if external:
        external_entry(tensor, **external)
    return tensor


def batch(seed: int = 1) -> np.ndarray:
    return rows(np.random.default_rng(seed))[:8]


def letter_name(folder: Path) -> Path:
    return write_data_set(folder, {"input_a.pb": input_tensor(batch()).SerializeToString()})


def sequence(folder: Path) -> Path:
    value = onnx.helper.make_sequence("x", onnx.SequenceProto.TENSOR, [input_tensor(batch())])
    return write_data_set(folder, {"input_0.pb": value.SerializeToString()})


def dims_vs_data(folder: Path) -> Path:
    tensor = input_tensor(batch())
    tensor.dims[1] = 17
    return write_data_set(folder, {"input_0.pb": tensor.SerializeToString()})


def escaping_location(location: str) -> Callable[[Path], Path]:
    """A data set whose input's external data is at ``location`` (a file beside the data folder holds it)."""

    def make(folder: Path) -> Path:
        secret = folder.parent / "secret.bin"
        secret.write_bytes(batch().tobytes())
        tensor = input_tensor(batch(), location=location.format(secret=secret), length=str(batch().nbytes))
        return write_data_set(folder, {"input_0.pb": tensor.SerializeToString()})

    return make


def symlinked_data(folder: Path) -> Path:
    made = escaping_location("data.bin")(folder)
    (folder / "test_data_set_0" / "data.bin").symlink_to(folder.parent / "secret.bin")
    return made


def name_not_utf8(folder: Path) -> Path:
    tensor = onnx.numpy_helper.from_array(batch(), "input-name")
    made = write_data_set(folder, {"input_0.pb": tensor.SerializeToString()})
    file = made / "test_data_set_0" / "input_0.pb"
    file.write_bytes(file.read_bytes().replace(b"input-name", b"input\xffname"))
    return made


BAD_TEST_DATA: dict[str, tuple[Callable[[Path], Path], str]] = {
    "name-not-utf8": (name_not_utf8, "input_0.pb: the TensorProto field 'name' is not UTF-8 text"),
    "letter-name": (letter_name, "input_a.pb: test-data inputs must be named input_<number>.pb"),
    "sequence": (sequence, "input_0.pb: the tensor is segmented: not a plain tensor (a sequence or map?)"),
    "dims-vs-data": (dims_vs_data, "input_0.pb: tensor 'x': dims (8, 17) need 544 bytes, the data holds 512"),
    "dotdot-location": (
        escaping_location("../../secret.bin"),
        "'../../secret.bin' is outside its test_data_set folder",
    ),
    "absolute-location": (escaping_location("{secret}"), "secret.bin' is outside its test_data_set folder"),
    "symlinked-location": (symlinked_data, "'data.bin' is outside its test_data_set folder"),
}


@pytest.mark.parametrize("problem", sorted(BAD_TEST_DATA))
def test_bad_test_data_folder_cli(folders, capsys, monkeypatch, problem):
    source, target = folders
    make, message = BAD_TEST_DATA[problem]
    data = make(source / "data")
    before = snapshot(source.parent)
    monkeypatch.chdir(source.parent)  # a location relative to the working directory must not resolve either
    argv = [
        "optimize",
        "--recipe",
        "w8a8",
        str(source / "model.onnx"),
        "-o",
        str(target / "q.onnx"),
        "--calib",
        str(data),
    ]
    code, lines, _ = run_cli(argv, capsys)
    assert code == 1
    assert_one_error_line(lines, str(data / "test_data_set_0"), message)
    assert snapshot(source.parent) == before
    assert list(target.iterdir()) == []


def test_external_data_inside_the_data_set_is_read(folders):
    source, _ = folders
    x = batch(8)
    (source / "data" / "test_data_set_0").mkdir(parents=True)
    (source / "data" / "test_data_set_0" / "x.bin").write_bytes(x.tobytes())
    tensor = input_tensor(x, location="x.bin", length=str(x.nbytes))
    (source / "data" / "test_data_set_0" / "input_0.pb").write_bytes(tensor.SerializeToString())
    model = graphquant.load(source / "model.onnx")
    (feed,) = list(graphquant.Calibrator.for_model(model, source / "data").data)
    np.testing.assert_array_equal(feed["x"], x)


def with_nonfinite(rng: np.random.Generator) -> np.ndarray:
    """Gaussian rows with 3 NaN, 2 +Inf and 1 -Inf planted."""
    x = rows(rng)
    x[0, 0] = x[5, 3] = x[9, 15] = np.nan
    x[2, 1] = x[30, 7] = np.inf
    x[4, 4] = -np.inf
    return x


def test_nan_and_inf_are_counted_and_left_out_cli(folders, capsys):
    source, target = folders
    np.savez(source / "nonfinite.npz", x=with_nonfinite(np.random.default_rng(2)))
    argv = ["optimize", "--recipe", "w8a8", str(source / "model.onnx"), "-o", str(target / "q.onnx"), "--calib"]
    code, lines, stdout = run_cli([*argv, str(source / "nonfinite.npz")], capsys)
    assert code == 0
    warnings = [line for line in lines if "NaN/Inf" in line]
    assert warnings and all(line.startswith("graphquant: warning: ") for line in lines)
    assert warnings == [
        "graphquant: warning: 6 NaN/Inf values in the calibration inputs were left out of the statistics ('x': 6)"
    ]
    assert f"wrote {target / 'q.onnx'}" in stdout
    (y,) = run(graphquant.load(target / "q.onnx"), {"x": rows(np.random.default_rng(3))})
    assert np.isfinite(y).all()


def test_nan_and_inf_are_counted_and_left_out_api():
    rng = np.random.default_rng(2)
    model = mlp(rng)
    x = with_nonfinite(rng)
    clean = x.copy()
    clean[~np.isfinite(clean)] = 0.0
    with pytest.warns(graphquant.analysis.calibration.NonFiniteCalibrationWarning, match="6 NaN/Inf values"):
        result = graphquant.optimize(model, calibration=[{"x": x}], validation=[{"x": clean}], show_progress=False)
    assert len(result.report.quantized) == 2
    assert result.report.outputs["y"].cosine > 0.99


CONSTANT_FEEDS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "all-zero": lambda rng: np.zeros((ROWS, FEATURES), np.float32),
    "constant": lambda rng: np.full((ROWS, FEATURES), 0.75, np.float32),
    "zero-range-channels": lambda rng: np.where(np.arange(FEATURES) % 3 == 0, 2.5, rows(rng)).astype(np.float32),
}


@pytest.mark.parametrize("recipe", ["w8a8", "outliertune", "smoothquant", "os-plus", "llm-int8"])
@pytest.mark.parametrize("data", sorted(CONSTANT_FEEDS))
def test_constant_and_zero_range_data_quantize_without_nan(recipe, data):
    model = mlp(np.random.default_rng(0))
    x = CONSTANT_FEEDS[data](np.random.default_rng(4))
    result = graphquant.optimize(model, recipe, calibration=[{"x": x}], show_progress=False)
    for value in result.model.graph.initializers.values():
        array = value.const_value.numpy()
        if np.issubdtype(array.dtype, np.floating):
            assert np.isfinite(array).all(), value.name
    for feed in ({"x": x}, {"x": rows(np.random.default_rng(5))}):
        assert np.isfinite(run(result.model, feed)[0]).all()
    assert {layer.status for layer in result.report.layers} == {"quantized"}


def test_zero_range_channels_cli(folders, capsys):
    source, target = folders
    np.savez(source / "flat.npz", x=CONSTANT_FEEDS["zero-range-channels"](np.random.default_rng(4)))
    argv = ["optimize", str(source / "model.onnx"), "-o", str(target / "q.onnx"), "--recipe", "outliertune"]
    code, lines, _ = run_cli([*argv, "--calib", str(source / "flat.npz")], capsys)
    assert (code, lines) == (0, [])
    assert sorted(p.name for p in target.iterdir()) == ["q.onnx"]


# --- output problems ---


def test_output_equal_to_input_is_refused(folders, capsys):
    source, _ = folders
    before = snapshot(source)
    model = str(source / "model.onnx")
    for same in (model, str(source / "." / "model.onnx")):
        code, lines, _ = run_cli(
            ["optimize", "--recipe", "w8a8", model, "-o", same, "--calib", str(source / "calib.npz")], capsys
        )
        assert code == 1
        assert_one_error_line(lines, "--overwrite")
    assert snapshot(source) == before
    loaded = graphquant.load(model)
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        graphquant.save(loaded, source / "model.onnx")
    assert snapshot(source) == before


def test_overwrite_replaces_the_input_and_leaves_nothing_else(folders, capsys):
    source, _ = folders
    model = source / "model.onnx"
    before = model.read_bytes()
    code, _, _ = run_cli(
        [
            "optimize",
            "--recipe",
            "w8a8",
            str(model),
            "-o",
            str(model),
            "--calib",
            str(source / "calib.npz"),
            "--overwrite",
        ],
        capsys,
    )
    assert code == 0
    assert model.read_bytes() != before
    assert sorted(p.name for p in source.iterdir()) == ["calib.npz", "model.onnx"]


def missing_folder(target: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return target / "missing" / "q.onnx"


def file_as_folder(target: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (target / "blocker").write_text("a file, not a folder")
    return target / "blocker" / "q.onnx"


def output_is_a_folder(target: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (target / "q.onnx").mkdir()
    return target / "q.onnx"


def read_only_folder(target: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if os.geteuid() == 0:  # root writes anywhere: refuse temporary files in the folder as a read-only folder would
        make_folder = tempfile.mkdtemp

        def refuse(suffix: str | None = None, prefix: str | None = None, dir: str | None = None) -> str:
            if dir is not None and Path(dir) == target:
                raise PermissionError(13, "Permission denied")
            return make_folder(suffix, prefix, dir)

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    else:
        target.chmod(0o500)
    return target / "q.onnx"


BAD_OUTPUTS: dict[str, tuple[Callable[[Path, pytest.MonkeyPatch], Path], str]] = {
    "missing-folder": (missing_folder, "output folder does not exist"),
    "file-as-folder": (file_as_folder, "output folder does not exist"),
    "output-is-a-folder": (output_is_a_folder, "cannot write"),
    "read-only-folder": (read_only_folder, "cannot write"),
}


@pytest.mark.parametrize("problem", sorted(BAD_OUTPUTS))
def test_unwritable_output_cli(folders, capsys, monkeypatch, problem):
    source, target = folders
    make, message = BAD_OUTPUTS[problem]
    output = make(target, monkeypatch)
    before = snapshot(target)
    argv = [
        "optimize",
        "--recipe",
        "w8a8",
        str(source / "model.onnx"),
        "-o",
        str(output),
        "--calib",
        str(source / "calib.npz"),
    ]
    code, lines, _ = run_cli(argv, capsys)
    target.chmod(0o700)
    assert code == 1
    assert_one_error_line(lines, message)
    assert snapshot(target) == before and not any(p.name.endswith(".tmp") for p in target.rglob("*"))


@pytest.mark.parametrize("problem", sorted(BAD_OUTPUTS))
def test_unwritable_output_api(folders, monkeypatch, problem):
    source, target = folders
    make, message = BAD_OUTPUTS[problem]
    model = graphquant.load(source / "model.onnx")
    output = make(target, monkeypatch)
    before = snapshot(target)
    with pytest.raises(OutputError, match=message):
        graphquant.save(model, output)
    target.chmod(0o700)
    assert snapshot(target) == before


def fail_while_writing(error: BaseException) -> Callable[..., None]:
    """An ir.save stand-in that writes half a file (and half its external data) and then raises ``error``."""

    def save(model: ir.Model, path: str | os.PathLike[str], external_data: str | None = None, **_: object) -> None:
        data = ir.to_proto(model).SerializeToString()
        Path(path).write_bytes(data[: len(data) // 2])
        if external_data is not None:
            Path(path).with_name(external_data).write_bytes(data[: len(data) // 3])
        raise error

    return save


INTERRUPTIONS: dict[str, tuple[BaseException, int, str]] = {
    "interrupted": (KeyboardInterrupt(), 130, "interrupted"),
    "disk-full": (OSError(28, "No space left on device"), 1, "No space left on device"),
}


@pytest.mark.parametrize("problem", sorted(INTERRUPTIONS))
def test_failed_save_leaves_no_partial_file_cli(folders, capsys, monkeypatch, problem):
    source, target = folders
    error, exit_code, message = INTERRUPTIONS[problem]
    monkeypatch.setattr(graphquant.api.ir, "save", fail_while_writing(error))
    before = snapshot(source)
    argv = [
        "optimize",
        "--recipe",
        "w8a8",
        str(source / "model.onnx"),
        "-o",
        str(target / "q.onnx"),
        "--calib",
        str(source / "calib.npz"),
    ]
    code, lines, _ = run_cli(argv, capsys)
    assert code == exit_code
    assert_one_error_line(lines, message)
    assert snapshot(source) == before
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
@pytest.mark.parametrize("problem", sorted(INTERRUPTIONS))
def test_failed_save_leaves_no_partial_file_api(folders, monkeypatch, problem, external):
    source, target = folders
    error, _, message = INTERRUPTIONS[problem]
    previous = {"q.onnx": b"the previous output", "q.onnx.data": b"its previous weights"}
    for name, data in previous.items():
        (target / name).write_bytes(data)
    model = graphquant.load(source / "model.onnx")
    if external:
        monkeypatch.setattr(graphquant.api, "PROTO_SIZE_LIMIT", 0)
    monkeypatch.setattr(graphquant.api.ir, "save", fail_while_writing(error))
    expected = KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else OutputError
    with pytest.raises(expected, match=None if expected is KeyboardInterrupt else message):
        graphquant.save(model, target / "q.onnx")
    assert snapshot(target) == previous


def test_output_that_onnxruntime_cannot_load_is_not_written(folders, monkeypatch):
    source, target = folders
    model = graphquant.load(source / "model.onnx")
    relu = next(node for node in model.graph if node.op_type == "Relu")
    relu.domain = "com.example.unknown"
    model.opset_imports["com.example.unknown"] = 1
    with pytest.raises(OutputError, match="onnxruntime cannot load the output.*com.example.unknown"):
        graphquant.save(model, target / "q.onnx")
    assert list(target.iterdir()) == []


def test_saved_file_follows_the_umask(folders):
    source, target = folders
    old = os.umask(0o022)
    try:
        written = graphquant.save(graphquant.load(source / "model.onnx"), target / "q.onnx")
    finally:
        os.umask(old)
    assert written.stat().st_mode & 0o777 == 0o644


# --- the environment and the options ---


def optimize_argv(source: Path, target: Path, *extra: str) -> list[str]:
    """The optimize command on the fixture's model and calibration data, writing target/q.onnx."""
    return [
        "optimize",
        "--recipe",
        "w8a8",
        str(source / "model.onnx"),
        "-o",
        str(target / "q.onnx"),
        "--calib",
        str(source / "calib.npz"),
        *extra,
    ]


def refuse_to_write(error_number: int) -> Callable[..., None]:
    """An onnx.save stand-in that writes half the file and then fails as a full (or read-only) disk does."""

    def save(proto: onnx.ModelProto, path: str | os.PathLike[str], *_: object, **__: object) -> None:
        Path(path).write_bytes(proto.SerializeToString()[:100])
        raise OSError(error_number, os.strerror(error_number), str(path))

    return save


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_full_tmpdir_is_one_error_line(folders, capsys, monkeypatch, tmp_path, error_number):
    source, target = folders
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(graphquant.analysis.runner.onnx, "save", refuse_to_write(error_number))
    before = snapshot(source)
    code, lines, _ = run_cli(optimize_argv(source, target), capsys)
    assert code == 1
    assert_one_error_line(lines, f"{scratch}: cannot write temporary files ({os.strerror(error_number)})", "TMPDIR")
    assert list(scratch.iterdir()) == [] and list(target.iterdir()) == []
    assert snapshot(source) == before


def test_tmpdir_that_cannot_hold_a_folder_is_one_error_line(folders, capsys, monkeypatch, tmp_path):
    source, target = folders
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))  # e.g. removed while graphquant runs
    code, lines, _ = run_cli(optimize_argv(source, target), capsys)
    assert code == 1
    assert_one_error_line(lines, f"{tmp_path / 'missing'}: cannot write temporary files (No such file or directory)")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("setting", ["missing", "a-file"])
def test_unusable_tmpdir_setting_falls_back_to_a_usable_folder(folders, capsys, monkeypatch, tmp_path, setting):
    source, target = folders
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("TMPDIR", str(tmp_path / setting))
    monkeypatch.setattr(tempfile, "tempdir", None)
    code, lines, _ = run_cli(optimize_argv(source, target), capsys)
    assert (code, lines) == (0, [])
    x = rows(np.random.default_rng(9))
    (reference,) = run(graphquant.load(source / "model.onnx"), {"x": x})
    (quantized,) = run(graphquant.load(target / "q.onnx"), {"x": x})
    assert cosine(reference, quantized) > 0.99


WRONG_OPTIONS: dict[str, tuple[str, str]] = {
    "string-for-int": ('wbits = "eight"', "option 'wbits' must be int, got 'eight'"),
    "float-for-int": ("wbits = 8.5", "option 'wbits' must be int, got 8.5"),
    "bool-for-int": ("wbits = true", "option 'wbits' must be int, got True"),
    "string-for-bool": ('gptq = "yes"', "option 'gptq' must be bool, got 'yes'"),
    "list-for-optional-int": ("block_size = [32]", "option 'block_size' must be int or None, got [32]"),
    "nan-for-float": ("percentile = nan", "option 'percentile' must be a finite number, got nan"),
    "inf-for-float": ("percentile = inf", "option 'percentile' must be a finite number, got inf"),
}


@pytest.mark.parametrize("problem", sorted(WRONG_OPTIONS))
def test_recipe_option_of_the_wrong_type_cli(folders, capsys, problem):
    source, target = folders
    option, message = WRONG_OPTIONS[problem]
    recipe = source / "recipe.toml"
    recipe.write_text(f'name = "typo"\n[[passes]]\nname = "quantize"\noptions = {{ {option} }}\n')
    code, lines, _ = run_cli(optimize_argv(source, target, "--recipe", str(recipe)), capsys)
    assert code == 1
    assert_one_error_line(lines, f"{recipe}: pass 'quantize': {message}")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("problem", sorted(WRONG_OPTIONS))
def test_recipe_option_of_the_wrong_type_api(problem):
    option, message = WRONG_OPTIONS[problem]
    name, value = (part.strip() for part in option.split("="))
    parsed = tomllib.loads(f"v = {value}")["v"]
    with pytest.raises(graphquant.RecipeError, match=re.escape(message)):
        graphquant.Recipe("typo", (graphquant.PassStep("quantize", {name: parsed}),))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_max_overhead_must_be_finite(folders, capsys, value):
    source, target = folders
    code, lines, _ = run_cli(optimize_argv(source, target, "--recipe", "splitquant", f"--max-overhead={value}"), capsys)
    assert code == 1
    assert_one_error_line(lines, "option 'max_overhead' must be a finite number")
    assert list(target.iterdir()) == []


def test_numpy_numbers_are_accepted_as_options():
    recipe = graphquant.Recipe(
        "np", (graphquant.PassStep("quantize", {"wbits": np.int64(6), "percentile": np.float32(99)}),)
    )
    assert recipe.steps[0].options["wbits"] == 6


# --- onnxscript's version converter stays quiet ---


OPSET_6_MLP = """
<ir_version: 3, opset_import: ["" : 6]>
old (float[N, 16] x, float[16, 16] w, float[16] b) => (float[N, 16] y) {
  h = Gemm(x, w, b)
  y = Relu(h)
}
"""


def test_old_opset_model_with_a_symbolic_batch_prints_no_traceback(folders, capsys, caplog):
    source, target = folders
    write_proto(source / "model.onnx", OPSET_6_MLP)
    model = onnx.load(source / "model.onnx")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(16, np.float32), "b"))
    onnx.save(model, source / "model.onnx")
    code, lines, _ = run_cli(optimize_argv(source, target), capsys)
    # onnx's converter cannot move Gemm-6 with a symbolic batch (and logs why, with a traceback), and onnxruntime
    # has no Gemm-6: the run ends in one error line, whichever model it names.
    assert code == 1
    (line,) = lines
    assert line.startswith("graphquant: error: ") and "Traceback" not in line and "internal error" not in line
    assert [record.getMessage() for record in caplog.records] == []  # the CLI has no handler: they would print
    assert list(target.iterdir()) == []
