"""DB-LLM dual binarization (lossy, weight-only): each MatMul/Gemm becomes two 1-bit branches, summed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant import progress
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.dual_binarization import DeviationGram, DualBinary, dual_binarize, rtn_2bit
from graphquant.analysis.layers import Candidate, Layer, candidates
from graphquant.analysis.weight_fit import from_in_major, in_major
from graphquant.graph_edit import NameScope, add_initializer, remove_if_unused
from graphquant.logs import silenced
from graphquant.lowering.qdq import INT4_OPSET, upgrade_opset
from graphquant.quant_spec import DECISION_KEY, INPUT_SPECS_KEY, KEEP_FLOAT_KEY, LayerDecision
from graphquant.rewrites import FLOAT_PATH_SUM_KEY, layer_output

# On a branch node: which of the two binaries it holds (1 or 2); later passes leave its dequantized weight alone.
BRANCH_KEY = "graphquant.dual_binary_branch"
BRANCH_NOTE = "DB-LLM dual-binary branch (weight dequantized in-graph)"
# The code containers a binary may be stored in, with the opset whose DequantizeLinear takes them. UINT2 (opset 25)
# is the narrowest that onnxruntime runs.
CONTAINERS = {2: (ir.DataType.UINT2, 25), 4: (ir.DataType.UINT4, INT4_OPSET)}


class DualBinarizePass(ir.passes.InPlacePass):
    """Lossy: Y = X·W becomes X·(α1·B1) + X·(α2·B2), B_i ∈ {0,1} stored as UINT2 codes behind DequantizeLinear.

    analysis/dual_binarization.py fits the binaries and per-(block, column) scales on the layer's input Gram. A
    negative α_i is stored as scale |α_i| with zero point 1 and codes 1 − B_i, so codes stay in {0,1} and scales
    positive. ``container_bits`` 2 stores the codes as UINT2 (opset 25, the narrowest type onnxruntime dequantizes),
    4 as UINT4 (opset 21); the model is upgraded to that opset.
    ``distill`` applies the deviation-aware row weights (DAD) to the Gram. 2-D-weight MatMul/Gemm layers only.
    """

    cli_name = "dual-binarize"

    def __init__(
        self,
        calibrator: Calibrator | None = None,
        *,
        block_size: int | None = 32,
        iterations: int = 3,
        clip_search: bool = True,
        act_order: bool = True,
        distill: bool = False,
        container_bits: int = 2,
    ):
        super().__init__()
        if (block_size is not None and block_size < 1) or iterations < 0:
            raise ValueError("block_size must be positive (or None: per channel) and iterations >= 0")
        if container_bits not in CONTAINERS:
            raise ValueError(f"container_bits must be one of {sorted(CONTAINERS)}, got {container_bits}")
        self.calibrator = calibrator
        self.block_size = block_size
        self.iterations = iterations
        self.clip_search = clip_search
        self.act_order = act_order
        self.distill = distill
        self.container = CONTAINERS[container_bits]

    def requires(self, model: ir.Model) -> None:
        """Deviation-aware distillation weights calibration rows, so it needs calibration data."""
        if self.distill and self.calibrator is None:
            raise ir.passes.PreconditionError("dual-binarize: distill (DAD) needs calibration data")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Binarize every eligible layer into two branches; record why the other candidates stay float."""
        if not self._layers(model):
            return ir.passes.PassResult(model, modified=False)
        dtype, opset = self.container
        with silenced("onnxscript.version_converter"):
            if not upgrade_opset(model, opset, fallback=False):
                raise ir.passes.PreconditionError(
                    f"dual-binarize needs opset {opset} for {dtype.name} codes; converting the model failed"
                    + (" (container_bits = 4 needs opset 21)" if opset > INT4_OPSET else "")
                )
        layers = self._layers(model)  # again: the opset converter may have replaced nodes
        grams = self._grams(model, layers)
        names = NameScope(model.graph)
        for layer, gram in progress.bar(list(zip(layers, grams)), "dual binarization", unit="layer"):
            block = self.block_size or layer.weight_array.shape[layer.in_axis]
            fitted = dual_binarize(in_major(layer), gram, block, self.clip_search, self.act_order, self.iterations)
            _split(model.graph, names, layer, fitted, self._scheme(), dtype)
        return ir.passes.PassResult(model, modified=True)

    def _layers(self, model: ir.Model) -> list[Layer]:
        """The layers to binarize (recording on the other candidates why they stay float)."""
        return [layer for c in list(candidates(model.graph)) if (layer := self._accept(c)) is not None]

    def _accept(self, candidate: Candidate) -> Layer | None:
        """The candidate's layer if it is a single-use 2-D MatMul/Gemm weight not decided yet, else None."""
        node, layer = candidate.node, candidate.layer
        if INPUT_SPECS_KEY in node.meta or DECISION_KEY in node.meta or layer is None:
            return None
        reason = node.meta.get(KEEP_FLOAT_KEY)
        if reason is None and (node.op_type not in ("MatMul", "Gemm") or layer.weight_array.ndim != 2):
            return None  # left for later passes (convolutions)
        if reason is None and len(layer.weight.uses()) != 1:
            reason = "weight shared with another node (dual-binarize splits single-use weights)"
        if reason is None:
            return layer
        node.meta[DECISION_KEY] = LayerDecision(
            node.name or "", node.op_type, "float", reason, output=layer_output(node).name or ""
        )
        return None

    def _grams(self, model: ir.Model, layers: list[Layer]) -> list[np.ndarray | None]:
        """Each layer's input Gram XᵀX, or with ``distill`` its own deviation-weighted Xᵀ diag(e) X (None: no data)."""
        if self.calibrator is None:
            return [None] * len(layers)
        inputs = sorted({layer.activation.name or "" for layer in layers})
        if not self.distill:
            stats = self.calibrator.collect(model, inputs, gram_names=inputs)
            return [stats[layer.activation.name or ""].gram for layer in layers]
        weighted = [self._deviation_gram(layer) for layer in layers]
        readers: dict[str, list[DeviationGram]] = {}
        for layer, gram in zip(layers, weighted):
            readers.setdefault(layer.activation.name or "", []).append(gram)

        def observe(name: str, batch: np.ndarray) -> None:
            for gram in readers.get(name, []):
                gram.add(batch)

        self.calibrator.collect(model, inputs, observe=observe)
        return [gram.gram() for gram in weighted]

    def _deviation_gram(self, layer: Layer) -> DeviationGram:
        """The DAD Gram accumulator of a layer: its weight and plain 2-bit RTN of it, as [K, N]."""
        matrix = in_major(layer)
        block = self.block_size or matrix.shape[0]
        return DeviationGram(matrix, rtn_2bit(matrix, np.ones((matrix.shape[0], 1)), block, self.clip_search))

    def _scheme(self) -> str:
        """The decision's scheme label."""
        granularity = f"block {self.block_size}" if self.block_size else "per-channel"
        label = f"DB-LLM dual binary W1+W1 ({self.container[0].name} codes in {{0,1}}) {granularity}"
        return label + (" DAD" if self.distill else "")


