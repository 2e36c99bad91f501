"""Upgrade-opset pass (exact): move models older than the QDQ floor (opset 13) to it before anything is annotated."""

from __future__ import annotations

import onnx_ir as ir

from graphquant.lowering.qdq import MIN_OPSET, upgrade_opset


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Exact: convert the default opset up to ``minimum`` (onnxscript's converter, onnx's as fallback)."""

    def __init__(self, *, minimum: int = MIN_OPSET):
        super().__init__()
        self.minimum = minimum

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Upgrade if needed; a model the converters cannot handle is left as it is for lowering to refuse."""
        before = model.graph.opset_imports.get("", 0)
        if before >= self.minimum:
            return ir.passes.PassResult(model, modified=False)
        upgrade_opset(model, self.minimum, fallback=True)
        return ir.passes.PassResult(model, modified=model.graph.opset_imports.get("", 0) != before)
