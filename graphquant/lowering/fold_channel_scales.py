"""Fold a quantized branch's per-channel Mul into the ops that make its input (exact up to float rounding).

preexecute-dequant multiplies an activation by a per-channel factor m before QuantizeLinear, as a Mul of its own when
a float route also reads the activation. Where the activation is Add(·, c) or Mul(·, c) of constants down to a
MatMulIntegerToFloat's output or a constant factor of a product (GELU's 0.5 · (1 + erf)), m is folded there: c·m,
the weight scales and bias times m. Channels where m is 0 (the routed ones) get 1 instead: the float route reads
them unscaled, and the readers' weight rows there must be zero, so their codes add nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import constant_array
from graphquant.graph_edit import NameScope, add_initializer, remove_if_unused

MICROSOFT_DOMAIN = "com.microsoft"
# One planned edit: (node, input index, new constant).
Edit = tuple[ir.Node, int, np.ndarray]


class FoldChannelScalesPass(ir.passes.InPlacePass):
    """Remove per-channel Muls in front of QuantizeLinear by folding their factors into the producing ops."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Fold every Mul whose factor can be moved; leave the rest."""
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for node in list(graph):
            plan = _plan(node)
            if plan is None:
                continue
            for target, index, array in plan:
                old = target.inputs[index]
                assert old is not None
                base = f"{old.name or 'constant'}_folded"
                target.replace_input_with(index, add_initializer(graph, names, base, array))
                remove_if_unused(graph, old)
            source, factor = node.inputs
            assert source is not None and factor is not None
            node.outputs[0].replace_all_uses_with(source)
            graph.remove(node, safe=True)
            remove_if_unused(graph, factor)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _plan(node: ir.Node) -> list[Edit] | None:
    """The edits that fold this Mul's per-channel factor into its input's producers, or None where it cannot be."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    source, factor_value = node.inputs
    factor = constant_array(factor_value)
    if source is None or source.const_value is not None or factor is None or factor.size < 2:
        return None
    channels = factor.shape[-1]
    if factor.size != channels or node.outputs[0].is_graph_output() or source.is_graph_output():
        return None
    factor = factor.reshape(channels).astype(np.float32)
    zeroed = factor == 0
    if zeroed.any() and not _readers_ignore(node.outputs[0], zeroed):
        return None
    folded = np.where(zeroed, np.float32(1), factor)
    others = [user for user in source.consumers() if user is not node]
    if not all(_reads_only(user, np.flatnonzero(folded != 1), channels) for user in others):
        return None
    return _scaled(source, folded, top=True)


def _readers_ignore(value: ir.Value, channels: np.ndarray) -> bool:
    """Whether every reader quantizes ``value`` per tensor for MatMulIntegerToFloat layers whose weight rows at
    ``channels`` are all zero (their codes there add nothing)."""
    for quantize in value.consumers():
        if quantize.op_type != "QuantizeLinear" or not all(_scalar(v) for v in quantize.inputs[1:]):
            return False
        codes = quantize.outputs[0]
        if codes.is_graph_output() or not codes.consumers():
            return False
        for layer in codes.consumers():
            weight = constant_array(layer.inputs[1]) if layer.op_type == "MatMulIntegerToFloat" else None
            if weight is None or weight.shape[0] != channels.size or layer.inputs[0] is not codes:
                return False
            zero_point = constant_array(layer.inputs[5]) if len(layer.inputs) > 5 else None
            if zero_point is not None and zero_point.any():  # zero codes are then not zero weights
                return False
            if weight[channels].any():
                return False
    return True


def _scalar(value: ir.Value | None) -> bool:
    """An absent input or a one-element constant."""
    return value is None or ((array := constant_array(value)) is not None and array.size == 1)


def _reads_only(node: ir.Node, moved: np.ndarray, channels: int) -> bool:
    """A float route (Gather or step-1 Slice of the last axis) that reads none of the ``moved`` channels."""
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) == -1:
        indices = constant_array(node.inputs[1])
        return indices is not None and not np.isin(indices.reshape(-1) % channels, moved).any()
    if node.op_type != "Slice" or len(node.inputs) < 4 or len(node.inputs) > 5:
        return False
    arrays = [constant_array(v) for v in node.inputs[1:]]
    if any(a is None or a.size != 1 for a in arrays):
        return False
    bounds = [int(a.reshape(-1)[0]) for a in arrays]  # type: ignore[union-attr]
    if bounds[2] != -1 or (len(bounds) == 4 and bounds[3] != 1):
        return False
    start, end = (_clamped(b, channels) for b in bounds[:2])
    return not ((moved >= start) & (moved < end)).any()


def _clamped(bound: int, channels: int) -> int:
    """A Slice bound as a position in [0, channels]."""
    return min(max(bound + channels if bound < 0 else bound, 0), channels)


def _scaled(value: ir.Value, factor: np.ndarray, top: bool = False) -> list[Edit] | None:
    """Edits that make ``value`` come out times ``factor`` per last-axis channel (only one reader may see it)."""
    producer = value.producer()
    if producer is None or (not top and (len(value.consumers()) != 1 or value.is_graph_output())):
        return None
    if producer.op_type == "MatMulIntegerToFloat" and producer.domain == MICROSOFT_DOMAIN:
        return _scaled_layer(producer, factor)
    if producer.domain not in ("", "ai.onnx") or producer.op_type not in ("Add", "Mul") or len(producer.inputs) != 2:
        return None
    constants = [i for i, v in enumerate(producer.inputs) if v is not None and v.const_value is not None]
    edits = [(producer, i, _times(constant_array(producer.inputs[i]), factor)) for i in constants]
    if any(array is None for _, _, array in edits):
        return None
    varying = [v for i, v in enumerate(producer.inputs) if i not in constants and v is not None]
    if producer.op_type == "Mul":
        if edits:
            return edits  # type: ignore[return-value]
        return next((found for v in reversed(varying) if (found := _scaled(v, factor)) is not None), None)
    for operand in varying:  # Add: every term
        found = _scaled(operand, factor)
        if found is None:
            return None
        edits.extend(found)  # type: ignore[arg-type]
    return edits  # type: ignore[return-value]


def _scaled_layer(node: ir.Node, factor: np.ndarray) -> list[Edit] | None:
    """MatMulIntegerToFloat's output times ``factor``: its weight scales (per column) and bias times it."""
    edits = []
    for index in (3, 6):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            continue
        array = _times(constant_array(value), factor)
        if array is None:
            return None
        edits.append((node, index, array))
    return edits if any(index == 3 for _, index, _ in edits) else None


def _times(array: np.ndarray | None, factor: np.ndarray) -> np.ndarray | None:
    """A scalar or last-axis vector constant times the per-channel factor, as a [channels] float32 vector."""
    if array is None or array.dtype != np.float32 or array.size not in (1, factor.size):
        return None
    if array.size == factor.size and array.shape[-1] != factor.size:
        return None
    return (array.reshape(-1) * factor).astype(np.float32)
