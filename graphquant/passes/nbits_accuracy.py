"""NBits accuracy pass (analysis): which weight-only layers MatMulNBits may run with int8 activations."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import Layer
from graphquant.analysis.simulate import block_int8_rows, block_int8_sqnr_db, scored_columns, weight_matrix
from graphquant.lowering.matmul_nbits import kernel_block, lowerable_weight_only
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, INT8_COMPUTE_KEY, QuantSpec

SAMPLE_ROWS = 1024


class NBitsAccuracyPass(ir.passes.InPlacePass):
    """Per weight-only layer: int8 compute (accuracy_level 4) only where rounding its calibrated input to int8 per
    block keeps the output SQNR at ``min_sqnr_db`` or more; massive activations get float compute."""

    cli_name = "nbits-accuracy"

    def __init__(self, calibrator: Calibrator | None = None, *, min_sqnr_db: float = 30.0):
        super().__init__()
        self.calibrator = calibrator
        self.min_sqnr_db = min_sqnr_db

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Mark every weight-only layer with whether int8 compute keeps its output within target (without calibration
        data, none is marked: the lowering's accuracy_level applies, as quantize's warning about the data says)."""
        layers = [layer for node in model.graph if (layer := _weight_only(node)) is not None]
        if not layers or self.calibrator is None:
            return ir.passes.PassResult(model, modified=False)
        names = sorted({layer.activation.name or "" for layer in layers})
        stats = self.calibrator.collect(model, names, sample_rows=SAMPLE_ROWS)
        rounded: dict[tuple[str, int], np.ndarray] = {}  # q, k and v (gate and up) read one input: rounded once
        for layer in layers:
            self._mark(layer, _int8_sqnr_db(layer, stats[layer.activation.name or ""].sample, rounded))
        return ir.passes.PassResult(model, modified=True)

    def _mark(self, layer: Layer, sqnr: float) -> None:
        """Record whether int8 compute keeps the layer's simulated output SQNR on the node and its decision."""
        node = layer.node
        node.meta[INT8_COMPUTE_KEY] = sqnr >= self.min_sqnr_db
        compute = "int8" if node.meta[INT8_COMPUTE_KEY] else "float"
        decision = node.meta.get(DECISION_KEY)
        if decision is not None:
            verdict = f"{compute} compute in MatMulNBits (int8 activations: {sqnr:.1f} dB)"
            reason = f"{decision.reason}; {verdict}" if decision.reason else verdict
            node.meta[DECISION_KEY] = dataclasses.replace(decision, reason=reason)


def _int8_sqnr_db(layer: Layer, sample: np.ndarray | None, rounded: dict[tuple[str, int], np.ndarray]) -> float:
    """block_int8_sqnr_db of the layer's scored columns on its input's sample (``rounded``: each input's rows rounded
    per kernel block, filled in here)."""
    rows = np.zeros((1, layer.weight_array.shape[layer.in_axis]), np.float32) if sample is None else sample
    rows = np.asarray(rows, np.float32)
    spec: QuantSpec = layer.node.meta[INPUT_SPECS_KEY][layer.weight_index]
    block = kernel_block(spec, weight_matrix(layer).shape[0])
    key = (layer.activation.name or "", block)
    if key not in rounded:
        rounded[key] = block_int8_rows(rows, block)
    return block_int8_sqnr_db(rows, scored_dequantized(layer, spec), block, rounded[key])


def scored_dequantized(layer: Layer, spec: QuantSpec) -> np.ndarray:
    """The dequantized weight's scored output columns as [C_in, columns]: only those columns are rounded (each one on
    its own scales, as in the whole weight), not the whole weight."""
    columns = scored_columns(layer.weight_array.shape[layer.out_axis])
    along = 0 if spec.scale.ndim == 1 else layer.out_axis  # per output channel, or blocks along the input channels
    subset = dataclasses.replace(
        spec,
        scale=np.take(spec.scale, columns, axis=along),
        zero_point=np.take(spec.zero_point, columns, axis=along),
    )
    dequantized = subset.dequantize(subset.quantize(np.take(layer.weight_array, columns, axis=layer.out_axis)))
    return dequantized if layer.in_axis == 0 else dequantized.T


def _weight_only(node: ir.Node) -> Layer | None:
    """The layer if MatMulNBits will take it with float input (no activation spec)."""
    layer = lowerable_weight_only(node)
    return layer if layer is not None and layer.activation_index not in node.meta[INPUT_SPECS_KEY] else None
