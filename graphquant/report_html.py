"""The HTML report: one self-contained page of a run's figures, with matplotlib plots embedded as base64 PNG."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from graphquant.analysis.runner import release_mappings
from graphquant.errors import OutputError
from graphquant.report import OUTLIER_RATIO, SCHEMA_VERSION, ActivationRange, Report, json_ready, reference_layers

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Layers (lowest SQNR first) whose input activation channel ranges are plotted.
WORST_LAYERS = 4
# Plot geometry: inches per bar of a per-layer chart, figure width, and resolution.
INCHES_PER_LAYER = 0.22
WIDTH_INCHES = 10.0
DPI = 90
# Characters per line of a plot title.
TITLE_WIDTH = 110
# The page's section ids and titles, in order (tests/test_report_html.py looks for each).
SECTIONS = {
    "summary": "Summary",
    "validation": "Validation",
    "sqnr": "Per-layer SQNR",
    "activations": "Activation channel ranges of the worst layers",
    "weights": "Weight ranges per layer",
    "sizes": "Size per layer",
    "decisions": "What each pass decided",
    "timings": "Timings",
    "run": "Run: versions, options, inputs",
}
STYLE = """
body { font: 14px/1.4 sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.fail { color: #b00; font-weight: bold; }
.pass { color: #070; font-weight: bold; }
img { max-width: 100%; }
"""


@dataclasses.dataclass(frozen=True)
class WeightRange:
    """A layer's weight range, and how far its largest output channel stands above the median one (max |w|)."""

    minimum: float
    maximum: float
    channel_spread: float


def render(report: Report, reference: ir.Model) -> str:
    """The page for a run's report; ``reference`` is the float model, whose weights give the weight ranges."""
    require_matplotlib()
    weights = weight_ranges(report, reference)
    bodies = {
        "summary": _summary(report),
        "validation": _validation(report),
        "sqnr": _sqnr(report),
        "activations": _activations(report),
        "weights": _weights(report, weights),
        "sizes": _sizes(report),
        "decisions": _decisions(report, weights),
        "timings": _timings(report),
        "run": _run(report),
    }
    sections = "\n".join(
        f'<section id="{key}">\n<h2>{html.escape(SECTIONS[key])}</h2>\n{body}\n</section>'
        for key, body in bodies.items()
    )
    title = html.escape(f"graphquant report: {report.recipe} -> {report.target}")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n{sections}\n</body>\n</html>\n"
    )


def require_matplotlib() -> None:
    """Refuse in one line when the optional plotting library is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise OutputError("the HTML report needs matplotlib: pip install 'graphquant[report]'") from exc


def weight_ranges(report: Report, reference: ir.Model) -> dict[str, WeightRange]:
    """Each reported layer's float weight range and output-channel spread, read from the float model."""
    ranges = {}
    for node, layer in reference_layers(reference, report.layers).items():
        weight = layer.weight_array.astype(np.float32, copy=False)
        finite = np.isfinite(weight)
        low = float(np.min(weight, where=finite, initial=np.inf))
        high = float(np.max(weight, where=finite, initial=-np.inf))
        if not low <= high:  # no finite value
            continue
        spread = math.nan  # a per-tensor weight has no output channels
        if layer.out_axis is not None:
            others = tuple(axis for axis in range(weight.ndim) if axis != layer.out_axis)
            spread = _spread(np.max(np.abs(weight), axis=others, where=finite, initial=0.0))
        ranges[node] = WeightRange(low, high, spread)
    release_mappings(reference)  # the weight pages just read
    return ranges


def _summary(report: Report) -> str:
    """Recipe, target, layer counts, sizes, the worst layer and the notes."""
    worst = report.worst_layer()
    rows = [
        ("recipe", report.recipe),
        ("target", report.target),
        ("passes", " -> ".join(report.passes)),
        ("layers quantized / kept float", f"{len(report.quantized)} / {len(report.kept_float)}"),
        ("stored bytes", f"{report.bytes_before / 1e6:.3f} MB -> {report.bytes_after / 1e6:.3f} MB"),
        ("worst layer", "not measured" if worst is None else f"{worst[0]}: SQNR {_db(worst[1])}"),
        *(("auto search", line) for line in report.format_search()),
        *(("note", note) for note in report.notes),
    ]
    return _table(("", ""), rows, header=False)


def _validation(report: Report) -> str:
    """Each output's cosine, SQNR and error against the float model, and the threshold's verdict."""
    entry = report.validation_summary()
    if not entry["validated"]:
        return f"<p>Not validated: {html.escape(entry['reason'])}.</p>"
    verdict = '<span class="pass">passed</span>' if entry["passed"] else '<span class="fail">FAILED</span>'
    rows = [
        (
            name,
            f"{c.cosine:.6f}",
            _db(c.sqnr_db),
            f"{c.max_abs_error:.4g}",
            str(c.nonfinite),
            "yes" if c.failure(entry["min_cosine"]) is None else "NO",
        )
        for name, c in report.outputs.items()
    ]
    table = _table(("output", "cosine", "SQNR", "max abs error", "NaN/Inf", "within threshold"), rows)
    failures = "".join(f"<li>{html.escape(failure)}</li>" for failure in report.failures)
    return (
        f"<p>Validation {verdict}: {html.escape(entry['rule'])}.</p>\n{table}"
        + (f"\n<ul class='fail'>{failures}</ul>" if failures else "")
        + _data_sizes(report)
    )


def _data_sizes(report: Report) -> str:
    """The calibration and validation data: where from, batches and samples."""
    rows = [
        (kind, str(report.inputs.get(kind)), str(size.get("batches")), str(size.get("samples")))
        for kind, size in report.data.items()
    ]
    return _table(("data", "source", "batches", "samples"), rows) if rows else ""


def _sqnr(report: Report) -> str:
    """A bar per measured layer, in graph order; the worst layers in red."""
    names = [layer.node for layer in report.layers if layer.node in report.layer_metrics]
    if not names:
        return "<p>No layer was measured (the run was not validated, or nothing was quantized).</p>"
    values = np.array([report.layer_metrics[name].sqnr_db for name in names])
    finite = values[np.isfinite(values)]
    ceiling = float(finite.max()) + 10.0 if finite.size else 100.0
    shown = np.clip(values, 0.0, ceiling)  # +inf (exact) drawn to the ceiling, -inf to 0
    worst = set(_worst(report, names))
    figure, axes = _figure(len(names))
    colors = ["#c0392b" if name in worst else "#2e86c1" for name in names]
    axes.barh(range(len(names)), shown, color=colors)
    for index, value in enumerate(values):
        if not math.isfinite(value):
            axes.text(shown[index], index, " exact" if value > 0 else " all-zero reference", va="center", fontsize=8)
    _label_layers(axes, names)
    axes.set_xlabel("SQNR of the layer's output against the float model (dB); red: the worst")
    return _image(figure, "per-layer SQNR")


def _worst(report: Report, names: Sequence[str]) -> list[str]:
    """The measured layers of lowest SQNR, at most WORST_LAYERS."""
    return sorted(names, key=lambda name: report.layer_metrics[name].sqnr_db)[:WORST_LAYERS]


def _activations(report: Report) -> str:
    """Per-channel min and max of the worst layers' inputs, outlier channels (OUTLIER_RATIO x median) in red."""
    ranked = [layer.node for layer in report.layers if layer.node in report.activation_ranges]
    if not ranked:
        return (
            "<p>No per-channel activation statistics were collected for these layers (no calibration data, or "
            "only Conv inputs, whose channels calibration reduces inside onnxruntime).</p>"
        )
    measured = [name for name in ranked if name in report.layer_metrics]
    spread = {name: _spread(report.activation_ranges[name].channel_absmax) for name in ranked}
    chosen = _worst(report, measured) if measured else sorted(ranked, key=lambda n: -spread[n])[:WORST_LAYERS]
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_INCHES, 2.6 * len(chosen)), dpi=DPI, layout="constrained")
    for axes, name in zip(figure.subplots(len(chosen), 1, squeeze=False)[:, 0], chosen):
        _channel_plot(axes, report, name)
    basis = "lowest SQNR" if measured else "largest channel spread (no layer was measured)"
    items = "".join(f"<li>{html.escape(_outlier_line(report.activation_ranges[name], name))}</li>" for name in chosen)
    return (
        f"<p>The {len(chosen)} layers of {basis}; channels on the horizontal axis, outliers in red, the dashed lines "
        f"at {OUTLIER_RATIO:g}x the median channel's max |x|.</p>\n<ul>{items}</ul>\n"
        + _image(figure, "activation channel ranges")
    )


