"""The run report: per-layer decisions, fidelity per output and per layer, and sizes."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime

import graphquant
from graphquant.analysis.cost import SplitCost
from graphquant.analysis.data import CalibrationData, Feed, rows
from graphquant.analysis.layers import Layer, candidates
from graphquant.analysis.stats_cache import CachingCalibrator
from graphquant.output_paths import INPUT_FILES_KEY, staged_text
from graphquant.pipeline import Pipeline
from graphquant.quant_spec import DECISION_KEY, LayerDecision
from graphquant.rewrites import layer_output
from graphquant.summary import OUTLIER_RATIO
from graphquant.validate import TensorComparison

# The JSON report's layout; raised whenever a field changes meaning or is removed (README: "The JSON report").
SCHEMA_VERSION = 2
# Why a metric is null in the JSON, by field and by the non-finite value it had.
NULL_REASONS = {
    ("sqnr_db", math.inf): "no error: the tensors are identical",
    ("sqnr_db", -math.inf): "the reference is all zeros and the candidate is not",
}


@dataclasses.dataclass
class Timings:
    """Wall seconds per stage of a run; a stage that did not run stays None (or empty)."""

    load: float | None = None
    search: float | None = None
    # (pass label, seconds) in order: the recipe's passes and clean-ups, and separately the target's lowering.
    passes: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    lowering: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    validation: float | None = None
    save: float | None = None

    def add_pipeline(self, pipeline: Pipeline) -> None:
        """The seconds of each step of a pipeline's last run: lowering passes apart from the others."""
        for step, (label, seconds) in zip(pipeline.passes, pipeline.timings):
            lowering = type(step).__module__.startswith("graphquant.lowering")
            (self.lowering if lowering else self.passes).append((label, seconds))

    def to_dict(self) -> dict[str, Any]:
        """The stages that ran, in seconds, and their total."""
        stages: dict[str, Any] = {name: getattr(self, name) for name in ("load", "search")}
        stages["passes"] = [{"pass": label, "seconds": seconds} for label, seconds in self.passes]
        stages["lowering"] = [{"pass": label, "seconds": seconds} for label, seconds in self.lowering]
        stages.update(validation=self.validation, save=self.save)
        stages = {name: value for name, value in stages.items() if value is not None}
        flat = [v for v in stages.values() if isinstance(v, float)] + [s for _, s in self.passes + self.lowering]
        return {**stages, "total": sum(flat)}


@dataclasses.dataclass(frozen=True)
class ActivationRange:
    """Per-channel min and max of a layer's input activation over the calibration data (last axis = channels)."""

    tensor: str
    channel_min: np.ndarray
    channel_max: np.ndarray

    @property
    def channel_absmax(self) -> np.ndarray:
        """Per-channel max |x|."""
        return np.maximum(np.abs(self.channel_min), np.abs(self.channel_max))

    @property
    def outliers(self) -> np.ndarray:
        """Whether each channel's max |x| exceeds OUTLIER_RATIO times the median channel's."""
        absmax = self.channel_absmax
        return absmax > OUTLIER_RATIO * float(np.median(absmax))

    def summary(self) -> dict[str, Any]:
        """The range in the JSON: tensor, min, max, channels and outlier channels."""
        return {
            "tensor": self.tensor,
            "min": float(self.channel_min.min()),
            "max": float(self.channel_max.max()),
            "channels": int(self.channel_min.size),
            "outlier_channels": int(np.count_nonzero(self.outliers)),
        }


