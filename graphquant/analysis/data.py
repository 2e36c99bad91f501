"""Calibration and validation feeds: .npz files, ONNX test-data folders, iterables, or random inputs."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir

from graphquant.errors import CalibrationError

Feed = dict[str, np.ndarray]
CalibrationSource = str | Path | Iterable[Mapping[str, np.ndarray]]

DEFAULT_BATCH_SIZE = 8
RANDOM_BATCHES = 8
RANDOM_SYMBOLIC_DIM = 8


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


class CalibrationData:
    """A re-iterable source of feeds checked against the model's inputs."""

    def __init__(self, source: CalibrationSource, inputs: list[InputSpec], batch_size: int = DEFAULT_BATCH_SIZE):
        self.inputs = inputs
        self.source = source
        self.batch_size = batch_size
        self.is_random = isinstance(source, str) and source == "random"
        self._materialized: list[Feed] | None = None
        self.nonfinite: dict[str, int] = {}
        if self.is_random:
            warnings.warn(
                "calibrating on RANDOM inputs: the activation ranges will not represent real data, "
                "so the quantized model's accuracy will be poor; pass real samples for deployment",
                RandomCalibrationWarning,
                stacklevel=2,
            )
        elif isinstance(source, (str, Path)):
            path = Path(source)
            if not path.exists():
                raise CalibrationError(f"{path}: calibration data not found")
            if path.is_file() and path.suffix != ".npz":
                raise CalibrationError(f"{path}: calibration data must be an .npz file or a test-data directory")
        elif not isinstance(source, Iterable):
            raise CalibrationError(f"calibration data of type {type(source).__name__} is not supported")
        elif not isinstance(source, (list, tuple)):
            self._materialized = [dict(feed) for feed in source]
        first = next(iter(self), None)
        if first is None:
            raise CalibrationError("the calibration data set is empty")

    def __iter__(self) -> Iterator[Feed]:
        """Yield checked feeds, one batch at a time; a full pass counts NaN/Inf per input into ``nonfinite``."""
        finite: dict[str, int] = {}
        nonfinite: dict[str, int] = {}
        for feed in self._raw_feeds():
            checked = self._checked(feed)
            for name, array in checked.items():
                if np.issubdtype(array.dtype, np.floating):
                    good = int(np.count_nonzero(np.isfinite(array)))
                    finite[name] = finite.get(name, 0) + good
                    nonfinite[name] = nonfinite.get(name, 0) + array.size - good
            yield checked
        for name, count in nonfinite.items():
            if count and not finite[name]:
                raise CalibrationError(f"input {name!r} has no finite value in the calibration data")
        self.nonfinite = {name: count for name, count in nonfinite.items() if count}

    def __len__(self) -> int:
        """The number of batches."""
        return sum(1 for _ in self._raw_feeds())

    def _raw_feeds(self) -> Iterator[Mapping[str, np.ndarray]]:
        """Feeds as the source gives them."""
        if self.is_random:
            return _random_feeds(self.inputs)
        if self._materialized is not None:
            return iter(self._materialized)
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
            expected[name].check(array)
            checked[name] = array
        return checked


def _npz_feeds(path: Path, inputs: list[InputSpec], batch_size: int) -> Iterator[Feed]:
    """Slice an .npz of stacked samples (first axis) into batches."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: cannot read .npz ({exc})") from exc
    with archive:
        arrays = {key: archive[key] for key in archive.files}
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


def _batch_size_for(inputs: list[InputSpec], default: int) -> int:
    """The static batch dim shared by the inputs, or the default where the batch dim is symbolic."""
    static = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] is not None}
    return static.pop() if len(static) == 1 else default


def _test_data_feeds(directory: Path, inputs: list[InputSpec]) -> Iterator[Feed]:
    """Read the ONNX test-data layout: test_data_set_*/input_*.pb."""
    data_sets = sorted(directory.glob("test_data_set_*"))
    if not data_sets:
        raise CalibrationError(f"{directory}: no test_data_set_* folders")
    for data_set in data_sets:
        files = sorted(data_set.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[-1]))
        feed = {}
        for index, file in enumerate(files):
            tensor = onnx.TensorProto()
            try:
                tensor.ParseFromString(file.read_bytes())
            except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-derived errors
                raise CalibrationError(f"{file}: not a serialized TensorProto") from exc
            name = tensor.name or (inputs[index].name if index < len(inputs) else f"input_{index}")
            feed[name] = onnx.numpy_helper.to_array(tensor)
        yield feed


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
