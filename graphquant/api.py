"""The Python API: load, from_torch, optimize and save."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.data import CalibrationSource
from graphquant.analysis.runner import PROTO_SIZE_LIMIT, has_external_data, initializer_bytes, open_session
from graphquant.errors import GraphQuantError, InvalidModelError, OutputError, RecipeError
from graphquant.frontends.onnx_file import load as _load_file
from graphquant.recipes import Recipe
from graphquant.report import Report, layer_decisions
from graphquant.validate import compare_models

SOURCE_PATH_KEY = "graphquant.source_path"


@dataclasses.dataclass
class OptimizeResult:
    """The quantized model and the report of the run that made it."""

    model: ir.Model
    report: Report


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Read an ONNX file into onnx_ir, refusing external data outside the model's directory."""
    model = _load_file(path)
    model.meta[SOURCE_PATH_KEY] = str(Path(path).resolve())
    return model


def from_torch(module: Any, example_inputs: Sequence[Any], **export_options: Any) -> ir.Model:
    """Export an nn.Module, fx.GraphModule or ExportedProgram through torch.onnx.export(dynamo=True)."""
    from graphquant.frontends.torch_frontend import from_torch as _from_torch

    try:
        return _from_torch(module, example_inputs, **export_options)
    except ImportError as exc:
        raise InvalidModelError(str(exc)) from exc


def optimize(
    model: ir.Model,
    recipe: str | Path | Recipe = "w8a8",
    calibration: CalibrationSource | None = None,
    *,
    wbits: int | None = None,
    abits: int | None = None,
    passes: Sequence[str] | None = None,
    target: str | None = None,
    validation: CalibrationSource | None = None,
    show_progress: bool = True,
) -> OptimizeResult:
    """Run a recipe on a copy of the model; validate against the original when data is available."""
    chosen = _resolve_recipe(recipe, wbits, abits, passes, target)
    calibrator = Calibrator.for_model(model, calibration, show_progress) if calibration is not None else None
    candidate = model.clone()
    if SOURCE_PATH_KEY in model.meta:  # clone() drops meta; keep save()'s guard against overwriting the input
        candidate.meta[SOURCE_PATH_KEY] = model.meta[SOURCE_PATH_KEY]
    try:
        chosen.to_pipeline(calibrator)(candidate)
    except ir.passes.PassError as exc:  # the pipeline wraps every failure of a pass in a PassError
        cause = _user_facing_cause(exc)
        if isinstance(cause, ir.passes.PreconditionError):
            raise RecipeError(str(cause)) from exc
        if isinstance(cause, GraphQuantError):
            raise cause from None
        raise
    report = Report(
        recipe=chosen.name,
        target=chosen.target,
        passes=[step.name for step in chosen.steps],
        layers=layer_decisions(candidate),
        bytes_before=initializer_bytes(model),
        bytes_after=initializer_bytes(candidate),
    )
    if not report.quantized:
        report.notes.append("nothing to quantize: the model was written unchanged apart from clean-ups")
    if report.quantized and (validation is not None or calibrator is not None):
        # Reuse the calibration data as given: a one-shot generator cannot be read twice (and warnings not repeated).
        checker = Calibrator.for_model(model, validation, False) if validation is not None else calibrator
        assert checker is not None
        _validate_into(report, model, candidate, checker)
    return OptimizeResult(candidate, report)


def _user_facing_cause(error: BaseException) -> BaseException | None:
    """The first precondition failure or graphquant error in the chain of causes, if any."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, (ir.passes.PreconditionError, GraphQuantError)):
        cause = cause.__cause__
    return cause


def _resolve_recipe(
    recipe: str | Path | Recipe,
    wbits: int | None,
    abits: int | None,
    passes: Sequence[str] | None,
    target: str | None,
) -> Recipe:
    """The recipe with command-line style overrides applied."""
    chosen = recipe if isinstance(recipe, Recipe) else Recipe.named(recipe)
    if passes is not None:
        chosen = chosen.with_passes(passes)
    return chosen.with_options(wbits=wbits, abits=abits).with_target(target)


def _validate_into(report: Report, reference: ir.Model, candidate: ir.Model, calibrator: Calibrator) -> None:
    """Fill the report's per-output and per-layer metrics."""
    reference_values = {value.name for value in reference.graph.inputs} | {
        output.name for node in reference.graph for output in node.outputs
    }
    layer_outputs = {layer.node: layer.output for layer in report.quantized if layer.output in reference_values}
    metrics = compare_models(reference, candidate, calibrator.data, list(layer_outputs.values()))
    report.outputs = {value.name or "": metrics[value.name or ""] for value in reference.graph.outputs}
    report.layer_metrics = {node: metrics[output] for node, output in layer_outputs.items()}


def save(result_or_model: OptimizeResult | ir.Model, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write atomically: temp file in the target folder, checker and onnxruntime load, then rename."""
    model = result_or_model.model if isinstance(result_or_model, OptimizeResult) else result_or_model
    target = Path(path).resolve()
    source = model.meta.get(SOURCE_PATH_KEY)
    if source is not None and Path(source) == target and not overwrite:
        raise OutputError(f"{target}: refusing to overwrite the input model (pass overwrite=True / --overwrite)")
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent}: output folder does not exist")
    # External tensors must be rewritten beside the output: their locations are relative to the input's folder.
    large = initializer_bytes(model) > PROTO_SIZE_LIMIT or has_external_data(model)
    external = f"{target.name}.data" if large else None
    with _temporary_path(target) as scratch:
        try:
            ir.save(model, scratch, external_data=external)
        except OSError as exc:
            raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
        _check_written(scratch, model)
        try:
            os.replace(scratch, target)
        except OSError as exc:  # e.g. the target is a directory
            raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
    return target


@contextlib.contextmanager
def _temporary_path(target: Path) -> Iterator[Path]:
    """A temporary file beside the target, removed unless it was renamed into place."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    scratch = Path(name)
    try:
        yield scratch
    finally:
        scratch.unlink(missing_ok=True)


def _check_written(path: Path, model: ir.Model) -> None:
    """Run onnx's checker on the written file and make sure onnxruntime loads the model."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise OutputError(f"the output fails onnx's checker: {str(exc).splitlines()[0]}") from exc
    with open_session(model):
        pass
