"""Pre-execute dequantization (exact): divide activation channels by their step, multiply weight rows by it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphquant import progress
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.layers import Layer, ScaleGroup
from graphquant.analysis.simulate import GroupSimulator, one_blas_thread, weight_matrix
from graphquant.analysis.stats import TensorStats
from graphquant.graph_edit import NameScope
from graphquant.passes._calibrated import GROUP_SAMPLE_ROWS, CalibratedGroupPass
from graphquant.quant_spec import KEEP_FLOAT_KEY, PREEXECUTED_KEY, SCHEME_NOTE_KEY
from graphquant.rewrites import (
    MIN_ROW_SCALE,
    apply_channel_affine,
    route_channels_to_float,
    row_scalable,
    scale_rows_at_run_time,
    scale_weight_rows,
)

METHODS = ("outliertune", "smoothquant", "os-plus")
# The search scores every candidate on every SCREEN_STRIDE-th sampled row first (on one BLAS thread: small products),
# then re-scores the best SCREEN_KEPT on all of them (on SmolLM2 the screen picked the full search's choice for every
# group: measured in benchmarks/search_screen.py).
SCREEN_STRIDE = 8
SCREEN_KEPT = 3
BOUNDED_EXPONENTS = (0.75, 0.5, 0.25)
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)
SMOOTHQUANT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
OS_PLUS_THRESHOLDS = 20
MIN_DIVISOR = 1e-8
MIGRATED_KEY = "graphquant.migrated"


@dataclasses.dataclass(frozen=True)
class Choice:
    """A per-channel divisor for one group, how it was chosen, and its simulated output SQNR."""

    divisor: np.ndarray
    label: str
    sqnr_db: float
    preexecuted: bool = False
    float_channels: np.ndarray | None = None
    per_row: bool = False


@dataclasses.dataclass(frozen=True)
class Screened:
    """One group's simulator on all the sampled rows and on the screening rows."""

    full: GroupSimulator
    screen: GroupSimulator

    @classmethod
    def of(cls, rows: np.ndarray, layers: Sequence[Layer]) -> Screened:
        """Both simulators of a group; the screen takes every SCREEN_STRIDE-th row (the sample is evenly spaced)."""
        full = GroupSimulator(rows, layers)
        return cls(full, full.every(SCREEN_STRIDE))


