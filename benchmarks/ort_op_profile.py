"""Where an onnxruntime CPU session spends its time: total kernel time per op type on the optimised graph.

Runs each model on the SmolLM2 4 x 128 prefill batch with onnxruntime's profiler on (SessionOptions.enable_profiling),
drops the warm-up runs and sums the kernel events per op type, per run. Node names that contain --split (e.g.
_float_path) are also summed apart.

    .venv/bin/python benchmarks/ort_op_profile.py MODEL.onnx [MODEL.onnx ...] [--runs 5] [--split _float_path]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # also puts examples/ on sys.path
import smollm2

WARMUP = 2


def profile(model: Path, feed: dict[str, np.ndarray], runs: int, splits: list[str]) -> dict[str, float]:
    """Mean milliseconds per run of each op type (and of each split name) over `runs` profiled runs after warm-up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = common.INTRA_OP_THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        inputs = {i.name: feed[i.name] for i in session.get_inputs()}
        for _ in range(WARMUP + runs):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    return _sum_kernels(events, runs, splits)


def _sum_kernels(events: list[dict], runs: int, splits: list[str]) -> dict[str, float]:
    """Kernel microseconds per op type of the last `runs` model runs, in ms per run; 'total' and 'model_run' too."""
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = model_runs[-runs]["ts"]
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or event["ts"] < start or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        totals[op] += event["dur"]
        totals[f"node {event['name'].removesuffix('_kernel_time')} ({op})"] += event["dur"]
        totals["total"] += event["dur"]
        for split in splits:
            if split in event["name"]:
                totals[f"[{split}] {op}"] += event["dur"]
    totals["model_run"] = sum(e["dur"] for e in model_runs[-runs:])
    return {name: value / runs / 1000.0 for name, value in totals.items()}


def main() -> None:
    """Profile every model given and print one table, op types as rows, models as columns."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--split", action="append", default=[], help="also sum nodes whose name contains this")
    parser.add_argument("--top", type=int, default=0, help="also list the slowest nodes")
    args = parser.parse_args()
    ids = smollm2.token_sequences(smollm2.EVALUATION_MODULES, 4)
    feed = smollm2.feeds_for(ids, 4)[0]
    results = {model.stem: profile(model, feed, args.runs, args.split) for model in args.models}
    names = {op for result in results.values() for op in result}
    nodes = sorted(
        (op for op in names if op.startswith("node ")), key=lambda op: -max(r.get(op, 0.0) for r in results.values())
    )
    ops = sorted(names - set(nodes), key=lambda op: -max(r.get(op, 0.0) for r in results.values())) + nodes[: args.top]
    print("| op type | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{r.get(op, 0.0):.1f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
