"""Bytes of the stored tensors each layer reads: its weights, scales and codes, through any dequantizing ops."""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir


def constant_cones(graph: ir.Graph) -> dict[str, set[str]]:
    """For each value computed from initializers alone, the names of the initializers it is computed from."""
    cones = {name: {name} for name, value in graph.initializers.items() if value.const_value is not None}
    for node in graph:  # topological order: a node's inputs are settled before it
        inputs = [value for value in node.inputs if value is not None]
        if inputs and all((value.name or "") in cones for value in inputs):
            cone = set().union(*(cones[value.name or ""] for value in inputs))
            cones.update({output.name or "": cone for output in node.outputs})
    return cones


def layer_bytes(model: ir.Model, layer_names: set[str]) -> dict[str, int]:
    """Bytes of the initializers that feed each named node, directly or through constant-only ops (DQ, lookups)."""
    return node_bytes(model, {node.name or "": node for node in model.graph if node.name in layer_names})


def node_bytes(model: ir.Model, nodes: Mapping[str, ir.Node]) -> dict[str, int]:
    """Bytes of the initializers that feed each given node (keyed by a label), directly or through constant-only ops."""
    graph = model.graph
    cones = constant_cones(graph)
    sizes: dict[str, int] = {}
    for label, node in nodes.items():
        sources = set().union(*(cones.get(value.name or "", set()) for value in node.inputs if value is not None))
        sizes[label] = sum(_nbytes(graph.initializers[name]) for name in sources)
    return sizes


def _nbytes(value: ir.Value) -> int:
    """Stored bytes of an initializer (packed 4-bit types count half a byte per element)."""
    tensor = value.const_value
    return 0 if tensor is None else tensor.nbytes


def initializer_bytes(model: ir.Model) -> int:
    """Stored bytes of every initializer of the main graph (what the weights take in the file)."""
    return sum(_nbytes(value) for value in model.graph.initializers.values())