def _outlier_line(channels: ActivationRange, name: str) -> str:
    """One layer's input range and outlier count, as text."""
    low, high = float(np.min(channels.channel_min)), float(np.max(channels.channel_max))
    count = int(channels.outliers.sum())
    return f"{name} (input {channels.tensor}): range {low:.4g} .. {high:.4g}, {count} of {channels.channel_min.size} channels are outliers"


def _channel_plot(axes: Axes, report: Report, name: str) -> None:
    """One layer's input: a vertical line from min to max per channel, and the outlier threshold."""
    channels = report.activation_ranges[name]
    low = np.where(np.isfinite(channels.channel_min), channels.channel_min, 0.0)
    high = np.where(np.isfinite(channels.channel_max), channels.channel_max, 0.0)
    outliers = channels.outliers
    index = np.arange(low.size)
    axes.vlines(index[~outliers], low[~outliers], high[~outliers], color="#2e86c1", linewidth=1)
    axes.vlines(index[outliers], low[outliers], high[outliers], color="#c0392b", linewidth=1.5)
    limit = float(np.median(channels.channel_absmax)) * OUTLIER_RATIO
    axes.axhline(limit, color="#888", linestyle="--", linewidth=0.8)
    axes.axhline(-limit, color="#888", linestyle="--", linewidth=0.8)
    metric = report.layer_metrics.get(name)
    sqnr = f", layer SQNR {_db(metric.sqnr_db)}" if metric is not None else ""
    title = f"{name} (input {channels.tensor}): {int(outliers.sum())}/{low.size} outlier channels{sqnr}"
    axes.set_title(
        "\n".join(textwrap.wrap(title, TITLE_WIDTH)),  # long node names would run off the figure
        fontsize=9,
        parse_math=False,
    )
    axes.set_xlim(-0.5, low.size - 0.5)
    axes.set_ylabel("min .. max")


