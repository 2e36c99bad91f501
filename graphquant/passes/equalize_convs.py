"""Equalize-convs pass (exact): cross-layer scale migration between consecutive convs, through Relu or ReLU6.

For Conv1 -> act -> Conv2 with act in {none, Relu, Clip(0, c)}, channel k of the tensor between them is divided by
s_k: W1[k] /= s_k, b1[k] /= s_k, and Conv2's weights on input channel k are multiplied by s_k. Relu commutes with a
positive scale. Clip(y, 0, c)/s = Min(Relu(y/s), c/s) needs a bound per channel, so the Clip becomes a Relu and a
Min with a [C, 1, 1] bound (exact; lowering may drop the Min where the reader's saturating grid computes it).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.channel_probe import channel_reductions
from graphquant.analysis.layers import Layer, classify, constant_array
from graphquant.graph_edit import NameScope, add_initializer, remove_if_unused
from graphquant.quant_spec import CHANNEL_BOUND_KEY, KEEP_FLOAT_KEY
from graphquant.rewrites import replace_weight

# On the value between two convs: the pass equalized it already.
EQUALIZED_KEY = "graphquant.equalized"
# Channels whose calibrated range is below this share of the widest one keep their scale (dead channels).
DEAD_CHANNEL = 1e-6


@dataclasses.dataclass(frozen=True)
class ConvPair:
    """Conv1 -> optional Relu/Clip(0, c) -> Conv2, where each tensor in between has exactly one reader."""

    first: Layer
    activation: ir.Node | None
    second: Layer

    @property
    def between(self) -> ir.Value:
        """The tensor Conv2 reads (the activation's output, or Conv1's)."""
        return self.second.activation


class EqualizeConvsPass(ir.passes.InPlacePass):
    """Exact: s_k = r_k^α / w_k^(1-α), r_k the calibrated range of channel k, w_k = max|W2[:, k]|.

    A depthwise Conv2's weights are quantized per output channel, each reading one input channel, which a scale per
    channel does not change, so those pairs (any grouped Conv2) take ``depthwise_alpha``, 1 by default: every channel
    is brought to the same range (the geometric mean of the ranges). ``depthwise_only`` rescales only those pairs
    (the others trade weight ranges for activation ranges). ``headroom`` h takes a bounded channel's range as
    min(h·r_k, c), so that data reaching past the calibrated range are not clipped at it after equalization.
    """

    def __init__(
        self,
        calibrator: Calibrator | None = None,
        *,
        alpha: float = 0.5,
        depthwise_alpha: float = 1.0,
        depthwise_only: bool = False,
        headroom: float = 1.0,
    ):
        super().__init__()
        if headroom < 1.0:
            raise ValueError(f"headroom must be at least 1, got {headroom}")
        for label, value in (("alpha", alpha), ("depthwise_alpha", depthwise_alpha)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {value}")
        self.calibrator = calibrator
        self.alpha = alpha
        self.depthwise_alpha = depthwise_alpha
        self.depthwise_only = depthwise_only
        self.headroom = headroom

    def requires(self, model: ir.Model) -> None:
        """The channel ranges come from calibration."""
        if self.calibrator is None:
            raise ir.passes.PreconditionError("equalize-convs needs calibration data")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Find the pairs, calibrate the tensors between them once, and rescale each pair."""
        assert self.calibrator is not None
        pairs = [
            pair
            for pair in conv_pairs(model.graph)
            if EQUALIZED_KEY not in pair.between.meta and (_depthwise(pair.second) or not self.depthwise_only)
        ]
        if not pairs:
            return ir.passes.PassResult(model, modified=False)
        ranks = {pair.between.name or "": pair.first.weight_array.ndim for pair in pairs}
        ranges = channel_reductions(self.calibrator, model, ranks, ("ReduceMax", "ReduceMin"))
        graph = model.graph
        scope = NameScope(graph)
        modified = False
        for pair in pairs:
            found = ranges.get(pair.between.name or "")
            if found is None:
                continue
            span = np.maximum(found["ReduceMax"], 0) - np.minimum(found["ReduceMin"], 0)
            bound = _clip_bound(pair.activation) if pair.activation is not None else None
            if bound is not None and np.isfinite(bound):
                # Room above the calibrated range, up to the clip, for data that reach further than calibration.
                span = np.minimum(span * self.headroom, bound)
            scales = self._scales(pair, span)
            if bound is not None and np.isfinite(bound):
                scales = _bounds_above_range(scales, span, bound)
            if np.all(scales == 1):
                continue
            _rescale(graph, scope, pair, scales)
            pair.between.meta[EQUALIZED_KEY] = True
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _scales(self, pair: ConvPair, span: np.ndarray) -> np.ndarray:
        """s_k = r_k^α / w_k^(1-α), normalized to a geometric mean of 1; dead channels keep 1."""
        alpha = self.depthwise_alpha if _depthwise(pair.second) else self.alpha
        weight_range = input_channel_absmax(pair.second)
        live = (span > DEAD_CHANNEL * span.max()) & (weight_range > 0)
        if not np.any(live):
            return np.ones(span.shape, np.float32)
        raw = np.ones(span.shape, np.float64)
        raw[live] = span[live] ** alpha / weight_range[live] ** (1.0 - alpha)
        raw[live] /= np.exp(np.mean(np.log(raw[live])))
        return raw.astype(np.float32)


