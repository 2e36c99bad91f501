"""Calibration reuse on all-MiniLM-L6-v2: calibration runs, cache hits and wall time with and without the cache.

For the outliertune preset and for the auto recipe (the CLI default), each run once with graphquant's
CachingCalibrator and once with a calibrator that never reuses (every request runs the model over the data).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/stats_reuse_minilm.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # noqa: E402
from table_rows import log  # noqa: E402


def run(model, recipe: str, calib: list[dict], reuse: bool) -> tuple[float, int, int]:  # noqa: ANN001
    """(seconds, calibration runs, cache hits) of one optimize call."""
    import graphquant
    from graphquant.analysis import stats_cache

    counts = {"runs": 0, "hits": 0}
    original = stats_cache.CachingCalibrator.collect

    def counted(self, model, tensor_names, sample_rows=0, gram_names=()):  # noqa: ANN001, ANN202
        if not reuse:
            self._cache.clear()
        runs, hits = self.runs, self.hits
        stats = original(self, model, tensor_names, sample_rows, gram_names)
        counts["runs"] += self.runs - runs
        counts["hits"] += self.hits - hits
        return stats

    start = time.perf_counter()
    with mock.patch.object(stats_cache.CachingCalibrator, "collect", counted):
        graphquant.optimize(model, recipe, calibration=calib, show_progress=False)
    return time.perf_counter() - start, counts["runs"], counts["hits"]


def main() -> None:
    """Print the table."""
    import graphquant

    fp32 = common.ensure_minilm()
    inputs = common.graph_input_names(fp32)
    calib = common.calibration_batches(common.CALIBRATION_SENTENCES, batch=8, input_names=inputs)
    model = graphquant.load(fp32)
    lines = ["| recipe | statistics | calibration runs | tensors from the cache | seconds |", "|---|---|---|---|---|"]
    for recipe in ("outliertune", "auto"):
        for reuse in (True, False):
            log(f"{recipe}, reuse {reuse} ...")
            seconds, runs, hits = run(model, recipe, calib, reuse)
            lines.append(f"| {recipe} | {'reused' if reuse else 'recollected'} | {runs} | {hits} | {seconds:.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
