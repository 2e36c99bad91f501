"""ort-cpu lowering: MatMul/Gemm to com.microsoft MatMulIntegerToFloat (uint8 activations, int8 weights, fused bias)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import Layer, classify, constant_array
from graphquant.graph_edit import NameScope, add_initializer, insert_after_producer, remove_if_unused
from graphquant.lowering.qdq import narrow_grid_clip
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, QuantSpec
from graphquant.rewrites import bias_add_of

MICROSOFT_DOMAIN = "com.microsoft"
# uint8 codes are the signed codes moved up by 128: identical grids, and the fast x86 kernels take u8 x s8.
UINT8_OFFSET = 128
# Clip takes integer tensors from opset 12 on (needed for activation grids narrower than 8 bits).
CLIP_INTEGER_OPSET = 12


class OrtCpuLoweringPass(ir.passes.InPlacePass):
    """Lower 8-bit-or-less MatMul/Gemm annotations to MatMulIntegerToFloat; leaves the rest for QDQ."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Replace each lowerable layer (and its bias Add) with one MatMulIntegerToFloat."""
        graph = model.graph
        names = NameScope(graph)
        quantized_activations: dict[tuple[object, ...], tuple[ir.Value, ir.Value, ir.Value]] = {}
        modified = False
        for node in list(graph):
            layer = _lowerable_layer(node)
            if layer is None:
                continue
            specs: dict[int, QuantSpec] = node.meta[INPUT_SPECS_KEY]
            activation_spec = specs[layer.activation_index]
            if activation_spec.bits < 8 and graph.opset_imports.get("", 0) < CLIP_INTEGER_OPSET:
                continue  # its codes need an integer Clip; left to QDQ lowering, which checks the opset
            key = (id(layer.activation), *activation_spec.key)
            if key not in quantized_activations:
                quantized_activations[key] = _quantize_activation(graph, names, layer.activation, activation_spec)
            _replace_layer(graph, names, layer, specs[layer.weight_index], quantized_activations[key])
            modified = True
        if modified:
            graph.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=modified)


def _lowerable_layer(node: ir.Node) -> Layer | None:
    """The node's layer if its annotation fits MatMulIntegerToFloat: per-tensor activation, per-column weight."""
    specs: dict[int, QuantSpec] | None = node.meta.get(INPUT_SPECS_KEY)
    if not specs or node.op_type not in ("MatMul", "Gemm"):
        return None
    layer = classify(node).layer
    if layer is None or set(specs) != {layer.activation_index, layer.weight_index}:
        return None
    activation_spec, weight_spec = specs[layer.activation_index], specs[layer.weight_index]
    if activation_spec.axis is not None or not activation_spec.signed or not weight_spec.signed:
        return None
    if weight_spec.axis not in (None, layer.out_axis) or layer.weight_array.ndim != 2:
        return None
    if node.op_type == "Gemm" and not _plain_gemm(node):
        return None
    return layer


def _plain_gemm(node: ir.Node) -> bool:
    """Gemm with alpha = beta = 1 and a 1-D (or absent) constant C."""
    attributes = node.attributes
    if attributes.get_float("alpha", 1.0) != 1.0 or attributes.get_float("beta", 1.0) != 1.0:
        return False
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return True
    bias = constant_array(node.inputs[2])
    return bias is not None and bias.ndim == 1


def _quantize_activation(
    graph: ir.Graph, names: NameScope, activation: ir.Value, spec: QuantSpec
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """QuantizeLinear to uint8 after the producer; returns (codes, scale, zero point)."""
    base = activation.name or "activation"
    scale = add_initializer(graph, names, f"{base}_scale", spec.scale.astype(np.float32))
    zero_point = add_initializer(
        graph, names, f"{base}_zero_point", (spec.zero_point.astype(np.int16) + UINT8_OFFSET).astype(np.uint8)
    )
    quantize = ir.node("QuantizeLinear", [activation, scale, zero_point], name=names.fresh(f"{base}_QuantizeLinear"))
    codes = quantize.outputs[0]
    codes.name = names.fresh(f"{base}_quantized")
    codes.dtype = ir.DataType.UINT8
    codes.shape = activation.shape
    clamp = narrow_grid_clip(graph, names, codes, spec, offset=UINT8_OFFSET)
    insert_after_producer(graph, activation, [quantize] if clamp is None else [quantize, clamp])
    return (codes if clamp is None else clamp.outputs[0]), scale, zero_point


def _replace_layer(
    graph: ir.Graph,
    names: NameScope,
    layer: Layer,
    weight_spec: QuantSpec,
    activation: tuple[ir.Value, ir.Value, ir.Value],
) -> None:
    """Swap the layer (and a following bias Add) for MatMulIntegerToFloat with the bias fused in."""
    node = layer.node
    codes, activation_scale, activation_zero_point = activation
    weight_codes = weight_spec.quantize(layer.weight_array)
    weight_scale = weight_spec.scale
    if layer.in_axis == 1:  # Gemm with transB: MatMulIntegerToFloat wants [K, N]
        weight_codes = np.ascontiguousarray(weight_codes.T)
    columns = weight_codes.shape[1]
    base = layer.weight.name or "weight"
    weight_value = add_initializer(graph, names, f"{base}_quantized", weight_codes)
    scale_value = add_initializer(
        graph, names, f"{base}_scale", np.broadcast_to(weight_scale, (columns,)).astype(np.float32).copy()
    )
    bias, replaced = _fused_bias(node, columns)
    inputs: list[ir.Value | None] = [codes, weight_value, activation_scale, scale_value, activation_zero_point, None]
    if bias is not None:
        inputs.append(add_initializer(graph, names, f"{node.name or 'layer'}_bias", bias))
    fused = ir.node("MatMulIntegerToFloat", inputs, domain=MICROSOFT_DOMAIN, name=node.name, doc_string=node.doc_string)
    if DECISION_KEY in node.meta:
        fused.meta[DECISION_KEY] = node.meta[DECISION_KEY]
    old_output = replaced[-1].outputs[0]
    fused.outputs[0].type = old_output.type
    fused.outputs[0].shape = old_output.shape
    graph.insert_after(replaced[-1], fused)
    old_output.replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
    output_name = old_output.name
    old_weight = layer.weight
    graph.remove(list(reversed(replaced)), safe=True)
    fused.outputs[0].name = output_name
    remove_if_unused(graph, old_weight)


def _fused_bias(node: ir.Node, columns: int) -> tuple[np.ndarray | None, list[ir.Node]]:
    """The bias to fuse and the nodes the fused op replaces (the layer, plus its bias Add if any)."""
    if node.op_type == "Gemm":
        bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
        return (None if bias is None else np.broadcast_to(bias, (columns,)).astype(np.float32).copy()), [node]
    found = bias_add_of(node)
    if found is None:
        return None, [node]
    add_node, index = found
    bias = constant_array(add_node.inputs[index])
    assert bias is not None
    if bias.size not in (1, columns):
        return None, [node]
    return np.broadcast_to(bias.reshape(-1), (columns,)).astype(np.float32).copy(), [node, add_node]
