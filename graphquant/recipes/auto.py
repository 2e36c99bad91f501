"""The ``auto`` recipe: the cheapest per-layer mix of schemes whose end-to-end error on held-out data fits a budget.

1. The method's exact rewrites (OutlierTune's symmetrize and pre-executed steps, SmoothQuant's migration, or
   LLM.int8() decomposition) run once on the float graph; every candidate is a clone of that prepared graph.
2. Each layer's error under each scheme (float, W8A8, W4A8, weight-only W8 and W4) is measured on sampled
   calibration rows of its own input, with the QuantSpecs the quantize pass would fit; the embedding tables'
   under 8 and 4 bits on their rows. Costs: bytes of each form, or its latency measured once on the target. MatMul/Gemm
   weights are rounded by GPTQ (act-order) where their calibration rows span their inputs, and scored so; convs too
   under size. For size, W4 comes in blocks of 32, 64 or 128 and int4 tables in blocks of 64 or 128, and the plain
   float graph (method "none") is searched beside OutlierTune's.
3. Groups of layers are built alone and measured end to end: their gains rescale the layer errors (GainGroups; in a
   stack of blocks a gain per role times a gain per depth).
4. analysis.search picks greedily by error removed per cost added; the pick is built for the target and measured
   end to end on held-out data. After each measurement the error model (a gain times a power of the summed layer
   errors) is re-fitted to every candidate measured, then anchored at the last one; after a miss the search upgrades
   further from the missed choice (never back down), after a pass it tries the cheaper choice the fitted model
   allows. The method whose cheapest passing model costs least wins. The error is measured on the positions an
   attention mask keeps.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphquant.analysis.cost import cached_latencies
from graphquant.analysis.data import Feed
from graphquant.analysis.gptq import gptq_round, gram_determined, remembered_roundings
from graphquant.analysis.layers import Layer, candidates
from graphquant.analysis.runner import load_session, open_session, run_views, session_options
from graphquant.analysis.search import (
    ErrorModel,
    Option,
    Unit,
    best_upgrade,
    cheaper_steps,
    pareto_front,
    proxy_sums,
    repeated_block,
    separable_gains,
    total,
)
from graphquant.analysis.simulate import block_int8_rows
from graphquant.analysis.stats import CalibrationStats
from graphquant.analysis.stats_cache import CachingCalibrator
from graphquant.analysis.weight_fit import (
    WeightScheme,
    block_rows,
    fit_weight_spec,
    from_in_major,
    in_major,
    remembered_codes,
    row_energy,
    spec_from_ranges,
)
from graphquant.errors import RecipeError
from graphquant.lowering.matmul_nbits import container_bits, per_channel_block
from graphquant.lowering.unsigned_weights import uint8_int8_saturates
from graphquant.passes.quantize import SCHEMES, NodeOverride
from graphquant.passes.quantize_embeddings import QuantizeEmbeddingsPass, embedding_table
from graphquant.quant_spec import KEEP_FLOAT_KEY, PREEXECUTED_KEY, QuantSpec, asymmetric_spec, symmetric_spec
from graphquant.recipes import PassStep, Recipe
from graphquant.rewrites import layer_bias

AUTO = "auto"
OBJECTIVES = ("latency", "size")
METRICS = ("cosine", "sqnr")
DEFAULT_MAX_DROP = 0.002
DEFAULT_TARGET = "ort-cpu"
PORTABLE_TARGET = "qdq"
# (method, its exact passes): the rewrites before quantization that each candidate model starts from.
# OutlierTune routes a layer's widest channels to float below 33 dB (the preset: 30): on MiniLM that takes the last
# attention output projection (32 dB as W8A8), whose error alone kept one layer float, 0.44 MB.
METHODS: dict[str, tuple[PassStep, ...]] = {
    "outliertune": (
        PassStep("symmetrize"),
        PassStep(
            "preexecute-dequant",
            {"method": "outliertune", "abits": 8, "wbits": 8, "float_channels": 32, "float_route_below_db": 33.0},
        ),
    ),
    "smoothquant": (PassStep("preexecute-dequant", {"method": "smoothquant", "alpha": 0.5, "abits": 8, "wbits": 8}),),
    "llm-int8": (PassStep("outlier-decompose", {"threshold": 6.0, "max_fraction": 0.1}),),
    # The float graph as it is: weight-only layers gain nothing from activation rewrites, which cost bytes.
    "none": (),
}
DEFAULT_METHODS = ("outliertune",)
SIZE_METHODS = ("outliertune", "none")
LINEAR_SCHEMES = ("float", "w8a8", "w4a8", "w8", "w4")
# Under the size objective, weight-only W4 in larger blocks too: a float scale per 128 weights instead of per 32.
SIZE_SCHEMES: dict[str, dict[str, Any]] = {
    "w4-b64": {"scheme": "w4", "block_size": 64},
    "w4-b128": {"scheme": "w4", "block_size": 128},
}
CONV_SCHEMES = ("float", "w8a8")
EMBEDDINGS = "embeddings"
# Table schemes: (bits, block along the hidden axis; None: one scale per row).
EMBED_SCHEMES: dict[str, tuple[int, int | None] | None] = {"float": None, "e8": (8, None), "e4": (4, 64)}
SIZE_EMBED_SCHEMES: dict[str, tuple[int, int | None] | None] = {"e4-b128": (4, 128)}
# GPTQ only where the calibration rows span a layer's inputs (analysis/gptq.gram_determined): on EfficientNet-Lite2's
# classifier (140 pooled rows, 1280 inputs) it doubled the held-out error of unseen images.
QUANTIZE_OPTIONS = {"weight_clip_search": True, "gptq_min_rows": 1.0}
SAMPLE_ROWS = 512
EMBEDDING_ROWS = 2048
MAX_ROUNDS = 5
# Under the size objective, step-downs from passing candidates go on past MAX_ROUNDS while each one passes, up to
# this many more: the fitted model's steps are cautious, and each pass leaves room for the next.
MAX_STEP_DOWNS = 5
# Groups of layers (in graph order) whose end-to-end gain is measured, one build each, where the layers do not form a
# stack of repeated blocks; in one, a group per role in the block (blocks of up to MAX_ROLES layers) and per run of
# blocks (up to GAIN_DEPTHS runs).
GAIN_GROUPS = 4
MAX_ROLES = 8
GAIN_DEPTHS = 6
# The search aims below the budget by this factor, so that the first end-to-end check usually passes; once the error
# model is fitted to a measurement, closer.
AIM = 0.7
AIM_FITTED = 0.9
# Steps down from a measured pass predict only the steps' own added error, and a miss costs only the build (the pass
# is kept): they aim at the budget itself.
AIM_STEP = 1.0
# The acceptance rule: a candidate meets the budget when this upper quantile of its held-out error, bootstrapped over
# the held-out samples (the rows of the batches) and over the batches (the larger of the two; the batches alone under
# a user metric), is within it. Seeded: the same candidate and data always give the same bound.
CONFIDENCE = 0.9
BOOTSTRAP_DRAWS = 1000
USER_METRIC_DRAWS = 200
BOOTSTRAP_SEED = 0
LATENCY_ROWS = 64
LATENCY_REPEATS = 50
# Under the latency objective, bytes still count at this weight (both as shares of the float model's).
SIZE_WEIGHT = 0.25
INT8 = 8
# Node metadata keys of the torch exporter's debugging records, dropped from the written model.
EXPORTER_METADATA = ("pkg.torch.onnx.", "namespace")

Metric = Callable[[Sequence[Sequence[np.ndarray]], Sequence[Sequence[np.ndarray]]], float]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The search's inputs: budget on the metric, objective, target and methods to try."""

    max_drop: float = DEFAULT_MAX_DROP
    objective: str = "latency"
    metric: str | Metric = "cosine"
    target: str = DEFAULT_TARGET
    methods: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """Refuse settings the search cannot honour."""
        if self.objective not in OBJECTIVES:
            raise RecipeError(f"auto: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise RecipeError(f"auto: metric must be one of {METRICS} or a function, got {self.metric!r}")
        if not isinstance(self.max_drop, (int, float)) or not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise RecipeError(f"auto: max_drop must be a finite number >= 0, got {self.max_drop!r}")
        unknown = sorted(set(self.searched_methods) - set(METHODS))
        if unknown or not self.searched_methods:
            raise RecipeError(f"auto: methods must be among {sorted(METHODS)}, got {list(self.searched_methods)}")

    @property
    def ranking(self) -> str:
        """What option costs rank by: the objective, but size on the portable qdq target.

        A qdq model runs on a runtime that is not this machine's onnxruntime (which executes small QDQ layers
        slower than float), so latency timed here would rank float first and quantize nothing.
        """
        return "size" if self.target == PORTABLE_TARGET else self.objective

    @property
    def searched_methods(self) -> tuple[str, ...]:
        """The methods tried: those given, else OutlierTune, and for size the plain float graph too."""
        if self.methods is not None:
            return self.methods
        return SIZE_METHODS if self.sized else DEFAULT_METHODS

    @property
    def sized(self) -> bool:
        """Whether the search is for size: W4 in larger blocks, int4 tables in blocks of 128, method none too."""
        return self.objective == "size"

    @property
    def linear_schemes(self) -> tuple[str, ...]:
        """The schemes each MatMul/Gemm is scored under."""
        return LINEAR_SCHEMES + tuple(SIZE_SCHEMES) if self.sized else LINEAR_SCHEMES

    @property
    def embed_schemes(self) -> dict[str, tuple[int, int | None] | None]:
        """The embedding tables' schemes: (bits, block) or None for float."""
        return {**EMBED_SCHEMES, **SIZE_EMBED_SCHEMES} if self.sized else EMBED_SCHEMES

    @property
    def rounding(self) -> dict[str, Any]:
        """The quantize pass's rounding options: GPTQ in act-order (4-bit weights need it; on MiniLM it takes all-W8A8's
        held-out error from 0.00184 to 0.00168), on convs only under size: EfficientNet-Lite2's W8A8 convs rounded so
        fit the calibration images (held-out error 0.00146) and missed unseen ones (0.00783)."""
        return {"rounding": "gptq", "gptq_act_order": True, "gptq_convs": self.sized}

    @property
    def budget(self) -> float:
        """The budget as an error: 1 - cosine, the noise-to-signal ratio for SQNR (max_drop is then the least dB)."""
        return 10.0 ** (-self.max_drop / 10.0) if self.metric == "sqnr" else float(self.max_drop)

    @property
    def initial_gain(self) -> float:
        """Output error per summed layer noise-to-signal before any measurement: 1 - cos ~ NSR / 2."""
        return 0.5 if self.metric == "cosine" else 1.0


@dataclasses.dataclass(frozen=True)
class Point:
    """One candidate built and measured end to end."""

    method: str
    schemes: dict[str, str]
    predicted_error: float
    measured_error: float
    cost: float
    size: int
    meets_budget: bool
    latency_us: float = 0.0
    # The CONFIDENCE upper bound of the held-out error (what meets_budget compares with the budget).
    error_bound: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the schemes counted rather than listed."""
        counts: dict[str, int] = {}
        for scheme in self.schemes.values():
            counts[scheme] = counts.get(scheme, 0) + 1
        return {
            "method": self.method,
            "schemes": counts,
            "predicted_error": self.predicted_error,
            "measured_error": self.measured_error,
            "error_bound": self.error_bound,
            "cost": self.cost,
            "bytes": self.size,
            "meets_budget": self.meets_budget,
            "timed_layers_us": self.latency_us,
        }


@dataclasses.dataclass
class Search:
    """What the search measured, tried and chose."""

    settings: Settings
    method: str = ""
    units: list[Unit] = dataclasses.field(default_factory=list)
    choice: dict[str, int] = dataclasses.field(default_factory=dict)
    points: list[Point] = dataclasses.field(default_factory=list)
    chosen: Point | None = None
    seconds: float = 0.0
    # Calibration runs over the data, and tensors whose statistics came from the cache instead.
    calibration_runs: int = 0
    calibration_hits: int = 0
    # Whether the held-out error left out the positions an attention mask marks as padding.
    masked: bool = False
    # Each group of layers measured alone end to end (_group_gains).
    group_gains: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report's ``auto`` section: settings, per-layer choices with why, the tried points and their front."""
        metric = self.settings.metric if isinstance(self.settings.metric, str) else "user function"
        points = [point.as_dict() for point in self.points]
        front = pareto_front([(p.measured_error, p.cost) for p in self.points])
        return {
            "max_drop": self.settings.max_drop,
            "metric": metric,
            "objective": self.settings.objective,
            "ranked_by": self.settings.ranking,
            "budget_error": self.settings.budget,
            "accepted_when": (
                f"the {CONFIDENCE:g} bootstrap quantile of the held-out error, over its samples and over its batches "
                "(the larger), is within the budget"
            ),
            "positions": "unmasked (attention_mask)" if self.masked else "all",
            "group_gains": self.group_gains,
            "method": self.method,
            "seconds": self.seconds,
            "calibration_runs": self.calibration_runs,
            "calibration_hits": self.calibration_hits,
            "chosen": None if self.chosen is None else self.chosen.as_dict(),
            "layers": [self._unit_entry(unit) for unit in self.units],
            "tried": points,
            "pareto_front": [points[i] for i in front],
        }

    def _unit_entry(self, unit: Unit) -> dict[str, Any]:
        """One unit's choice, its measured error and cost, and each alternative's."""
        index = self.choice[unit.name]
        return {
            "unit": unit.name,
            "scheme": unit.options[index].scheme,
            "why": _why(unit, index),
            "options": {
                o.scheme: {
                    "error": o.error,
                    "measured": "end to end" if o.end_to_end else "on the layer",
                    "cost": o.cost,
                    "bytes": o.size,
                    "latency_us": o.latency,
                }
                for o in unit.options
            },
        }


def split_data(feeds: Sequence[Feed]) -> tuple[list[Feed], list[Feed]]:
    """(calibration, held-out): every fourth batch held out; a single batch is split along its first axis."""
    feeds = list(feeds)
    if len(feeds) >= 2:
        held = [feed for index, feed in enumerate(feeds) if index % 4 == 3] or feeds[-1:]
        return [feed for feed in feeds if not any(feed is h for h in held)], held
    rows = {array.shape[0] for array in feeds[0].values() if array.ndim}
    if len(rows) != 1 or next(iter(rows)) < 2:
        return feeds, feeds
    cut = max(1, next(iter(rows)) * 3 // 4)
    return [{k: v[:cut] for k, v in feeds[0].items()}], [{k: v[cut:] for k, v in feeds[0].items()}]


def search(
    model: ir.Model,
    calibrator: CachingCalibrator,
    heldout: Sequence[Feed],
    settings: Settings,
    prepare: Callable[[ir.Model], None],
) -> tuple[Recipe, ir.Model, Search]:
    """The cheapest candidate meeting the budget on ``heldout`` (the most accurate one tried if none does)."""
    started = time.perf_counter()
    judge = Judge(model, heldout, settings)
    best: tuple[Recipe, ir.Model, Search] | None = None
    with remembered_roundings(), remembered_codes():
        for method in settings.searched_methods:
            found = _search_method(model, calibrator, judge, settings, method, prepare)
            if best is None or _better(found[2], best[2]):
                best = found
    assert best is not None
    best[2].seconds = time.perf_counter() - started
    best[2].calibration_runs, best[2].calibration_hits = calibrator.runs, calibrator.hits
    return best


def _better(first: Search, second: Search) -> bool:
    """Whether a method's outcome beats another's: meeting the budget, then cost, then error."""
    a, b = first.chosen, second.chosen
    assert a is not None and b is not None
    return (not a.meets_budget, a.cost, a.measured_error) < (not b.meets_budget, b.cost, b.measured_error)


def _search_method(
    model: ir.Model,
    calibrator: CachingCalibrator,
    judge: Judge,
    settings: Settings,
    method: str,
    prepare: Callable[[ir.Model], None],
) -> tuple[Recipe, ir.Model, Search]:
    """Prepare the method's graph, measure the units, then pick, build, check and back off."""
    base = model.clone()
    prepare(base)
    steps = METHODS[method]
    Recipe("auto", steps, target=settings.target).to_pipeline(calibrator, lower=False)(base)
    units = _embeddings_end_to_end(base, calibrator, judge, settings, method, measure_units(base, calibrator, settings))
    units, gains, samples = _group_gains(base, calibrator, judge, settings, method, units)
    record = Search(settings, method, units, masked=judge.masked, group_gains=gains)
    errors = ErrorModel(settings.initial_gain).fitted(samples)
    choice: dict[str, int] | None = errors.choose(units, AIM * settings.budget)
    kept: tuple[Recipe, ir.Model] | None = None
    tried: list[dict[str, int]] = []
    while choice is not None and choice not in tried and len(tried) < _rounds(record, settings):
        point, built = _try(base, calibrator, judge, settings, method, units, choice, errors)
        kept = built if _record(record, point, choice) else kept
        tried.append(choice)
        samples.append((*proxy_sums(units, choice), point.measured_error))
        errors = errors.fitted(samples).anchored(samples[-1])
        choice = _next_choice(units, choice, errors, point, settings, tried)
    assert record.chosen is not None and kept is not None
    if not record.chosen.meets_budget:  # the last back-off: every unit at its most accurate option (float)
        choice = {unit.name: min(range(len(unit.options)), key=lambda i: unit.options[i].error) for unit in units}
        if choice not in tried:
            point, built = _try(base, calibrator, judge, settings, method, units, choice, errors)
            kept = built if _record(record, point, choice) else kept
    return kept[0], kept[1], record


def _rounds(record: Search, settings: Settings) -> int:
    """How many candidates the search may build: MAX_ROUNDS, and under size more while the last one passed."""
    passed = bool(record.points) and record.points[-1].meets_budget
    return MAX_ROUNDS + MAX_STEP_DOWNS if settings.sized and passed else MAX_ROUNDS


def _try(
    base: ir.Model,
    calibrator: CachingCalibrator,
    judge: Judge,
    settings: Settings,
    method: str,
    units: Sequence[Unit],
    choice: dict[str, int],
    errors: ErrorModel,
) -> tuple[Point, tuple[Recipe, ir.Model]]:
    """Build a choice from the prepared graph for the target and measure it end to end."""
    recipe, candidate = _build(base, calibrator, settings, method, units, choice)
    return _point(method, units, choice, errors, judge.measure(candidate), settings), (recipe, candidate)


def _build(
    base: ir.Model,
    calibrator: CachingCalibrator,
    settings: Settings,
    method: str,
    units: Sequence[Unit],
    choice: Mapping[str, int],
) -> tuple[Recipe, ir.Model]:
    """The recipe of a choice and the prepared graph's clone built with it for the target."""
    recipe = _recipe(method, units, choice, settings)
    candidate = base.clone()
    _mark_float(candidate, units, choice)
    recipe.to_pipeline(calibrator, first_step=len(METHODS[method]), prelude=False)(candidate)
    drop_exporter_metadata(candidate)
    return recipe, candidate


def drop_exporter_metadata(model: ir.Model) -> None:
    """Remove the torch exporter's per-node debugging metadata (stack traces, module paths; 0.5 MB on MiniLM)."""
    for node in model.graph.all_nodes():
        for key in [key for key in node.metadata_props if key.startswith(EXPORTER_METADATA)]:
            del node.metadata_props[key]


def _group_gains(
    base: ir.Model,
    calibrator: CachingCalibrator,
    judge: Judge,
    settings: Settings,
    method: str,
    units: Sequence[Unit],
) -> tuple[list[Unit], list[dict[str, Any]], list[tuple[float, float, float]]]:
    """Layers' proxies scaled by their measured gains, the groups' record, and the measurements as samples.

    Each group (GainGroups) is built alone at its layers' probe options (_probe_index) and measured end to end. A
    layer's output noise reaches the output amplified or damped by what follows it, so a group's measured error over
    its summed proxies is its gain. In a stack of blocks a layer's gain is its role's times its depth's, fitted to the
    role and the depth groups' measurements (separable_gains); elsewhere its group's. Proxies are rescaled by gain /
    mean gain.
    """
    layers = [unit for unit in units if not any(option.end_to_end for option in unit.options)]
    if not layers:
        return list(units), [], []
    floats = {unit.name: _float_index(unit) for unit in units}
    probes = {unit.name: _probe_index(unit) for unit in layers}
    proxies = np.array([unit.options[probes[unit.name]].error for unit in layers], np.float64)
    grouping = GainGroups.of(layers)
    errors = []
    for group in grouping.groups:
        chosen = {layers[i].name: probes[layers[i].name] for i in group}
        built = _build(base, calibrator, settings, method, units, {**floats, **chosen})[1]
        errors.append(judge(built) if proxies[group].sum() > 0 else 0.0)
    gains = grouping.layer_gains(proxies, np.array(errors, np.float64))
    sums = [float(proxies[group].sum()) for group in grouping.groups]
    mean = sum(errors) / sum(sums) if sum(sums) > 0 else 0.0
    factors = {unit.name: gain / mean if gain > 0 and mean > 0 else 1.0 for unit, gain in zip(layers, gains)}
    scaled = [
        Unit(unit.name, tuple(dataclasses.replace(o, error=o.error * factors[unit.name]) for o in unit.options))
        if unit.name in factors
        else unit
        for unit in units
    ]
    record = [
        {"first": layers[group[0]].name, "kind": kind, "layers": len(group), "proxies": proxy, "measured_error": error}
        for group, kind, proxy, error in zip(grouping.groups, grouping.kinds, sums, errors)
    ]
    samples = [
        (sum(proxies[i] * factors[layers[i].name] for i in group), 0.0, error)
        for group, error in zip(grouping.groups, errors)
    ]
    return scaled, record, samples


@dataclasses.dataclass(frozen=True)
class GainGroups:
    """The groups of layers (indices in graph order) whose gain is measured together, one build per group.

    In a stack of repeated blocks (a transformer's layers) a layer's gain follows its role in the block (noise in a
    query projection is damped by the softmax, in an FFN it passes almost whole) and its depth (on MiniLM, at W8, the
    first FFN down projection's gain is 0.06, the last's 1.43). So: a group per role in the longest repeated stretch
    (a layer's key: its schemes and float bytes), a group per run of up to GAIN_DEPTHS runs of its blocks, and one per
    run of layers before or after it. With no such stretch, GAIN_GROUPS groups in graph order.
    """

    groups: list[list[int]]
    # Per layer of the stack: (its role's group, its depth's group), as indices into groups.
    cells: dict[int, tuple[int, int]]
    # Per group: "role", "depth" (in the stack) or "layers" (a run in graph order).
    kinds: list[str]

    @classmethod
    def of(cls, layers: Sequence[Unit]) -> GainGroups:
        """The groups of these layers."""
        keys = [(tuple(o.scheme for o in unit.options), max(o.size for o in unit.options)) for unit in layers]
        block = repeated_block(keys)
        if block is None or block[0] > MAX_ROLES:
            split = np.array_split(np.arange(len(layers)), min(GAIN_GROUPS, len(layers)))
            return cls([list(map(int, group)) for group in split], {}, ["layers"] * len(split))
        period, start, stop = block
        stop = start + (stop - start) // period * period
        roles = [list(range(start + role, stop, period)) for role in range(period)]
        blocks = np.array_split(np.arange((stop - start) // period), min(GAIN_DEPTHS, (stop - start) // period))
        depths = [list(range(start + int(run[0]) * period, start + (int(run[-1]) + 1) * period)) for run in blocks]
        outside = [group for group in (list(range(start)), list(range(stop, len(layers)))) if group]
        depth_of = {i: len(roles) + d for d, depth in enumerate(depths) for i in depth}
        cells = {i: ((i - start) % period, depth_of[i]) for i in range(start, stop)}
        kinds = ["role"] * len(roles) + ["depth"] * len(depths) + ["layers"] * len(outside)
        return cls([*roles, *depths, *outside], cells, kinds)

    def layer_gains(self, proxies: np.ndarray, errors: np.ndarray) -> np.ndarray:
        """Each layer's gain: role x depth in the stack, else its group's measured error over its summed proxies."""
        gains = np.zeros(len(proxies))
        for group, error in zip(self.groups, errors):
            total_proxy = proxies[group].sum()
            gains[group] = error / total_proxy if total_proxy > 0 else 0.0
        if self.cells:
            roles = sorted({role for role, _ in self.cells.values()})
            depths = sorted({depth for _, depth in self.cells.values()})
            grid = np.zeros((len(depths), len(roles)))
            for i, (role, depth) in self.cells.items():
                grid[depths.index(depth), roles.index(role)] += proxies[i]
            fitted = separable_gains(grid, errors[depths], errors[roles])
            for i, (role, depth) in self.cells.items():
                gains[i] = fitted[depths.index(depth), roles.index(role)]
        return gains


def _float_index(unit: Unit) -> int:
    """The unit's float option."""
    return next(index for index, option in enumerate(unit.options) if option.scheme == "float")


def _probe_index(unit: Unit) -> int:
    """The most accurate quantized option in the cheaper half of the unit's costs (any quantized one when none is).

    The gain is measured where picks land: among the cheap options. An option just cheaper than float (weight-only
    W8 on ort-cpu) carries another kind of error, which reaches the output with another gain.
    """
    base = unit.options[_float_index(unit)]
    quantized = [i for i, option in enumerate(unit.options) if option.scheme != "float"]
    if not quantized:
        return _float_index(unit)
    least = min(unit.options[i].cost for i in quantized)
    cheap = [i for i in quantized if unit.options[i].cost <= (least + base.cost) / 2] or quantized
    return min(cheap, key=lambda i: unit.options[i].error)


def _embeddings_end_to_end(
    base: ir.Model,
    calibrator: CachingCalibrator,
    judge: Judge,
    settings: Settings,
    method: str,
    units: Sequence[Unit],
) -> list[Unit]:
    """The embedding unit with each option's error measured in the whole graph: tables quantized, layers float.

    The tables' own noise says little about the output: the lookups are summed with other embeddings and normalized
    before any layer reads them, so their error is measured once this way instead of through the fitted gain.
    """
    tables = next((unit for unit in units if unit.name == EMBEDDINGS), None)
    if tables is None:
        return list(units)
    floats = {unit.name: _float_index(unit) for unit in units}
    options = []
    for index, option in enumerate(tables.options):
        error = 0.0
        if option.scheme != "float":
            error = judge(_build(base, calibrator, settings, method, units, {**floats, EMBEDDINGS: index})[1])
        options.append(dataclasses.replace(option, error=error, end_to_end=True))
    return [Unit(unit.name, tuple(options)) if unit is tables else unit for unit in units]


def _record(record: Search, point: Point, choice: dict[str, int]) -> bool:
    """Add a tried point; keep it as the choice if it beats the best so far (True then)."""
    record.points.append(point)
    if record.chosen is not None and not _preferred(point, record.chosen):
        return False
    record.chosen, record.choice = point, dict(choice)
    return True


def _next_choice(
    units: Sequence[Unit],
    choice: dict[str, int],
    errors: ErrorModel,
    point: Point,
    settings: Settings,
    tried: Sequence[Mapping[str, int]] = (),
) -> dict[str, int] | None:
    """Next to build: a more accurate choice after a miss, a cheaper one the re-fitted model allows after a pass
    (rerun from the cheapest, or else stepped down from the pass: a rerun landing on a tried choice is no news)."""
    if not point.meets_budget:
        return _backed_off(units, choice, errors, _aim(point, settings, AIM_FITTED))
    cheaper = errors.choose(units, _aim(point, settings, AIM_FITTED))
    if total(units, cheaper, "cost") < point.cost and cheaper not in tried:
        return cheaper
    allowance = _aim(point, settings, AIM_STEP) - point.measured_error
    return cheaper_steps(units, choice, errors.slope(units, choice), allowance)


def _aim(point: Point, settings: Settings, factor: float) -> float:
    """The error to aim the model at: factor x the budget, less the last point's relative margin of its bound.

    The bound's margin grows with the error (its spread over samples does), so the aim keeps the same share.
    """
    margin = point.measured_error / point.error_bound if point.error_bound > 0 else 1.0
    return factor * settings.budget * min(margin, 1.0)


def _mark_float(candidate: ir.Model, units: Sequence[Unit], choice: Mapping[str, int]) -> None:
    """Record on each layer the search keeps float why it does (the quantize pass reports it)."""
    floats = {unit.name: unit for unit in units if unit.options[choice[unit.name]].scheme == "float"}
    for node in candidate.graph:
        if node.name in floats:
            node.meta[KEEP_FLOAT_KEY] = f"auto: {_why(floats[node.name], choice[node.name or ''])}"


def _why(unit: Unit, index: int) -> str:
    """Why a unit has the option it has: the cheapest, or the cheaper ones cost too much accuracy."""
    chosen = unit.options[index]
    cheaper = [o.scheme for o in unit.options if (o.cost, o.size) < (chosen.cost, chosen.size)]
    if not cheaper:
        return f"{chosen.scheme} is the cheapest option"
    return f"cheaper options ({', '.join(cheaper)}) add more error than the budget leaves"


def _preferred(point: Point, chosen: Point) -> bool:
    """Whether a new point beats the best so far: meeting the budget first, then cost (met) or error (missed)."""
    if point.meets_budget != chosen.meets_budget:
        return point.meets_budget
    return point.cost < chosen.cost if point.meets_budget else point.measured_error < chosen.measured_error


def _backed_off(units: Sequence[Unit], choice: dict[str, int], errors: ErrorModel, aim: float) -> dict[str, int] | None:
    """A strictly more accurate choice: the search rerun from this one with the re-fitted model, else its best step."""
    upgraded = errors.choose(units, aim, start=choice)
    if upgraded != choice:
        return upgraded
    step = best_upgrade(units, choice, errors.slope(units, choice))
    return None if step is None else {**choice, step[0]: step[1]}


def _point(
    method: str,
    units: Sequence[Unit],
    choice: dict[str, int],
    errors: ErrorModel,
    measured: tuple[float, float],
    settings: Settings,
) -> Point:
    """The record of one built candidate from its measured (error, upper bound): it meets the budget by the bound."""
    error, bound = measured
    return Point(
        method,
        {unit.name: unit.options[choice[unit.name]].scheme for unit in units},
        errors.predict(units, choice),
        error,
        total(units, choice, "cost"),
        int(total(units, choice, "size")),
        bound <= settings.budget,
        total(units, choice, "latency"),
        bound,
    )


def _recipe(method: str, units: Sequence[Unit], choice: Mapping[str, int], settings: Settings) -> Recipe:
    """The concrete recipe of a choice: the method's passes, the embedding bits, quantize with per-layer schemes."""
    schemes = {unit.name: unit.options[choice[unit.name]].scheme for unit in units}
    steps = list(METHODS[method])
    table = settings.embed_schemes.get(schemes.pop(EMBEDDINGS, "float"))
    if table is not None:
        steps.append(PassStep("quantize-embeddings", {"embed_bits": table[0], "embed_block_size": table[1]}))
    steps.append(PassStep("quantize", {**QUANTIZE_OPTIONS, **settings.rounding}))
    overrides = tuple(
        NodeOverride(_literal_glob(name), scheme_override(scheme))
        for name, scheme in schemes.items()
        if scheme != "float"
    )
    description = f"auto: {method}, per-layer schemes chosen under the accuracy budget"
    return Recipe("auto", tuple(steps), description, target=settings.target, overrides=overrides)


def scheme_override(scheme: str) -> dict[str, Any]:
    """The quantize pass's override of a scheme name: a named scheme, or a SIZE_SCHEMES variant of one."""
    return dict(SIZE_SCHEMES.get(scheme, {"scheme": scheme}))


def scheme_options(scheme: str) -> dict[str, Any]:
    """The quantize pass's layer options of a scheme name."""
    variant = scheme_override(scheme)
    return {**SCHEMES[variant.pop("scheme")], **variant}


def _literal_glob(name: str) -> str:
    """An fnmatch pattern that matches exactly this node name."""
    return re.sub(r"([*?\[])", r"[\1]", name)


class Judge:
    """The end-to-end error of candidates on held-out data, with its upper confidence bound; the float model's outputs
    are computed once.

    Outputs whose leading [batch, tokens] dims match a feed's attention mask are scored on the unmasked positions
    only: padding positions carry no meaning, yet their outputs move under quantization (cosine and SQNR alike).
    The bound is the larger CONFIDENCE quantile of the error over seeded bootstrap resamples of the held-out samples
    (each row of each batch) and of the held-out batches; the error is a ratio of sums over samples, so a resample
    only re-weights per-sample (or per-batch) sums. Rows that share a source (crops of one image, which sit together
    in a batch) vary together: resampling rows alone takes them as independent and narrows the bound; resampling
    batches keeps them together.
    """

    def __init__(self, reference: ir.Model, heldout: Sequence[Feed], settings: Settings):
        self.heldout = list(heldout)
        self.settings = settings
        self.names = [value.name or "" for value in reference.graph.outputs]
        self.reference = _outputs(reference, self.names, self.heldout)
        self.masks = [attention_mask(feed) for feed in self.heldout]
        self.masked = any(
            _position_mask(batch[index], mask) is not None
            for batch, mask in zip(self.reference, self.masks)
            for index in range(len(self.names))
        )
        self._indices = range(len(self.names))
        self._flat = [self._flattened(self.reference, index) for index in self._indices]
        self._rows = [self._sample_rows(self.reference, index) for index in self._indices]
        self._starts = [self._batch_starts(index) for index in self._indices]

    def __call__(self, candidate: ir.Model) -> float:
        """The candidate's error under the settings' metric (1 - cosine, noise-to-signal, or the user's drop)."""
        return self._error(_outputs(candidate, self.names, self.heldout))

    def measure(self, candidate: ir.Model) -> tuple[float, float]:
        """The candidate's (error, upper bound of the error at CONFIDENCE)."""
        outputs = _outputs(candidate, self.names, self.heldout)
        error = self._error(outputs)
        if callable(self.settings.metric):
            bound = float(np.quantile(self._user_metric_draws(outputs), CONFIDENCE))
        else:
            bound = self._bound(outputs)
        return error, max(error, bound) if math.isfinite(error) else error

    def _error(self, outputs: Sequence[Sequence[np.ndarray]]) -> float:
        """The error of outputs over every held-out batch."""
        metric = self.settings.metric
        if callable(metric):
            return float(metric(self.reference, outputs))
        errors = []
        for index, reference in enumerate(self._flat):
            produced = self._flattened(outputs, index)
            errors.append(_cosine_error(reference, produced) if metric == "cosine" else _nsr(reference, produced))
        return max(errors)

    def _bound(self, outputs: Sequence[Sequence[np.ndarray]]) -> float:
        """The larger CONFIDENCE quantile of the error (the worst output's per resample) over resampled samples and
        over resampled batches."""
        sums = [self._sample_sums(outputs, index) for index in self._indices]
        batches = [np.add.reduceat(rows, starts, axis=0) for rows, starts in zip(sums, self._starts)]
        draws = (np.max([self._resampled(units) for units in each], axis=0) for each in (sums, batches))
        return max(float(np.quantile(drawn, CONFIDENCE)) for drawn in draws)

    def _sample_sums(self, outputs: Sequence[Sequence[np.ndarray]], index: int) -> np.ndarray:
        """[samples, k]: the per-sample sums the error is a ratio of (cosine: r.c, r.r, c.c; SQNR: noise, signal)."""
        pairs = zip(self._rows[index], self._sample_rows(outputs, index))
        if self.settings.metric == "cosine":
            return np.array([(r @ c, r @ r, c @ c) for r, c in pairs])
        return np.array([(np.sum((r - c) ** 2), r @ r) for r, c in pairs])

    def _resampled(self, sums: np.ndarray) -> np.ndarray:
        """The error on each seeded bootstrap resample of the rows of ``sums`` (samples or batches)."""
        drawn = _resample_weights(len(sums)) @ sums
        if self.settings.metric == "cosine":
            return 1.0 - drawn[:, 0] / np.maximum(np.sqrt(drawn[:, 1] * drawn[:, 2]), 1e-300)
        return drawn[:, 0] / np.maximum(drawn[:, 1], 1e-30)

    def _batch_starts(self, index: int) -> np.ndarray:
        """Where each held-out batch's samples start among one output's samples (batches without any left out)."""
        counts = np.array([1 if batch[index].ndim == 0 else len(batch[index]) for batch in self.reference])
        return (np.cumsum(counts) - counts)[counts > 0]

    def _user_metric_draws(self, outputs: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """A user metric's value on USER_METRIC_DRAWS bootstrap resamples of the held-out batches."""
        metric = self.settings.metric
        assert callable(metric)
        picks = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(outputs), (USER_METRIC_DRAWS, len(outputs)))
        return np.array(
            [float(metric([self.reference[i] for i in pick], [outputs[i] for i in pick])) for pick in picks]
        )

    def _flattened(self, outputs: Sequence[Sequence[np.ndarray]], index: int) -> np.ndarray:
        """One output over every batch, its unmasked positions only where a mask applies, flattened, in float64."""
        return np.concatenate(self._sample_rows(outputs, index))

    def _sample_rows(self, outputs: Sequence[Sequence[np.ndarray]], index: int) -> list[np.ndarray]:
        """One output per held-out sample (row of a batch; a whole 0-d output), unmasked positions only, in float64."""
        rows = []
        for batch, mask in zip(outputs, self.masks):
            value = batch[index]
            if value.ndim == 0:
                rows.append(np.ravel(value).astype(np.float64))
                continue
            keep = _position_mask(value, mask)
            kept = [None] * len(value) if keep is None else list(keep)
            rows += [np.ravel(row if k is None else row[k]).astype(np.float64) for row, k in zip(value, kept)]
        return rows


def _resample_weights(samples: int) -> np.ndarray:
    """[BOOTSTRAP_DRAWS, samples] counts of each sample in seeded bootstrap resamples (multinomial, n draws)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    return rng.multinomial(samples, np.full(samples, 1.0 / samples), size=BOOTSTRAP_DRAWS).astype(np.float64)


def attention_mask(feed: Feed) -> np.ndarray | None:
    """The feed's [batch, tokens] 0/1 attention mask (an input named ``*attention_mask``), as booleans, or None."""
    for name, array in feed.items():
        if name.lower().endswith("attention_mask") and array.ndim == 2 and np.isin(array, (0, 1)).all():
            return array.astype(bool)
    return None


def _position_mask(value: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """The mask when it covers the output's leading [batch, tokens] dims and keeps at least one position."""
    if mask is None or value.ndim < 2 or value.shape[:2] != mask.shape or not mask.any():
        return None
    return mask


def _outputs(model: ir.Model, names: Sequence[str], feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    """The model's outputs on each feed, copied out of onnxruntime's buffers."""
    with open_session(model) as session:
        return [[np.array(value) for value in run_views(session, names, feed)] for feed in feeds]


def _cosine_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """1 - cosine of two flattened outputs (0 for two zero outputs; 1 for a non-finite candidate)."""
    if not np.all(np.isfinite(candidate)):
        return 1.0
    norm = float(np.linalg.norm(reference) * np.linalg.norm(candidate))
    return 0.0 if norm == 0 else 1.0 - float(reference @ candidate) / norm


def _nsr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """||reference - candidate||^2 / ||reference||^2 (inf for a non-finite candidate)."""
    if not np.all(np.isfinite(candidate)):
        return math.inf
    return float(np.sum((reference - candidate) ** 2) / max(float(np.sum(reference**2)), 1e-30))


def measure_units(model: ir.Model, calibrator: CachingCalibrator, settings: Settings) -> list[Unit]:
    """Every quantizable layer with its schemes' measured errors and costs, and the embedding tables as one unit."""
    layers = [
        c.layer
        for c in candidates(model.graph)
        if c.layer is not None and KEEP_FLOAT_KEY not in c.node.meta and c.layer.node.op_type in ("MatMul", "Gemm")
    ]
    convs = [c.layer for c in candidates(model.graph) if c.layer is not None and c.layer.node.op_type == "Conv"]
    names = [layer.activation.name or "" for layer in layers + convs]
    grams = [layer.activation.name or "" for layer in layers]
    stats = calibrator.collect(model, names, sample_rows=SAMPLE_ROWS, gram_names=grams)
    units = [_linear_unit(layer, stats, settings) for layer in layers if layer.weight_array.ndim == 2]
    units += [_conv_unit(layer, stats, settings) for layer in convs if KEEP_FLOAT_KEY not in layer.node.meta]
    tables = [table for node in model.graph if (table := embedding_table(node)) is not None]
    if tables:
        units.append(_embedding_unit(tables, settings.embed_schemes))
    return scalarized(units, settings.ranking)


def scalarized(units: Sequence[Unit], objective: str) -> list[Unit]:
    """Units whose option costs are shares of the all-float model's: bytes, or latency plus SIZE_WEIGHT x bytes."""
    float_size = max(sum(max(o.size for o in unit.options) for unit in units), 1)
    float_time = max(sum(max(o.cost for o in unit.options) for unit in units), 1e-12)
    size_weight = 1.0 if objective == "size" else SIZE_WEIGHT
    time_weight = 0.0 if objective == "size" else 1.0
    return [
        Unit(
            unit.name,
            tuple(
                dataclasses.replace(o, cost=time_weight * o.cost / float_time + size_weight * o.size / float_size)
                for o in unit.options
            ),
        )
        for unit in units
    ]


def _linear_unit(layer: Layer, stats: CalibrationStats, settings: Settings) -> Unit:
    """A MatMul/Gemm layer: output noise-to-signal of each scheme on its sampled input rows."""
    activation = stats.tensors.get(layer.activation.name or "")
    rows = activation.sample if activation is not None else None
    schemes = [
        s
        for s in settings.linear_schemes
        if not (scheme_options(s).get("abits") and (activation is None or rows is None))
    ]
    times = _latencies(layer, schemes, settings.target) if settings.ranking == "latency" else [0.0] * len(schemes)
    scorer = _LayerScorer(layer, rows, activation, bool(settings.rounding), settings.target == DEFAULT_TARGET)
    options = [
        Option(scheme, 0.0 if scheme == "float" else scorer.error(scheme), time, size, time)
        for scheme, time in zip(schemes, times)
        if (size := _scheme_bytes(layer, scheme, settings.target))
    ]
    return Unit(layer.node.name or "", tuple(options))


class _LayerScorer:
    """||XW - Q(X)Q(W)||^2 / ||XW||^2 per scheme on a layer's sampled rows (uniform rows when there is no sample).

    X·W, the quantized rows per activation width and the stored weight per weight grid are computed once. With
    ``gptq`` the weights are rounded as the quantize pass's GPTQ in act-order rounds them (on the activation's X^T X).
    With ``int8_compute`` weight-only schemes see their rows as ort-cpu's MatMulNBits (accuracy_level 4) rounds them:
    to int8 per row and kernel block.
    """

    def __init__(
        self, layer: Layer, rows: np.ndarray | None, activation: Any, gptq: bool = False, int8_compute: bool = False
    ):
        self.layer = layer
        self.activation = activation
        gram = None if activation is None else activation.gram
        # As the quantize pass: GPTQ on weights no other node reads (a tied weight keeps plain rounding) whose rows span
        # their inputs.
        inputs = layer.weight_array.shape[layer.in_axis]
        determined = activation is not None and gram_determined(
            activation.count, inputs, QUANTIZE_OPTIONS["gptq_min_rows"]
        )
        self.gram = gram if gptq and len(layer.weight.uses()) == 1 and determined else None
        weight = layer.weight_array.astype(np.float32)
        weight = weight if layer.in_axis == 0 else weight.T
        self.x = rows.astype(np.float32) if rows is not None else np.eye(weight.shape[0], dtype=np.float32)
        self.bias = layer_bias(layer).astype(np.float32)
        self.reference = self.x @ weight + self.bias
        self.signal = max(np.sum(np.square(self.reference, dtype=np.float64)), 1e-30)
        self.int8_compute = int8_compute
        self._rows: dict[int, np.ndarray] = {}
        self._block_rows: dict[int, np.ndarray] = {}
        self._weights: dict[WeightScheme, np.ndarray] = {}

    def error(self, scheme: str) -> float:
        """The scheme's output noise-to-signal ratio."""
        options = scheme_options(scheme)
        rows = self._quantized_rows(options.get("abits")) if options.get("abits") else self._weight_only_rows(options)
        error = self.reference - (rows @ self._stored(options) + self.bias)
        return float(np.sum(np.square(error, dtype=np.float64)) / self.signal)

    def _stored(self, options: Mapping[str, Any]) -> np.ndarray:
        """The dequantized weight as [C_in, C_out] under the scheme's weight grid."""
        # Clip search only below 8 bits: at 8 bits it barely moves the error and costs most of the scoring time.
        grid = WeightScheme(
            options["wbits"], options["weight_symmetric"], options["block_size"], options["wbits"] < INT8
        )
        if grid not in self._weights:
            layer = self.layer
            if self.gram is None:
                energy = row_energy(layer, None if self.activation is None else self.activation.channel_mean_square())
                spec, weight = fit_weight_spec(layer, grid, energy), layer.weight_array
            else:
                # Clip-searched at every width, as the quantize pass rounds (its result memo then serves the builds).
                clip = bool(QUANTIZE_OPTIONS.get("weight_clip_search"))
                rounded, low, high = gptq_round(
                    in_major(layer), self.gram, grid.bits, grid.symmetric, block_rows(layer, grid), clip, True
                )
                spec, weight = spec_from_ranges(layer, grid, low, high), from_in_major(layer, rounded)
            stored = spec.dequantize(spec.quantize(weight)).astype(np.float32)
            self._weights[grid] = stored if layer.in_axis == 0 else stored.T
        return self._weights[grid]

    def _weight_only_rows(self, options: Mapping[str, Any]) -> np.ndarray:
        """The rows a weight-only scheme multiplies: as they are, or rounded per kernel block by int8 compute."""
        if not self.int8_compute:
            return self.x
        block = options["block_size"] or per_channel_block(self.x.shape[1], container_bits(options["wbits"]))
        if block not in self._block_rows:
            self._block_rows[block] = block_int8_rows(self.x, block)
        return self._block_rows[block]

    def _quantized_rows(self, bits: int) -> np.ndarray:
        """The rows on the activation grid quantize would use."""
        if bits not in self._rows:
            activation_spec = _activation_spec(self.layer, self.activation, bits)
            self._rows[bits] = activation_spec.dequantize(activation_spec.quantize(self.x)).astype(np.float32)
        return self._rows[bits]


def _activation_spec(layer: Layer, activation: Any, bits: int) -> QuantSpec:
    """The activation grid quantize would use: unit steps where pre-executed, else per-tensor MinMax."""
    preexecuted = layer.activation.meta.get(PREEXECUTED_KEY)
    if preexecuted is not None:
        return symmetric_spec(float(2 ** (preexecuted - 1) - 1), preexecuted)
    if activation.minimum >= 0:
        return asymmetric_spec(0.0, activation.absmax, bits)
    return symmetric_spec(activation.absmax, bits)


def _conv_unit(layer: Layer, stats: CalibrationStats, settings: Settings) -> Unit:
    """A Conv: W8A8 error from its weight grid and its per-tensor input step against the input's mean square."""
    activation = stats.tensors.get(layer.activation.name or "")
    weight = layer.weight_array.astype(np.float64)
    spec = fit_weight_spec(layer, WeightScheme(8), row_energy(layer, None))
    weight_nsr = float(np.sum((weight - spec.dequantize(spec.quantize(layer.weight_array))) ** 2) / np.sum(weight**2))
    # Conv forms are not timed: int8 counts as half the float MACs' time.
    macs = float(layer.weight_array.size)
    options = [Option("float", 0.0, macs, _scheme_bytes(layer, "float"))]
    if activation is not None:
        step = activation.absmax / 127.0
        activation_nsr = step**2 / 12.0 / max(float(np.mean(activation.channel_mean_square())), 1e-30)
        options.append(Option("w8a8", weight_nsr + activation_nsr, macs / 2, _scheme_bytes(layer, "w8a8")))
    return Unit(layer.node.name or "", tuple(options))


def _embedding_unit(tables: Sequence[np.ndarray], schemes: Mapping[str, tuple[int, int | None] | None]) -> Unit:
    """The embedding tables at float and each (bits, block): their row noise-to-signal and bytes (same latency)."""
    options = [Option("float", 0.0, 0.0, sum(t.nbytes for t in tables))]
    for scheme, grid in schemes.items():
        if grid is None:
            continue
        bits, block = grid
        error = size = 0.0
        quantizer = QuantizeEmbeddingsPass(bits, block)
        for table in tables:
            # Every row has its own grid: evenly spaced rows give the table's error at a fraction of the fitting.
            rows = table[np.unique(np.linspace(0, len(table) - 1, min(len(table), EMBEDDING_ROWS)).astype(np.int64))]
            spec = quantizer.spec(rows)
            error += float(np.sum((rows - spec.dequantize(spec.quantize(rows))) ** 2) / np.sum(rows**2))
            size += table.size * bits / 8 + spec.scale.size * 4 * len(table) / len(rows)
        options.append(Option(scheme, error, 0.0, int(size)))
    return Unit(EMBEDDINGS, tuple(options))


def _scheme_bytes(layer: Layer, scheme: str, target: str = PORTABLE_TARGET) -> int:
    """Stored bytes of the layer's weight under a scheme: codes, scales and zero points.

    On ort-cpu a weight-only layer is a MatMulNBits: each column's codes fill whole blocks (per channel, those of
    per_channel_block, each with the column's scale), and its zero points whole bytes; there and in
    its integer kernels a symmetric grid stores none, except where 8-bit weights move to uint8 with zero point 128
    (lowering/unsigned_weights.py, on a machine whose uint8 x int8 kernel saturates).
    """
    count = layer.weight_array.size
    if scheme == "float":
        return 4 * count
    options = scheme_options(scheme)
    bits, block = options["wbits"], options["block_size"]
    columns = layer.weight_array.shape[layer.out_axis or 0]
    depth = count // columns
    blocks = 1 if block is None else math.ceil(depth / block)
    # Zero points, packed at the codes' width (a DequantizeLinear stores them for symmetric grids too).
    points = math.ceil(columns * blocks * bits / 8)
    if target == DEFAULT_TARGET:
        unsigned = bits == INT8 and options.get("abits") and uint8_int8_saturates()
        points = 0 if options["weight_symmetric"] and not unsigned else points
    if target == DEFAULT_TARGET and not options.get("abits"):
        kernel = block or per_channel_block(depth, container_bits(bits))
        blocks = math.ceil(depth / kernel)
        count = columns * blocks * kernel
        points = 0 if options["weight_symmetric"] else columns * math.ceil(blocks * bits / 8)
    # A float scale per column or block.
    return math.ceil(count * bits / 8) + 4 * columns * blocks + points


def _latencies(layer: Layer, schemes: Sequence[str], target: str) -> list[float]:
    """Each scheme's form latency (microseconds, LATENCY_ROWS rows) on the target for the layer's shape, cached."""
    weight = layer.weight_array
    depth, width = (weight.shape if layer.in_axis == 0 else weight.shape[::-1])[:2]
    keys = [
        f"{target}|{scheme}|{depth}x{width}|rows{LATENCY_ROWS}|prepacked|ort{ort.__version__}" for scheme in schemes
    ]
    return cached_latencies(keys, lambda: time_forms(schemes, int(depth), int(width), target))


def time_forms(schemes: Sequence[str], depth: int, width: int, target: str) -> list[float]:
    """The least microseconds of a [rows, depth] x [depth, width] MatMul + bias as each scheme, runs interleaved.

    The least of many interleaved runs: on a shared machine, other load only ever adds time. The sessions prepack
    their weights as deployed ones do: MatMulNBits' int8 compute runs only prepacked (2.4x faster at 8 bits).
    """
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((LATENCY_ROWS, depth)).astype(np.float32)}
    options = session_options(prepack=True)
    options.intra_op_num_threads = 1  # one thread: short runs that other load rarely interrupts
    sessions = [
        load_session(ir.to_proto(_one_layer(scheme, depth, width, target, feed)).SerializeToString(), options)
        for scheme in schemes
    ]
    best = [math.inf] * len(sessions)
    for _ in range(LATENCY_REPEATS):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            best[index] = min(best[index], time.perf_counter() - start)
    return [seconds * 1e6 for seconds in best]


def _one_layer(scheme: str, depth: int, width: int, target: str, feed: Feed) -> ir.Model:
    """A one-layer model (MatMul + bias) lowered for the target as ``scheme``, calibrated on ``feed``."""
    rng = np.random.default_rng(1)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([LATENCY_ROWS, depth]))
    weight, bias = (
        ir.Value(
            name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape), const_value=ir.tensor(array)
        )
        for name, array in (
            ("w", rng.standard_normal((depth, width)).astype(np.float32)),
            ("b", rng.standard_normal(width).astype(np.float32)),
        )
    )
    matmul = ir.node("MatMul", [x, weight], name="layer")
    add = ir.node("Add", [matmul.outputs[0], bias], name="layer_bias")
    matmul.outputs[0].name, add.outputs[0].name = "xw", "y"
    add.outputs[0].dtype, add.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([LATENCY_ROWS, width])
    graph = ir.Graph([x], [add.outputs[0]], nodes=[matmul, add], initializers=[weight, bias], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    if scheme != "float":
        step = PassStep("quantize", dict(QUANTIZE_OPTIONS))
        recipe = Recipe("time", (step,), target=target, overrides=(NodeOverride("*", scheme_override(scheme)),))
        recipe.to_pipeline(CachingCalibrator.for_model(model, [feed], False))(model)
    return model
