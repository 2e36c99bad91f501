"""Massive activations in SmolLM2-135M: per layer, the largest |x| of down_proj's input and of the residual stream
after it, which token and channels hold it, and how far it stands above the median token.

The down_proj layers are found as graphquant's scale groups whose activation is a product of two activations
(SiLU(gate) * up); the residual stream is the Add that reads down_proj's output.

    .venv/bin/python benchmarks/llm_massive_activations.py [--seqs 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import smollm2

from graphquant.analysis.layers import constant_array, migratable_groups
from graphquant.analysis.runner import open_session


def probes(model: ir.Model) -> list[tuple[str, str]]:
    """(down_proj input, residual sum after down_proj) value names, one pair per decoder layer, in order."""
    pairs = []
    for group in migratable_groups(model.graph):
        producer = group.producer
        if producer is None or producer.op_type != "Mul" or any(constant_array(v) is not None for v in producer.inputs):
            continue
        (layer,) = group.layers
        residual = next(node for node in layer.node.outputs[0].consumers() if node.op_type == "Add")
        pairs.append((group.activation.name or "", residual.outputs[0].name or ""))
    return pairs


def describe(label: str, values: np.ndarray) -> str:
    """One line: max |x|, its token, the token max over the median token max, and the three largest channels."""
    magnitude = np.abs(values)
    token_max = magnitude.max(axis=-1)
    sequence, token = np.unravel_index(token_max.argmax(), token_max.shape)
    channel_max = magnitude.max(axis=(0, 1))
    top = np.argsort(-channel_max)[:3]
    first_token = float(np.mean(token_max.argmax(axis=1) == 0))
    channels = ", ".join(f"{c}: {channel_max[c]:.0f}" for c in top)
    return (
        f"{label:<9} max |x| {magnitude.max():9.1f} (median |x| {np.median(magnitude):.3f}) at token {token} of "
        f"sequence {sequence}; token max / median token max {token_max.max() / np.median(token_max):7.1f}; "
        f"largest channels {channels}; sequences whose largest token is the first: {first_token:.2f}"
    )


def main() -> None:
    """Run the FP32 export on calibration windows and print the two lines of every decoder layer."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=4)
    args = parser.parse_args()
    model = ir.load(smollm2.cached_export(dynamo=True))
    pairs = probes(model)
    names = [name for pair in pairs for name in pair]
    ids = smollm2.token_sequences(smollm2.CALIBRATION_MODULES, args.seqs)
    with open_session(model, names) as session:
        values = dict(zip(names, session.run(names, {"input_ids": ids, "attention_mask": np.ones_like(ids)})))
    for index, (down_input, residual) in enumerate(pairs):
        print(f"layer {index:2d} {describe('down_in', values[down_input])}")
        print(f"layer {index:2d} {describe('residual', values[residual])}")


if __name__ == "__main__":
    main()
