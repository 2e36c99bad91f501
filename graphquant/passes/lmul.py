"""L-Mul pass (lossy, an error study, not a deployment form): MatMul/Gemm computed with L-Mul products in onnxruntime.

Each MatMul/Gemm with a constant 2-D float weight becomes: both operands scaled per tensor by a power of two (exact),
rounded to the small float format, multiplied elementwise by L-Mul as an integer add on their float32 bits (BitCast,
opset 26, which onnxruntime 1.32 runs), and summed over K in float32 (analysis/lmul.py defines the arithmetic and
is the reference). [M, K] x [K, N] broadcasts to [rows, K, N] products, so a Scan walks the rows in chunks of at most
``chunk_elements`` products. ``product = "exact"`` keeps the rounding and multiplies exactly (float32 products of the
rounded values are exact; the sum is float32): the fp8-style reference for the same layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import Layer, candidates
from graphquant.analysis.lmul import (
    FLOAT32_EXPONENT_MASK,
    FLOAT32_INF_BITS,
    FLOAT32_MANTISSA_BITS,
    FLOAT32_MIN_NORMAL_BITS,
    FLOAT32_ONE_BITS,
    FLOAT32_SIGN_MASK,
    FORMATS,
    ZERO_STAND_IN,
    FloatFormat,
    operand_codes,
    pow2_scale,
    round_to_format,
    stays_in_float32,
)
from graphquant.analysis.weight_fit import in_major
from graphquant.graph_edit import NameScope, remove_if_unused
from graphquant.quant_spec import DECISION_KEY, KEEP_FLOAT_KEY, LayerDecision
from graphquant.rewrites import layer_output

BITCAST_OPSET = 26
PRODUCTS = ("lmul", "exact")
SIGN_BITS_INT32 = FLOAT32_SIGN_MASK - (1 << 32)


class LMulPass(ir.passes.InPlacePass):
    """Lossy: every MatMul/Gemm with a constant weight computes x·w with L-Mul (or exactly rounded) products."""

    def __init__(
        self, *, format: str = "e4m3", product: str = "lmul", scaled: bool = True, chunk_elements: int = 1 << 22
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        self.fmt = FORMATS[format]
        self.product = product
        self.scaled = scaled
        self.chunk_elements = chunk_elements

    def requires(self, model: ir.Model) -> None:
        """BitCast needs opset 26 (run upgrade-opset with minimum = 26 first)."""
        if model.graph.opset_imports.get("", 0) < BITCAST_OPSET:
            raise ir.passes.PreconditionError(
                f"lmul needs default opset >= {BITCAST_OPSET} for BitCast; run upgrade-opset with minimum = 26 first"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite every eligible layer; the others are left as they are."""
        graph = model.graph
        names = NameScope(graph)
        modified = False
        for candidate in list(candidates(graph)):
            layer = candidate.layer
            if layer is None or layer.node.op_type not in ("MatMul", "Gemm"):
                continue
            if KEEP_FLOAT_KEY in layer.node.meta or DECISION_KEY in layer.node.meta:
                continue
            _Rewrite(graph, names, layer, self).apply()
            modified = True
        return ir.passes.PassResult(model, modified=modified)

    @property
    def scheme(self) -> str:
        """The layer decision's summary."""
        kind = "L-Mul" if self.product == "lmul" else "exact products"
        return f"{kind} on {self.fmt.name} operands" + (" (power-of-two tensor scales)" if self.scaled else "")


