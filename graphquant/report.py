"""The run report: per-layer decisions, fidelity per output and per layer, and sizes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import onnx_ir as ir

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

    @property
    def quantized(self) -> list[LayerDecision]:
        """Layers that were quantized."""
        return [layer for layer in self.layers if layer.status == "quantized"]

    @property
    def kept_float(self) -> list[LayerDecision]:
        """Layers left in float, each with its reason."""
        return [layer for layer in self.layers if layer.status != "quantized"]

    def worst_layer(self) -> tuple[str, float] | None:
        """The quantized layer with the lowest output SQNR."""
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
                {**dataclasses.asdict(layer), **_metrics(self.layer_metrics, layer.node)} for layer in self.layers
            ],
            "outputs": {name: _finite(c.as_dict()) for name, c in self.outputs.items()},
            "notes": self.notes,
        }

    def save_json(self, path: str | Path) -> None:
        """Write the report as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

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
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def format_layers(self) -> str:
        """One line per layer: status, scheme, measured SQNR, and why."""
        lines = [f"{'layer':<36} {'status':<9} {'SQNR dB':>8}  scheme / reason"]
        for layer in self.layers:
            metric = self.layer_metrics.get(layer.node)
            sqnr = f"{metric.sqnr_db:8.1f}" if metric is not None else f"{'':8}"
            detail = "; ".join(part for part in (layer.scheme, layer.reason) if part)
            lines.append(f"{layer.node:<36} {layer.status:<9} {sqnr}  {detail}")
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
