"""Shared pieces of the integer-op lowerings: uint8 activation codes, weight codes, output specs and dequantization."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import Layer, classify, constant_array
from graphquant.graph_edit import NameScope, add_initializer, insert_after_producer, remove_if_unused
from graphquant.lowering.qdq import narrow_grid_clip
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, OUTPUT_SPEC_KEY, QuantSpec

# uint8 codes of a signed grid are its codes moved up by 128: identical grids, and the fast x86 kernels take u8 x s8.
UINT8_OFFSET = 128
# Clip takes integer tensors from opset 12 on (needed for activation grids narrower than 8 bits).
CLIP_INTEGER_OPSET = 12

QuantizedValue = tuple[ir.Value, ir.Value, ir.Value]


def uint8_offset(spec: QuantSpec) -> int:
    """How far the spec's codes move up when stored as uint8 (128 for a signed grid, 0 for an unsigned one)."""
    return UINT8_OFFSET if spec.signed else 0


def uint8_zero_point(spec: QuantSpec) -> np.ndarray:
    """The spec's zero point as stored with uint8 codes."""
    return (spec.zero_point.astype(np.int16) + uint8_offset(spec)).astype(np.uint8)


def activation_fits(spec: QuantSpec, graph: ir.Graph) -> bool:
    """Whether an activation spec can become uint8 codes: per tensor, with an integer Clip for narrow grids."""
    if spec.axis is not None:
        return False
    return spec.bits == 8 or graph.opset_imports.get("", 0) >= CLIP_INTEGER_OPSET


def quantize_to_uint8(graph: ir.Graph, names: NameScope, value: ir.Value, spec: QuantSpec) -> QuantizedValue:
    """(codes, scale, zero point) of ``value`` on the spec's grid in uint8, inserted after its producer."""
    # Where value = DequantizeLinear(codes) on this very grid (an integer op's output), the codes are reused as is.
    reused = _codes_behind(value, spec)
    if reused is not None:
        return reused
    base = value.name or "activation"
    scale = add_initializer(graph, names, f"{base}_scale", spec.scale.astype(np.float32))
    zero_point = add_initializer(graph, names, f"{base}_zero_point", uint8_zero_point(spec))
    quantize = ir.node("QuantizeLinear", [value, scale, zero_point], name=names.fresh(f"{base}_QuantizeLinear"))
    codes = quantize.outputs[0]
    codes.name = names.fresh(f"{base}_quantized")
    codes.dtype = ir.DataType.UINT8
    codes.shape = value.shape
    clamp = narrow_grid_clip(graph, names, codes, spec, offset=uint8_offset(spec))
    insert_after_producer(graph, value, [quantize] if clamp is None else [quantize, clamp])
    return (codes if clamp is None else clamp.outputs[0]), scale, zero_point


class Uint8Activations:
    """uint8 codes of activations, made once per (tensor, grid) and shared by every layer that reads them."""

    def __init__(self, graph: ir.Graph, names: NameScope):
        self.graph = graph
        self.names = names
        self.made: dict[tuple[object, ...], QuantizedValue] = {}

    def codes(self, value: ir.Value, spec: QuantSpec) -> QuantizedValue:
        """(codes, scale, zero point) of ``value`` on the spec's grid."""
        key = (id(value), *spec.key)
        if key not in self.made:
            self.made[key] = quantize_to_uint8(self.graph, self.names, value, spec)
        return self.made[key]


def _codes_behind(value: ir.Value, spec: QuantSpec) -> QuantizedValue | None:
    """The uint8 codes, scale and zero point of a per-tensor DequantizeLinear producing ``value`` on this grid."""
    producer = value.producer()
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in ("", "ai.onnx"):
        return None
    codes, scale, zero_point = (list(producer.inputs) + [None] * 3)[:3]
    if codes is None or scale is None or zero_point is None or codes.dtype != ir.DataType.UINT8:
        return None
    if spec.bits < 8 and not _clipped_to_grid(codes, spec):
        return None
    scale_array, zero_point_array = constant_array(scale), constant_array(zero_point)
    if scale_array is None or zero_point_array is None or scale_array.shape != () or zero_point_array.shape != ():
        return None
    if scale_array != spec.scale.astype(np.float32) or zero_point_array != uint8_zero_point(spec):
        return None
    return codes, scale, zero_point


def _clipped_to_grid(codes: ir.Value, spec: QuantSpec) -> bool:
    """Whether the codes come from a Clip to the spec's narrow grid (QuantizeLinear alone saturates at 8 bits)."""
    clip = codes.producer()
    if clip is None or clip.op_type != "Clip" or len(clip.inputs) != 3:
        return False
    low, high = constant_array(clip.inputs[1]), constant_array(clip.inputs[2])
    offset = uint8_offset(spec)
    return low is not None and high is not None and (int(low), int(high)) == (spec.qmin + offset, spec.qmax + offset)


