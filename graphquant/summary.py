"""Model summaries for `graphquant inspect`: op histogram, quantizable layers, activation outliers."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import Layer, candidates

# A channel is an outlier when its max |x| exceeds this multiple of the median channel's.
OUTLIER_RATIO = 6.0


@dataclasses.dataclass(frozen=True)
class ActivationSummary:
    """Range and outlier channels of one layer's input activation."""

    layer: str
    tensor: str
    minimum: float
    maximum: float
    median_channel_absmax: float
    outlier_channels: int
    channels: int
    spread: float


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Count of nodes per op type (domain-qualified outside the default domain), subgraphs included."""
    counts: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return dict(counts.most_common())


def layer_table(model: ir.Model) -> list[tuple[str, str, str]]:
    """(node, op type, 'quantizable' or the reason it is not) for each MatMul/Gemm/Conv."""
    return [
        (c.node.name or "", c.node.op_type, "quantizable" if c.layer is not None else c.reason)
        for c in candidates(model.graph)
    ]


def graph_inputs(model: ir.Model) -> list[tuple[str, str, str]]:
    """(name, numpy dtype, shape) of each graph input a feed must give (initializers listed as inputs left out)."""
    rows = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy().name if value.dtype is not None else "?"
        shape = "?" if value.shape is None else f"[{', '.join(_dim(dim) for dim in value.shape)}]"
        rows.append((value.name or "", dtype, shape))
    return rows


def _dim(dim: int | ir.SymbolicDim) -> str:
    """A dim as printed: its size, its symbolic name, or '?'."""
    if isinstance(dim, int):
        return str(dim)
    return dim.value or "?"


def activation_summaries(model: ir.Model, calibrator: Calibrator) -> list[ActivationSummary]:
    """Per quantizable layer: its input's range and how many channels are outliers.

    The channels of a Conv/ConvTranspose input are on axis 1 (NCHW); the statistics reduce over every axis but the
    last, so those inputs are collected through a Transpose to channels-last, on a copy of the model.
    """
    probe = model.clone()
    layers = [c.layer for c in candidates(probe.graph) if c.layer is not None]
    tensors = [_channels_last(probe.graph, layer) for layer in layers]
    stats = calibrator.collect(probe, tensors)
    summaries = []
    for layer, tensor in zip(layers, tensors):
        if tensor not in stats:
            continue
        absmax = stats[tensor].channel_absmax
        median = float(np.median(absmax))
        summaries.append(
            ActivationSummary(
                layer=layer.node.name or "",
                tensor=layer.activation.name or "",
                minimum=stats[tensor].minimum,
                maximum=stats[tensor].maximum,
                median_channel_absmax=median,
                outlier_channels=int(np.count_nonzero(absmax > OUTLIER_RATIO * median)),
                channels=int(absmax.size),
                spread=float(absmax.max() / median) if median > 0 else float("inf"),
            )
        )
    return summaries


def _channels_last(graph: ir.Graph, layer: Layer) -> str:
    """The name of a tensor holding the layer's input with its channels on the last axis (a Transpose for Conv)."""
    activation = layer.activation
    if layer.node.op_type not in ("Conv", "ConvTranspose"):
        return activation.name or ""
    weight = layer.weight.const_value
    assert weight is not None
    rank = len(weight.shape)  # a Conv input has the rank of its weight (read without loading the weight's data)
    transpose = ir.node(
        "Transpose", [activation], {"perm": [0, *range(2, rank), 1]}, name=f"{layer.node.name}/channels_last"
    )
    transpose.outputs[0].name = f"{activation.name}/{layer.node.name}/channels_last"
    graph.append(transpose)
    return transpose.outputs[0].name or ""
