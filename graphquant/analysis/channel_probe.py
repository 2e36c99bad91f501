"""Per-channel (axis 1) reductions of NCHW tensors over calibration data, computed inside onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.stats import TensorStats
from graphquant.graph_edit import NameScope, add_initializer

REDUCTIONS = ("ReduceMax", "ReduceMin", "ReduceMean")


def channel_reductions(
    calibrator: Calibrator, model: ir.Model, ranks: Mapping[str, int], reductions: Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
    """For each named value (name -> its rank, at least 2): every reduction over all axes but 1, over all batches.

    The calibrator reduces over every axis but the last, so each value is first reduced in the graph (on a clone) to
    one vector per batch: max of maxima, min of minima, and the mean of the per-batch means.
    """
    unknown = sorted(set(reductions) - set(REDUCTIONS))
    if unknown:
        raise ValueError(f"unknown reductions {unknown} (known: {REDUCTIONS})")
    probe = model.clone()
    values = values_by_name(probe.graph)
    names_scope = NameScope(probe.graph)
    outputs: dict[tuple[str, str], str] = {}
    for name, rank in ranks.items():
        value = values.get(name)
        if value is None or rank < 2:
            continue
        for reduction in reductions:
            outputs[(name, reduction)] = append_reduction(probe, names_scope, value, rank, reduction)
    stats = calibrator.collect(probe, list(outputs.values()))
    result: dict[str, dict[str, np.ndarray]] = {}
    for (name, reduction), output in outputs.items():
        result.setdefault(name, {})[reduction] = combined(stats[output], reduction)
    return result


def values_by_name(graph: ir.Graph) -> Mapping[str, ir.Value]:
    """Every graph input and node output of the main graph, by name."""
    values = {value.name or "": value for value in graph.inputs}
    values.update({value.name or "": value for node in graph for value in node.outputs})
    return values


def append_reduction(model: ir.Model, names: NameScope, value: ir.Value, rank: int, reduction: str) -> str:
    """Append ``reduction`` of ``value`` over all axes but 1 (keepdims 0) to the graph; the output's name."""
    axes = [axis for axis in range(rank) if axis != 1]
    base = f"{value.name}_{reduction}"
    if model.graph.opset_imports.get("", 0) >= 18:
        axes_value = add_initializer(model.graph, names, f"{base}_axes", np.array(axes, np.int64))
        node = ir.node(reduction, [value, axes_value], {"keepdims": 0}, name=names.fresh(base))
    else:
        node = ir.node(reduction, [value], {"axes": axes, "keepdims": 0}, name=names.fresh(base))
    node.outputs[0].name = names.fresh(base)
    model.graph.append(node)
    return node.outputs[0].name


def combined(stats: TensorStats, reduction: str) -> np.ndarray:
    """One vector from the per-batch vectors: their max, min or mean (each batch weighs the same)."""
    if reduction == "ReduceMax":
        return stats.channel_max
    if reduction == "ReduceMin":
        return stats.channel_min
    assert stats.channel_sum is not None
    return stats.channel_sum / stats.count
