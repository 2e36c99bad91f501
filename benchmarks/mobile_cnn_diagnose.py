"""Where a QDQ EfficientNet-Lite2 loses accuracy: FP32 confidence, weight/activation ablations, per-layer inputs.

Edits a quantized QDQ model (any tool's: activation QuantizeLinear→DequantizeLinear pairs, weight codes→
DequantizeLinear) and scores each variant against FP32 on the held-out crops of `mobile_cnn.py`:

- ``weights``: only the weights quantized (activation Q/DQ pairs bypassed);
- ``activations``: only the activations (weight DequantizeLinear outputs replaced by the FP32 weights);
- per layer: quantized weights plus one activation Q/DQ pair at a time (``--per-layer`` pairs), and each
  activation pair's local SQNR.

    .venv/bin/python benchmarks/mobile_cnn_diagnose.py benchmarks/out/graphquant_w8a8_qdq.onnx --per-layer 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mobile_cnn as mc
from table_rows import log


def confidence(reference: np.ndarray) -> dict[str, float]:
    """Quantiles of FP32's top-1 softmax probability and of its top-1 minus top-2 probability."""
    exp = np.exp(reference - reference.max(axis=1, keepdims=True))
    ordered = np.sort(exp / exp.sum(axis=1, keepdims=True), axis=1)
    result = {f"p1_q{int(q * 100)}": float(np.quantile(ordered[:, -1], q)) for q in (0.25, 0.5, 0.75)}
    result.update(
        {f"margin_q{int(q * 100)}": float(np.quantile(ordered[:, -1] - ordered[:, -2], q)) for q in (0.25, 0.5)}
    )
    result["share_p1_over_0.5"] = float(np.mean(ordered[:, -1] > 0.5))
    return result