def _spread(absmax: np.ndarray) -> float:
    """The largest channel's max |x| over the median channel's."""
    median = float(np.median(absmax))
    return float(absmax.max() / median) if median > 0 else math.inf


def _weights(report: Report, weights: dict[str, WeightRange]) -> str:
    """Per layer: the float weight's min..max, and its largest output channel's max |w| over the median one's."""
    names = [layer.node for layer in report.layers if layer.node in weights]
    if not names:
        return "<p>No layer with a constant weight was reported.</p>"
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_INCHES, _height(len(names))), dpi=DPI, layout="constrained")
    ranges, spreads = figure.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    low = np.array([weights[name].minimum for name in names])
    high = np.array([weights[name].maximum for name in names])
    ranges.barh(range(len(names)), high - low, left=low, color="#7d3c98")
    ranges.axvline(0.0, color="#444", linewidth=0.6)
    ranges.set_xlabel("float weight min .. max")
    spread = np.array([weights[name].channel_spread for name in names])
    spreads.barh(range(len(names)), np.where(np.isfinite(spread), spread, 0.0), color="#d68910")
    spreads.set_xlim(left=1.0)
    spreads.set_xlabel("largest / median output channel max |w|")
    _label_layers(ranges, names)
    return _image(figure, "weight ranges per layer")


def _sizes(report: Report) -> str:
    """Stored bytes per quantized layer (weights, scales, codes), before and after."""
    names = [layer.node for layer in report.layers if layer.node in report.layer_bytes]
    if not names:
        return "<p>No per-layer sizes were found (no layer was quantized).</p>"
    figure, axes = _figure(len(names))
    index = np.arange(len(names))
    before = np.array([report.layer_bytes[name][0] for name in names]) / 1e3
    after = np.array([report.layer_bytes[name][1] for name in names]) / 1e3
    axes.barh(index - 0.2, before, height=0.4, color="#aab7b8", label="float")
    axes.barh(index + 0.2, after, height=0.4, color="#17a589", label="quantized")
    axes.legend(loc="lower right")
    axes.set_xlabel("stored kB of the tensors the layer reads")
    _label_layers(axes, names)
    total = f"{sum(before):.1f} kB -> {sum(after):.1f} kB over {len(names)} quantized layers"
    return (
        f"<p>{html.escape(total)}; the whole model {report.bytes_before / 1e6:.3f} MB -> "
        f"{report.bytes_after / 1e6:.3f} MB.</p>\n" + _image(figure, "size per layer")
    )


