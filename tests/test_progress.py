"""Progress bars: labelled by stage and pass on a terminal (a pseudo-terminal here), silent when not one."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from builders import feeds, mlp

from graphquant import progress
from graphquant.analysis.calibration import Calibrator
from graphquant.passes.quantize import QuantizePass
from graphquant.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "examples" / "toy_transformer.onnx"
CALIB = ROOT / "examples" / "toy_calib.npz"
# preexecute-dequant and quantize calibrate nothing: their statistics are derived from symmetrize's row sample.
STAGES = [
    "symmetrize: calibrating",
    "preexecute-dequant: per-layer search",
    "quantize: weights",
    "validation: reference",
    "validation: candidate",
]


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def optimize_command(output: Path) -> list[str]:
    return [sys.executable, "-m", "graphquant.cli", "optimize", str(TOY), "-o", str(output), "--recipe", "outliertune"]


def finished_bars(text: str) -> list[str]:
    """The label of each bar that reached 100%, in order, once each (tqdm redraws a bar with carriage returns)."""
    labels = [line.split(": 100%")[0].strip() for line in text.replace("\r", "\n").splitlines() if ": 100%" in line]
    return list(dict.fromkeys(labels))


def run_on_pty(command: list[str]) -> tuple[int, str, str]:
    """Run with stderr on a 160-column pseudo-terminal; the exit status, stdout and what the terminal showed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal, env=env)
    os.close(terminal)
    shown = []
    while True:
        try:
            chunk = os.read(controller, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown.append(chunk)
    os.close(controller)
    stdout = process.stdout.read().decode() if process.stdout else ""
    return process.wait(timeout=300), stdout, b"".join(shown).decode(errors="replace")


def test_every_long_stage_shows_a_labelled_bar_that_stays_on_a_terminal(tmp_path):
    status, stdout, shown = run_on_pty([*optimize_command(tmp_path / "toy.onnx"), "--calib", str(CALIB)])
    assert status == 0, shown
    assert finished_bars(shown) == [*STAGES, "save toy.onnx"]
    assert "cosine" in stdout
    # Kept, not erased: each finished bar ends its line.
    assert shown.count("\n") >= len(STAGES) + 1


def test_nothing_is_printed_when_stderr_is_not_a_terminal(tmp_path):
    command = [*optimize_command(tmp_path / "toy.onnx"), "--calib", str(CALIB)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "cosine" in done.stdout and "%|" not in done.stdout


def test_gptq_bar_names_its_pass_and_showing_false_silences_it(monkeypatch):
    rng = np.random.default_rng(0)
    model = mlp(rng)
    calibrator = Calibrator.for_model(model, feeds(rng, batches=2, rows=8, features=16))
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    Pipeline([QuantizePass(calibrator, wbits=4, abits=None, gptq=True)])(model.clone())
    assert finished_bars(screen.getvalue()) == ["quantize: calibrating", "quantize: GPTQ"]
    screen.seek(0)
    screen.truncate()
    with progress.showing(False):
        Pipeline([QuantizePass(calibrator, wbits=4, abits=None, gptq=True)])(model.clone())
    assert screen.getvalue() == ""


@pytest.mark.parametrize("show", [True, False])
def test_a_bar_outside_any_stage_is_labelled_by_its_task(monkeypatch, show):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    assert list(progress.bar(range(3), "loading", unit="step", show=show)) == [0, 1, 2]
    assert finished_bars(screen.getvalue()) == (["loading"] if show else [])
