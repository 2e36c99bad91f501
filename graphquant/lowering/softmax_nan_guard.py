"""Drop a Softmax's NaN guard where its input cannot make NaN (exact for finite attention scores).

The torch exporter writes scaled_dot_product_attention as Softmax(scores + mask) followed by
Where(IsNaN(p), 0, p), which zeroes the rows a mask of -inf blanks out entirely. Where the mask is finite (MiniLM's is
-3.4e38, float32's lowest), a row's largest entry contributes exp(0) = 1 to its sum: Softmax of finite values is never
NaN, and the guard returns p unchanged. onnxruntime runs that Where on one thread, over every attention probability.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import constant_array
from graphquant.graph_edit import remove_if_unused


class DropSoftmaxNanGuardPass(ir.passes.InPlacePass):
    """Remove Where(IsNaN(p), 0, p) after p = Softmax(x + m) when the added mask m is finite by construction."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewire each redundant guard's readers to the Softmax output and remove the guard."""
        graph = model.graph
        modified = False
        for node in list(graph):
            probabilities = _redundant_guard(node)
            if probabilities is None:
                continue
            check, zero = node.inputs[0], node.inputs[1]
            assert check is not None and zero is not None
            node.outputs[0].replace_all_uses_with(probabilities)
            graph.remove(node, safe=True)
            remove_if_unused(graph, zero)
            check_node = check.producer()
            if check_node is not None and not check.uses():
                graph.remove(check_node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _redundant_guard(node: ir.Node) -> ir.Value | None:
    """The Softmax output that this Where(IsNaN(p), 0, p) guards, if the Softmax cannot make NaN; else None."""
    if node.op_type != "Where" or not _standard(node) or len(node.inputs) != 3 or node.outputs[0].is_graph_output():
        return None
    check, zero, probabilities = node.inputs
    if check is None or probabilities is None or (check_node := check.producer()) is None:
        return None
    if check_node.op_type != "IsNaN" or not _standard(check_node) or check_node.inputs[0] is not probabilities:
        return None
    zeros = constant_array(zero)
    softmax = probabilities.producer()
    if zeros is None or zeros.size != 1 or np.any(zeros != 0) or softmax is None or softmax.op_type != "Softmax":
        return None
    total = softmax.inputs[0].producer() if softmax.inputs[0] is not None else None
    if total is None or total.op_type != "Add" or not _standard(total):
        return None
    return probabilities if any(_finite(value) for value in total.inputs) else None


def _finite(value: ir.Value | None) -> bool:
    """A constant of finite values, or Where(condition, a, b) of two finite constants (an additive mask)."""
    if value is None:
        return False
    array = constant_array(value)
    if array is not None:
        return bool(np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all())
    producer = value.producer()
    if producer is None or producer.op_type != "Where" or not _standard(producer) or len(producer.inputs) != 3:
        return False
    return all(constant_array(v) is not None and _finite(v) for v in producer.inputs[1:])


def _standard(node: ir.Node) -> bool:
    """An op of the default ONNX domain."""
    return node.domain in ("", "ai.onnx")
