"""SplitQuant (exact): a MatMul/Gemm/Conv becomes three layers over the k-means clusters of its weight values."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.cost import (
    SplitCost,
    affordable,
    layer_cost,
    model_layer_macs,
    per_channel_rtn,
    record_split,
    splittable_layers,
    sqnr_gain_db,
)
from graphquant.analysis.layers import Layer, constant_array
from graphquant.analysis.stats import CalibrationStats
from graphquant.graph_edit import NameScope, add_initializer, insert_after_producer, remove_if_unused
from graphquant.quant_spec import KEEP_FLOAT_KEY, SCHEME_NOTE_KEY
from graphquant.rewrites import FLOAT_PATH_SUM_KEY, bias_add_of

# On a layer node: the cluster ("lower", "middle", "upper") a split-quant part holds; parts are not split again.
SPLIT_PART_KEY = "graphquant.split_part"
CLUSTERS = ("lower", "middle", "upper")


def kmeans3_boundaries(values: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """Lloyd's 1-D k-means (k = 3) from the 1/6, 1/2, 5/6 quantiles: b1, b2 = midpoints of the sorted centroids.

    On sorted values each cluster is a contiguous run, so every step is two searchsorted calls and prefix sums:
    deterministic (no random start, no seed needed) and independent of the order of the values.
    """
    data = np.sort(values.ravel().astype(np.float64))
    prefix = np.concatenate([[0.0], np.cumsum(data)])
    centroids = np.quantile(data, [1 / 6, 1 / 2, 5 / 6])
    for _ in range(iterations):
        bounds = (centroids[:-1] + centroids[1:]) / 2
        inner = [np.searchsorted(data, bounds[0], "right"), np.searchsorted(data, bounds[1], "left")]
        cuts = np.array([0, *inner, data.size])
        counts = np.diff(cuts)
        sums = prefix[cuts[1:]] - prefix[cuts[:-1]]
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    bounds = (centroids[:-1] + centroids[1:]) / 2
    return float(bounds[0]), float(bounds[1])


def cluster_masks(values: np.ndarray, low: np.ndarray | float, high: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """Disjoint masks [v <= b1], [b1 < v < b2], [v >= b2] that cover every value."""
    lower = values <= low
    upper = (values >= high) & ~lower
    return lower, ~(lower | upper), upper


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """A layer's three masked weights (original layout) and biases (None where the part has no bias input)."""

    layer: Layer
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray | None, ...]
    cost: SplitCost