def _depthwise(layer: Layer) -> bool:
    """Whether the Conv is grouped (each output channel reads a subset of the input channels)."""
    return layer.node.attributes.get_int("group", 1) > 1


def _bounds_above_range(scales: np.ndarray, span: np.ndarray, bound: float) -> np.ndarray:
    """Cap s_k at c / M, M = max_j r_j / s_j, so every channel bound c / s_k is at least the tensor's range M.

    The reader's per-tensor grid then saturates at or below every channel's bound, so a lowering may drop the Min;
    channels that reach c (r_k = c) end exactly at M.
    """
    top = float(np.max(span / scales))
    if top <= 0:
        return scales
    # Slightly below c / M, so that c / s_k >= M survives float32 rounding.
    return np.minimum(scales, np.float32(bound / top * (1 - 1e-6))).astype(np.float32)


def conv_pairs(graph: ir.Graph) -> list[ConvPair]:
    """Every Conv1 -> (Relu | Clip(0, c) | nothing) -> Conv2 chain whose intermediate tensors have one reader each."""
    pairs = []
    for node in graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        second = _layer(node)
        pair = None if second is None else _pair_ending_at(second)
        if pair is not None:
            pairs.append(pair)
    return pairs


def _layer(node: ir.Node) -> Layer | None:
    """The Conv's layer if its weight is a float32 constant and no earlier step marked it to stay float."""
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if KEEP_FLOAT_KEY in node.meta or (bias is not None and constant_array(bias) is None):
        return None
    return classify(node).layer


def _pair_ending_at(second: Layer) -> ConvPair | None:
    """The pair whose Conv2 is ``second``, if the chain before it qualifies."""
    value = second.activation
    if not _only_reader(value, second.node):
        return None
    producer = value.producer()
    activation = producer if producer is not None and _clip_bound(producer) is not None else None
    if activation is not None:
        value = activation.inputs[0]
        if value is None or not _only_reader(value, activation):
            return None
        producer = value.producer()
    if producer is None or producer.op_type != "Conv" or producer.domain not in ("", "ai.onnx"):
        return None
    first = _layer(producer)
    if first is None or first.weight_array.shape[0] != _input_channels(second):
        return None
    return ConvPair(first, activation, second)


def _only_reader(value: ir.Value, reader: ir.Node) -> bool:
    """Whether ``reader`` is the value's one reader (once) and the value is no graph output."""
    return not value.is_graph_output() and [user for user, _ in value.uses()] == [reader]


