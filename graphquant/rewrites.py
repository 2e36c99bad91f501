"""Exact rewrite primitives shared by the scale-migration passes: channel affines, weight rows, biases."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import RMS_NORM_OPS, Layer, channel_scale_input, classify, constant_array
from graphquant.analysis.runner import release_mapping
from graphquant.graph_edit import NameScope, add_initializer, insert_after_producer, read_in_slices, remove_if_unused
from graphquant.quant_spec import KEEP_FLOAT_KEY
from graphquant.scratch import drop_pages, file_backed_array

# Marks the Mul/Add nodes that carry a group's channel affine, so later passes can compose into them.
AFFINE_BRANCH_KEY = "graphquant.affine_branch"
# Marks the Add that sums a layer's int path and its float path (the layer's real output).
FLOAT_PATH_SUM_KEY = "graphquant.float_path_sum"
# Marks the Mul that multiplies a layer's output by the run-time per-row scale its activation was divided by.
ROW_SCALE_KEY = "graphquant.row_scale"
# The smallest per-row scale: an all-zero row (padding) is divided by this instead of by zero.
MIN_ROW_SCALE = 1e-30
# Readers that see only a tensor's shape, which a per-channel affine keeps.
SHAPE_ONLY_OPS = ("Shape", "Size")
# weight_times converts about this many weights at a time to float64.
WEIGHT_CHUNK_ELEMENTS = 1 << 20


def apply_channel_affine(
    graph: ir.Graph,
    names: NameScope,
    activation: ir.Value,
    readers: Sequence[ir.Node],
    scale: np.ndarray,
    offset: np.ndarray,
) -> tuple[ir.Value, str]:
    """Make ``readers`` see x*scale + offset (per last-axis channel) in place of x; other readers keep x.

    Returns the value the readers now read and how the affine was placed.
    """
    if np.all(scale == 1) and np.all(offset == 0):
        return activation, "identity"
    exclusive = _exclusive(activation, readers)
    producer = activation.producer()
    if producer is not None and _foldable_layer_norm(producer, scale.size):
        if exclusive:
            _fold_into_layer_norm(graph, names, producer, producer, scale, offset)
            return activation, "folded into LayerNormalization"
        clone = _clone_node(graph, names, producer)
        _fold_into_layer_norm(graph, names, clone, producer, scale, offset)
        _redirect(readers, activation, clone.outputs[0])
        return clone.outputs[0], "folded into a copy of LayerNormalization"
    if exclusive and producer is not None and _fold_through_relu(graph, names, producer, scale, offset):
        return activation, "folded through Relu into the producing layer"
    if exclusive:
        base, old_scale, old_offset = _existing_branch(activation)
        if old_scale is not None and old_offset is not None:
            _remove_branch(graph, activation)
            # (x*a1 + c1)*a2 + c2 = x*(a1*a2) + (c1*a2 + c2), placed afresh on the branch's input
            return apply_channel_affine(graph, names, base, readers, old_scale * scale, old_offset * scale + offset)
    if producer is not None and np.any(scale != 1):
        scaled, how = _absorb_scale(graph, names, producer, readers, exclusive, scale)
        if scaled is not None:
            return _offset_branch(graph, names, scaled, readers, offset, how)
    new_value = _insert_branch(graph, names, activation, scale, offset)
    _redirect(readers, activation, new_value)
    return new_value, "Mul/Add on the quantized branch"


def _absorb_scale(
    graph: ir.Graph, names: NameScope, producer: ir.Node, readers: Sequence[ir.Node], exclusive: bool, scale: np.ndarray
) -> tuple[ir.Value | None, str]:
    """Fold x*scale into the producer: its per-channel weight (RMSNorm) or the layer making a factor of a product.

    Returns the value that now carries x*scale for the readers (None if the producer cannot absorb it) and how.
    """
    index = None if AFFINE_BRANCH_KEY in producer.meta else channel_scale_input(producer, scale.size)
    if index is not None:
        target = producer if exclusive else _clone_node(graph, names, producer)
        factor = constant_array(target.inputs[index])
        assert factor is not None
        scaled = (factor * scale.reshape(factor.shape)).astype(factor.dtype)
        target.replace_input_with(index, add_initializer(graph, names, f"{target.name or 'mul'}_scaled", scaled))
        if not exclusive:
            _redirect(readers, producer.outputs[0], target.outputs[0])
        kind = "RMSNorm scale" if producer.op_type in RMS_NORM_OPS else "per-channel Mul weight (RMSNorm)"
        return target.outputs[0], f"folded into {'a copy of ' if not exclusive else ''}the {kind}"
    if exclusive and _fold_into_gated_product(graph, names, producer, scale):
        return producer.outputs[0], "folded into the output columns of the layer making one factor of the product"
    return None, ""


def _offset_branch(
    graph: ir.Graph, names: NameScope, value: ir.Value, readers: Sequence[ir.Node], offset: np.ndarray, how: str
) -> tuple[ir.Value, str]:
    """Make ``readers`` see value + offset (an Add on the quantized branch), or value itself for a zero offset."""
    if np.all(offset == 0):
        return value, how
    shifted = _insert_branch(graph, names, value, np.ones_like(offset), offset)
    _redirect(readers, value, shifted)
    return shifted, f"{how}, shift as an Add on the quantized branch"


def _fold_into_gated_product(graph: ir.Graph, names: NameScope, product: ir.Node, scale: np.ndarray) -> bool:
    """(a ⊙ (X·W + b))·s = a ⊙ (X·(W·diag(s)) + b·s): scale the columns of a layer whose output only the Mul reads.

    This is SwiGLU's down_proj input, SiLU(gate) ⊙ up: linear in up, so up's output columns take the scale.
    """
    if product.op_type != "Mul" or product.domain not in ("", "ai.onnx") or len(product.inputs) != 2:
        return False
    first, second = product.inputs
    if first is None or second is None or first is second:
        return False
    return any(_scale_layer_output(graph, names, operand, product, scale) for operand in (second, first))


def _clone_node(graph: ir.Graph, names: NameScope, node: ir.Node) -> ir.Node:
    """A single-output copy of the node reading the same inputs, placed right after it."""
    clone = ir.node(
        node.op_type,
        list(node.inputs),
        {name: attr.value for name, attr in node.attributes.items()},
        domain=node.domain,
        name=names.fresh(f"{node.name or node.op_type}_quantized_branch"),
    )
    output = clone.outputs[0]
    output.name = names.fresh(f"{node.outputs[0].name or node.op_type}_quantized_branch")
    output.type = node.outputs[0].type
    output.shape = node.outputs[0].shape
    graph.insert_after(node, clone)
    return clone


def _fold_through_relu(graph: ir.Graph, names: NameScope, relu: ir.Node, scale: np.ndarray, offset: np.ndarray) -> bool:
    """Relu(x)·s = Relu(x·s) for s > 0: scale the output columns and bias of the MatMul/Gemm feeding the Relu."""
    if relu.op_type != "Relu" or np.any(offset != 0) or np.any(scale <= 0) or relu.inputs[0] is None:
        return False
    return _scale_layer_output(graph, names, relu.inputs[0], relu, scale)


def _scale_layer_output(graph: ir.Graph, names: NameScope, value: ir.Value, reader: ir.Node, scale: np.ndarray) -> bool:
    """Scale the output columns and bias of the MatMul(+bias Add)/Gemm making ``value``, which only ``reader`` reads."""
    if value.is_graph_output() or list(value.consumers()) != [reader] or (producer := value.producer()) is None:
        return False
    bias_site: tuple[ir.Node, int] | None = None
    if producer.op_type == "Add":
        matmul = next((v.producer() for v in producer.inputs if v is not None and v.producer() is not None), None)
        bias_site = bias_add_of(matmul) if matmul is not None and matmul.op_type == "MatMul" else None
        if bias_site is None or bias_site[0] is not producer:
            return False
        layer_node = matmul
    elif producer.op_type == "MatMul" or (producer.op_type == "Gemm" and _gemm_scalable(producer)):
        layer_node = producer
        bias_site = (producer, 2) if producer.op_type == "Gemm" and len(producer.inputs) > 2 else None
    else:
        return False
    layer = classify(layer_node).layer
    if layer is None or layer.weight_array.shape[layer.out_axis] != scale.size:
        return False
    scale_weight_columns(graph, names, layer, scale)
    if bias_site is not None and (bias := constant_array(bias_site[0].inputs[bias_site[1]])) is not None:
        scaled = (bias * scale.reshape((1,) * (bias.ndim - 1) + (scale.size,))).astype(bias.dtype)
        bias_site[0].replace_input_with(
            bias_site[1], add_initializer(graph, names, f"{layer_node.name}_bias_scaled", scaled)
        )
    return True


def _gemm_scalable(node: ir.Node) -> bool:
    """A Gemm with a constant weight and a constant 1-D (or absent) C."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return True
    bias = constant_array(node.inputs[2])
    return bias is not None and bias.ndim == 1


