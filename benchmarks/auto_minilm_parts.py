"""Where the auto models' bytes and errors come from on all-MiniLM-L6-v2: a byte account, and fixed choices judged.

``bytes MODEL...``: each file's initializer bytes by (type, consuming ops), its node and value_info bytes.
``choices``: the auto search's prepared graphs (OutlierTune's rewrites, or none) built with every layer at one scheme
and the tables at one width, judged as the search judges (1 - cosine at the unpadded tokens of its held-out calibration
batches, every fourth one), under round-to-nearest and GPTQ (act-order) weights.
``gains``: on OutlierTune's prepared graph, every layer alone at weight-only W4 and at W8 (``--objective size``'s
scoring and rounding, ort-cpu), its scored noise-to-signal (the search's proxy) beside its end-to-end error so judged:
the ratio is the gain the search's error model has to know; then those ratios' ranges by role and by block, and the
gains the search fits from its role and depth probes (GainGroups).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/auto_minilm_parts.py bytes benchmarks/out/*.onnx
    PYTHONPATH=$PWD .venv/bin/python benchmarks/auto_minilm_parts.py choices
    PYTHONPATH=$PWD .venv/bin/python benchmarks/auto_minilm_parts.py gains
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common

# (method whose exact rewrites prepare the graph; objective whose weight rounding builds it: latency rounds to nearest,
# size by GPTQ in act-order; every layer's scheme; the tables')
CHOICES = [
    ("outliertune", "latency", "w8a8", "e8"),
    ("outliertune", "latency", "w8a8", "e4"),
    ("outliertune", "latency", "w4", "e4"),
    ("outliertune", "size", "w4", "e4"),
    ("outliertune", "size", "w4-b64", "e4-b128"),
    ("none", "size", "w4", "float"),
    ("none", "size", "w4", "e4-b128"),
    ("none", "size", "w4-b64", "e4-b128"),
    ("none", "size", "w4-b128", "e4-b128"),
]
ROUNDING = {"latency": "RTN", "size": "GPTQ"}


def byte_account(path: Path) -> None:
    """Print a model file's bytes: initializers by (type, consumers), nodes, value_info."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    consumers = collections.defaultdict(set)
    for node in graph.node:
        for name in node.input:
            consumers[name].add(node.op_type)
    groups: collections.Counter[tuple[str, str]] = collections.Counter()
    for tensor in graph.initializer:
        key = (onnx.TensorProto.DataType.Name(tensor.data_type), ",".join(sorted(consumers[tensor.name])) or "-")
        groups[key] += tensor.ByteSize()
    nodes = sum(node.ByteSize() for node in graph.node)
    infos = sum(info.ByteSize() for info in graph.value_info)
    print(
        f"{path.name}: file {os.path.getsize(path) / 1e6:.3f} MB, initializers {sum(groups.values()) / 1e6:.3f}, "
        f"nodes {nodes / 1e6:.3f}, value_info {infos / 1e6:.3f}"
    )
    for (dtype, ops), size in groups.most_common():
        if size >= 1000:
            print(f"  {size / 1e6:8.3f} MB  {dtype:6s} -> {ops}")


def search_setup() -> tuple[Any, Any, Any]:
    """MiniLM loaded, a caching calibrator on the search's calibration share and a Judge on its held-out share."""
    import graphquant
    from graphquant.analysis.stats_cache import CachingCalibrator
    from graphquant.recipes import auto

    fp32 = common.ensure_minilm(common.DEFAULT_OUT)
    inputs = common.graph_input_names(fp32)
    calibration = common.calibration_batches(common.CALIBRATION_SENTENCES, batch=8, input_names=inputs)
    model = graphquant.load(fp32)
    kept, held = auto.split_data(calibration)
    return model, CachingCalibrator.for_model(model, kept, False), auto.Judge(model, held, auto.Settings())


def prepared(model: Any, calibrator: Any, method: str, settings: Any) -> Any:
    """The auto search's prepared graph of a method."""
    from graphquant import api
    from graphquant.recipes import Recipe, auto

    base = model.clone()
    api._prepare(base)
    Recipe("auto", auto.METHODS[method], target=settings.target).to_pipeline(calibrator, lower=False)(base)
    return base


