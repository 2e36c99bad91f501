"""Scale benchmark: time and peak RSS of `graphquant optimize` against model size: decoders, Llamas, an in-memory CNN.

Generates decoder-style models (token Gather, N blocks of LayerNorm -> Q/K/V MatMul -> single-head attention ->
O MatMul -> residual -> LayerNorm -> fc1 -> Relu -> fc2 -> residual, final LayerNorm and lm head) with every weight
in one page-aligned external data file, written tensor by tensor so generation itself needs little memory. Each
quantizer runs in its own subprocess, whose peak RSS comes from os.wait4. onnxruntime's quantize_dynamic runs on
the same files as the incumbent (it needs no calibration data; its failures are reported, not hidden).

The Llama rows are Llama-architecture decoders (see generate_llama) in the same external-data form, up to 1.5B
parameters; each runs the --runs recipe:target pairs and quantize_dynamic.

The CNN rows are VGG-19 (16 Conv + Relu, 5 MaxPool, 3 Gemm; 144 M parameters, 575 MB) and a quarter-width
VGG with 1024-wide classifier layers, with random weights stored inside the .onnx file (no external data),
calibrated on 4 random 224 x 224 images at the static batch size 1; each runs the --runs pairs (default: w8a8 and
outliertune on the qdq and ort-cpu targets).

    .venv/bin/python benchmarks/scale.py                     # sizes small, medium, 1.5b, vgg19
    .venv/bin/python benchmarks/scale.py --sizes small --skip-ort
    .venv/bin/python benchmarks/scale.py --sizes vgg19-small,vgg19
    .venv/bin/python benchmarks/scale.py --sizes llama-small,llama-1.5b --runs outliertune:qdq,w8a8:ort-cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import onnx_ir as ir

OUT = Path(__file__).resolve().parent / "out" / "scale"
ALIGN = 4096
VOCAB = 512
TOKENS = 16
SAMPLES = 4


@dataclasses.dataclass(frozen=True)
class Size:
    """A model size: hidden width and number of blocks."""

    name: str
    hidden: int
    blocks: int

    @property
    def params(self) -> int:
        """Parameters: embedding, 12 d² + LayerNorms and biases per block, final LayerNorm and lm head."""
        d = self.hidden
        block = 12 * d * d + 4 * d + 4 * d + d
        return VOCAB * d + self.blocks * block + 2 * d + d * VOCAB


SIZES = {
    "small": Size("small", 512, 4),
    "medium": Size("medium", 1024, 12),
    "large": Size("large", 1536, 16),
    "1.5b": Size("1.5b", 2048, 30),
}


@dataclasses.dataclass(frozen=True)
class LlamaSize:
    """A Llama-architecture decoder: widths, blocks, attention heads (grouped-query) and vocabulary."""

    name: str
    hidden: int
    intermediate: int
    blocks: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        """Embedding, per block q/k/v/o, gate/up/down and two RMSNorm weights, final RMSNorm and a separate lm head."""
        d, kv = self.hidden, self.kv_heads * self.head_dim
        block = 2 * d * d + 2 * d * kv + 3 * d * self.intermediate + 2 * d
        return 2 * self.vocab * d + self.blocks * block + d


LLAMA_SIZES = {
    "llama-small": LlamaSize("llama-small", 256, 688, 4, 4, 2, 512),
    "llama-medium": LlamaSize("llama-medium", 1024, 2816, 8, 16, 4, 8192),
    "llama-1.5b": LlamaSize("llama-1.5b", 2048, 5632, 32, 32, 4, 32000),
}
# Rotary tables and the causal mask cover this many positions (the calibration uses TOKENS of them).
MAX_POSITIONS = 256
RMS_EPSILON = 1e-5


VGG19_LAYERS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M")
IMAGE = 224
CLASSES = 1000
RUNS = (("w8a8", "qdq"), ("w8a8", "ort-cpu"), ("outliertune", "qdq"), ("outliertune", "ort-cpu"))


@dataclasses.dataclass(frozen=True)
class CnnSize:
    """A VGG-19 variant: channel width multiplier and classifier width."""

    name: str
    width: float
    classifier: int

    def channels(self) -> list[int | str]:
        """The feature layers: output channels of each 3x3 Conv, "M" for each 2x2 MaxPool."""
        return [item if item == "M" else int(int(item) * self.width) for item in VGG19_LAYERS]

    @property
    def params(self) -> int:
        """Conv weights and biases, then the three Gemm layers."""
        count, inputs = 0, 3
        for item in self.channels():
            if item != "M":
                count += int(item) * inputs * 9 + int(item)
                inputs = int(item)
        widths = [inputs * (IMAGE // 32) ** 2, self.classifier, self.classifier, CLASSES]
        return count + sum(a * b + b for a, b in itertools.pairwise(widths))


CNN_SIZES = {"vgg19-small": CnnSize("vgg19-small", 0.25, 1024), "vgg19": CnnSize("vgg19", 1.0, 4096)}


@dataclasses.dataclass
class Measurement:
    """One quantizer run: wall time, peak RSS, exit status and the last line of its error output."""

    seconds: float
    peak_rss: int
    returncode: int
    message: str


class ExternalWriter:
    """Appends tensors to one external data file at page-aligned offsets and returns their TensorProtos."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("wb")

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """Write ``array`` and return an initializer that points at it."""
        offset = self.file.tell()
        padding = -offset % ALIGN
        self.file.write(b"\0" * padding)
        offset += padding
        data = np.ascontiguousarray(array, dtype=np.float32)
        self.file.write(data.tobytes())
        tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=data.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(data.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        """Flush and close the data file."""
        self.file.close()


def generate(size: Size, folder: Path) -> Path:
    """Write the decoder model and its external data into ``folder`` (skipped if already there)."""
    model_path = folder / "model.onnx"
    if model_path.exists():
        return model_path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    d = size.hidden
    writer = ExternalWriter(folder / "model.onnx.data")
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, *shape: int, scale: float | None = None) -> str:
        std = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        initializers.append(writer.add(name, rng.standard_normal(shape, dtype=np.float32) * np.float32(std)))
        return name

    def layer_norm(name: str, x: str) -> str:
        gamma = (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        beta = (0.05 * rng.standard_normal(d)).astype(np.float32)
        gamma[:4], beta[:4] = 20.0, 30.0  # outlier channels, as trained transformers have
        initializers.extend([writer.add(f"{name}.gamma", gamma), writer.add(f"{name}.beta", beta)])
        nodes.append(oh.make_node("LayerNormalization", [x, f"{name}.gamma", f"{name}.beta"], [name], axis=-1))
        return name

    def matmul(name: str, x: str, rows: int, columns: int) -> str:
        nodes.append(oh.make_node("MatMul", [x, weight(f"{name}.weight", rows, columns)], [name], name=name))
        return name

    def add(name: str, x: str, y: str) -> str:
        nodes.append(oh.make_node("Add", [x, y], [name], name=name))
        return name

    initializers.append(writer.add("attention_scale", np.array(1.0 / np.sqrt(d), np.float32)))
    nodes.append(oh.make_node("Gather", [weight("embedding", VOCAB, d, scale=1.0), "input_ids"], ["h0"], axis=0))
    h = "h0"
    for b in range(size.blocks):
        p = f"block{b}"
        ln1 = layer_norm(f"{p}.ln1", h)
        q, k, v = (matmul(f"{p}.{n}_proj", ln1, d, d) for n in "qkv")
        nodes.append(oh.make_node("Transpose", [k], [f"{p}.kt"], perm=[0, 2, 1]))
        nodes.append(oh.make_node("MatMul", [q, f"{p}.kt"], [f"{p}.scores"]))
        nodes.append(oh.make_node("Mul", [f"{p}.scores", "attention_scale"], [f"{p}.scaled"]))
        nodes.append(oh.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], axis=-1))
        nodes.append(oh.make_node("MatMul", [f"{p}.probs", v], [f"{p}.context"]))
        h = add(f"{p}.res1", h, matmul(f"{p}.o_proj", f"{p}.context", d, d))
        ln2 = layer_norm(f"{p}.ln2", h)
        fc1 = add(f"{p}.fc1_bias", matmul(f"{p}.fc1", ln2, d, 4 * d), weight(f"{p}.fc1.bias", 4 * d, scale=0.02))
        nodes.append(oh.make_node("Relu", [fc1], [f"{p}.act"]))
        fc2 = add(f"{p}.fc2_bias", matmul(f"{p}.fc2", f"{p}.act", 4 * d, d), weight(f"{p}.fc2.bias", d, scale=0.02))
        h = add(f"{p}.res2", h, fc2)
    logits = matmul("lm_head", layer_norm("final_ln", h), d, VOCAB)
    writer.close()
    graph = oh.make_graph(
        nodes,
        f"decoder_{size.name}",
        [oh.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "tokens"])],
        [oh.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["batch", "tokens", VOCAB])],
        initializers,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    model_path.write_bytes(model.SerializeToString())
    np.savez(folder / "calib.npz", input_ids=rng.integers(0, VOCAB, (SAMPLES, TOKENS), dtype=np.int64))
    return model_path


