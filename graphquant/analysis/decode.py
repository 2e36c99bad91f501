"""KV-cache decode graphs: calibration feeds with past key/values, and greedy generation in onnxruntime.

A decode graph takes input_ids and position_ids [batch, seq], attention_mask [batch, past + seq] and
past_key_values.{i}.key/value [batch, kv_heads, past, head_dim], and returns logits [batch, seq, vocab] and
present.{i}.key/value [batch, kv_heads, past + seq, head_dim] (the layout of optimum and of examples/smollm2.py).
With past = 0 it is a prefill that returns the cache, so one graph gives both the calibration caches and the loop.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

from graphquant.analysis.data import Feed
from graphquant.errors import CalibrationError, InvalidModelError, OutputError

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
LOGITS = "logits"
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclasses.dataclass(frozen=True)
class DecodeGraph:
    """An onnxruntime session of a decode graph, with its cache inputs and the outputs that return them."""

    session: ort.InferenceSession
    past: tuple[str, ...]
    present: tuple[str, ...]
    kv_heads: int
    head_dim: int

    @classmethod
    def open(cls, path: str | Path, threads: int = 0) -> DecodeGraph:
        """Load a decode graph on the CPU; refuse a graph without the past/present cache layout."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {value.name: value for value in session.get_inputs()}
        outputs = {value.name for value in session.get_outputs()}
        past = sorted((name for name in inputs if PAST.fullmatch(name)), key=_cache_order)
        missing = [f"input {name!r}" for name in TOKEN_INPUTS if name not in inputs]
        missing += [f"output {name!r}" for name in (LOGITS, *map(_present, past)) if name not in outputs]
        if not past or missing:
            fault = f"{missing[0]} is missing" if past else "it has no past_key_values.<i>.key/value inputs"
            raise InvalidModelError(f"{path}: not a KV-cache decode graph: {fault}")
        shape = inputs[past[0]].shape
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise InvalidModelError(f"{path}: {past[0]!r} has shape {shape}, not [batch, kv_heads, past, head_dim]")
        return cls(session, tuple(past), tuple(_present(name) for name in past), shape[1], shape[3])

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """A past of length 0 for every cache input."""
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past]

    def feed(self, input_ids: np.ndarray, cache: Sequence[np.ndarray]) -> Feed:
        """The feed of one step: new tokens [batch, seq] after a cache of ``past`` positions (no padding)."""
        batch, seq = input_ids.shape
        past = cache[0].shape[2]
        return {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": np.ones((batch, past + seq), np.int64),
            "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1)),
            **dict(zip(self.past, cache)),
        }

    def step(self, input_ids: np.ndarray, cache: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of the new tokens and the cache extended by them."""
        logits, *present = self.session.run([LOGITS, *self.present], self.feed(input_ids, cache))
        return logits, present


@dataclasses.dataclass(frozen=True)
class Generation:
    """Greedy tokens [prompts, steps] and the seconds of each single-token decode step (prompt steps excluded)."""

    tokens: np.ndarray
    step_seconds: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class GenerationAgreement:
    """How a candidate's greedy tokens follow the reference's: share of prompts with all tokens equal, mean prefix."""

    all_match: float
    mean_prefix: float


def _cache_order(name: str) -> tuple[int, int]:
    """Layer, then key before value."""
    match = PAST.fullmatch(name)
    assert match is not None
    return int(match[1]), match[2] == "value"


def _present(past_name: str) -> str:
    """The output that returns a cache input extended: past_key_values.{i}.key -> present.{i}.key."""
    return "present" + past_name.removeprefix("past_key_values")


def calibration_feeds(
    graph: DecodeGraph, windows: np.ndarray, positions: Sequence[int], batch_size: int = 8, prefill: bool = True
) -> list[Feed]:
    """Decode-step feeds from token windows [n, seq]: per batch of windows, the FP32 graph's own prefill gives the
    cache, and each position p becomes the step (token p, cache of positions < p); ``prefill`` adds the whole-window
    feed with an empty past, so that the ranges also cover the prompt (and its first-token outliers)."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
        raise CalibrationError(
            f"token windows must be an integer array [windows, seq], got {windows.dtype} {windows.shape}"
        )
    bad = [p for p in positions if not 0 < p < windows.shape[1]]
    if bad or not positions:
        raise CalibrationError(f"decode positions must lie in 1..{windows.shape[1] - 1}, got {list(positions)}")
    feeds = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        empty = graph.empty_cache(len(batch))
        _, cache = graph.step(batch, empty)
        if prefill:
            feeds.append(graph.feed(batch, empty))
        # Causal attention: the cache of positions < p is the same whether the window stops at p or goes on.
        feeds.extend(graph.feed(batch[:, p : p + 1], [kv[:, :, :p] for kv in cache]) for p in positions)
    return feeds


def save_test_data(feeds: Sequence[Feed], folder: str | Path) -> Path:
    """Write feeds in the ONNX test-data layout (test_data_set_<k>/input_<n>.pb), which the CLI's --calib reads;
    decode feeds differ in past length, so they cannot share the stacked arrays of an .npz."""
    folder = Path(folder)
    if folder.exists() and any(folder.glob("test_data_set_*")):
        raise OutputError(f"{folder}: already holds test_data_set_* folders; write the feeds to a new folder")
    for index, feed in enumerate(feeds):
        data_set = folder / f"test_data_set_{index}"
        data_set.mkdir(parents=True)
        for number, (name, array) in enumerate(feed.items()):
            tensor = onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)
            (data_set / f"input_{number}.pb").write_bytes(tensor.SerializeToString())
    return folder


def generate(graph: DecodeGraph, prompts: np.ndarray, steps: int) -> Generation:
    """Greedy generation of ``steps`` tokens after each prompt, the cache fed back; each prompt runs at batch 1."""
    tokens = np.zeros((len(prompts), steps), np.int64)
    seconds = []
    for row, prompt in enumerate(np.asarray(prompts, np.int64)):
        logits, cache = graph.step(prompt[None], graph.empty_cache(1))
        tokens[row, 0] = logits[0, -1].argmax()
        for index in range(1, steps):
            start = time.perf_counter()
            logits, cache = graph.step(tokens[row : row + 1, index - 1 : index], cache)
            seconds.append(time.perf_counter() - start)
            tokens[row, index] = logits[0, -1].argmax()
    return Generation(tokens, tuple(seconds))


def agreement(reference: np.ndarray, candidate: np.ndarray) -> GenerationAgreement:
    """All-match share and mean matched prefix length of two [prompts, steps] token arrays."""
    if reference.shape != candidate.shape:
        raise ValueError(f"token arrays differ in shape: {reference.shape} and {candidate.shape}")
    differs = reference != candidate
    prefix = np.where(differs.any(axis=1), differs.argmax(axis=1), reference.shape[1])
    return GenerationAgreement(float(np.mean(prefix == reference.shape[1])), float(prefix.mean()))
