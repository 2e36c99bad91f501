"""Attention matmul quantization (lossy): per-tensor Q/DQ on both inputs of activation x activation MatMuls."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.channel_probe import values_by_name
from graphquant.analysis.layers import constant_array
from graphquant.analysis.stats import TensorStats
from graphquant.graph_edit import NameScope
from graphquant.quant_spec import (
    DECISION_KEY,
    INPUT_SPECS_KEY,
    LayerDecision,
    QuantSpec,
    asymmetric_spec,
    symmetric_spec,
)


class QuantizeAttentionPass(ir.passes.InPlacePass):
    """Lossy: annotate MatMuls whose two inputs are activations (Q·Kᵀ, softmax·V) with per-tensor specs.

    The ranges come from calibration: an input that was never negative (softmax probabilities) gets an unsigned
    [0, max] grid, any other a signed ±max|x| grid, so that readers of QDQ (OpenVINO, TensorRT) run it in int8.
    """

    def __init__(self, calibrator: Calibrator | None = None, attention_bits: int = 8):
        super().__init__()
        if not 2 <= attention_bits <= 8:
            raise ValueError(f"attention_bits must be in 2..8, got {attention_bits}")
        self.calibrator = calibrator
        self.bits = attention_bits

    def requires(self, model: ir.Model) -> None:
        """The ranges come from calibration."""
        if self.calibrator is None:
            raise ir.passes.PreconditionError("quantize-attention needs calibration data")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Annotate every unannotated activation x activation MatMul whose inputs calibration saw finite."""
        assert self.calibrator is not None
        nodes = [node for node in model.graph if _activation_matmul(node)]
        if not nodes:
            return ir.passes.PassResult(model, modified=False)
        names = list(dict.fromkeys(value.name or "" for node in nodes for value in node.inputs if value is not None))
        stats = self.ranges(model, names)
        modified = False
        for node in nodes:
            inputs = [stats[value.name or ""] for value in node.inputs if value is not None]
            if not all(entry.has_finite_values for entry in inputs):
                continue
            node.meta[INPUT_SPECS_KEY] = {index: self.spec(entry) for index, entry in enumerate(inputs)}
            node.meta[DECISION_KEY] = LayerDecision(
                node.name or "",
                node.op_type,
                "quantized",
                "activation x activation MatMul",
                f"A{self.bits} x A{self.bits} per-tensor minmax",
                output=node.outputs[0].name or "",
            )
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def ranges(self, model: ir.Model, names: Sequence[str]) -> dict[str, TensorStats]:
        """Each tensor's range over the calibration data, reduced in the graph to (min, max) per batch on a clone.

        Attention tensors change shape with the sequence length, so their last axis is no channel axis.
        """
        assert self.calibrator is not None
        probe = model.clone()
        values = values_by_name(probe.graph)
        scope = NameScope(probe.graph)
        reduced = {name: _append_range(probe.graph, scope, values[name]) for name in names}
        stats = self.calibrator.collect(probe, list(reduced.values()))
        return {name: stats[output] for name, output in reduced.items()}

    def spec(self, stats: TensorStats) -> QuantSpec:
        """Unsigned [0, max] for a never-negative input, else signed ±max|x|."""
        if stats.minimum >= 0:
            return asymmetric_spec(0.0, stats.maximum, self.bits)
        return symmetric_spec(stats.absmax, self.bits)


def _activation_matmul(node: ir.Node) -> bool:
    """A default-domain MatMul of two float non-constant inputs, not annotated by another pass."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or INPUT_SPECS_KEY in node.meta:
        return False
    return all(
        value is not None and constant_array(value) is None and value.dtype in (None, ir.DataType.FLOAT)
        for value in node.inputs
    )


def _append_range(graph: ir.Graph, names: NameScope, value: ir.Value) -> str:
    """Append Concat(ReduceMin(value), ReduceMax(value)) over all axes, kept as [2, 1, ...]; the output's name."""
    reductions = []
    for op_type in ("ReduceMin", "ReduceMax"):
        node = ir.node(op_type, [value], {"keepdims": 1}, name=names.fresh(f"{value.name}_{op_type}"))
        node.outputs[0].name = names.fresh(f"{value.name}_{op_type}")
        reductions.append(node)
    concat = ir.node(
        "Concat", [node.outputs[0] for node in reductions], {"axis": 0}, name=names.fresh(f"{value.name}_range")
    )
    concat.outputs[0].name = names.fresh(f"{value.name}_range")
    graph.extend([*reductions, concat])
    return concat.outputs[0].name