def generate_llama(size: LlamaSize, folder: Path) -> Path:
    """Write the Llama-architecture decoder and its external data into ``folder`` (skipped if already there).

    Per block: decomposed RMSNorm (Pow, ReduceMean, Add, Sqrt, Div, Mul, Mul by its weight, as torch exports it),
    q/k/v projections, rotary embeddings on q and k, grouped-query attention (k/v heads repeated by Expand) with
    a causal mask, o projection, residual, RMSNorm, SwiGLU MLP (SiLU(gate)·up -> down), residual; then the final
    RMSNorm and a separate lm head.
    """
    model_path = folder / "model.onnx"
    if model_path.exists():
        return model_path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    d, hd, heads, kv = size.hidden, size.head_dim, size.heads, size.kv_heads
    writer = ExternalWriter(folder / "model.onnx.data")
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], output: str, **attributes: object) -> str:
        nodes.append(oh.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def constant(name: str, array: np.ndarray) -> str:
        initializers.append(onnx.numpy_helper.from_array(array, name))
        return name

    def weight(name: str, *shape: int, scale: float | None = None) -> str:
        std = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        initializers.append(writer.add(name, rng.standard_normal(shape, dtype=np.float32) * np.float32(std)))
        return name

    def rms_norm(name: str, x: str) -> str:
        gamma = (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        gamma[:4] = 20.0  # outlier channels, as trained LLMs have
        initializers.append(writer.add(f"{name}.weight", gamma))
        mean = node("ReduceMean", [node("Pow", [x, "two"], f"{name}.pow")], f"{name}.mean", axes=[-1])
        root = node("Sqrt", [node("Add", [mean, "epsilon"], f"{name}.add")], f"{name}.sqrt")
        normed = node("Mul", [x, node("Div", ["one_float", root], f"{name}.rsqrt")], f"{name}.normed")
        return node("Mul", [normed, f"{name}.weight"], name)

    def matmul(name: str, x: str, rows: int, columns: int) -> str:
        return node("MatMul", [x, weight(f"{name}.weight", rows, columns)], name)

    def heads_first(name: str, x: str, count: int) -> str:
        """[batch, tokens, count·hd] -> [batch, heads, tokens, hd], repeating k/v heads for grouped-query attention."""
        if count == heads:
            split = node("Reshape", [x, "heads_shape"], f"{name}.split")
        else:
            grouped = node("Reshape", [x, "kv_heads_shape"], f"{name}.grouped")
            repeated = node("Expand", [grouped, "kv_repeat"], f"{name}.repeated")
            split = node("Reshape", [repeated, "heads_shape"], f"{name}.split")
        return node("Transpose", [split], f"{name}.heads", perm=[0, 2, 1, 3])

    def rotary(name: str, x: str) -> str:
        first = node("Slice", [x, "zero", "half", "last_axis"], f"{name}.first")
        second = node("Slice", [x, "half", "head_dim", "last_axis"], f"{name}.second")
        rotated = node("Concat", [node("Neg", [second], f"{name}.neg"), first], f"{name}.rotated", axis=-1)
        cos = node("Mul", [x, "cos"], f"{name}.cos")
        return node("Add", [cos, node("Mul", [rotated, "sin"], f"{name}.sin")], f"{name}.rotary")

    _llama_constants(constant, size)
    tokens = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), "one_index"], "tokens")
    positions = node("Unsqueeze", [tokens, "zero"], "positions")
    node("Slice", ["cos_table", "zero", positions, "zero"], "cos")
    node("Slice", ["sin_table", "zero", positions, "zero"], "sin")
    rows = node("Slice", ["mask_table", "zero", positions, "zero"], "mask_rows")
    node("Slice", [rows, "zero", positions, "one"], "mask")
    h = node("Gather", [weight("embed_tokens", size.vocab, d, scale=1.0), "input_ids"], "h0", axis=0)
    for b in range(size.blocks):
        p = f"layers.{b}"
        x = rms_norm(f"{p}.input_layernorm", h)
        q = rotary(f"{p}.q", heads_first(f"{p}.q", matmul(f"{p}.self_attn.q_proj", x, d, d), heads))
        k = rotary(f"{p}.k", heads_first(f"{p}.k", matmul(f"{p}.self_attn.k_proj", x, d, kv * hd), kv))
        v = heads_first(f"{p}.v", matmul(f"{p}.self_attn.v_proj", x, d, kv * hd), kv)
        scores = node("MatMul", [q, node("Transpose", [k], f"{p}.kt", perm=[0, 1, 3, 2])], f"{p}.scores")
        scaled = node("Add", [node("Mul", [scores, "attention_scale"], f"{p}.scaled"), "mask"], f"{p}.masked")
        context = node("MatMul", [node("Softmax", [scaled], f"{p}.probs", axis=-1), v], f"{p}.context")
        merged = node(
            "Reshape", [node("Transpose", [context], f"{p}.ct", perm=[0, 2, 1, 3]), "merged_shape"], f"{p}.merged"
        )
        h = node("Add", [h, matmul(f"{p}.self_attn.o_proj", merged, d, d)], f"{p}.residual1")
        x = rms_norm(f"{p}.post_attention_layernorm", h)
        gate = matmul(f"{p}.mlp.gate_proj", x, d, size.intermediate)
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        up = node("Mul", [silu, matmul(f"{p}.mlp.up_proj", x, d, size.intermediate)], f"{p}.mlp.product")
        h = node("Add", [h, matmul(f"{p}.mlp.down_proj", up, size.intermediate, d)], f"{p}.residual2")
    logits = matmul("lm_head", rms_norm("norm", h), d, size.vocab)
    writer.close()
    graph = oh.make_graph(
        nodes,
        f"llama_{size.name}",
        [oh.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "tokens"])],
        [oh.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["batch", "tokens", size.vocab])],
        initializers,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    model_path.write_bytes(model.SerializeToString())
    np.savez(folder / "calib.npz", input_ids=rng.integers(0, size.vocab, (SAMPLES, TOKENS), dtype=np.int64))
    return model_path


