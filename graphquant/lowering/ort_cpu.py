"""ort-cpu lowering: MatMul/Gemm to com.microsoft MatMulIntegerToFloat (uint8 activations, int8 weights, fused bias)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import Layer, constant_array
from graphquant.analysis.weight_fit import stored_codes
from graphquant.graph_edit import NameScope, add_initializer, remove_if_unused
from graphquant.lowering.qdq import INT4_OPSET, upgrade_opset
from graphquant.lowering.qlinear import QuantizedValue, Uint8Activations, lowerable_linear
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, QuantSpec
from graphquant.rewrites import bias_add_of

MICROSOFT_DOMAIN = "com.microsoft"


def _int4_weights_available(model: ir.Model) -> bool:
    """Whether weights of 4 bits or less can be stored as INT4 (opset 21, converting the model if needed)."""
    wants = any(
        spec.bits <= 4
        for node in model.graph
        if lowerable_linear(model.graph, node) is not None
        for spec in node.meta[INPUT_SPECS_KEY].values()
    )
    return wants and upgrade_opset(model, INT4_OPSET, fallback=False)


def _stored_weight(graph: ir.Graph, names: NameScope, base: str, codes: np.ndarray, int4: bool) -> ir.Value:
    """The int8 weight codes; 4-bit ones stored as INT4 behind a Cast to int8, which onnxruntime folds at load."""
    if not int4:
        return add_initializer(graph, names, f"{base}_quantized", codes)
    packed = add_initializer(graph, names, f"{base}_quantized", codes, dtype=ir.DataType.INT4)
    cast = ir.node("Cast", [packed], {"to": ir.DataType.INT8}, name=names.fresh(f"{base}_Cast"))
    cast.outputs[0].name = names.fresh(f"{base}_int8")
    cast.outputs[0].dtype = ir.DataType.INT8
    cast.outputs[0].shape = ir.Shape(codes.shape)
    graph.insert_before(graph[0], [cast])
    return cast.outputs[0]


class OrtCpuLoweringPass(ir.passes.InPlacePass):
    """Lower 8-bit-or-less MatMul/Gemm annotations to MatMulIntegerToFloat; leaves the rest for QDQ."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Replace each lowerable layer (and its bias Add) with one MatMulIntegerToFloat."""
        graph = model.graph
        names = NameScope(graph)
        activations = Uint8Activations(graph, names)
        modified = False
        int4 = _int4_weights_available(model)
        for node in list(graph):
            layer = lowerable_linear(graph, node)
            if layer is None:
                continue
            specs: dict[int, QuantSpec] = node.meta[INPUT_SPECS_KEY]
            activation = activations.codes(layer.activation, specs[layer.activation_index])
            _replace_layer(graph, names, layer, specs[layer.weight_index], activation, int4)
            modified = True
        if modified:
            graph.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=modified)


def _replace_layer(
    graph: ir.Graph,
    names: NameScope,
    layer: Layer,
    weight_spec: QuantSpec,
    activation: QuantizedValue,
    int4: bool,
) -> None:
    """Swap the layer (and a following bias Add) for MatMulIntegerToFloat with the bias fused in."""
    node = layer.node
    codes, activation_scale, activation_zero_point = activation
    weight_codes = stored_codes(weight_spec, layer.weight)
    weight_scale = weight_spec.scale
    if layer.in_axis == 1:  # Gemm with transB: MatMulIntegerToFloat wants [K, N]
        weight_codes = np.ascontiguousarray(weight_codes.T)
    columns = weight_codes.shape[1]
    base = layer.weight.name or "weight"
    weight_value = _stored_weight(graph, names, base, weight_codes, int4 and weight_spec.bits <= 4)
    scale_value = add_initializer(
        graph, names, f"{base}_scale", np.broadcast_to(weight_scale, (columns,)).astype(np.float32).copy()
    )
    bias, replaced = fused_bias(node, columns)
    inputs: list[ir.Value | None] = [codes, weight_value, activation_scale, scale_value, activation_zero_point, None]
    if bias is not None:
        inputs.append(add_initializer(graph, names, f"{node.name or 'layer'}_bias", bias))
    fused = ir.node("MatMulIntegerToFloat", inputs, domain=MICROSOFT_DOMAIN, name=node.name, doc_string=node.doc_string)
    swap_in_fused(graph, replaced, fused)


def swap_in_fused(graph: ir.Graph, replaced: list[ir.Node], fused: ir.Node) -> None:
    """Put ``fused`` in place of the layer (and its bias Add): it takes the output's name, readers and decision."""
    if DECISION_KEY in replaced[0].meta:
        fused.meta[DECISION_KEY] = replaced[0].meta[DECISION_KEY]
    old_output = replaced[-1].outputs[0]
    fused.outputs[0].type = old_output.type
    fused.outputs[0].shape = old_output.shape
    graph.insert_after(replaced[-1], fused)
    old_output.replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
    output_name = old_output.name
    old_inputs = [value for node in replaced for value in node.inputs if value is not None]
    graph.remove(list(reversed(replaced)), safe=True)
    fused.outputs[0].name = output_name
    for value in old_inputs:
        remove_if_unused(graph, value)


def fused_bias(node: ir.Node, columns: int) -> tuple[np.ndarray | None, list[ir.Node]]:
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
