"""Find quantizable layers and the groups of layers that share one activation tensor (networkx)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import networkx as nx
import numpy as np
import onnx_ir as ir

from graphquant.quant_spec import KEEP_FLOAT_KEY

QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# Fused RMSNorm ops, y = x / sqrt(mean(x^2) + eps) * scale: SimplifiedLayerNormalization (onnxruntime), RMSNormalization
# (ONNX opset 23).
RMS_NORM_OPS = ("SimplifiedLayerNormalization", "RMSNormalization")


@dataclasses.dataclass(frozen=True)
class Layer:
    """A MatMul/Gemm/Conv/ConvTranspose with a constant weight: activation and weight input indices, out-channel axis.

    ``out_axis`` None means the weight cannot take one scale per output channel and is quantized per tensor.
    """

    node: ir.Node
    activation_index: int
    weight_index: int
    out_axis: int | None

    @property
    def activation(self) -> ir.Value:
        """The activation input."""
        value = self.node.inputs[self.activation_index]
        assert value is not None
        return value

    @property
    def weight(self) -> ir.Value:
        """The constant weight input."""
        value = self.node.inputs[self.weight_index]
        assert value is not None
        return value

    @property
    def weight_array(self) -> np.ndarray:
        """The weight as a numpy array."""
        tensor = self.weight.const_value
        assert tensor is not None
        return tensor.numpy()

    @property
    def in_axis(self) -> int:
        """The weight axis that runs over the activation's channels (those of one group for a grouped Conv)."""
        if self.node.op_type == "Conv":
            return 1
        if self.node.op_type == "ConvTranspose":
            return 0
        return 1 - (self.out_axis or 0)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A node of a quantizable op type, with either its layer or the reason it is not one."""

    node: ir.Node
    layer: Layer | None
    reason: str = ""


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant tensor as numpy, or None if it is not a constant."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def classify(node: ir.Node) -> Candidate:
    """Decide whether a MatMul/Gemm/Conv node is a weight layer we can quantize."""
    inputs = list(node.inputs)
    if node.op_type == "MatMul":
        weight = constant_array(inputs[1])
        if constant_array(inputs[0]) is not None:
            return Candidate(node, None, "constant left operand")
        if weight is None:
            return Candidate(node, None, "activation x activation MatMul (left float)")
        if weight.ndim != 2:
            return Candidate(node, None, f"weight of rank {weight.ndim}; only 2-D weights are quantized")
        return _float_weight(node, Layer(node, 0, 1, out_axis=1))
    if node.op_type == "Gemm":
        attributes = node.attributes
        if attributes.get_int("transA", 0):
            return Candidate(node, None, "Gemm with transA")
        if constant_array(inputs[1]) is None:
            return Candidate(node, None, "Gemm with a non-constant B")
        return _float_weight(node, Layer(node, 0, 1, out_axis=0 if attributes.get_int("transB", 0) else 1))
    if node.op_type in ("Conv", "ConvTranspose"):
        if constant_array(inputs[1]) is None:
            return Candidate(node, None, f"{node.op_type} with a non-constant weight")
        return _float_weight(node, Layer(node, 0, 1, out_axis=conv_out_axis(node)))
    return Candidate(node, None, f"{node.op_type} is not a quantizable op")


def conv_out_axis(node: ir.Node) -> int | None:
    """The weight axis of a Conv/ConvTranspose that one per-axis scale can follow per output channel.

    Conv weights are [C_out, C_in/group, k...]: axis 0 for any group, depthwise included. ConvTranspose weights are
    [C_in, C_out/group, k...]: output channel g·(C_out/group) + j needs a scale per (group g, column j), which a
    DequantizeLinear on one axis cannot express, so a grouped ConvTranspose is quantized per tensor.
    """
    if node.op_type == "Conv":
        return 0
    return 1 if node.attributes.get_int("group", 1) == 1 else None


def _float_weight(node: ir.Node, layer: Layer) -> Candidate:
    """Accept the layer only if its weight is float32."""
    if layer.weight.dtype != ir.DataType.FLOAT:
        return Candidate(node, None, f"weight dtype {layer.weight.dtype} (only float32 is quantized)")
    return Candidate(node, layer)


def channel_scale_input(node: ir.Node, channels: int) -> int | None:
    """The input index of the constant per-channel vector g by which the node multiplies its output, if any.

    That is the scale of a fused RMSNorm over the last axis, the weight of a decomposed one (its last op is
    Mul(x·rsqrt(mean(x²) + ε), g)), or the constant of any Mul of an activation by a [C] vector. y·s = x·(g·s) there,
    so a per-channel scale folds into g exactly; a shift does not (an RMSNorm has no bias).
    """
    if node.domain not in ("", "ai.onnx", "com.microsoft"):
        return None
    if node.op_type in RMS_NORM_OPS:
        unused_extras = not any(output.uses() or output.is_graph_output() for output in node.outputs[1:])
        last_axis = node.attributes.get_int("axis", -1) == -1
        return 1 if unused_extras and last_axis and _is_channel_vector(node, 1, channels) else None
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    vectors = [index for index in (0, 1) if _is_channel_vector(node, index, channels)]
    if len(vectors) != 1 or constant_array(node.inputs[1 - vectors[0]]) is not None:
        return None
    return vectors[0]


def _is_channel_vector(node: ir.Node, index: int, channels: int) -> bool:
    """Whether the node's input ``index`` is a constant float32 of shape [C] (or [1, ..., 1, C])."""
    array = constant_array(node.inputs[index]) if index < len(node.inputs) else None
    if array is None or array.dtype != np.float32 or array.ndim < 1:
        return False
    return array.shape[-1] == channels and all(d == 1 for d in array.shape[:-1])