def scores(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """mobile_cnn's agreement, plus top-1 agreement on the crops where FP32's top-1 probability is over 0.5."""
    result = mc.agreement(reference, candidate)
    exp = np.exp(reference - reference.max(axis=1, keepdims=True))
    confident = (exp / exp.sum(axis=1, keepdims=True)).max(axis=1) > 0.5
    same = candidate.argmax(axis=1) == reference.argmax(axis=1)
    result["top1_confident"] = float(same[confident].mean()) if confident.any() else float("nan")
    return result


def activation_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(QuantizeLinear, DequantizeLinear) pairs on activations, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            pairs.extend((node, r) for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear")
    return pairs


def bypass(model: onnx.ModelProto, pairs: list[tuple[onnx.NodeProto, onnx.NodeProto]]) -> None:
    """Rewire every reader of each pair's dequantized output to the pair's float input."""
    for quantize, dequantize in pairs:
        for node in model.graph.node:
            for index, name in enumerate(node.input):
                if name == dequantize.output[0]:
                    node.input[index] = quantize.input[0]


def float_weights(model: onnx.ModelProto, fp32: onnx.ModelProto, keep: str | None = None) -> None:
    """Replace each weight DequantizeLinear's output by the FP32 weight its Conv/Gemm reads (but node ``keep``'s)."""
    float_nodes = {node.name: node for node in fp32.graph.node}
    produced = {o: node for node in model.graph.node for o in node.output}
    initializers = {tensor.name: tensor for tensor in fp32.graph.initializer}
    for node in model.graph.node:
        original = float_nodes.get(node.name)
        if node.op_type not in ("Conv", "Gemm") or original is None or node.name == keep:
            continue
        for index in (1, 2):
            source = produced.get(node.input[index]) if index < len(node.input) else None
            if source is not None and source.op_type == "DequantizeLinear" and original.input[index] in initializers:
                model.graph.initializer.append(initializers[original.input[index]])
                node.input[index] = original.input[index]


def run_variant(model: onnx.ModelProto, feeds: list[mc.Feed], outputs: list[str] | None = None) -> list[np.ndarray]:
    """The named outputs (default: the logits) of an edited model, with onnxruntime's graph rewrites off.

    Off: with them on, onnxruntime rewrites a DequantizeLinear feeding a float-weight Conv differently from the
    Q/DQ arithmetic (the ``activations`` variant loses 0.13 of cosine there), so the ablation would measure that.
    """
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    names = outputs or [model.graph.output[0].name]
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "variant.onnx"
        onnx.save(model, str(path))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = mc.THREADS
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runs = [session.run(names, feed) for feed in feeds]
    return [np.concatenate([run[i] for run in runs]) for i in range(len(names))]


def local_sqnr(model: onnx.ModelProto, feeds: list[mc.Feed]) -> list[tuple[float, str, float, float]]:
    """Per activation pair of the full model: (SQNR dB of DQ(Q(x)) against x, tensor, min x, max x)."""
    pairs = activation_pairs(model)
    names = [n for q, dq in pairs for n in (q.input[0], dq.output[0])]
    values = run_variant(model, feeds, names)
    result = []
    for index, (quantize, _) in enumerate(pairs):
        x, y = values[2 * index].astype(np.float64), values[2 * index + 1].astype(np.float64)
        sqnr = 10 * np.log10(np.sum(x**2) / max(np.sum((x - y) ** 2), 1e-30))
        result.append((float(sqnr), quantize.input[0], float(x.min()), float(x.max())))
    return result


def main() -> None:
    """Confidence, the full/weights/activations variants, then one activation pair at a time."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quantized", type=Path)
    parser.add_argument("--fp32", type=Path, default=mc.DEFAULT_OUT / "efficientnet_lite2.onnx")
    parser.add_argument("--per-layer", type=int, default=0, help="score this many activation pairs one at a time")
    parser.add_argument("--per-weight", type=int, default=0, help="score this many layers' weights one at a time")
    parser.add_argument("--layer-images", type=int, default=48, help="held-out crops for the per-layer runs")
    args = parser.parse_args()
    fp32 = onnx.load(str(args.fp32))
    quantized = onnx.load(str(args.quantized))
    images = mc.image_set(mc.HELDOUT_IMAGES)
    feeds = mc.batches(images)
    reference = mc.logits(args.fp32, feeds)
    print("FP32 confidence on the held-out crops:", {k: round(v, 3) for k, v in confidence(reference).items()})
    variants = {"full": quantized}
    weights_only = onnx.ModelProto.FromString(quantized.SerializeToString())
    bypass(weights_only, activation_pairs(weights_only))
    variants["weights only"] = weights_only
    activations_only = onnx.ModelProto.FromString(quantized.SerializeToString())
    float_weights(activations_only, fp32)
    variants["activations only"] = activations_only
    for label, model in variants.items():
        print(f"{label}:", {k: round(v, 4) for k, v in scores(reference, run_variant(model, feeds)[0]).items()})
    subset = mc.batches(images[:: max(1, len(images) // args.layer_images)][: args.layer_images])
    for sqnr, name, low, high in sorted(local_sqnr(quantized, subset))[:15]:
        print(f"local SQNR {sqnr:5.1f} dB at {name} (range {low:.3g} .. {high:.3g})")
    pairs = activation_pairs(weights_only)
    subset_reference = mc.logits(args.fp32, subset)
    baseline = 1 - mc.agreement(subset_reference, run_variant(weights_only, subset)[0])["cos"]
    results = []
    for index, (quantize, _) in enumerate(pairs[: args.per_layer]):
        model = onnx.ModelProto.FromString(quantized.SerializeToString())
        bypass(model, [p for i, p in enumerate(activation_pairs(model)) if i != index])
        loss = 1 - mc.agreement(subset_reference, run_variant(model, subset)[0])["cos"]
        results.append((loss - baseline, quantize.input[0]))
        log(f"{index} {quantize.input[0]}: 1 - cosine {loss:.5f}")
    weight_results = []
    layers = [node.name for node in weights_only.graph.node if node.op_type in ("Conv", "Gemm")]
    for name in layers[: args.per_weight]:
        model = onnx.ModelProto.FromString(weights_only.SerializeToString())
        float_weights(model, fp32, keep=name)
        loss = 1 - mc.agreement(subset_reference, run_variant(model, subset)[0])["cos"]
        weight_results.append((loss, name))
        log(f"weight of {name}: 1 - cosine {loss:.5f}")
    for loss, name in sorted(weight_results, reverse=True)[:10]:
        print(f"only {name}'s weight quantized (float activations): 1 - logit cosine {loss:.5f}")
    print(f"weights only on the per-layer crops: 1 - logit cosine {baseline:.5f}")
    for loss, name in sorted(results, reverse=True)[:15]:
        print(f"weights + only {name}'s activation quantized: 1 - logit cosine grows by {loss:.5f}")


if __name__ == "__main__":
    main()
