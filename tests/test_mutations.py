"""Seeded byte-level mutants of small models and calibration files, run through the CLI in-process: each ends in
success or one error line naming the input, with no traceback, no internal error, no leftover file and the inputs
untouched. ``GRAPHQUANT_MUTATIONS=deep`` runs many more mutants per input."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest
from builders import build, mlp, save_model, weights

from graphquant.cli import main

DEEP = os.environ.get("GRAPHQUANT_MUTATIONS") == "deep"
MUTANTS_PER_INPUT = 600 if DEEP else 40
ROWS, FEATURES = 16, 16
# An error names an input by its path (every input is in the mutant's folder) or as one of the run's models.
MODEL_NAMES = ("the model", "the original model", "the quantized model")
MAX_SECONDS_PER_MUTANT = 30  # a hang or a runaway allocation shows up as a slow mutant

OPSET_11_MLP = """
<ir_version: 6, opset_import: ["" : 11]>
old (float[N, 16] x) => (float[N, 4] y) {
  h = Gemm(x, w1, b1)
  s = Unsqueeze<axes: ints = [0]>(h)
  q = Squeeze<axes: ints = [0]>(s)
  r = Relu(q)
  y = MatMul(r, w2)
}
"""


@dataclasses.dataclass(frozen=True)
class Subject:
    """One input set: the files of a run, the file whose mutants are tried, and the CLI arguments."""

    name: str
    make: Callable[[Path], None]
    mutated: str
    argv: tuple[str, ...]


def single_file_model(folder: Path) -> None:
    rng = np.random.default_rng(0)
    save_model(mlp(rng), folder / "model.onnx")
    np.savez(folder / "calib.npz", x=rng.standard_normal((ROWS, FEATURES)).astype(np.float32))


def external_data_model(folder: Path) -> None:
    rng = np.random.default_rng(1)
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]>\nm (float[N, 16] x) => (float[N, 8] y) {\n  h = MatMul(x, w)\n'
        "  y = Relu(h)\n}"
    )
    proto.graph.initializer.append(onnx.numpy_helper.from_array(weights(rng, 16, 8), "w"))
    onnx.save(proto, folder / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    np.savez_compressed(folder / "calib.npz", x=rng.standard_normal((ROWS, FEATURES)).astype(np.float32))


def old_opset_model(folder: Path) -> None:
    rng = np.random.default_rng(2)
    save_model(
        build(OPSET_11_MLP, {"w1": weights(rng, 16, 8), "b1": weights(rng, 8), "w2": weights(rng, 8, 4)}),
        folder / "model.onnx",
    )
    np.savez(folder / "calib.npz", x=rng.standard_normal((ROWS, FEATURES)).astype(np.float32))


def data_folder_model(folder: Path) -> None:
    rng = np.random.default_rng(3)
    save_model(mlp(rng), folder / "model.onnx")
    data_set = folder / "data" / "test_data_set_0"
    data_set.mkdir(parents=True)
    x = rng.standard_normal((8, FEATURES)).astype(np.float32)
    (data_set / "input_0.pb").write_bytes(onnx.numpy_helper.from_array(x, "x").SerializeToString())


# Paths in the arguments are relative to the mutant's folder.
OPTIMIZE = ("optimize", "--recipe", "w8a8", "{}/model.onnx", "-o", "{}/out/q.onnx", "--calib", "{}/calib.npz")
SUBJECTS = [
    Subject("model", single_file_model, "model.onnx", OPTIMIZE),
    Subject("calibration-npz", single_file_model, "calib.npz", OPTIMIZE),
    Subject("external-model", external_data_model, "model.onnx", OPTIMIZE),
    Subject("external-weights", external_data_model, "weights.bin", OPTIMIZE),
    Subject("compressed-npz", external_data_model, "calib.npz", OPTIMIZE),
    Subject("old-opset-model", old_opset_model, "model.onnx", (*OPTIMIZE, "--recipe", "outliertune")),
    Subject("test-data-pb", data_folder_model, "data/test_data_set_0/input_0.pb", (*OPTIMIZE[:-1], "{}/data")),
    Subject("inspect-model", single_file_model, "model.onnx", ("inspect", "{}/model.onnx", "--calib", "{}/calib.npz")),
]


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One seeded byte-level mutant: bit flips, a truncation, an insertion, or a zeroed run."""
    kind = int(rng.integers(4))
    at = int(rng.integers(len(data)))
    if kind == 0:
        flipped = bytearray(data)
        positions = rng.integers(len(data), size=int(rng.integers(1, 5)))
        for position in positions:
            flipped[position] ^= int(rng.integers(1, 256))
        return bytes(flipped), f"flip bytes {sorted(int(p) for p in positions)}"
    if kind == 1:
        return data[:at], f"truncate to {at} bytes"
    if kind == 2:
        extra = rng.integers(0, 256, size=int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
        return data[:at] + extra + data[at:], f"insert {extra.hex()} at {at}"
    length = int(rng.integers(1, 33))
    return data[:at] + bytes(min(length, len(data) - at)) + data[at + length :], f"zero {length} bytes at {at}"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Records(logging.Handler):
    """Collects the log records a terminal would show (the CLI installs no handler: WARNING and up would print)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def recorded_logs() -> Iterator[Records]:
    handler = Records()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


def run_in(folder: Path, argv: tuple[str, ...]) -> tuple[int, str, list[str]]:
    """main() run in ``folder``: exit code, stderr, and the log records it would have printed."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), recorded_logs() as logs:
        code = main([part.format(folder) for part in argv])
    return code, err.getvalue(), logs.messages


def problems_of(subject: Subject, folder: Path, code: int, err: str, logs: list[str]) -> list[str]:
    """What the run did wrong, if anything."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("graphquant: warning: ")]
    found = [f"printed log record {message!r}" for message in logs]
    if code not in (0, 1):
        found.append(f"exit code {code}")
    if code == 0 and errors:
        found.append(f"succeeded with error output {errors!r}")
    if code == 1:
        if len(errors) != 1 or not errors[0].startswith("graphquant: error: "):
            found.append(f"not one error line: {errors!r}")
        elif "internal error" in errors[0] or "Traceback" in errors[0]:
            found.append(errors[0])
        elif str(folder) not in errors[0] and not any(name in errors[0] for name in MODEL_NAMES):
            found.append(f"names no input: {errors[0]}")
    written = sorted(str(p.relative_to(folder / "out")) for p in (folder / "out").rglob("*"))
    expected = [["q.onnx"], ["q.onnx", "q.onnx.data"]] if code == 0 and subject.argv[0] == "optimize" else [[]]
    if written not in expected:
        found.append(f"left {written} in the output folder")
    return found


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda subject: subject.name)
def test_mutants_end_cleanly(subject, tmp_path, monkeypatch):
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    subject.make(pristine)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    original = (pristine / subject.mutated).read_bytes()
    rng = np.random.default_rng(zlib.crc32(subject.name.encode()))  # the deep profile extends the default one
    failures = []
    outcomes = {0: 0, 1: 0}
    start = time.perf_counter()
    for index in range(MUTANTS_PER_INPUT):
        folder = tmp_path / f"mutant-{index}"
        shutil.copytree(pristine, folder, symlinks=True)
        (folder / "out").mkdir()
        data, change = mutate(original, rng)
        (folder / subject.mutated).write_bytes(data)
        before = snapshot(folder)
        began = time.perf_counter()
        code, err, logs = run_in(folder, subject.argv)
        took = time.perf_counter() - began
        outcomes[code] = outcomes.get(code, 0) + 1
        found = problems_of(subject, folder, code, err, logs)
        if took > MAX_SECONDS_PER_MUTANT:
            found.append(f"took {took:.0f} s")
        shutil.rmtree(folder / "out")
        (folder / "out").mkdir()
        if snapshot(folder) != before:
            found.append("changed an input file")
        if list(scratch.iterdir()):
            found.append(f"left {sorted(p.name for p in scratch.iterdir())} in TMPDIR")
            for leftover in scratch.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        if os.environ.get("GRAPHQUANT_MUTATIONS_SHOW"):
            print(code, err.strip().splitlines()[-1:] if err.strip() else "")
        if found:
            failures.append(f"{subject.mutated} #{index} ({change}): {'; '.join(found)}")
        shutil.rmtree(folder)
    elapsed = time.perf_counter() - start
    print(f"{subject.name}: {MUTANTS_PER_INPUT} mutants in {elapsed:.1f} s, outcomes {outcomes}")
    assert failures == [], "\n".join(failures)
