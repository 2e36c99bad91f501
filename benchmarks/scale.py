"""Scale benchmark: time and peak RSS of `graphquant optimize` against model size, decoders and an in-memory CNN.

Generates decoder-style models (token Gather, N blocks of LayerNorm -> Q/K/V MatMul -> single-head attention ->
O MatMul -> residual -> LayerNorm -> fc1 -> Relu -> fc2 -> residual, final LayerNorm and lm head) with every weight
in one page-aligned external data file, written tensor by tensor so generation itself needs little memory. Each
quantizer runs in its own subprocess, whose peak RSS comes from os.wait4. onnxruntime's quantize_dynamic runs on
the same files as the incumbent (it needs no calibration data; its failures are reported, not hidden).

The CNN rows are VGG-19 (16 Conv + Relu, 5 MaxPool, 3 Gemm; 144 M parameters, 575 MB) and a quarter-width
VGG with 1024-wide classifier layers, with random weights stored inside the .onnx file (no external data),
calibrated on 4 random 224 x 224 images at the static batch size 1; each runs w8a8 and outliertune on the qdq and
ort-cpu targets.

    .venv/bin/python benchmarks/scale.py                     # sizes small, medium, 1.5b, vgg19
    .venv/bin/python benchmarks/scale.py --sizes small --skip-ort
    .venv/bin/python benchmarks/scale.py --sizes vgg19-small,vgg19
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
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
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


VGG19_LAYERS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M")
IMAGE = 224
CLASSES = 1000
CNN_RUNS = (("w8a8", "qdq"), ("w8a8", "ort-cpu"), ("outliertune", "qdq"), ("outliertune", "ort-cpu"))


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


def cnn_rows(size: CnnSize, memory_limit: int, keep: bool) -> None:
    """Run every recipe and target of CNN_RUNS on one generated CNN, printing a row for each."""
    folder = OUT / size.name
    # In a fresh process: Linux carries a parent's peak RSS over fork and exec into its children's ru_maxrss.
    generator = multiprocessing.get_context("spawn").Process(target=generate_cnn, args=(size, folder))
    generator.start()
    generator.join()
    model = folder / "model.onnx"
    weights = 4 * size.params
    for recipe, target in CNN_RUNS:
        output = folder / f"{recipe}-{target}"
        output.mkdir(exist_ok=True)
        run = measure(graphquant_command(model, output / "model.onnx", recipe, target), memory_limit)
        cells = [size.name, f"{size.params / 1e6:,.0f} M", gib(weights), recipe, target, _result(run)]
        cells += [gib(run.peak_rss), f"{run.peak_rss / weights:.2f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    if not keep:
        shutil.rmtree(folder)


def main() -> None:
    """Generate, run and tabulate every requested size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = sorted(SIZES) + sorted(CNN_SIZES)
    parser.add_argument("--sizes", default="small,medium,1.5b,vgg19", help=f"comma-separated, from {names}")
    parser.add_argument("--skip-ort", action="store_true", help="skip onnxruntime's quantize_dynamic")
    parser.add_argument("--keep", action="store_true", help="keep the generated models and outputs")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    parser.add_argument(
        "--memory-limit-gib", type=float, default=0.6 * total / 2**30, help="stop a run above this RSS (default 60%%)"
    )
    args = parser.parse_args()
    requested = args.sizes.split(",")
    unknown = sorted(set(requested) - set(SIZES) - set(CNN_SIZES))
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {names}")
    limit = int(args.memory_limit_gib * 2**30)
    decoders = [SIZES[name] for name in requested if name in SIZES]
    if decoders:
        decoder_rows(decoders, limit, args.skip_ort, args.keep)
    cnns = [CNN_SIZES[name] for name in requested if name in CNN_SIZES]
    if cnns:
        columns = ["model", "params", "fp32 weights GiB", "recipe", "target", "graphquant", "peak RSS GiB"]
        columns.append("RSS / weights")
        print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|", flush=True)
        for size in cnns:
            cnn_rows(size, limit, args.keep)


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
