"""Run a list of ONNX nodes on torch tensors, so that a subgraph can be differentiated (block-wise FlexRound).

One function per op, for the op sets of exported transformer encoders and CNNs; any other op is refused with its name.
torch is the optional ``torch`` extra (quantize checks for it before importing this module).
onnx2torch is not used: importing it imports torchvision (its NMS and RoIAlign converters), which has no build
for the CPU torch wheel the project pins, and it converts whole models where blocks are needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping

import numpy as np
import onnx_ir as ir
import torch

Tensor = torch.Tensor
Op = Callable[[ir.Node, list], Tensor]

DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}


def constant(value: ir.Value) -> Tensor:
    """An initializer (or Constant output) as a torch tensor."""
    assert value.const_value is not None
    return torch.from_numpy(np.array(value.const_value.numpy()))


def run_nodes(
    nodes: Iterable[ir.Node], values: MutableMapping[str, Tensor], inputs: Callable[[ir.Node, list], list] | None = None
) -> None:
    """Evaluate ``nodes`` in order, reading and writing ``values`` by value name; initializers are read as needed.

    ``inputs`` maps a node and its arguments to the arguments it runs on (e.g. fake-quantized activations).
    """
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            raise NotImplementedError(f"{node.name}: op {node.domain}::{node.op_type} has no torch form here")
        op = OPS.get(node.op_type)
        if op is None:
            raise NotImplementedError(f"{node.name}: op {node.op_type} has no torch form here")
        arguments = [None if value is None else _read(value, values) for value in node.inputs]
        arguments = arguments if inputs is None else inputs(node, arguments)
        results = op(node, arguments)
        for output, result in zip(node.outputs, results if isinstance(results, tuple) else (results,)):
            values[output.name or ""] = result


def supported(nodes: Iterable[ir.Node]) -> str | None:
    """Why ``nodes`` cannot run here (the first op without a torch form), None if they can."""
    for node in nodes:
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx"):
            return f"{node.name}: op {node.op_type} has no torch form here"
    return None


def _read(value: ir.Value, values: Mapping[str, Tensor]) -> Tensor:
    """A value from ``values``, or the initializer behind it."""
    name = value.name or ""
    if name in values:
        return values[name]
    if value.const_value is not None:
        return constant(value)
    raise KeyError(f"value {name!r} is neither computed yet nor an initializer")


def _int(node: ir.Node, name: str, default: int) -> int:
    """An int attribute or its default."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _ints(node: ir.Node, name: str) -> list[int] | None:
    """An ints attribute or None."""
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())


def _float(node: ir.Node, name: str, default: float) -> float:
    """A float attribute or its default."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def _axes(node: ir.Node, args: list, index: int) -> list[int] | None:
    """Axes from the input at ``index`` (opset 13/18 forms) or from the ``axes`` attribute."""
    if len(args) > index and args[index] is not None:
        return [int(a) for a in args[index].tolist()]
    return _ints(node, "axes")


def _div(node: ir.Node, args: list) -> Tensor:
    """Div: truncating on integers, as ONNX defines it."""
    a, b = args
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _gemm(node: ir.Node, args: list) -> Tensor:
    """Gemm: alpha·A'·B' + beta·C."""
    a, b = args[0], args[1]
    a = a.T if _int(node, "transA", 0) else a
    b = b.T if _int(node, "transB", 0) else b
    result = _float(node, "alpha", 1.0) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        result = result + _float(node, "beta", 1.0) * args[2]
    return result


def _layer_norm(node: ir.Node, args: list) -> Tensor:
    """LayerNormalization over the axes from ``axis`` to the last (the Mean and InvStdDev outputs not made)."""
    x = args[0]
    axis = _int(node, "axis", -1) % x.dim()
    shape = list(x.shape[axis:])
    bias = args[2] if len(args) > 2 else None
    return torch.nn.functional.layer_norm(x, shape, args[1], bias, _float(node, "epsilon", 1e-5))


def _reduce(function: Callable[..., Tensor]) -> Op:
    """A Reduce* op (axes as attribute or input, keepdims, noop_with_empty_axes)."""

    def reduce(node: ir.Node, args: list) -> Tensor:
        axes = _axes(node, args, 1)
        keep = bool(_int(node, "keepdims", 1))
        if not axes:
            if _int(node, "noop_with_empty_axes", 0):
                return args[0]
            axes = list(range(args[0].dim()))
        return function(args[0], dim=axes, keepdim=keep)

    return reduce


def _reshape(node: ir.Node, args: list) -> Tensor:
    """Reshape: 0 copies the input's dimension (unless allowzero), -1 is inferred."""
    shape = [int(d) for d in args[1].tolist()]
    if not _int(node, "allowzero", 0):
        shape = [args[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return args[0].reshape(shape)


def _transpose(node: ir.Node, args: list) -> Tensor:
    """Transpose by ``perm`` (reversed axes by default)."""
    perm = _ints(node, "perm") or list(reversed(range(args[0].dim())))
    return args[0].permute(perm)


def _unsqueeze(node: ir.Node, args: list) -> Tensor:
    """Unsqueeze at the axes of the output."""
    axes = _axes(node, args, 1) or []
    rank = args[0].dim() + len(axes)
    result = args[0]
    for axis in sorted(a % rank for a in axes):
        result = result.unsqueeze(axis)
    return result


def _squeeze(node: ir.Node, args: list) -> Tensor:
    """Squeeze the given axes, or every axis of size 1."""
    axes = _axes(node, args, 1)
    if axes is None:
        return args[0].squeeze()
    return args[0].squeeze([a % args[0].dim() for a in axes]) if axes else args[0].squeeze()


def _gather(node: ir.Node, args: list) -> Tensor:
    """Gather along ``axis``, negative indices counted from the end."""
    data, indices = args
    axis = _int(node, "axis", 0) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices).long()
    flat = torch.index_select(data, axis, indices.reshape(-1))
    return flat.reshape(*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :])