def _exclusive(activation: ir.Value, readers: Sequence[ir.Node]) -> bool:
    """Whether only ``readers`` read the activation's values (and it is no graph output); Shape/Size read none."""
    others = set(activation.consumers()) - set(readers)
    return not activation.is_graph_output() and all(node.op_type in SHAPE_ONLY_OPS for node in others)


def _redirect(readers: Sequence[ir.Node], old: ir.Value, new: ir.Value) -> None:
    """Point every input of ``readers`` that reads ``old`` at ``new``."""
    for node in readers:
        for index, value in enumerate(node.inputs):
            if value is old:
                node.replace_input_with(index, new)


def _foldable_layer_norm(node: ir.Node, channels: int) -> bool:
    """A LayerNormalization over the last axis with constant per-channel gamma (and beta)."""
    if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    if node.attributes.get_int("axis", -1) != -1:
        return False
    if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
        return False
    gamma = constant_array(node.inputs[1])
    beta = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if gamma is None or gamma.shape != (channels,):
        return False
    has_beta_input = len(node.inputs) > 2 and node.inputs[2] is not None
    return not has_beta_input or (beta is not None and beta.shape == (channels,))


def _fold_into_layer_norm(
    graph: ir.Graph, names: NameScope, target: ir.Node, source: ir.Node, scale: np.ndarray, offset: np.ndarray
) -> None:
    """gamma <- gamma*scale, beta <- beta*scale + offset, written into ``target`` from ``source``'s params."""
    gamma = constant_array(source.inputs[1])
    assert gamma is not None
    beta_value = source.inputs[2] if len(source.inputs) > 2 else None
    beta = constant_array(beta_value)
    beta = np.zeros_like(gamma) if beta is None else beta
    base = target.name or "layer_norm"
    new_gamma = add_initializer(graph, names, f"{base}_gamma", (gamma * scale).astype(gamma.dtype))
    new_beta = add_initializer(graph, names, f"{base}_beta", (beta * scale + offset).astype(gamma.dtype))
    inputs = list(target.inputs)
    if len(inputs) < 3:
        target.resize_inputs(3)
    target.replace_input_with(1, new_gamma)
    target.replace_input_with(2, new_beta)


