"""Outlier channel splitting (exact): duplicate the input channels with the largest weight rows, halving both copies."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.cost import (
    SplitCost,
    affordable,
    gain_db,
    layer_cost,
    model_layer_macs,
    per_channel_rtn,
    record_split,
    splittable_layers,
    weighted_noise,
)
from graphquant.analysis.layers import Layer, ScaleGroup, scale_groups
from graphquant.analysis.stats import CalibrationStats
from graphquant.graph_edit import NameScope, add_initializer, insert_after_producer, remove_if_unused
from graphquant.quant_spec import KEEP_FLOAT_KEY, PREEXECUTED_KEY, SCHEME_NOTE_KEY

# On an activation value: the channel-expanded X' = concat(X, X[:, dup]) that OCS made (not expanded again).
OCS_KEY = "graphquant.ocs_expanded"


@dataclasses.dataclass(frozen=True)
class OcsPlan:
    """A scale group's duplicated channels and each layer's expanded weight (original layout) and cost."""

    group: ScaleGroup
    duplicates: np.ndarray
    weights: tuple[np.ndarray, ...]
    costs: tuple[SplitCost, ...]
    gain_db: float


class OcsPass(ir.passes.InPlacePass):
    """Exact: X' = [X, X[:, dup]], W' = [W with rows dup halved; the halved rows], so X'·W' = X·W."""

    cli_name = "ocs"

    def __init__(
        self,
        calibrator: Calibrator | None = None,
        *,
        expand_ratio: float = 0.05,
        grid_aware: bool = False,
        wbits: int = 8,
        max_overhead: float = 0.10,
    ):
        super().__init__()
        if not 0 < expand_ratio <= 1 or not 2 <= wbits <= 8 or max_overhead < 0:
            raise ValueError("expand_ratio must be in (0, 1], wbits in 2..8 and max_overhead >= 0")
        self.calibrator = calibrator
        self.expand_ratio = expand_ratio
        self.grid_aware = grid_aware
        self.wbits = wbits
        self.max_overhead = max_overhead

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Plan every eligible group, keep the most useful ones within the MAC budget, and expand them."""
        graph = model.graph
        groups = _eligible_groups(graph)
        stats = self._stats(model, groups)
        model_macs = model_layer_macs(graph)
        plans = [self._plan(group, stats, model_macs) for group in groups]
        added = [sum(cost.added_macs for cost in plan.costs) for plan in plans]
        chosen = affordable(plans, added, [plan.gain_db for plan in plans], self.max_overhead * model_macs)
        names = NameScope(graph)
        for plan in chosen:
            _expand(graph, names, plan)
            for cost in plan.costs:
                record_split(graph, cost)
        return ir.passes.PassResult(model, modified=bool(chosen))

    def _stats(self, model: ir.Model, groups: list[ScaleGroup]) -> CalibrationStats:
        """Calibrated statistics of the MatMul/Gemm groups' activations, when a calibrator is given."""
        if self.calibrator is None:
            return CalibrationStats()
        names = [group.activation.name or "" for group in groups if group.layers[0].node.op_type != "Conv"]
        return self.calibrator.collect(model, names)

    def _plan(self, group: ScaleGroup, stats: CalibrationStats, model_macs: int) -> OcsPlan:
        """Choose the duplicated channels, build the expanded weights and price them."""
        in_major = [np.moveaxis(layer.weight_array, layer.in_axis, 0) for layer in group.layers]
        channels = in_major[0].shape[0]
        count = math.ceil(self.expand_ratio * channels)
        row_magnitude = np.max([np.abs(w.reshape(channels, -1)).max(axis=1) for w in in_major], axis=0)
        if self.grid_aware:
            duplicates = np.sort(np.argsort(-row_magnitude, kind="stable")[:count])
            expanded = [grid_aware_split(w, duplicates, self.wbits) for w in in_major]
        else:
            sources, factors = halving_plan(row_magnitude, count)
            duplicates = sources[channels:]
            expanded = [w[sources] * factors.reshape((-1,) + (1,) * (w.ndim - 1)) for w in in_major]
        name = group.activation.name or ""
        energy = stats[name].channel_mean_square() if name in stats else None
        costs, plain_total, split_total = [], 0.0, 0.0
        for layer, weight, new_weight in zip(group.layers, in_major, expanded):
            plain = weighted_noise(weight, per_channel_rtn(weight, self.wbits), energy)
            split = weighted_noise(weight, fold_duplicates(per_channel_rtn(new_weight, self.wbits), duplicates), energy)
            plain_total, split_total = plain_total + plain, split_total + split
            costs.append(_cost(layer, duplicates.size / channels, gain_db(plain, split), model_macs))
        weights = tuple(
            np.ascontiguousarray(np.moveaxis(w, 0, layer.in_axis)).astype(layer.weight_array.dtype)
            for layer, w in zip(group.layers, expanded)
        )
        return OcsPlan(group, duplicates, weights, tuple(costs), gain_db(plain_total, split_total))


