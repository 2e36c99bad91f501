"""Unsigned int8 weights where onnxruntime's uint8 x int8 kernel saturates (exact: the same grid, shifted by 128).

On x86 CPUs without VNNI (AVX2 only: AMD Zen 2/3, older Intel), onnxruntime's MLAS multiplies uint8 activations by
int8 weights with VPMADDUBSW, which adds each pair of adjacent products in int16 with saturation: 255 * 127 * 2
overflows it, and a layer's output is silently wrong (onnxruntime's quantization guide: "try reduce_range or the U8U8
format"). Its uint8 x uint8 kernel widens to int16 first and is exact. A weight w on an int8 grid with zero point z
is the same weight on a uint8 grid with codes w + 128 and zero point z + 128, so this pass rewrites the 8-bit weights
of every uint8-activation integer layer that way: the dequantized weights, and the outputs, are unchanged.
Whether the kernel saturates is measured once per process on onnxruntime itself (a MatMulInteger of 255 x 127);
GRAPHQUANT_UNSIGNED_WEIGHTS=1 or 0 forces the rewrite on or off (to build for another machine).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphquant.analysis.layers import constant_array
from graphquant.graph_edit import NameScope, add_initializer, remove_if_unused

# The integer ops' own int8 x int8 kernel is exact (and int8 x uint8 has none), so only uint8 activations count there.
# Codes within +-64 cannot saturate: 255 * (64 + 64) <= 32767 for any adjacent pair.
SAFE_CODE = 64
SHIFT = 128
FORCE_ENV = "GRAPHQUANT_UNSIGNED_WEIGHTS"
# (domain, op) -> input indices: (activation, or None for a dynamically quantized uint8 one; weight; weight scale,
# or None where the op has none; weight zero point).
INTEGER_LAYERS: dict[tuple[str, str], tuple[int | None, int, int | None, int]] = {
    ("", "MatMulInteger"): (0, 1, None, 3),
    ("", "ConvInteger"): (0, 1, None, 3),
    ("", "QLinearMatMul"): (0, 3, 4, 5),
    ("", "QLinearConv"): (0, 3, 4, 5),
    ("com.microsoft", "MatMulIntegerToFloat"): (0, 1, 3, 5),
    ("com.microsoft", "QGemm"): (0, 3, 4, 5),
    ("com.microsoft", "DynamicQuantizeMatMul"): (None, 1, 2, 3),
}
DEQUANTIZE_SLOTS = (0, 1, 2)
QDQ_READERS = ("MatMul", "Gemm", "Conv")


class UnsignedWeightsPass(ir.passes.InPlacePass):
    """Exact: int8 weights of uint8-activation integer layers become uint8 (codes and zero point + 128) where needed."""

    def __init__(self, enabled: bool | None = None):
        super().__init__()
        self.enabled = enabled

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Shift each such weight once (shared weights are shifted once for all their integer readers)."""
        if not (uint8_int8_saturates() if self.enabled is None else self.enabled):
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        names = NameScope(graph)
        shifted: dict[int, ir.Value] = {}
        replaced: list[ir.Value] = []
        for node in list(graph):
            slots = _weight_slots(node)
            if slots is None:
                continue
            weight_index, scale_index, zero_index = slots
            weight = node.inputs[weight_index]
            assert weight is not None
            if id(weight) not in shifted:
                shifted[id(weight)] = _shifted(graph, names, weight)
            zero = node.inputs[zero_index] if zero_index < len(node.inputs) else None
            scale = None if scale_index is None else node.inputs[scale_index]
            new_zero = _shifted_zero_point(graph, names, zero, scale, weight.name or "weight")
            if zero_index >= len(node.inputs):
                node.resize_inputs(zero_index + 1)
            node.replace_input_with(weight_index, shifted[id(weight)])
            node.replace_input_with(zero_index, new_zero)
            replaced += [weight] + ([zero] if zero is not None else [])
        for value in replaced:
            remove_if_unused(graph, value)
        return ir.passes.PassResult(model, modified=bool(shifted))