def candidates(graph: ir.Graph) -> Iterator[Candidate]:
    """Every node of a quantizable op type in the main graph, classified."""
    for node in graph:
        if node.domain in ("", "ai.onnx") and node.op_type in QUANTIZABLE_OPS:
            yield classify(node)


def sharing_graph(layers: list[Layer]) -> nx.Graph:
    """Bipartite networkx graph linking each layer to the activation tensor it reads."""
    sharing = nx.Graph()
    for layer in layers:
        sharing.add_edge(("value", layer.activation), ("layer", layer.node))
    return sharing


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Layers that read one activation tensor, and the tensor's other readers."""

    activation: ir.Value
    layers: tuple[Layer, ...]
    other_consumers: tuple[ir.Node, ...]

    @property
    def producer(self) -> ir.Node | None:
        """The node that computes the activation, or None for a graph input."""
        return self.activation.producer()

    @property
    def is_graph_output(self) -> bool:
        """Whether the activation is also a graph output, which must keep its values."""
        return self.activation.is_graph_output()


def scale_groups(layers: list[Layer]) -> list[ScaleGroup]:
    """Group the layers by the activation tensor they share, in the order the layers are given."""
    by_node = {layer.node: layer for layer in layers}
    order = {layer.node: position for position, layer in enumerate(layers)}
    groups = []
    for component in nx.connected_components(sharing_graph(layers)):
        (activation,) = [item for kind, item in component if kind == "value"]
        members = sorted(
            (by_node[item] for kind, item in component if kind == "layer"), key=lambda member: order[member.node]
        )
        member_nodes = {layer.node for layer in members}
        others = tuple(dict.fromkeys(node for node in activation.consumers() if node not in member_nodes))
        groups.append(ScaleGroup(activation, tuple(members), others))
    return sorted(groups, key=lambda group: order[group.layers[0].node])


def migratable_groups(graph: ir.Graph) -> list[ScaleGroup]:
    """Scale groups of MatMul/Gemm layers, whose input channels can take per-channel shifts and scales.

    Conv layers are left out: a channel shift is not exact where a Conv zero-pads its input, and the input axis of a
    grouped Conv weight runs over C_in/group channels, so a per-channel factor cannot be migrated into it row by row.
    Layers marked to stay float (KEEP_FLOAT_KEY: NaN/Inf weights, float paths) are left out too; the rewrites then
    treat them as other readers of the activation, which keep its original values.
    """
    layers = [
        c.layer
        for c in candidates(graph)
        if c.layer is not None and c.node.op_type in ("MatMul", "Gemm") and KEEP_FLOAT_KEY not in c.node.meta
    ]
    return scale_groups(layers)