def halving_plan(row_magnitude: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` times: halve the row with the largest magnitude and append its copy (DESIGN's OCS loop).

    Returns each row's source channel and factor; the first C rows are the original channels.
    """
    sources = list(range(row_magnitude.size))
    factors = [1.0] * row_magnitude.size
    magnitudes = list(row_magnitude.astype(np.float64))
    for _ in range(count):
        row = int(np.argmax(magnitudes))
        factors[row] /= 2
        magnitudes[row] /= 2
        sources.append(sources[row])
        factors.append(factors[row])
        magnitudes.append(magnitudes[row])
    return np.array(sources, np.int64), np.array(factors, np.float64)


def grid_aware_step(weight: np.ndarray, duplicates: np.ndarray, bits: int) -> np.ndarray:
    """Per output channel (axis 1), the symmetric step Δ that quantize will derive from the grid-aware split weight.

    The split rows reach |w|/2 + Δ/4 and the others keep |w|, so Δ = max(M_rest / qmax, M_split / (2·qmax - 1/2))
    is the fixed point Δ = max|W'| / qmax.
    """
    qmax = 2 ** (bits - 1) - 1
    reduce_axes = tuple(axis for axis in range(weight.ndim) if axis != 1)
    magnitude = np.abs(weight.astype(np.float64))
    rest = np.delete(magnitude, duplicates, axis=0)
    rest_max = rest.max(axis=reduce_axes) if rest.size else np.zeros(weight.shape[1])
    split_max = magnitude[duplicates].max(axis=reduce_axes)
    return np.maximum(rest_max / qmax, split_max / (2 * qmax - 0.5))


def grid_aware_split(weight: np.ndarray, duplicates: np.ndarray, bits: int) -> np.ndarray:
    """Quantization-aware OCS on [C_in, C_out, ...] weights: rows dup become w/2 - Δ/4, their copies w/2 + Δ/4.

    The two halves still sum to w exactly; on the grid, round(u/2 - 1/4) + round(u/2 + 1/4) tracks round(u), u = w/Δ.
    """
    step = grid_aware_step(weight, duplicates, bits)
    quarter = (step / 4).reshape((1, -1) + (1,) * (weight.ndim - 2))
    halves = weight[duplicates].astype(np.float64) / 2
    expanded = np.concatenate([weight.astype(np.float64), halves + quarter])
    expanded[duplicates] = halves - quarter
    return expanded


def fold_duplicates(expanded: np.ndarray, duplicates: np.ndarray) -> np.ndarray:
    """The effective [C_in, ...] weight of an expanded one: each appended row added back onto its source channel."""
    channels = expanded.shape[0] - duplicates.size
    folded = expanded[:channels].copy()
    np.add.at(folded, duplicates, expanded[channels:])
    return folded


def _eligible_groups(graph: ir.Graph) -> list[ScaleGroup]:
    """Groups of all-MatMul/Gemm or all-Conv (group 1) layers whose activation OCS has not expanded yet."""
    layers = [
        layer
        for layer in splittable_layers(graph)
        if KEEP_FLOAT_KEY not in layer.node.meta and OCS_KEY not in layer.activation.meta
    ]
    groups = []
    for group in scale_groups(layers):
        convolutions = {layer.node.op_type == "Conv" for layer in group.layers}
        grouped = any(layer.node.attributes.get_int("group", 1) != 1 for layer in group.layers)
        if len(convolutions) == 1 and not grouped:
            groups.append(group)
    return groups


def _cost(layer: Layer, fraction: float, gain: float, model_macs: int) -> SplitCost:
    """The added MACs and parameters of ``fraction`` more input channels on one layer."""
    base = layer_cost(layer)
    weight = layer.weight_array
    return SplitCost(
        pass_name="ocs",
        layer=layer.node.name or "",
        added_macs=round(base.macs * fraction),
        added_params=round(weight.size * fraction),
        layer_macs=base.macs,
        layer_params=base.params,
        unit=base.unit,
        gain_db=gain,
        model_macs=model_macs,
    )


def _expand(graph: ir.Graph, names: NameScope, plan: OcsPlan) -> None:
    """Insert X' = Concat(X, Gather(X, dup)) on the channel axis and point the group's layers at X' and W'."""
    activation = plan.group.activation
    stem = activation.name or "activation"
    axis = 1 if plan.group.layers[0].node.op_type == "Conv" else -1
    index = add_initializer(graph, names, f"{stem}_ocs_channels", plan.duplicates.astype(np.int64))
    gather = ir.node("Gather", [activation, index], {"axis": axis}, name=names.fresh(f"{stem}_ocs_gather"))
    gather.outputs[0].name = names.fresh(f"{stem}_ocs_duplicates")
    gather.outputs[0].dtype = ir.DataType.FLOAT
    concat = ir.node("Concat", [activation, gather.outputs[0]], {"axis": axis}, name=names.fresh(f"{stem}_ocs_concat"))
    expanded = concat.outputs[0]
    expanded.name = names.fresh(f"{stem}_ocs")
    expanded.dtype = ir.DataType.FLOAT
    expanded.meta[OCS_KEY] = True
    if PREEXECUTED_KEY in activation.meta:  # duplicated channels keep their pre-executed step of 1
        expanded.meta[PREEXECUTED_KEY] = activation.meta[PREEXECUTED_KEY]
    insert_after_producer(graph, activation, [gather, concat])
    note = f"OCS: {plan.duplicates.size} duplicated input channels"
    for layer, weight in zip(plan.group.layers, plan.weights):
        old = layer.weight
        layer.node.replace_input_with(layer.activation_index, expanded)
        layer.node.replace_input_with(
            layer.weight_index, add_initializer(graph, names, f"{old.name or 'weight'}_ocs", weight)
        )
        remove_if_unused(graph, old)
        existing = layer.node.meta.get(SCHEME_NOTE_KEY)
        layer.node.meta[SCHEME_NOTE_KEY] = note + (f"; {existing}" if existing else "")
