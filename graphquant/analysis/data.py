"""Calibration and validation feeds: .npz files, ONNX test-data folders, text, images, iterables, random inputs."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir

from graphquant.errors import CalibrationError, InvalidModelError
from graphquant.frontends.onnx_file import check_tensor, check_text

Feed = dict[str, np.ndarray]

DEFAULT_BATCH_SIZE = 8
RANDOM_BATCHES = 8
RANDOM_SYMBOLIC_DIM = 8
GIB = 1 << 30
NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
# What a damaged archive raises: zipfile, zlib and numpy's .npy header parser each have their own types.
NPZ_READ_ERRORS = (OSError, EOFError, ValueError, SyntaxError, zipfile.BadZipFile, zlib.error, NotImplementedError)
INPUT_FILE = re.compile(r"input_(\d+)\.pb")
TEXT_SUFFIXES = (".txt", ".text")


class RandomCalibrationWarning(UserWarning):
    """Random calibration data gives ranges that do not represent real inputs."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a graph input accepts: name, numpy dtype, and shape (None for a symbolic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    @classmethod
    def of_model(cls, model: ir.Model) -> list[InputSpec]:
        """The specs of the model's real inputs (initializers listed as inputs excluded)."""
        specs = []
        for value in model.graph.inputs:
            if value.const_value is not None or value.name in model.graph.initializers:
                continue
            if value.dtype is None:
                raise CalibrationError(f"input {value.name!r} has no element type")
            shape = None
            if value.shape is not None:
                shape = tuple(dim if isinstance(dim, int) else None for dim in value.shape)
            specs.append(cls(value.name or "", np.dtype(value.dtype.numpy()), shape))
        return specs

    def check(self, array: np.ndarray) -> None:
        """Refuse an array whose dtype or shape this input cannot take."""
        if array.dtype != self.dtype:
            raise CalibrationError(f"input {self.name!r}: dtype {array.dtype} given, model expects {self.dtype}")
        if self.shape is None:
            return
        if array.ndim != len(self.shape) or any(
            want is not None and want != got for want, got in zip(self.shape, array.shape)
        ):
            expected = tuple("?" if d is None else d for d in self.shape)
            raise CalibrationError(f"input {self.name!r}: shape {array.shape} given, model expects {expected}")


class FeedLoader(abc.ABC):
    """Calibration data read by a loader of its own (analysis/text_calib.py, analysis/image_calib.py)."""

    path: Path

    @abc.abstractmethod
    def feeds(self, inputs: list[InputSpec]) -> Iterator[Feed]:
        """The batches, built for the model's inputs."""


CalibrationSource = str | Path | FeedLoader | Iterable[Mapping[str, np.ndarray]]


