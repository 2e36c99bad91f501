"""Block-wise FlexRound: learn each block's weight rounding so that the block reproduces the float block's output.

The main graph is cut into blocks at the points where at most one value computed from a fitted layer is live (a
transformer's residual stream after each residual Add, a CNN's after each residual block or layer), each block holding at least ``layers`` fitted layers.
Blocks are fitted in order. A block's inputs come from the model quantized so far (the blocks before it, with their
learned weights), its targets from the float model on float inputs; the loss is the mean squared error of the
block's float outputs, run differentiably by analysis/torch_graph.py on one calibration batch per Adam step.
Each fitted weight is W_q = s·clip(round(W/(s·S)), lower, upper), S = exp(S1 + r + c), with straight-through
rounding; S1 starts where it reproduces GPTQ's codes, and the codes kept per block are those of the least loss over
the whole calibration set among GPTQ's own and the checkpoints, so a block never ends worse than GPTQ's on it.
A fitted layer's input activation is fake-quantized on its per-tensor grid (straight-through rounding) on the
quantized model's side, where it has one; the rest stays float, and layers not fitted here read their float weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import numpy as np
import onnx_ir as ir
import torch

from graphquant.analysis.flexround import Grid, divisors, rows_of
from graphquant.analysis.layers import Layer
from graphquant.analysis.torch_graph import Tensor, constant, run_nodes, supported
from graphquant.analysis.weight_fit import from_in_major
from graphquant.quant_spec import QuantSpec

Feed = dict[str, np.ndarray]
State = dict[str, Tensor]
DEFAULT_LEARNING_RATE = 8e-3
# The whole calibration set's loss is measured this many times per block (besides GPTQ's start), to keep the best.
CHECKPOINTS = 2
# S1 starts where W/(s·S) reproduces GPTQ's code at most this far from it, as near to W/s as that allows.
START_REACH = 0.45


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """Adam steps per block, its peak learning rate (cosine decay), the fewest fitted layers a block holds, and
    torch's threads while fitting (one: a block's small ops ran 4-6x faster on one thread than on two of a loaded
    2-core machine)."""

    steps: int = 300
    learning_rate: float = DEFAULT_LEARNING_RATE
    layers: int = 1
    threads: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.learning_rate > 0 or self.layers < 1 or self.threads < 1:
            raise ValueError(f"block-wise flexround needs steps >= 1, a positive learning rate, layers >= 1: {self}")


@dataclasses.dataclass(frozen=True)
class LayerFit:
    """A weight to fit (2-D or Conv): its layer, float weights and GPTQ's (rounded, low, high) in_major, its grid,
    and the per-tensor grid of its input activation (None: float), applied on the quantized model's side."""

    layer: Layer
    weights: np.ndarray
    start: tuple[np.ndarray, np.ndarray, np.ndarray]
    bits: int
    symmetric: bool
    block: int
    activation: QuantSpec | None = None


@dataclasses.dataclass
class Block:
    """Consecutive nodes of the main graph, the layers fitted in them, the values read from before, made for after,
    and the outputs the loss compares (those the learned weights change: not a mask passed on)."""

    nodes: list[ir.Node]
    fits: list[LayerFit]
    inputs: list[str]
    outputs: list[str]
    compared: list[str] = dataclasses.field(default_factory=list)


def plan(graph: ir.Graph, fits: Sequence[LayerFit], layers: int = 1) -> list[Block]:
    """The blocks holding every fitted layer, cut as late as possible where at most one data value is live."""
    nodes = list(graph)
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in nodes for a in n.attributes.values()):
        raise ValueError("block-wise flexround cannot cut a graph with subgraphs (If, Loop, Scan)")
    by_node = {id(fit.layer.node): fit for fit in fits}
    made, last_use = _lifetimes(graph, nodes)
    varying = _varying(nodes, {id(fit.layer.node) for fit in fits})
    live = _live_data(nodes, fits, varying, made, last_use)
    groups: list[list[int]] = [[]]
    count = 0
    for position, node in enumerate(nodes):
        groups[-1].append(position)
        count += id(node) in by_node
        # A block goes on through the nodes after its cut that keep one live value (a post-norm's LayerNorm).
        following = position + 1 < len(nodes) and id(nodes[position + 1]) not in by_node and live[position + 2] <= 1
        if count >= layers and live[position + 1] <= 1 and not following:
            groups.append([])
            count = 0
    if not count:  # trailing nodes after the last fitted layer are not needed
        groups.pop()
    blocks = [_block(nodes, group, by_node, made, last_use) for group in groups]
    for block in blocks:
        block.compared = [name for name in block.outputs if name in varying]
        reason = supported(block.nodes)
        if reason is not None:
            raise ValueError(f"block-wise flexround: {reason}")
    return blocks