class PreexecuteDequantPass(CalibratedGroupPass):
    """Exact: X <- X/d per channel (folded into the producer) and W <- diag(d)·W; d chosen per method.

    ``activation_symmetric`` False scores the per-tensor candidates on quantize's asymmetric [min, max] grid.
    """

    cli_name = "preexecute-dequant"
    done_key = MIGRATED_KEY

    def __init__(
        self,
        calibrator: Calibrator | None = None,
        *,
        method: str = "outliertune",
        abits: int = 8,
        wbits: int = 8,
        alpha: float = 0.5,
        alpha_search: bool = False,
        min_sqnr_db: float = 0.0,
        float_channels: int = 0,
        float_route_below_db: float = 30.0,
        max_float_fraction: float = 0.05,
        row_scales_below_db: float | None = None,
        activation_symmetric: bool = True,
    ):
        super().__init__(calibrator)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.abits = abits
        self.wbits = wbits
        self.alpha = alpha
        self.alpha_search = alpha_search
        self.min_sqnr_db = min_sqnr_db
        self.float_channels = float_channels
        self.float_route_below_db = float_route_below_db
        self.max_float_fraction = max_float_fraction
        self.row_scales_below_db = row_scales_below_db
        self.activation_symmetric = activation_symmetric

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Choose and apply a divisor for every MatMul/Gemm scale group."""
        graph = model.graph
        names = NameScope(graph)
        modified = False
        # Last group first: a float path's Add takes over a layer's output, which a later group may read.
        pending = self.pending_groups(model, sample_rows=GROUP_SAMPLE_ROWS)[::-1]
        rewritten = []
        for group, stats in progress.bar(pending, "per-layer search", unit="group"):
            choice = self._choose(group, stats)
            applied = self._apply(graph, names, group, choice)
            modified |= applied
            derived = self._derived(stats, choice) if applied else stats
            if derived is not None:
                rewritten.append((group, derived))
        self.record_rewritten(model, rewritten)
        return ir.passes.PassResult(model, modified=modified)

    def _choose(self, group: ScaleGroup, stats: TensorStats) -> Choice:
        """The best-scoring static divisor, or where that stays below ``row_scales_below_db`` the best per-token
        dynamic one if it scores higher; outlier channels go to float only where the best without them stays below
        ``float_route_below_db`` (a float path costs a Gather, a MatMul and an Add per layer at run time)."""
        absmax = stats.channel_absmax
        sampled = stats.sample is not None and len(stats.sample) > 0  # no rows: every sampled row was NaN/Inf
        rows = stats.sample if sampled else np.zeros((1, absmax.size), np.float32)
        simulator = Screened.of(rows, group.layers)
        static = max(self._scored(simulator, self._candidates(group, absmax)), key=lambda c: c.sqnr_db)
        per_row = (
            self.row_scales_below_db is not None
            and static.sqnr_db < self.row_scales_below_db
            and row_scalable(group.layers)
        )
        best = (
            max([static, *self._scored(simulator, _row_candidates(absmax))], key=lambda c: c.sqnr_db)
            if per_row
            else static
        )
        count = min(self.float_channels, int(self.max_float_fraction * absmax.size))
        if count >= 1 and best.sqnr_db < self.float_route_below_db:
            outliers = np.sort(np.argsort(-absmax, kind="stable")[:count])
            remaining = absmax.copy()
            remaining[outliers] = 0
            routed = [_routed(c, outliers) for c in self._candidates(group, remaining)]
            if per_row:
                routed.extend(_routed(c, outliers) for c in _row_candidates(remaining))
            best = max([best, *self._scored(simulator, routed)], key=lambda c: c.sqnr_db)
        if not best.per_row:
            return best
        return dataclasses.replace(best, label=f"{best.label}; best static {static.sqnr_db:.1f} dB")

    def _scored(self, simulator: Screened, candidates: list[Choice]) -> list[Choice]:
        """The SCREEN_KEPT candidates that score best on the screening rows, scored again on all the sampled rows."""
        if len(candidates) > SCREEN_KEPT:
            with one_blas_thread():
                screened = self._scored_on(simulator.screen, candidates)
            ranked = sorted(range(len(candidates)), key=lambda i: -screened[i].sqnr_db)  # stable: ties keep the order
            candidates = [candidates[i] for i in sorted(ranked[:SCREEN_KEPT])]
        return self._scored_on(simulator.full, candidates)

    def _scored_on(self, simulator: GroupSimulator, candidates: list[Choice]) -> list[Choice]:
        """The candidates with their simulated output SQNR on the simulator's rows filled in."""
        return [
            dataclasses.replace(
                c,
                sqnr_db=simulator.sqnr_db(
                    c.divisor,
                    self.abits,
                    self.wbits,
                    1.0 if c.preexecuted else None,
                    c.float_channels,
                    c.per_row,
                    asymmetric=not self.activation_symmetric,
                ),
            )
            for c in candidates
        ]

    def _candidates(self, group: ScaleGroup, absmax: np.ndarray) -> list[Choice]:
        """Divisors to try: the method's own, plus per-tensor as the do-nothing baseline."""
        candidates = [Choice(np.ones_like(absmax), "per-tensor (no migration)", 0.0)]
        if self.method == "outliertune":
            qmax = 2 ** (self.abits - 1) - 1
            step = np.where(absmax > 0, absmax, max(absmax.max(), 1.0)) / qmax
            candidates.extend(
                Choice(
                    _guarded(step * ratio), f"per-channel, clipped at {ratio:g}x range, step pre-executed", 0.0, True
                )
                for ratio in CLIP_RATIOS
            )
            candidates.extend(
                Choice(_guarded(_bounded(absmax, exponent)), f"bounded step ~ range^{exponent}", 0.0)
                for exponent in BOUNDED_EXPONENTS
            )
        elif self.method == "smoothquant":
            alphas = SMOOTHQUANT_ALPHAS if self.alpha_search else (self.alpha,)
            weight_absmax = np.max([np.abs(weight_matrix(layer)).max(axis=1) for layer in group.layers], axis=0)
            candidates.extend(
                Choice(_guarded(_smoothing(absmax, weight_absmax, a)), f"SmoothQuant alpha {a}", 0.0) for a in alphas
            )
        else:
            thresholds = absmax.max() * np.arange(1, OS_PLUS_THRESHOLDS + 1) / OS_PLUS_THRESHOLDS
            candidates.extend(
                Choice(np.maximum(1.0, absmax / t), f"OS+ scaling, t = {t:.3g}", 0.0) for t in thresholds if t > 0
            )
        return candidates

    def _derived(self, stats: TensorStats, choice: Choice) -> TensorStats | None:
        """The statistics of what the group's layers read after the rewrite, where they follow from ``stats``.

        Run-time row scales follow only from every row (None otherwise: quantize calibrates those groups).
        """
        moved = stats.affine(*_channel_affine(choice))
        if not choice.per_row:
            return moved
        if not moved.holds_every_row:
            return None
        assert moved.sample is not None
        return TensorStats.from_batch(_row_scaled(moved.sample, 2 ** (self.abits - 1) - 1), moved.sample_limit)

    def _apply(self, graph: ir.Graph, names: NameScope, group: ScaleGroup, choice: Choice) -> bool:
        """Rewrite the graph for the chosen divisor, or mark the group float if no choice is good enough."""
        note = f"{choice.label} (simulated SQNR {choice.sqnr_db:.1f} dB)"
        if choice.sqnr_db < self.min_sqnr_db:
            for layer in group.layers:
                layer.node.meta[KEEP_FLOAT_KEY] = f"best static scheme {note} is below {self.min_sqnr_db:g} dB"
            return False
        for layer in group.layers:
            layer.node.meta[SCHEME_NOTE_KEY] = note
        if np.all(choice.divisor == 1) and choice.float_channels is None and not choice.per_row:
            return False
        divisor = choice.divisor.astype(np.float32)
        if choice.float_channels is not None:
            route_channels_to_float(graph, names, group.activation, group.layers, choice.float_channels)
        for layer in group.layers:
            scale_weight_rows(graph, names, layer, divisor)
        readers = [layer.node for layer in group.layers]
        migrated, _ = apply_channel_affine(graph, names, group.activation, readers, *_channel_affine(choice))
        migrated.meta[MIGRATED_KEY] = True
        if choice.per_row:
            migrated = scale_rows_at_run_time(graph, names, migrated, group.layers, 2 ** (self.abits - 1) - 1)
            migrated.meta[MIGRATED_KEY] = True
        if choice.preexecuted or choice.per_row:
            migrated.meta[PREEXECUTED_KEY] = self.abits
        return True


