"""Calibration from a folder of images, read with Pillow and preprocessed into the graph's rank-4 float input.

Each image becomes ``(pixel * scale - mean) / std`` per channel after resizing to the input's height and width, in
RGB (or BGR, or grayscale for a one-channel input), laid out NCHW or NHWC. Files are taken in sorted path order,
subfolders included.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphquant.analysis.data import DEFAULT_BATCH_SIZE, Feed, FeedLoader, InputSpec, _first_line
from graphquant.errors import CalibrationError, RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LAYOUTS = ("NCHW", "NHWC")
RESIZES = ("stretch", "crop", "pad")
CHANNEL_ORDERS = ("RGB", "BGR")
PREPROCESS_TABLE = "preprocess"


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """How an image becomes an input: its size (height, width), resize mode, scale, mean/std, layout, channels.

    ``resize``: "stretch" to the size, "crop" (scale the shorter side, then crop the centre) or "pad" (scale the
    longer side, pad with zeros). ``size`` and ``layout`` None: taken from the graph's input.
    """

    size: tuple[int, int] | None = None
    resize: str = "stretch"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str | None = None
    channels: str = "RGB"

    def __post_init__(self) -> None:
        """Check the choices and values."""
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))
            if len(self.size) != 2 or min(self.size) < 1:
                raise CalibrationError(f"image size {self.size}: give a positive height and width")
        for value, choices, what in (
            (self.resize, RESIZES, "resize"),
            (self.layout or LAYOUTS[0], LAYOUTS, "layout"),
            (self.channels, CHANNEL_ORDERS, "channel order"),
        ):
            if value not in choices:
                raise CalibrationError(f"image {what} {value!r} is not one of {', '.join(choices)}")
        if not self.mean or not self.std or any(v == 0 for v in self.std):
            raise CalibrationError(f"image mean {self.mean} and std {self.std}: give values, none of std zero")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], where: str) -> ImagePreprocess:
        """Preprocessing from a recipe's [preprocess] table (keys: the field names; size an int or [h, w])."""
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(table) - fields)
        if unknown:
            raise RecipeError(f"{where}: unknown [preprocess] key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
        values = dict(table)
        if isinstance(values.get("size"), int):
            values["size"] = (values["size"], values["size"])
        for key in ("mean", "std"):
            if isinstance(values.get(key), (int, float)):
                values[key] = (values[key],)
        try:
            return cls(**values)
        except (CalibrationError, TypeError, ValueError) as exc:
            raise RecipeError(f"{where}: [preprocess]: {exc}") from None

    @classmethod
    def from_recipe(cls, path: str | Path) -> ImagePreprocess | None:
        """The [preprocess] table of a recipe .toml file, or None if it has none."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RecipeError(f"{path}: cannot read recipe ({exc})") from exc
        table = data.get(PREPROCESS_TABLE)
        if table is None:
            return None
        if not isinstance(table, dict):
            raise RecipeError(f"{path}: [preprocess] must be a table")
        return cls.from_mapping(table, str(path))

    def replaced(self, **values: Any) -> ImagePreprocess:
        """A copy with the given values (None: kept)."""
        return dataclasses.replace(self, **{key: value for key, value in values.items() if value is not None})


@dataclasses.dataclass(frozen=True)
class ImageCalibration(FeedLoader):
    """The images of a folder, preprocessed for the graph's rank-4 float input."""

    path: Path
    preprocess: ImagePreprocess = ImagePreprocess()
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        """Check that the folder holds images."""
        object.__setattr__(self, "path", Path(self.path))
        if self.batch_size < 1:
            raise CalibrationError(
                f"{self.path}: the batch size (--batch-size) must be positive, not {self.batch_size}"
            )
        image_files(self.path)

    def feeds(self, inputs: list[InputSpec]) -> Iterator[Feed]:
        """Batches of preprocessed images for the image input."""
        try:
            spec = image_input(inputs)
            layout, channels, size = geometry(spec, self.preprocess)
        except CalibrationError as exc:
            raise CalibrationError(f"{self.path}: {exc}") from None
        files = image_files(self.path)
        static = spec.shape[0] if spec.shape else None
        if static is not None and len(files) % static:
            raise CalibrationError(
                f"{self.path}: {len(files)} images do not split into the model's static batch size {static}"
            )
        rows = static or self.batch_size
        for start in range(0, len(files), rows):
            arrays = [load_image(file, self.preprocess, channels, size) for file in files[start : start + rows]]
            batch = np.stack(arrays)
            yield {spec.name: (batch if layout == "NHWC" else batch.transpose(0, 3, 1, 2)).astype(spec.dtype)}


def image_files(folder: Path) -> list[Path]:
    """The folder's image files, subfolders included, in sorted path order."""
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: image folder not found")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files.extend(Path(root) / name for name in sorted(names) if Path(name).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no test_data_set_* folders in the folder"
        )
    return files


