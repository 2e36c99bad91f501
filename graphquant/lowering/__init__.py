"""Lowering targets: each is a named list of passes that turn QuantSpec annotations into ops."""

from __future__ import annotations

import onnx_ir as ir

from graphquant.lowering.contiguous_routes import ContiguousFloatRoutesPass
from graphquant.lowering.fold_channel_scales import FoldChannelScalesPass
from graphquant.lowering.fuse_activation import FuseActivationPass
from graphquant.lowering.gather_block_quantized import GatherBlockQuantizedLoweringPass
from graphquant.lowering.matmul_nbits import MatMulNBitsLoweringPass
from graphquant.lowering.ort_cpu import OrtCpuLoweringPass
from graphquant.lowering.qdq import QdqLoweringPass
from graphquant.lowering.qlinear_conv import QLinearConvLoweringPass
from graphquant.lowering.qoperator import QOperatorLoweringPass
from graphquant.lowering.softmax_nan_guard import DropSoftmaxNanGuardPass
from graphquant.lowering.unsigned_weights import UnsignedWeightsPass

# Later passes pick up what earlier ones leave: ort-cpu lowers what MatMulIntegerToFloat covers, QDQ the rest.
# FuseActivationPass runs first: it drops Relu/Clip that the readers' saturating uint8 grids compute anyway.
# ContiguousFloatRoutesPass and FoldChannelScalesPass run last, on the lowered layers: they renumber their channels
# and fold the quantized branches' per-channel Muls into them. DropSoftmaxNanGuardPass removes the exporter's
# Where(IsNaN(softmax)) after a finite attention mask (onnxruntime runs Where on one thread). UnsignedWeightsPass ends
# every target: on a machine whose onnxruntime saturates uint8 x int8 products (x86 without VNNI) it moves the 8-bit
# weights of uint8-activation layers to the same grid in uint8 (exact); elsewhere it changes nothing.
TARGETS: dict[str, tuple[type[ir.passes.PassBase], ...]] = {
    "qdq": (QdqLoweringPass, UnsignedWeightsPass),
    "ort-cpu": (
        FuseActivationPass,
        MatMulNBitsLoweringPass,
        GatherBlockQuantizedLoweringPass,
        OrtCpuLoweringPass,
        QLinearConvLoweringPass,
        QdqLoweringPass,
        ContiguousFloatRoutesPass,
        FoldChannelScalesPass,
        DropSoftmaxNanGuardPass,
        UnsignedWeightsPass,
    ),
    "qoperator": (
        FuseActivationPass,
        QLinearConvLoweringPass,
        QOperatorLoweringPass,
        QdqLoweringPass,
        UnsignedWeightsPass,
    ),
}

TARGET_DOCS: dict[str, str] = {
    "qdq": "portable QuantizeLinear/DequantizeLinear pairs (TensorRT, QNN, XNNPACK, onnxruntime)",
    "ort-cpu": "fastest on onnxruntime CPU: uint8 x int8 MatMulIntegerToFloat with the bias fused, MatMulNBits for "
    "weight-only and W4A8 layers, GatherBlockQuantized for embeddings, QLinearConv, QDQ elsewhere; float routes "
    "read a Slice of renumbered channels and per-channel Muls fold into the layers where they can; a Softmax's NaN "
    "guard goes where its mask is finite",
    "qoperator": "standard integer ops: QLinearConv, QLinearMatMul into another integer op, else MatMulInteger + "
    "Cast + Mul; QDQ elsewhere",
}

__all__ = [
    "TARGETS",
    "TARGET_DOCS",
    "ContiguousFloatRoutesPass",
    "DropSoftmaxNanGuardPass",
    "FoldChannelScalesPass",
    "FuseActivationPass",
    "GatherBlockQuantizedLoweringPass",
    "MatMulNBitsLoweringPass",
    "OrtCpuLoweringPass",
    "QLinearConvLoweringPass",
    "QOperatorLoweringPass",
    "QdqLoweringPass",
    "UnsignedWeightsPass",
]
