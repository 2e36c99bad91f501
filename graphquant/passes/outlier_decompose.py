"""Outlier decomposition (exact, LLM.int8() static mode): input channels past a threshold go to a float MatMul."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import ScaleGroup
from graphquant.graph_edit import NameScope
from graphquant.passes._calibrated import CalibratedGroupPass
from graphquant.quant_spec import SCHEME_NOTE_KEY
from graphquant.rewrites import apply_channel_affine, route_channels_to_float

DECOMPOSED_KEY = "graphquant.decomposed"


class OutlierDecomposePass(CalibratedGroupPass):
    """Exact: Y = X[:, O]·W[O, :] in float + X_rest·W_rest, O = {j : calibrated max|X_j| >= threshold}."""

    cli_name = "outlier-decompose"
    done_key = DECOMPOSED_KEY

    def __init__(self, calibrator: Calibrator | None = None, *, threshold: float = 6.0, max_fraction: float = 0.1):
        super().__init__(calibrator)
        if threshold <= 0 or not 0 < max_fraction <= 1:
            raise ValueError("threshold must be positive and max_fraction in (0, 1]")
        self.threshold = threshold
        self.max_fraction = max_fraction

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Route each group's outlier channels to float and zero them on the quantized path."""
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for group, stats in self.pending_groups(model):
            outliers = self._outlier_channels(stats.channel_absmax)
            if outliers.size:
                _decompose(graph, names, group, outliers)
                modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _outlier_channels(self, absmax: np.ndarray) -> np.ndarray:
        """Channels at or past the threshold, widest first, at most max_fraction of them, in index order."""
        limit = int(self.max_fraction * absmax.size)
        widest = np.argsort(-absmax, kind="stable")[:limit]
        return np.sort(widest[absmax[widest] >= self.threshold])


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
