"""L-Mul against fp8 multiplication on SmolLM2-135M's decoder linears: per-layer error (lmul_minilm.py's methods).

Per layer: each linear's real input rows (calibration windows of examples/smollm2.py, ``--rows`` sampled) times its
weight; the reference is the float64 product of the float32 operands. L-Mul runs in onnxruntime through graphquant's
LMulPass, fp8 multiplies in numpy (operands rounded to nearest-even, exact products, float64 sums); per-tensor
power-of-two scales for both. Each decoder layer has 7 linears: q, k, v, o, gate, up, down. No end-to-end row.

    nice -n 5 .venv/bin/python benchmarks/lmul_smollm2.py --layers 0 --rows 256 --calib-seqs 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # also puts examples/ on sys.path
import smollm2
import table_rows
from lmul_minilm import (
    METHODS,
    check_against_numpy,
    cosine,
    emulated,
    gain_sqnr_db,
    head_to_head,
    linear_layers,
    sample_rows,
    sqnr_db,
)

import graphquant
from graphquant.analysis.layers import Layer
from graphquant.analysis.weight_fit import in_major

LINEARS_PER_LAYER = 7
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def decoder_linears(model: ir.Model, decoder_layers: list[int]) -> list[tuple[str, Layer]]:
    """(decoder layer.role, layer) of the chosen decoder layers' linears, in graph order."""
    layers = linear_layers(model)
    if len(layers) % LINEARS_PER_LAYER:
        raise SystemExit(f"{len(layers)} linears: not {LINEARS_PER_LAYER} per decoder layer")
    return [
        (f"{index}.{role}", layers[index * LINEARS_PER_LAYER + offset])
        for index in decoder_layers
        for offset, role in enumerate(ROLES)
    ]


def layer_inputs(
    model: ir.Model, layers: list[Layer], feeds: list[dict[str, np.ndarray]], rows: int, seed: int
) -> dict[str, np.ndarray]:
    """Each layer's input rows over the calibration windows (every position), ``rows`` sampled."""
    probe = model.clone()
    names = sorted({layer.activation.name or "" for layer in layers})
    values = {value.name: value for node in probe.graph for value in node.outputs}
    probe.graph.outputs.extend(values[name] for name in names)
    session = common.make_session(ir.to_proto(probe).SerializeToString())
    gathered: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in feeds:
        outputs = session.run(names, feed)
        for name, output in zip(names, outputs):
            gathered[name].append(output.reshape(-1, output.shape[-1]))
    return sample_rows(gathered, rows, seed)


def per_layer(
    model: ir.Model, chosen: list[tuple[str, Layer]], feeds: list[dict[str, np.ndarray]], rows: int, seed: int
) -> dict[str, list[tuple[float, float, float]]]:
    """(SQNR, SQNR after gain, cosine) of every method on every chosen linear."""
    inputs = layer_inputs(model, [layer for _, layer in chosen], feeds, rows, seed)
    scores: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in METHODS}
    for index, (name, layer) in enumerate(chosen):
        x = inputs[layer.activation.name or ""]
        weight = np.ascontiguousarray(in_major(layer, np.float32))
        reference = x.astype(np.float64) @ weight.astype(np.float64)
        for label, fmt, product in METHODS:
            candidate = emulated(x, weight, fmt, product)
            scores[label].append(
                (sqnr_db(reference, candidate), gain_sqnr_db(reference, candidate), cosine(reference, candidate))
            )
        table_rows.log(f"linear {name} ({layer.node.name}, {weight.shape[0]}x{weight.shape[1]}): done")
        if index == 0:
            check_against_numpy(x[:16], weight)
    return scores


def table(chosen: list[tuple[str, Layer]], scores: dict[str, list[tuple[float, float, float]]]) -> str:
    """Summary over the chosen linears, then SQNR per linear."""
    lines = [
        "| multiply | mean SQNR dB | min SQNR dB | mean SQNR after gain dB | mean cosine | min cosine |",
        "|---|---|---|---|---|---|",
    ]
    for label, _, _ in METHODS:
        sqnr, gained, cos = np.array(scores[label]).T
        lines.append(
            f"| {label} | {sqnr.mean():.2f} | {sqnr.min():.2f} | {gained.mean():.2f} | {cos.mean():.6f} "
            f"| {cos.min():.6f} |"
        )
    names = [name for name, _ in chosen]
    lines += ["", "| SQNR dB | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, _, _ in METHODS:
        lines.append(f"| {label} | " + " | ".join(f"{s[0]:.2f}" for s in scores[label]) + " |")
    return "\n".join([*lines, "", *head_to_head(scores)])


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=smollm2.DEFAULT_CACHE / "bench")
    parser.add_argument("--layers", default="0", help="comma-separated decoder layer indices (0-29)")
    parser.add_argument("--rows", type=int, default=256, help="sampled input rows per linear")
    parser.add_argument("--calib-seqs", type=int, default=8, help="128-token calibration windows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    model = ir.external_data.load_to_model(graphquant.load(smollm2.cached_export()))  # the probe runs from bytes
    chosen = decoder_linears(model, [int(index) for index in args.layers.split(",")])
    feeds = smollm2.feeds_for(smollm2.token_sequences(smollm2.CALIBRATION_MODULES, args.calib_seqs), 4)
    scores = per_layer(model, chosen, feeds, args.rows, args.seed)
    header = (
        f"L-Mul vs fp8 multiplication, SmolLM2-135M-Instruct (torch.onnx dynamo export), decoder layers {args.layers} "
        f"({len(chosen)} linears): {args.rows} rows per linear sampled from {args.calib_seqs} x {smollm2.SEQ_LEN} "
        f"calibration tokens; power-of-two tensor scales"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table_rows.publish(args.out / "lmul_smollm2.md", header, table(chosen, scores), started)


if __name__ == "__main__":
    main()
