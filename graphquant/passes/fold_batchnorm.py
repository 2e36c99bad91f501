"""Fold-batchnorm pass (exact): an inference-mode BatchNormalization folded into the layer that feeds it."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import constant_array
from graphquant.graph_edit import NameScope, add_initializer, remove_if_unused
from graphquant.rewrites import bias_add_of

DEFAULT_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class FoldSite:
    """A layer whose output channels a BatchNormalization scales: where its weight and bias live."""

    layer: ir.Node
    weight_index: int
    bias_node: ir.Node
    bias_index: int


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Exact: BN(y) = a·y + c with a = γ/√(σ²+ε), c = β - μ·a; W ← a·W per output channel, b ← a·b + c."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Fold every BatchNormalization whose input is a Conv/ConvTranspose/Gemm/MatMul+Add output read only by it."""
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for node in list(graph):
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            affine = _inference_affine(node)
            site = _fold_site(node) if affine is not None else None
            if affine is None or site is None or _out_channels(site) != affine[0].size:
                continue
            _fold(graph, names, node, site, *affine)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _inference_affine(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, c) of an inference-mode BatchNormalization with constant parameters, else None."""
    if node.attributes.get_int("training_mode", 0) or len(node.inputs) != 5:
        return None
    if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
        return None  # the running statistics are read: a training graph
    parameters = [constant_array(value) for value in node.inputs[1:]]
    if any(p is None or p.ndim != 1 for p in parameters):
        return None
    gamma, beta, mean, variance = (np.asarray(p, np.float64) for p in parameters)
    if len({gamma.size, beta.size, mean.size, variance.size}) != 1:
        return None
    scale = gamma / np.sqrt(variance + node.attributes.get_float("epsilon", DEFAULT_EPSILON))
    return scale, beta - mean * scale


def _fold_site(node: ir.Node) -> FoldSite | None:
    """The layer feeding the BatchNormalization on its channel axis, if nothing else reads its output."""
    source = node.inputs[0]
    if source is None or source.is_graph_output() or list(source.consumers()) != [node]:
        return None
    producer = source.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    if producer.op_type in ("Conv", "ConvTranspose"):
        return _conv_site(producer)
    if producer.op_type == "Gemm":
        return _gemm_site(producer)
    if producer.op_type == "Add":
        return _matmul_site(producer)
    return None


def _conv_site(node: ir.Node) -> FoldSite | None:
    """A Conv/ConvTranspose with a constant float weight and a constant (or absent) bias."""
    weight = constant_array(node.inputs[1])
    if weight is None or weight.dtype != np.float32:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None:
        return None
    return FoldSite(node, 1, node, 2)


def _gemm_site(node: ir.Node) -> FoldSite | None:
    """A Gemm with a constant float B and beta = 1 with a constant 1-D (or absent) C."""
    weight = constant_array(node.inputs[1])
    if weight is None or weight.dtype != np.float32 or node.attributes.get_float("beta", 1.0) != 1.0:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2])
        if bias is None or bias.ndim > 1:
            return None
    return FoldSite(node, 1, node, 2)


def _matmul_site(add_node: ir.Node) -> FoldSite | None:
    """A rank-2 MatMul with a constant float weight whose bias Add is ``add_node``.

    BatchNormalization normalizes axis 1, which is the MatMul's output column axis only at rank 2.
    """
    for value in add_node.inputs:
        matmul = value.producer() if value is not None else None
        if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
            continue
        activation, weight, found = matmul.inputs[0], constant_array(matmul.inputs[1]), bias_add_of(matmul)
        if (
            weight is None
            or weight.ndim != 2
            or weight.dtype != np.float32
            or found is None
            or found[0] is not add_node
        ):
            continue
        bias = constant_array(add_node.inputs[found[1]])
        if activation is not None and activation.shape is not None and len(activation.shape) == 2 and bias.ndim <= 2:
            return FoldSite(matmul, 1, add_node, found[1])
    return None


def _out_channels(site: FoldSite) -> int:
    """The number of output channels of the site's layer."""
    weight = constant_array(site.layer.inputs[site.weight_index])
    assert weight is not None
    node = site.layer
    if node.op_type == "Conv":
        return weight.shape[0]
    if node.op_type == "ConvTranspose":
        return weight.shape[1] * node.attributes.get_int("group", 1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return weight.shape[0]
    return weight.shape[1]


def _scaled_weight(node: ir.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The weight with each output channel multiplied by its factor."""
    wide = weight.astype(np.float64)
    if node.op_type == "ConvTranspose":
        # W is [C_in, C_out/group, k...]; output channel g·(C_out/group) + j lives in rows of group g, column j.
        group = node.attributes.get_int("group", 1)
        blocked = wide.reshape(group, weight.shape[0] // group, *weight.shape[1:])
        factors = scale.reshape(group, 1, weight.shape[1], *([1] * (weight.ndim - 2)))
        return (blocked * factors).reshape(weight.shape).astype(np.float32)
    axis = 0 if node.op_type == "Conv" or node.attributes.get_int("transB", 0) else 1
    shape = [1] * weight.ndim
    shape[axis] = scale.size
    return (wide * scale.reshape(shape)).astype(np.float32)


def _fold(
    graph: ir.Graph, names: NameScope, node: ir.Node, site: FoldSite, scale: np.ndarray, shift: np.ndarray
) -> None:
    """Rewrite the site's weight and bias, then drop the BatchNormalization; its output name moves to the layer."""
    layer = site.layer
    old_weight = layer.inputs[site.weight_index]
    assert old_weight is not None
    base = layer.name or layer.op_type
    original = constant_array(old_weight)
    assert original is not None
    weight = _scaled_weight(layer, original, scale)
    layer.replace_input_with(site.weight_index, add_initializer(graph, names, f"{base}_bn_weight", weight))
    bias_node = site.bias_node
    old_bias = bias_node.inputs[site.bias_index] if len(bias_node.inputs) > site.bias_index else None
    bias_array = constant_array(old_bias)
    bias = np.zeros(scale.size) if bias_array is None else np.broadcast_to(bias_array.reshape(-1), scale.shape)
    folded = (scale * bias + shift).astype(np.float32)
    if len(bias_node.inputs) <= site.bias_index:
        bias_node.resize_inputs(site.bias_index + 1)
    bias_node.replace_input_with(site.bias_index, add_initializer(graph, names, f"{base}_bn_bias", folded))
    source, output = node.inputs[0], node.outputs[0]
    assert source is not None
    name = output.name
    if source.type is None:  # BatchNormalization keeps its input's type and shape; a graph output needs them
        source.type = output.type
    if source.shape is None:
        source.shape = output.shape
    output.replace_all_uses_with(source, replace_graph_outputs=True)
    parameters = [value for value in node.inputs[1:] if value is not None]
    graph.remove(node, safe=True)
    source.name = name
    for value in [old_weight, *([old_bias] if old_bias is not None else []), *parameters]:
        remove_if_unused(graph, value)
