"""Outlier decomposition (exact, LLM.int8()): input channels past a threshold go to a float MatMul."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.cost import SplitCost, affordable, layer_cost, model_layer_macs, record_split
from graphquant.analysis.layers import ScaleGroup
from graphquant.analysis.simulate import GroupSimulator, weight_matrix
from graphquant.analysis.stats import TensorStats
from graphquant.graph_edit import NameScope, add_initializer, insert_after_producer
from graphquant.passes._calibrated import CalibratedGroupPass
from graphquant.quant_spec import KEEP_FLOAT_KEY, SCHEME_NOTE_KEY
from graphquant.rewrites import add_to_layer_output, apply_channel_affine, route_channels_to_float

DECOMPOSED_KEY = "graphquant.decomposed"
MODES = ("static", "dynamic")
# Rows sampled per group to simulate the int8 error with and without the float path (for the MAC budget's ranking).
SAMPLE_ROWS = 512
INT8 = 8


class OutlierDecomposePass(CalibratedGroupPass):
    """Exact: Y = X[:, O]·W[O, :] in float + X_rest·W_rest, O = {j : max|X_j| >= threshold}, calibrated or per batch."""

    cli_name = "outlier-decompose"
    done_key = DECOMPOSED_KEY

    def __init__(
        self,
        calibrator: Calibrator | None = None,
        *,
        threshold: float = 6.0,
        max_fraction: float = 0.1,
        mode: str = "static",
        max_overhead: float = 0.10,
    ):
        super().__init__(calibrator)
        if threshold <= 0 or not 0 < max_fraction <= 1 or max_overhead < 0:
            raise ValueError("threshold must be positive, max_fraction in (0, 1] and max_overhead >= 0")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.threshold = threshold
        self.max_fraction = max_fraction
        self.mode = mode
        self.max_overhead = max_overhead

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Route each group's outlier channels to float (within the MAC budget) and zero them on the quantized path."""
        graph = model.graph
        names = NameScope(graph)
        model_macs = model_layer_macs(graph)
        plans = []
        for group, stats in self.pending_groups(model, sample_rows=SAMPLE_ROWS):
            outliers = self._outlier_channels(stats.channel_absmax)
            if outliers.size or self.mode == "dynamic":  # per batch, any channel may turn out to be an outlier
                plans.append((group, outliers, _costs(group, outliers, stats, model_macs)))
        added = [sum(cost.added_macs for cost in costs) for _, _, costs in plans]
        gains = [costs[0].gain_db for _, _, costs in plans]
        chosen = affordable(plans, added, gains, self.max_overhead * model_macs)
        # Last group first: the float path's Add takes over a layer's output, which a later group may read as its
        # activation; rewriting the later group first keeps its activation value current (as in symmetrize).
        for group, outliers, costs in reversed(chosen):
            if self.mode == "static":
                _decompose(graph, names, group, outliers)
            else:
                _decompose_per_batch(graph, names, group, self.threshold, outliers)
            for cost in costs:
                record_split(graph, cost)
        return ir.passes.PassResult(model, modified=bool(chosen))

    def _outlier_channels(self, absmax: np.ndarray) -> np.ndarray:
        """Channels at or past the threshold, widest first, at most max_fraction of them (static), in index order."""
        reached = np.flatnonzero(absmax >= self.threshold)
        if self.mode == "dynamic":
            return reached
        limit = int(self.max_fraction * absmax.size)
        widest = np.argsort(-absmax, kind="stable")[:limit]
        return np.sort(widest[absmax[widest] >= self.threshold])


def _costs(group: ScaleGroup, outliers: np.ndarray, stats: TensorStats, model_macs: int) -> list[SplitCost]:
    """The float path's MACs and parameters per layer, and the group's simulated int8 SQNR gain from it."""
    rows = stats.sample
    assert rows is not None, "pending_groups was asked for sample rows"
    ones = np.ones(rows.shape[1])
    simulator = GroupSimulator(rows, group.layers)
    gain = simulator.sqnr_db(ones, INT8, INT8, float_channels=outliers) - simulator.sqnr_db(ones, INT8, INT8)
    costs = []
    for layer in group.layers:
        base = layer_cost(layer)
        columns = weight_matrix(layer).shape[1]
        costs.append(
            SplitCost(
                pass_name="outlier-decompose",
                layer=layer.node.name or "",
                added_macs=outliers.size * columns,
                added_params=outliers.size * columns,
                layer_macs=base.macs,
                layer_params=base.params,
                unit=base.unit,
                gain_db=gain,
                model_macs=model_macs,
            )
        )
    return costs