def _gather_nd(node: ir.Node, args: list) -> Tensor:
    """GatherND with ``batch_dims`` leading batch axes."""
    data, indices = args
    batch = _int(node, "batch_dims", 0)
    depth = indices.shape[-1]
    batch_shape = data.shape[:batch]
    flat_data = data.reshape(-1, *data.shape[batch:])
    flat_indices = indices.reshape(-1, *indices.shape[batch:]).long()
    picked = []
    for b in range(flat_data.shape[0]):
        where = flat_indices[b].reshape(-1, depth)
        picked.append(flat_data[b][tuple(where.T)])
    stacked = torch.stack(picked)
    return stacked.reshape(*batch_shape, *indices.shape[batch:-1], *data.shape[batch + depth :])


def _slice(node: ir.Node, args: list) -> Tensor:
    """Slice with starts, ends, axes and steps inputs, bounds clamped as ONNX does."""
    result = args[0]
    starts, ends = args[1].tolist(), args[2].tolist()
    axes = args[3].tolist() if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = args[4].tolist() if len(args) > 4 and args[4] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= result.dim()
        positions = _positions(start, end, step, result.shape[axis])
        result = torch.index_select(result, axis, torch.tensor(positions, dtype=torch.int64))
    return result


def _positions(start: int, end: int, step: int, size: int) -> list[int]:
    """The indices ONNX Slice takes on an axis of ``size``."""
    start, end = (bound + size if bound < 0 else bound for bound in (start, end))
    if step > 0:
        return list(range(min(max(start, 0), size), min(max(end, 0), size), step))
    return list(range(min(max(start, -1), size - 1), min(max(end, -1), size - 1), step))


def _shape(node: ir.Node, args: list) -> Tensor:
    """Shape, cut to [start, end)."""
    dims = list(args[0].shape)
    start, end = _int(node, "start", 0), node.attributes.get("end")
    return torch.tensor(dims[start : None if end is None else end.as_int()], dtype=torch.int64)


def _cast(node: ir.Node, args: list) -> Tensor:
    """Cast to the ``to`` type."""
    target = ir.DataType(_int(node, "to", 1))
    if target not in DTYPES:
        raise NotImplementedError(f"{node.name}: Cast to {target.name} has no torch form here")
    return args[0].to(DTYPES[target])


def _expand(node: ir.Node, args: list) -> Tensor:
    """Expand: broadcast the input with the given shape (both ways)."""
    shape = torch.broadcast_shapes(tuple(args[0].shape), tuple(int(d) for d in args[1].tolist()))
    return args[0].expand(shape)


def _range(node: ir.Node, args: list) -> Tensor:
    """Range(start, limit, delta) in the inputs' type."""
    start, limit, delta = (a.item() for a in args)
    return torch.arange(start, limit, delta, dtype=args[0].dtype)


def _constant(node: ir.Node, args: list) -> Tensor:
    """Constant: its ``value`` tensor (the value_* forms are refused)."""
    attr = node.attributes.get("value")
    if attr is None:
        raise NotImplementedError(f"{node.name}: only Constant's value attribute has a torch form here")
    return torch.from_numpy(np.array(attr.as_tensor().numpy()))