class SplitQuantPass(ir.passes.InPlacePass):
    """Exact: W = W_L + W_M + W_U by 1-D k-means (k = 3) on the weight values; three layers summed, own scales."""

    cli_name = "split-quant"

    def __init__(
        self,
        calibrator: Calibrator | None = None,
        *,
        wbits: int = 4,
        activation_chunks: int = 1,
        max_overhead: float = 0.10,
    ):
        super().__init__()
        if not 2 <= wbits <= 8 or activation_chunks < 1 or max_overhead < 0:
            raise ValueError("wbits must be in 2..8, activation_chunks >= 1 and max_overhead >= 0")
        self.calibrator = calibrator
        self.wbits = wbits
        self.activation_chunks = activation_chunks
        self.max_overhead = max_overhead

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Plan every eligible layer, keep the most useful ones within the MAC budget, and split them."""
        graph = model.graph
        layers = [
            layer
            for layer in splittable_layers(graph)
            if SPLIT_PART_KEY not in layer.node.meta and KEEP_FLOAT_KEY not in layer.node.meta
        ]
        stats = self._stats(model, layers)
        model_macs = model_layer_macs(graph)
        plans = [plan for layer in layers if (plan := self._plan(layer, stats, model_macs)) is not None]
        added, gains = [p.cost.added_macs for p in plans], [p.cost.gain_db for p in plans]
        chosen = affordable(plans, added, gains, self.max_overhead * model_macs)
        names = NameScope(graph)
        chunks: dict[ir.Value, list[tuple[ir.Value, np.ndarray | None]]] = {}
        for plan in chosen:
            _split(graph, names, plan, self._chunks(graph, names, plan.layer, stats, chunks))
            record_split(graph, plan.cost)
        return ir.passes.PassResult(model, modified=bool(chosen))

    def _stats(self, model: ir.Model, layers: list[Layer]) -> CalibrationStats:
        """Calibrated activation statistics of the MatMul/Gemm inputs, when a calibrator is given."""
        if self.calibrator is None:
            return CalibrationStats()
        names = [layer.activation.name or "" for layer in layers if layer.node.op_type != "Conv"]
        return self.calibrator.collect(model, names)

    def _plan(self, layer: Layer, stats: CalibrationStats, model_macs: int) -> SplitPlan | None:
        """The layer's three parts and their cost; None if the weight has fewer than two non-empty clusters."""
        weight = layer.weight_array
        low, high = _boundaries(layer)
        masks = cluster_masks(weight, low, high)
        if sum(bool(mask.any()) for mask in masks) < 2:
            return None
        parts = tuple(np.where(mask, weight, 0).astype(weight.dtype) for mask in masks)
        biases = _split_bias(layer, low, high)
        in_major = [np.moveaxis(w, layer.in_axis, 0) for w in (weight, *parts)]
        plain = per_channel_rtn(in_major[0], self.wbits)
        split = sum(per_channel_rtn(part, self.wbits) for part in in_major[1:])
        name = layer.activation.name or ""
        energy = stats[name].channel_mean_square() if name in stats and layer.node.op_type != "Conv" else None
        base = layer_cost(layer)
        cost = SplitCost(
            pass_name="split-quant",
            layer=layer.node.name or "",
            added_macs=2 * base.macs,
            added_params=2 * weight.size + sum(b.size for b in biases if b is not None) - _size(_bias_input(layer)),
            layer_macs=base.macs,
            layer_params=base.params,
            unit=base.unit,
            gain_db=sqnr_gain_db(in_major[0], plain, split, energy),
            model_macs=model_macs,
        )
        return SplitPlan(layer, parts, biases, cost)

    def _chunks(
        self,
        graph: ir.Graph,
        names: NameScope,
        layer: Layer,
        stats: CalibrationStats,
        made: dict[ir.Value, list[tuple[ir.Value, np.ndarray | None]]],
    ) -> list[tuple[ir.Value, np.ndarray | None]]:
        """The activation chunks the layer's parts read: (value, input channels), shared by the tensor's readers."""
        activation = layer.activation
        grouped = layer.node.op_type == "Conv" and layer.node.attributes.get_int("group", 1) != 1
        channels = layer.weight_array.shape[layer.in_axis]
        if self.activation_chunks == 1 or grouped or channels < self.activation_chunks:
            return [(activation, None)]
        if activation not in made:
            made[activation] = _gather_chunks(graph, names, layer, self._chunk_channels(layer, channels, stats))
        return made[activation]

    def _chunk_channels(self, layer: Layer, channels: int, stats: CalibrationStats) -> list[np.ndarray]:
        """Channels in equal chunks of similar calibrated range (contiguous chunks without calibration)."""
        name = layer.activation.name or ""
        order = np.arange(channels)
        if name in stats and layer.node.op_type != "Conv":
            order = np.argsort(stats[name].channel_absmax, kind="stable")
        return [np.sort(chunk) for chunk in np.array_split(order, self.activation_chunks)]


def _boundaries(layer: Layer) -> tuple[np.ndarray | float, np.ndarray | float]:
    """k-means boundaries over the whole weight (MatMul/Gemm) or per output kernel (Conv, broadcastable)."""
    weight = layer.weight_array
    if layer.node.op_type != "Conv":
        return kmeans3_boundaries(weight)
    pairs = np.array([kmeans3_boundaries(kernel) for kernel in weight])
    shape = (weight.shape[0],) + (1,) * (weight.ndim - 1)
    return pairs[:, 0].reshape(shape), pairs[:, 1].reshape(shape)


def _bias_input(layer: Layer) -> np.ndarray | None:
    """The constant per-output-channel bias the split divides (MatMul's bias Add, Gemm's 1-D C, Conv's B)."""
    node = layer.node
    if node.op_type == "MatMul":
        found = bias_add_of(node)
        return None if found is None else constant_array(found[0].inputs[found[1]])
    return constant_array(node.inputs[2]) if len(node.inputs) > 2 else None