def _split(
    graph: ir.Graph, names: NameScope, layer: Layer, fitted: DualBinary, scheme: str, dtype: ir.DataType
) -> None:
    """Replace the layer by its two branches (Gemm's C on the first) and an Add under the layer's output name."""
    node = layer.node
    output = node.outputs[0]
    full_output = layer_output(node).name or ""
    branches = [_branch(graph, names, layer, fitted, index, dtype) for index in (0, 1)]
    total = ir.node("Add", [b.outputs[0] for b in branches], name=names.fresh(f"{node.name}_dual_binary_sum"))
    total.meta[FLOAT_PATH_SUM_KEY] = True
    result = total.outputs[0]
    result.type, result.shape = output.type, output.shape
    graph.insert_after(node, [*branches, total])
    original_name = output.name
    output.replace_all_uses_with(result, replace_graph_outputs=True)
    output.name = names.fresh(f"{original_name or 'output'}_undivided")
    result.name = original_name
    old_inputs = [value for value in node.inputs if value is not None]
    graph.remove(node, safe=True)
    for value in old_inputs:
        remove_if_unused(graph, value)
    for number, branch in enumerate(branches, start=1):
        branch.meta[DECISION_KEY] = LayerDecision(
            branch.name or "",
            branch.op_type,
            "quantized",
            f"branch {number} of 2 of {node.name}",
            scheme,
            output=full_output,
        )


