"""How much top-1 agreement the mobile-CNN benchmark's held-out crops allow at a given logit cosine.

FP32's top-1 margins on `mobile_cnn.py`'s held-out crops (scikit-image / scikit-learn samples, most of them far from
ImageNet's classes) are small, so top-1 agreement moves with tiny logit errors. This script prints the margin
distribution and, for each logit cosine c, the top-1 agreement that an error of that size would give if it pointed in
a random direction: ||e|| = sqrt(2(1 - c))·||z|| (for equal norms), whose component along a crop's top-2 difference
direction is Gaussian with standard deviation ||e||·sqrt(2 / classes); a crop flips when it exceeds the margin.
Given quantized models (``--models``), it sets each one's measured top-1 agreement and cosine beside that prediction,
and the same prediction with each crop's own error norm.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/mobile_cnn_margins.py --out benchmarks/out --models benchmarks/out/x.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.special import ndtr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mobile_cnn import DEFAULT_OUT, HELDOUT_IMAGES, batches, export_model, image_set, logits

COSINES = (0.99, 0.993, 0.995, 0.998, 0.999, 0.9995)
QUANTILES = (0.02, 0.05, 0.1, 0.2, 0.5)


def top2_margin(reference: np.ndarray) -> np.ndarray:
    """Each crop's top-1 minus top-2 logit."""
    ordered = np.sort(reference, axis=1)
    return ordered[:, -1] - ordered[:, -2]


def predicted_agreement(reference: np.ndarray, error_norm: np.ndarray) -> float:
    """Expected top-1 agreement when each crop's logit error has the given norm and a random direction."""
    spread = np.maximum(error_norm * np.sqrt(2.0 / reference.shape[1]), 1e-30)
    return float(np.mean(ndtr(top2_margin(reference) / spread)))


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-crop logit cosine."""
    a, b = reference.astype(np.float64), candidate.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def margin_table(reference: np.ndarray) -> list[str]:
    """Margin quantiles, absolute and relative to the logit norm."""
    margin, norm = top2_margin(reference), np.linalg.norm(reference, axis=1)
    lines = ["| quantile | top-2 margin | margin / logit norm |", "|---|---|---|"]
    for q in QUANTILES:
        lines.append(f"| {q:g} | {np.quantile(margin, q):.4f} | {np.quantile(margin / norm, q):.5f} |")
    return lines


def cosine_table(reference: np.ndarray) -> list[str]:
    """The isotropic-error prediction of top-1 agreement at each logit cosine."""
    norm = np.linalg.norm(reference, axis=1)
    lines = ["| logit cosine | predicted top-1 agreement (random-direction error) |", "|---|---|"]
    for c in COSINES:
        lines.append(f"| {c:g} | {predicted_agreement(reference, np.sqrt(2 * (1 - c)) * norm):.3f} |")
    return lines


def model_table(reference: np.ndarray, models: list[Path], feeds: list[dict[str, np.ndarray]]) -> list[str]:
    """Each model's measured cosine and top-1 agreement against the prediction from its own error norms."""
    lines = [
        "| model | mean logit cosine | measured top-1 | predicted at that cosine | predicted from its error norms |",
        "|---|---|---|---|---|",
    ]
    norm = np.linalg.norm(reference, axis=1)
    for path in models:
        candidate = logits(path, feeds)
        mean_cos = float(cosines(reference, candidate).mean())
        measured = float(np.mean(candidate.argmax(1) == reference.argmax(1)))
        at_cos = predicted_agreement(reference, np.sqrt(2 * (1 - mean_cos)) * norm)
        own = predicted_agreement(reference, np.linalg.norm(candidate - reference, axis=1))
        lines.append(f"| {path.name} | {mean_cos:.5f} | {measured:.3f} | {at_cos:.3f} | {own:.3f} |")
    return lines


def main() -> None:
    """Export (once), run FP32 on the held-out crops, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder of the FP32 export (default benchmarks/out)"
    )
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="quantized models to set beside it")
    args = parser.parse_args()
    missing = [str(path) for path in args.models if not path.is_file()]
    if missing:
        parser.error(f"no such model: {', '.join(missing)}")
    fp32 = export_model(args.out.resolve())
    feeds = batches(image_set(HELDOUT_IMAGES))
    reference = logits(fp32, feeds)
    print(f"{len(reference)} held-out crops, {reference.shape[1]} classes, FP32 = {fp32}\n")
    for table in (margin_table(reference), cosine_table(reference)):
        print("\n".join(table) + "\n")
    if args.models:
        print("\n".join(model_table(reference, args.models, feeds)))


if __name__ == "__main__":
    main()
