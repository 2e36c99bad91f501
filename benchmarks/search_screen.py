"""preexecute-dequant's screened search against the full one: the same choice per scale group, and its cost.

The search scores every candidate divisor on every SCREEN_STRIDE-th sampled row, then re-scores the best SCREEN_KEPT
on all of them. This runs a preset on SmolLM2-135M's prefill export (or all-MiniLM-L6-v2) and, for every group,
searches both ways on the same statistics: it counts the groups whose choice differs, and the largest SQNR the
screen gave up (full search's best minus the screened choice's, both on all rows). The quantized model follows the
screened choice, as the pass does. Timings are the two searches' CPU seconds over all groups.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/search_screen.py --model smollm2 --presets outliertune,llm-w8a8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_common as common  # also puts examples/ on sys.path
from table_rows import log

from graphquant.passes import preexecute_dequant

_ORIGINAL = preexecute_dequant.PreexecuteDequantPass._choose


@dataclasses.dataclass
class Compared:
    """One group's screened and full choices."""

    group: str
    screened: preexecute_dequant.Choice
    full: preexecute_dequant.Choice


@dataclasses.dataclass
class Recorder:
    """Wraps PreexecuteDequantPass._choose to search each group both ways, timing each."""

    compared: list[Compared] = dataclasses.field(default_factory=list)
    screened_s: float = 0.0
    full_s: float = 0.0

    def install(self) -> None:
        """Replace the pass's _choose with one that records both searches and returns the screened choice."""
        original = _ORIGINAL
        kept = preexecute_dequant.SCREEN_KEPT

        def choose(pass_: Any, group: Any, stats: Any) -> preexecute_dequant.Choice:
            start = time.process_time()
            screened = original(pass_, group, stats)
            middle = time.process_time()
            preexecute_dequant.SCREEN_KEPT = 10**9  # every candidate passes the screen: the full search
            try:
                full = original(pass_, group, stats)
            finally:
                preexecute_dequant.SCREEN_KEPT = kept
            self.screened_s += middle - start
            self.full_s += time.process_time() - middle
            self.compared.append(Compared(group.activation.name or "", screened, full))
            return screened

        preexecute_dequant.PreexecuteDequantPass._choose = choose  # type: ignore[method-assign]


def calibration(model: str, seqs: int) -> tuple[Path, list[dict[str, Any]]]:
    """The model's FP32 export and its calibration batches."""
    if model == "minilm":
        fp32 = common.ensure_minilm(Path("/tmp/graphquant_quant_time"))
        sentences = common.CALIBRATION_SENTENCES[:seqs] if seqs else common.CALIBRATION_SENTENCES
        return fp32, common.calibration_batches(sentences, batch=8, input_names=common.graph_input_names(fp32))
    import smollm2 as example

    windows = example.token_sequences(example.CALIBRATION_MODULES, seqs or 8)
    return example.cached_export(dynamo=True), example.feeds_for(windows, 4)


def summary(preset: str, recorder: Recorder) -> str:
    """One table row: groups, differing choices, the largest SQNR given up, and both searches' CPU seconds."""
    differing = [c for c in recorder.compared if c.screened.label != c.full.label]
    lost = max((c.full.sqnr_db - c.screened.sqnr_db for c in recorder.compared), default=0.0)
    for c in differing:
        log(
            f"  {c.group}: screened {c.screened.label} ({c.screened.sqnr_db:.2f} dB), full {c.full.label} "
            f"({c.full.sqnr_db:.2f} dB)"
        )
    return (
        f"| {preset} | {len(recorder.compared)} | {len(differing)} | {lost:.3f} | {recorder.screened_s:.1f} | "
        f"{recorder.full_s:.1f} |"
    )


def main() -> None:
    """Run each preset with the recording search and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    parser.add_argument("--presets", default="outliertune,llm-w8a8")
    parser.add_argument("--calib-seqs", type=int, default=8)
    args = parser.parse_args()
    import graphquant

    fp32, feeds = calibration(args.model, args.calib_seqs)
    lines = [
        "| preset | groups | choices differing | largest SQNR given up (dB) | screened search CPU s | full search CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for preset in args.presets.split(","):
        recorder = Recorder()
        recorder.install()
        graphquant.optimize(graphquant.load(fp32), preset, calibration=feeds, target="ort-cpu", show_progress=False)
        lines.append(summary(preset, recorder))
        preexecute_dequant.PreexecuteDequantPass._choose = _ORIGINAL  # type: ignore[method-assign]
    print(
        f"{args.model}, {len(feeds)} calibration batches, stride {preexecute_dequant.SCREEN_STRIDE}, "
        f"kept {preexecute_dequant.SCREEN_KEPT}\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
