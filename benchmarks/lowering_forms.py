"""Micro-benchmark: the candidate ONNX forms of one quantized linear layer on onnxruntime CPU.

Justifies the form graphquant's ``ort-cpu`` target emits for a layer with a static per-tensor activation scale
and per-output-channel int8 weights: ``com.microsoft.MatMulIntegerToFloat`` fed by a uint8 QuantizeLinear with
zero point 128, bias fused in. Every candidate is built with ``onnx.helper`` (opset 21, plus ``com.microsoft``
opset 1 where needed) for two MiniLM-like layer shapes, checked against the float layer (output SQNR), and timed
in one interleaved round-robin run on onnxruntime CPU (2 intra-op threads, ``ORT_ENABLE_ALL``).

Self-contained (numpy, onnx, onnxruntime only) and offline: the data is random with a fixed seed.

    .venv/bin/python benchmarks/lowering_forms.py --quick   # 3 rounds x 10 runs per form, a few seconds
    .venv/bin/python benchmarks/lowering_forms.py           # 15 rounds x 50 runs per form, about 30 s on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from minilm_common import time_runs
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out"
INTRA_OP_THREADS = 2
OPSET = 21
MICROSOFT = "com.microsoft"
IR_VERSION = 10  # what opset 21 needs; old enough for any onnxruntime that runs opset 21
SEED = 0
BATCH, SEQ_LEN = 8, 128
# The graph input is declared [batch, seq, K] with symbolic leading dims, as in the MiniLM export. With --static-shapes
# it is [8, 128, K]; onnxruntime then rewrites the 3-D MatMul to Reshape + Gemm, which changes what it fuses.
SYMBOLIC_DIMS: tuple[int | str, ...] = ("batch", "seq")
# (name, K, N): the activation is [BATCH, SEQ_LEN, K], the weight [K, N].
SHAPES = [("fc1-like", 384, 1536), ("fc2-like", 1536, 384)]
UINT8_OFFSET = 128
WARMUP_RUNS = 5
# A few activation channels much larger than the rest, as in transformer LayerNorm outputs.
OUTLIER_CHANNELS, OUTLIER_GAIN = 4, 8.0


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class Layer:
    """One float linear layer and its data, with the calibrated quantization parameters every form shares."""

    name: str
    x: np.ndarray  # [B, S, K] float32
    w: np.ndarray  # [K, N] float32
    b: np.ndarray  # [N] float32
    a_scale: np.float32  # per-tensor activation step, max|X| / 127
    w_codes: np.ndarray  # [K, N] int8, symmetric per column
    w_scale: np.ndarray  # [N] float32
    leading_dims: tuple[int | str, ...] = SYMBOLIC_DIMS  # the graph input's declared [batch, seq]

    @property
    def k(self) -> int:
        return self.w.shape[0]

    @property
    def n(self) -> int:
        return self.w.shape[1]


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes in [-127, 127] per output column, and the [N] scales."""
    scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return codes, scale


def make_layer(name: str, k: int, n: int, rng: np.random.Generator, static_shapes: bool = False) -> Layer:
    """Seeded random layer. fc1-like input: normal with a few outlier channels (LayerNorm output);
    fc2-like input: GELU of a normal (MLP hidden state). Weights normal with per-column spread."""
    pre = rng.standard_normal((BATCH, SEQ_LEN, k)).astype(np.float32)
    if name.startswith("fc2"):
        x = 0.5 * pre * (1.0 + np.tanh(0.7978845608 * (pre + 0.044715 * pre**3)))  # tanh GELU
    else:
        gains = np.ones(k, np.float32)
        gains[rng.choice(k, OUTLIER_CHANNELS, replace=False)] = OUTLIER_GAIN
        x = pre * gains
    x = x.astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.02 * rng.uniform(0.5, 2.0, size=n)).astype(np.float32)
    b = (rng.standard_normal(n) * 0.02).astype(np.float32)
    a_scale = np.float32(np.abs(x).max() / 127.0)
    w_codes, w_scale = quantize_columns(w)
    dims = (BATCH, SEQ_LEN) if static_shapes else SYMBOLIC_DIMS
    return Layer(name, x, w, b, a_scale, w_codes, w_scale, dims)


