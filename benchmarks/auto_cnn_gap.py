"""Why an auto pick on EfficientNet-Lite2 misses its budget on unseen images: per-image errors and rebuilt ranges.

Reads a model and its report built by benchmarks/auto_cnn.py (--out), and prints 1 - cosine of its logits against
FP32's on: the search's held-out share (recipes.auto.split_data of the calibration batches), the calibration share,
and the benchmark's held-out images; then per source image and per held-out batch, and the search's acceptance rule
(recipes.auto.Judge: the error and its bound) on its held-out share and on the benchmark's images. --rebuild also
rebuilds the same per-layer choice with the activation ranges calibrated on the calibration share alone (as the
search did) and on it plus the benchmark's images, and measures each: if the error falls to the search's estimate
when the ranges have seen those images, the gap is the ranges, not the images' difficulty. --nearest rebuilds it on
the calibration share with the weights rounded to nearest instead of by GPTQ (the size objective's rounding).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/auto_cnn_gap.py [--label default] [--rebuild] [--nearest]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import auto_cnn
import mobile_cnn as cnn
from table_rows import log, slug


def error(reference: np.ndarray, produced: np.ndarray) -> float:
    """1 - cosine of two flattened logit arrays."""
    a, b = reference.astype(np.float64).ravel(), produced.astype(np.float64).ravel()
    return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def batch_logits(path: Path, feeds: Sequence[cnn.Feed]) -> list[np.ndarray]:
    """The model's logits per feed, from one session."""
    session = cnn.make_session(path)
    return [session.run(None, feed)[0] for feed in feeds]


def per_image(names: Sequence[str], reference: np.ndarray, produced: np.ndarray) -> str:
    """Each image's error over its crops (the image sets are CROPS x 2 crops per file, in order)."""
    count = 2 * len(cnn.CROPS)
    return ", ".join(
        f"{name} {error(reference[i * count : (i + 1) * count], produced[i * count : (i + 1) * count]):.5f}"
        for i, name in enumerate(names)
    )


def rebuilt(fp32: Path, report: dict, options: dict, feeds: list[cnn.Feed], path: Path) -> Path:
    """The report's per-layer choice rebuilt from FP32 with its ranges calibrated on ``feeds``, saved to ``path``."""
    import onnx_ir as ir

    import graphquant
    from graphquant.analysis.search import Option, Unit
    from graphquant.analysis.stats_cache import CachingCalibrator
    from graphquant.api import _prepare
    from graphquant.recipes import Recipe, auto

    search = report["auto"]
    units = [
        Unit(entry["unit"], tuple(Option(s, o["error"], o["cost"], o["bytes"]) for s, o in entry["options"].items()))
        for entry in search["layers"]
    ]
    choice = {entry["unit"]: list(entry["options"]).index(entry["scheme"]) for entry in search["layers"]}
    settings = auto.Settings(**options)
    model = graphquant.load(fp32)
    calibrator = CachingCalibrator.for_model(model, feeds, False)
    base = model.clone()
    _prepare(base)
    Recipe("auto", auto.METHODS[search["method"]], target=settings.target).to_pipeline(calibrator, lower=False)(base)
    _, candidate = auto._build(base, calibrator, settings, search["method"], units, choice)
    ir.save(candidate, path)
    return path


def acceptance(fp32: Path, built: Path, held: list[cnn.Feed], test: list[cnn.Feed], options: dict) -> str:
    """The search's acceptance rule (recipes.auto.Judge: error and its bound) on its held-out share and on the test
    images."""
    import graphquant
    from graphquant.recipes.auto import Judge, Settings

    reference, candidate = graphquant.load(fp32), graphquant.load(built)
    measured = {
        name: Judge(reference, feeds, Settings(**options)).measure(candidate)
        for name, feeds in (("search held-out", held), ("test images", test))
    }
    return ", ".join(f"{name} {error:.5f} / {bound:.5f}" for name, (error, bound) in measured.items())


def main() -> None:
    """Measure the built row's errors per share and per image, then (--rebuild) with other ranges."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="default", help="substring of the auto row's label (default: default)")
    parser.add_argument("--out", type=Path, default=cnn.DEFAULT_OUT)
    parser.add_argument("--rebuild", action="store_true", help="also rebuild the choice with other ranges")
    parser.add_argument(
        "--nearest",
        action="store_true",
        help="also rebuild it on the calibration share with weights rounded to nearest",
    )
    args = parser.parse_args()
    from graphquant.recipes.auto import split_data

    label, options = next((lb, o) for lb, r, o in auto_cnn.CONFIGS if r == "auto" and args.label in lb)
    out = args.out.resolve()
    fp32, built = out / "efficientnet_lite2.onnx", out / "auto_cnn" / f"{slug(label)}.onnx"
    report = json.loads(built.with_suffix(".json").read_text(encoding="utf-8"))
    calib, test = cnn.batches(cnn.image_set(cnn.CALIBRATION_IMAGES)), cnn.batches(cnn.image_set(cnn.HELDOUT_IMAGES))
    kept, held = split_data(calib)
    held_at = [i for i, feed in enumerate(calib) if any(feed is h for h in held)]
    chosen = report["auto"]["chosen"]
    log(f"{label}: search error {chosen['measured_error']:.5f}, bound {chosen['error_bound']:.5f}")
    models = {"FP32": fp32, "as built": built}
    if args.rebuild:
        scratch = out / "auto_cnn_gap"
        scratch.mkdir(exist_ok=True)
        models["rebuilt, kept share"] = rebuilt(fp32, report, options, kept, scratch / "kept.onnx")
        models["rebuilt, kept + test"] = rebuilt(fp32, report, options, kept + test, scratch / "kept_test.onnx")
    if args.nearest:
        scratch = out / "auto_cnn_gap"
        scratch.mkdir(exist_ok=True)
        # The latency objective's settings build the same schemes, with the weights rounded to nearest (no GPTQ).
        nearest = {key: value for key, value in options.items() if key != "objective"}
        models["rebuilt, kept share, nearest"] = rebuilt(fp32, report, nearest, kept, scratch / "nearest.onnx")
    outputs = {
        name: (batch_logits(path, calib), np.concatenate(batch_logits(path, test))) for name, path in models.items()
    }
    (reference_calib, reference_test) = outputs.pop("FP32")
    for name, (produced_calib, produced_test) in outputs.items():
        shares = {
            "search held-out": [i for i in range(len(calib)) if i in held_at],
            "calibration share": [i for i in range(len(calib)) if i not in held_at],
        }
        errors = [
            f"{share} {error(np.concatenate([reference_calib[i] for i in at]), np.concatenate([produced_calib[i] for i in at])):.5f}"
            for share, at in shares.items()
        ]
        errors.append(f"test images {error(reference_test, produced_test):.5f}")
        log(f"{name}: 1 - cos on {', '.join(errors)}")
        batches = ", ".join(f"{error(reference_calib[i], produced_calib[i]):.5f}" for i in held_at)
        log(f"{name}: per search held-out batch: {batches}")
        log(f"{name}: acceptance (error, bound) on {acceptance(fp32, models[name], held, test, options)}")
        whole_reference, whole = np.concatenate(reference_calib), np.concatenate(produced_calib)
        log(f"{name}: per calibration image: {per_image(cnn.CALIBRATION_IMAGES, whole_reference, whole)}")
        log(f"{name}: per test image: {per_image(cnn.HELDOUT_IMAGES, reference_test, produced_test)}")


if __name__ == "__main__":
    main()