def _existing_branch(activation: ir.Value) -> tuple[ir.Value, np.ndarray | None, np.ndarray | None]:
    """If the activation ends one of our Mul/Add branches: its base input and current (scale, offset)."""
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None
    value = activation
    while (producer := value.producer()) is not None and AFFINE_BRANCH_KEY in producer.meta:
        constant = constant_array(producer.inputs[1])
        assert constant is not None
        if producer.op_type == "Add":
            offset = constant
        else:
            scale = constant
        base = producer.inputs[0]
        assert base is not None
        value = base
    if value is activation:
        return activation, None, None
    channels = (scale if scale is not None else offset).size  # type: ignore[union-attr]
    return (
        value,
        scale if scale is not None else np.ones(channels, np.float32),
        offset if offset is not None else np.zeros(channels, np.float32),
    )


def _remove_branch(graph: ir.Graph, activation: ir.Value) -> None:
    """Remove our Mul/Add branch that ends in ``activation`` (its readers must be redirected after)."""
    chain = []
    value = activation
    while (producer := value.producer()) is not None and AFFINE_BRANCH_KEY in producer.meta:
        chain.append(producer)
        value = producer.inputs[0]  # type: ignore[assignment]
    # Detach readers first so that the nodes are safe to remove.
    for usage in list(activation.uses()):
        usage.node.replace_input_with(usage.idx, value)
    graph.remove(chain, safe=True)