def readers_spec(node: ir.Node) -> QuantSpec | None:
    """The per-tensor input spec that every reader of the node's output quantizes it with, if they share one."""
    output = node.outputs[0]
    uses = list(output.uses())
    if not uses or output.is_graph_output():
        return None
    specs = [user.meta.get(INPUT_SPECS_KEY, {}).get(index) for user, index in uses]
    if all(spec is not None and spec.axis is None for spec in specs) and len({s.key for s in specs}) == 1:
        return specs[0]
    return None


def output_spec(node: ir.Node) -> QuantSpec | None:
    """The grid to requantize the node's output to: its readers' common input spec, else its calibrated spec."""
    return readers_spec(node) or node.meta.get(OUTPUT_SPEC_KEY)


def int8_weight_grid(spec: QuantSpec) -> bool:
    """Whether weight_codes stores the spec's grid exactly as int8 codes with zero point 0: a signed grid with zero
    zero points, or an unsigned one of at most 7 bits (its codes less their zero points lie in ±(2^bits - 1))."""
    if spec.signed:
        return not np.any(spec.zero_point != 0)
    return spec.bits <= 7


def weight_codes(layer: Layer, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """int8 weight codes (an unsigned grid's codes less their zero points) and float32 scales, to pair with zero
    point 0; 2-D weights as [K, N] (a transB Gemm's weight transposed)."""
    codes = spec.quantize(layer.weight_array)
    if not spec.signed:
        zero_point = spec.expand(spec.zero_point.astype(np.int16), codes.shape)
        codes = (codes.astype(np.int16) - zero_point).astype(np.int8)
    if codes.ndim == 2 and layer.in_axis == 1:
        codes = np.ascontiguousarray(codes.T)
    return codes, spec.scale.astype(np.float32)


def lowerable_linear(graph: ir.Graph, node: ir.Node) -> Layer | None:
    """The node's layer if it is a MatMul/plain Gemm with a per-tensor activation and per-column int8 weight spec."""
    specs: dict[int, QuantSpec] | None = node.meta.get(INPUT_SPECS_KEY)
    if not specs or node.op_type not in ("MatMul", "Gemm"):
        return None
    layer = classify(node).layer
    if layer is None or set(specs) != {layer.activation_index, layer.weight_index}:
        return None
    weight_spec = specs[layer.weight_index]
    if not weight_spec.signed or weight_spec.block_size is not None or np.any(weight_spec.zero_point != 0):
        return None
    if weight_spec.axis not in (None, layer.out_axis) or layer.weight_array.ndim != 2:
        return None
    if not activation_fits(specs[layer.activation_index], graph):
        return None
    if node.op_type == "Gemm" and not plain_gemm(node):
        return None
    return layer


def plain_gemm(node: ir.Node) -> bool:
    """Gemm with alpha = beta = 1 and a 1-D (or absent) constant C."""
    attributes = node.attributes
    if attributes.get_float("alpha", 1.0) != 1.0 or attributes.get_float("beta", 1.0) != 1.0:
        return False
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return True
    bias = constant_array(node.inputs[2])
    return bias is not None and bias.ndim == 1


def replace_output(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], result: ir.Value) -> None:
    """Put ``new_nodes`` in place of ``old``; ``result`` takes over the old output's name, readers and decision."""
    old_output = old.outputs[0]
    result.type = old_output.type
    result.shape = old_output.shape
    graph.insert_after(old, new_nodes)
    old_output.replace_all_uses_with(result, replace_graph_outputs=True)
    if DECISION_KEY in old.meta:
        new_nodes[0].meta[DECISION_KEY] = old.meta[DECISION_KEY]
    name = old_output.name
    inputs = [value for value in old.inputs if value is not None]
    graph.remove(old, safe=True)
    result.name = name
    for value in inputs:
        remove_if_unused(graph, value)


def output_grid(graph: ir.Graph, names: NameScope, spec: QuantSpec, base: str) -> tuple[ir.Value, ir.Value]:
    """Scale and uint8 zero point initializers of an integer op's output grid."""
    scale = add_initializer(graph, names, f"{base}_output_scale", spec.scale.astype(np.float32))
    return scale, add_initializer(graph, names, f"{base}_output_zero_point", uint8_zero_point(spec))


def dequantized_output(
    graph: ir.Graph, names: NameScope, codes: ir.Value, spec: QuantSpec, grid: tuple[ir.Value, ir.Value], base: str
) -> tuple[list[ir.Node], ir.Value]:
    """The narrow-grid Clip (if needed) and DequantizeLinear after an integer op's uint8 output; the float result."""
    codes.dtype = ir.DataType.UINT8
    codes.name = names.fresh(f"{base}_quantized")
    clamp = narrow_grid_clip(graph, names, codes, spec, offset=uint8_offset(spec))
    clipped = codes if clamp is None else clamp.outputs[0]
    dequantize = ir.node("DequantizeLinear", [clipped, *grid], name=names.fresh(f"{base}_DequantizeLinear"))
    dequantize.outputs[0].dtype = ir.DataType.FLOAT
    return [*([] if clamp is None else [clamp]), dequantize], dequantize.outputs[0]
