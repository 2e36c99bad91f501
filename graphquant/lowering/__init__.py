"""Lowering targets: each is a named list of passes that turn QuantSpec annotations into ops."""

from __future__ import annotations

import onnx_ir as ir

from graphquant.lowering.qdq import QdqLoweringPass

TARGETS: dict[str, tuple[type[ir.passes.PassBase], ...]] = {
    "qdq": (QdqLoweringPass,),
}

TARGET_DOCS: dict[str, str] = {
    "qdq": "portable QuantizeLinear/DequantizeLinear pairs (TensorRT, QNN, XNNPACK, onnxruntime)",
}

__all__ = ["TARGETS", "TARGET_DOCS", "QdqLoweringPass"]