def _insert_branch(
    graph: ir.Graph, names: NameScope, base: ir.Value, scale: np.ndarray, offset: np.ndarray
) -> ir.Value:
    """Insert Mul(scale) and Add(offset) after ``base`` (identity parts left out); return the result."""
    nodes = []
    value = base
    stem = base.name or "activation"
    for op_type, constant, identity in (("Mul", scale, 1.0), ("Add", offset, 0.0)):
        if np.all(constant == identity):
            continue
        operand = add_initializer(graph, names, f"{stem}_{op_type.lower()}", constant.astype(np.float32))
        node = ir.node(op_type, [value, operand], name=names.fresh(f"{stem}_{op_type}"))
        node.meta[AFFINE_BRANCH_KEY] = True
        node.outputs[0].name = names.fresh(f"{stem}_{op_type.lower()}_out")
        node.outputs[0].dtype = ir.DataType.FLOAT
        node.outputs[0].shape = base.shape
        nodes.append(node)
        value = node.outputs[0]
    insert_after_producer(graph, base, nodes)
    return value


def scale_weight_rows(graph: ir.Graph, names: NameScope, layer: Layer, factors: np.ndarray) -> None:
    """W' = diag(factors)·W along the weight's input-channel axis, as a new initializer."""
    _scale_weight(graph, names, layer, factors, layer.in_axis)


def scale_weight_columns(graph: ir.Graph, names: NameScope, layer: Layer, factors: np.ndarray) -> None:
    """W' = W·diag(factors) along the weight's output-channel axis, as a new initializer."""
    assert layer.out_axis is not None
    _scale_weight(graph, names, layer, factors, layer.out_axis)


def _scale_weight(graph: ir.Graph, names: NameScope, layer: Layer, factors: np.ndarray, axis: int) -> None:
    """The layer's weight times ``factors`` along ``axis``, as a new initializer.

    Built slice by slice (graph_edit.read_in_slices), so that a memory-mapped original and its scaled copy are not
    both resident; a large copy is file-backed (scratch.file_backed_array), so its pages can be dropped too.
    """
    weight = layer.weight_array
    shape = [1] * weight.ndim
    shape[axis] = factors.size
    factors = factors.reshape(shape)
    scaled = file_backed_array(weight.shape, weight.dtype)
    for part in read_in_slices(layer.weight.const_value, weight):
        scaled[part] = weight[part] * (factors[part] if axis == 0 else factors)
    del weight
    drop_pages(scaled)  # written to its file: resident again only while read
    replace_weight(graph, names, layer, scaled, "scaled")


def weight_times(layer: Layer, vector: np.ndarray) -> np.ndarray:
    """vector·W contracted over the weight's input-channel axis: one value per output channel.

    In float64, a few input rows at a time, so that a large weight gets no full float64 copy.
    """
    rows = np.moveaxis(layer.weight_array, layer.in_axis, 0)
    step = max(1, WEIGHT_CHUNK_ELEMENTS // max(1, rows[0].size))
    total = np.zeros(rows.shape[1:])
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        product = np.tensordot(vector[part].astype(np.float64), rows[part].astype(np.float64), axes=([0], [0]))
        total = product if start == 0 else total + product
    return total


def add_to_layer_bias(graph: ir.Graph, names: NameScope, layer: Layer, delta: np.ndarray) -> bool:
    """Add ``delta`` (one value per output channel) to the layer's bias, creating it if needed."""
    node = layer.node
    if node.op_type == "Gemm":
        if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
            return False
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = np.zeros(delta.shape, np.float32) if bias_value is None else constant_array(bias_value)
        if bias is None:
            return False
        new_bias = add_initializer(graph, names, f"{node.name or 'gemm'}_bias", (bias + delta).astype(np.float32))
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, new_bias)
        return True
    if node.op_type != "MatMul":
        return False
    bias_add = bias_add_of(node)
    if bias_add is not None:
        add_node, index = bias_add
        bias = constant_array(add_node.inputs[index])
        assert bias is not None
        updated = (bias + delta.reshape(bias.shape[:-1] + (delta.size,) if bias.ndim else delta.shape)).astype(
            bias.dtype
        )
        add_node.replace_input_with(index, add_initializer(graph, names, f"{node.name or 'matmul'}_bias", updated))
        return True
    _insert_bias_add(graph, names, node, delta.astype(np.float32))
    return True


def bias_add_of(node: ir.Node) -> tuple[ir.Node, int] | None:
    """The Add that is the MatMul's only reader and adds a constant per-output-channel bias."""
    return _bias_add_reading(node.outputs[0])


