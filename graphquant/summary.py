"""Model summaries for `graphquant inspect`: op histogram, quantizable layers, activation outliers."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import candidates

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


def activation_summaries(model: ir.Model, calibrator: Calibrator) -> list[ActivationSummary]:
    """Per quantizable layer: its input's range and how many channels are outliers."""
    layers = [c.layer for c in candidates(model.graph) if c.layer is not None]
    stats = calibrator.collect(model, [layer.activation.name or "" for layer in layers])
    summaries = []
    for layer in layers:
        tensor = layer.activation.name or ""
        if tensor not in stats:
            continue
        absmax = stats[tensor].channel_absmax
        median = float(np.median(absmax))
        summaries.append(
            ActivationSummary(
                layer=layer.node.name or "",
                tensor=tensor,
                minimum=stats[tensor].minimum,
                maximum=stats[tensor].maximum,
                median_channel_absmax=median,
                outlier_channels=int(np.count_nonzero(absmax > OUTLIER_RATIO * median)),
                channels=int(absmax.size),
                spread=float(absmax.max() / median) if median > 0 else float("inf"),
            )
        )
    return summaries
