"""preexecute-dequant's scoring on SmolLM2, replayed with this checkout's GroupSimulator and another's.

Runs each preset once with this checkout on SmolLM2-135M's prefill export (quant_time.py's 8 calibration windows),
recording every scale group's simulator (rows, scored weight columns, bias) and every ``sqnr_db`` call. Then, group
by group, it builds both versions' simulators on the same arrays (the screen as every SCREEN_STRIDE-th row, as the
pass does) and scores every recorded call with each, alternating which goes first, on one BLAS thread. It prints
each version's CPU seconds and how many SQNRs differ between them (with the largest relative gap).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/score_replay.py --baseline /path/to/main/checkout
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common  # noqa: F401  (puts examples/ on sys.path)
from table_rows import log

from graphquant.analysis import simulate
from graphquant.analysis.simulate import one_blas_thread
from graphquant.passes import preexecute_dequant


@dataclasses.dataclass
class Recorded:
    """One group's simulator inputs and its scoring calls (arguments, and whether on the screening rows)."""

    rows: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    calls: list[tuple[bool, tuple[Any, ...]]] = dataclasses.field(default_factory=list)


def record(preset: str) -> list[Recorded]:
    """Run the preset on SmolLM2 with this checkout, recording every group's scoring."""
    import smollm2 as example

    import graphquant

    groups: list[Recorded] = []
    original_of, original_score = preexecute_dequant.Screened.of.__func__, simulate.GroupSimulator.sqnr_db

    def of(cls: type, rows: np.ndarray, layers: Any) -> preexecute_dequant.Screened:
        screened = original_of(cls, rows, layers)
        groups.append(Recorded(screened.full.rows, screened.full.weight, screened.full.bias))
        screened.full.recorded, screened.screen.recorded = (groups[-1], False), (groups[-1], True)
        return screened

    def sqnr_db(self: simulate.GroupSimulator, *args: Any, **options: Any) -> float:
        if hasattr(self, "recorded"):
            group, screen = self.recorded
            group.calls.append((screen, (*args, *options.values())))
        return original_score(self, *args, **options)

    preexecute_dequant.Screened.of = classmethod(of)  # type: ignore[method-assign, assignment]
    simulate.GroupSimulator.sqnr_db = sqnr_db  # type: ignore[method-assign]
    try:
        feeds = example.feeds_for(example.token_sequences(example.CALIBRATION_MODULES, 8), 4)
        model = graphquant.load(example.cached_export(dynamo=True))
        graphquant.optimize(model, preset, calibration=feeds, target="ort-cpu", show_progress=False)
    finally:
        preexecute_dequant.Screened.of = classmethod(original_of)  # type: ignore[method-assign, assignment]
        simulate.GroupSimulator.sqnr_db = original_score  # type: ignore[method-assign]
    return groups


def version(checkout: Path, name: str) -> types.ModuleType:
    """``checkout``'s analysis/simulate.py loaded under its own name (its imports resolve to this checkout)."""
    spec = importlib.util.spec_from_file_location(name, checkout / "graphquant" / "analysis" / "simulate.py")
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def replay(module: types.ModuleType, group: Recorded) -> tuple[float, list[float]]:
    """CPU seconds and SQNRs of one version on one group: its simulators built, every call scored."""
    module.layer_bias = lambda layer: group.bias  # the recorded weight is the group's scored columns already
    layer = types.SimpleNamespace(weight_array=group.weight, in_axis=0)
    with one_blas_thread():
        start = time.process_time()
        full = module.GroupSimulator(group.rows, [layer], max_columns=group.weight.shape[1])
        screen = full.every(preexecute_dequant.SCREEN_STRIDE)
        scores = [(screen if on_screen else full).sqnr_db(*args) for on_screen, args in group.calls]
        return time.process_time() - start, scores


def main() -> None:
    """Record each preset, replay it with both versions and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--presets", default="outliertune,llm-w8a8")
    args = parser.parse_args()
    versions = [
        version(args.baseline, "simulate_baseline"),
        version(Path(__file__).resolve().parents[1], "simulate_this"),
    ]
    lines = [
        "| preset | groups | scorings | baseline CPU s | this CPU s | SQNRs differing | largest relative gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset in args.presets.split(","):
        groups = record(preset)
        seconds, differing, gap = [0.0, 0.0], 0, 0.0
        for index, group in enumerate(groups):
            order = (0, 1) if index % 2 else (1, 0)
            results: dict[int, list[float]] = {}
            for which in order:
                spent, results[which] = replay(versions[which], group)
                seconds[which] += spent
            for before, after in zip(results[0], results[1]):
                if before != after:
                    differing += 1
                    gap = max(gap, abs(before - after) / abs(before))
        calls = sum(len(g.calls) for g in groups)
        log(f"{preset}: baseline {seconds[0]:.2f} CPU s, this {seconds[1]:.2f}")
        lines.append(
            f"| {preset} | {len(groups)} | {calls} | {seconds[0]:.2f} | {seconds[1]:.2f} | {differing} | {gap:.1e} |"
        )
    print("preexecute-dequant's scoring replayed, one BLAS thread (benchmarks/score_replay.py)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
