"""Rewrite passes, one per module, and the explicit table of their CLI names."""

from __future__ import annotations

import onnx_ir as ir

from graphquant.passes.outlier_decompose import OutlierDecomposePass
from graphquant.passes.preexecute_dequant import PreexecuteDequantPass
from graphquant.passes.quantize import QuantizePass
from graphquant.passes.symmetrize import SymmetrizePass
from graphquant.passes.upgrade_opset import UpgradeOpsetPass

PASSES: dict[str, type[ir.passes.PassBase]] = {
    "symmetrize": SymmetrizePass,
    "preexecute-dequant": PreexecuteDequantPass,
    "outlier-decompose": OutlierDecomposePass,
    "quantize": QuantizePass,
    "upgrade-opset": UpgradeOpsetPass,
}

__all__ = [
    "PASSES",
    "OutlierDecomposePass",
    "PreexecuteDequantPass",
    "QuantizePass",
    "SymmetrizePass",
    "UpgradeOpsetPass",
]
