"""The scoring kernels behind quantization time, this checkout's against another's, on SmolLM2-135M's weights.

Four kernels, each run on the same inputs with both versions, alternating, timed in CPU seconds (all threads):
- the weight clip search (analysis/weight_fit.fit_ranges, per-channel int8 symmetric with clip search, as
  outliertune's quantize pass runs it) over every 2-D weight of the SmolLM2 prefill export, lm_head included;
- the per-layer scheme simulation (analysis/simulate.GroupSimulator.sqnr_db) on a q/k/v-shaped group: 2048 rows of
  576 channels (four of them 50x wider, as massive activations are), 576 + 192 + 192 outputs, the nine outliertune
  candidates of preexecute-dequant;
- the validation comparison (validate.TensorComparison.update) of one 4 x 128 x 49152 logits batch;
- GPTQ (analysis/gptq.gptq_round, as weight-only runs it: W4 asymmetric, blocks of 32, clip search, act-order) on
  the first decoder layer's q, k, v weights (one Gram of 1024 rows of 576 channels, four 50x wider) and its down
  projection (a Gram of 1024 rows of 1536 channels).
Each kernel's results are checked equal (ranges, rounded weights) or within 1e-9 (SQNR, metrics) between the versions.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/quant_time_kernels.py --baseline /path/to/main/checkout
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common  # noqa: F401  (puts examples/ on sys.path)
from table_rows import log, ratio

MODULES = {
    "fit_ranges": "analysis/weight_fit.py",
    "simulate": "analysis/simulate.py",
    "validate": "validate.py",
    "gptq": "analysis/gptq.py",
}


def module(checkout: Path, relative: str, name: str) -> types.ModuleType:
    """One graphquant module of ``checkout`` loaded under its own name (its imports resolve to this checkout)."""
    spec = importlib.util.spec_from_file_location(name, checkout / "graphquant" / relative)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # dataclasses look their module up there
    spec.loader.exec_module(loaded)
    return loaded


def cpu_seconds(run: Callable[[], Any]) -> tuple[float, Any]:
    """CPU seconds of one call (every thread of the process) and its result."""
    start = time.process_time()
    result = run()
    return time.process_time() - start, result


def smollm2_weights() -> list[np.ndarray]:
    """Every 2-D float32 initializer of the SmolLM2 prefill export, as [C_in, C_out]."""
    import onnx_ir as ir
    import smollm2

    model = ir.load(smollm2.cached_export(dynamo=True))
    arrays = [value.const_value.numpy() for value in model.graph.initializers.values() if value.const_value is not None]
    return [a for a in arrays if a.ndim == 2 and a.dtype == np.float32 and a.size >= 1 << 16]


def clip_search(weight_fit: types.ModuleType, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Per-channel int8 clip-searched ranges of every weight."""
    if hasattr(weight_fit, "_SEARCHED"):
        weight_fit._SEARCHED.clear()  # time the search, not the memo
    return [weight_fit.fit_ranges(w, np.ones((w.shape[0], 1)), 8, True, w.shape[0], True)[1] for w in weights]


def simulation(simulate: types.ModuleType) -> list[float]:
    """The nine outliertune candidates' SQNR on a q/k/v-shaped group."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((2048, 576)).astype(np.float32)
    rows[:, :4] *= 50
    layers = [
        types.SimpleNamespace(weight_array=(0.05 * rng.standard_normal((576, n))).astype(np.float32), in_axis=0)
        for n in (576, 192, 192)
    ]
    simulate.layer_bias = lambda layer: np.zeros(layer.weight_array.shape[1], np.float32)
    simulator = simulate.GroupSimulator(rows, layers)
    absmax = np.abs(rows).max(axis=0)
    step = absmax / 127
    candidates = [(np.ones(576, np.float32), None)]
    candidates += [(step * r, 1.0) for r in (1.0, 0.9, 0.8, 0.7, 0.6)]
    candidates += [((absmax / absmax.max()) ** e, None) for e in (0.75, 0.5, 0.25)]
    return [simulator.sqnr_db(divisor, 8, 8, activation) for divisor, activation in candidates]


def comparison(validate: types.ModuleType) -> dict[str, float]:
    """Metrics of one logits-sized batch."""
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((4, 128, 49152)).astype(np.float32)
    candidate = reference + (0.03 * rng.standard_normal(reference.shape)).astype(np.float32)
    metrics = validate.TensorComparison()
    metrics.update(reference, candidate, 1e-4, 1e-5)
    return {key: float(value) for key, value in metrics.as_dict().items()}


def gptq(gptq_module: types.ModuleType, weights: list[np.ndarray]) -> list[np.ndarray]:
    """The GPTQ-rounded q, k, v (one shared Gram) and down projection of the first decoder layer."""
    from graphquant.analysis import weight_fit

    weight_fit._SEARCHED.clear()  # both versions share this module's memo: time the search, not the memo
    if hasattr(gptq_module, "_FACTORS"):
        gptq_module._FACTORS.clear()  # this version's memo serves q, k and v within the call, not across rounds
    rng = np.random.default_rng(2)
    rounded = []
    for width, count in ((576, 3), (1536, 1)):
        rows = rng.standard_normal((1024, width))
        rows[:, :4] *= 50
        gram = rows.T @ rows
        for weight in [w for w in weights if w.shape[0] == width][:count]:
            rounded.append(gptq_module.gptq_round(weight, gram, 4, False, 32, True, True)[0])
    return rounded


def main() -> None:
    """Time each kernel in both checkouts, alternating, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    this = Path(__file__).resolve().parents[1]
    weights = smollm2_weights()
    log(f"{len(weights)} weights, {sum(w.size for w in weights) / 1e6:.1f} M values")
    kernels = {
        "fit_ranges": lambda m: clip_search(m, weights),
        "simulate": simulation,
        "validate": comparison,
        "gptq": lambda m: gptq(m, weights),
    }
    lines = ["| kernel | baseline CPU s | this CPU s | speed-up | results equal |", "|---|---|---|---|---|"]
    for name, kernel in kernels.items():
        versions = [module(checkout, MODULES[name], f"{name}_{i}") for i, checkout in enumerate((args.baseline, this))]
        seconds: list[list[float]] = [[], []]
        results: list[Any] = [None, None]
        for _ in range(args.rounds):
            for index, version in enumerate(versions):
                spent, results[index] = cpu_seconds(lambda version=version, kernel=kernel: kernel(version))
                seconds[index].append(spent)
                log(f"{name} [{'baseline' if index == 0 else 'this'}]: {spent:.2f} CPU s")
        before, after = min(seconds[0]), min(seconds[1])
        lines.append(f"| {name} | {before:.2f} | {after:.2f} | {ratio(before, after)} | {_same(*results)} |")
    print(
        f"Scoring kernels, min of {args.rounds} alternating rounds, CPU seconds "
        f"(benchmarks/quant_time_kernels.py)\n\n" + "\n".join(lines)
    )


def _same(first: Any, second: Any) -> str:
    """'yes' where two kernel results agree (arrays exactly, numbers within 1e-9 relative), else the worst gap."""
    if isinstance(first, dict):
        first, second = list(first.values()), list(second.values())
    if isinstance(first[0], np.ndarray):
        differing = sum(int(np.count_nonzero(a != b)) for a, b in zip(first, second))
        return "yes" if differing == 0 else f"{differing} ranges differ"
    gap = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(first, second) if np.isfinite(a))
    return "yes" if gap <= 1e-9 else f"within {gap:.1e}"


if __name__ == "__main__":
    main()