class _Rewrite:
    """The replacement of one layer: nodes built on a tape, constants registered in the graph."""

    def __init__(self, graph: ir.Graph, names: NameScope, layer: Layer, options: LMulPass):
        self.graph = graph
        self.names = names
        self.layer = layer
        self.options = options
        self.fmt: FloatFormat = options.fmt
        self.tape = ir.tape.Tape()
        self.base = layer.node.name or "layer"

    def apply(self) -> None:
        """Build the replacement of the layer's output, splice it in and record the decision."""
        node = self.layer.node
        weight = in_major(self.layer, np.float32)
        weight_scale = pow2_scale(weight, self.fmt) if self.options.scaled else np.float32(1)
        x = self.layer.activation
        x_scale = self._activation_scale(x) if self.options.scaled else None
        scaled_x = x if x_scale is None else self.tape.op("Div", [x, x_scale])
        if self.options.product == "lmul":
            y = self._lmul_matmul(scaled_x, weight / weight_scale)
        else:
            y = self.tape.op(
                "MatMul", [self._rounded(scaled_x), self.const(round_to_format(weight / weight_scale, self.fmt))]
            )
        if x_scale is not None:
            y = self.tape.op("Mul", [y, x_scale])
            y = self.tape.op("Mul", [y, self.const(np.float32(weight_scale))])
        y = self._gemm_epilogue(y) if node.op_type == "Gemm" else y
        self._name_nodes(self.tape.nodes)
        old_weight = self.layer.weight
        full = layer_output(node)
        ir.convenience.replace_nodes_and_values(self.graph, node, [node], list(self.tape.nodes), [node.outputs[0]], [y])
        remove_if_unused(self.graph, old_weight)
        for nested in self.tape.nodes:
            nested.meta[KEEP_FLOAT_KEY] = self.options.scheme
        y_node = y.producer()
        assert y_node is not None
        y_node.meta[DECISION_KEY] = LayerDecision(
            node.name or "",
            node.op_type,
            "quantized",
            "",
            self.options.scheme,
            output=(y if full is node.outputs[0] else full).name or "",
        )

    def const(self, array: np.ndarray | float) -> ir.Value:
        """A constant initializer (numpy scalars keep their dtype)."""
        array = np.asarray(array)
        name = self.names.fresh(f"{self.base}_lmul_c")
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def _activation_scale(self, x: ir.Value) -> ir.Value:
        """2^ceil(log2(max finite |x| / scale_target)) clipped to [2^-126, 2^126], as analysis.lmul.pow2_scale."""
        op = self.tape.op
        magnitude = op("Abs", [x])
        finite = op("Not", [op("Or", [op("IsInf", [x]), op("IsNaN", [x])])])
        largest = op("ReduceMax", [op("Where", [finite, magnitude, self.const(np.float32(0))])], {"keepdims": 0})
        ratio = op("Div", [largest, self.const(np.float32(self.fmt.scale_target))])
        ratio = op("Clip", [ratio, self.const(np.float32(2.0**-126)), self.const(np.float32(2.0**126))])
        bits = op("Add", [op("BitCast", [ratio], {"to": ir.DataType.INT32}), self.const(np.int32((1 << 23) - 1))])
        bits = op("BitwiseAnd", [bits, self.const(np.int32(FLOAT32_EXPONENT_MASK))])
        return op("BitCast", [bits], {"to": ir.DataType.FLOAT})

    def _round_magnitude(self, x: ir.Value) -> ir.Value:
        """|x| saturated to max_finite (inf and NaN included) and rounded to the format, as round_to_format."""
        op = self.tape.op
        top = self.const(np.float32(self.fmt.max_finite))
        magnitude = op("Abs", [x])
        clipped = op("Where", [op("Less", [magnitude, top]), magnitude, top])
        exponent = op(
            "BitwiseAnd",
            [op("BitCast", [clipped], {"to": ir.DataType.INT32}), self.const(np.int32(FLOAT32_EXPONENT_MASK))],
        )
        # The grid step at |x| is 2^(floor(log2|x|) - m): the float32 exponent bits times 2^-m.
        step = op(
            "Mul",
            [
                op("BitCast", [exponent], {"to": ir.DataType.FLOAT}),
                self.const(np.float32(2.0**-self.fmt.mantissa_bits)),
            ],
        )
        if self.fmt.subnormals:
            step = op("Max", [step, self.const(np.float32(self.fmt.min_step))])
        rounded = op("Mul", [op("Round", [op("Div", [clipped, step])]), step])
        if not self.fmt.subnormals:
            tiny = op("Less", [clipped, self.const(np.float32(self.fmt.min_normal))])
            rounded = op("Where", [tiny, self.const(np.float32(0)), rounded])
        return rounded

    def _sign_bits(self, x: ir.Value) -> ir.Value:
        """x's sign bit as int32."""
        bits = self.tape.op("BitCast", [x], {"to": ir.DataType.INT32})
        return self.tape.op("BitwiseAnd", [bits, self.const(np.int32(SIGN_BITS_INT32))])

    def _rounded(self, x: ir.Value) -> ir.Value:
        """x rounded to the format with its sign; inf and NaN pass through."""
        op = self.tape.op
        signed = op(
            "BitwiseOr", [op("BitCast", [self._round_magnitude(x)], {"to": ir.DataType.INT32}), self._sign_bits(x)]
        )
        special = op("Or", [op("IsInf", [x]), op("IsNaN", [x])])
        return op("Where", [special, x, op("BitCast", [signed], {"to": ir.DataType.FLOAT})])

    def _codes(self, x: ir.Value) -> tuple[ir.Value, ir.Value]:
        """x's addend (magnitude bits - 1.0's bits + 2^(23-l)) and special marker, as analysis.lmul.operand_codes."""
        op = self.tape.op
        rounded = self._round_magnitude(x)
        zero = op("Equal", [rounded, self.const(np.float32(0))])
        marker = op("Where", [zero, self.const(np.float32(0)), self.const(np.float32(1))])
        marker = op("Where", [op("IsInf", [x]), self.const(np.float32(np.inf)), marker])
        marker = op("Where", [op("IsNaN", [x]), self.const(np.float32(np.nan)), marker])
        marker_bits = op("BitwiseOr", [op("BitCast", [marker], {"to": ir.DataType.INT32}), self._sign_bits(x)])
        spec = op("BitCast", [marker_bits], {"to": ir.DataType.FLOAT})
        magnitude = op("Where", [zero, self.const(np.float32(ZERO_STAND_IN)), rounded])
        bits = op("BitCast", [magnitude], {"to": ir.DataType.INT32})
        if not stays_in_float32(self.fmt):
            bits = op("Cast", [bits], {"to": ir.DataType.INT64})
        return op("Add", [bits, self.const(self._addend_dtype()(self._bias_and_offset()))]), spec

    def _addend_dtype(self) -> type[np.signedinteger]:
        """int32 where no product leaves float32's range, else int64 (the sums may pass 2^31)."""
        return np.int32 if stays_in_float32(self.fmt) else np.int64

    def _bias_and_offset(self) -> int:
        """-0x3F800000 + 2^(23 - l(m)): the constant of the integer-add form."""
        return -FLOAT32_ONE_BITS + (1 << (FLOAT32_MANTISSA_BITS - self.fmt.offset_exponent))

    def _lmul_matmul(self, x: ir.Value, weight: np.ndarray) -> ir.Value:
        """x [..., K] · weight [K, N] with L-Mul products, K-sums of row chunks in a Scan."""
        op = self.tape.op
        depth, width = weight.shape
        magnitude_bits, weight_spec = operand_codes(weight, self.fmt)
        weight_bits = self.const(magnitude_bits.astype(self._addend_dtype()))
        weight_spec_value = self.const(weight_spec)
        rows_per_chunk = max(1, self.options.chunk_elements // (depth * width))
        flat = op("Reshape", [x, self.const(np.array([-1, depth], np.int64))])
        addend, spec = self._codes(flat)
        rows = op(
            "Slice", [op("Shape", [flat]), self.const(np.array([0], np.int64)), self.const(np.array([1], np.int64))]
        )
        chunk = self.const(np.array([rows_per_chunk], np.int64))
        pad = op("Mod", [op("Sub", [chunk, op("Mod", [rows, chunk])]), chunk])
        pads = op(
            "Concat", [self.const(np.array([0, 0], np.int64)), pad, self.const(np.array([0], np.int64))], {"axis": 0}
        )
        blocks = self.const(np.array([-1, rows_per_chunk, depth, 1], np.int64))
        addend = op("Reshape", [op("Pad", [addend, pads]), blocks])
        spec = op("Reshape", [op("Pad", [spec, pads]), blocks])
        body = self._scan_body(weight_bits, weight_spec_value, rows_per_chunk, depth, width)
        sums = op("Scan", [addend, spec], {"body": body, "num_scan_inputs": 2})
        sums = op(
            "Slice",
            [
                op("Reshape", [sums, self.const(np.array([-1, width], np.int64))]),
                self.const(np.array([0], np.int64)),
                rows,
            ],
        )
        leading = op(
            "Slice", [op("Shape", [x]), self.const(np.array([0], np.int64)), self.const(np.array([-1], np.int64))]
        )
        shape = op("Concat", [leading, self.const(np.array([width], np.int64))], {"axis": 0})
        return op("Reshape", [sums, shape])

    def _scan_body(
        self,
        weight_bits: ir.Value,
        weight_spec: ir.Value,
        rows: int,
        depth: int,
        width: int,
    ) -> ir.Graph:
        """One chunk: products [rows, K, N] = BitCast(addend + weight bits) · (spec · weight spec), summed over K."""
        tape = ir.tape.Tape()
        addend = ir.Value(
            name=self.names.fresh(f"{self.base}_lmul_addend"),
            type=ir.TensorType(ir.DataType.INT32 if stays_in_float32(self.fmt) else ir.DataType.INT64),
            shape=ir.Shape([rows, depth, 1]),
        )
        spec = ir.Value(
            name=self.names.fresh(f"{self.base}_lmul_spec"),
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape([rows, depth, 1]),
        )
        total = tape.op("Add", [addend, weight_bits])
        if not stays_in_float32(self.fmt):
            top = tape.op("Min", [total, self.const(np.int64(FLOAT32_INF_BITS))])
            under = tape.op("Less", [total, self.const(np.int64(FLOAT32_MIN_NORMAL_BITS))])
            total = tape.op(
                "Cast", [tape.op("Where", [under, self.const(np.int64(0)), top])], {"to": ir.DataType.INT32}
            )
        magnitude = tape.op("BitCast", [total], {"to": ir.DataType.FLOAT})
        products = tape.op("Mul", [magnitude, tape.op("Mul", [spec, weight_spec])])
        sums = tape.op("ReduceSum", [products, self.const(np.array([1], np.int64))], {"keepdims": 0})
        self._name_nodes(tape.nodes)
        return ir.Graph([addend, spec], [sums], nodes=tape.nodes, name=self.names.fresh(f"{self.base}_lmul_chunk"))

    def _gemm_epilogue(self, y: ir.Value) -> ir.Value:
        """Gemm's alpha and beta·C, in float."""
        node = self.layer.node
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        if alpha != 1.0:
            y = self.tape.op("Mul", [y, self.const(np.float32(alpha))])
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is None:
            return y
        if beta != 1.0:
            bias = self.tape.op("Mul", [bias, self.const(np.float32(beta))])
        return self.tape.op("Add", [y, bias])

    def _name_nodes(self, nodes: Sequence[ir.Node]) -> None:
        """Give every node and output a fresh name after the layer."""
        for node in nodes:
            node.name = self.names.fresh(f"{self.base}_lmul_{node.op_type}")
            for output in node.outputs:
                if not output.name:
                    output.name = self.names.fresh(f"{self.base}_lmul_{node.op_type}_out")
