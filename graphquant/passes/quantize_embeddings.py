"""Embedding quantization (lossy): Gather tables in int8 or int4, blocks along the hidden axis."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import constant_array
from graphquant.analysis.weight_fit import WEIGHT_DIGESTS, fit_ranges
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, LayerDecision, QuantSpec, symmetric_spec

# Tables with fewer rows (token types, a handful of segments) are too small to be worth their scales.
MIN_ROWS = 64
# Default block along the hidden axis below 8 bits; at 8 bits one scale per row is enough.
NARROW_BLOCK = 64


class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Lossy: annotate constant 2-D Gather tables with symmetric specs, per row or in blocks along the hidden axis.

    The block size defaults to a whole row at 8 bits and 64 below. Per block, the range is clip-searched for the
    lowest squared error (every row is equally likely to be read).
    """

    def __init__(self, embed_bits: int = 8, embed_block_size: int | None = None, embed_clip_search: bool = True):
        super().__init__()
        if not 2 <= embed_bits <= 8:
            raise ValueError(f"embed_bits must be in 2..8, got {embed_bits}")
        if embed_block_size is not None and embed_block_size < 1:
            raise ValueError(f"embed_block_size must be positive, got {embed_block_size}")
        self.bits = embed_bits
        self.block_size = embed_block_size if embed_block_size is not None or embed_bits == 8 else NARROW_BLOCK
        self.clip_search = embed_clip_search

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Annotate each embedding table once (tables shared by several Gathers get one spec)."""
        modified = False
        for node in model.graph:
            table = embedding_table(node)
            if table is None or INPUT_SPECS_KEY in node.meta:
                continue
            tensor = node.inputs[0].const_value
            assert tensor is not None
            node.meta[INPUT_SPECS_KEY] = {0: self.spec(table, f"{WEIGHT_DIGESTS(tensor)} transposed float64")}
            granularity = "per-row" if self.block_size is None else f"block {self.block_size}"
            scheme = f"embedding W{self.bits} {granularity}" + (" clip-searched" if self.clip_search else "")
            node.meta[DECISION_KEY] = LayerDecision(
                node.name or "", node.op_type, "quantized", "", scheme, output=node.outputs[0].name or ""
            )
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def spec(self, table: np.ndarray, digest: str | None = None) -> QuantSpec:
        """The table's spec: one scale per row (axis 0) or per block of the hidden axis (axis 1).

        ``digest`` stands for the transposed table's values in the clip search's memo (see fit_ranges).
        """
        # fit_ranges blocks the rows of its matrix: the table transposed has the hidden axis as rows.
        block = self.block_size or table.shape[1]
        uniform = np.ones((table.shape[1], 1))
        _, high = fit_ranges(table.T.astype(np.float64), uniform, self.bits, True, block, self.clip_search, digest)
        if self.block_size is None:
            return symmetric_spec(high[0], self.bits, axis=0)
        return symmetric_spec(high.T, self.bits, axis=1, block_size=self.block_size)


def embedding_table(node: ir.Node) -> np.ndarray | None:
    """The constant float32 [rows, hidden] table a Gather on axis 0 reads rows of, or None."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.attributes.get_int("axis", 0) != 0:
        return None
    table = constant_array(node.inputs[0])
    indices = node.inputs[1]
    if table is None or indices is None or indices.const_value is not None:
        return None
    if table.ndim != 2 or table.shape[0] < MIN_ROWS or table.dtype != np.float32:
        return None
    return table