def _split_bias(
    layer: Layer, low: np.ndarray | float, high: np.ndarray | float
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The bias divided by the same boundaries (all of it on the middle part if it is not one value per channel)."""
    bias = _bias_input(layer)
    if bias is None:
        return None, None, None
    channels = layer.weight_array.shape[layer.out_axis or 0]
    if bias.size != channels or (layer.node.op_type == "Gemm" and bias.ndim != 1):
        return None, bias, None
    flat = bias.reshape(-1)
    masks = cluster_masks(flat, np.reshape(low, -1), np.reshape(high, -1))
    return tuple(np.where(mask, flat, 0).astype(bias.dtype).reshape(bias.shape) for mask in masks)  # type: ignore[return-value]


def _size(array: np.ndarray | None) -> int:
    """Elements of an optional array."""
    return 0 if array is None else array.size


def _gather_chunks(
    graph: ir.Graph, names: NameScope, layer: Layer, chunks: list[np.ndarray]
) -> list[tuple[ir.Value, np.ndarray | None]]:
    """One Gather per chunk of the activation's channels (last axis; axis 1 for Conv), right after its producer."""
    activation = layer.activation
    stem = activation.name or "activation"
    axis = 1 if layer.node.op_type == "Conv" else -1
    nodes, made = [], []
    for number, channels in enumerate(chunks):
        index = add_initializer(graph, names, f"{stem}_chunk{number}_channels", channels.astype(np.int64))
        gather = ir.node("Gather", [activation, index], {"axis": axis}, name=names.fresh(f"{stem}_chunk{number}"))
        gather.outputs[0].name = names.fresh(f"{stem}_chunk{number}")
        gather.outputs[0].dtype = ir.DataType.FLOAT
        nodes.append(gather)
        made.append((gather.outputs[0], channels))
    insert_after_producer(graph, activation, nodes)
    return made


def _split(
    graph: ir.Graph, names: NameScope, plan: SplitPlan, chunks: list[tuple[ir.Value, np.ndarray | None]]
) -> None:
    """Replace the layer (and its bias Add) by one copy per cluster and chunk, summed into the original output."""
    layer = plan.layer
    node = layer.node
    bias_site = bias_add_of(node) if node.op_type == "MatMul" else None
    last = bias_site[0] if bias_site is not None else node
    output = last.outputs[0]
    built: list[ir.Node] = []
    for cluster, weight, bias in zip(CLUSTERS, plan.weights, plan.biases):
        for number, (activation, channels) in enumerate(chunks):
            part_weight = weight if channels is None else np.take(weight, channels, axis=layer.in_axis)
            label = cluster if channels is None else f"{cluster}_chunk{number}"
            built.extend(_part(graph, names, layer, activation, part_weight, bias if number == 0 else None, label))
    ends = [part.outputs[0] for part in built if _ends_part(part, built)]
    total = ir.node("Sum", ends, name=names.fresh(f"{node.name}_split_sum"))
    total.meta[FLOAT_PATH_SUM_KEY] = True
    result = total.outputs[0]
    result.type, result.shape = output.type, output.shape
    graph.insert_after(last, [*built, total])
    original_name = output.name
    output.replace_all_uses_with(result, replace_graph_outputs=True)
    output.name = names.fresh(f"{original_name or 'output'}_unsplit")
    result.name = original_name
    old_inputs = [value for victim in (node, last) for value in victim.inputs if value is not None]
    graph.remove(list(dict.fromkeys([last, node])), safe=True)
    for value in old_inputs:
        remove_if_unused(graph, value)


def _ends_part(node: ir.Node, built: list[ir.Node]) -> bool:
    """Whether the node's output is a part's final value (no other built node reads it)."""
    return not any(node.outputs[0] in other.inputs for other in built if other is not node)


def _part(
    graph: ir.Graph,
    names: NameScope,
    layer: Layer,
    activation: ir.Value,
    weight: np.ndarray,
    bias: np.ndarray | None,
    label: str,
) -> list[ir.Node]:
    """A copy of the layer reading ``activation`` with ``weight`` and ``bias`` (a bias Add for a MatMul)."""
    node = layer.node
    base = node.name or node.op_type.lower()
    inputs: list[ir.Value | None] = list(node.inputs)
    inputs[layer.activation_index] = activation
    inputs[layer.weight_index] = add_initializer(graph, names, f"{layer.weight.name or 'weight'}_{label}", weight)
    if node.op_type != "MatMul" and len(inputs) > 2:
        inputs[2] = None if bias is None else add_initializer(graph, names, f"{base}_bias_{label}", bias)
        while inputs and inputs[-1] is None:
            inputs.pop()
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    copy = ir.node(node.op_type, inputs, attributes, domain=node.domain, name=names.fresh(f"{base}_split_{label}"))
    copy.meta[SPLIT_PART_KEY] = label
    note = node.meta.get(SCHEME_NOTE_KEY)
    copy.meta[SCHEME_NOTE_KEY] = f"SplitQuant {label} part" + (f"; {note}" if note else "")
    copy.outputs[0].name = names.fresh(f"{base}_split_{label}_out")
    copy.outputs[0].dtype = ir.DataType.FLOAT
    if node.op_type != "MatMul" or bias is None:
        return [copy]
    bias_value = add_initializer(graph, names, f"{base}_bias_{label}", bias)
    add = ir.node("Add", [copy.outputs[0], bias_value], name=names.fresh(f"{base}_split_{label}_bias"))
    add.outputs[0].name = names.fresh(f"{base}_split_{label}_biased")
    add.outputs[0].dtype = ir.DataType.FLOAT
    return [copy, add]
