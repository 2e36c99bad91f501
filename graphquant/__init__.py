"""graphquant: a post-training quantization compiler over ONNX graphs."""

from __future__ import annotations

from graphquant.analysis.calibration import Calibrator
from graphquant.analysis.stats import CalibrationStats, TensorStats
from graphquant.api import OptimizeResult, from_torch, load, optimize, save
from graphquant.errors import (
    CalibrationError,
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

__all__ = [
    "CalibrationError",
    "CalibrationStats",
    "Calibrator",
    "FidelityError",
    "GraphQuantError",
    "InvalidModelError",
    "OptimizeResult",
    "OutputError",
    "PassStep",
    "Pipeline",
    "Recipe",
    "RecipeError",
    "TensorStats",
    "compare_models",
    "from_torch",
    "load",
    "optimize",
    "save",
]