def _constant_of_shape(node: ir.Node, args: list) -> Tensor:
    """ConstantOfShape: the ``value`` scalar (0.0 float by default) repeated over the shape."""
    attr = node.attributes.get("value")
    fill = torch.zeros(1) if attr is None else torch.from_numpy(np.array(attr.as_tensor().numpy())).reshape(1)
    return fill.expand(*[int(d) for d in args[0].tolist()]).clone()


def _softmax(node: ir.Node, args: list) -> Tensor:
    """Softmax along ``axis`` (opset 13 form)."""
    return torch.softmax(args[0], dim=_int(node, "axis", -1))


def _concat(node: ir.Node, args: list) -> Tensor:
    """Concat along ``axis``."""
    return torch.cat([a for a in args if a is not None], dim=_int(node, "axis", 0))


def _where(node: ir.Node, args: list) -> Tensor:
    """Where(condition, x, y)."""
    return torch.where(args[0], args[1], args[2])


def _spatial_pads(node: ir.Node, x: Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """Conv/pool pads [begin..., end...] over the spatial axes, from ``pads`` or ``auto_pad`` (SAME_*, VALID)."""
    attr = node.attributes.get("auto_pad")
    mode = "NOTSET" if attr is None else attr.as_string()
    spatial = len(kernel)
    if mode in ("NOTSET", "VALID"):
        return (_ints(node, "pads") or [0] * 2 * spatial) if mode == "NOTSET" else [0] * 2 * spatial
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if mode == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def _padded(x: Tensor, pads: list[int], value: float = 0.0) -> Tensor:
    """``x`` padded by ONNX pads [begin..., end...] over its spatial axes (torch's pad lists the last axis first)."""
    spatial = len(pads) // 2
    if not any(pads):
        return x
    flat = [p for axis in reversed(range(spatial)) for p in (pads[axis], pads[spatial + axis])]
    return torch.nn.functional.pad(x, flat, value=value)


def _window(node: ir.Node, x: Tensor, kernel: list[int]) -> tuple[list[int], list[int], list[int]]:
    """A conv's or pool's (strides, dilations, pads), defaults filled in."""
    strides = _ints(node, "strides") or [1] * len(kernel)
    dilations = _ints(node, "dilations") or [1] * len(kernel)
    return strides, dilations, _spatial_pads(node, x, kernel, strides, dilations)


def _conv(node: ir.Node, args: list) -> Tensor:
    """Conv (grouped, depthwise, any rank) with pads, strides, dilations and auto_pad."""
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    kernel = _ints(node, "kernel_shape") or list(weight.shape[2:])
    strides, dilations, pads = _window(node, x, kernel)
    spatial = len(kernel)
    return torch.convolution(
        _padded(x, pads), weight, bias, strides, [0] * spatial, dilations, False, [0] * spatial, _int(node, "group", 1)
    )


def _conv_transpose(node: ir.Node, args: list) -> Tensor:
    """ConvTranspose with pads, strides, dilations and output_padding (output_shape and auto_pad refused)."""
    if node.attributes.get("output_shape") is not None or node.attributes.get("auto_pad") is not None:
        raise NotImplementedError(f"{node.name}: ConvTranspose's output_shape and auto_pad have no torch form here")
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    spatial = weight.dim() - 2
    strides = _ints(node, "strides") or [1] * spatial
    dilations = _ints(node, "dilations") or [1] * spatial
    pads = _ints(node, "pads") or [0] * 2 * spatial
    extra = _ints(node, "output_padding") or [0] * spatial
    full = torch.convolution(x, weight, bias, strides, [0] * spatial, dilations, True, extra, _int(node, "group", 1))
    # The full output, cut by the pads at both ends of each spatial axis.
    cut = tuple(slice(pads[a], full.shape[2 + a] - pads[spatial + a]) for a in range(spatial))
    return full[(slice(None), slice(None), *cut)]


def _pool(node: ir.Node, args: list, maximum: bool) -> Tensor:
    """MaxPool or AveragePool (1-3 spatial axes) with pads, strides, auto_pad, ceil_mode, count_include_pad."""
    if len(node.outputs) > 1:
        raise NotImplementedError(f"{node.name}: MaxPool's Indices output has no torch form here")
    x = args[0]
    kernel = _ints(node, "kernel_shape") or []
    strides, dilations, pads = _window(node, x, kernel)
    ceil = bool(_int(node, "ceil_mode", 0))
    spatial = len(kernel)
    if maximum:
        function = getattr(torch.nn.functional, f"max_pool{spatial}d")
        return function(_padded(x, pads, -float("inf")), kernel, strides, 0, dilations, ceil_mode=ceil)
    if any(d != 1 for d in dilations):
        raise NotImplementedError(f"{node.name}: a dilated AveragePool has no torch form here")
    function = getattr(torch.nn.functional, f"avg_pool{spatial}d")
    average = function(_padded(x, pads), kernel, strides, 0, ceil_mode=ceil)
    if _int(node, "count_include_pad", 0) or not any(pads):
        return average
    # The padded zeros are not counted: divide by the window's share of real elements.
    share = function(_padded(torch.ones_like(x[:1, :1]), pads), kernel, strides, 0, ceil_mode=ceil)
    return average / share


def _global_pool(function: Callable[..., Tensor]) -> Op:
    """GlobalAveragePool / GlobalMaxPool: over every spatial axis, kept as size 1."""

    def pool(node: ir.Node, args: list) -> Tensor:
        axes = list(range(2, args[0].dim()))
        return function(args[0], dim=axes, keepdim=True)

    return pool


def _amax(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    """The maximum over ``dim``."""
    return torch.amax(x, dim=dim, keepdim=keepdim)


def _flatten(node: ir.Node, args: list) -> Tensor:
    """Flatten to 2-D at ``axis``."""
    x = args[0]
    axis = _int(node, "axis", 1) % (x.dim() + 1)
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _clip(node: ir.Node, args: list) -> Tensor:
    """Clip to [min, max], bounds as inputs (opset 11+) or attributes (opset 6)."""
    low = args[1] if len(args) > 1 and args[1] is not None else node.attributes.get("min")
    high = args[2] if len(args) > 2 and args[2] is not None else node.attributes.get("max")
    low, high = (b.as_float() if isinstance(b, ir.Attr) else b for b in (low, high))
    return torch.clamp(args[0], low, high)


def _batch_norm(node: ir.Node, args: list) -> Tensor:
    """BatchNormalization in inference mode (running mean and variance)."""
    x, scale, bias, mean, variance = args[:5]
    return torch.nn.functional.batch_norm(x, mean, variance, scale, bias, False, 0.0, _float(node, "epsilon", 1e-5))


def _leaky_relu(node: ir.Node, args: list) -> Tensor:
    """LeakyRelu with slope ``alpha``."""
    return torch.nn.functional.leaky_relu(args[0], _float(node, "alpha", 0.01))


def _hard_sigmoid(node: ir.Node, args: list) -> Tensor:
    """HardSigmoid: max(0, min(1, alpha·x + beta))."""
    return torch.clamp(_float(node, "alpha", 0.2) * args[0] + _float(node, "beta", 0.5), 0.0, 1.0)


def _variadic(function: Callable[[Tensor, Tensor], Tensor]) -> Op:
    """Max/Min/Sum over any number of inputs."""

    def apply(node: ir.Node, args: list) -> Tensor:
        result = args[0]
        for other in args[1:]:
            result = function(result, other)
        return result

    return apply


def _binary(function: Callable[[Tensor, Tensor], Tensor]) -> Op:
    """An elementwise op of two inputs."""
    return lambda node, args: function(args[0], args[1])


def _unary(function: Callable[[Tensor], Tensor]) -> Op:
    """An elementwise op of one input."""
    return lambda node, args: function(args[0])


OPS: dict[str, Op] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "MatMul": _binary(torch.matmul),
    "Gemm": _gemm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": lambda node, args: _pool(node, args, True),
    "AveragePool": lambda node, args: _pool(node, args, False),
    "GlobalAveragePool": _global_pool(torch.mean),
    "GlobalMaxPool": _global_pool(_amax),
    "Flatten": _flatten,
    "Clip": _clip,
    "BatchNormalization": _batch_norm,
    "LeakyRelu": _leaky_relu,
    "HardSigmoid": _hard_sigmoid,
    "Sqrt": _unary(torch.sqrt),
    "Erf": _unary(torch.erf),
    "Cos": _unary(torch.cos),
    "Sin": _unary(torch.sin),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "Exp": _unary(torch.exp),
    "Neg": _unary(torch.neg),
    "Reciprocal": _unary(torch.reciprocal),
    "IsNaN": _unary(torch.isnan),
    "Not": _unary(torch.logical_not),
    "Identity": _unary(lambda x: x),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Equal": _binary(torch.eq),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Where": _where,
    "Softmax": _softmax,
    "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "Slice": _slice,
    "Shape": _shape,
    "Cast": _cast,
    "Expand": _expand,
    "Range": _range,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
}