class CalibrationData:
    """A re-iterable source of feeds checked against the model's inputs."""

    def __init__(self, source: CalibrationSource, inputs: list[InputSpec], batch_size: int = DEFAULT_BATCH_SIZE):
        self.inputs = inputs
        self.source = source
        self.batch_size = batch_size
        self.is_random = isinstance(source, str) and source == "random"
        self._materialized: list[Feed] | None = None
        self.nonfinite: dict[str, int] = {}
        # Batches and samples (rows of the first input) of the last full pass; None before one.
        self.size: tuple[int, int] | None = None
        if self.is_random:
            warnings.warn(
                "calibrating on RANDOM inputs: the activation ranges will not represent real data, "
                "so the quantized model's accuracy will be poor; pass real samples for deployment",
                RandomCalibrationWarning,
                stacklevel=2,
            )
        elif isinstance(source, (str, Path)):
            self._check_path(Path(source))
        elif isinstance(source, FeedLoader):
            pass
        elif not isinstance(source, Iterable):
            raise CalibrationError(f"calibration data of type {type(source).__name__} is not supported")
        elif not isinstance(source, (list, tuple)):
            self._materialized = [dict(feed) for feed in source]
        first = next(iter(self), None)
        if first is None:
            raise CalibrationError(f"{self._where}the calibration data set is empty")

    def _check_path(self, path: Path) -> None:
        """Refuse a missing path or a file no reader takes; an image folder (no test_data_set_*) gets its loader."""
        if not path.exists():
            raise CalibrationError(f"{path}: calibration data not found")
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            raise CalibrationError(f"{path}: a text file needs a tokenizer to calibrate from (--tokenizer DIR)")
        if path.is_file() and path.suffix != ".npz":
            raise CalibrationError(
                f"{path}: calibration data must be an .npz file, a test-data or image folder, "
                "or a text file with --tokenizer"
            )
        if path.is_dir() and not is_test_data(path):
            from graphquant.analysis.image_calib import ImageCalibration

            self.source = ImageCalibration(path, batch_size=self.batch_size)

    def __iter__(self) -> Iterator[Feed]:
        """Yield checked feeds, one batch at a time; a full pass counts NaN/Inf per input and sets ``size``."""
        finite: dict[str, int] = {}
        nonfinite: dict[str, int] = {}
        batches = samples = 0
        for feed in self._raw_feeds():
            try:
                checked = self._checked(feed)
            except CalibrationError as exc:
                raise CalibrationError(f"{self._where}{exc}") from None
            for name, array in checked.items():
                if np.issubdtype(array.dtype, np.floating):
                    good = int(np.count_nonzero(np.isfinite(array)))
                    finite[name] = finite.get(name, 0) + good
                    nonfinite[name] = nonfinite.get(name, 0) + array.size - good
            batches, samples = batches + 1, samples + rows(checked)
            yield checked
        for name, count in nonfinite.items():
            if count and not finite[name]:
                raise CalibrationError(f"{self._where}input {name!r} has no finite value in the calibration data")
        self.nonfinite = {name: count for name, count in nonfinite.items() if count}
        self.size = (batches, samples)

    @property
    def _where(self) -> str:
        """The prefix that names the calibration file or folder in errors ("" for data given in memory)."""
        if isinstance(self.source, FeedLoader):
            return f"{self.source.path}: "
        return f"{Path(self.source)}: " if isinstance(self.source, (str, Path)) and not self.is_random else ""

    def __len__(self) -> int:
        """The number of batches."""
        return sum(1 for _ in self._raw_feeds())

    def _raw_feeds(self) -> Iterator[Mapping[str, np.ndarray]]:
        """Feeds as the source gives them."""
        if self.is_random:
            return _random_feeds(self.inputs)
        if self._materialized is not None:
            return iter(self._materialized)
        if isinstance(self.source, FeedLoader):
            return self.source.feeds(self.inputs)
        if isinstance(self.source, (str, Path)):
            path = Path(self.source)
            return (
                _npz_feeds(path, self.inputs, self.batch_size)
                if path.is_file()
                else _test_data_feeds(path, self.inputs)
            )
        return iter(self.source)  # type: ignore[arg-type]

    def _checked(self, feed: Mapping[str, np.ndarray]) -> Feed:
        """Check a feed's names, dtypes and shapes against the model inputs."""
        expected = {spec.name: spec for spec in self.inputs}
        unknown = sorted(set(feed) - set(expected))
        if unknown:
            raise CalibrationError(f"input {unknown[0]!r} is not an input of the model (inputs: {sorted(expected)})")
        missing = sorted(set(expected) - set(feed))
        if missing:
            raise CalibrationError(f"input {missing[0]!r} is missing from the calibration data")
        checked = {}
        for name, value in feed.items():
            array = np.asarray(value)
            if not array.dtype.isnative:  # big-endian data (from another machine) is read, not refused
                array = array.astype(array.dtype.newbyteorder("="))
            expected[name].check(array)
            checked[name] = array
        return checked


def _npz_feeds(path: Path, inputs: list[InputSpec], batch_size: int) -> Iterator[Feed]:
    """Slice an .npz of stacked samples (first axis) into batches."""
    arrays = _npz_arrays(path)
    if not arrays:
        raise CalibrationError(f"{path}: the .npz holds no arrays")
    samples = {key: (array.shape[0] if array.ndim else 0) for key, array in arrays.items()}
    if len(set(samples.values())) != 1:
        raise CalibrationError(f"{path}: arrays disagree on the number of samples: {samples}")
    total = next(iter(samples.values()))
    static = _batch_size_for(inputs, 0)
    if static and total % static:  # refuse up front: a short last batch would only be refused mid-run
        raise CalibrationError(f"{path}: {total} samples do not split into the model's static batch size {static}")
    step = static or batch_size
    for start in range(0, total, step):
        yield {key: array[start : start + step] for key, array in arrays.items()}


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, each member's header checked before its data is read (nothing unpickled)."""
    if not zipfile.is_zipfile(path):
        with path.open("rb") as file:
            npy = file.read(len(NPY_MAGIC)) == NPY_MAGIC
        kind = "a .npy file, not an .npz archive" if npy else "not a zip archive: truncated, or another kind of file"
        raise CalibrationError(f"{path}: cannot read .npz ({kind})")
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            return {info.filename.removesuffix(".npy"): _npy_member(path, archive, info) for info in members}
    except NPZ_READ_ERRORS as exc:
        raise CalibrationError(f"{path}: cannot read .npz ({type(exc).__name__}: {_first_line(exc)})") from exc


