"""The Python API: load, from_torch, optimize and save."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from graphquant import progress
from graphquant.analysis import distributed
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.cost import split_costs
from graphquant.analysis.data import CalibrationSource, Feed
from graphquant.analysis.layers import QUANTIZABLE_OPS, candidates, constant_array
from graphquant.analysis.openvino_run import check_executor
from graphquant.analysis.runner import (
    PROTO_SIZE_LIMIT,
    has_external_data,
    initializer_bytes,
    inlined_mapped_data,
    load_session,
    release_mappings,
    session_options,
)
from graphquant.analysis.sizes import layer_bytes, node_bytes
from graphquant.analysis.stats_cache import CachingCalibrator
from graphquant.errors import (
    CalibrationError,
    FidelityError,
    GraphQuantError,
    InternalError,
    InvalidModelError,
    OutputError,
    RecipeError,
)
from graphquant.frontends.onnx_file import load as _load_file
from graphquant.output_paths import (
    INPUT_FILES_KEY,
    MODEL_OUTPUT,
    check_outputs,
    model_outputs,
    model_reads,
    record_input_files,
)
from graphquant.passes import PASSES
from graphquant.passes.fold_constants import refuse_quantized
from graphquant.passes.upgrade_opset import INITIALIZERS_AS_INPUTS_BEFORE_IR, UpgradeOpsetPass
from graphquant.pipeline import PassFailedError, Pipeline, pass_label
from graphquant.quant_spec import CHANNEL_ORDER_KEY, KEEP_FLOAT_KEY, LayerDecision
from graphquant.recipes import Recipe, auto
from graphquant.report import (
    Report,
    Timings,
    activation_ranges,
    data_size,
    given_options,
    input_files,
    layer_decisions,
    reference_layers,
    source_text,
)
from graphquant.rewrites import layer_output
from graphquant.validate import DEFAULT_MIN_COSINE, Probe, ReferenceLoadError, compare_models

# Integer ops whose inputs 6 and 7 are the per-tensor grid (scale, zero point) of their uint8 output codes.
INTEGER_OUTPUT_OPS = ("QLinearConv", "QLinearMatMul")
# Page-aligned external tensors let onnxruntime memory-map them instead of reading them into its own buffers.
EXTERNAL_ALIGNMENT = 4096
# Model metadata: the seconds load() took, for the report's timings.
LOAD_SECONDS_KEY = "graphquant.load_seconds"


@dataclasses.dataclass
class OptimizeResult:
    """The quantized model and the report of the run that made it."""

    model: ir.Model
    report: Report


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Read an ONNX file into onnx_ir, refusing external data outside the model's directory."""
    start = time.perf_counter()
    model = _load_file(path)
    record_input_files(model, path)
    model.meta[LOAD_SECONDS_KEY] = time.perf_counter() - start
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
    min_cosine: float | None = None,
    keep_failed: bool = False,
    max_drop: float | None = None,
    objective: str | None = None,
    metric: str | Callable[..., float] | None = None,
    methods: Sequence[str] | None = None,
    validate_on: str = "onnxruntime",
    workers: int | None = None,
    ray_address: str | None = None,
    **options: Any,
) -> OptimizeResult:
    """Run a recipe on a copy of the model; validate against the original when data is available.

    ``options`` (wbits, abits, block_size, gptq, embed_bits, max_overhead, ...) set that option on every pass of the
    recipe that takes it; None leaves the recipe's value. An option no pass takes is refused. Validation fails (a
    FidelityError) when an output's cosine against the float model is below ``min_cosine`` (default
    DEFAULT_MIN_COSINE) or an output is NaN/Inf where the float one is finite; ``keep_failed`` returns the result
    anyway, with the failures in its report.

    ``recipe="auto"`` searches per-layer schemes (recipes/auto.py): the cheapest model under ``objective``
    ("latency", default, or "size") whose error on held-out data stays within ``max_drop`` on ``metric`` ("cosine":
    1 - cosine, default 0.002; "sqnr": max_drop is the least SQNR in dB; or a function of the float and candidate
    outputs, lists per batch, returning a drop). Held-out data is ``validation``, else every fourth calibration batch;
    the budget's bound resamples its rows and its batches, so samples that share a source belong in one batch.
    ``methods`` names the exact rewrites tried (default outliertune; also smoothquant, llm-int8).
    ``validate_on`` runs the validation on "onnxruntime" (default) or "openvino" (see compare_models).

    ``ray_address`` (a Ray cluster) or ``workers`` (a local Ray cluster of that many CPUs) runs the calibration
    batches on Ray workers (analysis/distributed.py); the statistics, and so the model, are the same as in one process.
    """
    threshold = _checked_min_cosine(min_cosine)
    check_executor(validate_on)
    refuse_quantized(model)  # before the calibration data is read (the pipeline's fold-constants pass checks again)
    settings = _auto_settings(recipe, passes, target, options, (max_drop, objective, metric, methods))
    chosen = _resolve_recipe(recipe, passes, target, options) if settings is None else None
    if chosen is not None:
        _refuse_unlowerable_blocks(chosen)
    elif calibration is None:
        raise RecipeError("recipe 'auto' needs calibration data (--calib)")
    if calibration is None and (workers, ray_address) != (None, None):
        raise CalibrationError("--ray/--workers run the calibration: give calibration data (--calib)")
    calibrator = None
    if calibration is not None:
        cluster = distributed.connect(ray_address, workers)
        calibrator = CachingCalibrator.for_model(model, calibration, show_progress, cluster)
        if settings is None and validation is None and validate_on == "onnxruntime":
            calibrator.expect_reference(model, _reference_names(model))  # validation then runs on the same feeds
    search: auto.Search | None = None
    timings = Timings(load=model.meta.get(LOAD_SECONDS_KEY))
    given_validation = validation
    if settings is not None:
        assert calibrator is not None
        start = time.perf_counter()
        calibrator, validation = _auto_split(model, calibrator, validation, show_progress)
        with progress.showing(show_progress), _pass_errors_in_one_line():
            chosen, candidate, search = auto.search(model, calibrator, validation, settings, _prepare)
        timings.search = time.perf_counter() - start
    else:
        assert chosen is not None
        candidate = model.clone()
        _prepare(candidate)
        with progress.showing(show_progress):
            timings.add_pipeline(_run_pipeline(chosen, calibrator, candidate))
    if INPUT_FILES_KEY in model.meta:  # clone() drops meta; keep save()'s guard against overwriting the input
        candidate.meta[INPUT_FILES_KEY] = model.meta[INPUT_FILES_KEY]
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
    report.auto = None if search is None else search.to_dict()
    report.timings = timings
    report.options = given_options(
        recipe=recipe,
        passes=passes,
        target=target,
        min_cosine=threshold,
        keep_failed=keep_failed,
        max_drop=max_drop,
        objective=objective,
        metric=metric,
        methods=methods,
        **options,
    )
    report.inputs = input_files(model, recipe)
    report.inputs.update(calibration=source_text(calibration) if calibration is not None else None)
    report.inputs["validation"] = _validation_source(given_validation, settings is not None, calibration is not None)
    if calibrator is not None:
        report.data["calibration"] = data_size(calibrator.data)
        report.activation_ranges = activation_ranges(model, calibrator, report.layers)
    if not report.quantized:
        _say_nothing_was_quantized(report)
    if report.quantized and (validation is not None or calibrator is not None):
        # Reuse the calibration data as given: a one-shot generator cannot be read twice (and warnings not repeated).
        checker = Calibrator.for_model(model, validation, False) if validation is not None else calibrator
        assert checker is not None
        start = time.perf_counter()
        with progress.showing(show_progress):
            _validate_into(report, model, candidate, checker, threshold, validate_on)
        timings.validation = time.perf_counter() - start
        report.data["validation"] = data_size(checker.data)
    if calibrator is not None:
        calibrator.drop_reference()
    release_mappings(model)  # the pages of memory-mapped weights read so far (both models share the tensors)
    if report.failures and not keep_failed:
        more = f" (and {len(report.failures) - 1} more)" if len(report.failures) > 1 else ""
        raise FidelityError(
            f"validation failed: {report.failures[0]}{more}; not written (min_cosine / --min-cosine sets the "
            "threshold, keep_failed / --keep-failed writes it anyway)"
        )
    return OptimizeResult(candidate, report)