def image_input(inputs: Sequence[InputSpec]) -> InputSpec:
    """The graph's one rank-4 float input; any other input cannot be filled from images."""
    images = [spec for spec in inputs if _is_image(spec)]
    if len(images) != 1:
        found = ", ".join(repr(spec.name) for spec in images) or "none"
        raise CalibrationError(f"images fill one rank-4 float input; the model has {len(images)} ({found})")
    others = [spec.name for spec in inputs if spec is not images[0]]
    if others:
        raise CalibrationError(f"input {others[0]!r} cannot be filled from images (they fill {images[0].name!r})")
    return images[0]


def _is_image(spec: InputSpec) -> bool:
    """Whether an input is a rank-4 float tensor."""
    return np.issubdtype(spec.dtype, np.floating) and spec.shape is not None and len(spec.shape) == 4


def geometry(spec: InputSpec, preprocess: ImagePreprocess) -> tuple[str, int, tuple[int, int]]:
    """The layout, channel count and (height, width) of the image input, checked against its fixed dims."""
    assert spec.shape is not None
    layout = preprocess.layout or _layout(spec.shape)
    _, height, width, channels = spec.shape if layout == "NHWC" else (spec.shape[0], *spec.shape[2:], spec.shape[1])
    channels = 3 if channels is None else channels
    if channels not in (1, 3):
        raise CalibrationError(f"input {spec.name!r} ({layout}) has {channels} channels; images give 1 or 3")
    for count in (len(preprocess.mean), len(preprocess.std)):
        if count not in (1, channels):
            raise CalibrationError(f"input {spec.name!r} has {channels} channels: give 1 or {channels} mean/std values")
    fixed = (height, width)
    size = preprocess.size or fixed
    if any(want is not None and want != got for want, got in zip(fixed, size)):
        raise CalibrationError(
            f"image size {size[0]}x{size[1]} (--image-size) does not match input {spec.name!r}'s fixed "
            f"{layout} shape {_shape(spec.shape)}"
        )
    if None in size:
        raise CalibrationError(f"input {spec.name!r} has no fixed height and width: give the image size (--image-size)")
    return layout, channels, size  # type: ignore[return-value]


def _layout(shape: tuple[int | None, ...]) -> str:
    """NHWC where only the last dim looks like channels (1 or 3), else NCHW."""
    return "NHWC" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "NCHW"


def _shape(shape: tuple[int | None, ...]) -> str:
    """A shape as printed, '?' for symbolic dims."""
    return f"[{', '.join('?' if d is None else str(d) for d in shape)}]"


def load_image(file: Path, preprocess: ImagePreprocess, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image as a float32 (height, width, channels) array, resized and normalized."""
    from PIL import Image, ImageOps

    height, width = size
    try:
        with Image.open(file) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CalibrationError(f"{file}: cannot read the image ({_first_line(exc)})") from exc
    method = Image.Resampling.BILINEAR
    if preprocess.resize == "crop":
        image = ImageOps.fit(image, (width, height), method)
    elif preprocess.resize == "pad":
        image = ImageOps.pad(image, (width, height), method)
    else:
        image = image.resize((width, height), method)
    pixels = np.asarray(image, dtype=np.float32).reshape(height, width, channels)
    if preprocess.channels == "BGR":
        pixels = pixels[..., ::-1]
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    return (pixels * np.float32(preprocess.scale) - mean) / std


def image_fit(inputs: Sequence[InputSpec]) -> str | None:
    """What image calibration fills for these inputs, or None if images cannot fill them."""
    try:
        spec = image_input(inputs)
    except CalibrationError:
        return None
    assert spec.shape is not None
    layout = _layout(spec.shape)
    return f"an image folder ({spec.name} {_shape(spec.shape)}, read as {layout}; --image-size where not fixed)"
