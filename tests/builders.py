"""Small model builders and an onnxruntime runner shared by the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort

from graphquant.lowering.unsigned_weights import UnsignedWeightsPass, uint8_int8_saturates


def build(text: str, initializers: dict[str, np.ndarray] | None = None) -> ir.Model:
    """An onnx_ir model from onnx.parser text plus named numpy initializers."""
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def run(model: ir.Model, feed: dict[str, np.ndarray], optimize: bool = True) -> list[np.ndarray]:
    """Run a model in onnxruntime on the CPU and return its outputs.

    ``optimize=False`` runs the graph as written: onnxruntime otherwise fuses a blocked DequantizeLinear -> MatMul
    into MatMulNBits with int8 compute, which is not the exact QDQ semantics a reference needs. On a machine whose
    uint8 x int8 kernel saturates, a single lowering pass's output runs with its 8-bit weights moved to uint8, as
    every target does last (UnsignedWeightsPass, exact): the integer math is what the tests check, not the kernel.
    """
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if uint8_int8_saturates():
        model = ir.from_proto(ir.to_proto(model))
        UnsignedWeightsPass()(model)
    proto = ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def weights(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    """Gaussian float32 weights."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def outlier_activations(rng: np.random.Generator, samples: int, channels: int, outliers: int = 2) -> np.ndarray:
    """Float32 activations whose first ``outliers`` channels are 30x larger and off-centre."""
    data = rng.standard_normal((samples, channels)).astype(np.float32)
    data[:, :outliers] = data[:, :outliers] * 30.0 + 50.0
    return data


MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 16] x) => (float[N, 4] y) {
  h = MatMul(x, w1)
  hb = Add(h, b1)
  r = Relu(hb)
  y = Gemm<transB: int = 1>(r, w2, b2)
}
"""


def mlp(rng: np.random.Generator) -> ir.Model:
    """x -> MatMul+Add -> Relu -> Gemm(transB) -> y, with 16 inputs, 8 hidden, 4 outputs."""
    return build(
        MLP,
        {"w1": weights(rng, 16, 8), "b1": weights(rng, 8), "w2": weights(rng, 4, 8), "b2": weights(rng, 4)},
    )


def save_model(model: ir.Model, path) -> str:
    """Write a model to ``path`` (a single .onnx file) and return the path as a string."""
    ir.save(model, str(path))
    return str(path)


def mlp_reference(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """The float output of :func:`mlp`'s graph computed in numpy from the model's own initializers."""
    init = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    hidden = np.maximum(x @ init["w1"] + init["b1"], 0.0)
    return (hidden @ init["w2"].T + init["b2"]).astype(np.float32)


NAMED_MLP = """
<ir_version: 8, opset_import: ["" : 17]>
named_mlp (float[N, 16] x) => (float[N, 4] y) {
  [fc1] h = MatMul(x, w1)
  [bias1] hb = Add(h, b1)
  [act] r = Relu(hb)
  [fc2] y = Gemm<transB: int = 1>(r, w2, b2)
}
"""


def named_mlp(rng: np.random.Generator) -> ir.Model:
    """:func:`mlp` with node names fc1 (MatMul), bias1, act and fc2 (Gemm, transB), for overrides."""
    return build(
        NAMED_MLP,
        {"w1": weights(rng, 16, 8), "b1": weights(rng, 8), "w2": weights(rng, 4, 8), "b2": weights(rng, 4)},
    )


QKV = """
<ir_version: 8, opset_import: ["" : 17]>
qkv (float[N, 8] x) => (float[N, 8] q, float[N, 8] k, float[N, 8] v, float[N, 8] res) {
  [q_proj] q = MatMul(x, wq)
  [k_proj] k = MatMul(x, wk)
  [v_proj] v = MatMul(x, wv)
  [residual] res = Add(x, v)
}
"""


def qkv(rng: np.random.Generator) -> ir.Model:
    """Three MatMuls (q_proj, k_proj, v_proj) sharing input x, which a residual Add also reads."""
    return build(QKV, {name: weights(rng, 8, 8) for name in ("wq", "wk", "wv")})


RELU_ONLY = """
<ir_version: 8, opset_import: ["" : 17]>
relu_only (float[N, 4] x) => (float[N, 4] y) {
  y = Relu(x)
}
"""


def relu_only() -> ir.Model:
    """A model with nothing to quantize."""
    return build(RELU_ONLY)


def feeds(
    rng: np.random.Generator, batches: int, rows: int, features: int, name: str = "x"
) -> list[dict[str, np.ndarray]]:
    """``batches`` float32 Gaussian feeds of shape (rows, features) for one input."""
    return [{name: rng.standard_normal((rows, features)).astype(np.float32)} for _ in range(batches)]


# --- OutlierTune: graphs whose activations have a few large, off-centre channels ---

OUTLIER_CHANNELS = (3, 11)


def outlier_layer_norm(
    rng: np.random.Generator, channels: int = 16, outliers: tuple[int, ...] = OUTLIER_CHANNELS
) -> tuple[np.ndarray, np.ndarray]:
    """LayerNormalization gamma/beta near (1, 0), except ``outliers`` with gains 30-40 and offsets of ±45-50.

    On Gaussian inputs those channels of the LN output sit far off zero (their midpoint is about ±beta)
    and are ~35x wider than the rest, like the outlier dimensions of trained transformers.
    """
    gamma = (1.0 + 0.1 * rng.standard_normal(channels)).astype(np.float32)
    beta = (0.05 * rng.standard_normal(channels)).astype(np.float32)
    for position, channel in enumerate(outliers):
        gamma[channel] = 30.0 + 10.0 * (position % 2)
        beta[channel] = (45.0 + 5.0 * (position % 2)) * (1.0 if position % 2 == 0 else -1.0)
    return gamma, beta


def damped_weights(
    rng: np.random.Generator,
    rows: int,
    columns: int,
    outliers: tuple[int, ...] = OUTLIER_CHANNELS,
    damping: float = 30.0,
) -> np.ndarray:
    """[rows, columns] Gaussian weights whose outlier input rows are ``damping`` times smaller (as training leaves)."""
    weight = weights(rng, rows, columns)
    weight[list(outliers)] /= damping
    return weight


LN_QKV = """
<ir_version: 8, opset_import: ["" : 17]>
ln_qkv (float[N, 16] x) => (float[N, 16] q, float[N, 16] k, float[N, 16] v) {
  [ln] h = LayerNormalization<axis: int = -1>(x, ln_gamma, ln_beta)
  [q_proj] q_mm = MatMul(h, wq)
  [q_bias] q = Add(q_mm, bq)
  [k_proj] k_mm = MatMul(h, wk)
  [k_bias] k = Add(k_mm, bk)
  [v_proj] v_mm = MatMul(h, wv)
  [v_bias] v = Add(v_mm, bv)
}
"""


def ln_qkv(rng: np.random.Generator, damped: bool = False) -> ir.Model:
    """LayerNormalization (planted outlier gamma/beta) read only by three MatMul+Add projections q/k/v (16 -> 16).

    With ``damped`` the projections' outlier input rows are 30x smaller, as in a trained transformer.
    """
    gamma, beta = outlier_layer_norm(rng)
    make = damped_weights if damped else weights
    initializers: dict[str, np.ndarray] = {"ln_gamma": gamma, "ln_beta": beta}
    for name in ("q", "k", "v"):
        initializers[f"w{name}"] = make(rng, 16, 16)
        initializers[f"b{name}"] = weights(rng, 16, scale=0.1)
    return build(LN_QKV, initializers)


def gaussian_feeds(
    seed: int, batches: int = 4, rows: int = 64, features: int = 16, name: str = "x"
) -> list[dict[str, np.ndarray]]:
    """Deterministic Gaussian feeds (a separate seed gives held-out data)."""
    return feeds(np.random.default_rng(seed), batches, rows, features, name)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10·log10(|reference|² / |reference - candidate|²), inf when equal."""
    reference = np.asarray(reference, np.float64)
    error = float(np.sum((reference - np.asarray(candidate, np.float64)) ** 2))
    return float("inf") if error == 0 else 10.0 * float(np.log10(np.sum(reference**2) / error))


def output_sqnr_db(reference: ir.Model, candidate: ir.Model, data: list[dict[str, np.ndarray]]) -> float:
    """SQNR of all outputs of ``candidate`` against ``reference`` over ``data``, both run in onnxruntime."""
    expected = np.concatenate([np.ravel(out) for feed in data for out in run(reference, feed)])
    got = np.concatenate([np.ravel(out) for feed in data for out in run(candidate, feed)])
    return sqnr_db(expected, got)


