"""Lowering targets: each is a named list of passes that turn QuantSpec annotations into ops."""

from __future__ import annotations

import onnx_ir as ir

from graphquant.lowering.ort_cpu import OrtCpuLoweringPass
from graphquant.lowering.qdq import QdqLoweringPass

# Later passes pick up what earlier ones leave: ort-cpu lowers what MatMulIntegerToFloat covers, QDQ the rest.
TARGETS: dict[str, tuple[type[ir.passes.PassBase], ...]] = {
    "qdq": (QdqLoweringPass,),
    "ort-cpu": (OrtCpuLoweringPass, QdqLoweringPass),
}

TARGET_DOCS: dict[str, str] = {
    "qdq": "portable QuantizeLinear/DequantizeLinear pairs (TensorRT, QNN, XNNPACK, onnxruntime)",
    "ort-cpu": "fastest on onnxruntime CPU: uint8 x int8 MatMulIntegerToFloat with the bias fused, QDQ elsewhere",
}

__all__ = ["TARGETS", "TARGET_DOCS", "OrtCpuLoweringPass", "QdqLoweringPass"]
