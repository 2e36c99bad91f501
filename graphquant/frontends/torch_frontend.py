"""PyTorch frontend: export a torch module/program to an ``onnx_ir.Model`` via the dynamo exporter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import onnx_ir

if TYPE_CHECKING:
    import torch

_INSTALL_HINT = "graphquant.from_torch needs PyTorch; install it with `pip install graphquant[torch]`."


def _import_torch() -> Any:
    """Import torch lazily, raising an ImportError with an install hint when it is missing."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return torch


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise example positional inputs to the tuple torch.onnx.export expects."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _to_ir_model(program: Any) -> onnx_ir.Model:
    """Extract the ``onnx_ir.Model`` held by the ONNXProgram that torch.onnx.export returns."""
    model = program.model
    if not isinstance(model, onnx_ir.Model):
        raise TypeError(f"torch.onnx.export returned a {type(model).__name__}, expected onnx_ir.Model")
    return model


def _export(
    torch: Any,
    module: Any,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None,
    dynamic_shapes: Mapping[str, Any] | tuple[Any, ...] | list[Any] | None,
    opset_version: int,
) -> onnx_ir.Model:
    """Run torch.onnx.export(dynamo=True) and return the resulting onnx_ir Model."""
    program = torch.onnx.export(
        module,
        _as_args(example_inputs),
        kwargs=example_kwargs,
        dynamic_shapes=dynamic_shapes,
        opset_version=opset_version,
        dynamo=True,
        verbose=False,
    )
    return _to_ir_model(program)


def from_torch(
    module: torch.nn.Module | torch.fx.GraphModule | torch.export.ExportedProgram,
    example_inputs: Any,
    *,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Mapping[str, Any] | tuple[Any, ...] | list[Any] | None = None,
    opset_version: int = 18,
) -> onnx_ir.Model:
    """Export a torch Module, fx.GraphModule or ExportedProgram with the dynamo exporter to an onnx_ir Model."""
    torch = _import_torch()
    if isinstance(module, torch.export.ExportedProgram):
        return _export(torch, module, example_inputs, example_kwargs, dynamic_shapes, opset_version)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected torch.nn.Module or torch.export.ExportedProgram, got {type(module).__name__}")
    was_training = module.training
    module.eval()
    try:
        return _export(torch, module, example_inputs, example_kwargs, dynamic_shapes, opset_version)
    finally:
        module.train(was_training)