# ----------------------------------------------------------------------------------------------------------------
# Graph building


def f32(value: float | np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def u8(value: int | np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=np.uint8)


def i8(value: int | np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=np.int8)


def build_model(layer: Layer, nodes: list[onnx.NodeProto], initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Graph X [B, S, K] float -> Y [B, S, N] float from nodes and named numpy initializers."""
    graph = helper.make_graph(
        nodes,
        f"{layer.name}_linear",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [*layer.leading_dims, layer.k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*layer.leading_dims, layer.n])],
        [numpy_helper.from_array(array, name) for name, array in initializers.items()],
    )
    opsets = [helper.make_opsetid("", OPSET)]
    if any(node.domain == MICROSOFT for node in nodes):
        opsets.append(helper.make_opsetid(MICROSOFT, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="graphquant-lowering-forms")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def quantize_u8(source: str = "X", scale: str = "a_scale") -> onnx.NodeProto:
    """QuantizeLinear of `source` to uint8 with zero point 128 (the int8 grid moved up by 128)."""
    return helper.make_node("QuantizeLinear", [source, scale, "a_zp_u8"], ["Xq"])


@dataclasses.dataclass
class Built:
    """A form's model, the activation it is fed (usually the layer's own X) and a note for the table."""

    model: onnx.ModelProto
    x: np.ndarray
    note: str = ""


def form_float(layer: Layer) -> Built:
    nodes = [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])]
    return Built(build_model(layer, nodes, {"W": layer.w, "B": layer.b}), layer.x)


def form_dynamic(layer: Layer) -> Built:
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["X", "Wq", "w_scale", "", "B"], ["Y"], domain=MICROSOFT)]
    inits = {"Wq": layer.w_codes, "w_scale": layer.w_scale, "B": layer.b}
    return Built(build_model(layer, nodes, inits), layer.x)


def _form_qdq(layer: Layer, unsigned: bool) -> Built:
    zero_point = u8(UINT8_OFFSET) if unsigned else i8(0)
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "a_scale", "a_zp"], ["Xq"]),
        helper.make_node("DequantizeLinear", ["Xq", "a_scale", "a_zp"], ["Xdq"]),
        helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zp"], ["Wdq"], axis=1),
        helper.make_node("MatMul", ["Xdq", "Wdq"], ["XW"]),
        helper.make_node("Add", ["XW", "B"], ["Y"]),
    ]
    inits = {
        "a_scale": f32(layer.a_scale),
        "a_zp": zero_point,
        "Wq": layer.w_codes,
        "w_scale": layer.w_scale,
        "w_zp": np.zeros(layer.n, np.int8),
        "B": layer.b,
    }
    return Built(build_model(layer, nodes, inits), layer.x)


def form_qdq_s8s8(layer: Layer) -> Built:
    return _form_qdq(layer, unsigned=False)


def form_qdq_u8s8(layer: Layer) -> Built:
    return _form_qdq(layer, unsigned=True)


def form_matmulinteger(layer: Layer) -> Built:
    nodes = [
        quantize_u8(),
        helper.make_node("MatMulInteger", ["Xq", "Wq", "a_zp_u8"], ["XWi"]),
        helper.make_node("Cast", ["XWi"], ["XWf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["XWf", "out_scale"], ["XW"]),
        helper.make_node("Add", ["XW", "B"], ["Y"]),
    ]
    inits = {
        "a_scale": f32(layer.a_scale),
        "a_zp_u8": u8(UINT8_OFFSET),
        "Wq": layer.w_codes,
        "out_scale": f32(layer.a_scale * layer.w_scale),
        "B": layer.b,
    }
    return Built(build_model(layer, nodes, inits), layer.x)


def _matmulintegertofloat(layer: Layer, w_codes: np.ndarray, w_scale: np.ndarray, a_scale: float) -> onnx.ModelProto:
    nodes = [
        quantize_u8(),
        helper.make_node(
            "MatMulIntegerToFloat",
            ["Xq", "Wq", "a_scale", "w_scale", "a_zp_u8", "", "B"],
            ["Y"],
            domain=MICROSOFT,
        ),
    ]
    inits = {"a_scale": f32(a_scale), "a_zp_u8": u8(UINT8_OFFSET), "Wq": w_codes, "w_scale": w_scale, "B": layer.b}
    return build_model(layer, nodes, inits)


def form_matmulintegertofloat(layer: Layer) -> Built:
    return Built(_matmulintegertofloat(layer, layer.w_codes, layer.w_scale, float(layer.a_scale)), layer.x)


def _qlinear_model(layer: Layer, per_column: bool) -> onnx.ModelProto:
    if per_column:
        w_codes, w_scale, w_zp = layer.w_codes, layer.w_scale, np.zeros(layer.n, np.int8)
    else:
        w_scale = f32(np.abs(layer.w).max() / 127.0)
        w_codes = np.clip(np.rint(layer.w / w_scale), -127, 127).astype(np.int8)
        w_zp = i8(0)
    y_scale = f32(np.abs(layer.x @ layer.w).max() / 127.0)  # calibrated on the float MatMul output (no bias)
    nodes = [
        quantize_u8(),
        helper.make_node(
            "QLinearMatMul", ["Xq", "a_scale", "a_zp_u8", "Wq", "w_scale", "w_zp", "y_scale", "y_zp"], ["XWq"]
        ),
        helper.make_node("DequantizeLinear", ["XWq", "y_scale", "y_zp"], ["XW"]),
        helper.make_node("Add", ["XW", "B"], ["Y"]),
    ]
    inits = {
        "a_scale": f32(layer.a_scale),
        "a_zp_u8": u8(UINT8_OFFSET),
        "Wq": w_codes,
        "w_scale": w_scale,
        "w_zp": w_zp,
        "y_scale": y_scale,
        "y_zp": u8(UINT8_OFFSET),
        "B": layer.b,
    }
    return build_model(layer, nodes, inits)


def form_qlinearmatmul(layer: Layer) -> Built:
    """Per-column b_scale if onnxruntime takes it, else per-tensor weights (said in the note)."""
    model = _qlinear_model(layer, per_column=True)
    try:
        session = make_session(model)
        session.run(None, {"X": layer.x})
        return Built(model, layer.x, "per-column b_scale")
    except Exception as error:  # noqa: BLE001  (any onnxruntime refusal means: fall back)
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        log(f"  QLinearMatMul with per-column b_scale refused ({reason}); falling back to per-tensor")
        return Built(_qlinear_model(layer, per_column=False), layer.x, "per-tensor b_scale (per-column refused)")


def form_scale_one(layer: Layer) -> Built:
    """X arrives divided by its per-channel step (a LayerNormalization holding gamma/Δ, beta/Δ), so
    QuantizeLinear has scale 1; the steps are folded into the weight rows, W' = diag(Δ) W, quantized per column."""
    step = (np.abs(layer.x).reshape(-1, layer.k).max(axis=0) / 127.0).astype(np.float32)
    step = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)
    x_scaled = (layer.x / step).astype(np.float32)
    w_codes, w_scale = quantize_columns((layer.w * step[:, None]).astype(np.float32))
    return Built(_matmulintegertofloat(layer, w_codes, w_scale, 1.0), x_scaled, "input = X / per-channel Δ")


