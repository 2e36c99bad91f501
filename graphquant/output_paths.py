"""Where a run may write: every output path is checked against the files the run reads before any work starts."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from graphquant.errors import OutputError

# Model metadata: the files a loaded model came from (ReadFile entries), kept on the models optimize derives from it.
INPUT_FILES_KEY = "graphquant.input_files"
# The label of the model output: the only output that may replace the input model (with overwrite).
MODEL_OUTPUT = "the output"

_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISFIFO: "a FIFO",
    stat.S_ISSOCK: "a socket",
}


@dataclasses.dataclass(frozen=True)
class ReadFile:
    """A file (or a folder, all of whose files count) that the run reads, and what it is to the run."""

    path: Path
    what: str
    folder: bool = False
    is_input_model: bool = False

    def holds(self, target: Path) -> bool:
        """Whether writing ``target`` would replace this file or a file inside this folder."""
        if self.folder:
            return target.is_relative_to(self.path)
        return _same_file(self.path, target)


def data_path(output: str | os.PathLike[str]) -> Path:
    """The external-data file that a model written to ``output`` may get beside it."""
    path = Path(output)
    return path.with_name(f"{path.name}.data")


def record_input_files(model: ir.Model, path: str | os.PathLike[str]) -> None:
    """Remember the file a model was loaded from and its external data, so that no save replaces them later."""
    source = ReadFile(Path(path).resolve(), "the input model", is_input_model=True)
    model.meta[INPUT_FILES_KEY] = (source, *_external_files(model, source.path.parent))


def model_reads(model: ir.Model) -> list[ReadFile]:
    """The files recorded when the model was loaded, and every external-data file its tensors name now."""
    recorded = list(model.meta.get(INPUT_FILES_KEY, ()))
    folder = recorded[0].path.parent if recorded else Path.cwd()
    return recorded + [read for read in _external_files(model, folder) if read not in recorded]


def source_reads(source: object, what: str) -> list[ReadFile]:
    """A data or recipe source given as a path: the file, or the folder whose files it reads; else nothing."""
    if not isinstance(source, (str, os.PathLike)) or str(source) == "random":
        return []
    path = Path(source).resolve()
    return [ReadFile(path, what, folder=path.is_dir())] if path.exists() else []


def check_outputs(
    outputs: Mapping[str, str | os.PathLike[str]], reads: Sequence[ReadFile], *, overwrite: bool = False
) -> dict[str, Path]:
    """Refuse outputs that are not regular files or new paths, that coincide, or that would replace a file read.

    ``outputs`` maps a label ("the output", "the report") to a path. Only "the output" may replace the input model,
    and only with ``overwrite``; nothing may replace its external data or any other file read.
    """
    resolved = {label: writable_path(path, label) for label, path in outputs.items()}
    labels = list(resolved)
    for index, label in enumerate(labels):
        for other in labels[:index]:
            if _same_file(resolved[label], resolved[other]):
                raise OutputError(f"{outputs[label]}: {label} would overwrite {other}")
        for read in reads:
            if not read.holds(resolved[label]):
                continue
            if read.is_input_model and label == MODEL_OUTPUT:
                if overwrite:
                    continue
                raise OutputError(
                    f"{outputs[label]}: refusing to overwrite the input model (pass overwrite=True / --overwrite)"
                )
            raise OutputError(
                f"{outputs[label]}: {label} would overwrite {read.what} ({read.path}), which the run reads"
            )
    return resolved


def model_outputs(output: str | os.PathLike[str]) -> dict[str, Path]:
    """The paths that writing a model to ``output`` may create or replace, labelled for check_outputs."""
    # save() writes the data file beside the resolved target, so a symlinked output gets it beside the link's target.
    return {MODEL_OUTPUT: Path(output), f"{MODEL_OUTPUT}'s external data": data_path(Path(output).resolve())}


def writable_path(path: str | os.PathLike[str], label: str) -> Path:
    """The resolved path, if it names a regular file or a new path in an existing, writable folder."""
    target = Path(path).resolve()
    try:
        mode = target.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot check {label} ({exc.strerror or exc})") from exc
    if mode is not None and not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")
        raise OutputError(f"{path}: cannot write {label} there: it is {kind}, not a regular file or a new path")
    if not target.parent.is_dir():  # missing, or a file
        raise OutputError(f"{target.parent}: output folder does not exist")
    if not os.access(target.parent, os.W_OK):
        raise OutputError(f"{path}: cannot write {label} there: its folder is not writable")
    return target


@dataclasses.dataclass(frozen=True)
class StagedFile:
    """A temp file beside ``target`` that becomes it when its staging block succeeds."""

    temp: Path
    target: Path
    path: str | os.PathLike[str]
    label: str

    def write(self, text: str) -> None:
        """Replace the staged content with ``text``."""
        try:
            with open(self.temp, "w", encoding="utf-8") as stream:
                stream.write(text)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write {self.label} ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def staged_file(path: str | os.PathLike[str], label: str = "the file") -> Iterator[StagedFile]:
    """An empty temp file beside ``path`` (so the folder is known writable) to fill in the block, renamed at its end.

    If the block fails the temp file is removed and ``path`` is left as it was.
    """
    target = writable_path(path, label)
    staged = StagedFile(target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"), target, path, label)
    try:
        try:
            open(staged.temp, "x", encoding="utf-8").close()
        except OSError as exc:
            raise OutputError(f"{path}: cannot write {label} ({exc.strerror or exc})") from exc
        yield staged
        try:
            os.replace(staged.temp, target)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write {label} ({exc.strerror or exc})") from exc
    finally:
        staged.temp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_text(path: str | os.PathLike[str], text: str, label: str = "the file") -> Iterator[Path]:
    """Write ``text`` to a temp file beside ``path``; rename it over ``path`` if the block succeeds, else remove it."""
    with staged_file(path, label) as staged:
        staged.write(text)
        yield staged.target


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # at least one does not exist
        return a.resolve() == b.resolve()


def _external_files(model: ir.Model, folder: Path) -> list[ReadFile]:
    """The external-data files that the model's tensors (subgraphs and functions included) name.

    A tensor without a base folder (onnx_ir sets none inside functions) resolves against ``folder``, as onnxruntime
    resolves it against the model's.
    """
    paths = {
        (Path(tensor.path) if tensor.base_dir else folder / tensor.location).resolve()
        for tensor in _tensors(model)
        if isinstance(tensor, ir.ExternalTensor)
    }
    return [ReadFile(path, "external data of the input model") for path in sorted(paths)]


def _tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor the model holds: initializers of every graph and tensor attributes, in functions too."""
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in graphs:  # grows as subgraphs are found
        if isinstance(graph, ir.Graph):
            yield from (v.const_value for v in graph.initializers.values() if v.const_value is not None)
        for node in graph:
            for attribute in node.attributes.values():
                if attribute.is_ref():  # a function's attribute reference holds no tensor
                    continue
                if attribute.type == ir.AttributeType.TENSOR:
                    yield attribute.value
                elif attribute.type == ir.AttributeType.TENSORS:
                    yield from attribute.value
                elif attribute.type == ir.AttributeType.GRAPH:
                    graphs.append(attribute.value)
                elif attribute.type == ir.AttributeType.GRAPHS:
                    graphs.extend(attribute.value)