def _lifetimes(graph: ir.Graph, nodes: list[ir.Node]) -> tuple[dict[str, int], dict[str, int]]:
    """Each value's making node position (-1: graph input) and last reading position (len(nodes): graph output)."""
    made = {value.name or "": -1 for value in graph.inputs}
    last_use: dict[str, int] = {}
    for position, node in enumerate(nodes):
        for value in node.inputs:
            if value is not None and value.name and not value.is_initializer():
                last_use[value.name] = position
        for value in node.outputs:
            made[value.name or ""] = position
    for value in graph.outputs:
        last_use[value.name or ""] = len(nodes)
    return made, last_use


def _varying(nodes: list[ir.Node], fitted: set[int]) -> set[str]:
    """The values computed from a fitted layer's output (those the learned weights change)."""
    varying: set[str] = set()
    for node in nodes:
        if id(node) in fitted or any(value is not None and value.name in varying for value in node.inputs):
            varying.update(value.name or "" for value in node.outputs)
    return varying


def _live_data(
    nodes: list[ir.Node], fits: Sequence[LayerFit], varying: set[str], made: dict[str, int], last_use: dict[str, int]
) -> list[int]:
    """For every cut position 0..len(nodes): how many live values carry the block's data.

    Those are the ``varying`` values, and the values a fitted layer's input is computed from without meeting a
    varying one (so a block's input counts, and an attention mask, which meets the scores, does not).
    """
    feeding = {fit.layer.activation.name or "" for fit in fits}
    for node in reversed(nodes):
        reads = [value.name for value in node.inputs if value is not None and value.name and not value.is_initializer()]
        if any(value.name in feeding for value in node.outputs) and not varying.intersection(reads):
            feeding.update(reads)
    changes = np.zeros(len(nodes) + 2, np.int64)
    for name in (varying | feeding).intersection(last_use):
        changes[made[name] + 1] += 1
        changes[last_use[name] + 1] -= 1
    return [int(count) for count in np.cumsum(changes)[: len(nodes) + 1]]


def _block(
    nodes: list[ir.Node], group: list[int], by_node: dict[int, LayerFit], made: dict[str, int], last_use: dict[str, int]
) -> Block:
    """The block of the node positions ``group``: its fits, inputs from before, outputs read after it."""
    first, last = group[0], group[-1]
    inputs: dict[str, None] = {}
    outputs: dict[str, None] = {}
    for position in group:
        for value in nodes[position].inputs:
            if value is not None and value.name and not value.is_initializer() and made[value.name] < first:
                inputs[value.name] = None
        for value in nodes[position].outputs:
            if last_use.get(value.name or "", -1) > last:
                outputs[value.name or ""] = None
    fits = [by_node[id(nodes[p])] for p in group if id(nodes[p]) in by_node]
    return Block([nodes[p] for p in group], fits, list(inputs), list(outputs))


