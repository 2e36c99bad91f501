"""Contiguous float routes (exact): permute an activation's channels so that a float route reads a Slice, not a Gather.

A float route (preexecute-dequant's outlier channels) gathers k scattered channels of the last axis; onnxruntime's
Gather on the last axis costs about ten times a Slice of k contiguous channels. Where the activation is produced by
MatMulIntegerToFloat or float MatMul layers (their weight columns) through channel-wise elementwise ops, and read only by layers
(their weight rows, through per-tensor QuantizeLinear) and by the route, the channels are renumbered so that the
routed ones come last, in the Gather's order. Integer sums and every float value are unchanged: the outputs are
identical.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import constant_array
from graphquant.graph_edit import NameScope, add_initializer, remove_if_unused
from graphquant.quant_spec import CHANNEL_ORDER_KEY

MICROSOFT_DOMAIN = "com.microsoft"
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Neg", "Abs", "Exp", "Gelu"})


@dataclasses.dataclass
class Region:
    """The nodes whose channels (the last axis, ``channels`` wide) move together with one route's Gather."""

    channels: int
    sources: list[ir.Node] = dataclasses.field(default_factory=list)
    elementwise: list[ir.Node] = dataclasses.field(default_factory=list)
    sinks: list[ir.Node] = dataclasses.field(default_factory=list)
    routes: list[ir.Node] = dataclasses.field(default_factory=list)
    seen: set[int] = dataclasses.field(default_factory=set)


class ContiguousFloatRoutesPass(ir.passes.InPlacePass):
    """Turn each float route's last-axis Gather into a Slice by renumbering its activation's channels (exact)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite every route whose activation's channels can all be renumbered; leave the others as they are."""
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for node in list(graph):
            if not _route_gather(node):
                continue
            region = _region(node)
            if region is None:
                continue
            indices = constant_array(node.inputs[1])
            assert indices is not None
            _renumber(graph, names, region, _permutation(indices.reshape(-1), region.channels))
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _route_gather(node: ir.Node) -> bool:
    """A Gather of distinct non-negative constant indices along the last axis (-1, or the last of a known rank)."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    data, indices = node.inputs
    array = constant_array(indices)
    if data is None or array is None or array.ndim != 1 or array.size == 0 or array.min() < 0:
        return False
    axis = node.attributes.get_int("axis", 0)
    last = axis == -1 or (data.shape is not None and axis == len(data.shape) - 1)
    return last and len(np.unique(array)) == array.size


def _permutation(indices: np.ndarray, channels: int) -> np.ndarray:
    """New channel j holds old channel perm[j]: the others in order, then the routed ones in the Gather's order."""
    routed = np.asarray(indices, np.int64)
    others = np.setdiff1d(np.arange(channels), routed)
    return np.concatenate([others, routed])


def _region(gather: ir.Node) -> Region | None:
    """Everything that must be renumbered with the Gather's input, or None where something cannot be."""
    data, indices = gather.inputs
    assert data is not None and indices is not None
    channels = _channels(data)
    if channels is None or channels <= int(constant_array(indices).max()):
        return None
    region = Region(channels)
    pending = [data]
    while pending:
        value = pending.pop()
        if id(value) in region.seen:
            continue
        region.seen.add(id(value))
        if value.is_graph_output() or value.is_graph_input() or value.const_value is not None:
            return None
        found = _visit_producer(region, value) and _visit_readers(region, value, pending)
        if not found:
            return None
        producer = value.producer()
        if producer is not None and producer.op_type in ELEMENTWISE:
            pending.extend(v for v in producer.inputs if v is not None and v.const_value is None)
    return region if len(region.routes) == 1 and region.sources else None


def _channels(value: ir.Value) -> int | None:
    """The last axis's size: from the value's shape, else from the layer that produces it through elementwise ops."""
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return value.shape[-1]
    producer = value.producer()
    while producer is not None and producer.op_type in ELEMENTWISE:
        inputs = [v for v in producer.inputs if v is not None and v.const_value is None]
        producer = inputs[0].producer() if inputs else None
    if producer is None or producer.op_type not in ("MatMulIntegerToFloat", "MatMul"):
        return None
    weight = producer.inputs[1]
    return None if weight is None or weight.shape is None or len(weight.shape) != 2 else weight.shape[1]


def _visit_producer(region: Region, value: ir.Value) -> bool:
    """Record the value's producer: a source layer, an elementwise op or a per-tensor QuantizeLinear."""
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type in ("MatMulIntegerToFloat", "MatMul"):
        return _add_once(region.sources, producer) if _source(producer, region.channels) else False
    if producer.op_type == "QuantizeLinear" and _per_tensor(producer):
        return True  # its input is in the region already: codes are only walked forward from there
    if _channel_wise(producer, region.channels):
        return _add_once(region.elementwise, producer)
    return False


def _visit_readers(region: Region, value: ir.Value, pending: list[ir.Value]) -> bool:
    """Record the value's readers (sink layers, elementwise ops, per-tensor quantizers, the route); False if other."""
    for user, index in value.uses():
        if user.op_type == "Gather" and index == 0 and _route_gather(user):
            _add_once(region.routes, user)
        elif user.op_type in ("MatMulIntegerToFloat", "MatMul") and index == 0 and _sink(user, region.channels):
            _add_once(region.sinks, user)
        elif user.op_type == "QuantizeLinear" and index == 0 and _per_tensor(user):
            pending.append(user.outputs[0])
        elif _channel_wise(user, region.channels):
            _add_once(region.elementwise, user)
            pending.append(user.outputs[0])
            pending.extend(v for v in user.inputs if v is not None and v.const_value is None)
        else:
            return False
    return True


