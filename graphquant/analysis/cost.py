"""Cost of layers and of splitting them: multiply-adds and parameters, the overhead budget, and the split ledger.

MACs are counted per output row for MatMul/Gemm (one token of a [batch, tokens, C] activation: token counts are
symbolic in most exports) and per image for Conv (per output position where the spatial size is not static).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx_ir as ir

from graphquant.analysis.layers import Layer, candidates
from graphquant.analysis.simulate import fake_quantize
from graphquant.quant_spec import SPLIT_COST_KEY

SPLITTABLE_OPS = ("MatMul", "Gemm", "Conv")

Item = TypeVar("Item")


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Multiply-adds (per ``unit``) and parameters of one layer."""

    macs: int
    params: int
    unit: str


@dataclasses.dataclass(frozen=True)
class SplitCost:
    """What one split pass added to one layer, and the simulated SQNR it gains at the target weight bits."""

    pass_name: str
    layer: str
    added_macs: int
    added_params: int
    layer_macs: int
    layer_params: int
    unit: str
    gain_db: float
    model_macs: int

    @property
    def added_macs_fraction(self) -> float:
        """Added multiply-adds relative to the layer's own."""
        return self.added_macs / max(self.layer_macs, 1)


def layer_cost(layer: Layer) -> LayerCost:
    """The layer's MACs per output row (MatMul/Gemm) or per image (Conv, static output) and its weight+bias size."""
    weight = layer.weight_array
    params = weight.size + _bias_size(layer.node)
    if layer.node.op_type != "Conv":
        return LayerCost(macs=weight.size, params=params, unit="per row")
    spatial = layer.node.outputs[0].shape
    dims = list(spatial)[2:] if spatial is not None else []
    if dims and all(isinstance(d, int) for d in dims):
        return LayerCost(macs=weight.size * math.prod(dims), params=params, unit="per image")  # type: ignore[arg-type]
    return LayerCost(macs=weight.size, params=params, unit="per output position")


def _bias_size(node: ir.Node) -> int:
    """Elements of a Gemm C or Conv B input (a MatMul's bias Add is counted with the Add, not here)."""
    if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
        constant = node.inputs[2].const_value
        return 0 if constant is None else int(constant.size)
    return 0


def splittable_layers(graph: ir.Graph) -> list[Layer]:
    """MatMul/Gemm/Conv layers with a constant float weight, in graph order."""
    return [c.layer for c in candidates(graph) if c.layer is not None and c.node.op_type in SPLITTABLE_OPS]


def model_layer_macs(graph: ir.Graph) -> int:
    """The MACs of every MatMul/Gemm/Conv layer of the graph, summed in their own units."""
    return sum(layer_cost(layer).macs for layer in splittable_layers(graph))


def affordable(
    items: Sequence[Item], added_macs: Sequence[int], gains_db: Sequence[float], budget: float
) -> list[Item]:
    """Drop the items with the least SQNR gain per added MAC until the rest fit the budget; keep the given order."""
    ranked = sorted(range(len(items)), key=lambda i: (-gains_db[i] / max(added_macs[i], 1), i))
    total = sum(added_macs)
    while ranked and total > budget:
        total -= added_macs[ranked.pop()]
    kept = set(ranked)
    return [item for index, item in enumerate(items) if index in kept]


def per_channel_rtn(weight: np.ndarray, bits: int) -> np.ndarray:
    """Fake-quantized [C_in, C_out, ...] weights: symmetric absmax round-to-nearest per output channel (axis 1)."""
    reduce_axes = tuple(axis for axis in range(weight.ndim) if axis != 1)
    values = weight.astype(np.float64)
    absmax = np.maximum(np.abs(values).max(axis=reduce_axes, keepdims=True), 1e-12)
    return fake_quantize(values, absmax / (2 ** (bits - 1) - 1), bits)


def weighted_noise(weight: np.ndarray, approximate: np.ndarray, row_energy: np.ndarray | None) -> float:
    """Σ_j e_j·Σ_k (W_jk - Ŵ_jk)² over [C_in, ...] weights, e_j = E[x_j²] from calibration (ones when None)."""
    energy = np.ones(weight.shape[0]) if row_energy is None else np.maximum(row_energy, 0.0)
    energy = energy.reshape((weight.shape[0],) + (1,) * (weight.ndim - 1))
    return float(np.sum(energy * (weight.astype(np.float64) - approximate) ** 2))


def gain_db(plain_noise: float, split_noise: float) -> float:
    """SQNR(split) - SQNR(plain) = 10·log10(plain noise / split noise): the signal cancels."""
    return 10.0 * math.log10(max(plain_noise, 1e-30) / max(split_noise, 1e-30))


def sqnr_gain_db(weight: np.ndarray, plain: np.ndarray, split: np.ndarray, row_energy: np.ndarray | None) -> float:
    """The SQNR gain of ``split`` over ``plain`` as approximations of [C_in, ...] weights (output error weighting)."""
    return gain_db(weighted_noise(weight, plain, row_energy), weighted_noise(weight, split, row_energy))


def record_split(graph: ir.Graph, cost: SplitCost) -> None:
    """Append a split's cost to the graph's ledger (kept on the graph: lowering may replace the layer nodes)."""
    graph.meta[SPLIT_COST_KEY] = [*graph.meta.get(SPLIT_COST_KEY, []), cost]


def split_costs(model: ir.Model) -> list[SplitCost]:
    """Every split recorded on the model's graph, in the order they were made."""
    return list(model.graph.meta.get(SPLIT_COST_KEY, []))


def latency_cache_path() -> Path:
    """The file of measured layer-form latencies: $GRAPHQUANT_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get("GRAPHQUANT_CACHE_DIR"):
        return Path(os.environ["GRAPHQUANT_CACHE_DIR"]) / "latency.json"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphquant" / "latency.json"


def cached_latencies(keys: Sequence[str], measure: Callable[[], Sequence[float]]) -> list[float]:
    """Layer-form latencies from the cache file; when one is missing, all measured now and written there."""
    known = _read_latencies()
    if any(key not in known for key in keys):
        known.update(zip(keys, measure()))
        _write_latencies(known)
    return [known[key] for key in keys]


def _read_latencies() -> dict[str, float]:
    """The cache file's entries (none when it is missing or unreadable: they are measured again)."""
    try:
        data = json.loads(latency_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


def _write_latencies(latencies: dict[str, float]) -> None:
    """Write the cache atomically; a folder that cannot be written only costs a re-measurement next time."""
    path = latency_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as f:
            json.dump(latencies, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError:
        return
