"""Rewrite passes, one per module, and the explicit table of their CLI names."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ClearMetadataAndDocStringPass

from graphquant.passes.bias_correct import BiasCorrectPass
from graphquant.passes.bitmod import BitModPass
from graphquant.passes.dual_binarize import DualBinarizePass
from graphquant.passes.equalize_convs import EqualizeConvsPass
from graphquant.passes.fold_batchnorm import FoldBatchNormPass
from graphquant.passes.fold_constants import FoldConstantsPass
from graphquant.passes.lmul import LMulPass
from graphquant.passes.nbits_accuracy import NBitsAccuracyPass
from graphquant.passes.ocs import OcsPass
from graphquant.passes.outlier_decompose import OutlierDecomposePass
from graphquant.passes.preexecute_dequant import PreexecuteDequantPass
from graphquant.passes.quantize import QuantizePass
from graphquant.passes.quantize_attention import QuantizeAttentionPass
from graphquant.passes.quantize_embeddings import QuantizeEmbeddingsPass
from graphquant.passes.split_quant import SplitQuantPass
from graphquant.passes.symmetrize import SymmetrizePass
from graphquant.passes.upgrade_opset import UpgradeOpsetPass

PASSES: dict[str, type[ir.passes.PassBase]] = {
    "symmetrize": SymmetrizePass,
    "preexecute-dequant": PreexecuteDequantPass,
    "outlier-decompose": OutlierDecomposePass,
    "ocs": OcsPass,
    "split-quant": SplitQuantPass,
    "quantize": QuantizePass,
    "quantize-embeddings": QuantizeEmbeddingsPass,
    "quantize-attention": QuantizeAttentionPass,
    "upgrade-opset": UpgradeOpsetPass,
    # onnx_ir's: drops per-node metadata and doc strings (exporter stack traces), which deployment does not need.
    "clear-metadata": ClearMetadataAndDocStringPass,
    "fold-batchnorm": FoldBatchNormPass,
    "fold-constants": FoldConstantsPass,
    "bitmod": BitModPass,
    "dual-binarize": DualBinarizePass,
    "equalize-convs": EqualizeConvsPass,
    "bias-correct": BiasCorrectPass,
    "nbits-accuracy": NBitsAccuracyPass,
    "lmul": LMulPass,
}

__all__ = [
    "PASSES",
    "BiasCorrectPass",
    "BitModPass",
    "DualBinarizePass",
    "EqualizeConvsPass",
    "FoldBatchNormPass",
    "FoldConstantsPass",
    "LMulPass",
    "NBitsAccuracyPass",
    "OcsPass",
    "OutlierDecomposePass",
    "PreexecuteDequantPass",
    "QuantizeAttentionPass",
    "QuantizeEmbeddingsPass",
    "QuantizePass",
    "SplitQuantPass",
    "SymmetrizePass",
    "UpgradeOpsetPass",
]
