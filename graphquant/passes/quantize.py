"""Quantize pass (lossy): annotate layers with weight and activation QuantSpecs for lowering."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphquant import progress
from graphquant.analysis import conv_ranges
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.conv_gram import ConvGeometry, ConvGrams, SequentialConvGrams
from graphquant.analysis.flexround import DEFAULT_STEPS, FlexRoundSettings, flexround_round
from graphquant.analysis.gptq import conv_weight_fit, gptq_round, gram_determined, grouped_gptq_round
from graphquant.analysis.layers import Candidate, Layer, candidates, scale_groups
from graphquant.analysis.sensitive_layers import matching_layers
from graphquant.analysis.stats import CalibrationStats, TensorStats
from graphquant.analysis.weight_fit import (
    WeightScheme,
    block_rows,
    fit_weight_spec,
    from_in_major,
    in_major,
    output_error_ranges,
    round_trip,
    row_energy,
    spec_from_ranges,
)
from graphquant.graph_edit import NameScope
from graphquant.passes.bias_correct import quantized_copy, subtract_from_bias
from graphquant.quant_spec import (
    DECISION_KEY,
    INPUT_SPECS_KEY,
    KEEP_FLOAT_KEY,
    OUTPUT_SPEC_KEY,
    PREEXECUTED_KEY,
    SCHEME_NOTE_KEY,
    LayerDecision,
    QuantSpec,
    asymmetric_spec,
    symmetric_spec,
)
from graphquant.rewrites import layer_output, replace_weight

ACTIVATION_METHODS = ("minmax", "percentile", "mse")
# How 2-D weights are rounded onto their grids: to nearest, GPTQ, FlexRound from RTN's grid or from GPTQ's codes,
# or FlexRound from GPTQ's codes fitted block by block to the float blocks' outputs.
ROUNDINGS = ("nearest", "gptq", "flexround", "gptq-flexround", "flexround-block")


@dataclasses.dataclass(frozen=True)
class NodeOverride:
    """Options that apply to the nodes whose names match a glob pattern."""

    pattern: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """The quantization options of one layer after overrides (abits None or 0: float activations)."""

    wbits: int
    abits: int | None
    skip: bool = False
    block_size: int | None = None
    weight_symmetric: bool = True
    activation_symmetric: bool = True


# Named per-layer schemes: an override ``{ scheme = "w4" }`` sets these options (later keys of the same override win).
SCHEMES: dict[str, dict[str, Any]] = {
    "float": {"skip": True},
    "w8a8": {"wbits": 8, "abits": 8, "block_size": None, "weight_symmetric": True},
    "w4a8": {"wbits": 4, "abits": 8, "block_size": None, "weight_symmetric": True},
    "w8": {"wbits": 8, "abits": None, "block_size": None, "weight_symmetric": True},
    "w4": {"wbits": 4, "abits": None, "block_size": 32, "weight_symmetric": False},
}


class QuantizePass(ir.passes.InPlacePass):
    """Lossy: per-channel or block-wise weights (RTN with clip search, or GPTQ), per-tensor activations, as QuantSpecs.

    ``abits`` None or 0 keeps activations float (weight-only). Blocks run along the weight's input-channel axis.
    ``activation_symmetric`` False (a LayerOptions field, so per layer too) puts activations on an unsigned [min, max]
    grid with a zero point instead of ±max|x| (minmax only).
    ``overrides`` is the per-layer scheme map: each NodeOverride's glob (fnmatch, on the node name) sets LayerOptions
    fields or a named scheme (SCHEMES: float, w8a8, w4a8, w8, w4) on the layers it matches; later overrides win.
    ``keep_8bit`` globs (node names, or analysis/sensitive_layers.py's roles such as ``@depthwise``) give the
    layers they match 8-bit weights, after the overrides.
    ``rounding`` (ROUNDINGS; default "gptq" if ``gptq`` else "nearest") overrides ``gptq``; under the per-layer
    FlexRound roundings (analysis/flexround.py, ``flexround_steps`` Adam steps per layer) conv weights get GPTQ.
    "flexround-block" (analysis/flexround_block.py, needs torch) refits the 2-D and conv weights' GPTQ codes (a
    depthwise conv's: its output-error grid's) block by block, ``flexround_steps`` Adam steps per block of at least
    ``flexround_block_layers`` layers, the layers' activations on their grids; its convs keep their float bias.
    ``gptq_sequential`` fits conv weights one layer at a time, in graph order, on the inputs of the model quantized
    so far, against the float model's outputs, and moves each conv's bias by its remaining mean output error
    (analysis/conv_gram.py's SequentialConvGrams).
    ``gptq_min_rows`` keeps plain rounding on MatMul/Gemm weights whose calibration rows number fewer than that many
    per input channel (analysis/gptq.gram_determined; 0: GPTQ wherever it applies).
    ``gptq_convs`` False keeps plain rounding on Conv/ConvTranspose weights under GPTQ.
    ``asymmetric_conv_weights`` puts Conv weights of fewer than 8 bits on asymmetric grids (each channel's or
    block's [min, max], with a zero point) whatever ``weight_symmetric`` says; QLinearConv still takes them per
    channel (lowering/qlinear_conv.py stores their codes less the zero points in int8).
    """

    def __init__(
        self,
        calibrator: Calibrator | None = None,
        *,
        wbits: int = 8,
        abits: int | None = 8,
        activation_method: str = "minmax",
        percentile: float = 99.99,
        weight_clip_search: bool = False,
        weight_symmetric: bool = True,
        activation_symmetric: bool = True,
        block_size: int | None = None,
        gptq: bool = False,
        gptq_act_order: bool = False,
        gptq_sequential: bool = False,
        asymmetric_conv_weights: bool = False,
        gptq_min_rows: float = 0.0,
        gptq_convs: bool = True,
        rounding: str | None = None,
        flexround_steps: int = DEFAULT_STEPS,
        flexround_block_layers: int = 1,
        overrides: Sequence[NodeOverride] = (),
        keep_8bit: tuple[str, ...] = (),
    ):
        super().__init__()
        if activation_method not in ACTIVATION_METHODS:
            raise ValueError(f"activation_method must be one of {ACTIVATION_METHODS}, got {activation_method!r}")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if rounding is not None and rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if rounding == "flexround-block":
            _check_block_rounding()
        self.calibrator = calibrator
        self.defaults = LayerOptions(
            wbits,
            abits or None,
            block_size=block_size,
            weight_symmetric=weight_symmetric,
            activation_symmetric=activation_symmetric,
        )
        self.activation_method = activation_method
        self.percentile = percentile
        self.weight_clip_search = weight_clip_search
        self.rounding = rounding or ("gptq" if gptq else "nearest")
        self.gptq = self.rounding != "nearest"  # every other rounding needs the Grams GPTQ collects
        self.gptq_act_order = gptq_act_order
        self.gptq_sequential = gptq_sequential
        self.asymmetric_conv_weights = asymmetric_conv_weights
        self.gptq_min_rows = gptq_min_rows
        self.gptq_convs = gptq_convs
        self.flexround = FlexRoundSettings(flexround_steps)
        self.flexround_block_layers = flexround_block_layers
        self._fits: list[tuple[Any, WeightScheme]] = []  # block-wise FlexRound's LayerFits, filled while annotating
        self.overrides = tuple(overrides)
        self._kept_8bit = matching_layers([], keep_8bit)  # checks the patterns; call() fills it
        self.keep_8bit = tuple(keep_8bit)
        for options in [self.defaults, *(self._options_for_pattern(o) for o in self.overrides)]:
            _check_bits(options)
            if not options.activation_symmetric and activation_method != "minmax":
                raise ValueError(
                    f"an asymmetric activation grid takes activation_method 'minmax', not {activation_method!r}"
                )

    def requires(self, model: ir.Model) -> None:
        """Activation quantization needs calibration data (GPTQ or FlexRound without it rounds, with a warning)."""
        if self.calibrator is None and self._any_activation_bits():
            raise ir.passes.PreconditionError("quantize: activation quantization needs calibration data")
        if self.calibrator is None and self.gptq:
            warnings.warn(
                "quantize: no calibration data, so no GPTQ or FlexRound: weights are rounded to nearest", stacklevel=2
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Annotate every eligible layer; record why the others stay float."""
        graph = model.graph
        found = list(candidates(graph))
        self._kept_8bit = matching_layers([c.layer for c in found if c.layer is not None], self.keep_8bit)
        layers: list[Layer] = []
        for candidate in found:
            if INPUT_SPECS_KEY in candidate.node.meta or _quantized_by_an_earlier_pass(candidate.node):
                continue
            layer = self._accept(candidate)
            if layer is not None:
                layers.append(layer)
        stats, grams = self._activation_stats(model, layers)
        names = NameScope(graph)
        ordered = [layer for group in scale_groups(layers) for layer in group.layers]
        if isinstance(grams, SequentialConvGrams):  # each conv after the ones that feed it
            position = {node: index for index, node in enumerate(graph)}
            ordered.sort(key=lambda layer: position[layer.node])
        self._fits = []
        for layer in progress.bar(ordered, self._progress_label(), unit="layer"):
            self._annotate(graph, names, layer, stats, grams)
        if self._fits and self.calibrator is not None:
            self._refit_blocks(graph, names)
        return ir.passes.PassResult(model, modified=bool(layers))

    def _progress_label(self) -> str:
        """What the progress bar says the layers go through."""
        if not self.gptq:
            return "weights"
        return "FlexRound" if "flexround" in self.rounding else "GPTQ"

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
                options = dataclasses.replace(options, **_expanded(override))
        return dataclasses.replace(options, wbits=8) if node in self._kept_8bit else options

    def _options_for_pattern(self, override: NodeOverride) -> LayerOptions:
        """An override applied to the defaults, to validate it up front."""
        unknown = set(override.options) - {f.name for f in dataclasses.fields(LayerOptions)} - {"scheme"}
        if unknown:
            raise ValueError(f"override {override.pattern!r}: unknown options {sorted(unknown)}")
        scheme = override.options.get("scheme")
        if scheme is not None and scheme not in SCHEMES:
            raise ValueError(f"override {override.pattern!r}: unknown scheme {scheme!r} (schemes: {sorted(SCHEMES)})")
        return dataclasses.replace(self.defaults, **_expanded(override))

    def _any_activation_bits(self) -> bool:
        """Whether any layer could get quantized activations."""
        return bool(self.defaults.abits) or any(_expanded(o).get("abits") for o in self.overrides)

    def _activation_stats(
        self, model: ir.Model, layers: list[Layer]
    ) -> tuple[CalibrationStats, ConvGrams | SequentialConvGrams]:
        """Calibrate the activations of the layers that quantize them, clip-search their weights or run GPTQ.

        GPTQ's Hessians: X^T X for 2-D weights, the im2col Grams (ConvGrams) for conv weights.
        """
        names = [
            layer.activation.name or ""
            for layer in layers
            if self.weight_clip_search
            or self.gptq
            or (self.options_for(layer.node).abits and PREEXECUTED_KEY not in layer.activation.meta)
        ]
        # Conv outputs get a calibrated grid too: QLinearConv requantizes its output.
        outputs = [
            layer.node.outputs[0].name or ""
            for layer in layers
            if layer.node.op_type == "Conv" and self.options_for(layer.node).abits
        ]
        conv_layers = [layer for layer in layers if self._uses_gptq(layer) and layer.weight_array.ndim > 2]
        grams: ConvGrams | SequentialConvGrams = ConvGrams(conv_layers)
        if self.gptq_sequential and self.calibrator is not None:
            grams = SequentialConvGrams(model, conv_layers, self.calibrator.data, quantized_copy)
        if not (names or outputs) or self.calibrator is None:
            return CalibrationStats(), grams
        gram_names = [layer.activation.name or "" for layer in layers if self._uses_gptq(layer)]
        matrices = [name for name in gram_names if name not in grams.input_names]
        ranks = conv_ranges.conv_activation_ranks(layers)
        stats = conv_ranges.collect(
            self.calibrator,
            model,
            names + outputs,
            ranks,
            gram_names=matrices,
            observe=grams.observe if grams.input_names else None,
            observed=grams.input_names,
        )
        return stats, grams

    def _uses_gptq(self, layer: Layer) -> bool:
        """GPTQ applies to 2-D and (with gptq_convs) conv weights that no other node reads (a tied weight keeps plain
        rounding)."""
        convolution = self.gptq_convs and ConvGeometry.of_layer(layer) is not None
        shaped = layer.weight_array.ndim == 2 or convolution
        return self.gptq and shaped and len(layer.weight.uses()) == 1

    def _weight_spec(
        self,
        graph: ir.Graph,
        names: NameScope,
        layer: Layer,
        options: LayerOptions,
        stats: CalibrationStats,
        grams: ConvGrams | SequentialConvGrams,
    ) -> tuple[QuantSpec, str]:
        """The weight's spec and scheme label; under GPTQ the weight is replaced by its rounded values first."""
        symmetric = options.weight_symmetric and not self._asymmetric_conv(layer, options)
        scheme = WeightScheme(options.wbits, symmetric, options.block_size, self.weight_clip_search)
        activation = stats.tensors.get(layer.activation.name or "")
        conv_grams = grams.gram(layer)
        if conv_grams is not None and self._uses_gptq(layer):
            target = grams.target(layer)
            if self.rounding == "flexround-block":
                return self._conv_block_start(graph, names, layer, scheme, conv_grams, target)
            spec, rounded, suffix = conv_weight_fit(layer, scheme, conv_grams, self.gptq_act_order, target)
            if rounded is not None:  # snapped onto the spec's grid, as below
                replace_weight(graph, names, layer, spec.dequantize(spec.quantize(rounded)), "gptq")
            shift = grams.bias_shift(layer)
            if shift is not None and subtract_from_bias(graph, names, layer, -shift.astype(np.float32)):
                suffix += " sequential, bias corrected"
            return spec, scheme.describe(layer) + suffix
        determined = activation is not None and gram_determined(
            activation.count, layer.weight_array.shape[layer.in_axis], self.gptq_min_rows
        )
        if not (self._uses_gptq(layer) and activation is not None and activation.gram is not None and determined):
            energy = row_energy(layer, None if activation is None else activation.channel_mean_square())
            return fit_weight_spec(layer, scheme, energy), scheme.describe(layer)
        rounded, low, high, suffix = self._rounded(in_major(layer), activation.gram, scheme, block_rows(layer, scheme))
        if self.rounding == "flexround-block":
            self._fits.append((self._layer_fit(layer, scheme, (rounded, low, high)), scheme))
        spec = spec_from_ranges(layer, scheme, low, high)
        # Snapped onto the spec's float32 grid, so that lowering stores exactly the codes GPTQ or FlexRound chose.
        weight = from_in_major(layer, rounded)
        replace_weight(graph, names, layer, spec.dequantize(spec.quantize(weight)), self.rounding)
        return spec, scheme.describe(layer) + suffix

    def _asymmetric_conv(self, layer: Layer, options: LayerOptions) -> bool:
        """Whether asymmetric_conv_weights gives this layer an asymmetric grid: a Conv below 8 bits."""
        return self.asymmetric_conv_weights and layer.node.op_type == "Conv" and options.wbits < 8

    def _rounded(
        self, matrix: np.ndarray, gram: np.ndarray, scheme: WeightScheme, block: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """A 2-D weight (in_major) rounded by GPTQ and/or FlexRound: the rounded matrix, its ranges, a label suffix."""
        start, suffix = None, ""
        if self.rounding != "flexround":
            start = gptq_round(
                matrix, gram, scheme.bits, scheme.symmetric, block, scheme.clip_search, self.gptq_act_order
            )
            suffix = " GPTQ act-order" if self.gptq_act_order else " GPTQ"
        if self.rounding == "flexround-block":  # refitted once every layer has GPTQ's codes
            assert start is not None
            return (*start, suffix + f", block-wise FlexRound {self.flexround.steps} steps")
        if self.rounding == "gptq":
            assert start is not None
            return (*start, suffix)
        rounded, low, high = flexround_round(
            matrix, gram, scheme.bits, scheme.symmetric, block, scheme.clip_search, self.flexround, start
        )
        return rounded, low, high, suffix + f" FlexRound {self.flexround.steps} steps"

    def _conv_block_start(
        self,
        graph: ir.Graph,
        names: NameScope,
        layer: Layer,
        scheme: WeightScheme,
        conv_grams: np.ndarray,
        target: np.ndarray | None,
    ) -> tuple[QuantSpec, str]:
        """A Conv weight's start for block-wise FlexRound, rounded as conv_weight_fit rounds it (GPTQ per group,
        depthwise: output-error grids), the bias left float: the blocks fit the float model's outputs."""
        matrix = in_major(layer) if target is None else target
        if layer.node.op_type == "Conv" and layer.weight_array.shape[1] == 1:
            low, high = output_error_ranges(matrix, conv_grams, scheme.bits, scheme.symmetric)
            start, suffix = (round_trip(matrix, low, high, scheme.bits, scheme.symmetric), low, high), " output-error"
        else:
            start = grouped_gptq_round(
                matrix,
                conv_grams,
                scheme.bits,
                scheme.symmetric,
                block_rows(layer, scheme),
                scheme.clip_search,
                self.gptq_act_order,
            )
            suffix = " GPTQ act-order" if self.gptq_act_order else " GPTQ"
        self._fits.append((self._layer_fit(layer, scheme, start), scheme))
        spec = spec_from_ranges(layer, scheme, start[1], start[2])
        replace_weight(graph, names, layer, spec.dequantize(spec.quantize(from_in_major(layer, start[0]))), "gptq")
        suffix += ("" if target is None else " sequential") + f", block-wise FlexRound {self.flexround.steps} steps"
        return spec, scheme.describe(layer) + suffix

    def _layer_fit(self, layer: Layer, scheme: WeightScheme, start: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Any:
        """The layer's float weights and GPTQ's start, for block-wise FlexRound."""
        from graphquant.analysis.flexround_block import LayerFit

        return LayerFit(layer, in_major(layer), start, scheme.bits, scheme.symmetric, block_rows(layer, scheme))

    def _refit_blocks(self, graph: ir.Graph, names: NameScope) -> None:
        """Block-wise FlexRound from GPTQ's codes: each fitted layer gets the learned weights and grid."""
        from graphquant.analysis.flexround_block import BlockSettings, refine

        assert self.calibrator is not None
        settings = BlockSettings(self.flexround.steps, layers=self.flexround_block_layers)
        fits = [(_with_activation_grid(fit), scheme) for fit, scheme in self._fits]
        results = refine(graph, list(self.calibrator.data), [fit for fit, _ in fits], settings)
        for fit, scheme in fits:
            rounded, low, high = results[id(fit)]
            layer = fit.layer
            spec = spec_from_ranges(layer, scheme, low, high)
            replace_weight(graph, names, layer, spec.dequantize(spec.quantize(from_in_major(layer, rounded))), "flex")
            layer.node.meta[INPUT_SPECS_KEY][layer.weight_index] = spec
        self._fits = []

    def _activation_spec(self, stats: TensorStats, bits: int, symmetric: bool = True) -> QuantSpec:
        """Per tensor: unsigned [0, bound] where calibration saw no negative value (Relu/Clip outputs), else ±bound;
        not ``symmetric``: unsigned [min, max] with a zero point (minmax only)."""
        if not symmetric:
            return asymmetric_spec(stats.minimum, stats.maximum, bits)
        unsigned = stats.minimum >= 0
        bound = stats.absmax
        if self.activation_method == "percentile":
            bound = stats.abs_percentile(self.percentile)
        elif self.activation_method == "mse":
            bound = conv_ranges.mse_bound(stats, bits, unsigned)
        return asymmetric_spec(0.0, bound, bits) if unsigned else symmetric_spec(bound, bits)

    def _annotate(
        self,
        graph: ir.Graph,
        names: NameScope,
        layer: Layer,
        stats: CalibrationStats,
        grams: ConvGrams | SequentialConvGrams,
    ) -> None:
        """Attach the weight and activation specs and the decision to the layer's node."""
        options = self.options_for(layer.node)
        weight_spec, scheme = self._weight_spec(graph, names, layer, options, stats, grams)
        specs: dict[int, QuantSpec] = {layer.weight_index: weight_spec}
        preexecuted_bits = layer.activation.meta.get(PREEXECUTED_KEY)
        if preexecuted_bits is not None and options.abits:
            qmax = 2 ** (preexecuted_bits - 1) - 1
            specs[layer.activation_index] = symmetric_spec(float(qmax), preexecuted_bits)
            scheme += f", A{preexecuted_bits} per-channel (step pre-executed into W)"
        elif options.abits:
            activation = stats[layer.activation.name or ""]
            specs[layer.activation_index] = self._activation_spec(
                activation, options.abits, options.activation_symmetric
            )
            scheme += f", A{options.abits} per-tensor {self.activation_method}"
            scheme += "" if options.activation_symmetric else " asymmetric"
        node = layer.node
        node.meta[INPUT_SPECS_KEY] = specs
        if options.abits and (output := node.outputs[0].name or "") in stats:
            node.meta[OUTPUT_SPEC_KEY] = self._activation_spec(
                stats[output], options.abits, options.activation_symmetric
            )
        reason = node.meta.get(SCHEME_NOTE_KEY, "")
        node.meta[DECISION_KEY] = LayerDecision(
            node.name or "", node.op_type, "quantized", reason, scheme, output=_output_name(node)
        )


def _expanded(override: NodeOverride) -> dict[str, Any]:
    """An override's LayerOptions fields, a named scheme replaced by its options (explicit fields win over it)."""
    options = dict(override.options)
    scheme = options.pop("scheme", None)
    return {**SCHEMES.get(scheme, {}), **options} if scheme is not None else options


def _quantized_by_an_earlier_pass(node: ir.Node) -> bool:
    """Whether a pass before this one already quantized the layer in its own way (e.g. BitMoD's lookup tables)."""
    decision = node.meta.get(DECISION_KEY)
    return decision is not None and decision.status == "quantized"


def _with_activation_grid(fit: Any) -> Any:
    """A LayerFit with its layer's activation grid, where the layer has one."""
    spec = fit.layer.node.meta[INPUT_SPECS_KEY].get(fit.layer.activation_index)
    return fit if spec is None else dataclasses.replace(fit, activation=spec)


def _check_block_rounding() -> None:
    """Block-wise FlexRound runs the blocks in torch."""
    if importlib.util.find_spec("torch") is None:
        raise ValueError("rounding 'flexround-block' needs torch: pip install 'graphquant[torch]'")


def _check_bits(options: LayerOptions) -> None:
    """Refuse bit widths outside 2..8."""
    for label, bits in (("wbits", options.wbits), ("abits", options.abits or None)):
        if bits is not None and not 2 <= bits <= 8:
            raise ValueError(f"{label} must be in 2..8, got {bits}")


def _output_name(node: ir.Node) -> str:
    """The name of the layer's full output, as the reference model names it too."""
    return layer_output(node).name or ""
