"""How far the auto search's held-out error estimate is from unseen data: spread over batches and bootstrap bounds.

Builds one auto row (MiniLM from auto_minilm.py's data, or EfficientNet-Lite2 from auto_cnn.py's) and, for the pick,
reports 1 - cosine of the outputs (MiniLM: at unpadded tokens) on the search's own held-out batches (every fourth
calibration batch, recipes.auto.split_data) and on the benchmark's held-out set: the error, its per-batch minimum,
maximum and standard deviation, and the 0.9/0.95 quantiles of 2000 seeded bootstrap resamples over batches and over
samples (rows). Also prints each candidate the search tried (error, bound, bytes, verdict).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/auto_heldout_spread.py minilm|cnn ['{"objective": "size"}']
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from table_rows import log

DRAWS = 2000
QUANTILES = (0.9, 0.95)


def data(which: str) -> tuple[Path, list[dict], list[dict], Callable[[list[dict]], list[Any]]]:
    """(float model, calibration batches, benchmark held-out batches, per-batch position masks) of a benchmark."""
    if which == "cnn":
        import mobile_cnn as cnn

        fp32 = cnn.export_model(cnn.DEFAULT_OUT)
        calib, test = cnn.batches(cnn.image_set(cnn.CALIBRATION_IMAGES)), cnn.batches(cnn.image_set(cnn.HELDOUT_IMAGES))
        return fp32, calib, test, lambda feeds: [None] * len(feeds)
    import minilm_common as common

    fp32 = common.ensure_minilm(common.DEFAULT_OUT)
    inputs = common.graph_input_names(fp32)
    calib = common.calibration_batches(common.CALIBRATION_SENTENCES, batch=8, input_names=inputs)
    test = common.heldout_feeds(128, batch=8, input_names=inputs)
    return fp32, calib, test, lambda feeds: [feed["attention_mask"].astype(bool) for feed in feeds]


def first_outputs(path: Path, feeds: Sequence[dict]) -> list[np.ndarray]:
    """The model's first output on each feed, in float64."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, {n: feed[n] for n in names})[0].astype(np.float64) for feed in feeds]


def sample_sums(reference: np.ndarray, produced: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[rows, 3]: (r.c, r.r, c.c) of each row of a batch, at its unmasked positions."""
    rows = [None] * len(reference) if mask is None else list(mask)
    pairs = [(r, c) if m is None else (r[m], c[m]) for r, c, m in zip(reference, produced, rows)]
    return np.array([(a.ravel() @ b.ravel(), a.ravel() @ a.ravel(), b.ravel() @ b.ravel()) for a, b in pairs])


def cosine_error(sums: np.ndarray) -> np.ndarray:
    """1 - cosine from summed (r.c, r.r, c.c) along the last axis."""
    return 1.0 - sums[..., 0] / np.sqrt(sums[..., 1] * sums[..., 2])


def bootstrap(units: Sequence[np.ndarray]) -> np.ndarray:
    """The error of DRAWS seeded resamples (with replacement) of the units, each a [rows, 3] array of sums."""
    totals = np.array([unit.sum(axis=0) for unit in units])
    counts = np.random.default_rng(0).multinomial(len(units), np.full(len(units), 1.0 / len(units)), size=DRAWS)
    return cosine_error(counts @ totals)


def spread(fp32: Path, built: Path, feeds: list[dict], masks: list[Any]) -> str:
    """One line: the error, its per-batch spread, and bootstrap quantiles over batches and over rows."""
    batches = [sample_sums(r, c, m) for r, c, m in zip(first_outputs(fp32, feeds), first_outputs(built, feeds), masks)]
    per_batch = np.array([cosine_error(b.sum(axis=0)) for b in batches])
    rows = [row[None] for batch in batches for row in batch]
    parts = [f"err {float(cosine_error(np.concatenate(batches).sum(axis=0))):.6f}"]
    parts.append(f"per batch (n={len(batches)}) {per_batch.min():.6f}-{per_batch.max():.6f} sd {per_batch.std():.6f}")
    for name, units in (("batches", batches), (f"rows (n={len(rows)})", rows)):
        draws = bootstrap(units)
        quantiles = " ".join(f"q{int(q * 100)} {np.quantile(draws, q):.6f}" for q in QUANTILES)
        parts.append(f"bootstrap over {name}: sd {draws.std():.6f} {quantiles}")
    return "; ".join(parts)


def main() -> None:
    """Build the row, then print the spread on both held-out sets and the search's candidates."""
    import graphquant
    from graphquant.recipes.auto import split_data

    which = sys.argv[1]
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    fp32, calib, test, masks = data(which)
    held = split_data(calib)[1]
    result = graphquant.optimize(graphquant.load(fp32), "auto", calibration=calib, show_progress=False, **options)
    built = fp32.parent / f"spread_{which}.onnx"
    graphquant.save(result, built, overwrite=True)
    log(f"search held-out: {spread(fp32, built, held, masks(held))}")
    log(f"benchmark held-out: {spread(fp32, built, test, masks(test))}")
    for point in result.report.auto["tried"]:
        log(f"tried: {point}")


if __name__ == "__main__":
    main()
