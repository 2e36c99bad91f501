"""Rewrite passes, one per module, and the explicit table of their CLI names."""

from __future__ import annotations

import onnx_ir as ir

from graphquant.passes.preexecute_dequant import PreexecuteDequantPass
from graphquant.passes.quantize import QuantizePass
from graphquant.passes.symmetrize import SymmetrizePass

PASSES: dict[str, type[ir.passes.PassBase]] = {
    "symmetrize": SymmetrizePass,
    "preexecute-dequant": PreexecuteDequantPass,
    "quantize": QuantizePass,
}

__all__ = ["PASSES", "PreexecuteDequantPass", "QuantizePass", "SymmetrizePass"]
