"""FlexRound's layer-wise objective against GPTQ's on the real all-MiniLM-L6-v2: tr(Dᵀ·H·D) per linear, D = W - W_q.

The question it answers: is FlexRound's loss (the quantity analysis/flexround.py minimizes) below GPTQ's greedy one
on the same damped Gram H = XᵀX of the calibration inputs? Weights asymmetric per output channel, clip-searched,
GPTQ with act-order, as in benchmarks/flexround_minilm.py; Grams from CALIBRATION_SENTENCES. Each FlexRound run
(``--runs STEPS:LR``) starts from RTN's codes, and once from GPTQ's (``--from-gptq``); losses are printed as
ratios to GPTQ's (below 1: better than GPTQ), with the fraction of GPTQ's codes a GPTQ-started run changed and
the fraction that one ±1 change alone would improve (GPTQ's greedy codes are not a local optimum where it is > 0).

    .venv/bin/python benchmarks/flexround_layer_loss.py [--bits 4 3] [--layers 0 4 5] [--runs 300:1e-3 1000:3e-3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common
from table_rows import log, publish

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.flexround import FlexRoundSettings, Grid, damped, flexround_round
from graphquant.analysis.gptq import gptq_round
from graphquant.analysis.layers import candidates
from graphquant.analysis.weight_fit import fit_ranges, in_major, round_trip

Problem = tuple[str, np.ndarray, np.ndarray]  # linear's name, in_major weight [K, N], Gram [K, K]


def parse_args() -> argparse.Namespace:
    """--bits, --layers (indices into MiniLM's linears in graph order), --runs STEPS:LR, --from-gptq, --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3], help="weight bits (default 4 3)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 4, 5], help="linear indices (default 0 4 5)")
    parser.add_argument("--runs", nargs="+", default=["300:1e-3"], help="FlexRound STEPS:LR runs (default 300:1e-3)")
    parser.add_argument("--from-gptq", action="store_true", help="also one run per --runs started from GPTQ's codes")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="output folder (default benchmarks/out)")
    return parser.parse_args()


def problems(layers: list[int], out: Path) -> list[Problem]:
    """The chosen linears of MiniLM with the Grams of their inputs over the calibration sentences."""
    fp32 = common.ensure_minilm(out)
    model = graphquant.load(fp32)
    found = [c.layer for c in candidates(model.graph) if c.layer is not None and c.layer.weight_array.ndim == 2]
    chosen = [found[index] for index in layers]
    names = [layer.activation.name or "" for layer in chosen]
    calib = common.calibration_batches(
        common.CALIBRATION_SENTENCES, batch=8, input_names=common.graph_input_names(fp32)
    )
    stats = Calibrator.for_model(model, calib, show_progress=False).collect(model, names, gram_names=names)
    return [
        (layer.node.name or "", in_major(layer), np.asarray(stats[name].gram)) for layer, name in zip(chosen, names)
    ]


def loss(hessian: np.ndarray, weight: np.ndarray, rounded: np.ndarray) -> float:
    """tr(Dᵀ·H·D)."""
    error = weight - rounded
    return float(np.sum(error * (hessian @ error)))


def rtn(weight: np.ndarray, gram: np.ndarray, bits: int) -> np.ndarray:
    """RTN on the clip-searched per-channel grid (FlexRound's RTN start)."""
    low, high = fit_ranges(weight, np.diag(gram)[:, None], bits, False, weight.shape[0], clip_search=True)
    return round_trip(weight, low, high, bits, False)


def improving_flips(hessian: np.ndarray, weight: np.ndarray, gptq: tuple[np.ndarray, ...], bits: int) -> float:
    """The fraction of GPTQ's codes whose change by +1 or -1 alone (inside the code range) lowers tr(DᵀHD)."""
    grid = Grid.of_ranges(gptq[1], gptq[2], bits, symmetric=False)
    codes = np.rint(gptq[0] / grid.step)
    pulled = hessian @ (weight - gptq[0])
    # Moving one entry by d changes the loss by -2·d·(H·D)[i, j] + d²·H[i, i].
    lowers = np.zeros(weight.shape, bool)
    for sign in (1, -1):
        inside = (codes + sign >= grid.lower) & (codes + sign <= grid.upper)
        change = sign * grid.step
        lowers |= inside & (change * change * np.diag(hessian)[:, None] < 2 * change * pulled)
    return float(np.mean(lowers))


def rows(problem: Problem, bits: int, runs: list[str], from_gptq: bool) -> list[str]:
    """One markdown row per FlexRound run on one linear: its loss over GPTQ's, and RTN's for reference."""
    name, weight, gram = problem
    hessian, block = damped(gram), weight.shape[0]
    start = time.perf_counter()
    gptq = gptq_round(weight, gram, bits, False, block, True, True)
    gptq_s, base = time.perf_counter() - start, loss(hessian, weight, gptq[0])
    relative_rtn = loss(hessian, weight, rtn(weight, gram, bits)) / base
    flips = improving_flips(hessian, weight, gptq, bits)
    prefix = (
        f"| {name} {weight.shape[0]}x{weight.shape[1]} | W{bits} | {relative_rtn:.3f} | {gptq_s:.1f} | {flips:.4f} |"
    )
    lines = []
    for run in runs:
        steps, rate = run.split(":")
        settings = FlexRoundSettings(int(steps), float(rate))
        for initial in [None, gptq] if from_gptq else [None]:
            start = time.perf_counter()
            rounded = flexround_round(weight, gram, bits, False, block, True, settings, initial)[0]
            seconds = time.perf_counter() - start
            changed = "" if initial is None else f"{np.mean(np.abs(rounded - gptq[0]) > 1e-9):.4f}"
            label = f"{steps} @ {rate}" + (" from GPTQ" if initial is not None else " from RTN")
            lines.append(
                f"{prefix} {label} | {loss(hessian, weight, rounded) / base:.3f} | {changed} | {seconds:.1f} |"
            )
            log(lines[-1])
    return lines


def main() -> None:
    """Collect the Grams, run RTN, GPTQ and every FlexRound run per layer and bit width, print the table."""
    args = parse_args()
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        (
            "| linear [K x N] | bits | RTN / GPTQ | GPTQ s | GPTQ codes a single flip improves | "
            "FlexRound steps @ lr, start | FlexRound / GPTQ | "
            "codes changed vs GPTQ | FlexRound s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for problem in problems(args.layers, out):
        for bits in args.bits:
            lines += rows(problem, bits, args.runs, args.from_gptq)
    header = (
        f"all-MiniLM-L6-v2 linears {args.layers} (graph order), layer loss tr(DᵀHD) on the damped Gram of "
        f"{len(common.CALIBRATION_SENTENCES)} calibration sentences, asymmetric per-channel clip-searched grids, "
        "GPTQ act-order; ratios to GPTQ's loss (below 1 = lower loss than GPTQ)."
    )
    publish(out / "flexround_layer_loss.md", header, "\n".join(lines), started)


if __name__ == "__main__":
    main()
