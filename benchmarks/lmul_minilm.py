"""L-Mul against fp8 multiplication on the 36 linear layers of all-MiniLM-L6-v2: per-layer and end-to-end error.

Per layer: each linear's real input rows (calibration sentences, padding positions dropped, ``--rows`` sampled) times
its weight. The reference is the float64 product of the float32 operands. Against it:

- L-Mul at m = 2 (e5m2 operands), 3 (e4m3), 4 (e4m4: e4m3's range, 4-bit mantissa) and 7 (bf16-like), run in
  onnxruntime through graphquant's LMulPass (integer adds on float32 bits, float32 sums);
- fp8 e4m3 / e5m2 multiplication: operands rounded to nearest-even, products exact, float64 sums (numpy).

Every operand gets a per-tensor power-of-two scale (its largest magnitude into the format's range), the same for both.
End to end: every linear rewritten, mean-pooled sentence embeddings against FP32 on held-out sentences.

    nice -n 10 .venv/bin/python benchmarks/lmul_minilm.py --rows 256 --e2e-sentences 16 --seq-len 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common
import table_rows

import graphquant
from graphquant.analysis.layers import Layer, candidates
from graphquant.analysis.lmul import FORMATS, exact_matmul, exact_product, lmul, lmul_matmul, pow2_scale
from graphquant.analysis.weight_fit import in_major
from graphquant.passes.lmul import BITCAST_OPSET, LMulPass
from graphquant.passes.upgrade_opset import UpgradeOpsetPass

# (label, format, product): L-Mul rows each next to the fp8 multiply it is compared with in the paper.
METHODS = (
    ("fp8 e5m2 multiply", "e5m2", "exact"),
    ("L-Mul m=2 (e5m2 operands)", "e5m2", "lmul"),
    ("L-Mul m=3 (e4m3 operands)", "e4m3", "lmul"),
    ("fp8 e4m3 multiply", "e4m3", "exact"),
    ("L-Mul m=4 (e4m4 operands)", "e4m4", "lmul"),
    ("L-Mul m=7 (bf16 operands)", "bf16", "lmul"),
)


def linear_layers(model: ir.Model) -> list[Layer]:
    """The MatMul/Gemm layers with a constant 2-D weight (what LMulPass rewrites)."""
    return [c.layer for c in candidates(model.graph) if c.layer is not None and c.node.op_type in ("MatMul", "Gemm")]


def layer_inputs(model: ir.Model, layers: list[Layer], rows: int, seed: int) -> dict[str, np.ndarray]:
    """Each layer's input rows on the calibration sentences, padding positions dropped, ``rows`` sampled."""
    probe = model.clone()
    names = sorted({layer.activation.name or "" for layer in layers})
    values = {value.name: value for node in probe.graph for value in node.outputs}
    probe.graph.outputs.extend(values[name] for name in names)
    session = common.make_session(ir.to_proto(probe).SerializeToString())
    wanted = sorted({output.name for output in session.get_outputs()} & set(names))
    gathered: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for feed in common.calibration_batches(common.CALIBRATION_SENTENCES[:32]):
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, _inputs(session, feed))))
        real = feed["attention_mask"].astype(bool)
        for name in wanted:
            gathered[name].append(outputs[name][real])
    return sample_rows(gathered, rows, seed)


def sample_rows(gathered: dict[str, list[np.ndarray]], rows: int, seed: int) -> dict[str, np.ndarray]:
    """``rows`` rows of each tensor's stacked parts, drawn without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    sampled = {}
    for name, parts in gathered.items():
        stacked = np.concatenate(parts)
        sampled[name] = stacked[rng.choice(len(stacked), size=min(rows, len(stacked)), replace=False)]
    return sampled


def _inputs(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The part of a feed the session takes."""
    return {i.name: feed[i.name] for i in session.get_inputs()}