def layer_gains() -> None:
    """Every layer alone at W4 and at W8 (size scoring): its proxy, end-to-end error and their ratio, then the ratios
    by role and by block, and the gains the search's probes fit (GainGroups)."""
    import numpy as np

    from graphquant.recipes import auto

    model, calibrator, judge = search_setup()
    settings = auto.Settings(objective="size")
    base = prepared(model, calibrator, "outliertune", settings)
    with auto.remembered_roundings(), auto.remembered_codes():
        units = auto.measure_units(base, calibrator, settings)
        layers = [unit for unit in units if unit.name != auto.EMBEDDINGS]
        floats = {unit.name: auto._float_index(unit) for unit in units}
        ratios: dict[str, list[float]] = {"w4": [], "w8": []}
        for unit in layers:
            for scheme in ratios:
                index = next(i for i, option in enumerate(unit.options) if option.scheme == scheme)
                candidate = auto._build(base, calibrator, settings, "outliertune", units, {**floats, unit.name: index})
                proxy, error = unit.options[index].error, judge(candidate[1])
                ratios[scheme].append(error / proxy)
                print(f"{unit.name:18s} {scheme}: proxy {proxy:.6f}, end to end {error:.6f}, gain {error / proxy:.3f}")
        grouping = auto.GainGroups.of(layers)
        for scheme, values in ratios.items():
            gains = np.array(values)
            for kind in ("role", "depth"):
                groups = [g for g, k in zip(grouping.groups, grouping.kinds) if k == kind]
                print(
                    f"{scheme} gain by {kind}: "
                    + ", ".join(f"{np.min(gains[g]):.2f}-{np.max(gains[g]):.2f}" for g in groups)
                )
        probes = {unit.name: auto._probe_index(unit) for unit in layers}
        proxies = np.array([unit.options[probes[unit.name]].error for unit in layers])
        errors = [
            judge(
                auto._build(
                    base,
                    calibrator,
                    settings,
                    "outliertune",
                    units,
                    {**floats, **{layers[i].name: probes[layers[i].name] for i in g}},
                )[1]
            )
            for g in grouping.groups
        ]
        fitted = grouping.layer_gains(proxies, np.array(errors))
        print("probe schemes:", sorted({unit.options[probes[unit.name]].scheme for unit in layers}))
        print("fitted gains (role x depth), per layer:", " ".join(f"{g:.2f}" for g in fitted))


def judge_choices() -> None:
    """Build each fixed choice from the auto search's prepared graph and print its held-out error and bytes."""
    import onnx_ir as ir

    from graphquant.analysis import sizes
    from graphquant.analysis.search import Unit
    from graphquant.recipes import auto

    model, calibrator, judge = search_setup()
    bases: dict[str, ir.Model] = {}
    units: dict[tuple[str, str], list[Unit]] = {}
    for method, objective, scheme, tables in CHOICES:
        settings = auto.Settings(objective=objective)
        if method not in bases:
            bases[method] = prepared(model, calibrator, method, settings)
        if (method, objective) not in units:
            units[method, objective] = auto.measure_units(bases[method], calibrator, settings)
        chosen = units[method, objective]
        wanted = {unit.name: tables if unit.name == auto.EMBEDDINGS else scheme for unit in chosen}
        choice = {u.name: next(i for i, o in enumerate(u.options) if o.scheme == wanted[u.name]) for u in chosen}
        started = time.perf_counter()
        candidate = auto._build(bases[method], calibrator, settings, method, chosen, choice)[1]
        error = judge(candidate)
        print(
            f"{method:11s} {ROUNDING[objective]:4s} layers {scheme:7s} tables {tables:7s}: error {error:.5f}, "
            f"counted bytes {auto.total(chosen, choice, 'size') / 1e6:.2f} MB, "
            f"initializers {sizes.initializer_bytes(candidate) / 1e6:.2f} MB, {time.perf_counter() - started:.0f} s",
            flush=True,
        )


def main() -> None:
    """bytes MODEL..., choices or gains."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("bytes", "choices", "gains"))
    parser.add_argument("models", nargs="*", type=Path)
    args = parser.parse_args()
    if args.mode == "bytes":
        for path in args.models:
            byte_account(path)
    elif args.mode == "gains":
        layer_gains()
    else:
        judge_choices()


if __name__ == "__main__":
    main()
