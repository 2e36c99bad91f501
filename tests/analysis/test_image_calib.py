"""Image calibration: a folder of generated PNGs preprocessed into the graph's image input, against hand-built arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from builders import build, ops, save_model

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.data import CalibrationData, InputSpec
from graphquant.analysis.image_calib import ImageCalibration, ImagePreprocess, image_fit
from graphquant.cli import main
from graphquant.errors import CalibrationError, RecipeError

Image = pytest.importorskip("PIL.Image")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

CONV_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
conv (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
  h = Conv<pads = [1, 1, 1, 1]>(x, w, b)
  y = Relu(h)
}
"""


def write_images(folder: Path, count: int, height: int = 8, width: int = 8, seed: int = 0) -> list[np.ndarray]:
    """``count`` random RGB PNGs named img_<i>.png; returns their pixels in name order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
    for index, array in enumerate(pixels):
        Image.fromarray(array).save(folder / f"img_{index:02d}.png")
    return pixels


def normalized(pixels: np.ndarray, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> np.ndarray:
    """(pixel / 255 - mean) / std per channel, as float32 HWC."""
    return ((pixels.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)).astype(np.float32)


@pytest.fixture
def conv_model() -> object:
    """A 3x3 conv (3 -> 4 channels) on 8x8 NCHW images, then Relu."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    return build(CONV_MODEL, {"w": w, "b": rng.standard_normal(4).astype(np.float32)})


