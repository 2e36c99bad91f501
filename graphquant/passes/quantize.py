"""Quantize pass (lossy): annotate layers with weight and activation QuantSpecs for lowering."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import Candidate, Layer, candidates, scale_groups
from graphquant.analysis.simulate import clipped_weight_bound
from graphquant.analysis.stats import CalibrationStats
from graphquant.quant_spec import (
    DECISION_KEY,
    INPUT_SPECS_KEY,
    KEEP_FLOAT_KEY,
    PREEXECUTED_KEY,
    SCHEME_NOTE_KEY,
    LayerDecision,
    QuantSpec,
    symmetric_spec,
)
from graphquant.rewrites import layer_output

ACTIVATION_METHODS = ("minmax", "percentile")


@dataclasses.dataclass(frozen=True)
class NodeOverride:
    """Options that apply to the nodes whose names match a glob pattern."""

    pattern: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """The quantization options of one layer after overrides."""

    wbits: int
    abits: int | None
    skip: bool = False


class QuantizePass(ir.passes.InPlacePass):
    """Lossy: symmetric per-output-channel weights and per-tensor activations, recorded as QuantSpecs."""

    def __init__(
        self,
        calibrator: Calibrator | None = None,
        *,
        wbits: int = 8,
        abits: int | None = 8,
        activation_method: str = "minmax",
        percentile: float = 99.99,
        weight_clip_search: bool = False,
        overrides: Sequence[NodeOverride] = (),
    ):
        super().__init__()
        if activation_method not in ACTIVATION_METHODS:
            raise ValueError(f"activation_method must be one of {ACTIVATION_METHODS}, got {activation_method!r}")
        self.calibrator = calibrator
        self.defaults = LayerOptions(wbits=wbits, abits=abits)
        self.activation_method = activation_method
        self.percentile = percentile
        self.weight_clip_search = weight_clip_search
        self.overrides = tuple(overrides)
        for options in [self.defaults, *(self._options_for_pattern(o) for o in self.overrides)]:
            _check_bits(options)

    def requires(self, model: ir.Model) -> None:
        """Activation quantization needs calibration data."""
        if self.calibrator is None and self._any_activation_bits():
            raise ir.passes.PreconditionError("quantize: activation quantization needs calibration data")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Annotate every eligible layer; record why the others stay float."""
        graph = model.graph
        layers: list[Layer] = []
        for candidate in candidates(graph):
            if INPUT_SPECS_KEY in candidate.node.meta:
                continue
            layer = self._accept(candidate)
            if layer is not None:
                layers.append(layer)
        stats = self._activation_stats(model, layers)
        for group in scale_groups(layers):
            for layer in group.layers:
                self._annotate(layer, stats)
        return ir.passes.PassResult(model, modified=bool(layers))

    def _accept(self, candidate: Candidate) -> Layer | None:
        """The candidate's layer if it is to be quantized; else record the reason on the node."""
        node = candidate.node
        reason = candidate.reason
        if candidate.layer is not None:
            options = self.options_for(node)
            if options.skip:
                reason = "skipped by a recipe override"
            elif KEEP_FLOAT_KEY in node.meta:
                reason = node.meta[KEEP_FLOAT_KEY]
            else:
                return candidate.layer
        node.meta[DECISION_KEY] = LayerDecision(
            node.name or "", node.op_type, "float", reason, output=_output_name(node)
        )
        return None

    def options_for(self, node: ir.Node) -> LayerOptions:
        """The defaults updated by every override whose pattern matches the node name."""
        options = self.defaults
        for override in self.overrides:
            if fnmatch.fnmatchcase(node.name or "", override.pattern):
                options = dataclasses.replace(options, **override.options)
        return options

    def _options_for_pattern(self, override: NodeOverride) -> LayerOptions:
        """An override applied to the defaults, to validate it up front."""
        unknown = set(override.options) - {f.name for f in dataclasses.fields(LayerOptions)}
        if unknown:
            raise ValueError(f"override {override.pattern!r}: unknown options {sorted(unknown)}")
        return dataclasses.replace(self.defaults, **override.options)

    def _any_activation_bits(self) -> bool:
        """Whether any layer could get quantized activations."""
        return self.defaults.abits is not None or any(o.options.get("abits") for o in self.overrides)

    def _activation_stats(self, model: ir.Model, layers: list[Layer]) -> CalibrationStats:
        """Calibrate the activations of the layers that quantize them."""
        names = [
            layer.activation.name or ""
            for layer in layers
            if self.weight_clip_search
            or (self.options_for(layer.node).abits is not None and PREEXECUTED_KEY not in layer.activation.meta)
        ]
        if not names or self.calibrator is None:
            return CalibrationStats()
        return self.calibrator.collect(model, names)

    def _annotate(self, layer: Layer, stats: CalibrationStats) -> None:
        """Attach the weight and activation specs and the decision to the layer's node."""
        options = self.options_for(layer.node)
        weight = layer.weight_array
        reduce_axes = tuple(axis for axis in range(weight.ndim) if axis != layer.out_axis)
        bound = abs(weight).max(axis=reduce_axes)
        activation_name = layer.activation.name or ""
        if self.weight_clip_search and activation_name in stats and layer.node.op_type != "Conv":
            bound = clipped_weight_bound(layer, options.wbits, stats[activation_name].channel_mean_square())
        weight_spec = symmetric_spec(bound, options.wbits, axis=layer.out_axis)
        specs: dict[int, QuantSpec] = {layer.weight_index: weight_spec}
        scheme = f"W{options.wbits} per-channel" + (" clip-searched" if self.weight_clip_search else "")
        preexecuted_bits = layer.activation.meta.get(PREEXECUTED_KEY)
        if preexecuted_bits is not None:
            qmax = 2 ** (preexecuted_bits - 1) - 1
            specs[layer.activation_index] = symmetric_spec(float(qmax), preexecuted_bits)
            scheme += f", A{preexecuted_bits} per-channel (step pre-executed into W)"
        elif options.abits is not None:
            activation_stats = stats[layer.activation.name or ""]
            bound = (
                activation_stats.abs_percentile(self.percentile)
                if self.activation_method == "percentile"
                else activation_stats.absmax
            )
            specs[layer.activation_index] = symmetric_spec(bound, options.abits)
            scheme += f", A{options.abits} per-tensor {self.activation_method}"
        node = layer.node
        node.meta[INPUT_SPECS_KEY] = specs
        reason = node.meta.get(SCHEME_NOTE_KEY, "")
        node.meta[DECISION_KEY] = LayerDecision(
            node.name or "", node.op_type, "quantized", reason, scheme, output=_output_name(node)
        )


def _check_bits(options: LayerOptions) -> None:
    """Refuse bit widths outside 2..8."""
    for label, bits in (("wbits", options.wbits), ("abits", options.abits)):
        if bits is not None and not 2 <= bits <= 8:
            raise ValueError(f"{label} must be in 2..8, got {bits}")


def _output_name(node: ir.Node) -> str:
    """The name of the layer's full output, as the reference model names it too."""
    return layer_output(node).name or ""
