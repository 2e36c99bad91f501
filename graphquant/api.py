"""The Python API: load, from_torch, optimize and save."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphquant import progress
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.cost import split_costs
from graphquant.analysis.data import CalibrationSource
from graphquant.analysis.layers import QUANTIZABLE_OPS, candidates
from graphquant.analysis.runner import (
    PROTO_SIZE_LIMIT,
    has_external_data,
    initializer_bytes,
    inlined_mapped_data,
    load_session,
    release_mappings,
    session_options,
)
from graphquant.analysis.sizes import layer_bytes
from graphquant.errors import GraphQuantError, InvalidModelError, OutputError, RecipeError
from graphquant.frontends.onnx_file import load as _load_file
from graphquant.quant_spec import KEEP_FLOAT_KEY, LayerDecision
from graphquant.recipes import Recipe
from graphquant.report import Report, layer_decisions
from graphquant.validate import compare_models

SOURCE_PATH_KEY = "graphquant.source_path"
# Page-aligned external tensors let onnxruntime memory-map them instead of reading them into its own buffers.
EXTERNAL_ALIGNMENT = 4096


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
    passes: Sequence[str] | None = None,
    target: str | None = None,
    validation: CalibrationSource | None = None,
    show_progress: bool = True,
    **options: Any,
) -> OptimizeResult:
    """Run a recipe on a copy of the model; validate against the original when data is available.

    ``options`` (wbits, abits, block_size, gptq, embed_bits, max_overhead, ...) set that option on every pass of the
    recipe that takes it; None leaves the recipe's value. An option no pass takes is refused.
    """
    chosen = _resolve_recipe(recipe, passes, target, options)
    calibrator = Calibrator.for_model(model, calibration, show_progress) if calibration is not None else None
    candidate = model.clone()
    if SOURCE_PATH_KEY in model.meta:  # clone() drops meta; keep save()'s guard against overwriting the input
        candidate.meta[SOURCE_PATH_KEY] = model.meta[SOURCE_PATH_KEY]
    _keep_nonfinite_weights_float(candidate)
    try:
        with progress.showing(show_progress):
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
        layers=layer_decisions(candidate) + nested_layer_decisions(candidate),
        bytes_before=initializer_bytes(model),
        bytes_after=initializer_bytes(candidate),
        split_costs=split_costs(candidate),
    )
    report.layer_bytes = _quantized_layer_bytes(model, candidate, report.quantized)
    if not report.quantized:
        report.notes.append("nothing to quantize: the model was written unchanged apart from clean-ups")
    if report.quantized and (validation is not None or calibrator is not None):
        # Reuse the calibration data as given: a one-shot generator cannot be read twice (and warnings not repeated).
        checker = Calibrator.for_model(model, validation, False) if validation is not None else calibrator
        assert checker is not None
        with progress.showing(show_progress):
            _validate_into(report, model, candidate, checker)
    release_mappings(model)  # the pages of memory-mapped weights read so far (both models share the tensors)
    return OptimizeResult(candidate, report)


def _keep_nonfinite_weights_float(model: ir.Model) -> None:
    """Mark layers whose weights hold NaN/Inf to stay float: no finite step can represent them."""
    for candidate in candidates(model.graph):
        if candidate.layer is None:
            continue
        bad = int(np.count_nonzero(~np.isfinite(candidate.layer.weight_array)))
        if bad:
            candidate.node.meta[KEEP_FLOAT_KEY] = f"weight has {bad} NaN/Inf values"


def nested_layer_decisions(model: ir.Model) -> list[LayerDecision]:
    """MatMul/Gemm/Conv layers inside subgraphs and functions: the passes leave them float; say why."""
    decisions = []
    for owner, graph in _nested_graphs(model):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.domain in ("", "ai.onnx") and node.op_type in QUANTIZABLE_OPS:
                reason = f"inside {owner} (subgraphs and functions are left float)"
                decisions.append(LayerDecision(node.name or "", node.op_type, "float", reason))
    return decisions


def _nested_graphs(model: ir.Model) -> Iterator[tuple[str, ir.Graph | ir.Function]]:
    """The subgraphs of the main graph's nodes and the model-local functions, each with a label of its owner."""
    for node in model.graph:
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.GRAPH:
                yield f"the {attribute.name} subgraph of {node.op_type} {node.name!r}", attribute.value
            elif attribute.type == ir.AttributeType.GRAPHS:
                for graph in attribute.value:
                    yield f"a {attribute.name} subgraph of {node.op_type} {node.name!r}", graph
    for (domain, name, _), function in model.functions.items():
        yield f"function {domain}.{name}", function


