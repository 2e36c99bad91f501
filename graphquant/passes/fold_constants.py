"""Fold-constants pass (exact): weights computed from constants become initializers, so they can be quantized."""

from __future__ import annotations

import sys
from collections import Counter

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
from onnxscript.rewriter import pattern

from graphquant.errors import InvalidModelError
from graphquant.output_paths import INPUT_FILES_KEY

# Ops that only a quantized model holds. A DequantizeLinear alone is not one of them: see `quantized_ops`.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "MatMulBnb4",
        "MatMulFpQ4",
        "QGemm",
        "QAttention",
        "QEmbedLayerNormalization",
        "GatherBlockQuantized",
    }
)
QUANTIZED_PREFIXES = ("QLinear", "DynamicQuantize", "QOrdered")
# onnx's reference implementation, which the folder evaluates with, has DequantizeLinear from opset 19 only.
REFERENCE_DEQUANTIZE_OPSET = 19


class FoldConstantsPass(ir.passes.InPlacePass):
    """Exact: fold every node whose inputs are all constants, of any size, then lift Constant nodes to initializers.

    Weights built by ConstantOfShape, or read through Cast (fp16 -> fp32), Identity, Reshape, Transpose or a
    DequantizeLinear of a constant, become plain initializers that the quantizing passes see. onnxscript's folder
    does the work; its size limits are lifted for nodes that compute only constants, because those are the weights.
    An already-quantized model is refused before anything is folded.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Refuse a quantized model, fold constant subgraphs, then make every Constant node an initializer."""
        refuse_quantized(model)
        expanded = model.graph.opset_imports.get("", 0) < REFERENCE_DEQUANTIZE_OPSET and bool(
            pattern.RewriteRuleSet([ConstantDequantizeAsArithmetic.rule()]).apply_to_model(model)
        )
        folded = onnxscript.optimizer.fold_constants(
            model, output_size_limit=sys.maxsize, should_fold=_fold_constant_inputs
        ).modified
        swept = RemoveUnusedNodesPass()(model).modified if expanded or folded else False
        lifted = LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model).modified
        return ir.passes.PassResult(model, modified=expanded or folded or swept or lifted)


class ConstantDequantizeAsArithmetic(pattern.RewriteRuleClassBase):
    """DequantizeLinear-10/13 of constants as y = Cast(int32(x) - int32(zero), float) · scale, which folds.

    The int32 difference is exact for the 8-bit and int32 codes of these opsets, as onnxruntime computes it; a
    per-axis scale and zero point are reshaped to broadcast along ``axis``.
    """

    def pattern(self, op: pattern.OpsetPatternBuilder, x: ir.Value, scale: ir.Value) -> ir.Value:
        """Any DequantizeLinear (its zero point, if given, is read in ``rewrite``)."""
        return op.DequantizeLinear(x, scale, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context: object, x: ir.Value, scale: ir.Value, y: ir.Value) -> pattern.MatchResult:
        """Only a DequantizeLinear whose inputs are all constants (not overridable graph inputs)."""
        result = pattern.MatchResult()
        inputs = [value for value in _producer(y).inputs if value is not None]
        if any(value.const_value is None or value.is_graph_input() for value in inputs):
            return result.fail("an input is not a constant")
        return result

    def rewrite(self, op: pattern.RewriterContext, x: ir.Value, scale: ir.Value, y: ir.Value) -> ir.Value:
        """The arithmetic form, with constant reshapes of a per-axis scale and zero point."""
        node = _producer(y)
        assert x.const_value is not None and scale.const_value is not None  # see check
        rank = len(x.const_value.shape)
        broadcast = None
        if len(scale.const_value.shape) == 1 and rank > 1:
            axis = node.attributes.get_int("axis", 1) % rank
            broadcast = op.Constant(value_ints=[-1 if i == axis else 1 for i in range(rank)])
        codes = op.Cast(x, to=ir.DataType.INT32)
        zero = node.inputs[2] if len(node.inputs) > 2 else None
        if zero is not None:
            zero32 = op.Cast(zero, to=ir.DataType.INT32)
            codes = op.Sub(codes, zero32 if broadcast is None else op.Reshape(zero32, broadcast))
        step = scale if broadcast is None else op.Reshape(scale, broadcast)
        return op.Mul(op.Cast(codes, to=scale.dtype), step)


def _producer(value: ir.Value) -> ir.Node:
    """The node that computes a matched value."""
    node = value.producer()
    assert node is not None
    return node


def _fold_constant_inputs(node: ir.Node) -> bool:
    """Fold whatever size: the folder asks only about nodes whose inputs are all constants. Not multi-output nodes.

    onnxruntime folds the same nodes when it loads the model, so their outputs cost no memory a session would not
    spend; ConstantOfShape and DequantizeLinear, which the folder keeps by default, are folded too (see
    `quantized_ops` for why a DequantizeLinear of a constant may be). The folder cannot store a node with several
    outputs (a Split of a weight): it would evaluate it and log a warning, so such a node is left to run.
    """
    return len(node.outputs) == 1


def quantized_ops(model: ir.Model) -> Counter[str]:
    """How many nodes of each quantized op type the model holds (main graph, subgraphs and functions).

    A DequantizeLinear without any QuantizeLinear only decompresses stored weights (int8/int4/fp16 storage of a
    float model): no activation is quantized, the float function it computes is what a user asks to quantize, and
    validation compares against exactly that function. So it is folded into float weights, not refused.
    """
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return Counter(node.op_type for node in nodes if _is_quantized_op(node.op_type))


def refuse_quantized(model: ir.Model) -> None:
    """Raise InvalidModelError naming the quantized ops if the model is already quantized."""
    found = quantized_ops(model)
    if not found:
        return
    recorded = model.meta.get(INPUT_FILES_KEY, ())
    source = recorded[0].path if recorded else "the model"
    listed = ", ".join(f"{count} {op}" for op, count in sorted(found.items()))
    raise InvalidModelError(f"{source}: already quantized ({listed}); give graphquant the float model")


def _is_quantized_op(op_type: str) -> bool:
    """Whether an op type belongs only to quantized graphs."""
    return op_type in QUANTIZED_OPS or op_type.startswith(QUANTIZED_PREFIXES)
