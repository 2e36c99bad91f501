"""Symmetrize pass (exact): center each activation channel on zero, moving the shift into the biases."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import ScaleGroup
from graphquant.analysis.stats import TensorStats
from graphquant.graph_edit import NameScope
from graphquant.passes._calibrated import GROUP_SAMPLE_ROWS, CalibratedGroupPass
from graphquant.rewrites import add_to_layer_bias, apply_channel_affine, weight_times

SHIFT_KEY = "graphquant.shift"


class SymmetrizePass(CalibratedGroupPass):
    """Exact: X~ = X - z, z the calibrated channel midpoint where it lowers E[x^2]; each layer's bias gains z·W."""

    cli_name = "symmetrize"
    done_key = SHIFT_KEY

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Shift every MatMul/Gemm scale group whose channels are off-centre."""
        graph = model.graph
        names = NameScope(graph)
        modified = False
        # Last group first: a bias Add inserted after an earlier group's layer takes over that layer's output,
        # which a later group may read; rewriting the later group first keeps its activation value current.
        rewritten = []
        for group, channel_stats in reversed(self.pending_groups(model, sample_rows=GROUP_SAMPLE_ROWS)):
            midpoint = useful_shift(channel_stats)
            shifted = bool(np.any(midpoint)) and _shift_group(graph, names, group, midpoint)
            rewritten.append((group, _shifted_stats(channel_stats, midpoint) if shifted else channel_stats))
            modified |= shifted
        self.record_rewritten(model, rewritten)
        return ir.passes.PassResult(model, modified=modified)


def useful_shift(stats: TensorStats) -> np.ndarray:
    """The channel midpoints, kept only where the shift does not raise the channel's mean square.

    A one-sided sparse channel (a GELU output, say) would otherwise turn mostly-zero values into
    large ones everywhere, which the weight quantization error then multiplies.
    """
    with np.errstate(invalid="ignore"):  # -inf + inf in a channel that only ever held NaN/Inf
        midpoint = (stats.channel_min + stats.channel_max) / 2
    midpoint = np.where(np.isfinite(midpoint), midpoint, 0.0)
    helps = stats.channel_mean_square_after_shift(midpoint) < stats.channel_mean_square_after_shift(
        np.zeros_like(midpoint)
    )
    return np.where(helps, midpoint, 0.0).astype(np.float32)


def _shifted_stats(stats: TensorStats, midpoint: np.ndarray) -> TensorStats:
    """The statistics of X - z, for preexecute-dequant: it reads their ranges and sample, not their histogram."""
    return stats.affine(np.ones_like(midpoint), -midpoint, histogram=False)


def _shift_group(graph: ir.Graph, names: NameScope, group: ScaleGroup, midpoint: np.ndarray) -> bool:
    """Subtract the midpoint where the activation is made and add z·W to each layer's bias."""
    if not all(layer.node.op_type == "MatMul" or _gemm_bias_adjustable(layer.node) for layer in group.layers):
        return False
    for layer in group.layers:
        add_to_layer_bias(graph, names, layer, weight_times(layer, midpoint).astype(np.float32))
    readers = [layer.node for layer in group.layers]
    shifted, _ = apply_channel_affine(graph, names, group.activation, readers, np.ones_like(midpoint), -midpoint)
    shifted.meta[SHIFT_KEY] = midpoint
    return True


def _gemm_bias_adjustable(node: ir.Node) -> bool:
    """A Gemm whose bias can take z·W: alpha = beta = 1 and a constant (or absent) C."""
    attributes = node.attributes
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return (
        attributes.get_float("alpha", 1.0) == 1.0
        and attributes.get_float("beta", 1.0) == 1.0
        and (bias is None or bias.const_value is not None)
    )
