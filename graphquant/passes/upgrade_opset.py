"""Upgrade-opset pass (exact): move models older than the QDQ floor (opset 13) to it before anything is annotated."""

from __future__ import annotations

import onnx.helper
import onnx_ir as ir

from graphquant.logs import silenced
from graphquant.lowering.qdq import MIN_OPSET, upgrade_opset

# From IR version 4 on, initializers need not be listed as graph inputs.
INITIALIZERS_AS_INPUTS_BEFORE_IR = 4


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Exact: convert the default opset up to ``minimum`` (onnxscript's converter, onnx's as fallback).

    The IR version follows the opset. Legacy models (IR version 3) list their initializers as graph inputs as well;
    those inputs are dropped, so the weights are constants that can be rewritten (their values are unchanged).
    """

    def __init__(self, *, minimum: int = MIN_OPSET):
        super().__init__()
        self.minimum = minimum

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Upgrade if needed; a model the converters cannot handle is left as it is for lowering to refuse."""
        before = model.graph.opset_imports.get("", 0)
        if before >= self.minimum:
            return ir.passes.PassResult(model, modified=False)
        legacy_inputs = model.ir_version < INITIALIZERS_AS_INPUTS_BEFORE_IR
        with silenced("onnxscript.version_converter"):  # it logs failures with full tracebacks on stderr
            upgrade_opset(model, self.minimum, fallback=True)
        after = model.graph.opset_imports.get("", 0)
        if after == before:
            return ir.passes.PassResult(model, modified=False)
        if legacy_inputs:
            kept = [value for value in model.graph.inputs if value.name not in model.graph.initializers]
            model.graph.inputs.clear()
            model.graph.inputs.extend(kept)
        model.ir_version = max(model.ir_version, _ir_version_for(after))
        return ir.passes.PassResult(model, modified=True)


def _ir_version_for(opset: int) -> int:
    """The lowest IR version that onnx pairs with this default-domain opset."""
    return min(ir_version for _, ir_version, ai_onnx, *_ in onnx.helper.VERSION_TABLE if ai_onnx >= opset)
