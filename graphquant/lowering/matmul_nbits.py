"""ort-cpu lowering of weight-only layers: com.microsoft MatMulNBits (2/4/8-bit codes packed along K, bias fused)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import Layer, classify
from graphquant.analysis.weight_fit import stored_codes
from graphquant.graph_edit import NameScope, add_initializer
from graphquant.lowering.ort_cpu import MICROSOFT_DOMAIN, fused_bias, swap_in_fused
from graphquant.lowering.qlinear import plain_gemm
from graphquant.quant_spec import INPUT_SPECS_KEY, INT8_COMPUTE_KEY, QuantSpec

# MatMulNBits packs codes of these widths; other widths go into the next wider container with the same grid.
CONTAINER_BITS = (2, 4, 8)
# accuracy_level 4: int8 compute (A quantized per block at run time), the fast path on x86; 0 keeps A in float.
INT8_COMPUTE = 4
FLOAT_COMPUTE = 0


class MatMulNBitsLoweringPass(ir.passes.InPlacePass):
    """Replace MatMul/Gemm layers whose weight alone is annotated (weight-only) by MatMulNBits.

    An activation spec on the same layer (W4A8) stays on the new node's input A for the QDQ lowering after it. A layer
    that the nbits-accuracy pass marked unfit for int8 compute gets float compute whatever ``accuracy_level`` says.
    """

    def __init__(self, accuracy_level: int = INT8_COMPUTE):
        super().__init__()
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Lower every eligible layer."""
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for node in list(graph):
            layer = lowerable_weight_only(node)
            if layer is not None:
                level = self.accuracy_level if node.meta.get(INT8_COMPUTE_KEY, True) else FLOAT_COMPUTE
                _replace(graph, names, layer, level)
                modified = True
        if modified:
            graph.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=modified)


def lowerable_weight_only(node: ir.Node) -> Layer | None:
    """The layer if its weight spec fits MatMulNBits (a 2-D weight, per output channel or in blocks along K of a
    power of two from 16 on) and it is weight-only, or has blocked weights and a per-tensor activation spec."""
    specs: dict[int, QuantSpec] | None = node.meta.get(INPUT_SPECS_KEY)
    if not specs or node.op_type not in ("MatMul", "Gemm"):
        return None
    layer = classify(node).layer
    if layer is None or layer.weight_index not in specs or layer.weight_array.ndim != 2:
        return None
    if node.op_type == "Gemm" and (not plain_gemm(node) or node.attributes.get_int("transA", 0)):
        return None
    spec = specs[layer.weight_index]
    activation_spec = specs.get(layer.activation_index)
    if activation_spec is not None and (activation_spec.axis is not None or spec.block_size is None):
        return None  # per-channel weights with int8 activations are faster as MatMulIntegerToFloat
    if spec.block_size is None:
        return layer if spec.axis == layer.out_axis else None
    return layer if spec.axis == layer.in_axis and _power_of_two_block(spec.block_size) else None


def _power_of_two_block(block_size: int) -> bool:
    """MatMulNBits takes block sizes that are powers of two from 16 on."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


def kernel_block(spec: QuantSpec, depth: int) -> int:
    """MatMulNBits' block along K: the spec's block, or per_channel_block's for per-channel codes."""
    return spec.block_size or per_channel_block(depth, container_bits(spec.bits))