def assert_same_outputs(reference: ir.Model, candidate: ir.Model, data: list[dict[str, np.ndarray]]) -> None:
    """Every output of ``candidate`` equals ``reference``'s in onnxruntime within rtol 1e-4, atol 1e-5."""
    for feed in data:
        for expected, got in zip(run(reference, feed), run(candidate, feed), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def by_name(model: ir.Model) -> dict[str, ir.Node]:
    """The main graph's nodes by name."""
    return {node.name: node for node in model.graph}


def ops(model: ir.Model) -> list[str]:
    """The op types of the main graph's nodes, in order."""
    return [node.op_type for node in model.graph]


def initializer(model: ir.Model, name: str) -> np.ndarray:
    """An initializer's numpy value."""
    return model.graph.initializers[name].const_value.numpy()


POST_LN = """
<ir_version: 8, opset_import: ["" : 17]>
post_ln (float[N, 16] x) => (float[N, 16] y) {
  [ln] h = LayerNormalization<axis: int = -1>(x, ln_gamma, ln_beta)
  [fc] f = MatMul(h, w)
  [fc_bias] fb = Add(f, b)
  [residual] y = Add(h, fb)
}
"""


def post_ln(rng: np.random.Generator) -> ir.Model:
    """Outlier LayerNormalization whose output feeds both a MatMul+Add and the residual Add."""
    gamma, beta = outlier_layer_norm(rng)
    return build(POST_LN, {"ln_gamma": gamma, "ln_beta": beta, "w": weights(rng, 16, 16), "b": weights(rng, 16)})


LN_GEMMS = """
<ir_version: 8, opset_import: ["" : 17]>
ln_gemms (float[N, 16] x) => (float[N, 8] y, float[N, 8] z) {
  [ln] h = LayerNormalization<axis: int = -1>(x, ln_gamma, ln_beta)
  [with_c] y = Gemm<transB: int = 1>(h, w1, c1)
  [without_c] z = Gemm<transB: int = 1>(h, w2)
}
"""


def ln_gemms(rng: np.random.Generator) -> ir.Model:
    """Outlier LayerNormalization read by two Gemm(transB=1) layers, ``with_c`` (C = c1) and ``without_c``."""
    gamma, beta = outlier_layer_norm(rng)
    return build(
        LN_GEMMS,
        {
            "ln_gamma": gamma,
            "ln_beta": beta,
            "w1": weights(rng, 8, 16),
            "c1": weights(rng, 8),
            "w2": weights(rng, 8, 16),
        },
    )


INPUT_LAYER = """
<ir_version: 8, opset_import: ["" : 17]>
input_layer (float[N, 16] x) => (float[N, 8] y) {
  [fc] y = MatMul(x, w)
}
"""


def input_layer(rng: np.random.Generator) -> ir.Model:
    """A graph input read directly by one MatMul with no bias (feed it :func:`outlier_feeds`)."""
    return build(INPUT_LAYER, {"w": weights(rng, 16, 8)})


def outlier_feeds(seed: int, batches: int = 4, rows: int = 64, outliers: int = 3) -> list[dict[str, np.ndarray]]:
    """Feeds for ``x`` from :func:`outlier_activations` (the first channels 30x wider and centred on +50)."""
    rng = np.random.default_rng(seed)
    return [{"x": outlier_activations(rng, rows, 16, outliers)} for _ in range(batches)]


ACTIVATION_OUTPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
activation_outputs (float[N, 16] x) => (float[N, 16] a, float[N, 16] h, float[N, 8] y, float[N, 8] z) {
  [offset] a = Add(x, off)
  [fc_a] y = MatMul(a, w1)
  [ln] h = LayerNormalization<axis: int = -1>(x, ln_gamma, ln_beta)
  [fc_h] z = MatMul(h, w2)
}
"""


def activation_outputs(rng: np.random.Generator) -> ir.Model:
    """Two layer inputs that are also graph outputs: ``a`` (x with two large offsets) and an outlier LN's ``h``."""
    gamma, beta = outlier_layer_norm(rng)
    off = np.zeros(16, np.float32)
    off[[0, 7]] = [40.0, -25.0]
    return build(
        ACTIVATION_OUTPUTS,
        {"off": off, "w1": weights(rng, 16, 8), "ln_gamma": gamma, "ln_beta": beta, "w2": weights(rng, 16, 8)},
    )


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def examples_module(name: str) -> ModuleType:
    """Import a script from examples/ by path (minilm.py, sentences.py)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


LLAMA_LAYERS = 2


def export_tiny_llama(path: Path, exporter: str) -> Path:
    """The tiny Llama's prefill graph (input_ids, attention_mask) -> logits, exported with torch.onnx ("dynamo" or
    "legacy")."""
    return _export_logits(tiny_llama_model(), path, exporter)


def export_tiny_llama_decode(path: Path, exporter: str) -> Path:
    """The tiny Llama's KV-cache decode graph, exported with examples/smollm2.py's decode exporter."""
    return examples_module("smollm2").export_decode(tiny_llama_model(), path, dynamo=exporter == "dynamo")


def tiny_llama_model() -> Any:
    """A random-initialised 2-layer LlamaForCausalLM (RMSNorm, SwiGLU, GQA, tied embeddings), the same on every
    call; no download.

    The RMSNorm weights are drawn in [0.5, 2] and a few residual channels are made large, as in real LLMs.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LLAMA_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 2.0)
        model.model.embed_tokens.weight[:, [3, 17]] *= 20.0
    return model