@dataclasses.dataclass
class Report:
    """What a run did and how close its output stays to the reference."""

    recipe: str
    target: str
    passes: list[str]
    layers: list[LayerDecision]
    bytes_before: int
    bytes_after: int
    outputs: dict[str, TensorComparison] = dataclasses.field(default_factory=dict)
    layer_metrics: dict[str, TensorComparison] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    split_costs: list[SplitCost] = dataclasses.field(default_factory=list)
    # Per quantized layer: bytes of the stored tensors it reads (weights, scales, codes) before and after.
    layer_bytes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Validation: the cosine every output had to reach (None: not validated), and one line per output that failed.
    min_cosine: float | None = None
    failures: list[str] = dataclasses.field(default_factory=list)
    # The auto recipe's search (recipes/auto.Search.to_dict): budget, per-layer choices with why, tried points, front.
    auto: dict[str, Any] | None = None
    # The optimize options given (the validation threshold used always), and the files read.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Per data set ("calibration", "validation"): its batches and samples (its source is in ``inputs``).
    data: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    timings: Timings = dataclasses.field(default_factory=Timings)
    # Per layer: its input activation's channel ranges, as the run's first calibration of that tensor saw them.
    activation_ranges: dict[str, ActivationRange] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=lambda: versions())

    @property
    def quantized(self) -> list[LayerDecision]:
        """Layers that were quantized."""
        return [layer for layer in self.layers if layer.status == "quantized"]

    @property
    def kept_float(self) -> list[LayerDecision]:
        """Layers left in float, each with its reason."""
        return [layer for layer in self.layers if layer.status != "quantized"]

    def worst_layer(self) -> tuple[str, float] | None:
        """The measured layer with the lowest output SQNR."""
        if not self.layer_metrics:
            return None
        name = min(self.layer_metrics, key=lambda n: self.layer_metrics[n].sqnr_db)
        return name, self.layer_metrics[name].sqnr_db

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: plain numbers, a non-finite one as null beside a ``<field>_reason``."""
        return json_ready(
            {
                "schema_version": SCHEMA_VERSION,
                "versions": self.versions,
                "recipe": self.recipe,
                "target": self.target,
                "passes": self.passes,
                "options": self.options,
                "inputs": self.inputs,
                "data": self.data,
                "timings": self.timings.to_dict(),
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "layers": [self._layer_entry(layer) for layer in self.layers],
                "outputs": {name: self._output_entry(c) for name, c in self.outputs.items()},
                "validation": self.validation_summary(),
                "notes": self.notes,
                "split_costs": [dataclasses.asdict(cost) for cost in self.split_costs],
                **({} if self.auto is None else {"auto": self.auto}),
            }
        )

    def _layer_entry(self, layer: LayerDecision) -> dict[str, Any]:
        """One layer: its decision, measured metrics, stored bytes and input activation range, where known."""
        entry: dict[str, Any] = {**dataclasses.asdict(layer), **self._bytes(layer.node)}
        if layer.node in self.layer_metrics:
            entry["metrics"] = _metrics(self.layer_metrics[layer.node])
        if layer.node in self.activation_ranges:
            entry["activation"] = self.activation_ranges[layer.node].summary()
        return entry

    def _output_entry(self, comparison: TensorComparison) -> dict[str, Any]:
        """One output's metrics and whether it meets the validation threshold (None without one)."""
        within = None if self.min_cosine is None else comparison.failure(self.min_cosine) is None
        return {**_metrics(comparison), "within_tolerance": within}

    def validation_summary(self) -> dict[str, Any]:
        """The threshold every output had to meet and the verdict; why there is none if the run was not validated."""
        if self.min_cosine is None:
            return {"validated": False, "reason": "no calibration or validation data, or nothing was quantized"}
        return {
            "validated": True,
            "tolerance": "min_cosine",
            "min_cosine": self.min_cosine,
            "rule": f"every output's cosine against the float model >= {self.min_cosine:g}, and no NaN/Inf where "
            "the float model's output is finite",
            "passed": not self.failures,
            "failures": self.failures,
        }

    def _bytes(self, node_name: str) -> dict[str, int]:
        """The layer's stored bytes before and after, if known."""
        if node_name not in self.layer_bytes:
            return {}
        before, after = self.layer_bytes[node_name]
        return {"bytes_before": before, "bytes_after": after}

    def to_json(self) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save_json(self, path: str | Path) -> None:
        """Write the report as JSON, atomically (temp file beside it, then rename); a device or folder is refused."""
        with staged_text(path, self.to_json(), "the report"):
            pass

    def save_html(self, path: str | Path, reference: ir.Model) -> None:
        """Write the HTML page (report_html.py; needs matplotlib) atomically; ``reference`` is the float model."""
        from graphquant.report_html import render  # matplotlib is an optional extra

        with staged_text(path, render(self, reference), "the HTML report"):
            pass

    def format_table(self) -> str:
        """A short human-readable summary table."""
        lines = [
            f"recipe {self.recipe} -> target {self.target}",
            f"layers quantized: {len(self.quantized)}   kept float: {len(self.kept_float)}",
        ]
        reasons: dict[str, int] = {}
        for layer in self.kept_float:
            reasons[layer.reason] = reasons.get(layer.reason, 0) + 1
        lines.extend(f"  float x{count}: {reason}" for reason, count in sorted(reasons.items()))
        lines.append(f"size: {_megabytes(self.bytes_before)} -> {_megabytes(self.bytes_after)}")
        for name, comparison in self.outputs.items():
            lines.append(
                f"output {name}: cosine {comparison.cosine:.5f}  SQNR {comparison.sqnr_db:.1f} dB  "
                f"max abs err {comparison.max_abs_error:.3g}"
            )
        worst = self.worst_layer()
        if worst is not None:
            lines.append(f"worst layer: {worst[0]} SQNR {worst[1]:.1f} dB")
        lines.extend(self.format_validation())
        lines.extend(self.format_splits())
        lines.extend(self.format_search())
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def format_search(self) -> list[str]:
        """The auto search's budget, choice and tries, if the run was one."""
        if self.auto is None:
            return []
        chosen = self.auto["chosen"]
        schemes = ", ".join(f"{count} x {scheme}" for scheme, count in sorted(chosen["schemes"].items()))
        verdict = "meets" if chosen["meets_budget"] else "MISSES"
        line = (
            f"auto: {self.auto['method']}, {schemes}; held-out {self.auto['metric']} error "
            f"{chosen['measured_error']:.5f} (bound {chosen.get('error_bound', 0.0):.5f}) {verdict} the budget {self.auto['budget_error']:.5f} "
            f"(objective {self.auto['objective']}; {len(self.auto['tried'])} candidates built, "
            f"{self.auto['seconds']:.1f} s)"
        )
        return [line]

    def format_validation(self) -> list[str]:
        """The validation threshold and its verdict, if the run was validated."""
        if self.min_cosine is None:
            return []
        rule = f"every output cosine >= {self.min_cosine:g} and finite"
        if not self.failures:
            return [f"validation: passed ({rule})"]
        return [f"validation: FAILED ({rule})", *(f"  {failure}" for failure in self.failures)]

    def format_splits(self) -> list[str]:
        """The MACs and parameters the split passes added, in total and per layer."""
        if not self.split_costs:
            return []
        model_macs = min(cost.model_macs for cost in self.split_costs)
        added = sum(cost.added_macs for cost in self.split_costs)
        params = sum(cost.added_params for cost in self.split_costs)
        share = added / max(model_macs, 1)
        unit = self.split_costs[0].unit
        lines = [
            f"splitting: +{added} MACs {unit} (+{share:.1%}), +{params} parameters, {len(self.split_costs)} layers"
        ]
        lines.extend(
            f"  {cost.pass_name:<12} {cost.layer:<36} +{cost.added_macs_fraction:.1%} MACs  +{cost.added_params} params"
            f"  {cost.gain_db:+.1f} dB simulated"
            for cost in self.split_costs
        )
        return lines

    def format_layers(self) -> str:
        """One line per layer: status, scheme, measured SQNR, and why."""
        lines = [f"{'layer':<36} {'status':<9} {'SQNR dB':>8} {'kB before -> after':>20}  scheme / reason"]
        for layer in self.layers:
            metric = self.layer_metrics.get(layer.node)
            sqnr = f"{metric.sqnr_db:8.1f}" if metric is not None else f"{'':8}"
            sizes = self.layer_bytes.get(layer.node)
            size = f"{sizes[0] / 1e3:9.1f} -> {sizes[1] / 1e3:7.1f}" if sizes is not None else ""
            detail = "; ".join(part for part in (layer.scheme, layer.reason) if part)
            lines.append(f"{layer.node:<36} {layer.status:<9} {sqnr} {size:>20}  {detail}")
        return "\n".join(lines)


