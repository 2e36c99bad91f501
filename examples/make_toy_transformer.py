"""Build a small deterministic transformer-like ONNX model with planted activation outliers, plus calibration data."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 64
FFN = 256
SEQ = 32
NUM_BLOCKS = 2
OPSET = 17
IR_VERSION = 8
MODEL_SEED = 0
CALIB_SEED = 1
HELDOUT_SEED = 2
CALIB_SAMPLES = 32
HELDOUT_SAMPLES = 16
OUTLIER_CHANNELS = (5, 21, 38, 54)
GELU_SIGMOID_SCALE = 1.702


@dataclass
class GraphBuilder:
    """Accumulates nodes and float32 initializers while building the toy graph."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def const(self, name: str, value: np.ndarray) -> str:
        """Register a float32 initializer and return its name."""
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op_type: str, name: str, inputs: list[str], **attrs: object) -> str:
        """Append a single-output node named ``name`` and return its output tensor name."""
        output = f"{name}/output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output


def outlier_ln_params(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return LayerNorm gamma/beta with ~1 scale except 20-50x larger, offset outlier channels."""
    gamma = rng.normal(1.0, 0.1, HIDDEN)
    beta = rng.normal(0.0, 0.05, HIDDEN)
    channels = list(OUTLIER_CHANNELS)
    gamma[channels] = rng.uniform(20.0, 50.0, len(channels))
    beta[channels] = rng.choice([-1.0, 1.0], len(channels)) * rng.uniform(0.8, 1.5, len(channels)) * gamma[channels]
    return gamma, beta


def input_row_scale(gamma: np.ndarray) -> np.ndarray:
    """Per-input-row weight scale that damps outlier channels so projection outputs stay O(1)."""
    return 1.0 / np.maximum(np.abs(gamma), 1.0)


def layer_norm(gb: GraphBuilder, name: str, x: str, gamma: np.ndarray, beta: np.ndarray) -> str:
    """Emit a LayerNormalization over the last axis with gamma/beta initializers."""
    g = gb.const(f"{name}.weight", gamma)
    b = gb.const(f"{name}.bias", beta)
    return gb.node("LayerNormalization", name, [x, g, b], axis=-1, epsilon=1e-5)


def linear(
    gb: GraphBuilder, name: str, x: str, shape: tuple[int, int], std: float, row_scale: np.ndarray | None = None
) -> str:
    """Emit MatMul with a [in, out] weight followed by a bias Add."""
    weight = gb.rng.normal(0.0, std, shape)
    if row_scale is not None:
        weight = weight * row_scale[:, None]
    w = gb.const(f"{name}.weight", weight)
    b = gb.const(f"{name}.bias", gb.rng.normal(0.0, 0.02, shape[1]))
    y = gb.node("MatMul", name, [x, w])
    return gb.node("Add", f"{name}/bias_add", [y, b])


def attention(gb: GraphBuilder, prefix: str, h: str) -> str:
    """Emit a pre-LN single-head self-attention sublayer and its residual Add."""
    gamma, beta = outlier_ln_params(gb.rng)
    ln = layer_norm(gb, f"{prefix}/ln1", h, gamma, beta)
    scale = input_row_scale(gamma)
    q = linear(gb, f"{prefix}/attn/q_proj", ln, (HIDDEN, HIDDEN), 0.1, scale)
    k = linear(gb, f"{prefix}/attn/k_proj", ln, (HIDDEN, HIDDEN), 0.1, scale)
    v = linear(gb, f"{prefix}/attn/v_proj", ln, (HIDDEN, HIDDEN), 0.1, scale)
    kt = gb.node("Transpose", f"{prefix}/attn/k_transpose", [k], perm=[0, 2, 1])
    scores = gb.node("MatMul", f"{prefix}/attn/qk_matmul", [q, kt])
    inv_sqrt_d = gb.const(f"{prefix}/attn/scale", np.array(1.0 / np.sqrt(HIDDEN)))
    scaled = gb.node("Mul", f"{prefix}/attn/scale_mul", [scores, inv_sqrt_d])
    probs = gb.node("Softmax", f"{prefix}/attn/softmax", [scaled], axis=-1)
    context = gb.node("MatMul", f"{prefix}/attn/av_matmul", [probs, v])
    out = linear(gb, f"{prefix}/attn/out_proj", context, (HIDDEN, HIDDEN), 0.1)
    return gb.node("Add", f"{prefix}/attn/residual", [h, out])


def mlp(gb: GraphBuilder, prefix: str, h: str) -> str:
    """Emit a pre-LN MLP sublayer with sigmoid-approximated Gelu and its residual Add."""
    gamma, beta = outlier_ln_params(gb.rng)
    ln = layer_norm(gb, f"{prefix}/ln2", h, gamma, beta)
    fc1 = linear(gb, f"{prefix}/mlp/fc1", ln, (HIDDEN, FFN), 0.1, input_row_scale(gamma))
    gelu_scale = gb.const(f"{prefix}/mlp/gelu_scale", np.array(GELU_SIGMOID_SCALE))
    pre_sigmoid = gb.node("Mul", f"{prefix}/mlp/gelu_scale_mul", [fc1, gelu_scale])
    gate = gb.node("Sigmoid", f"{prefix}/mlp/gelu_sigmoid", [pre_sigmoid])
    act = gb.node("Mul", f"{prefix}/mlp/gelu_mul", [fc1, gate])
    fc2 = linear(gb, f"{prefix}/mlp/fc2", act, (FFN, HIDDEN), 0.05)
    return gb.node("Add", f"{prefix}/mlp/residual", [h, fc2])


def build_model(seed: int = MODEL_SEED) -> onnx.ModelProto:
    """Build the two-block toy transformer as an opset-17 ModelProto."""
    gb = GraphBuilder(np.random.default_rng(seed))
    h = "x"
    for i in range(NUM_BLOCKS):
        h = mlp(gb, f"block{i}", attention(gb, f"block{i}", h))
    gb.nodes[-1].output[0] = "y"  # the final residual Add produces the graph output directly
    dims = ["batch", "seq", HIDDEN]
    graph = helper.make_graph(
        gb.nodes,
        "toy_transformer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        gb.initializers,
    )
    opset_imports = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opset_imports, producer_name="graphquant-examples")
    model.ir_version = IR_VERSION
    return model


def make_inputs(seed: int, samples: int) -> np.ndarray:
    """Draw ``samples`` float32 sequences of shape [SEQ, HIDDEN] stacked on the batch axis."""
    return np.random.default_rng(seed).normal(0.0, 1.0, (samples, SEQ, HIDDEN)).astype(np.float32)


def check_model(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Validate the model with onnx.checker and run it in onnxruntime, asserting finite outputs."""
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], {"x": x})
    if not np.isfinite(y).all():
        raise RuntimeError("toy transformer produced non-finite outputs")
    return y


def parse_args() -> argparse.Namespace:
    """Parse the command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    return parser.parse_args()


def main() -> None:
    """Write toy_transformer.onnx, toy_calib.npz and toy_heldout.npz, then sanity-check the model."""
    out_dir: Path = parse_args().out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model()
    calib = make_inputs(CALIB_SEED, CALIB_SAMPLES)
    heldout = make_inputs(HELDOUT_SEED, HELDOUT_SAMPLES)
    onnx.save_model(model, out_dir / "toy_transformer.onnx")
    np.savez(out_dir / "toy_calib.npz", x=calib)
    np.savez(out_dir / "toy_heldout.npz", x=heldout)
    y = check_model(model, calib)
    stats = f"mean|y|={np.abs(y).mean():.3f} max|y|={np.abs(y).max():.3f}"
    print(f"wrote {out_dir}: {len(model.graph.node)} nodes, output {y.shape} {stats}")


if __name__ == "__main__":
    main()
