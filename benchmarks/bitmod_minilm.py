"""BitMoD W4/W3 (per-group data types) against symmetric absmax RTN at the same group size, on all-MiniLM-L6-v2.

All 36 linear weights are quantized weight-only in groups of 128 input channels per output column. The BitMoD
rows are real graphquant models (the `bitmod` recipe, saved and run in onnxruntime), checked against the numpy
dequantization of the same quantization. The RTN rows are simulated: their fake-quantized weights are written
back as float, so their size is an estimate with the same uint32 code packing and a float32 scale per group.

    .venv/bin/python benchmarks/bitmod_minilm.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common

import graphquant
from graphquant.analysis.bitmod import BITMOD_TYPES, CLIP_RATIOS, GROUP_SIZE, int_type, quantize_weight
from graphquant.analysis.layers import Layer, candidates

Quantizer = Callable[[np.ndarray, int], np.ndarray]


def rtn(matrix: np.ndarray, bits: int, ratios: Sequence[float] = (1.0,)) -> np.ndarray:
    """Symmetric RTN per group of GROUP_SIZE rows of each column, step = ratio · absmax / qmax (best ratio by MSE)."""
    rows, columns = matrix.shape
    padded = np.zeros((-(-rows // GROUP_SIZE) * GROUP_SIZE, columns), np.float32)
    padded[:rows] = matrix
    groups = padded.reshape(-1, GROUP_SIZE, columns)
    qmax = 2 ** (bits - 1) - 1
    absmax = np.maximum(np.abs(groups).max(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    best, best_error = groups, np.full(absmax.shape, np.inf, np.float32)
    for ratio in ratios:
        step = absmax * np.float32(ratio) / qmax
        candidate = np.clip(np.rint(groups / step), -qmax, qmax) * step
        error = np.sum((candidate - groups) ** 2, axis=1, keepdims=True)
        best = np.where(error < best_error, candidate, best)
        best_error = np.minimum(error, best_error)
    return best.reshape(padded.shape)[:rows].astype(np.float32)


def linear_layers(model: ir.Model) -> list[Layer]:
    """The MatMul/Gemm layers with a constant 2-D weight (what the bitmod pass rewrites)."""
    return [c.layer for c in candidates(model.graph) if c.layer is not None and c.node.op_type in ("MatMul", "Gemm")]


def simulated(model: ir.Model, bits: int, quantize: Quantizer) -> bytes:
    """The model with every linear weight replaced by quantize([K, N] weight, bits), as float, serialized."""
    copy = model.clone()
    for layer in linear_layers(copy):
        weight = layer.weight_array
        matrix = weight if layer.in_axis == 0 else weight.T
        fake = quantize(matrix.astype(np.float32), bits)
        layer.weight.const_value = ir.tensor(fake if layer.in_axis == 0 else fake.T, name=layer.weight.name)
    return ir.to_proto(copy).SerializeToString()


def packed_size_mb(model: ir.Model, fp32_mb: float, bits: int, per_group_bytes: int) -> float:
    """FP32 size minus the float linear weights plus uint32-packed codes and per-group bytes (estimate)."""
    fields = 32 // bits
    saved = 0.0
    for layer in linear_layers(model):
        k = layer.weight_array.shape[layer.in_axis]
        n = layer.weight_array.size // k
        padded = -(-k // GROUP_SIZE) * GROUP_SIZE
        saved += 4 * k * n - (4 * -(-padded // fields) * n + per_group_bytes * (padded // GROUP_SIZE) * n)
    return fp32_mb - saved / 1e6


def bitmod(clip_search: bool = True, with_int: bool = False) -> Quantizer:
    """The numpy BitMoD dequantization, optionally without the clip search or with the INT grid as a fifth type."""

    def quantize(matrix: np.ndarray, bits: int) -> np.ndarray:
        types = (*BITMOD_TYPES[bits], int_type(bits)) if with_int else None
        ratios = CLIP_RATIOS if clip_search else (1.0,)
        return quantize_weight(matrix, bits, clip_ratios=ratios, types=types).dequantize()

    return quantize


# (label, quantizer, whether the size estimate applies): float models with fake-quantized linear weights.
SIMULATED: list[tuple[str, Quantizer, bool]] = [
    ("  BitMoD W{bits} without clip search (sim)", bitmod(clip_search=False), False),
    ("  BitMoD W{bits} + INT{bits} as a fifth type (sim)", bitmod(with_int=True), False),
    ("RTN W{bits} g128 absmax (sim)", rtn, True),
    ("RTN W{bits} g128 + clip search (sim)", lambda matrix, bits: rtn(matrix, bits, CLIP_RATIOS), True),
]


def main() -> None:
    """Build, run and tabulate every row."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    args = parser.parse_args()
    fp32_path = common.ensure_minilm(args.out)
    model = graphquant.load(fp32_path)
    heldout = common.heldout_feeds()
    reference = common.embeddings(fp32_path, heldout)
    fp32_mb = common.file_size_mb(fp32_path)
    rows = [("FP32", 1.0, 1.0, fp32_mb, "")]
    for bits in (4, 3):
        start = time.perf_counter()
        result = graphquant.optimize(model, "bitmod", wbits=bits, show_progress=False)
        seconds = time.perf_counter() - start
        path = graphquant.save(result, args.out / f"graphquant_bitmod_w{bits}.onnx", overwrite=True)
        embedded = common.embeddings(path, heldout)
        same = common.embeddings(simulated(model, bits, bitmod()), heldout)
        check = f"optimize {seconds:.1f}s; max |emb - numpy-dequant model| {np.abs(embedded - same).max():.1e}"
        rows.append(_row(f"graphquant bitmod W{bits} g128", reference, embedded, common.file_size_mb(path), check))
        rtn_mb = packed_size_mb(model, fp32_mb, bits, per_group_bytes=4)
        for label, quantize, sized in SIMULATED:
            embedded = common.embeddings(simulated(model, bits, quantize), heldout)
            rows.append(
                _row(label.format(bits=bits), reference, embedded, rtn_mb if sized else None, "est." if sized else "")
            )
    print(f"all-MiniLM-L6-v2, {len(reference)} held-out sentences, mean-pooled embeddings vs FP32")
    print("| model | mean cos | min cos | size MB | note |\n|---|---|---|---|---|")
    for label, mean, low, size, note in rows:
        print(f"| {label} | {mean:.5f} | {low:.5f} | {'' if size is None else f'{size:.1f}'} | {note} |")


def _row(
    label: str, reference: np.ndarray, embedded: np.ndarray, size: float | None = None, note: str = ""
) -> tuple[str, float, float, float | None, str]:
    """One table row: mean and min cosine against FP32."""
    print(f"done: {label}", file=sys.stderr, flush=True)
    return label, common.mean_cosine(reference, embedded), common.min_cosine(reference, embedded), size, note


if __name__ == "__main__":
    main()
