"""graphquant: a post-training quantization compiler over ONNX graphs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphquant.analysis.calibration import Calibrator
    from graphquant.analysis.image_calib import ImageCalibration, ImagePreprocess
    from graphquant.analysis.stats import CalibrationStats, TensorStats
    from graphquant.analysis.text_calib import TextCalibration
    from graphquant.api import OptimizeResult, from_torch, load, optimize, save
    from graphquant.errors import (
        CalibrationError,
        ExecutorError,
        FidelityError,
        GraphQuantError,
        InvalidModelError,
        OutputError,
        RecipeError,
    )
    from graphquant.pipeline import Pipeline
    from graphquant.recipes import PassStep, Recipe
    from graphquant.validate import compare_models

__version__ = "0.1.0"

# Each public name and its module, imported on first use: `graphquant.cli` starts (and answers Ctrl-C with one line)
# before numpy, onnx and onnxruntime are loaded.
_EXPORTS = {
    "CalibrationError": "graphquant.errors",
    "CalibrationStats": "graphquant.analysis.stats",
    "Calibrator": "graphquant.analysis.calibration",
    "ExecutorError": "graphquant.errors",
    "FidelityError": "graphquant.errors",
    "GraphQuantError": "graphquant.errors",
    "ImageCalibration": "graphquant.analysis.image_calib",
    "ImagePreprocess": "graphquant.analysis.image_calib",
    "InvalidModelError": "graphquant.errors",
    "OptimizeResult": "graphquant.api",
    "OutputError": "graphquant.errors",
    "PassStep": "graphquant.recipes",
    "Pipeline": "graphquant.pipeline",
    "Recipe": "graphquant.recipes",
    "RecipeError": "graphquant.errors",
    "TensorStats": "graphquant.analysis.stats",
    "TextCalibration": "graphquant.analysis.text_calib",
    "compare_models": "graphquant.validate",
    "from_torch": "graphquant.api",
    "load": "graphquant.api",
    "optimize": "graphquant.api",
    "save": "graphquant.api",
}

__all__ = [
    "CalibrationError",
    "CalibrationStats",
    "Calibrator",
    "ExecutorError",
    "FidelityError",
    "GraphQuantError",
    "ImageCalibration",
    "ImagePreprocess",
    "InvalidModelError",
    "OptimizeResult",
    "OutputError",
    "PassStep",
    "Pipeline",
    "Recipe",
    "RecipeError",
    "TensorStats",
    "TextCalibration",
    "compare_models",
    "from_torch",
    "load",
    "optimize",
    "save",
]


def __getattr__(name: str) -> Any:
    """A public name, or a submodule, imported on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, loaded or not."""
    return sorted({*globals(), *_EXPORTS})
