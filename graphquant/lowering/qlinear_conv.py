"""QLinearConv lowering: Conv layers to QLinearConv (uint8 activations and output, int8 weights, int32 bias)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import Layer, classify, constant_array
from graphquant.graph_edit import NameScope, add_initializer
from graphquant.lowering.qlinear import (
    QuantizedValue,
    Uint8Activations,
    activation_fits,
    dequantized_output,
    int8_weight_grid,
    output_grid,
    output_spec,
    replace_output,
    weight_codes,
)
from graphquant.quant_spec import INPUT_SPECS_KEY, QuantSpec

INT32 = np.iinfo(np.int32)


class QLinearConvLoweringPass(ir.passes.InPlacePass):
    """Lower Conv layers with per-tensor activations and per-channel weights to QLinearConv + DequantizeLinear.

    The weights go in as int8 codes with zero point 0: a symmetric grid's codes, or an asymmetric grid's (at most
    7 bits) codes less their per-channel zero points, the same dequantized values on the kernel symmetric weights use.

    The output is requantized to its readers' common input grid when they share one (so a following QLinearConv
    reads the codes directly), else to the calibrated output grid. Other Conv annotations are left for QDQ.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Replace each lowerable Conv, in graph order."""
        graph = model.graph
        names = NameScope(graph)
        activations = Uint8Activations(graph, names)
        modified = False
        for node in list(graph):
            layer = _lowerable_conv(graph, node)
            y_spec = output_spec(node) if layer is not None else None
            if layer is None or y_spec is None or not activation_fits(y_spec, graph):
                continue
            specs: dict[int, QuantSpec] = node.meta[INPUT_SPECS_KEY]
            x_codes = activations.codes(layer.activation, specs[layer.activation_index])
            _replace_conv(graph, names, layer, specs[layer.weight_index], x_codes, y_spec)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _lowerable_conv(graph: ir.Graph, node: ir.Node) -> Layer | None:
    """The node's layer if it is an annotated Conv that QLinearConv can compute."""
    specs: dict[int, QuantSpec] | None = node.meta.get(INPUT_SPECS_KEY)
    if not specs or node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return None
    layer = classify(node).layer
    if layer is None or set(specs) != {layer.activation_index, layer.weight_index}:
        return None
    weight_spec = specs[layer.weight_index]
    if weight_spec.block_size is not None or not int8_weight_grid(weight_spec):
        return None
    if weight_spec.axis not in (None, 0) or not activation_fits(specs[layer.activation_index], graph):
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None:
        return None
    return layer


def _replace_conv(
    graph: ir.Graph, names: NameScope, layer: Layer, w_spec: QuantSpec, x: QuantizedValue, y_spec: QuantSpec
) -> None:
    """Swap the Conv for QLinearConv, a narrow-grid Clip if needed, and DequantizeLinear."""
    node = layer.node
    base = node.name or "conv"
    codes, x_scale, x_zero_point = x
    w_codes, w_scale = weight_codes(layer, w_spec)
    inputs: list[ir.Value | None] = [
        codes,
        x_scale,
        x_zero_point,
        add_initializer(graph, names, f"{base}_weight_quantized", w_codes),
        add_initializer(graph, names, f"{base}_weight_scale", w_scale),
        add_initializer(graph, names, f"{base}_weight_zero_point", np.zeros(w_scale.shape, np.int8)),
        *output_grid(graph, names, y_spec, base),
    ]
    bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if bias is not None:
        # b_q = round(b / (x_scale * w_scale)) in int32, the accumulator's own grid.
        x_step = np.float64(constant_array(x_scale))
        step = x_step * np.broadcast_to(w_scale.astype(np.float64), bias.shape)
        bias_codes = np.clip(np.rint(bias / step), INT32.min, INT32.max).astype(np.int32)
        inputs.append(add_initializer(graph, names, f"{base}_bias_quantized", bias_codes))
    conv = ir.node("QLinearConv", inputs, attributes=node.attributes, name=node.name, doc_string=node.doc_string)
    tail, output = dequantized_output(graph, names, conv.outputs[0], y_spec, (inputs[6], inputs[7]), base)
    replace_output(graph, node, [conv, *tail], output)