def _decompose(graph: ir.Graph, names: NameScope, group: ScaleGroup, outliers: np.ndarray) -> None:
    """Add the float path, mask the channels on the int path, and note the float share of multiply-adds."""
    channels = group.layers[0].weight_array.shape[group.layers[0].in_axis]
    route_channels_to_float(graph, names, group.activation, group.layers, outliers)
    mask = np.ones(channels, np.float32)
    mask[outliers] = 0
    readers = [layer.node for layer in group.layers]
    masked, _ = apply_channel_affine(graph, names, group.activation, readers, mask, np.zeros_like(mask))
    masked.meta[DECOMPOSED_KEY] = True
    note = f"LLM.int8(): {outliers.size} of {channels} input channels in float ({outliers.size / channels:.1%} of MACs)"
    for layer in group.layers:
        layer.node.meta[SCHEME_NOTE_KEY] = note


def _decompose_per_batch(
    graph: ir.Graph, names: NameScope, group: ScaleGroup, threshold: float, calibrated: np.ndarray
) -> None:
    """LLM.int8() as in the paper: O = {j : max|X_j| over this batch >= threshold}, found at run time.

    O = NonZero(ReduceMax(|X| reshaped to [rows, C], axis 0) >= t); the float path is Gather(X, O)·Gather(W, O), and
    the int path reads Where(j in O, 0, X), so its calibrated range stays below the threshold.
    """
    activation = group.activation
    stem = activation.name or "activation"
    channels = group.layers[0].weight_array.shape[group.layers[0].in_axis]
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs: list[ir.Value], suffix: str, **attributes: object) -> ir.Value:
        node = ir.node(op_type, inputs, attributes, name=names.fresh(f"{stem}_{suffix}"))
        node.outputs[0].name = names.fresh(f"{stem}_{suffix}")
        nodes.append(node)
        return node.outputs[0]

    rows = op("Reshape", [op("Abs", [activation], "abs"), _constant(graph, names, stem, [-1, channels])], "rows")
    if graph.opset_imports.get("", 0) >= 18:  # ReduceMax's axes moved from an attribute to an input in opset 18
        reduced = op("ReduceMax", [rows, _constant(graph, names, stem, [0])], "channel_absmax", keepdims=0)
    else:
        reduced = op("ReduceMax", [rows], "channel_absmax", axes=[0], keepdims=0)
    flags = op("GreaterOrEqual", [reduced, _constant(graph, names, stem, threshold, np.float32)], "is_outlier")
    found = op("Reshape", [op("NonZero", [flags], "outlier_found"), _constant(graph, names, stem, [-1])], "outliers")
    gathered = op("Gather", [activation, found], "outlier_values", axis=-1)
    int_path = op("Where", [flags, _constant(graph, names, stem, 0.0, np.float32), activation], "int_path")
    int_path.meta[DECOMPOSED_KEY] = True
    for value in (gathered, int_path):
        value.dtype = ir.DataType.FLOAT
    float_paths = []
    for layer in group.layers:
        base = layer.node.name or "layer"
        alpha = layer.node.attributes.get_float("alpha", 1.0) if layer.node.op_type == "Gemm" else 1.0
        rows_array = np.ascontiguousarray(alpha * weight_matrix(layer)).astype(np.float32)
        weight = add_initializer(graph, names, f"{base}_float_path_rows", rows_array)
        rows_of_w = op("Gather", [weight, found], f"{base}_float_rows", axis=0)
        matmul_out = op("MatMul", [gathered, rows_of_w], f"{base}_float_path")
        nodes[-1].meta[KEEP_FLOAT_KEY] = f"per-batch float path of the outlier channels of {base}"
        float_paths.append((layer, matmul_out))
    insert_after_producer(graph, activation, nodes)
    for layer, extra in float_paths:
        layer.node.replace_input_with(layer.activation_index, int_path)
        add_to_layer_output(graph, names, layer, extra)
        layer.node.meta[SCHEME_NOTE_KEY] = (
            f"LLM.int8() per batch: channels with max|x| >= {threshold:g} in float "
            f"({calibrated.size} of {channels}, {calibrated.size / channels:.1%} of MACs, reached it in calibration)"
        )


def _constant(
    graph: ir.Graph, names: NameScope, stem: str, value: object, dtype: type[np.generic] = np.int64
) -> ir.Value:
    """A small constant initializer."""
    return add_initializer(graph, names, f"{stem}_constant", np.asarray(value, dtype=dtype))
