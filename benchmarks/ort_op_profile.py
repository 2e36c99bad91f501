"""Where an onnxruntime CPU session spends its time: total kernel time per op type on the optimised graph.

Runs each model on the SmolLM2 4 x 128 prefill batch (--feed smollm2, the default) or on the MiniLM latency batch
(--feed minilm: the first 8 held-out sentences padded to 128 tokens, auto_minilm.py's timing feed) with onnxruntime's
profiler on (SessionOptions.enable_profiling), drops the warm-up runs and sums the kernel events per op type, per run
(each node's mean over the runs; --stat min: its least, which load inflates less), with each op type's share of the
summed kernel time. Node names that contain --split (e.g. _float_path) are also summed apart.

    .venv/bin/python benchmarks/ort_op_profile.py MODEL.onnx [MODEL.onnx ...] [--runs 5] [--split _float_path]
        [--feed minilm] [--stat min] [--top 20] [--optimized-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # also puts examples/ on sys.path

WARMUP = 2


def profile(
    models: list[Path],
    feed: dict[str, np.ndarray],
    runs: int,
    splits: list[str],
    statistic: str = "mean",
    optimized: Path | None = None,
) -> dict[str, dict[str, float]]:
    """Milliseconds per run of each op type (and split name) of every model over `runs` profiled runs after warm-up,
    the models' runs interleaved (load falls on all alike): each node's mean or least time over the runs, summed; with
    `optimized`, onnxruntime's optimised graph of each model is written in that folder."""
    with tempfile.TemporaryDirectory() as folder:
        sessions = {
            model.stem: _profiled_session(model, Path(folder) / model.stem, optimized and optimized / model.name)
            for model in models
        }
        feeds = {name: {i.name: feed[i.name] for i in s.get_inputs()} for name, s in sessions.items()}
        for _ in range(WARMUP + runs):
            for name, session in sessions.items():
                session.run(None, feeds[name])
        events = {name: json.loads(Path(s.end_profiling()).read_text()) for name, s in sessions.items()}
    reduce = min if statistic == "min" else statistics.fmean
    return {name: _sum_kernels(found, runs, splits, reduce) for name, found in events.items()}


def _profiled_session(model: Path, prefix: Path, optimized: Path | None):
    """A CPU session of the benchmarks' settings with the profiler on (and the optimised graph written if asked)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = common.INTRA_OP_THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


def _sum_kernels(
    events: list[dict], runs: int, splits: list[str], reduce: Callable[[list[float]], float] = statistics.fmean
) -> dict[str, float]:
    """Kernel ms per run of the last `runs` model runs per op type: each node's times over the runs reduced by
    `reduce` (mean, or min: load-robust), summed; 'total' (all kernels) and 'model_run' (wall time, same reduction)."""
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-runs:]
    start = model_runs[0]["ts"]
    per_node: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") != "Node" or event["ts"] < start or not event["name"].endswith("_kernel_time"):
            continue
        per_node[(event["name"].removesuffix("_kernel_time"), event["args"].get("op_name", "?"))].append(event["dur"])
    totals: dict[str, float] = collections.defaultdict(float)
    for (name, op), durations in per_node.items():
        value = reduce(durations + [0.0] * (runs - len(durations))) / 1000.0
        totals[op] += value
        totals[f"node {name} ({op})"] += value
        totals["total"] += value
        for split in splits:
            if split in name:
                totals[f"[{split}] {op}"] += value
    totals["model_run"] = reduce([e["dur"] for e in model_runs]) / 1000.0
    return dict(totals)


def feed_of(name: str) -> dict[str, np.ndarray]:
    """The profiled batch: SmolLM2's 4 x 128 prefill or MiniLM's 8 x 128 latency feed."""
    if name == "minilm":
        return common.latency_feed()
    import smollm2

    ids = smollm2.token_sequences(smollm2.EVALUATION_MODULES, 4)
    return smollm2.feeds_for(ids, 4)[0]


def cell(result: dict[str, float], op: str) -> str:
    """Milliseconds of one row, with its share of the model's summed kernel time."""
    value = result.get(op, 0.0)
    if op == "model_run":
        return f"{value:.1f}"
    return f"{value:.1f} ({100.0 * value / max(result['total'], 1e-9):.1f}%)"


def main() -> None:
    """Profile every model given and print one table, op types as rows, models as columns."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--split", action="append", default=[], help="also sum nodes whose name contains this")
    parser.add_argument("--top", type=int, default=0, help="also list the slowest nodes")
    parser.add_argument("--feed", choices=("smollm2", "minilm"), default="smollm2")
    parser.add_argument("--stat", choices=("mean", "min"), default="mean", help="each node's time over the runs")
    parser.add_argument("--optimized-dir", type=Path, help="write onnxruntime's optimised graph of each model here")
    args = parser.parse_args()
    feed = feed_of(args.feed)
    if args.optimized_dir is not None:
        args.optimized_dir.mkdir(parents=True, exist_ok=True)
    results = profile(args.models, feed, args.runs, args.split, args.stat, args.optimized_dir)
    names = {op for result in results.values() for op in result}
    nodes = sorted(
        (op for op in names if op.startswith("node ")), key=lambda op: -max(r.get(op, 0.0) for r in results.values())
    )
    ops = sorted(names - set(nodes), key=lambda op: -max(r.get(op, 0.0) for r in results.values())) + nodes[: args.top]
    print("| op type | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for op in ops:
        print(f"| {op} | " + " | ".join(cell(r, op) for r in results.values()) + " |")


if __name__ == "__main__":
    main()
