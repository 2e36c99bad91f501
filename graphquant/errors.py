"""The one exception hierarchy that graphquant raises for user-facing failures."""

from __future__ import annotations


class GraphQuantError(Exception):
    """Base class of every error graphquant reports to a user."""


class InvalidModelError(GraphQuantError):
    """The model file is missing, unreadable, unsafe or not a valid ONNX model."""


class CalibrationError(GraphQuantError):
    """The calibration data does not fit the model or holds no usable values."""


class RecipeError(GraphQuantError):
    """A recipe, pass name or pass option is unknown or malformed."""


class OutputError(GraphQuantError):
    """The output could not be written, or would overwrite the input."""


class FidelityError(GraphQuantError):
    """The quantized model failed validation: an output is far from the float model's, or not finite."""


class ExecutorError(GraphQuantError):
    """The executor chosen for validation is unknown or not installed."""


class InternalError(Exception):
    """A bug inside graphquant: the message names the pass that failed and the first line of its error."""
