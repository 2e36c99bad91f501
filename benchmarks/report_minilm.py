"""The run report on all-MiniLM-L6-v2: what each stage costs, and what the HTML page costs to draw and weighs.

One process: export (or reuse) MiniLM, quantize it with each recipe on the CALIBRATION_SENTENCES batches, validate on
the held-out sentences, save, write the JSON report and the HTML page, and (where headless Chromium is installed)
take a screenshot of the page to look at. Every figure comes from the report's own timings or is measured here.

    nice -n 10 .venv/bin/python benchmarks/report_minilm.py [--recipes outliertune,w8a8] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common
from table_rows import log, publish

import graphquant


def run(recipe: str, model_path: Path, out: Path) -> list[str]:
    """One recipe: quantize, save, both reports, a screenshot; the table row's cells."""
    model = graphquant.load(model_path)
    inputs = common.graph_input_names(model_path)
    calib = common.calibration_batches(common.CALIBRATION_SENTENCES, batch=8, input_names=inputs)
    heldout = common.heldout_feeds(seq_len=32, batch=8, input_names=inputs)
    result = graphquant.optimize(model, recipe, calibration=calib, validation=heldout, show_progress=False)
    graphquant.save(result, out / f"minilm_{recipe}.onnx")
    result.report.save_json(out / f"minilm_{recipe}.json")
    page = out / f"minilm_{recipe}.html"
    start = time.perf_counter()
    result.report.save_html(page, model)
    html_s = time.perf_counter() - start
    screenshot(page, out / f"minilm_{recipe}.png")
    timings = result.report.timings
    worst = result.report.worst_layer()
    return [
        recipe,
        f"{timings.load:.1f}" if timings.load is not None else "—",
        f"{sum(seconds for _, seconds in timings.passes):.1f}",
        f"{sum(seconds for _, seconds in timings.lowering):.1f}",
        f"{timings.validation:.1f}" if timings.validation is not None else "—",
        f"{timings.save:.1f}" if timings.save is not None else "—",
        f"{html_s:.1f}",
        f"{page.stat().st_size / 1e3:.0f}",
        f"{len(result.report.activation_ranges)}/{len(result.report.quantized)}",
        "—" if worst is None else f"{worst[0]} ({worst[1]:.1f} dB)",
    ]


def screenshot(page: Path, image: Path) -> None:
    """A full-width screenshot of the page's top, if headless Chromium is installed."""
    chromium = shutil.which("chromium")
    if chromium is None:
        log("chromium not installed: no screenshot")
        return
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,4000"]
    subprocess.run([*command, f"--screenshot={image}", page.as_uri()], capture_output=True, timeout=120, check=True)
    log(f"wrote {image}")


def main() -> None:
    """Run the recipes and publish the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="outliertune", help="comma-separated recipe names")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = common.ensure_minilm(args.out)
    rows = []
    for recipe in args.recipes.split(","):
        log(f"{recipe} ...")
        rows.append(run(recipe, model_path, args.out))
    header = (
        f"all-MiniLM-L6-v2 ({model_path.name}), {len(common.CALIBRATION_SENTENCES)} calibration sentences in batches "
        f"of 8, {len(common.HELDOUT_SENTENCES)} held-out sentences padded to 32 tokens; seconds from the report's "
        "timings (passes and lowering summed), HTML = Report.save_html (matplotlib Agg)"
    )
    columns = [
        "recipe", "load s", "passes s", "lowering s", "validation s", "save s", "HTML s", "HTML kB",
        "layers with channel ranges", "worst layer",
    ]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    publish(args.out / "report_minilm.md", header, "\n".join(lines), started)


if __name__ == "__main__":
    main()