def _reference_names(model: ir.Model) -> list[str]:
    """The float model's tensors a validation may compare: its outputs, the full outputs of its layers and the
    Relu/Clip after one (a codes probe's reference, see _codes_probe)."""
    names = [value.name or "" for value in model.graph.outputs]
    for found in candidates(model.graph):
        if found.layer is not None:
            output = layer_output(found.node)
            activation = _fused_activation(output)
            names += [output.name or ""] + ([activation.name or ""] if activation is not None else [])
    return list(dict.fromkeys(names))


def _fused_activation(output: ir.Value) -> ir.Value | None:
    """The output of the one Relu/Clip that reads a layer's output (lowering fuses it into an integer op), if any."""
    readers = list(output.consumers())
    return readers[0].outputs[0] if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") else None


def _validation_source(given: CalibrationSource | None, is_auto: bool, calibrated: bool) -> str | None:
    """What the validation ran on: the data given, auto's held-out share, or the calibration data (None: none)."""
    if given is not None:
        return source_text(given)
    if not calibrated:
        return None
    return "held out of the calibration data by auto" if is_auto else "the calibration data"


def _prepare(candidate: ir.Model) -> None:
    """Mark the layers that must stay float: NaN/Inf weights, weights that are graph inputs."""
    _keep_nonfinite_weights_float(candidate)
    _keep_input_weights_float(candidate)


