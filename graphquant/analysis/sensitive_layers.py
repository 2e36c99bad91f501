"""The layers a ``keep_8bit`` pattern list names: node-name globs, or the roles of the usually sensitive layers."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import onnx_ir as ir

from graphquant.analysis.layers import Layer

# Role patterns, written with a leading '@': the layer positions that low-bit weights hurt most on CNNs.
ROLES: dict[str, Callable[[Layer, Sequence[Layer]], bool]] = {
    "first": lambda layer, layers: layer is layers[0],
    "last": lambda layer, layers: layer is layers[-1],
    "depthwise": lambda layer, layers: _is_depthwise(layer),
}


def matching_layers(layers: Sequence[Layer], patterns: Sequence[str]) -> set[ir.Node]:
    """The nodes of the layers (in graph order) that a pattern matches: an fnmatch glob on the node name, or a role.

    Roles: ``@first`` and ``@last`` (the first and last quantizable layer in graph order, e.g. a CNN's stem conv and
    its classifier), ``@depthwise`` (a Conv with one input channel per group). A non-string raises TypeError, an unknown role ValueError.
    """
    if isinstance(patterns, str):
        raise TypeError(f"keep_8bit must be a list of patterns, got the string {patterns!r}")
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"keep_8bit patterns must be strings, got {pattern!r}")
        if pattern.startswith("@") and pattern[1:] not in ROLES:
            raise ValueError(f"keep_8bit: unknown role {pattern!r} (roles: {', '.join('@' + r for r in ROLES)})")
    return {layer.node for layer in layers if any(_matches(layer, layers, pattern) for pattern in patterns)}


def _matches(layer: Layer, layers: Sequence[Layer], pattern: str) -> bool:
    """Whether one pattern matches the layer."""
    if pattern.startswith("@"):
        return ROLES[pattern[1:]](layer, layers)
    return fnmatch.fnmatchcase(layer.node.name or "", pattern)


def _is_depthwise(layer: Layer) -> bool:
    """A grouped Conv whose every group reads one input channel (group > 1: a plain Conv of one channel is not)."""
    node = layer.node
    return node.op_type == "Conv" and node.attributes.get_int("group", 1) > 1 and layer.weight_array.shape[1] == 1
