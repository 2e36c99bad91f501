"""QDQ lowering: turn QuantSpec annotations into QuantizeLinear/DequantizeLinear pairs (portable form)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass

from graphquant.graph_edit import NameScope, add_initializer, insert_after_producer, remove_if_unused
from graphquant.quant_spec import INPUT_SPECS_KEY, QuantSpec

MIN_OPSET = 13
# The INT4/UINT4 element types and blocked Q/DQ (the block_size attribute) exist from opset 21.
INT4_OPSET = 21


class QdqLoweringPass(ir.passes.InPlacePass):
    """Materialize annotated inputs: integer weight initializers + DequantizeLinear, Q/DQ on activations."""

    def requires(self, model: ir.Model) -> None:
        """Per-axis DequantizeLinear needs opset 13 (recipes upgrade older models first, see UpgradeOpsetPass)."""
        opset = model.graph.opset_imports.get("", 0)
        if any(INPUT_SPECS_KEY in node.meta for node in model.graph) and opset < MIN_OPSET:
            raise ir.passes.PreconditionError(
                f"QDQ lowering needs opset >= {MIN_OPSET}; the model has {opset} and could not be converted"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Replace each annotated input with its dequantized form, sharing one Q/DQ per tensor and spec."""
        graph = model.graph
        opset_21 = _opset_21_available(model)
        names = NameScope(graph)
        lowered: dict[tuple[object, ...], ir.Value] = {}
        modified = False
        for node in list(graph):
            specs: dict[int, QuantSpec] | None = node.meta.pop(INPUT_SPECS_KEY, None)
            if not specs:
                continue
            for index, spec in sorted(specs.items()):
                source = node.inputs[index]
                assert source is not None
                key = (id(source), *spec.key)
                if key not in lowered:
                    lowered[key] = _dequantized(graph, names, source, spec, opset_21)
                node.replace_input_with(index, lowered[key])
                remove_if_unused(graph, source)
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    def ensures(self, model: ir.Model) -> None:
        """No annotation is left unlowered."""
        if any(INPUT_SPECS_KEY in node.meta for node in model.graph):
            raise ir.passes.PostconditionError("QDQ lowering left annotated inputs behind")


def _opset_21_available(model: ir.Model) -> bool:
    """Whether 4-bit types and blocks can be used, upgrading the model to opset 21 (onnxscript) if it needs them.

    Raises PreconditionError when blocked specs need opset 21 and the model cannot be converted.
    """
    specs = [spec for node in model.graph for spec in node.meta.get(INPUT_SPECS_KEY, {}).values()]
    if not any(spec.bits <= 4 or spec.block_size is not None for spec in specs):
        return False
    # No fallback to onnx's C converter here: it rebuilds every node and would drop the annotations.
    available = upgrade_opset(model, INT4_OPSET, fallback=False)
    if not available and any(spec.block_size is not None for spec in specs):
        raise ir.passes.PreconditionError(
            f"block-wise weights need opset {INT4_OPSET}; converting the model from opset "
            f"{model.graph.opset_imports.get('', 0)} failed (use per-channel weights: no block_size)"
        )
    return available


def upgrade_opset(model: ir.Model, version: int, fallback: bool) -> bool:
    """Move the model to at least ``version`` of the default opset with onnxscript's converter; False if it fails."""
    if model.graph.opset_imports.get("", 0) < version:
        try:
            ConvertVersionPass(version, fallback=fallback)(model)
        except Exception:  # the converter raises many types; the caller falls back or refuses clearly
            return False
    return model.graph.opset_imports.get("", 0) >= version


def _dequantized(graph: ir.Graph, names: NameScope, source: ir.Value, spec: QuantSpec, opset_21: bool) -> ir.Value:
    """The float value that the quantized form of ``source`` dequantizes to."""
    base = source.name or "tensor"
    storage = storage_type(spec) if opset_21 else None
    scale = add_initializer(graph, names, f"{base}_scale", spec.scale)
    zero_point = add_initializer(
        graph, names, f"{base}_zero_point", spec.zero_point.astype(spec.storage_dtype), dtype=storage
    )
    axis = dequantize_attributes(spec)
    if source.const_value is not None:
        codes = add_initializer(
            graph, names, f"{base}_quantized", spec.quantize(source.const_value.numpy()), dtype=storage
        )
        dequantize = ir.node(
            "DequantizeLinear", [codes, scale, zero_point], axis, name=names.fresh(f"{base}_DequantizeLinear")
        )
        insert_after_producer(graph, codes, [dequantize])
    else:
        quantize = ir.node(
            "QuantizeLinear", [source, scale, zero_point], axis, name=names.fresh(f"{base}_QuantizeLinear")
        )
        quantize.outputs[0].name = names.fresh(f"{base}_quantized")
        clamp = None if storage is not None else narrow_grid_clip(graph, names, quantize.outputs[0], spec)
        codes = quantize.outputs[0] if clamp is None else clamp.outputs[0]
        dequantize = ir.node(
            "DequantizeLinear", [codes, scale, zero_point], axis, name=names.fresh(f"{base}_DequantizeLinear")
        )
        insert_after_producer(graph, source, [quantize, *([] if clamp is None else [clamp]), dequantize])
    output = dequantize.outputs[0]
    output.name = names.fresh(f"{base}_dequantized")
    output.dtype = ir.DataType.FLOAT
    output.shape = source.shape
    return output


def storage_type(spec: QuantSpec) -> ir.DataType | None:
    """INT4/UINT4 for grids of at most 4 bits (opset 21), else None: the 8-bit type of the spec."""
    if spec.bits > 4:
        return None
    return ir.DataType.INT4 if spec.signed else ir.DataType.UINT4


def dequantize_attributes(spec: QuantSpec) -> dict[str, int]:
    """The axis and block_size attributes of the spec's Q/DQ nodes."""
    attributes = {} if spec.axis is None else {"axis": spec.axis}
    if spec.block_size is not None:
        attributes["block_size"] = spec.block_size
    return attributes


def narrow_grid_clip(
    graph: ir.Graph, names: NameScope, codes: ir.Value, spec: QuantSpec, offset: int = 0
) -> ir.Node | None:
    """A Clip of integer codes to the spec's grid when it is narrower than 8 bits (not yet inserted), else None.

    QuantizeLinear only saturates to its 8-bit storage type, so without it an A6 activation outside the
    calibrated range would keep codes beyond ±31. ``offset`` moves the bounds (128 for uint8 codes of a signed grid).
    """
    if spec.bits >= 8:
        return None
    dtype = np.dtype(codes.dtype.numpy() if codes.dtype is not None else spec.storage_dtype)
    base = codes.name or "codes"
    low = add_initializer(graph, names, f"{base}_min", np.array(spec.qmin + offset, dtype))
    high = add_initializer(graph, names, f"{base}_max", np.array(spec.qmax + offset, dtype))
    clip = ir.node("Clip", [codes, low, high], name=names.fresh(f"{base}_Clip"))
    clip.outputs[0].name = names.fresh(f"{base}_clipped")
    clip.outputs[0].dtype = ir.DataType.from_numpy(dtype)
    clip.outputs[0].shape = codes.shape
    return clip
