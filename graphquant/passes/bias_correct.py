"""Bias-correct pass (lossy, after quantize): remove the mean output shift that each layer's quantization causes.

It reads the QuantSpecs that ``quantize`` annotated and changes only float biases, so lowering is untouched: the
specs are lowered to QDQ on a copy of the model, and beside every annotated Conv/Gemm of the copy runs a float
shadow of it, with the float weight on the copy's own (unquantized) input activation. Their difference, averaged per
output channel over the calibration data, is the layer's own shift E[y_q - y]; the layer's bias becomes b - E[y_q - y].
Upstream shifts are each removed at their own layer, so none is counted twice.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.channel_probe import channel_reductions
from graphquant.analysis.layers import Layer, classify, constant_array
from graphquant.graph_edit import NameScope, add_initializer, remove_if_unused
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.quant_spec import INPUT_SPECS_KEY
from graphquant.rewrites import add_to_layer_bias

CORRECTED_OPS = ("Conv", "Gemm")


class BiasCorrectPass(ir.passes.InPlacePass):
    """Lossy: b ← b - E[y_q - y] per output channel of each quantized Conv/Gemm, measured on calibration data."""

    def __init__(self, calibrator: Calibrator | None = None):
        super().__init__()
        self.calibrator = calibrator

    def requires(self, model: ir.Model) -> None:
        """The shifts are measured on calibration data."""
        if self.calibrator is None:
            raise ir.passes.PreconditionError("bias-correct needs calibration data")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Measure every annotated layer's shift in one calibration run, then fold it into the biases."""
        assert self.calibrator is not None
        layers = annotated_layers(model.graph)
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        probe, shift_names, ranks = shadow_probe(model, layers)
        shifts = channel_reductions(self.calibrator, probe, ranks, ("ReduceMean",))
        del probe
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for layer in layers:
            found = shifts.get(shift_names[layer.node.name or ""])
            if found is None or not np.all(np.isfinite(found["ReduceMean"])):
                continue
            modified |= subtract_from_bias(graph, names, layer, found["ReduceMean"].astype(np.float32))
        return ir.passes.PassResult(model, modified=modified)


def annotated_layers(graph: ir.Graph) -> list[Layer]:
    """The Conv/Gemm layers that carry a weight QuantSpec from ``quantize``."""
    layers = []
    for node in graph:
        if node.op_type not in CORRECTED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        layer = classify(node).layer
        if layer is not None and layer.weight_index in node.meta.get(INPUT_SPECS_KEY, {}):
            layers.append(layer)
    return layers


def shadow_probe(model: ir.Model, layers: list[Layer]) -> tuple[ir.Model, dict[str, str], dict[str, int]]:
    """A QDQ-lowered copy with y_q - y of each layer as a value: layer name -> its name, and value name -> rank."""
    probe, twins = _annotated_copy(model)
    originals = {}
    for layer in layers:
        twin = twins[layer.node]
        originals[layer.node.name] = (twin.inputs[layer.activation_index], twin.inputs[layer.weight_index])
    QdqLoweringPass()(probe)
    names = NameScope(probe.graph)
    shift_names, ranks = {}, {}
    for layer in layers:
        twin = twins[layer.node]
        activation, weight = originals[layer.node.name]
        assert weight is not None and weight.const_value is not None
        float_weight = add_initializer(probe.graph, names, f"{weight.name}_float", weight.const_value.numpy())
        inputs = list(twin.inputs)
        inputs[layer.activation_index], inputs[layer.weight_index] = activation, float_weight
        shadow = ir.node(twin.op_type, inputs, dict(twin.attributes), name=names.fresh(f"{twin.name}_float"))
        difference = ir.node("Sub", [twin.outputs[0], shadow.outputs[0]], name=names.fresh(f"{twin.name}_shift"))
        name = difference.outputs[0].name = names.fresh(f"{twin.name}_quantization_shift")
        probe.graph.extend([shadow, difference])
        shift_names[layer.node.name or ""] = name
        ranks[name] = layer.weight_array.ndim if twin.op_type == "Conv" else 2
    return probe, shift_names, ranks


def quantized_copy(model: ir.Model) -> ir.Model:
    """A copy of the model with the specs annotated so far lowered to QDQ: the model as quantized up to now."""
    copy, _ = _annotated_copy(model)
    QdqLoweringPass()(copy)
    return copy


def _annotated_copy(model: ir.Model) -> tuple[ir.Model, dict[ir.Node, ir.Node]]:
    """A clone carrying the original's input specs (clone() does not copy meta), and each node's twin in it."""
    copy = model.clone()
    twins = dict(zip(model.graph, copy.graph))  # clone() keeps the node order
    for node, twin in twins.items():
        if INPUT_SPECS_KEY in node.meta:
            twin.meta[INPUT_SPECS_KEY] = node.meta[INPUT_SPECS_KEY]
    return copy, twins


def subtract_from_bias(graph: ir.Graph, names: NameScope, layer: Layer, shift: np.ndarray) -> bool:
    """b ← b - shift on the layer's bias (created if absent); False where the layer's bias cannot take it."""
    node = layer.node
    if node.op_type == "Gemm":
        return add_to_layer_bias(graph, names, layer, -shift)
    old = node.inputs[2] if len(node.inputs) > 2 else None
    bias = np.zeros(shift.shape, np.float32) if old is None else constant_array(old)
    if bias is None or bias.shape != shift.shape:
        return False
    corrected = add_initializer(graph, names, f"{node.name}_bias_corrected", (bias - shift).astype(np.float32))
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, corrected)
    if old is not None:
        remove_if_unused(graph, old)
    return True