def _auto_settings(
    recipe: str | Path | Recipe,
    passes: Sequence[str] | None,
    target: str | None,
    options: Mapping[str, Any],
    search_options: tuple[Any, ...],
) -> auto.Settings | None:
    """The auto search's settings when the recipe is "auto" (fixed-recipe options refused); None otherwise."""
    max_drop, objective, metric, methods = search_options
    if recipe != auto.AUTO:
        given = [name for name, value in zip(("max_drop", "objective", "metric", "methods"), search_options) if value]
        if given:
            raise RecipeError(f"option {given[0]!r} is for recipe 'auto' only (recipe {str(recipe)!r})")
        return None
    fixed = sorted(name for name, value in options.items() if value is not None)
    if fixed or passes is not None:
        name = fixed[0] if fixed else "passes"
        raise RecipeError(f"recipe 'auto' chooses the schemes itself: option {name!r} is for fixed recipes")
    defaults = auto.Settings()
    return auto.Settings(
        max_drop=defaults.max_drop if max_drop is None else max_drop,
        objective=objective or defaults.objective,
        metric=metric or defaults.metric,
        target=target or defaults.target,
        methods=tuple(methods) if methods else defaults.methods,
    )


def _auto_split(
    model: ir.Model, calibrator: CachingCalibrator, validation: CalibrationSource | None, show_progress: bool
) -> tuple[CachingCalibrator, list[Feed]]:
    """The search's calibrator and held-out feeds: the validation data, else a split of the calibration data."""
    if validation is not None:
        return calibrator, list(Calibrator.for_model(model, validation, False).data)
    kept, held = auto.split_data(list(calibrator.data))
    if held is kept:
        warnings.warn("auto: one calibration sample cannot be split; the budget is checked on it", stacklevel=3)
    return CachingCalibrator.for_model(model, kept, show_progress, calibrator.cluster), held


def _checked_min_cosine(min_cosine: float | None) -> float:
    """The validation threshold: the default, or a given cosine in [-1, 1]."""
    if min_cosine is None:
        return DEFAULT_MIN_COSINE
    if not isinstance(min_cosine, (int, float)) or not -1.0 <= min_cosine <= 1.0:
        raise RecipeError(f"min_cosine must be a number in [-1, 1], got {min_cosine!r}")
    return float(min_cosine)


def _refuse_unlowerable_blocks(recipe: Recipe) -> None:
    """Refuse blocked weights wider than 4 bits with quantized activations on targets that have no form for them.

    Their QDQ form (an int8 blocked DequantizeLinear into a MatMul whose input is quantized) is valid ONNX, but
    onnxruntime fuses it into MatMulIntegerToFloat as if it were per column, and that fails at run time. ort-cpu
    lowers it to MatMulNBits instead; 4-bit blocks are stored as INT4, which onnxruntime does not fuse that way.
    """
    if recipe.target == "ort-cpu":
        return
    for step in (step for step in recipe.steps if step.name == "quantize"):
        options = {**_defaults(PASSES[step.name]), **step.options}
        if options["block_size"] is not None and options["abits"] and options["wbits"] > 4:
            raise RecipeError(
                f"recipe {recipe.name!r}: blocked weights (block_size {options['block_size']}) above 4 bits with "
                f"quantized activations have no working form on target {recipe.target!r} (onnxruntime mis-fuses "
                "it); use --target ort-cpu, per-channel weights (no block size), or abits 0"
            )


