"""BitMoD pass (lossy, weight-only): per-group data types, dequantized in-graph by a lookup feeding the layer."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphquant.analysis.bitmod import BITMOD_TYPES, CLIP_RATIOS, GROUP_SIZE, BitModWeight, quantize_weight
from graphquant.analysis.layers import Candidate, Layer, candidates
from graphquant.analysis.weight_fit import in_major
from graphquant.graph_edit import NameScope, add_initializer, remove_if_unused
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, KEEP_FLOAT_KEY, LayerDecision
from graphquant.rewrites import layer_output

WORD_BITS = 32
# On a rewritten layer: its weight is BitMoD-coded and computed in-graph; later passes must leave it float.
BITMOD_NOTE = "BitMoD weight-only (weight dequantized in-graph)"


class BitModPass(ir.passes.InPlacePass):
    """Lossy, weight-only: W[k, n] = lut[code + type·2^b] · scale[k // group, n], codes packed in uint32 words.

    Each MatMul/Gemm/Conv/ConvTranspose with a constant float weight is rewritten; groups run along the input channels
    (K) of each output column, and K is zero-padded to a multiple of the group size. A conv weight is flattened per
    output kernel (weight_fit.in_major: K = C_in/group·taps, tap-major) and rebuilt by a Reshape and a Transpose.
    """

    def __init__(self, *, wbits: int = 4, group_size: int = GROUP_SIZE, clip_search: bool = True):
        super().__init__()
        if wbits not in BITMOD_TYPES:
            raise ValueError(f"wbits must be one of {sorted(BITMOD_TYPES)}, got {wbits}")
        if group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.wbits = wbits
        self.group_size = group_size
        self.clip_ratios = CLIP_RATIOS if clip_search else (1.0,)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite every eligible layer (one dequantizer per shared weight); record why the others stay float."""
        graph = model.graph
        names = NameScope(graph)
        dequantized: dict[tuple[ir.Value, int], tuple[ir.Value, str]] = {}
        modified = False
        for candidate in list(candidates(graph)):
            node = candidate.node
            if INPUT_SPECS_KEY in node.meta or DECISION_KEY in node.meta:
                continue
            layer = self._accept(candidate)
            if layer is None:
                continue
            key = (layer.weight, layer.in_axis)
            if key not in dequantized:
                dequantized[key] = self._dequantizer(graph, names, layer)
            _rewire(graph, layer, *dequantized[key])
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def _accept(self, candidate: Candidate) -> Layer | None:
        """The candidate's layer if BitMoD takes it; else record on the node why it stays float."""
        node = candidate.node
        reason = candidate.reason
        if candidate.layer is not None:
            if KEEP_FLOAT_KEY in node.meta:
                reason = node.meta[KEEP_FLOAT_KEY]
            else:
                return candidate.layer
        node.meta[DECISION_KEY] = LayerDecision(
            node.name or "", node.op_type, "float", reason, output=layer_output(node).name or ""
        )
        return None

    def _dequantizer(self, graph: ir.Graph, names: NameScope, layer: Layer) -> tuple[ir.Value, str]:
        """Quantize the layer's weight as [K, N] and add the subgraph that rebuilds it; also the scheme's summary."""
        quantized = quantize_weight(in_major(layer, np.float32), self.wbits, self.group_size, self.clip_ratios)
        value = _lookup_subgraph(graph, names, layer.weight.name or "weight", quantized, layer)
        total = quantized.type_ids.size
        shares = ", ".join(f"{name} {count / total:.0%}" for name, count in quantized.type_counts().items())
        return value, f"BitMoD W{self.wbits} g{self.group_size} (types: {shares})"


def _rewire(graph: ir.Graph, layer: Layer, weight: ir.Value, scheme: str) -> None:
    """Feed the layer the dequantized weight (a transB Gemm becomes plain) and record the decision."""
    node = layer.node
    old = layer.weight
    node.replace_input_with(layer.weight_index, weight)
    if node.op_type == "Gemm" and layer.in_axis == 1:
        node.attributes["transB"] = ir.AttrInt64("transB", 0)
    remove_if_unused(graph, old)
    node.meta[KEEP_FLOAT_KEY] = BITMOD_NOTE
    node.meta[DECISION_KEY] = LayerDecision(
        node.name or "", node.op_type, "quantized", "", scheme, output=layer_output(node).name or ""
    )


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, N] codes -> [ceil(rows / f), N] uint32 words of f = 32 // bits fields; row i·R + r is field i of row r."""
    fields = WORD_BITS // bits
    word_rows = -(-codes.shape[0] // fields)
    slabs = np.zeros((fields * word_rows, codes.shape[1]), np.uint32)
    slabs[: codes.shape[0]] = codes
    shifts = (bits * np.arange(fields, dtype=np.uint32))[:, None, None]
    return np.bitwise_or.reduce(slabs.reshape(fields, word_rows, -1) << shifts, axis=0)


@dataclasses.dataclass
class _Subgraph:
    """The nodes and initializers of one weight's dequantizer, named after the weight."""

    graph: ir.Graph
    names: NameScope
    base: str
    nodes: list[ir.Node] = dataclasses.field(default_factory=list)

    def constant(self, suffix: str, array: np.ndarray) -> ir.Value:
        """A new initializer."""
        return add_initializer(self.graph, self.names, f"{self.base}_bitmod_{suffix}", array)

    def op(self, op_type: str, inputs: list[ir.Value], **attributes: int | str | list[int]) -> ir.Value:
        """A new node's output."""
        node = ir.node(op_type, inputs, attributes, name=self.names.fresh(f"{self.base}_bitmod_{op_type}"))
        node.outputs[0].name = self.names.fresh(f"{self.base}_bitmod_{op_type.lower()}")
        self.nodes.append(node)
        return node.outputs[0]

    def reshape(self, value: ir.Value, shape: tuple[int, ...]) -> ir.Value:
        """Reshape to a constant shape."""
        return self.op("Reshape", [value, self.constant("shape", np.array(shape, np.int64))])

    def first_rows(self, value: ir.Value, count: int) -> ir.Value:
        """The first ``count`` rows."""
        bounds = [
            self.constant(name, np.array([v], np.int64)) for name, v in (("start", 0), ("end", count), ("axis", 0))
        ]
        return self.op("Slice", [value, *bounds])


def _lookup_subgraph(graph: ir.Graph, names: NameScope, base: str, quantized: BitModWeight, layer: Layer) -> ir.Value:
    """W = Gather(lut, code + type offset) · scale per group, reshaped to [K_padded, N], cut to [K, N], laid out."""
    padded_rows, columns = quantized.codes.shape
    groups = padded_rows // quantized.group_size
    sub = _Subgraph(graph, names, base)
    codes = sub.reshape(_unpacked_codes(sub, quantized), (groups, quantized.group_size, columns))
    offsets = sub.constant("type_offsets", (quantized.type_ids << quantized.bits).astype(np.uint8)[:, None, :])
    index = sub.op(
        "Add", [sub.op("Cast", [codes], to=ir.DataType.INT32), sub.op("Cast", [offsets], to=ir.DataType.INT32)]
    )
    unit = sub.op("Gather", [sub.constant("lut", quantized.lut), index], axis=0)
    scaled = sub.op("Mul", [unit, sub.constant("scales", quantized.scales[:, None, :])])
    weight = sub.reshape(scaled, (padded_rows, columns))
    if quantized.rows != padded_rows:
        weight = sub.first_rows(weight, quantized.rows)
    shape = layer.weight_array.shape
    if len(shape) > 2:
        weight = _conv_layout(sub, weight, layer)
    weight.dtype = ir.DataType.FLOAT
    weight.shape = ir.Shape(shape if len(shape) > 2 else [quantized.rows, columns])
    graph.insert_before(graph[0], sub.nodes)  # it reads only initializers; the graph holds the layer
    return weight


def _conv_layout(sub: _Subgraph, matrix: ir.Value, layer: Layer) -> ir.Value:
    """The [K, N] matrix of in_major(layer) back in the conv weight's layout (the inverse of weight_fit.in_major)."""
    shape = layer.weight_array.shape
    if layer.out_axis is None:
        return sub.reshape(matrix, shape)
    axes = (layer.out_axis, *range(2, len(shape)), layer.in_axis)
    # in_major is transpose(W, axes) as [N, K], transposed: [K, N] -> [k..., c, N], then back to W's axes.
    stacked = sub.reshape(matrix, (*shape[2:], shape[layer.in_axis], shape[layer.out_axis]))
    order = (len(shape) - 1, *range(len(shape) - 2), len(shape) - 2)  # -> [N, k..., c], the axes order above
    return sub.op("Transpose", [stacked], perm=[order[i] for i in np.argsort(axes)])


def _unpacked_codes(sub: _Subgraph, quantized: BitModWeight) -> ir.Value:
    """The uint32 codes in row order ([f, R, N], or cut to K_padded rows when f·R exceeds it): two BitShifts."""
    bits = quantized.bits
    padded_rows, columns = quantized.codes.shape
    fields = WORD_BITS // bits
    packed = _pack_codes(quantized.codes, bits)
    words = sub.constant("words", packed)
    # Field i sits at bits [b·i, b·(i+1)): shift it to the top of the word, then down to the bottom.
    left = (WORD_BITS - bits * (1 + np.arange(fields, dtype=np.uint32)))[:, None, None]
    raised = sub.op("BitShift", [words, sub.constant("raise", left)], direction="LEFT")
    lower = sub.constant("lower", np.array(WORD_BITS - bits, np.uint32))
    codes = sub.op("BitShift", [raised, lower], direction="RIGHT")
    stacked_rows = fields * packed.shape[0]
    if stacked_rows == padded_rows:
        return codes
    return sub.first_rows(sub.reshape(codes, (stacked_rows, columns)), padded_rows)