def _npy_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy member, refused if it holds objects or declares more bytes than it stores or memory can hold."""
    label = f"{path}: member {info.filename!r}"
    with archive.open(info) as member:
        if not info.filename.endswith(".npy") or member.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise CalibrationError(f"{label} is not a .npy array")
        member.seek(0)
        version = np.lib.format.read_magic(member)
        if version not in NPY_HEADER_READERS:
            raise CalibrationError(f"{label}: .npy format version {version} is not supported")
        shape, _, dtype = NPY_HEADER_READERS[version](member)
        stored = info.file_size - member.tell()
    if dtype.hasobject:
        raise CalibrationError(f"{label} holds Python objects (pickled data is never loaded)")
    declared = math.prod(shape) * dtype.itemsize
    available = available_memory()
    if available is not None and declared > available:
        raise CalibrationError(
            f"{label} declares shape {shape} of {dtype}: {declared / GIB:.3g} GiB, "
            f"more than the {available / GIB:.3g} GiB of available memory"
        )
    if declared > stored:
        raise CalibrationError(f"{label} stores {stored} bytes, its shape {shape} of {dtype} needs {declared}")
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def rows(feed: Mapping[str, np.ndarray]) -> int:
    """The samples in one feed: the first axis of its first input that has one (1 if every input is a scalar)."""
    return next((int(np.shape(array)[0]) for array in feed.values() if np.ndim(array)), 1)


def available_memory() -> int | None:
    """Bytes a new allocation can take: MemAvailable on Linux, else the physical memory, if either is known."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _batch_size_for(inputs: list[InputSpec], default: int) -> int:
    """The static batch dim shared by the inputs, or the default where the batch dim is symbolic."""
    static = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] is not None}
    return static.pop() if len(static) == 1 else default


def is_test_data(directory: Path) -> bool:
    """Whether a folder has the ONNX test-data layout (test_data_set_* folders)."""
    return any(path.is_dir() for path in directory.glob("test_data_set_*"))


def _test_data_feeds(directory: Path, inputs: list[InputSpec]) -> Iterator[Feed]:
    """Read the ONNX test-data layout: test_data_set_*/input_<n>.pb, external data kept inside each data set."""
    data_sets = sorted(path for path in directory.glob("test_data_set_*") if path.is_dir())
    if not data_sets:
        raise CalibrationError(f"{directory}: no test_data_set_* folders")
    for data_set in data_sets:
        feed = {}
        for index, file in enumerate(_input_files(data_set)):
            tensor = _read_tensor(file)
            name = tensor.name or (inputs[index].name if index < len(inputs) else f"input_{index}")
            try:
                feed[name] = onnx.numpy_helper.to_array(tensor, base_dir=str(data_set))
            except Exception as exc:  # onnx raises many types on tensors it cannot convert
                raise CalibrationError(f"{file}: cannot read the tensor ({_first_line(exc)})") from exc
        yield feed


def _input_files(data_set: Path) -> list[Path]:
    """The data set's input_<n>.pb files in the order of n."""
    files = sorted(data_set.glob("input_*.pb"))
    for file in files:
        if not INPUT_FILE.fullmatch(file.name):
            raise CalibrationError(f"{file}: test-data inputs must be named input_<number>.pb")
    return sorted(files, key=lambda file: int(INPUT_FILE.fullmatch(file.name)[1]))  # type: ignore[index]


def _read_tensor(file: Path) -> onnx.TensorProto:
    """A checked TensorProto: dims match its data, external data stays inside the data set's folder."""
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(file.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-derived errors
        raise CalibrationError(f"{file}: not a serialized TensorProto") from exc
    try:
        check_text(tensor)
        check_tensor(tensor, file.parent, own_file=file, folder="its test_data_set folder")
    except InvalidModelError as exc:
        raise CalibrationError(f"{file}: {exc}") from None
    return tensor


def _random_feeds(inputs: list[InputSpec]) -> Iterator[Feed]:
    """Seeded random feeds that fit the input types; symbolic dims become small fixed sizes."""
    rng = np.random.default_rng(0)
    for _ in range(RANDOM_BATCHES):
        feed = {}
        for spec in inputs:
            shape = tuple(RANDOM_SYMBOLIC_DIM if d is None else d for d in (spec.shape or ()))
            if np.issubdtype(spec.dtype, np.floating):
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype == np.bool_:
                feed[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
            else:
                feed[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
        yield feed