class _Rounding:
    """One layer's learned weight: s·clip(round(W/(s·S)), lower, upper), S = exp(S1 + r + c), s = grid·exp(t)."""

    def __init__(self, fit: LayerFit):
        self.fit = fit
        rounded, low, high = fit.start
        grid = Grid.of_ranges(low, high, fit.bits, fit.symmetric)
        rows = fit.weights.shape[0]
        step = rows_of(grid.step, fit.block, rows)
        codes = np.rint(rounded / step)
        self.weights = torch.from_numpy(fit.weights.astype(np.float32))
        self.step, self.lower, self.upper = (
            torch.from_numpy(rows_of(a, fit.block, rows).astype(np.float32))
            for a in (grid.step, grid.lower, grid.upper)
        )
        self.start = (torch.zeros(grid.step.shape), torch.from_numpy(codes.astype(np.float32)))
        self.log_grid = torch.zeros(grid.step.shape, requires_grad=True)
        self.element = torch.from_numpy(
            divisors(fit.weights / step, codes, START_REACH).astype(np.float32)
        ).requires_grad_()
        self.per_output = torch.zeros((1, fit.weights.shape[1]), requires_grad=True)
        self.per_input = torch.zeros((rows, 1), requires_grad=True)
        # Where each element of the weight's own layout sits in the flattened in_major matrix (a Conv's taps too).
        positions = np.arange(fit.weights.size).reshape(fit.weights.shape)
        self.layout = torch.from_numpy(from_in_major(fit.layer, positions).astype(np.int64))

    def parameters(self) -> list[Tensor]:
        """What Adam learns."""
        return [self.log_grid, self.element, self.per_output, self.per_input]

    def scale(self, log_grid: Tensor) -> Tensor:
        """The grid step of every element's row block: [K, N]."""
        factor = torch.repeat_interleave(torch.exp(log_grid), self.fit.block, dim=0)[: self.weights.shape[0]]
        return self.step * factor

    def codes(self) -> Tensor:
        """The integer codes of the current divisors, rounding passing gradients straight through."""
        ratio = self.weights / (self.scale(self.log_grid) * torch.exp(self.element + self.per_output + self.per_input))
        rounded = ratio + (torch.round(ratio) - ratio).detach()
        return torch.clamp(rounded, self.lower, self.upper)

    def snapshot(self) -> tuple[Tensor, Tensor]:
        """The current (log grid factor, codes), detached."""
        with torch.no_grad():
            return self.log_grid.detach().clone(), self.codes()

    def weight(self, state: tuple[Tensor, Tensor] | None) -> Tensor:
        """W_q in the weight's own layout, learned (``state`` None) or of a snapshot."""
        matrix = self.scale(self.log_grid) * self.codes() if state is None else self.scale(state[0]) * state[1]
        return torch.take(matrix, self.layout)


