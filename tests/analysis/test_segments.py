"""Graph segments: consecutive nodes of bounded weight bytes and the values that cross between them."""

from __future__ import annotations

import numpy as np
from builders import build, mlp

from graphquant.analysis import segments


def test_an_mlp_splits_after_its_largest_weight_with_the_crossing_value_passed_on():
    graph = mlp(np.random.default_rng(0)).graph  # w1 512 bytes, b1 32, w2 128, b2 16
    plan = segments.plan(graph, ["y", "hb", "x"], parts=2)  # budget max(688 / 2, 512) = 512
    assert plan is not None
    assert [[graph.node(i).op_type for i in s.nodes] for s in plan] == [["MatMul"], ["Add", "Relu", "Gemm"]]
    assert [(s.inputs, s.outputs, s.wanted, s.initializers) for s in plan] == [
        (["x"], ["h"], [], ["w1"]),
        (["h"], ["y", "hb"], ["y", "hb"], ["b1", "b2", "w2"]),
    ]


def test_trailing_nodes_that_make_nothing_asked_for_are_left_out():
    graph = mlp(np.random.default_rng(1)).graph
    # The second segment (Add, Relu, Gemm) makes nothing asked for; the MatMul alone is left, and runs whole.
    assert segments.plan(graph, ["h"], parts=2) is None
    assert segments.plan(graph, ["h", "r"], parts=2) is not None


def test_graphs_that_cannot_be_split_run_whole():
    graph = mlp(np.random.default_rng(2)).graph
    assert segments.plan(graph, ["y"], parts=1) is None  # one segment holds every weight
    assert segments.plan(graph, ["y", "missing"], parts=2) is None  # a name nothing makes
    branchy = build(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        branchy (float[4] x, bool c) => (float[4] y) {
          a = Mul(x, w)
          y = If(c) <then_branch = g1 () => (float[4] t) { t = Add(a, w) },
                     else_branch = g2 () => (float[4] e) { e = Sub(a, w) }>
        }
        """,
        {"w": np.ones(4, np.float32)},
    )
    assert segments.plan(branchy.graph, ["y"], parts=4) is None  # a subgraph may read any earlier value


def test_a_node_order_that_is_not_topological_is_not_split():
    graph = mlp(np.random.default_rng(3)).graph
    matmul = graph.node(0)
    graph.remove(matmul)
    graph.append(matmul)  # MatMul now comes after the Add that reads its output
    assert segments.plan(graph, ["y"], parts=2) is None