def _defaults(pass_class: type) -> dict[str, Any]:
    """The keyword defaults of a pass constructor."""
    parameters = inspect.signature(pass_class.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _run_pipeline(recipe: Recipe, calibrator: Calibrator | None, candidate: ir.Model) -> Pipeline:
    """Run the recipe's pipeline on the candidate (and return it); a pass's failure is one line naming the pass."""
    pipeline = recipe.to_pipeline(calibrator)
    with _pass_errors_in_one_line():
        pipeline(candidate)
    return pipeline


@contextlib.contextmanager
def _pass_errors_in_one_line() -> Iterator[None]:
    """A pass's failure in the block becomes a RecipeError, the graphquant error it raised, or a one-line InternalError."""
    try:
        yield
    except ir.passes.PassError as exc:  # the pipeline wraps every failure of a pass in a PassError
        cause = _user_facing_cause(exc)
        if isinstance(cause, ir.passes.PreconditionError):
            raise RecipeError(str(cause)) from exc
        if isinstance(cause, GraphQuantError):
            raise cause from None
        if not isinstance(exc, PassFailedError):
            raise
        root = _root_cause(exc)
        lines = [line.strip() for line in str(root).splitlines() if line.strip()]
        detail = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
        raise InternalError(f"pass {pass_label(exc.failed)} failed: {detail}") from exc


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of the chain of causes."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _keep_input_weights_float(model: ir.Model) -> None:
    """Mark layers whose weight is also a graph input to stay float: a caller can feed it, so it is not constant.

    Models before IR version 4 list every initializer as an input; onnxruntime treats those as constants (it refuses
    a feed for them), and the opset upgrade drops them from the inputs, so they are quantized.
    """
    if model.ir_version < INITIALIZERS_AS_INPUTS_BEFORE_IR:
        return
    for candidate in candidates(model.graph):
        if candidate.layer is not None and candidate.layer.weight.is_graph_input():
            name = candidate.layer.weight.name
            candidate.node.meta[KEEP_FLOAT_KEY] = f"weight {name!r} is also a graph input (a caller can feed it)"


def _say_nothing_was_quantized(report: Report) -> None:
    """A note, and for a model that has layers a one-line warning with the most common reasons they stayed float."""
    if not report.layers:
        report.notes.append("nothing to quantize: the model was written unchanged apart from clean-ups")
        return
    reasons = Counter(layer.reason or "no reason recorded" for layer in report.layers).most_common(3)
    summary = "; ".join(f"{count} x {reason}" for reason, count in reasons)
    message = f"0 of {len(report.layers)} layers quantized: {summary}"
    report.notes.append(message)
    warnings.warn(message, stacklevel=3)


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
    # A layer unnamed in the float model is named only in the candidate: found there by its output instead.
    unnamed = [decision for decision in quantized if decision.node not in before]
    layers = reference_layers(reference, unnamed)
    before.update(node_bytes(reference, {name: layer.node for name, layer in layers.items()}))
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


def _validate_into(
    report: Report,
    reference: ir.Model,
    candidate: ir.Model,
    calibrator: Calibrator,
    min_cosine: float,
    executor: str = "onnxruntime",
) -> None:
    """Fill the report's per-output and per-layer metrics and its validation verdict.

    Where onnxruntime cannot load the original (an opset it no longer runs, duplicate node names), the float model
    after graphquant's exact clean-ups (opset upgrade, name fixing) is the reference, and a note says so.
    """
    try:
        _compare_into(
            report,
            reference,
            candidate,
            calibrator,
            ("the original model (the input)", "the quantized model"),
            executor,
        )
    except ReferenceLoadError as exc:
        cleaned = _cleaned_float(reference)
        label = "the float model after graphquant's opset upgrade and name fixing"
        try:
            _compare_into(report, cleaned, candidate, calibrator, (label, "the quantized model"), executor)
        except ReferenceLoadError:
            raise exc from None
        opsets = f"opset {reference.opset_imports.get('', 0)} -> {cleaned.opset_imports.get('', 0)}"
        report.notes.append(f"validated against {label} ({opsets}): {exc}")
    if executor == "openvino":
        report.notes.append(
            "validated on OpenVINO's CPU plugin: the float model in float32, the quantized one with its defaults"
        )
    report.min_cosine = min_cosine
    report.failures = [
        f"output {name!r}: {failure}"
        for name, comparison in report.outputs.items()
        if (failure := comparison.failure(min_cosine)) is not None
    ]


def _cleaned_float(model: ir.Model) -> ir.Model:
    """A copy of the float model after the pipeline's exact clean-ups: opset upgrade and name fixing."""
    cleaned = model.clone()
    UpgradeOpsetPass()(cleaned)
    NameFixPass()(cleaned)
    return cleaned


def _compare_into(
    report: Report,
    reference: ir.Model,
    candidate: ir.Model,
    calibrator: Calibrator,
    labels: tuple[str, str],
    executor: str,
) -> None:
    """Compare the outputs, the layer outputs both models have, and the layers whose output stays integer codes."""
    names = _value_names(candidate)
    layer_outputs = {layer.node: layer.output for layer in report.quantized if layer.output in names}
    produced = {output.name: output for node in reference.graph for output in node.outputs}
    integer_ops = {node.name: node for node in candidate.graph if node.op_type in INTEGER_OUTPUT_OPS}
    probes = {
        f"{layer.node} (codes)": probe
        for layer in report.quantized
        if layer.output not in names and (probe := _codes_probe(produced, names, integer_ops.get(layer.node), layer))
    }
    layer_outputs = {node: output for node, output in layer_outputs.items() if output in produced}
    orders = _channel_orders(candidate)
    probes.update(
        (f"{node} (renumbered)", Probe(output, output, channel_order=orders[output]))
        for node, output in layer_outputs.items()
        if output in orders
    )
    layer_outputs = {node: output for node, output in layer_outputs.items() if output not in orders}
    metrics = compare_models(
        reference,
        candidate,
        calibrator.data,
        list(layer_outputs.values()),
        probes=probes,
        labels=labels,
        executor=executor,
        recorded=calibrator.reference_outputs(),
    )
    report.outputs = {value.name or "": metrics[value.name or ""] for value in reference.graph.outputs}
    report.layer_metrics = {node: metrics[output] for node, output in layer_outputs.items()}
    report.layer_metrics.update((label.rsplit(" (", 1)[0], metrics[label]) for label in probes)


def _channel_orders(model: ir.Model) -> dict[str, np.ndarray]:
    """The values whose channels lowering renumbered, with each one's order (CHANNEL_ORDER_KEY)."""
    return {
        output.name or "": np.asarray(output.meta[CHANNEL_ORDER_KEY])
        for node in model.graph
        for output in node.outputs
        if CHANNEL_ORDER_KEY in output.meta
    }


def _codes_probe(
    produced: Mapping[str | None, ir.Value], names: set[str | None], node: ir.Node | None, layer: LayerDecision
) -> Probe | None:
    """A probe of a layer lowered to an integer op whose codes feed the next integer op (its float output is gone).

    Its dequantized codes are compared with the reference output, taken after a Relu/Clip that lowering fused away.
    """
    if node is None or layer.output not in produced or len(node.inputs) < 8:
        return None
    scale, zero_point = constant_array(node.inputs[6]), constant_array(node.inputs[7])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
        return None
    activation = _fused_activation(produced[layer.output])
    reference_name = layer.output if activation is None or activation.name in names else activation.name or ""
    codes = node.outputs[0]
    clips = [user for user in codes.consumers() if user.op_type == "Clip"]  # a grid narrower than 8 bits
    codes = clips[0].outputs[0] if len(clips) == 1 and len(codes.consumers()) == 1 else codes
    return Probe(reference_name, codes.name or "", float(scale), int(zero_point))


def _value_names(model: ir.Model) -> set[str | None]:
    """The names of the graph inputs and of every node output of the main graph."""
    return {value.name for value in model.graph.inputs} | {
        output.name for node in model.graph for output in node.outputs
    }


def save(result_or_model: OptimizeResult | ir.Model, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write atomically: temp file in the target folder, checker and onnxruntime load, then rename.

    The path must be a regular file or a new path; it may replace the input model only with ``overwrite``, and
    neither it nor its ``.data`` file may replace a file the model reads (output_paths.check_outputs).
    """
    start = time.perf_counter()
    model = result_or_model.model if isinstance(result_or_model, OptimizeResult) else result_or_model
    target = check_outputs(model_outputs(path), model_reads(model), overwrite=overwrite)[MODEL_OUTPUT]
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
    if isinstance(result_or_model, OptimizeResult):
        result_or_model.report.timings.save = time.perf_counter() - start
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
