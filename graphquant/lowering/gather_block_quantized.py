"""ort-cpu lowering of quantized embedding tables: com.microsoft GatherBlockQuantized (gathers, then dequantizes)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.weight_fit import stored_codes
from graphquant.graph_edit import NameScope, add_initializer
from graphquant.lowering.matmul_nbits import container_bits, pack_low_first, unsigned_blocks
from graphquant.lowering.ort_cpu import MICROSOFT_DOMAIN
from graphquant.lowering.qlinear import replace_output
from graphquant.quant_spec import INPUT_SPECS_KEY, QuantSpec

# GatherBlockQuantized stores 4- or 8-bit codes, in blocks of a power of two from 16 on.
GATHER_CONTAINER_BITS = (4, 8)


class GatherBlockQuantizedLoweringPass(ir.passes.InPlacePass):
    """Replace Gathers of annotated tables by GatherBlockQuantized, which dequantizes only the rows it reads.

    A DequantizeLinear feeding Gather (the QDQ form) would dequantize the whole table on every run.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Lower every eligible Gather."""
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for node in list(graph):
            spec = _lowerable(node)
            if spec is not None:
                _replace(graph, names, node, spec)
                modified = True
        if modified:
            graph.opset_imports.setdefault(MICROSOFT_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=modified)


def _lowerable(node: ir.Node) -> QuantSpec | None:
    """The table's spec if it is per row, or blocked along the hidden axis in blocks GatherBlockQuantized takes."""
    specs: dict[int, QuantSpec] | None = node.meta.get(INPUT_SPECS_KEY)
    if node.op_type != "Gather" or not specs or set(specs) != {0}:
        return None
    spec = specs[0]
    if spec.axis == 0 and spec.block_size is None:
        return spec
    block = spec.block_size
    if spec.axis != 1 or block is None or block < 16 or block & (block - 1):
        return None
    return spec


def _replace(graph: ir.Graph, names: NameScope, node: ir.Node, spec: QuantSpec) -> None:
    """One GatherBlockQuantized in place of the Gather."""
    table, indices = node.inputs[0], node.inputs[1]
    assert table is not None and table.const_value is not None and indices is not None
    width = next(bits for bits in GATHER_CONTAINER_BITS if bits >= container_bits(spec.bits))
    rows, hidden = table.const_value.shape.numpy()
    # A per-row spec is one block per row: the smallest power of two that covers the row.
    block = spec.block_size or max(16, 1 << (hidden - 1).bit_length())
    scale = spec.scale.reshape(rows, -1)
    zero_point = spec.zero_point.reshape(rows, -1)
    codes, stored_points = unsigned_blocks(stored_codes(spec, table), zero_point, spec, width, block)
    codes = codes.reshape(rows, -1)[:, :hidden]
    base = table.name or "table"
    inputs = [
        add_initializer(graph, names, f"{base}_packed", pack_low_first(codes, width) if width < 8 else codes),
        indices,
        add_initializer(graph, names, f"{base}_scale", scale.astype(np.float32)),
    ]
    if stored_points is not None:
        inputs.append(add_initializer(graph, names, f"{base}_zero_point", pack_low_first(stored_points, width)))
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": width}
    node.meta.pop(INPUT_SPECS_KEY)
    gather = ir.node("GatherBlockQuantized", inputs, attributes, domain=MICROSOFT_DOMAIN, name=node.name)
    replace_output(graph, node, [gather], gather.outputs[0])
