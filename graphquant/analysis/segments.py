"""Split a main graph into consecutive segments of bounded weight bytes, so that one segment's weights run at a time."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir


@dataclasses.dataclass
class Segment:
    """Consecutive nodes of the main graph (by position) and the values that cross into and out of them."""

    nodes: list[int]
    inputs: list[str]  # values read here that come from the feed or from earlier segments
    outputs: list[str]  # values made here that later segments read or that were asked for
    wanted: list[str]  # the asked-for values among the outputs
    initializers: list[str]  # initializers read here


def plan(graph: ir.Graph, names: Sequence[str], parts: int) -> list[Segment] | None:
    """Segments of at most max(total / parts, one node's) weight bytes each, None where the graph cannot be split.

    Every name must be a node output or a graph input (graph inputs are no segment's output); nodes with subgraphs,
    a node order that is not topological and graphs that fit in one segment are not split. Trailing nodes that make
    nothing asked for are left out.
    """
    nodes = list(graph)
    if any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in nodes for attr in n.attributes.values()
    ):
        return None
    weights = [_initializers(node) for node in nodes]
    groups = _groups([sum(value.const_value.nbytes for value in group) for group in weights], parts)  # type: ignore[union-attr]
    if len(groups) < 2:
        return None
    where = {value.name: index for index, group in enumerate(groups) for i in group for value in nodes[i].outputs}
    inputs = {value.name for value in graph.inputs}
    if any(name not in where and name not in inputs for name in names):
        return None
    segments = []
    for index, group in enumerate(groups):
        read = _read_values(nodes, group, inputs, where)
        if read is None or any(where.get(name, -1) > index for name in read):
            return None
        segments.append(Segment(group, [n for n in read if where.get(n, -1) != index], [], [], []))
        segments[-1].initializers = sorted({value.name or "" for i in group for value in weights[i]})
    for index, segment in enumerate(segments):
        later = {name for other in segments[index + 1 :] for name in other.inputs}
        made = [value.name or "" for i in segment.nodes for value in nodes[i].outputs if value.name]
        segment.wanted = [name for name in dict.fromkeys(names) if where.get(name) == index]
        segment.outputs = list(dict.fromkeys([*segment.wanted, *(name for name in made if name in later)]))
    while segments and not segments[-1].outputs:
        segments.pop()
    return segments if len(segments) > 1 else None


def _initializers(node: ir.Node) -> list[ir.Value]:
    """The node's distinct initializer inputs that hold a value."""
    found = {id(v): v for v in node.inputs if v is not None and v.is_initializer() and v.const_value is not None}
    return list(found.values())


def _groups(node_bytes: list[int], parts: int) -> list[list[int]]:
    """Consecutive node positions, a new group whenever the next node would take one past the budget."""
    budget = max(sum(node_bytes) / parts, max(node_bytes, default=0))
    groups: list[list[int]] = [[]]
    total = 0
    for position, size in enumerate(node_bytes):
        if groups[-1] and total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(position)
        total += size
    return groups


def _read_values(
    nodes: list[ir.Node], group: list[int], inputs: set[str], where: dict[str | None, int]
) -> list[str] | None:
    """The non-initializer values the group's nodes read, None if one is neither a graph input nor a node output."""
    read: dict[str, None] = {}
    for i in group:
        for value in nodes[i].inputs:
            if value is None or value.is_initializer() or not value.name:
                continue
            if value.name not in where and value.name not in inputs:
                return None
            read[value.name] = None
    return list(read)
