"""The run report: per-layer decisions, fidelity per output and per layer, and sizes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphquant.analysis.cost import SplitCost
from graphquant.output_paths import staged_text
from graphquant.quant_spec import DECISION_KEY, LayerDecision
from graphquant.validate import TensorComparison


@dataclasses.dataclass
class Report:
    """What a run did and how close its output stays to the reference."""

    recipe: str
    target: str
    passes: list[str]
    layers: list[LayerDecision]
    bytes_before: int
    bytes_after: int
    outputs: dict[str, TensorComparison] = dataclasses.field(default_factory=dict)
    layer_metrics: dict[str, TensorComparison] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    split_costs: list[SplitCost] = dataclasses.field(default_factory=list)
    # Per quantized layer: bytes of the stored tensors it reads (weights, scales, codes) before and after.
    layer_bytes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # Validation: the cosine every output had to reach (None: not validated), and one line per output that failed.
    min_cosine: float | None = None
    failures: list[str] = dataclasses.field(default_factory=list)
    # The auto recipe's search (recipes/auto.Search.to_dict): budget, per-layer choices with why, tried points, front.
    auto: dict[str, Any] | None = None

    @property
    def quantized(self) -> list[LayerDecision]:
        """Layers that were quantized."""
        return [layer for layer in self.layers if layer.status == "quantized"]

    @property
    def kept_float(self) -> list[LayerDecision]:
        """Layers left in float, each with its reason."""
        return [layer for layer in self.layers if layer.status != "quantized"]

    def worst_layer(self) -> tuple[str, float] | None:
        """The measured layer with the lowest output SQNR."""
        if not self.layer_metrics:
            return None
        name = min(self.layer_metrics, key=lambda n: self.layer_metrics[n].sqnr_db)
        return name, self.layer_metrics[name].sqnr_db

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "recipe": self.recipe,
            "target": self.target,
            "passes": self.passes,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "layers": [
                {**dataclasses.asdict(layer), **_metrics(self.layer_metrics, layer.node), **self._bytes(layer.node)}
                for layer in self.layers
            ],
            "outputs": {name: _finite(c.as_dict()) for name, c in self.outputs.items()},
            "validation": {"min_cosine": self.min_cosine, "failures": self.failures},
            "notes": self.notes,
            "split_costs": [dataclasses.asdict(cost) for cost in self.split_costs],
            **({} if self.auto is None else {"auto": self.auto}),
        }

    def _bytes(self, node_name: str) -> dict[str, int]:
        """The layer's stored bytes before and after, if known."""
        if node_name not in self.layer_bytes:
            return {}
        before, after = self.layer_bytes[node_name]
        return {"bytes_before": before, "bytes_after": after}

    def to_json(self) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_json(self, path: str | Path) -> None:
        """Write the report as JSON, atomically (temp file beside it, then rename); a device or folder is refused."""
        with staged_text(path, self.to_json(), "the report"):
            pass

    def format_table(self) -> str:
        """A short human-readable summary table."""
        lines = [
            f"recipe {self.recipe} -> target {self.target}",
            f"layers quantized: {len(self.quantized)}   kept float: {len(self.kept_float)}",
        ]
        reasons: dict[str, int] = {}
        for layer in self.kept_float:
            reasons[layer.reason] = reasons.get(layer.reason, 0) + 1
        lines.extend(f"  float x{count}: {reason}" for reason, count in sorted(reasons.items()))
        lines.append(f"size: {_megabytes(self.bytes_before)} -> {_megabytes(self.bytes_after)}")
        for name, comparison in self.outputs.items():
            lines.append(
                f"output {name}: cosine {comparison.cosine:.5f}  SQNR {comparison.sqnr_db:.1f} dB  "
                f"max abs err {comparison.max_abs_error:.3g}"
            )
        worst = self.worst_layer()
        if worst is not None:
            lines.append(f"worst layer: {worst[0]} SQNR {worst[1]:.1f} dB")
        lines.extend(self.format_validation())
        lines.extend(self.format_splits())
        lines.extend(self.format_search())
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def format_search(self) -> list[str]:
        """The auto search's budget, choice and tries, if the run was one."""
        if self.auto is None:
            return []
        chosen = self.auto["chosen"]
        schemes = ", ".join(f"{count} x {scheme}" for scheme, count in sorted(chosen["schemes"].items()))
        verdict = "meets" if chosen["meets_budget"] else "MISSES"
        line = (
            f"auto: {self.auto['method']}, {schemes}; held-out {self.auto['metric']} error "
            f"{chosen['measured_error']:.5f} {verdict} the budget {self.auto['budget_error']:.5f} "
            f"(objective {self.auto['objective']}; {len(self.auto['tried'])} candidates built, "
            f"{self.auto['seconds']:.1f} s)"
        )
        return [line]

    def format_validation(self) -> list[str]:
        """The validation threshold and its verdict, if the run was validated."""
        if self.min_cosine is None:
            return []
        rule = f"every output cosine >= {self.min_cosine:g} and finite"
        if not self.failures:
            return [f"validation: passed ({rule})"]
        return [f"validation: FAILED ({rule})", *(f"  {failure}" for failure in self.failures)]

    def format_splits(self) -> list[str]:
        """The MACs and parameters the split passes added, in total and per layer."""
        if not self.split_costs:
            return []
        model_macs = min(cost.model_macs for cost in self.split_costs)
        added = sum(cost.added_macs for cost in self.split_costs)
        params = sum(cost.added_params for cost in self.split_costs)
        share = added / max(model_macs, 1)
        unit = self.split_costs[0].unit
        lines = [
            f"splitting: +{added} MACs {unit} (+{share:.1%}), +{params} parameters, {len(self.split_costs)} layers"
        ]
        lines.extend(
            f"  {cost.pass_name:<12} {cost.layer:<36} +{cost.added_macs_fraction:.1%} MACs  +{cost.added_params} params"
            f"  {cost.gain_db:+.1f} dB simulated"
            for cost in self.split_costs
        )
        return lines

    def format_layers(self) -> str:
        """One line per layer: status, scheme, measured SQNR, and why."""
        lines = [f"{'layer':<36} {'status':<9} {'SQNR dB':>8} {'kB before -> after':>20}  scheme / reason"]
        for layer in self.layers:
            metric = self.layer_metrics.get(layer.node)
            sqnr = f"{metric.sqnr_db:8.1f}" if metric is not None else f"{'':8}"
            sizes = self.layer_bytes.get(layer.node)
            size = f"{sizes[0] / 1e3:9.1f} -> {sizes[1] / 1e3:7.1f}" if sizes is not None else ""
            detail = "; ".join(part for part in (layer.scheme, layer.reason) if part)
            lines.append(f"{layer.node:<36} {layer.status:<9} {sqnr} {size:>20}  {detail}")
        return "\n".join(lines)


def layer_decisions(model: ir.Model) -> list[LayerDecision]:
    """The decisions recorded on the model's nodes, in graph order."""
    return [node.meta[DECISION_KEY] for node in model.graph if DECISION_KEY in node.meta]


def _metrics(metrics: dict[str, TensorComparison], node_name: str) -> dict[str, Any]:
    """The layer's metrics if it was measured."""
    return {"metrics": _finite(metrics[node_name].as_dict())} if node_name in metrics else {}


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """Infinities as strings, since JSON has no inf."""
    return {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in values.items()}


def _megabytes(count: int) -> str:
    """Bytes as MB with two decimals."""
    return f"{count / 1e6:.2f} MB"