def _export_logits(model: Any, path: Path, exporter: str) -> Path:
    """Export a causal LM's logits for (input_ids, attention_mask) with examples/smollm2.py's exporter."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    return examples_module("smollm2").export_logits(model, ids, path, dynamo=exporter == "dynamo")


def token_feeds(seed: int, batches: int = 3, batch: int = 4, seq: int = 16, vocab: int = 128) -> list[dict]:
    """Random token-id feeds with an all-ones attention mask."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(batches):
        ids = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return feeds


# One attention head: Q·Kᵀ scaled, softmax, ·V; the three projections have constant weights.
ATTENTION = """
<ir_version: 8, opset_import: ["" : 17]>
attention (float[B, S, 32] x) => (float[B, S, 32] y, float[B, S, 32] q2) {
  [q_proj] q = MatMul(x, wq)
  [k_proj] k = MatMul(x, wk)
  [v_proj] v = MatMul(x, wv)
  [k_t] kt = Transpose<perm = [0, 2, 1]>(k)
  [scores] s = MatMul(q, kt)
  [scaled] sc = Mul(s, scale)
  [softmax] p = Softmax<axis = -1>(sc)
  [context] y = MatMul(p, v)
  [q_twice] q2 = Add(q, q)
}
"""


def attention(rng: np.random.Generator) -> ir.Model:
    """The attention block with random projections (q also read by an Add: an unusual second consumer)."""
    projections = {name: (rng.standard_normal((32, 32)) * 0.3).astype(np.float32) for name in ("wq", "wk", "wv")}
    return build(ATTENTION, {**projections, "scale": np.array(1 / np.sqrt(32), np.float32)})


def attention_feeds(rng: np.random.Generator, batches: int = 4, seq: int = 8) -> list[dict[str, np.ndarray]]:
    """Batches of 4 sequences of ``seq`` tokens for the attention block."""
    return [{"x": rng.standard_normal((4, seq, 32)).astype(np.float32)} for _ in range(batches)]


GELU_HIDDEN = 24
GELU_OUTLIERS = (3, 10, 17)
GELU_MLP = """
<ir_version: 8, opset_import: ["" : 17]>
gelu_mlp (float[N, 8] x) => (float[N, 8] y) {
  [fc1] h = MatMul(x, w1)
  hb = Add(h, b1)
  d = Div(hb, root2)
  e = Erf(d)
  e1 = Add(e, one)
  e2 = Mul(half, e1)
  g = Mul(hb, e2)
  gs = Add(g, shift)
  [fc2] m = MatMul(gs, w2)
  y = Add(m, b2)
}
"""


def gelu_mlp(seed: int, extra_reader: str = "") -> ir.Model:
    """x -> fc1 + bias -> erf GELU -> + shift -> fc2 + bias, with hidden channels GELU_OUTLIERS 30x larger.

    ``extra_reader`` adds a line that also reads the GELU's output (to test that a foreign reader stops the rewrite).
    """
    rng = np.random.default_rng(seed)
    w1 = weights(rng, 8, GELU_HIDDEN)
    w1[:, list(GELU_OUTLIERS)] *= 30.0
    text = GELU_MLP if not extra_reader else GELU_MLP.replace("(float[N, 8] y)", "(float[N, 8] y, float[N] r)")
    text = text.replace("  y = Add(m, b2)", f"  y = Add(m, b2)\n{extra_reader}")
    return build(
        text,
        {
            "w1": w1,
            "b1": weights(rng, GELU_HIDDEN),
            "root2": np.float32(np.sqrt(2.0)),
            "one": np.float32(1.0),
            "half": np.float32(0.5),
            "shift": weights(rng, GELU_HIDDEN),
            "w2": weights(rng, GELU_HIDDEN, 8),
            "b2": weights(rng, 8),
        },
    )
