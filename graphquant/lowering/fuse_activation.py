"""Fuse-activation lowering (exact): drop a Relu/Clip whose every reader quantizes its output with a saturating grid."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import constant_array
from graphquant.graph_edit import remove_if_unused
from graphquant.quant_spec import CHANNEL_BOUND_KEY, INPUT_SPECS_KEY, QuantSpec


class FuseActivationPass(ir.passes.InPlacePass):
    """Exact: Relu(x), Clip(x, 0, c) and a per-channel Min(x, c) are dropped where QuantizeLinear's saturation computes them.

    A per-tensor unsigned grid with zero point 0 maps every x <= 0 to code 0, as Relu does. Above, codes saturate at
    qmax, so Clip's upper bound c is redundant when every x >= c gets code qmax: round(c / scale) >= qmax.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewire the readers of each redundant activation to its input and remove it."""
        graph = model.graph
        modified = False
        for node in reversed(list(graph)):  # readers first, so that Relu -> Min (equalize-convs) both go
            upper = _activation_bound(node)
            if upper is None or not _readers_saturate(node.outputs[0], upper):
                continue
            source = node.inputs[0]
            assert source is not None
            for user, index in list(node.outputs[0].uses()):
                user.replace_input_with(index, source)
            bounds = [value for value in node.inputs[1:] if value is not None]
            graph.remove(node, safe=True)
            for value in bounds:
                remove_if_unused(graph, value)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _activation_bound(node: ir.Node) -> float | None:
    """The upper bound of a Relu (inf) or of a Clip whose lower bound is exactly 0; None for anything else."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Relu", "Clip", "Min"):
        return None
    if not node.inputs or node.inputs[0] is None:
        return None
    if node.op_type == "Relu":
        return float("inf")
    if (
        node.op_type == "Min"
        and CHANNEL_BOUND_KEY in node.meta
        and len(node.inputs) == 2
        and (bound := constant_array(node.inputs[1])) is not None
    ):
        return float(bound.min())  # Min(x, b) changes only x > b (per-channel bounds from equalize-convs)
    if node.op_type != "Clip":
        return None
    if "min" in node.attributes or "max" in node.attributes:  # opset < 11 keeps the bounds in attributes
        low, high = node.attributes.get_float("min", -np.inf), node.attributes.get_float("max", np.inf)
    else:
        low_value = node.inputs[1] if len(node.inputs) > 1 else None
        high_value = node.inputs[2] if len(node.inputs) > 2 else None
        low_array = np.asarray(-np.inf) if low_value is None else constant_array(low_value)
        high_array = np.asarray(np.inf) if high_value is None else constant_array(high_value)
        if low_array is None or high_array is None:
            return None
        low, high = float(low_array), float(high_array)
    return high if low == 0.0 else None


def _readers_saturate(output: ir.Value, upper: float) -> bool:
    """Whether every reader quantizes ``output`` on a per-tensor unsigned grid from 0 whose top code covers upper."""
    uses = list(output.uses())
    if not uses or output.is_graph_output():
        return False
    for user, index in uses:
        spec: QuantSpec | None = user.meta.get(INPUT_SPECS_KEY, {}).get(index)
        if spec is None or spec.signed or spec.axis is not None or int(spec.zero_point) != 0:
            return False
        # QuantizeLinear divides in float32 and rounds half to even.
        if upper != float("inf") and np.rint(np.float32(upper) / spec.scale.astype(np.float32)) < spec.qmax:
            return False
    return True
