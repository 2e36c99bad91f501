"""Calibration from a text file: one sample per non-blank line, tokenized with a Hugging Face `tokenizers` file.

The graph's token inputs are filled by name: input ids, attention mask, token type ids and position ids (0..L-1 on
every row), each in the dtype the graph declares. Rows are padded on the right to the sequence length: the graph's
fixed sequence dim, else ``seq_len`` (longer lines are truncated to it), else the longest line of each batch (lines cut
only where the tokenizer file sets a truncation).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphquant.analysis.data import DEFAULT_BATCH_SIZE, Feed, FeedLoader, InputSpec, _first_line
from graphquant.errors import CalibrationError

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
# Files of a Hugging Face tokenizer folder that name the pad token when tokenizer.json sets no padding.
PAD_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Name fragments of each role, tried in this order ("token_type_ids" also holds "ids").
ROLES = (
    ("attention_mask", ("attention_mask", "input_mask", "mask")),
    ("token_type_ids", ("token_type", "segment")),
    ("position_ids", ("position",)),
    ("input_ids", ("input_ids", "ids", "tokens")),
)


@dataclasses.dataclass(frozen=True)
class TextCalibration(FeedLoader):
    """The lines of a UTF-8 text file, tokenized by ``tokenizer`` (a tokenizer.json or the folder holding one)."""

    path: Path
    tokenizer: Path
    seq_len: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        """Check the text file, the tokenizer and the sizes up front."""
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "tokenizer", Path(self.tokenizer))
        if self.seq_len is not None and self.seq_len < 1:
            raise CalibrationError(f"{self.path}: the sequence length (--seq-len) must be positive, not {self.seq_len}")
        if self.batch_size < 1:
            raise CalibrationError(
                f"{self.path}: the batch size (--batch-size) must be positive, not {self.batch_size}"
            )
        if not self.path.is_file():
            raise CalibrationError(f"{self.path}: text file not found")
        load_tokenizer(self.tokenizer)

    def feeds(self, inputs: list[InputSpec]) -> Iterator[Feed]:
        """Batches of tokenized lines, one array per graph input."""
        try:
            roles = input_roles(inputs)
            length = _sequence_length(inputs, self.seq_len)
        except CalibrationError as exc:
            raise CalibrationError(f"{self.path}: {exc}") from None
        lines = read_lines(self.path)
        batched = [spec for spec in inputs if roles[spec.name] != "position_ids"]  # positions may broadcast: [1, L]
        rows = _rows_per_batch(batched, self.batch_size, len(lines), self.path)
        tokenizer = _configured(load_tokenizer(self.tokenizer), self.tokenizer, length)
        for start in range(0, len(lines), rows):
            encodings = tokenizer.encode_batch(lines[start : start + rows])
            yield {spec.name: _fill(spec, roles[spec.name], encodings) for spec in inputs}


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a tokenizer.json file or of a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer

    file = _tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise CalibrationError(f"{file}: cannot read the tokenizer ({_first_line(exc)})") from exc


def _tokenizer_file(path: Path) -> Path:
    """The tokenizer.json a tokenizer path names."""
    if not path.exists():
        raise CalibrationError(f"{path}: tokenizer not found")
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise CalibrationError(
                f"{path}: the tokenizer folder has no {TOKENIZER_FILE} (a fast tokenizer's file; "
                "transformers' save_pretrained writes one)"
            )
        return path / TOKENIZER_FILE
    return path


def input_roles(inputs: Sequence[InputSpec]) -> dict[str, str]:
    """Each graph input's role (input_ids, attention_mask, token_type_ids, position_ids), from its name."""
    roles = {}
    for spec in inputs:
        lowered = spec.name.lower()
        role = next((role for role, keys in ROLES if any(key in lowered for key in keys)), None)
        if role is None:
            raise CalibrationError(
                f"input {spec.name!r} cannot be filled from text (a tokenizer fills "
                f"{', '.join(role for role, _ in ROLES)})"
            )
        if spec.shape is not None and len(spec.shape) != 2:
            raise CalibrationError(f"input {spec.name!r} has rank {len(spec.shape)}; text fills [batch, sequence]")
        roles[spec.name] = role
    return roles


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, line ends removed."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise CalibrationError(f"{path}: the text file has no non-blank line")
    return lines


def _sequence_length(inputs: Sequence[InputSpec], seq_len: int | None) -> int | None:
    """The padded length: the graph's fixed sequence dim (which seq_len must match), else seq_len."""
    fixed = {spec.name: spec.shape[1] for spec in inputs if spec.shape and spec.shape[1] is not None}
    if len(set(fixed.values())) > 1:
        raise CalibrationError(f"the inputs disagree on their fixed sequence length: {fixed}")
    if not fixed:
        return seq_len
    name, length = next(iter(fixed.items()))
    if seq_len is not None and seq_len != length:
        raise CalibrationError(
            f"sequence length {seq_len} (--seq-len) given, input {name!r} has a fixed sequence length of {length}"
        )
    return length


def _rows_per_batch(inputs: Sequence[InputSpec], batch_size: int, lines: int, path: Path) -> int:
    """The graph's fixed batch dim (which the lines must fill), else batch_size."""
    fixed = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] is not None}
    if len(fixed) > 1:
        raise CalibrationError(f"the inputs disagree on their fixed batch size: {sorted(fixed)}")
    if not fixed:
        return batch_size
    rows = fixed.pop()
    if lines % rows:
        raise CalibrationError(f"{path}: {lines} lines do not split into the model's static batch size {rows}")
    return rows


def _configured(tokenizer: Tokenizer, path: Path, length: int | None) -> Tokenizer:
    """The tokenizer set to pad on the right to ``length`` (None: each batch's longest), truncating to it."""
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token") or _pad_token(_tokenizer_file(path).parent) or "[PAD]"
    pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
    tokenizer.no_padding()
    tokenizer.enable_padding(
        direction="right", pad_id=pad_id, pad_type_id=padding.get("pad_type_id", 0), pad_token=pad_token, length=length
    )
    if length is not None:
        tokenizer.enable_truncation(max_length=length)
    return tokenizer


def _pad_token(folder: Path) -> str | None:
    """The pad token a Hugging Face tokenizer folder names, if any."""
    for name in PAD_TOKEN_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            token = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise CalibrationError(f"{file}: cannot read ({_first_line(exc)})") from exc
        if isinstance(token, dict):  # an AddedToken written out: {"content": "<pad>", ...}
            token = token.get("content")
        if isinstance(token, str):
            return token
    return None


def _fill(spec: InputSpec, role: str, encodings: Sequence[Encoding]) -> np.ndarray:
    """One input's array from the batch's encodings, in the input's dtype."""
    if role == "position_ids":
        length = len(encodings[0].ids)
        rows = len(encodings) if spec.shape is None or spec.shape[0] is None else spec.shape[0]
        return np.broadcast_to(np.arange(length), (rows, length)).astype(spec.dtype)
    field = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}[role]
    return np.array([getattr(encoding, field) for encoding in encodings]).astype(spec.dtype)


def text_fit(inputs: Sequence[InputSpec]) -> str | None:
    """What text calibration fills for these inputs, or None if a tokenizer cannot fill them."""
    try:
        roles = input_roles(inputs)
    except CalibrationError:
        return None
    if "input_ids" not in roles.values():
        return None
    length = next((spec.shape[1] for spec in inputs if spec.shape and spec.shape[1] is not None), None)
    fixed = f"fixed length {length}" if length else "any --seq-len"
    return f"a text file with --tokenizer ({', '.join(f'{n} <- {r}' for n, r in roles.items())}; {fixed})"