def _decisions(report: Report, weights: dict[str, WeightRange]) -> str:
    """One row per layer: status, scheme, reason, measured SQNR, sizes, activation outliers."""
    rows = []
    for layer in report.layers:
        metric = report.layer_metrics.get(layer.node)
        sizes = report.layer_bytes.get(layer.node)
        activation = report.activation_ranges.get(layer.node)
        rows.append(
            (
                layer.node,
                layer.op_type,
                layer.status,
                layer.scheme,
                layer.reason,
                "" if metric is None else _db(metric.sqnr_db),
                "" if sizes is None else f"{sizes[0] / 1e3:.1f} -> {sizes[1] / 1e3:.1f}",
                "" if activation is None else f"{int(activation.outliers.sum())}/{activation.channel_min.size}",
                ""
                if layer.node not in weights
                else f"{weights[layer.node].minimum:.3g} .. {weights[layer.node].maximum:.3g}",
            )
        )
    header = ("layer", "op", "status", "scheme", "reason", "SQNR", "kB", "outlier channels", "weight range")
    return _table(header, rows)


def _timings(report: Report) -> str:
    """Seconds per stage and per pass."""
    stages = report.timings.to_dict()
    rows = []
    for stage, value in stages.items():
        if isinstance(value, list):
            rows.extend((f"{stage}: {step['pass']}", f"{step['seconds']:.3f}") for step in value)
        else:
            rows.append((stage, f"{value:.3f}"))
    return _table(("stage", "seconds"), rows)


def _run(report: Report) -> str:
    """Library versions, the options given and the files read."""
    groups = {"versions": report.versions, "options": report.options, "inputs": report.inputs}
    rows = [
        (f"{group}: {key}", _text(json_ready(value)))
        for group, values in groups.items()
        for key, value in values.items()
    ]
    return _table(("", ""), [("schema_version", str(SCHEMA_VERSION)), *rows], header=False)


def _text(value: Any) -> str:
    """A JSON value as one line of text."""
    return value if isinstance(value, str) else json.dumps(value)


def _db(value: float) -> str:
    """An SQNR in dB as text ('exact' for no error)."""
    if math.isinf(value):
        return "exact" if value > 0 else "-inf (all-zero reference)"
    return f"{value:.1f} dB"


def _height(layers: int) -> float:
    """The height in inches of a chart with one bar per layer."""
    return max(2.5, INCHES_PER_LAYER * layers + 1.2)


def _figure(layers: int) -> tuple[Figure, Axes]:
    """A figure with one axes sized for one bar per layer (Agg canvas; no pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_INCHES, _height(layers)), dpi=DPI, layout="constrained")
    return figure, figure.subplots()


def _label_layers(axes: Axes, names: Sequence[str]) -> None:
    """Layer names on the vertical axis, first at the top."""
    axes.set_yticks(range(len(names)), list(names), fontsize=7, parse_math=False)  # names are text, not math
    axes.invert_yaxis()


def _image(figure: Figure, alt: str) -> str:
    """The figure as an <img> holding its PNG, base64-encoded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], header: bool = True) -> str:
    """An HTML table of text cells, escaped; numbers right-aligned; ``header`` False leaves out the column names."""
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>\n" if header else ""
    body = "\n".join("<tr>" + "".join(_cell(cell) for cell in row) + "</tr>" for row in rows)
    return f"<table>\n{head}{body}\n</table>"


def _cell(text: str) -> str:
    """One table cell; one that starts with a number right-aligned."""
    numeric = bool(text) and _is_number(text.split()[0])
    return f'<td class="num">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"


def _is_number(word: str) -> bool:
    """Whether the word reads as a number."""
    try:
        float(word)
    except ValueError:
        return False
    return True