def test_images_are_normalized_and_laid_out_nchw(tmp_path, conv_model):
    pixels = write_images(tmp_path / "images", 5)
    source = ImageCalibration(tmp_path / "images", ImagePreprocess(mean=MEAN, std=STD), batch_size=2)
    batches = list(CalibrationData(source, InputSpec.of_model(conv_model)))
    assert [batch["x"].shape for batch in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    expected = np.stack([normalized(array) for array in pixels]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(np.concatenate([batch["x"] for batch in batches]), expected, rtol=0, atol=1e-6)


def test_image_statistics_equal_those_of_the_same_arrays_in_an_npz(tmp_path, conv_model):
    pixels = write_images(tmp_path / "images", 6)
    npz = tmp_path / "images.npz"
    np.savez(npz, x=np.stack([normalized(array) for array in pixels]).transpose(0, 3, 1, 2))
    source = ImageCalibration(tmp_path / "images", ImagePreprocess(mean=MEAN, std=STD))
    names = ["x", "h", "y"]
    from_images = Calibrator.for_model(conv_model, source, False).collect(conv_model, names)
    from_npz = Calibrator.for_model(conv_model, npz, False).collect(conv_model, names)
    for name in names:
        image_stats, npz_stats = from_images.tensors[name], from_npz.tensors[name]
        assert image_stats.count == npz_stats.count
        np.testing.assert_allclose(image_stats.channel_min, npz_stats.channel_min, rtol=0, atol=1e-5)
        np.testing.assert_allclose(image_stats.channel_max, npz_stats.channel_max, rtol=0, atol=1e-5)
        np.testing.assert_allclose(image_stats.channel_sum, npz_stats.channel_sum, rtol=1e-5, atol=1e-3)


def test_a_plain_folder_path_reads_as_images_with_the_default_scale(tmp_path, conv_model):
    pixels = write_images(tmp_path / "images", 3)
    batch = next(iter(CalibrationData(tmp_path / "images", InputSpec.of_model(conv_model))))
    expected = np.stack([array.astype(np.float32) / np.float32(255) for array in pixels]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(batch["x"], expected, rtol=0, atol=1e-7)


def test_files_are_read_in_sorted_path_order_with_subfolders(tmp_path):
    folder = tmp_path / "images"
    values = {"b.png": 20, "a.jpg": 10, "sub/c.png": 30, "notes.txt": 0}
    for name, value in values.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("txt"):
            (folder / name).write_text("not an image")
        else:
            Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(folder / name)
    specs = [InputSpec("x", np.dtype(np.float32), (None, 1, 4, 4))]
    batch = next(iter(CalibrationData(ImageCalibration(folder, ImagePreprocess(scale=1.0)), specs)))
    assert batch["x"][:, 0, 0, 0].tolist() == [10, 20, 30]


def test_nhwc_bgr_and_scale_mean_std_in_pixel_units(tmp_path):
    pixels = write_images(tmp_path / "images", 2, height=6, width=5)
    specs = [InputSpec("image", np.dtype(np.float32), (None, 6, 5, 3))]  # NHWC guessed: channels last
    preprocess = ImagePreprocess(scale=1.0, mean=(127.5,), std=(127.5,), channels="BGR")
    batch = next(iter(CalibrationData(ImageCalibration(tmp_path / "images", preprocess), specs)))
    expected = np.stack([(array[..., ::-1].astype(np.float32) - 127.5) / 127.5 for array in pixels])
    np.testing.assert_allclose(batch["image"], expected, rtol=0, atol=1e-6)


def test_crop_takes_the_centre_and_image_size_fills_dynamic_dims(tmp_path):
    pixels = write_images(tmp_path / "images", 1, height=16, width=8)
    specs = [InputSpec("x", np.dtype(np.float32), (None, 3, None, None))]
    preprocess = ImagePreprocess(size=(8, 8), resize="crop", scale=1.0)
    batch = next(iter(CalibrationData(ImageCalibration(tmp_path / "images", preprocess), specs)))
    np.testing.assert_array_equal(batch["x"][0], pixels[0][4:12].transpose(2, 0, 1).astype(np.float32))
    with pytest.raises(CalibrationError, match=r"images: input 'x' has no fixed height and width: .*--image-size"):
        CalibrationData(ImageCalibration(tmp_path / "images"), specs)


def test_an_image_size_that_contradicts_the_fixed_dims_is_refused(tmp_path, conv_model):
    write_images(tmp_path / "images", 2)
    source = ImageCalibration(tmp_path / "images", ImagePreprocess(size=(16, 16)))
    with pytest.raises(CalibrationError, match=r"image size 16x16 .* does not match input 'x'.*\[\?, 3, 8, 8\]"):
        CalibrationData(source, InputSpec.of_model(conv_model))


def test_an_unreadable_image_is_named(tmp_path, conv_model):
    write_images(tmp_path / "images", 2)
    (tmp_path / "images" / "img_01.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(CalibrationError, match=r"img_01.png: cannot read the image"):
        list(CalibrationData(ImageCalibration(tmp_path / "images"), InputSpec.of_model(conv_model)))


def test_a_folder_without_images_is_refused(tmp_path, conv_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match=r"empty: no images \(.png, .jpg.*\) and no test_data_set_\* folders"):
        CalibrationData(tmp_path / "empty", InputSpec.of_model(conv_model))


def test_inputs_that_images_cannot_fill_are_named(tmp_path):
    write_images(tmp_path / "images", 1)
    image = InputSpec("x", np.dtype(np.float32), (None, 3, 8, 8))
    for specs, message in (
        ([image, InputSpec("scale", np.dtype(np.float32), (1,))], "input 'scale' cannot be filled from images"),
        ([image, InputSpec("y", np.dtype(np.float32), (None, 3, 8, 8))], r"the model has 2 \('x', 'y'\)"),
        ([InputSpec("ids", np.dtype(np.int64), (None, 8))], r"the model has 0 \(none\)"),
    ):
        with pytest.raises(CalibrationError, match=message):
            CalibrationData(ImageCalibration(tmp_path / "images"), specs)
        assert image_fit(specs) is None
    assert image_fit([image]) is not None and "x [?, 3, 8, 8], read as NCHW" in image_fit([image])


def test_a_recipe_preprocess_table(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        '[[passes]]\nname = "quantize"\n[preprocess]\nsize = 32\nmean = [0.5, 0.5, 0.5]\nstd = 0.25\nlayout = "NHWC"\n'
    )
    assert ImagePreprocess.from_recipe(recipe) == ImagePreprocess(
        size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25,), layout="NHWC"
    )
    recipe.write_text('[[passes]]\nname = "quantize"\n[preprocess]\nsize = 32\nmeans = 0.5\n')
    with pytest.raises(RecipeError, match=r"recipe.toml: unknown \[preprocess\] key 'means'"):
        ImagePreprocess.from_recipe(recipe)
    recipe.write_text('[[passes]]\nname = "quantize"\n[preprocess]\nlayout = "CHW"\n')
    with pytest.raises(RecipeError, match=r"recipe.toml: \[preprocess\]: image layout 'CHW' is not one of NCHW, NHWC"):
        ImagePreprocess.from_recipe(recipe)


def test_cli_optimize_from_images_with_a_recipe_preprocess_table_writes_the_model_the_npz_gives(
    tmp_path, conv_model, capsys
):
    model = save_model(conv_model, tmp_path / "model.onnx")
    pixels = write_images(tmp_path / "images", 4)
    recipe = tmp_path / "w8a8-images.toml"
    recipe.write_text(
        'target = "qdq"\n[[passes]]\nname = "quantize"\noptions = { wbits = 8, abits = 8, activation_method = "minmax" }\n'
        "[preprocess]\nscale = 1.0\nmean = [10, 20, 30]\nstd = 4\n"
    )
    npz = tmp_path / "images.npz"  # exact in float32: integer pixels, a power-of-two std
    np.savez(
        npz, x=np.stack([(array - np.float32([10, 20, 30])) / np.float32(2) for array in pixels]).transpose(0, 3, 1, 2)
    )
    common = ["optimize", model, "--recipe", str(recipe)]
    assert main([*common, "-o", str(tmp_path / "images.onnx"), "--calib", str(tmp_path / "images"), "--std", "2"]) == 0
    assert main([*common, "-o", str(tmp_path / "npz.onnx"), "--calib", str(npz)]) == 0
    assert (tmp_path / "images.onnx").read_bytes() == (tmp_path / "npz.onnx").read_bytes()
    assert "QuantizeLinear" in ops(graphquant.load(tmp_path / "images.onnx"))
    held_out = ["-o", str(tmp_path / "held.onnx"), "--calib", str(npz), "--validate-data", str(tmp_path / "images")]
    assert main([*common, *held_out, "--std", "2"]) == 0
    assert (tmp_path / "held.onnx").read_bytes() == (tmp_path / "npz.onnx").read_bytes()
    capsys.readouterr()
    preprocess = ["--scale", "1", "--mean", "10,20,30", "--std", "2"]
    assert main(["inspect", model, "--calib", str(tmp_path / "images"), *preprocess]) == 0
    from_images = capsys.readouterr().out
    assert main(["inspect", model, "--calib", str(npz)]) == 0
    assert from_images == capsys.readouterr().out
    assert "or an image folder (x [?, 3, 8, 8], read as NCHW" in from_images
    assert (
        main(["validate", model, str(tmp_path / "images.onnx"), "--calib", str(tmp_path / "images"), *preprocess]) == 0
    )
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 1 and rows[0].split()[0] == "y" and float(rows[0].split()[1]) > 0.99


def test_cli_image_errors_are_one_line(tmp_path, conv_model, capsys):
    model = save_model(conv_model, tmp_path / "model.onnx")
    write_images(tmp_path / "images", 2)
    (tmp_path / "images" / "img_01.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    for calib, extra, message in (
        ("images", [], "img_01.png: cannot read the image"),
        ("empty", [], "empty: no images"),
        ("images", ["--image-size", "4x6"], "image size 4x6 (--image-size) does not match input 'x'"),
    ):
        argv = [
            "optimize",
            model,
            "-o",
            str(tmp_path / "out.onnx"),
            "--recipe",
            "w8a8",
            "--calib",
            str(tmp_path / calib),
        ]
        assert main([*argv, *extra]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("graphquant: error")]
        assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out.onnx").exists()