def per_channel_block(depth: int, width: int) -> int:
    """The power-of-two block (16 on) that stores a column's K = ``depth`` codes of ``width`` bits in the fewest bytes.

    Each block stores its codes, padded past K, and a float scale: the column's one scale, repeated. K = 384 takes
    blocks of 128 (396 bytes at 8 bits) rather than one of 512 (516 bytes); ties go to the larger block.
    """
    blocks = [1 << power for power in range(covering_block(depth).bit_length() - 1, 3, -1)]
    return min(blocks, key=lambda block: -(-depth // block) * (block * width // 8 + 4))


def covering_block(depth: int) -> int:
    """The power-of-two block from 16 on that covers K = ``depth`` in one block."""
    return max(16, 1 << (depth - 1).bit_length())


def container_bits(bits: int) -> int:
    """The narrowest MatMulNBits code width that holds a grid of ``bits``."""
    return next(width for width in CONTAINER_BITS if width >= bits)


def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes of ``bits`` (2, 4 or 8) along the last axis into bytes, first code in the low bits."""
    per_byte = 8 // bits
    padding = (-codes.shape[-1]) % per_byte
    padded = np.concatenate([codes, np.zeros((*codes.shape[:-1], padding), codes.dtype)], axis=-1).astype(np.uint16)
    grouped = padded.reshape(*codes.shape[:-1], -1, per_byte)
    packed = np.zeros(grouped.shape[:-1], np.uint16)
    for position in range(per_byte):
        packed |= grouped[..., position] << (bits * position)
    return packed.astype(np.uint8)


def unsigned_blocks(
    codes: np.ndarray, zero_point: np.ndarray, spec: QuantSpec, width: int, block: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """[rows, K] spec codes as unsigned [rows, blocks, block] codes of ``width`` bits, and their zero points.

    Signed symmetric grids move up by 2^(width-1), the kernels' default zero point, so no zero point is stored.
    Padding codes past K equal the zero point: they dequantize to 0.
    """
    rows, depth = codes.shape
    count = -(-depth // block)
    offset = 2 ** (width - 1) if spec.signed else 0
    unsigned = codes.astype(np.int16) + offset
    points = zero_point.astype(np.int16) + offset
    padded = np.repeat(points, block, axis=1)[:, : count * block].copy()
    padded[:, :depth] = unsigned
    stored_points = None if spec.signed else points.astype(np.uint8)
    return padded.reshape(rows, count, block).astype(np.uint8), stored_points


def _replace(graph: ir.Graph, names: NameScope, layer: Layer, accuracy_level: int) -> None:
    """Swap the layer (and a following bias Add) for one MatMulNBits."""
    node = layer.node
    specs: dict[int, QuantSpec] = node.meta.pop(INPUT_SPECS_KEY)
    spec = specs[layer.weight_index]
    codes = stored_codes(spec, layer.weight)
    scale, zero_point = spec.scale, spec.zero_point
    rows_by_k = codes.T if layer.in_axis == 0 else codes  # MatMulNBits stores B as [N, K]
    columns, depth = rows_by_k.shape
    block = kernel_block(spec, depth)
    if spec.block_size is None:  # each column's scale and zero point, repeated for each of its blocks
        count = -(-depth // block)
        scale, zero_point = (np.repeat(array[:, None], count, axis=1) for array in (scale, zero_point))
    elif layer.in_axis == 0:
        scale, zero_point = scale.T, zero_point.T
    width = container_bits(spec.bits)
    blocks, stored_points = unsigned_blocks(rows_by_k, zero_point, spec, width, block)
    base = layer.weight.name or "weight"
    inputs: list[ir.Value | None] = [
        layer.activation,
        add_initializer(graph, names, f"{base}_packed", pack_low_first(blocks, width)),
        add_initializer(graph, names, f"{base}_scale", np.ascontiguousarray(scale, np.float32).reshape(-1)),
        None
        if stored_points is None
        else add_initializer(graph, names, f"{base}_zero_point", pack_low_first(stored_points, width).reshape(-1)),
        None,
    ]
    bias, replaced = fused_bias(node, columns)
    if bias is not None:
        inputs.append(add_initializer(graph, names, f"{node.name or 'layer'}_bias", bias))
    attributes = {"K": depth, "N": columns, "bits": width, "block_size": block, "accuracy_level": accuracy_level}
    fused = ir.node("MatMulNBits", inputs, attributes, domain=MICROSOFT_DOMAIN, name=node.name)
    activation_specs = {0: specs[layer.activation_index]} if layer.activation_index in specs else {}
    if activation_specs:
        fused.meta[INPUT_SPECS_KEY] = activation_specs
    swap_in_fused(graph, replaced, fused)
