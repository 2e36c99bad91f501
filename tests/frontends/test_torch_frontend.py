"""from_torch: nn.Module, fx.GraphModule and ExportedProgram all export to onnx_ir and match torch numerically."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import graphquant
from builders import run

torch = pytest.importorskip("torch")


class TinyBlock(torch.nn.Module):
    """LayerNorm -> Linear -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def _example() -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


def _check_matches_torch(model: ir.Model, module: torch.nn.Module) -> None:
    """The exported graph gives torch's output in onnxruntime."""
    x = _example()
    with torch.inference_mode():
        expected = module(x).numpy()
    (input_value,) = model.graph.inputs
    (actual,) = run(model, {input_value.name: x.numpy()})
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["module", "graph_module", "exported_program"])
def test_from_torch_accepts_each_form(form: str) -> None:
    """Each accepted torch form exports to an onnx_ir model equal to torch in onnxruntime."""
    module = TinyBlock().eval()
    source = {
        "module": lambda: module,
        "graph_module": lambda: torch.fx.symbolic_trace(module),
        "exported_program": lambda: torch.export.export(module, (_example(),)),
    }[form]()
    model = graphquant.from_torch(source, (_example(),))
    assert isinstance(model, ir.Model)
    assert sum(node.op_type in ("MatMul", "Gemm") for node in model.graph) == 2
    _check_matches_torch(model, module)


def test_from_torch_output_quantizes(tmp_path) -> None:
    """An exported module goes through the w8a8 recipe and stays close to float."""
    module = TinyBlock().eval()
    model = graphquant.from_torch(module, (_example(),))
    (input_value,) = model.graph.inputs
    rng = np.random.default_rng(0)
    calibration = [{input_value.name: rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(4)]
    result = graphquant.optimize(model, "w8a8", calibration=calibration, show_progress=False)
    assert len(result.report.quantized) == 2
    (output,) = result.report.outputs.values()
    assert output.sqnr_db > 25
    assert graphquant.save(result, tmp_path / "tiny.onnx").stat().st_size > 0