def one_layer(weight: np.ndarray) -> ir.Model:
    """x [R, K] · weight [K, N] as an opset-26 model."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, weight.shape[0]]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(weight.shape))
    w.const_value = ir.tensor(weight, name="w")
    node = ir.node("MatMul", [x, w], name="fc")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": BITCAST_OPSET})
    return ir.Model(graph, ir_version=11)


def emulated(x: np.ndarray, weight: np.ndarray, fmt: str, product: str) -> np.ndarray:
    """x · weight through LMulPass in onnxruntime (fp8 multiplies in numpy: rounded operands, exact products)."""
    if product == "exact":
        return exact_matmul(x, weight, FORMATS[fmt])
    model = one_layer(weight)
    LMulPass(format=fmt, product=product)(model)
    session = common.make_session(ir.to_proto(model).SerializeToString())
    return session.run(None, {"x": x})[0].astype(np.float64)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10·log10(|reference|² / |reference - candidate|²)."""
    return float(10 * np.log10(np.sum(reference**2) / max(np.sum((reference - candidate) ** 2), 1e-300)))


def gain_sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """SQNR after the best scalar gain g·candidate: what is left once a systematic gain error is taken out."""
    gain = float(np.sum(reference * candidate) / max(np.sum(candidate**2), 1e-300))
    return sqnr_db(reference, gain * candidate)


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine of the flattened outputs."""
    a, b = reference.ravel(), candidate.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def product_bias(x: np.ndarray, weight: np.ndarray, fmt: str, product: str, rng: np.random.Generator) -> float:
    """Mean signed relative error of single L-Mul products against exact ones, 20000 sampled operand pairs (NaN: fp8)."""
    if product == "exact":
        return float("nan")
    rows, ks, columns = (rng.integers(0, size, 20_000) for size in (x.shape[0], x.shape[1], weight.shape[1]))
    a = x[rows, ks] / pow2_scale(x, FORMATS[fmt])
    b = weight[ks, columns] / pow2_scale(weight, FORMATS[fmt])
    exact = exact_product(a, b, FORMATS[fmt])
    kept = exact != 0
    return float(np.mean((lmul(a, b, FORMATS[fmt])[kept] - exact[kept]) / exact[kept]))


def per_layer(model: ir.Model, rows: int, seed: int) -> dict[str, list[tuple[float, float, float, float]]]:
    """(SQNR, SQNR after gain, cosine, mean product bias) of every method on every layer."""
    layers = linear_layers(model)
    inputs = layer_inputs(model, layers, rows, seed)
    scores: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label, _, _ in METHODS}
    rng = np.random.default_rng(seed + 1)
    for index, layer in enumerate(layers):
        x = inputs[layer.activation.name or ""]
        weight = np.ascontiguousarray(in_major(layer, np.float32))
        reference = x.astype(np.float64) @ weight.astype(np.float64)
        for label, fmt, product in METHODS:
            candidate = emulated(x, weight, fmt, product)
            bias = product_bias(x, weight, fmt, product, rng)
            metrics = (sqnr_db(reference, candidate), gain_sqnr_db(reference, candidate), cosine(reference, candidate))
            scores[label].append((*metrics, bias))
        table_rows.log(f"layer {index + 1}/{len(layers)} {layer.node.name}: done")
        if index == 0:
            check_against_numpy(x[:16], weight)
    return scores


def check_against_numpy(x: np.ndarray, weight: np.ndarray) -> None:
    """The onnxruntime emulation against the numpy L-Mul reference on real rows; refuse to go on if they differ."""
    for fmt in ("e5m2", "e4m3", "e4m4", "bf16"):
        expected = lmul_matmul(x, weight, FORMATS[fmt])
        error = np.abs(emulated(x, weight, fmt, "lmul") - expected).max() / np.abs(expected).max()
        if error > 1e-5:
            raise SystemExit(f"L-Mul {fmt}: onnxruntime differs from the numpy reference by {error:.2e} (relative)")
        table_rows.log(f"check {fmt}: onnxruntime = numpy reference within {error:.1e} (float32 sums)")


def end_to_end(model: ir.Model, sentences: int, seq_len: int) -> dict[str, tuple[float, float]]:
    """Mean and least sentence-embedding cosine against FP32, every linear rewritten by each method."""
    feeds = common.heldout_feeds(seq_len=seq_len, batch=8)[: max(1, sentences // 8)]
    reference = common.embeddings(ir.to_proto(model).SerializeToString(), feeds)
    results = {}
    for label, fmt, product in METHODS:
        candidate = model.clone()
        UpgradeOpsetPass(minimum=BITCAST_OPSET)(candidate)
        LMulPass(format=fmt, product=product)(candidate)
        embedded = common.embeddings(ir.to_proto(candidate).SerializeToString(), feeds)
        results[label] = (common.mean_cosine(reference, embedded), common.min_cosine(reference, embedded))
        table_rows.log(f"end to end {label}: {results[label][0]:.5f}")
    return results


def table(scores: dict[str, list[tuple[float, float, float, float]]], e2e: dict[str, tuple[float, float]]) -> str:
    """The markdown table: per-layer SQNR and cosine over the 36 linears, then end-to-end embedding cosine."""
    lines = [
        (
            "| multiply | mean SQNR dB | min SQNR dB | mean SQNR after gain dB | mean cosine | min cosine "
            "| product bias | embedding cosine mean | min |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, _, _ in METHODS:
        sqnr, gained, cos, bias = np.array(scores[label]).T
        mean_e2e, min_e2e = e2e.get(label, (float("nan"), float("nan")))
        lines.append(
            f"| {label} | {sqnr.mean():.2f} | {sqnr.min():.2f} | {gained.mean():.2f} | {cos.mean():.6f} "
            f"| {cos.min():.6f} | {_percent(bias.mean())} | {mean_e2e:.5f} | {min_e2e:.5f} |"
        )
    return "\n".join(lines + [""] + head_to_head(scores))


def _percent(value: float) -> str:
    """A signed percentage, or a dash for NaN."""
    return "—" if np.isnan(value) else f"{value:+.2%}"


def head_to_head(scores: dict[str, list[tuple[float, float, float, float]]]) -> list[str]:
    """Per-layer wins of each L-Mul width against the fp8 multiply the paper compares it with."""
    pairs = (
        ("L-Mul m=4 (e4m4 operands)", "fp8 e4m3 multiply"),
        ("L-Mul m=3 (e4m3 operands)", "fp8 e4m3 multiply"),
        ("L-Mul m=3 (e4m3 operands)", "fp8 e5m2 multiply"),
        ("L-Mul m=2 (e5m2 operands)", "fp8 e5m2 multiply"),
    )
    lines = []
    for lmul_label, fp8 in pairs:
        ours, theirs = np.array(scores[lmul_label]), np.array(scores[fp8])
        lines.append(
            f"- {lmul_label} vs {fp8}: SQNR higher on {int(np.sum(ours[:, 0] >= theirs[:, 0]))}/{len(ours)} layers "
            f"(mean {np.mean(ours[:, 0] - theirs[:, 0]):+.2f} dB), cosine higher on "
            f"{int(np.sum(ours[:, 2] >= theirs[:, 2]))}/{len(ours)}"
        )
    return lines


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    parser.add_argument("--rows", type=int, default=256, help="sampled input rows per layer")
    parser.add_argument("--e2e-sentences", type=int, default=16, help="held-out sentences end to end (0: skip)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per held-out sentence end to end")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    model = graphquant.load(common.ensure_minilm(args.out))
    scores = per_layer(model, args.rows, args.seed)
    e2e = end_to_end(model, args.e2e_sentences, args.seq_len) if args.e2e_sentences else {}
    header = (
        f"L-Mul vs fp8 multiplication, all-MiniLM-L6-v2, 36 linears: {args.rows} calibration rows per layer; "
        f"end to end {args.e2e_sentences} held-out sentences x {args.seq_len} tokens; power-of-two tensor scales"
    )
    table_rows.publish(args.out / "lmul_minilm.md", header, table(scores, e2e), started)


if __name__ == "__main__":
    main()