FLOAT = "1. float MatMul + Add"
DYNAMIC = "2. DynamicQuantizeMatMul (quantize_dynamic)"
FORMS: list[tuple[str, Callable[[Layer], Built]]] = [
    (FLOAT, form_float),
    (DYNAMIC, form_dynamic),
    ("3. QDQ S8S8 (graphquant qdq)", form_qdq_s8s8),
    ("4. QDQ U8S8 (act. zp 128)", form_qdq_u8s8),
    ("5. MatMulInteger + Cast + Mul + Add", form_matmulinteger),
    ("6. MatMulIntegerToFloat (graphquant ort-cpu)", form_matmulintegertofloat),
    ("7. Q + QLinearMatMul + DQ + Add", form_qlinearmatmul),
    ("8. Q(scale 1) + MatMulIntegerToFloat", form_scale_one),
]


# ----------------------------------------------------------------------------------------------------------------
# onnxruntime


def session_options(threads: int = INTRA_OP_THREADS) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def make_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session with 2 intra-op threads, one inter-op thread and ORT_ENABLE_ALL."""
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=session_options(), providers=["CPUExecutionProvider"]
    )


def optimized_ops(model: onnx.ModelProto, directory: str, name: str) -> str:
    """The ops left after onnxruntime's ORT_ENABLE_ALL graph optimizations (from a separate, untimed session)."""
    path = os.path.join(directory, f"{name}.onnx")
    options = session_options()
    options.optimized_model_filepath = path
    try:
        ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
        counts = collections.Counter(node.op_type for node in onnx.load(path, load_external_data=False).graph.node)
    except Exception as error:  # noqa: BLE001
        return f"? ({type(error).__name__})"
    return " + ".join(op if count == 1 else f"{count}x {op}" for op, count in counts.items())


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float:
    """10 log10(|reference|^2 / |reference - output|^2), in float64."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - output.astype(np.float64)) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(float(np.sum(ref**2)) / noise)


@dataclasses.dataclass
class Row:
    label: str
    session: ort.InferenceSession | None = None
    feed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    note: str = ""
    ops: str = ""
    sqnr: float = float("nan")
    ms: float = float("nan")
    error: str | None = None
    samples: list[float] = dataclasses.field(default_factory=list)


def prepare(layer: Layer, directory: str) -> list[Row]:
    """Build every form, open its session, check it against the float layer."""
    rows = []
    reference = None
    for label, builder in FORMS:
        row = Row(label)
        try:
            built = builder(layer)
            row.note = built.note
            row.ops = optimized_ops(built.model, directory, f"{layer.name}_{len(rows)}")
            row.session = make_session(built.model)
            row.feed = {"X": built.x}
            (output,) = row.session.run(None, row.feed)
            if reference is None:  # the float form comes first
                reference = output
            row.sqnr = sqnr_db(reference, output)
        except Exception as error:  # noqa: BLE001  (a form onnxruntime refuses is reported, not fatal)
            text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            row.error = f"{type(error).__name__}: {text}".replace("|", "\\|")
            row.session = None
        log(f"  {label}: " + (row.error or f"SQNR {row.sqnr:.1f} dB; ops: {row.ops}"))
        rows.append(row)
    return rows


def time_round_robin(rows: list[Row], rounds: int, repeats: int) -> None:
    """Warm every session, then `rounds` rounds of `repeats` runs of each form in turn (order rotates)."""
    live = [row for row in rows if row.session is not None]
    for row in live:
        time_runs(row.session, row.feed, WARMUP_RUNS)
    for round_index in range(rounds):
        shift = round_index % len(live)
        for row in live[shift:] + live[:shift]:
            row.samples.extend(time_runs(row.session, row.feed, repeats))
        log(f"  round {round_index + 1}/{rounds} done")
    for row in live:
        row.ms = statistics.median(row.samples)


# ----------------------------------------------------------------------------------------------------------------
# Report


def table(layer: Layer, rows: list[Row]) -> str:
    by_label = {row.label: row for row in rows}
    float_ms, dynamic_ms = by_label[FLOAT].ms, by_label[DYNAMIC].ms
    lines = [
        f"### {layer.name}: X [{BATCH}, {SEQ_LEN}, {layer.k}] x W [{layer.k}, {layer.n}] + bias [{layer.n}]",
        "",
        "| form | ms | p25-p75 ms | speed vs float | speed vs dynamic | output SQNR dB "
        "| ops after ORT optimization | note |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.label} | n/a | | | | | | {row.error} |")
            continue
        sqnr = "exact" if row.sqnr == float("inf") else f"{row.sqnr:.1f}"
        p25, _, p75 = statistics.quantiles(row.samples, n=4) if len(row.samples) > 1 else (row.ms,) * 3
        lines.append(
            f"| {row.label} | {row.ms:.2f} | {p25:.2f}-{p75:.2f} | {float_ms / row.ms:.2f}x "
            f"| {dynamic_ms / row.ms:.2f}x | {sqnr} | {row.ops} | {row.note} |"
        )
    timed = [row for row in rows if row.error is None]
    fastest = min(timed, key=lambda row: row.ms)
    lines += ["", f"Fastest: **{fastest.label}** ({fastest.ms:.2f} ms).", ""]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, where there is one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds x 10 runs per form instead of 15 x 50")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (overrides --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per form per round (overrides --quick)")
    parser.add_argument(
        "--static-shapes",
        action="store_true",
        help="declare the input [8, 128, K] instead of [batch, seq, K] (onnxruntime then rewrites MatMul to Gemm)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for lowering_forms.md")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    repeats = args.repeats or (10 if args.quick else 50)

    started = time.perf_counter()
    load_before = os.getloadavg()
    rng = np.random.default_rng(SEED)
    sections = []
    with tempfile.TemporaryDirectory() as directory:
        for name, k, n in SHAPES:
            layer = make_layer(name, k, n, rng, args.static_shapes)
            log(f"{name}: building and checking {len(FORMS)} forms")
            rows = prepare(layer, directory)
            log(f"{name}: timing, {WARMUP_RUNS} warm-up runs then {rounds} rounds x {repeats} runs per form")
            time_round_robin(rows, rounds, repeats)
            sections.append(table(layer, rows))
            for row in rows:
                row.session = None  # free the sessions before the next shape
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - started

    static = f"[{BATCH}, {SEQ_LEN}, K] (static)"
    input_shape = static if args.static_shapes else "[batch, seq, K] (symbolic, as in MiniLM)"
    header = [
        "## Lowering forms of one quantized linear layer",
        "",
        f"onnxruntime {ort.__version__} (CPUExecutionProvider, {INTRA_OP_THREADS} intra-op threads, ORT_ENABLE_ALL); "
        f"onnx {onnx.__version__}, numpy {np.__version__}; {os.cpu_count()} CPU threads "
        f"({platform.machine()}, {cpu_model()}).",
        f"Graph input declared {input_shape}; the data is [{BATCH}, {SEQ_LEN}, K].",
        "Activation scale per tensor, max|X|/127 from the data; int8 weights symmetric per output column; "
        f"seed {SEED}. Median of {rounds} rounds x {repeats} runs per form, interleaved round-robin after "
        f"{WARMUP_RUNS} warm-up runs. "
        "Speed columns: times faster than that form (higher is better). SQNR of each output against form 1's output. "
        "Ops: what onnxruntime runs after its graph optimizations (from a separate session that saved its model).",
        "The load average includes this benchmark's own 2 threads: only the value at start measures other load. "
        f"Load average (1/5/15 min) at start {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"at end {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; total run time {elapsed:.0f} s.",
        "",
    ]
    text = "\n".join(header + sections)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowering_forms.md").write_text(text + "\n")
    log(f"wrote {args.out / 'lowering_forms.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