def _bias_add_reading(output: ir.Value) -> tuple[ir.Node, int] | None:
    """The Add that is the value's only reader and adds a constant per-output-channel bias to it."""
    consumers = list(output.consumers())
    if len(consumers) != 1 or output.is_graph_output() or consumers[0].op_type != "Add":
        return None
    add_node = consumers[0]
    for index in (0, 1):
        other = add_node.inputs[1 - index]
        bias = constant_array(add_node.inputs[index])
        if other is output and bias is not None and bias.ndim >= 1 and all(d == 1 for d in bias.shape[:-1]):
            return add_node, index
    return None


def layer_output(node: ir.Node) -> ir.Value:
    """The layer's full output: after its row-scale Mul, its bias Add and the Add of its float path, where it has them."""
    output = node.outputs[0]
    readers = list(output.consumers())
    if len(readers) == 1 and ROW_SCALE_KEY in readers[0].meta:
        output = readers[0].outputs[0]
    bias_add = _bias_add_reading(output) if node.op_type == "MatMul" else None
    output = bias_add[0].outputs[0] if bias_add is not None else output
    readers = list(output.consumers())
    if len(readers) == 1 and FLOAT_PATH_SUM_KEY in readers[0].meta:
        output = readers[0].outputs[0]
    return output


def layer_bias(layer: Layer) -> np.ndarray:
    """The layer's constant bias per output channel (zeros where there is none or it is not constant)."""
    node = layer.node
    channels = layer.weight_array.shape[layer.out_axis]
    bias: np.ndarray | None = None
    if node.op_type == "Gemm" and len(node.inputs) > 2:
        bias = constant_array(node.inputs[2])
    elif node.op_type == "MatMul" and (found := bias_add_of(node)) is not None:
        bias = constant_array(found[0].inputs[found[1]])
    if bias is None or bias.size not in (1, channels):
        return np.zeros(channels, np.float64)
    return np.broadcast_to(bias.reshape(-1).astype(np.float64), (channels,))


def _insert_bias_add(graph: ir.Graph, names: NameScope, node: ir.Node, bias: np.ndarray) -> None:
    """Insert Add(bias) after the MatMul; the Add's output takes over the MatMul output's name and readers."""
    bias_value = add_initializer(graph, names, f"{node.name or 'matmul'}_bias", bias)
    _append_add(graph, names, node, bias_value, f"{node.name or 'matmul'}_bias_add", "unbiased")


def _append_add(
    graph: ir.Graph,
    names: NameScope,
    producer: ir.Node,
    operand: ir.Value,
    node_name: str,
    old_output_suffix: str,
    op_type: str = "Add",
) -> ir.Node:
    """Insert Add (or op_type)(producer's output, operand) after the producer; it takes over the output's name and readers."""
    output = producer.outputs[0]
    original_name = output.name
    add_node = ir.node(op_type, [output, operand], name=names.fresh(node_name))
    result = add_node.outputs[0]
    result.type = output.type
    result.shape = output.shape
    output.replace_all_uses_with(result, replace_graph_outputs=True)
    add_node.replace_input_with(0, output)
    output.name = names.fresh(f"{original_name or 'output'}_{old_output_suffix}")
    result.name = original_name
    graph.insert_after(producer, add_node)
    return add_node


def route_channels_to_float(
    graph: ir.Graph, names: NameScope, activation: ir.Value, layers: Sequence[Layer], channels: np.ndarray
) -> None:
    """Y = X[:, O]·W[O, :] in float + X·W_R with rows O of W zeroed (LLM.int8() decomposition, exact).

    The caller must still zero the activation channels O on the quantized path (a channel affine with scale 0),
    so that they do not set its range.
    """
    index_value = add_initializer(
        graph, names, f"{activation.name or 'activation'}_outlier_channels", channels.astype(np.int64)
    )
    gather = ir.node(
        "Gather", [activation, index_value], {"axis": -1}, name=names.fresh(f"{activation.name}_outlier_gather")
    )
    gathered = gather.outputs[0]
    gathered.name = names.fresh(f"{activation.name or 'activation'}_outliers")
    gathered.dtype = ir.DataType.FLOAT
    insert_after_producer(graph, activation, [gather])
    for layer in layers:
        weight = layer.weight_array
        rows = np.take(weight, channels, axis=layer.in_axis)
        float_weight = rows if layer.in_axis == 0 else rows.T
        kept = weight.copy()
        if layer.in_axis == 0:
            kept[channels, :] = 0
        else:
            kept[:, channels] = 0
        base = layer.weight.name or "weight"
        old_weight = layer.weight
        layer.node.replace_input_with(layer.weight_index, add_initializer(graph, names, f"{base}_int_path", kept))
        remove_if_unused(graph, old_weight)
        float_value = add_initializer(graph, names, f"{base}_float_path", np.ascontiguousarray(float_weight))
        matmul = ir.node("MatMul", [gathered, float_value], name=names.fresh(f"{layer.node.name}_float_path"))
        matmul.meta[KEEP_FLOAT_KEY] = f"float path of {len(channels)} outlier channels of {layer.node.name}"
        matmul.outputs[0].name = names.fresh(f"{layer.node.name}_float_path_out")
        graph.insert_after(gather, matmul)
        add_to_layer_output(graph, names, layer, matmul.outputs[0])