def _weight_slots(node: ir.Node) -> tuple[int, int | None, int] | None:
    """(weight, scale, zero point) input indices of a node whose int8 weight multiplies uint8 activations, or None."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    if (domain, node.op_type) == ("", "DequantizeLinear"):
        if not _reads_8bit_activations(node):
            return None
        weight_index, scale_index, zero_index = DEQUANTIZE_SLOTS
    elif (layout := INTEGER_LAYERS.get((domain, node.op_type))) is not None:
        activation, weight_index, scale_index, zero_index = layout
        if activation is not None and _code_dtype(node.inputs[activation]) != ir.DataType.UINT8:
            return None
    else:
        return None
    codes = constant_array(node.inputs[weight_index] if weight_index < len(node.inputs) else None)
    if codes is None or codes.dtype != np.int8 or int(np.abs(codes.astype(np.int16)).max(initial=0)) <= SAFE_CODE:
        return None
    return weight_index, scale_index, zero_index


def _reads_8bit_activations(dequantize: ir.Node) -> bool:
    """Whether every reader of a weight's DequantizeLinear is a MatMul/Gemm/Conv whose first input is 8-bit QDQ.

    int8 activations count too: onnxruntime's QDQ fusion on x86 moves them to uint8 (QDQS8ToU8Transformer), which
    meets the saturating kernel; with uint8 weights it leaves the layer unfused (exact).
    """
    uses = list(dequantize.outputs[0].uses())
    if not uses:
        return False
    for reader, index in uses:
        if reader.op_type not in QDQ_READERS or index != 1 or reader.inputs[0] is None:
            return False
        producer = reader.inputs[0].producer()
        if producer is None or producer.op_type != "DequantizeLinear":
            return False
        if _code_dtype(producer.inputs[0]) not in (ir.DataType.UINT8, ir.DataType.INT8):
            return False
    return True


def _code_dtype(value: ir.Value | None) -> ir.DataType | None:
    """The element type of quantized codes: the value's own, else its QuantizeLinear's zero point's (uint8 without)."""
    if value is None:
        return None
    if value.type is not None and value.type.dtype != ir.DataType.UNDEFINED:
        return value.type.dtype
    producer = value.producer()
    if producer is None:
        return None
    if producer.op_type == "DynamicQuantizeLinear":
        return ir.DataType.UINT8
    if producer.op_type != "QuantizeLinear":
        return None
    zero = producer.inputs[2] if len(producer.inputs) > 2 else None
    if zero is None:
        return ir.DataType.UINT8
    return None if zero.type is None else zero.type.dtype


def _shifted(graph: ir.Graph, names: NameScope, value: ir.Value) -> ir.Value:
    """A new uint8 initializer holding the int8 value's codes + 128."""
    codes = constant_array(value)
    assert codes is not None
    return add_initializer(
        graph, names, f"{value.name or 'weight'}_u8", (codes.astype(np.int16) + SHIFT).astype(np.uint8)
    )


def _shifted_zero_point(
    graph: ir.Graph, names: NameScope, zero: ir.Value | None, scale: ir.Value | None, base: str
) -> ir.Value:
    """The uint8 zero point: an int8 one + 128, or 128 in the scale's shape where the zero point was absent (0)."""
    if zero is not None:
        return _shifted(graph, names, zero)
    scale_array = constant_array(scale)
    shape = () if scale_array is None else scale_array.shape
    return add_initializer(graph, names, f"{base}_zero_point_u8", np.full(shape, SHIFT, dtype=np.uint8))


@functools.cache
def uint8_int8_saturates() -> bool:
    """Whether this machine's onnxruntime saturates a uint8 x int8 MatMulInteger (the env variable overrides)."""
    forced = os.environ.get(FORCE_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    depth = 64
    activations = np.full((4, depth), 255, dtype=np.uint8)
    weights = np.full((depth, 16), 127, dtype=np.int8)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "saturation_probe",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, activations.shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT32, None)],
        [onnx.numpy_helper.from_array(weights, "w")],
    )
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    (product,) = session.run(None, {"a": activations})
    return int(product[0, 0]) != depth * 255 * 127
