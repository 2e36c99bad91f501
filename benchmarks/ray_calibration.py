"""Calibration on Ray: wall time and driver peak memory against the number of workers, on all-MiniLM-L6-v2.

Each configuration runs in its own process (in-process calibration, then a local Ray cluster of 1 and of 2 workers),
in interleaved rounds: one calibration of every layer input (the largest single calibration run), then a whole
`w8a8` optimize (its validation runs in the driver). The driver's peak RSS is that process's ru_maxrss: the Ray
workers are processes of their own and are not counted. The quantized models' digests show they are byte-identical.

    python benchmarks/ray_calibration.py [--rounds 2] [--workers 0,1,2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minilm_common import (
    CALIBRATION_SENTENCES,
    DEFAULT_OUT,
    calibration_batches,
    ensure_minilm,
    graph_input_names,
)
from table_rows import log, publish

import graphquant
from graphquant.analysis import distributed
from graphquant.analysis.calibration import Calibrator


def measure(workers: int) -> dict[str, float | str]:
    """One configuration's figures (0 workers: in process)."""
    path = ensure_minilm()
    model = graphquant.load(path)
    feeds = calibration_batches(CALIBRATION_SENTENCES, input_names=graph_input_names(path))
    started = time.perf_counter()
    cluster = distributed.connect(None, workers) if workers else None
    ray_start_s = time.perf_counter() - started
    weights = model.graph.initializers
    linears = [node for node in model.graph if node.op_type in ("MatMul", "Gemm") and node.inputs[1].name in weights]
    names = sorted({node.inputs[0].name or "" for node in linears})
    started = time.perf_counter()
    Calibrator.for_model(model, feeds, False, cluster).collect(model, names, sample_rows=512)
    collect_s = time.perf_counter() - started
    del cluster  # its workers hold the CPUs that optimize's own workers need (Ray ends them with the last handle)
    started = time.perf_counter()
    result = graphquant.optimize(model, "w8a8", feeds, show_progress=False, workers=workers or None)
    optimize_s = time.perf_counter() - started
    digest = hashlib.sha256(ir.to_proto(result.model).SerializeToString()).hexdigest()[:16]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "ray_start_s": ray_start_s,
        "collect_s": collect_s,
        "optimize_s": optimize_s,
        "peak_mib": peak_mib,
        "digest": digest,
    }


def main() -> None:
    """Run the configurations in interleaved rounds, each in a fresh process, and publish the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0: in process)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one)))
        return
    started = time.perf_counter()
    ensure_minilm()
    counts = [int(part) for part in args.workers.split(",")]
    runs: dict[int, list[dict[str, float | str]]] = {count: [] for count in counts}
    for round_index in range(args.rounds):
        for count in counts if round_index % 2 == 0 else counts[::-1]:
            log(f"round {round_index + 1}: {count} workers")
            output = subprocess.run(
                [sys.executable, __file__, "--one", str(count)], check=True, stdout=subprocess.PIPE, text=True
            ).stdout
            runs[count].append(json.loads(output.strip().splitlines()[-1]))
    publish(DEFAULT_OUT / "ray_calibration.md", _header(args.rounds), _table(runs), started)


def _header(rounds: int) -> str:
    """What the table measured."""
    return (
        f"all-MiniLM-L6-v2, {len(CALIBRATION_SENTENCES)} calibration sentences in batches of 8; median of {rounds} "
        "interleaved rounds, each configuration in a fresh process"
    )


def _table(runs: dict[int, list[dict[str, float | str]]]) -> str:
    """The markdown table: one row per worker count."""
    header = "| workers | Ray start (s) | calibrate all layer inputs (s) | w8a8 optimize (s) | driver peak RSS (MiB) |"
    lines = [
        header + " model digest |",
        "|---|---|---|---|---|---|",
    ]
    for count, results in runs.items():
        cells = [_median(results, key) for key in ("ray_start_s", "collect_s", "optimize_s")]
        peak = f"{max(float(r['peak_mib']) for r in results):.0f}"
        digests = ", ".join(sorted({str(r["digest"]) for r in results}))
        label = "in process" if count == 0 else str(count)
        lines.append(f"| {label} | {' | '.join(cells)} | {peak} | {digests} |")
    return "\n".join(lines)


def _median(results: list[dict[str, float | str]], key: str) -> str:
    """The median of one figure over the rounds."""
    values = sorted(float(result[key]) for result in results)
    return f"{values[len(values) // 2]:.1f}"


if __name__ == "__main__":
    main()