def layer_decisions(model: ir.Model) -> list[LayerDecision]:
    """The decisions recorded on the model's nodes, in graph order."""
    return [node.meta[DECISION_KEY] for node in model.graph if DECISION_KEY in node.meta]


def given_options(**values: Any) -> dict[str, Any]:
    """The options a run was given (None left out): a recipe by its name, a metric function by its own."""
    given = {}
    for name, value in values.items():
        if value is None:
            continue
        if callable(value):
            value = f"function {getattr(value, '__qualname__', type(value).__name__)}"
        given[name] = getattr(value, "name", value) if not isinstance(value, (str, Path)) else str(value)
    return given


def source_text(source: object) -> str:
    """A calibration source as the report names it: a resolved path, 'random', or the type of data given in memory."""
    if isinstance(source, str) and source == "random":
        return source
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve())
    return f"in memory ({type(source).__name__})"


def input_files(model: ir.Model, recipe: object) -> dict[str, Any]:
    """The model file, its external data and the recipe file the run read (None for a model built in memory)."""
    read = list(model.meta.get(INPUT_FILES_KEY, ()))
    recipe_path = Path(recipe) if isinstance(recipe, (str, Path)) else None
    return {
        "model": next((str(f.path) for f in read if f.is_input_model), None),
        "external_data": [str(f.path) for f in read if not f.is_input_model],
        "recipe": str(recipe_path.resolve()) if recipe_path is not None and recipe_path.is_file() else None,
    }


