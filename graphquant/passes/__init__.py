"""Rewrite passes, one per module, and the explicit table of their CLI names."""

from __future__ import annotations

import onnx_ir as ir

from graphquant.passes.quantize import QuantizePass

PASSES: dict[str, type[ir.passes.PassBase]] = {
    "quantize": QuantizePass,
}

__all__ = ["PASSES", "QuantizePass"]