def _clip_bound(node: ir.Node) -> float | None:
    """inf for a Relu, c for a Clip(x, 0, c) with constant bounds (opset >= 11 inputs), else None."""
    if node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
        return None
    if node.op_type == "Relu":
        return float("inf")
    if node.op_type != "Clip" or "min" in node.attributes or "max" in node.attributes:
        return None
    low = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    high = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.asarray(np.inf)
    if low is None or high is None or low.size != 1 or high.size != 1 or float(low) != 0.0 or float(high) <= 0:
        return None
    return float(high)


def _input_channels(layer: Layer) -> int:
    """The number of channels a Conv reads: C_in/group weight columns times the group count."""
    return layer.weight_array.shape[1] * layer.node.attributes.get_int("group", 1)


def input_channel_absmax(layer: Layer) -> np.ndarray:
    """max|W| over every weight that reads each input channel of a (grouped) Conv."""
    weight = np.abs(layer.weight_array)
    groups = layer.node.attributes.get_int("group", 1)
    per_group = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
    return per_group.max(axis=(1, 3)).reshape(-1)


def _input_channel_scaled(layer: Layer, scales: np.ndarray) -> np.ndarray:
    """Conv weights [C_out, C_in/g, k...] with input channel k (of group k // (C_in/g)) multiplied by s_k."""
    weight = layer.weight_array
    groups = layer.node.attributes.get_int("group", 1)
    blocked = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1).astype(np.float64)
    factors = scales.astype(np.float64).reshape(groups, 1, weight.shape[1], 1)
    return (blocked * factors).reshape(weight.shape).astype(np.float32)


def _rescale(graph: ir.Graph, names: NameScope, pair: ConvPair, scales: np.ndarray) -> None:
    """Divide channel k of the tensor between the convs by s_k, and multiply Conv2's input channel k by it."""
    first, second = pair.first, pair.second
    shape = (-1,) + (1,) * (first.weight_array.ndim - 1)
    replace_weight(graph, names, first, first.weight_array / scales.reshape(shape), "equalized")
    bias_value = first.node.inputs[2] if len(first.node.inputs) > 2 else None
    bias = constant_array(bias_value)
    if bias is not None:
        assert bias_value is not None
        new_bias = add_initializer(graph, names, f"{bias_value.name}_equalized", (bias / scales).astype(np.float32))
        first.node.replace_input_with(2, new_bias)
        remove_if_unused(graph, bias_value)
    replace_weight(graph, names, second, _input_channel_scaled(second, scales), "equalized")
    if pair.activation is not None and pair.activation.op_type == "Clip":
        _clip_to_channel_bounds(graph, names, pair, scales)


def _clip_to_channel_bounds(graph: ir.Graph, names: NameScope, pair: ConvPair, scales: np.ndarray) -> None:
    """Replace Clip(y, 0, c) by Min(Relu(y), c / s) with a [C, 1, ...] bound, so that channel k clips at c / s_k."""
    clip = pair.activation
    assert clip is not None
    bound = _clip_bound(clip)
    assert bound is not None
    source, output = clip.inputs[0], clip.outputs[0]
    assert source is not None
    rank = len(output.shape) if output.shape is not None else pair.first.weight_array.ndim
    limits = (np.float32(bound) / scales).astype(np.float32).reshape((-1,) + (1,) * (rank - 2))
    base = clip.name or "clip"
    relu = ir.node("Relu", [source], name=names.fresh(f"{base}_relu"))
    relu.outputs[0].name = names.fresh(f"{source.name}_relu")
    relu.outputs[0].type, relu.outputs[0].shape = output.type, output.shape
    limit = add_initializer(graph, names, f"{base}_channel_bound", limits)
    minimum = ir.node("Min", [relu.outputs[0], limit], name=names.fresh(f"{base}_min"))
    minimum.meta[CHANNEL_BOUND_KEY] = True
    graph.insert_after(clip, [relu, minimum])
    name = output.name
    output.replace_all_uses_with(minimum.outputs[0])
    bounds = [value for value in clip.inputs[1:] if value is not None]
    graph.remove(clip, safe=True)
    minimum.outputs[0].name = name
    minimum.outputs[0].type, minimum.outputs[0].shape = output.type, output.shape
    for value in bounds:
        remove_if_unused(graph, value)