def _quantized_layer_bytes(
    reference: ir.Model, candidate: ir.Model, quantized: Sequence[LayerDecision]
) -> dict[str, tuple[int, int]]:
    """(bytes before, bytes after) of the stored tensors each quantized layer reads, where both are found."""
    names = {decision.node for decision in quantized}
    before, after = layer_bytes(reference, names), layer_bytes(candidate, names)
    return {name: (before[name], after[name]) for name in names if name in before and name in after}


def _user_facing_cause(error: BaseException) -> BaseException | None:
    """The first precondition failure or graphquant error in the chain of causes, if any."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, (ir.passes.PreconditionError, GraphQuantError)):
        cause = cause.__cause__
    return cause


def _resolve_recipe(
    recipe: str | Path | Recipe, passes: Sequence[str] | None, target: str | None, options: Mapping[str, Any]
) -> Recipe:
    """The recipe with command-line style overrides applied."""
    chosen = recipe if isinstance(recipe, Recipe) else Recipe.named(recipe)
    if passes is not None:
        chosen = chosen.with_passes(passes)
    return chosen.with_options(**options).with_target(target)


def _validate_into(report: Report, reference: ir.Model, candidate: ir.Model, calibrator: Calibrator) -> None:
    """Fill the report's per-output and per-layer metrics."""
    # A layer output that lowering folded away (integer codes passed straight to the next layer) is not compared.
    values = _value_names(reference) & _value_names(candidate)
    layer_outputs = {layer.node: layer.output for layer in report.quantized if layer.output in values}
    try:
        metrics = compare_models(reference, candidate, calibrator.data, list(layer_outputs.values()))
    except InvalidModelError as exc:  # the reference ran in calibration: the quantized model is the one refused
        raise InvalidModelError(str(exc).replace("the model", "the quantized model", 1)) from exc
    report.outputs = {value.name or "": metrics[value.name or ""] for value in reference.graph.outputs}
    report.layer_metrics = {node: metrics[output] for node, output in layer_outputs.items()}


def _value_names(model: ir.Model) -> set[str | None]:
    """The names of the graph inputs and of every node output of the main graph."""
    return {value.name for value in model.graph.inputs} | {
        output.name for node in model.graph for output in node.outputs
    }


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
    with _scratch_folder(target) as scratch, progress.bar(task=f"save {target.name}", total=2, unit="step") as steps:
        try:
            with contextlib.nullcontext() if large else inlined_mapped_data(model):
                ir.save(
                    model,
                    scratch / target.name,
                    external_data=external,
                    alignment=EXTERNAL_ALIGNMENT if large else None,
                )
        except OSError as exc:
            raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
        release_mappings(model)  # before onnxruntime maps the written copy
        steps.update()
        _check_written(scratch / target.name)
        steps.update()
        try:
            if external is not None:
                os.replace(scratch / external, target.parent / external)
            os.replace(scratch / target.name, target)
        except OSError as exc:  # e.g. the target is a directory
            raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
    return target


@contextlib.contextmanager
def _scratch_folder(target: Path) -> Iterator[Path]:
    """A hidden temporary folder beside the target (same file system, so renames are atomic), removed at the end."""
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:  # e.g. a read-only folder
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_written(path: Path) -> None:
    """Run onnx's checker on the written file and make sure onnxruntime loads that file."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise OutputError(f"the output fails onnx's checker: {str(exc).splitlines()[0]}") from exc
    try:
        load_session(str(path), session_options())
    except InvalidModelError as exc:
        raise OutputError(str(exc).replace("cannot load the model", "cannot load the output")) from exc