def refine(
    graph: ir.Graph, feeds: Sequence[Feed], fits: Sequence[LayerFit], settings: BlockSettings = BlockSettings()
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fit every block in order; per fitted layer (keyed by id of its LayerFit): rounded in_major, low, high."""
    blocks = plan(graph, fits, settings.layers)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _refined(blocks, feeds, settings)
    finally:
        torch.set_num_threads(threads)


def _refined(
    blocks: list[Block], feeds: Sequence[Feed], settings: BlockSettings
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """refine's work on the planned blocks."""
    quantized: list[State] = [{k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()} for feed in feeds]
    reference = [dict(state) for state in quantized]
    results: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for index, block in enumerate(blocks):
        needed = {name for later in blocks[index + 1 :] for name in later.inputs}
        constants = {v.name or "": constant(v) for n in block.nodes for v in n.inputs if v is not None and _const(v)}
        floats = {fit.layer.weight.name or "": _float_weight(fit) for fit in block.fits}
        with torch.no_grad():
            made = [_run(block, constants | floats, state) for state in reference]
        targets = [{name: out[name] for name in block.compared} for out in made]
        roundings = [_Rounding(fit) for fit in block.fits]
        best = _fit(block, constants, quantized, targets, roundings, settings)
        with torch.no_grad():
            learned = {r.fit.layer.weight.name or "": r.weight(s) for r, s in zip(roundings, best)}
            outputs = [_run(block, constants | learned, state, True) for state in quantized]
        quantized = [_kept({**state, **out}, needed) for state, out in zip(quantized, outputs)]
        reference = [_kept({**state, **out}, needed) for state, out in zip(reference, made)]
        for rounding, (log_grid, codes) in zip(roundings, best):
            results[id(rounding.fit)] = _result(rounding, log_grid, codes)
    return results


def _const(value: ir.Value) -> bool:
    """Whether a node input is an initializer with a value."""
    return value.is_initializer() and value.const_value is not None


def _float_weight(fit: LayerFit) -> Tensor:
    """The float weight in its own layout."""
    return torch.from_numpy(from_in_major(fit.layer, fit.weights).astype(np.float32))


def _run(block: Block, fixed: State, state: State, quantized: bool = False) -> State:
    """The block's outputs on one batch's state, with ``fixed`` values (constants, weights) in place; ``quantized``:
    the fitted layers read their activations on their grids."""
    values = {**fixed, **{name: state[name] for name in block.inputs}}
    grids = {id(fit.layer.node): fit for fit in block.fits if fit.activation is not None} if quantized else {}
    run_nodes(block.nodes, values, partial(_quantized_inputs, grids) if grids else None)
    return {name: values[name] for name in block.outputs}


def _quantized_inputs(grids: dict[int, LayerFit], node: ir.Node, arguments: list) -> list:
    """The node's arguments, its activation fake-quantized if it is a fitted layer with an activation grid."""
    fit = grids.get(id(node))
    if fit is None:
        return arguments
    assert fit.activation is not None
    index = fit.layer.activation_index
    return [fake_quantize(a, fit.activation) if i == index else a for i, a in enumerate(arguments)]


def fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """x on a per-tensor grid, (clamp(round(x/s) + z, qmin, qmax) - z)·s, rounding passing gradients straight."""
    if spec.axis is not None:
        raise ValueError("block-wise flexround fake-quantizes per-tensor activation grids only")
    scale, zero = float(spec.scale), float(spec.zero_point)
    ratio = x / scale
    codes = torch.clamp(ratio + (torch.round(ratio) - ratio).detach() + zero, spec.qmin, spec.qmax)
    return (codes - zero) * scale


def _kept(state: State, needed: set[str]) -> State:
    """The state's values that later blocks read."""
    return {name: value for name, value in state.items() if name in needed}


def _error(outputs: State, targets: State) -> Tensor:
    """Mean squared error summed over the float targets."""
    errors = [torch.mean((outputs[k] - t) ** 2) for k, t in targets.items() if t.dtype.is_floating_point]
    return torch.stack(errors).sum() if errors else torch.zeros(())


def _fit(
    block: Block,
    constants: State,
    inputs: list[State],
    targets: list[State],
    roundings: list[_Rounding],
    settings: BlockSettings,
) -> list[tuple[Tensor, Tensor]]:
    """Adam on the block's roundings; the (log grid factor, codes) per layer of the least whole-set loss seen."""
    names = [r.fit.layer.weight.name or "" for r in roundings]

    def total(states: list[tuple[Tensor, Tensor]]) -> float:
        with torch.no_grad():
            fixed = constants | {n: r.weight(s) for n, r, s in zip(names, roundings, states)}
            return sum(float(_error(_run(block, fixed, x, True), t)) for x, t in zip(inputs, targets))

    candidates = [r.start for r in roundings]
    best = (total(candidates), candidates)
    optimizer = torch.optim.Adam([p for r in roundings for p in r.parameters()], lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    checks = {round(settings.steps * (i + 1) / CHECKPOINTS) for i in range(CHECKPOINTS)}
    for step in range(1, settings.steps + 1):
        batch = (step - 1) % len(inputs)
        fixed = constants | {n: r.weight(None) for n, r in zip(names, roundings)}
        loss = _error(_run(block, fixed, inputs[batch], True), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step in checks:
            snapshot = [r.snapshot() for r in roundings]
            measured = total(snapshot)
            if measured < best[0]:
                best = (measured, snapshot)
    return best[1]


def _result(rounding: _Rounding, log_grid: Tensor, codes: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rounded in_major matrix and the (low, high) ranges of its grid, the learned grid factor applied."""
    factor = np.exp(log_grid.numpy().astype(np.float64))
    fit = rounding.fit
    _, low, high = fit.start
    grid = Grid.of_ranges(low, high, fit.bits, fit.symmetric)
    rounded = rows_of(grid.step * factor, fit.block, fit.weights.shape[0]) * codes.numpy().astype(np.float64)
    return rounded, low * factor, high * factor
