"""Attention matmul quantization (lossy): per-tensor Q/DQ on both inputs of activation x activation MatMuls."""

from __future__ import annotations

import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import constant_array
from graphquant.analysis.stats import TensorStats
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
        stats = self.calibrator.collect(model, names)
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
