"""The HTML report (graphquant/report_html.py), rendered in headless Chromium as a user's browser shows it."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from builders import build, gaussian_feeds, ln_qkv, mlp, save_model, weights
from PIL import Image

import graphquant
from graphquant.cli import main
from graphquant.errors import OutputError
from graphquant.report import OUTLIER_RATIO
from graphquant.report_html import SECTIONS, WORST_LAYERS, render

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (CI installs the Debian package `chromium`: .ci/run)"
)
# Appended to a copy of the page for the test only: writes each image's decoded width into the DOM on load.
PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = Array.from(document.images, (image) => image.naturalWidth).join(",");
  document.body.appendChild(out);
});
</script>"""
# The plots on a page of a validated run that quantized layers with channels-last inputs.
PLOTS = ("sqnr", "activations", "weights", "sizes")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], Path, Path]:
    """An LN -> q/k/v model with planted outlier channels quantized by w8a8 through the CLI with --report-html."""
    folder = tmp_path_factory.mktemp("html")
    model_path = Path(save_model(ln_qkv(np.random.default_rng(0)), folder / "model.onnx"))
    x = np.concatenate([feed["x"] for feed in gaussian_feeds(0, batches=2)])
    np.savez(folder / "calib.npz", x=x)
    out, page_path = folder / "out.onnx", folder / "report.html"
    argv = ["optimize", str(model_path), "-o", str(out), "--recipe", "w8a8", "--calib", str(folder / "calib.npz")]
    assert main([*argv, "--report-html", str(page_path)]) == 0
    return page_path, {"x": x}, model_path, out


def chromium(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium; its own dbus complaints go to stderr."""
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    a, b = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def outputs(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


@needs_chromium
def test_chromium_shows_every_section_and_decodes_every_plot(page, tmp_path):
    page_path, feed, model_path, out = page
    probed = tmp_path / "probed.html"
    probed.write_text(page_path.read_text().replace("</body>", f"{PROBE}\n</body>"))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri()).stdout
    assert [f'<section id="{key}">' in dom for key in SECTIONS] == [True] * len(SECTIONS)
    widths = [int(w) for w in re.search(r'<pre id="probe">([\d,]*)</pre>', dom).group(1).split(",")]
    assert len(widths) == len(PLOTS) and min(widths) > 0
    assert [
        re.search(rf'<section id="{key}">.*?</section>', dom, re.DOTALL).group(0).count("<img") for key in PLOTS
    ] == [1] * len(PLOTS)
    # The validation table shows each output's cosine against the float model, as onnxruntime computes it.
    reference, candidate = outputs(model_path, feed), outputs(out, feed)
    for name in ("q", "k", "v"):
        row = re.search(rf"<tr><td>{name}</td><td[^>]*>([\d.]+)</td>", dom)
        assert float(row.group(1)) == pytest.approx(cosine(reference[name], candidate[name]), abs=2e-6)


@needs_chromium
def test_the_activation_plots_count_the_planted_outlier_channels(page):
    page_path, feed, model_path, _ = page
    model = graphquant.load(model_path)
    gamma, beta = (model.graph.initializers[name].const_value.numpy() for name in ("ln_gamma", "ln_beta"))
    x = feed["x"].astype(np.float64)
    h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta
    absmax = np.abs(h).max(axis=0)
    planted = int(np.count_nonzero(absmax > OUTLIER_RATIO * np.median(absmax)))
    assert planted == 2
    dom = chromium("--dump-dom", page_path.as_uri()).stdout
    lines = re.findall(r"<li>(\w+) \(input h\): range [^,]+, (\d+) of 16 channels are outliers</li>", dom)
    assert sorted(lines) == [(name, str(planted)) for name in ("k_proj", "q_proj", "v_proj")][:WORST_LAYERS]
    assert re.findall(r"<td[^>]*>(\d+)/16</td>", dom) == [str(planted)] * 3  # the decisions table


@needs_chromium
def test_the_screenshot_shows_the_plots(page, tmp_path):
    page_path = page[0]
    shot = tmp_path / "shot.png"
    chromium("--window-size=1200,2400", f"--screenshot={shot}", page_path.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    # The SQNR bars of the worst layers (#c0392b) and the weight ranges (#7d3c98) are drawn in the page.
    for color in ((0xC0, 0x39, 0x2B), (0x7D, 0x3C, 0x98)):
        assert np.count_nonzero(np.all(np.abs(pixels - color) <= 2, axis=1)) > 2000
    assert len(np.unique(pixels, axis=0)) > 200  # not a blank page


ONE_LAYER = """
<ir_version: 8, opset_import: ["" : 17]>
one_layer (float[N, 16] x) => (float[N, 8] y) {
  y = MatMul(x, w)
}
"""


# Markup for the page, and mathtext that matplotlib refuses (unknown symbol) unless names are drawn as plain text.
NAME = "<b>$\\undefined{fc}$</b>"


def test_node_names_are_text_in_the_page_and_in_the_plots():
    model = build(ONE_LAYER, {"w": weights(np.random.default_rng(1), 16, 8)})
    model.graph.node(0).name = NAME
    data = gaussian_feeds(1, batches=2)
    result = graphquant.optimize(model, "w8a8", calibration=data, show_progress=False)
    text = render(result.report, model)
    assert NAME not in text and html.escape(NAME) in text
    assert text.count("data:image/png;base64,") == len(PLOTS)


def test_an_unvalidated_run_says_so_and_still_plots_the_weights():
    model = mlp(np.random.default_rng(0))
    result = graphquant.optimize(model, "weight-only", show_progress=False, wbits=8, block_size=None)
    assert result.report.min_cosine is None
    text = render(result.report, model)
    assert "Not validated: no calibration or validation data" in text
    assert "No layer was measured" in text
    weights_section = re.search(r'<section id="weights">.*?</section>', text, re.DOTALL).group(0)
    assert weights_section.count("<img") == 1


def test_the_html_report_follows_the_output_rules(page, tmp_path, capsys):
    _, _, model_path, _ = page
    np.savez(tmp_path / "calib.npz", x=gaussian_feeds(2, batches=1)[0]["x"])
    argv = ["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "w8a8"]
    argv += ["--calib", str(tmp_path / "calib.npz")]
    for target, fault in ((model_path, "the input model"), (tmp_path / "calib.npz", "the calibration data")):
        assert main([*argv, "--report-html", str(target)]) == 1
        assert f"{target}: the HTML report would overwrite {fault}" in capsys.readouterr().err
    assert main([*argv, "--report", str(tmp_path / "r"), "--report-html", str(tmp_path / "r")]) == 1
    assert "the HTML report would overwrite the report" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz"]


def test_without_matplotlib_the_html_report_is_refused_in_one_line(page, tmp_path, monkeypatch, capsys):
    _, _, model_path, _ = page
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is not installed
    np.savez(tmp_path / "calib.npz", x=gaussian_feeds(2, batches=1)[0]["x"])
    argv = ["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "w8a8"]
    assert main([*argv, "--calib", str(tmp_path / "calib.npz"), "--report-html", str(tmp_path / "r.html")]) == 1
    assert capsys.readouterr().err == (
        "graphquant: error: the HTML report needs matplotlib: pip install 'graphquant[report]'\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz"]
    model = graphquant.load(model_path)
    result = graphquant.optimize(model, "w8a8", calibration=gaussian_feeds(2), show_progress=False)
    with pytest.raises(OutputError, match="needs matplotlib"):
        render(result.report, model)
