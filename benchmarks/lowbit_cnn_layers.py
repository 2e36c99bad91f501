"""Where W4's error comes from on EfficientNet-Lite2: each class of layer kept at 8 bits, or alone at 4 bits.

The classes, by position in the graph (``layer_classes``): the stem conv, the depthwise convs, the 1x1 expand convs
(those that feed a depthwise conv), the 1x1 project convs (those that read one), the 1x1 head conv (the last conv)
and the classifier. Every row is the weight-only recipe (W4 asymmetric blocks of 32, GPTQ) with ``keep_8bit`` naming
the nodes that get 8-bit weights: "keep C at 8" keeps class C, "only C at 4" keeps every other class. Model, images,
scoring and the table come from benchmarks/mobile_cnn.py; no latency is measured.

    .venv/bin/python benchmarks/lowbit_cnn_layers.py --calib-images 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mobile_cnn import (
    CALIBRATION_IMAGES,
    FP32,
    HELDOUT_IMAGES,
    add_common_arguments,
    batches,
    evaluate,
    exported_into,
    graphquant_build,
    image_set,
    table,
    timed,
)
from table_rows import Row, publish

import graphquant
from graphquant.analysis.layers import Layer, candidates

CLASSES = ("stem", "depthwise", "expand", "project", "head", "classifier")


def layer_classes(path: Path) -> dict[str, list[str]]:
    """The node names of each class (CLASSES) of the model's quantizable layers, in graph order."""
    graph = graphquant.load(path).graph
    layers = [c.layer for c in candidates(graph) if c.layer is not None]
    convs = [layer for layer in layers if layer.node.op_type == "Conv"]
    named: dict[str, list[str]] = {name: [] for name in CLASSES}
    for index, layer in enumerate(layers):
        named[_class_of(layer, convs, index == 0)].append(layer.node.name or "")
    return named


def _class_of(layer: Layer, convs: list[Layer], first: bool) -> str:
    """One layer's class among CLASSES, from its kind and the convs before and after it."""
    if layer.node.op_type != "Conv":
        return "classifier"
    if first:
        return "stem"
    if _depthwise(layer):
        return "depthwise"
    position = convs.index(layer)
    if position == len(convs) - 1:
        return "head"
    return "expand" if _depthwise(convs[position + 1]) else "project"


def _depthwise(layer: Layer) -> bool:
    """A grouped conv with one input channel per group."""
    return layer.node.attributes.get_int("group", 1) > 1 and layer.weight_array.shape[1] == 1


def configs(named: dict[str, list[str]]) -> list[tuple[str, dict[str, object]]]:
    """(label, options for graphquant.optimize): W8 and W4 everywhere, then each class kept at 8 and alone at 4."""
    rows: list[tuple[str, dict[str, object]]] = [("W8 everywhere", {"wbits": 8}), ("W4 everywhere", {})]
    counts = {name: len(nodes) for name, nodes in named.items()}
    for name in CLASSES:
        kept = tuple(named[name])
        rest = tuple(node for other in CLASSES if other != name for node in named[other])
        rows.append((f"keep {name} ({counts[name]}) at 8", {"keep_8bit": kept}))
        rows.append((f"only {name} ({counts[name]}) at 4", {"keep_8bit": rest}))
    return rows


def parse_args() -> argparse.Namespace:
    """--calib-images, --only, --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    return parser.parse_args()


def main() -> None:
    """Export, classify the layers, build every row, score it against FP32, print and write the table."""
    args = parse_args()
    started = time.perf_counter()
    out, fp32 = exported_into(args.out)
    (out / "layers").mkdir(exist_ok=True)
    named = layer_classes(fp32)
    calib_names = CALIBRATION_IMAGES[: args.calib_images]
    calib, heldout = batches(image_set(calib_names)), batches(image_set(HELDOUT_IMAGES))
    wanted = [part for part in (args.only or "").split(",") if part]
    rows = [Row(FP32, fp32)]
    for label, options in configs(named):
        if not wanted or any(part in label for part in wanted):
            build = graphquant_build(fp32, calib, calib[:2], "weight-only", {**options, "keep_failed": True})
            rows.append(timed(label, out / "layers", build))
    evaluate(rows, heldout)
    header = (
        f"EfficientNet-Lite2 weight-only (W4 asymmetric g32, GPTQ act-order, clip search), 8-bit weights by layer "
        f"class ({', '.join(f'{name} {len(nodes)}' for name, nodes in named.items())} layers); calibration: "
        f"{len(calib_names)} sample images, held-out: {len(HELDOUT_IMAGES)} other images (benchmarks/mobile_cnn.py)."
    )
    publish(out / "lowbit_cnn_layers.md", header, table(rows, {}), started)


if __name__ == "__main__":
    main()