def _add_once(nodes: list[ir.Node], node: ir.Node) -> bool:
    """Append ``node`` unless it is there already; True."""
    if all(other is not node for other in nodes):
        nodes.append(node)
    return True


def _source(node: ir.Node, channels: int) -> bool:
    """A float MatMul, or a MatMulIntegerToFloat, whose constant [K, channels] weight (and scales, zero points and
    bias) can be permuted."""
    weight = constant_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.shape[1] != channels:
        return False
    if node.op_type == "MatMul":
        return node.domain in ("", "ai.onnx")
    if node.domain != MICROSOFT_DOMAIN:
        return False
    vectors = [node.inputs[i] if len(node.inputs) > i else None for i in (3, 5, 6)]
    return all(v is None or (array := constant_array(v)) is not None and array.size in (1, channels) for v in vectors)


def _sink(node: ir.Node, channels: int) -> bool:
    """A layer reading the channels as its K axis: constant [channels, N] weight, per-tensor activation grid."""
    weight = constant_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.shape[0] != channels:
        return False
    if node.op_type == "MatMul":
        return node.domain in ("", "ai.onnx")
    grid = [node.inputs[i] if len(node.inputs) > i else None for i in (2, 4)]
    return node.domain == MICROSOFT_DOMAIN and all(v is None or _size(v) == 1 for v in grid)


def _per_tensor(node: ir.Node) -> bool:
    """A QuantizeLinear with a constant scalar scale and zero point."""
    return node.domain in ("", "ai.onnx") and all(v is None or _size(v) == 1 for v in node.inputs[1:])


def _channel_wise(node: ir.Node, channels: int) -> bool:
    """An elementwise op whose constant inputs are scalars or vectors along the last axis."""
    if node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx"):
        return False
    constants = [constant_array(v) for v in node.inputs if v is not None and v.const_value is not None]
    return all(
        a is not None and (a.size == 1 or (a.ndim >= 1 and a.shape[-1] == channels == a.size)) for a in constants
    )


def _size(value: ir.Value) -> int:
    """Elements of a constant (-1 for a value that is not one)."""
    array = constant_array(value)
    return -1 if array is None else int(array.size)


def _renumber(graph: ir.Graph, names: NameScope, region: Region, perm: np.ndarray) -> None:
    """Apply the permutation to every constant of the region and replace the Gather with a Slice of the tail."""
    channels = region.channels
    for node in region.sources:
        _permute_input(graph, names, node, 1, perm, axis=1)
        for index in (3, 5, 6):
            if len(node.inputs) > index and node.inputs[index] is not None and _size(node.inputs[index]) == channels:
                _permute_input(graph, names, node, index, perm, axis=-1)
    for node in region.elementwise:
        for index, value in enumerate(node.inputs):
            if value is not None and value.const_value is not None and _size(value) == channels > 1:
                _permute_input(graph, names, node, index, perm, axis=-1)
    for node in region.sinks:
        _permute_input(graph, names, node, 1, perm, axis=0)
    for node in [*region.sources, *region.elementwise]:
        _record_order(node.outputs[0], perm)
    (gather,) = region.routes
    _slice_tail(graph, names, gather, channels)


def _record_order(value: ir.Value, perm: np.ndarray) -> None:
    """Note on the value which float-model channel each of its channels now holds (composed with an earlier order)."""
    earlier = value.meta.get(CHANNEL_ORDER_KEY)
    value.meta[CHANNEL_ORDER_KEY] = perm if earlier is None else np.asarray(earlier)[perm]


def _permute_input(graph: ir.Graph, names: NameScope, node: ir.Node, index: int, perm: np.ndarray, axis: int) -> None:
    """Give ``node`` a new initializer at ``index``: the old one's entries taken in ``perm`` order along ``axis``."""
    old = node.inputs[index]
    assert old is not None and old.const_value is not None
    tensor = old.const_value
    permuted = np.ascontiguousarray(np.take(tensor.numpy(), perm, axis=axis))
    value = add_initializer(graph, names, f"{old.name or 'constant'}_renumbered", permuted, dtype=tensor.dtype)
    node.replace_input_with(index, value)
    remove_if_unused(graph, old)


def _slice_tail(graph: ir.Graph, names: NameScope, gather: ir.Node, channels: int) -> None:
    """Replace the Gather with a Slice of the last ``k`` channels (the routed ones, now in the Gather's order)."""
    data, indices = gather.inputs
    assert data is not None and indices is not None
    count = _size(indices)
    base = gather.name or "route"
    bounds = [
        add_initializer(graph, names, f"{base}_{part}", np.array([value], np.int64))
        for part, value in (("starts", channels - count), ("ends", channels), ("axes", -1))
    ]
    sliced = ir.node("Slice", [data, *bounds], name=names.fresh(f"{base}_slice"))
    output = gather.outputs[0]
    sliced.outputs[0].type = output.type
    sliced.outputs[0].shape = output.shape
    graph.insert_after(gather, sliced)
    output.replace_all_uses_with(sliced.outputs[0], replace_graph_outputs=True)
    name = output.name
    graph.remove(gather, safe=True)
    sliced.outputs[0].name = name
    remove_if_unused(graph, indices)