def _llama_constants(constant: Callable[[str, np.ndarray], str], size: LlamaSize) -> None:
    """The small shared constants: shapes, axes, RMSNorm's scalars, rotary tables and the causal mask."""
    hd, group = size.head_dim, size.heads // size.kv_heads
    for name, values in (
        ("zero", [0]),
        ("one", [1]),
        ("last_axis", [-1]),
        ("half", [hd // 2]),
        ("head_dim", [hd]),
        ("heads_shape", [0, 0, size.heads, hd]),
        ("kv_heads_shape", [0, 0, size.kv_heads, 1, hd]),
        ("kv_repeat", [1, 1, 1, group, 1]),
        ("merged_shape", [0, 0, size.hidden]),
    ):
        constant(name, np.array(values, np.int64))
    constant("one_index", np.array(1, np.int64))
    constant("two", np.array(2.0, np.float32))
    constant("epsilon", np.array(RMS_EPSILON, np.float32))
    constant("one_float", np.array(1.0, np.float32))
    constant("attention_scale", np.array(1.0 / np.sqrt(hd), np.float32))
    inverse = 1.0 / 10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.outer(np.arange(MAX_POSITIONS), inverse)
    constant("cos_table", np.cos(np.concatenate([angles, angles], axis=1)).astype(np.float32))
    constant("sin_table", np.sin(np.concatenate([angles, angles], axis=1)).astype(np.float32))
    constant("mask_table", np.triu(np.full((MAX_POSITIONS, MAX_POSITIONS), -1e9, np.float32), k=1))


def generate_cnn(size: CnnSize, folder: Path) -> Path:
    """Write the VGG model, every weight inside the .onnx file, and 4 calibration images into ``folder``."""
    model_path = folder / "model.onnx"
    if model_path.exists():
        return model_path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = ir.val("image", ir.DataType.FLOAT, [1, 3, IMAGE, IMAGE])
    nodes: list[ir.Node] = []
    initializers: list[ir.Value] = []

    def constant(name: str, array: np.ndarray) -> ir.Value:
        initializers.append(ir.val(name, const_value=ir.tensor(array, name=name)))
        return initializers[-1]

    def layer(op: str, x: ir.Value, name: str, weight: np.ndarray, **attributes: object) -> ir.Value:
        bias = (0.01 * rng.standard_normal(weight.shape[0])).astype(np.float32)
        inputs = [x, constant(f"{name}.weight", weight), constant(f"{name}.bias", bias)]
        nodes.append(ir.node(op, inputs, attributes, name=name))
        return nodes[-1].outputs[0]

    def relu(x: ir.Value, name: str) -> ir.Value:
        nodes.append(ir.node("Relu", [x], name=name))
        return nodes[-1].outputs[0]

    def he(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))

    x, inputs = image, 3
    for index, item in enumerate(size.channels()):
        if item == "M":
            nodes.append(ir.node("MaxPool", [x], {"kernel_shape": [2, 2], "strides": [2, 2]}, name=f"pool{index}"))
            x = nodes[-1].outputs[0]
            continue
        conv = layer("Conv", x, f"conv{index}", he(int(item), inputs, 3, 3), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        x, inputs = relu(conv, f"relu{index}"), int(item)
    nodes.append(ir.node("Flatten", [x], {"axis": 1}, name="flatten"))
    x = nodes[-1].outputs[0]
    widths = [inputs * (IMAGE // 32) ** 2, size.classifier, size.classifier, CLASSES]
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        x = layer("Gemm", x, f"fc{index}", he(fan_out, fan_in), transB=1)
        x = relu(x, f"fc{index}_relu") if index < 2 else x
    x.name, x.dtype, x.shape = "logits", ir.DataType.FLOAT, ir.Shape([1, CLASSES])
    graph = ir.Graph([image], [x], nodes=nodes, initializers=initializers, opset_imports={"": 17}, name=size.name)
    ir.save(ir.Model(graph, ir_version=8), model_path)
    images = rng.standard_normal((SAMPLES, 3, IMAGE, IMAGE), dtype=np.float32)
    np.savez(folder / "calib.npz", image=images)
    return model_path


def measure(command: list[str], memory_limit: int) -> Measurement:
    """Run a command, returning its wall time and peak RSS (ru_maxrss of exactly that child).

    A child whose RSS passes ``memory_limit`` bytes is stopped, so that one run cannot exhaust a shared machine.
    """
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    stopped = False
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if not stopped and resident_bytes(process.pid) > memory_limit:
            process.kill()
            stopped = True
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in stderr.splitlines() if line.strip()]
    message = f"stopped at the {gib(memory_limit)} GiB memory limit" if stopped else (lines[-1] if lines else "")
    return Measurement(seconds, usage.ru_maxrss * 1024, process.returncode, message)


def resident_bytes(pid: int) -> int:
    """A running process's current RSS (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def graphquant_command(model: Path, output: Path, recipe: str = "outliertune", target: str = "qdq") -> list[str]:
    """The CLI run of a recipe on the generated calibration data."""
    calib = model.parent / "calib.npz"
    cli = [sys.executable, "-m", "graphquant.cli", "optimize", str(model), "-o", str(output)]
    return [*cli, "--recipe", recipe, "--target", target, "--calib", str(calib)]


ORT_DYNAMIC = """
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8, per_channel=True,
                 use_external_data_format=True)
"""


def weight_bytes(size: Size) -> int:
    """Bytes of the float32 weights."""
    return 4 * size.params


def gib(count: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{count / 2**30:.2f}"


def row(size: Size, graphquant: Measurement, ort: Measurement | None) -> str:
    """One markdown table row."""
    weights = weight_bytes(size)
    cells = [
        f"{size.params / 1e6:,.0f} M",
        gib(weights),
        _result(graphquant),
        gib(graphquant.peak_rss),
        f"{graphquant.peak_rss / weights:.2f}",
    ]
    if ort is None:
        cells += ["not run", ""]
    else:
        cells += [_result(ort), f"{gib(ort.peak_rss)} ({ort.peak_rss / weights:.2f}x)"]
    return "| " + " | ".join(cells) + " |"


def _result(measurement: Measurement) -> str:
    """Seconds, or the failure message."""
    if measurement.returncode == 0:
        return f"{measurement.seconds:.0f} s"
    return f"failed after {measurement.seconds:.0f} s: {measurement.message[:120]}"


def recipe_rows(
    size: CnnSize | LlamaSize, generator: Callable[..., Path], runs: list[tuple[str, str]], options: RunOptions
) -> None:
    """Run each recipe and target on one generated model (then ORT's quantize_dynamic), printing a row for each."""
    folder = OUT / size.name
    free = shutil.disk_usage(OUT.parent if OUT.parent.exists() else Path(__file__).parent).free
    weights = 4 * size.params
    if free < 3 * weights:
        print(f"| {size.name}: skipped, {gib(free)} GiB free disk < 3x the weights |", flush=True)
        return
    # In a fresh process: Linux carries a parent's peak RSS over fork and exec into its children's ru_maxrss.
    process = multiprocessing.get_context("spawn").Process(target=generator, args=(size, folder))
    process.start()
    process.join()
    model = folder / "model.onnx"
    commands = [
        (recipe, target, graphquant_command(model, folder / f"{recipe}-{target}" / "model.onnx", recipe, target))
        for recipe, target in runs
    ]
    if options.ort:
        ort_output = folder / "ort-dynamic" / "model.onnx"
        commands.append(("ORT quantize_dynamic", "", [sys.executable, "-c", ORT_DYNAMIC, str(model), str(ort_output)]))
    for recipe, target, command in commands:
        output = Path(command[command.index("-o") + 1] if target else command[-1]).parent
        output.mkdir(exist_ok=True)
        run = measure(command, options.memory_limit)
        cells = [size.name, f"{size.params / 1e6:,.0f} M", gib(weights), recipe, target, _result(run)]
        cells += [gib(run.peak_rss), f"{run.peak_rss / weights:.2f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
        if not options.keep:
            shutil.rmtree(output)
    if not options.keep:
        shutil.rmtree(folder)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What every row shares: the memory limit, whether to keep the files and whether to run ORT's quantizer."""

    memory_limit: int
    keep: bool
    ort: bool


def main() -> None:
    """Generate, run and tabulate every requested size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = sorted(SIZES) + sorted(LLAMA_SIZES) + sorted(CNN_SIZES)
    parser.add_argument("--sizes", default="small,medium,1.5b,vgg19", help=f"comma-separated, from {names}")
    default_runs = ",".join(f"{recipe}:{target}" for recipe, target in RUNS)
    parser.add_argument("--runs", default=default_runs, help="recipe:target pairs of the Llama and CNN rows")
    parser.add_argument("--skip-ort", action="store_true", help="skip onnxruntime's quantize_dynamic")
    parser.add_argument("--keep", action="store_true", help="keep the generated models and outputs")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    parser.add_argument(
        "--memory-limit-gib", type=float, default=0.6 * total / 2**30, help="stop a run above this RSS (default 60%%)"
    )
    args = parser.parse_args()
    requested = args.sizes.split(",")
    unknown = sorted(set(requested) - set(names))
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {names}")
    runs = [tuple(pair.split(":", 1)) for pair in args.runs.split(",")]
    if any(len(pair) != 2 for pair in runs):
        parser.error(f"--runs takes recipe:target pairs, got {args.runs!r}")
    limit = int(args.memory_limit_gib * 2**30)
    decoders = [SIZES[name] for name in requested if name in SIZES]
    if decoders:
        decoder_rows(decoders, limit, args.skip_ort, args.keep)
    others = [(LLAMA_SIZES[n], generate_llama) for n in requested if n in LLAMA_SIZES]
    others += [(CNN_SIZES[n], generate_cnn) for n in requested if n in CNN_SIZES]
    if others:
        columns = ["model", "params", "fp32 weights GiB", "recipe", "target", "time", "peak RSS GiB", "RSS / weights"]
        print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|", flush=True)
    for size, generator in others:
        # onnxruntime's quantize_dynamic runs beside graphquant on the Llama rows only.
        ort = isinstance(size, LlamaSize) and not args.skip_ort
        recipe_rows(size, generator, runs, RunOptions(limit, args.keep, ort))


def decoder_rows(sizes: list[Size], limit: int, skip_ort: bool, keep: bool) -> None:
    """The decoder table: graphquant outliertune and onnxruntime's quantize_dynamic on each size."""
    columns = ["params", "fp32 weights GiB", "graphquant outliertune", "peak RSS GiB", "RSS / weights"]
    columns += ["ORT quantize_dynamic", "ORT peak RSS GiB"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|", flush=True)
    for size in sizes:
        folder = OUT / size.name
        free = shutil.disk_usage(OUT.parent if OUT.parent.exists() else Path(__file__).parent).free
        if free < 4 * weight_bytes(size):
            print(f"| {size.name}: skipped, {gib(free)} GiB free disk < 4x the weights |", flush=True)
            continue
        model = generate(size, folder)
        output = folder / "outliertune"
        output.mkdir(exist_ok=True)
        graphquant = measure(graphquant_command(model, output / "model.onnx"), limit)
        ort = None
        if not skip_ort:
            (folder / "ort").mkdir(exist_ok=True)
            ort = measure([sys.executable, "-c", ORT_DYNAMIC, str(model), str(folder / "ort" / "model.onnx")], limit)
        print(row(size, graphquant, ort), flush=True)
        if not keep:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