def _channel_affine(choice: Choice) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel (scale, offset) the layers' activation takes: 1/divisor, and 0 on the float-routed channels."""
    divisor = choice.divisor.astype(np.float32)
    scale = 1.0 / divisor
    if choice.float_channels is not None:
        scale[choice.float_channels] = 0.0
    return scale, np.zeros_like(divisor)


def _row_scaled(rows: np.ndarray, qmax: int) -> np.ndarray:
    """X/s per row, s = max(max|X| over the row · (1/qmax), MIN_ROW_SCALE): rewrites.scale_rows_at_run_time's ops."""
    step = np.abs(rows).max(axis=-1, keepdims=True) * np.float32(1.0 / qmax)
    return rows / np.maximum(step, np.float32(MIN_ROW_SCALE))


def _routed(choice: Choice, outliers: np.ndarray) -> Choice:
    """The choice with the outlier channels on an exact float path."""
    label = f"{choice.label}, {outliers.size} outlier channels in float"
    return dataclasses.replace(choice, float_channels=outliers, label=label)


def _row_candidates(absmax: np.ndarray) -> list[Choice]:
    """Per-token dynamic steps, after no migration or a bounded per-channel one."""
    divisors = [(np.ones_like(absmax), "per-token dynamic")]
    divisors.extend(
        (_guarded(_bounded(absmax, exponent)), f"per-token dynamic after step ~ range^{exponent}")
        for exponent in BOUNDED_EXPONENTS
    )
    return [Choice(divisor, label, 0.0, per_row=True) for divisor, label in divisors]


def _guarded(divisor: np.ndarray) -> np.ndarray:
    """Keep divisors finite and away from zero."""
    return np.where(np.isfinite(divisor) & (divisor > MIN_DIVISOR), divisor, 1.0)


def _bounded(absmax: np.ndarray, exponent: float) -> np.ndarray:
    """d ∝ range^exponent, normalised so the largest channel keeps d = 1."""
    top = max(float(absmax.max()), 1e-12)
    return (np.maximum(absmax, 1e-12) / top) ** exponent


def _smoothing(activation_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha)."""
    return np.maximum(activation_absmax, 1e-5) ** alpha / np.maximum(weight_absmax, 1e-5) ** (1 - alpha)