def _branch(
    graph: ir.Graph, names: NameScope, layer: Layer, fitted: DualBinary, index: int, dtype: ir.DataType
) -> ir.Node:
    """A copy of the layer reading DequantizeLinear(codes of B_i, |α_i|, zero point [α_i < 0]) as its weight."""
    node = layer.node
    base = f"{layer.weight.name or 'weight'}_binary{index + 1}"
    weight = _dequantized_binary(graph, names, layer, fitted, index, dtype, base)
    inputs: list[ir.Value | None] = list(node.inputs)
    inputs[layer.weight_index] = weight
    if index == 1:
        inputs = inputs[:2]  # Gemm's C is added once, by the first branch
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    branch = ir.node(node.op_type, inputs, attributes, domain=node.domain, name=names.fresh(f"{node.name}_{base}"))
    branch.meta[BRANCH_KEY] = index + 1
    branch.meta[KEEP_FLOAT_KEY] = BRANCH_NOTE
    branch.outputs[0].name = names.fresh(f"{node.name}_branch{index + 1}_out")
    branch.outputs[0].dtype = ir.DataType.FLOAT
    graph.insert_before(node, [weight.producer()])  # type: ignore[list-item]
    return branch


def _dequantized_binary(
    graph: ir.Graph, names: NameScope, layer: Layer, fitted: DualBinary, index: int, dtype: ir.DataType, base: str
) -> ir.Value:
    """DequantizeLinear of branch ``index``'s binary codes (stored as ``dtype``) in the layer's weight layout."""
    binary, alpha = ((fitted.first, fitted.alpha1), (fitted.second, fitted.alpha2))[index]
    negative, used = alpha < 0, alpha != 0
    rows = binary.shape[0]
    flip, keep = (np.repeat(mask, fitted.block, axis=0)[:rows] for mask in (negative, used))
    # a zero scale is stored as 1 with code 0 (zero point 0), so the branch is 0 there
    codes = np.where(keep, np.where(flip, 1 - binary, binary), 0)
    scale = np.where(used, np.abs(alpha), 1.0).astype(np.float32)
    zero_point = negative.astype(np.uint8)
    blocked = fitted.block < rows
    if not blocked:
        scale, zero_point = scale[0], zero_point[0]
    codes = from_in_major(layer, codes.astype(np.uint8))
    if layer.in_axis == 1 and blocked:
        scale, zero_point = scale.T, zero_point.T
    axis = layer.in_axis if blocked else (layer.out_axis or 0)
    attributes = {"axis": axis, **({"block_size": fitted.block} if blocked else {})}
    inputs = [
        add_initializer(graph, names, f"{base}_codes", codes, dtype=dtype),
        add_initializer(graph, names, f"{base}_scale", np.ascontiguousarray(scale)),
        add_initializer(graph, names, f"{base}_zero_point", np.ascontiguousarray(zero_point), dtype=dtype),
    ]
    dequantize = ir.node("DequantizeLinear", inputs, attributes, name=names.fresh(f"{base}_DequantizeLinear"))
    value = dequantize.outputs[0]
    value.name = names.fresh(f"{base}_dequantized")
    value.dtype = ir.DataType.FLOAT
    value.shape = ir.Shape(layer.weight_array.shape)
    return value