def data_size(data: CalibrationData | list[Feed]) -> dict[str, Any]:
    """Batches and samples of a data set (null, with a reason, if the run never read it in full)."""
    if isinstance(data, list):
        return {"batches": len(data), "samples": sum(rows(feed) for feed in data)}
    if data.size is None:
        return {"batches": None, "samples": None, "reason": "not read in full: no pass calibrated on it"}
    return {"batches": data.size[0], "samples": data.size[1]}


def reference_layers(reference: ir.Model, decisions: list[LayerDecision]) -> dict[str, Layer]:
    """The float model's layer behind each decision, found by its output's name after a bias Add (as decisions name it).

    Names of nodes do not serve: a float model's unnamed nodes get names only in the candidate.
    """
    by_output = {decision.output: decision.node for decision in decisions if decision.output}
    found = {}
    for candidate in candidates(reference.graph):
        output = layer_output(candidate.node).name
        if candidate.layer is not None and output in by_output:
            found[by_output[output]] = candidate.layer
    return found


def activation_ranges(
    reference: ir.Model, calibrator: CachingCalibrator, decisions: list[LayerDecision]
) -> dict[str, ActivationRange]:
    """The channel ranges of the layers' inputs from the run's calibration statistics, where channels are last.

    Conv inputs (channels on axis 1) are reduced in the graph by analysis/conv_ranges.py and are not kept per name.
    """
    ranges = {}
    for node, layer in reference_layers(reference, decisions).items():
        stats = calibrator.first_collected(layer.activation.name or "")
        if stats is not None and _channels_last(layer.node, layer.activation_index):
            ranges[node] = ActivationRange(layer.activation.name or "", stats.channel_min, stats.channel_max)
    return ranges


def _channels_last(node: ir.Node, activation_index: int) -> bool:
    """Whether the layer's input activation holds its channels on the last axis (X @ W, Gemm without transA)."""
    if node.op_type == "MatMul":
        return activation_index == 0
    return node.op_type == "Gemm" and activation_index == 0 and not node.attributes.get_int("transA", 0)


def versions() -> dict[str, str]:
    """The versions of graphquant and of the libraries that decide its output."""
    return {
        "graphquant": graphquant.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "onnx_ir": ir.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _metrics(comparison: TensorComparison) -> dict[str, float | int]:
    """A tensor's error metrics (the rtol/atol check of validate.py is left out: lossy runs never meet it)."""
    return {
        "cosine": comparison.cosine,
        "sqnr_db": comparison.sqnr_db,
        "max_abs_error": comparison.max_abs_error,
        "nonfinite": comparison.nonfinite,
    }


def json_ready(value: Any) -> Any:
    """Plain JSON data: numpy scalars as numbers, tuples and paths converted; NaN/Inf as null with a reason."""
    if isinstance(value, Mapping):
        ready: dict[str, Any] = {}
        for key, item in value.items():
            ready[str(key)] = json_ready(item)
            if _nonfinite(item):
                ready[f"{key}_reason"] = NULL_REASONS.get((str(key), float(item)), f"not finite ({float(item)})")
        return ready
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)  # e.g. a path


def _nonfinite(value: Any) -> bool:
    """Whether the value is a NaN or infinite float."""
    return isinstance(value, (float, np.floating)) and not math.isfinite(value)


def _megabytes(count: int) -> str:
    """Bytes as MB with two decimals."""
    return f"{count / 1e6:.2f} MB"