def add_to_layer_output(graph: ir.Graph, names: NameScope, layer: Layer, extra: ir.Value) -> None:
    """Add ``extra`` to the layer's output (after its bias Add, if any); the sum keeps the output's name."""
    found = bias_add_of(layer.node) if layer.node.op_type == "MatMul" else None
    last = found[0] if found is not None else layer.node
    sum_node = _append_add(graph, names, last, extra, f"{layer.node.name}_add_float_path", "int_path")
    sum_node.meta[FLOAT_PATH_SUM_KEY] = True


def replace_weight(graph: ir.Graph, names: NameScope, layer: Layer, array: np.ndarray, suffix: str) -> None:
    """Give the layer a new weight initializer holding ``array`` (in the weight's layout and dtype)."""
    old = layer.weight
    value = add_initializer(
        graph, names, f"{old.name or 'weight'}_{suffix}", array.astype(layer.weight_array.dtype, copy=False)
    )
    layer.node.replace_input_with(layer.weight_index, value)
    remove_if_unused(graph, old)
    release_mapping(old.const_value)  # drop the pages of a memory-mapped original (it maps again if read)


def row_scalable(layers: Sequence[Layer]) -> bool:
    """Whether every layer's output can take a per-row factor back: a MatMul, or a Gemm with no C (its bias is
    inside the op, and the factor must not reach it)."""
    return all(
        layer.node.op_type == "MatMul" or (len(layer.node.inputs) < 3 or layer.node.inputs[2] is None)
        for layer in layers
    )


def scale_rows_at_run_time(
    graph: ir.Graph, names: NameScope, activation: ir.Value, layers: Sequence[Layer], qmax: int
) -> ir.Value:
    """Exact: the layers read X/s and their outputs are multiplied by s, s = max|X| over each row's channels / qmax.

    s is computed at run time for every row (token), so X/s spans ±qmax row by row: a static step of 1 quantizes
    it with a per-token scale, and the layer's output takes s back before its bias. Returns the value they now read.
    The layers must be :func:`row_scalable`.
    """
    stem = activation.name or "activation"
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs: list[ir.Value], suffix: str, **attributes: object) -> ir.Value:
        node = ir.node(op_type, inputs, attributes, name=names.fresh(f"{stem}_{suffix}"))
        node.outputs[0].name = names.fresh(f"{stem}_{suffix}")
        node.outputs[0].dtype = ir.DataType.FLOAT
        nodes.append(node)
        return node.outputs[0]

    def constant(value: object, dtype: type[np.generic] = np.float32) -> ir.Value:
        return add_initializer(graph, names, f"{stem}_row_scale_constant", np.asarray(value, dtype=dtype))

    magnitude = op("Abs", [activation], "abs")
    if graph.opset_imports.get("", 0) >= 18:  # ReduceMax's axes moved from an attribute to an input in opset 18
        row_max = op("ReduceMax", [magnitude, constant([-1], np.int64)], "row_absmax", keepdims=1)
    else:
        row_max = op("ReduceMax", [magnitude], "row_absmax", axes=[-1], keepdims=1)
    row_scale = op(
        "Max", [op("Mul", [row_max, constant(1.0 / qmax)], "row_step"), constant(MIN_ROW_SCALE)], "row_scale"
    )
    scaled = op("Div", [activation, row_scale], "per_row")
    scaled.shape = activation.shape
    insert_after_producer(graph, activation, nodes)
    for layer in layers:
        layer.node.replace_input_with(layer.activation_index, scaled)
        mul = _append_add(graph, names, layer.node, row_scale, f"{layer.node.name}_row_scale", "per_row", "Mul")
        mul.meta[ROW_SCALE_KEY] = True
    return scaled
