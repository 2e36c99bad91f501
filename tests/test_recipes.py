"""Recipes as data (presets, TOML, option/pass/target edits) and the Pipeline they build."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from builders import build, feeds, named_mlp, run, weights

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.errors import RecipeError
from graphquant.lowering import TARGETS
from graphquant.passes.quantize import NodeOverride, QuantizePass
from graphquant.pipeline import Pipeline
from graphquant.quant_spec import DECISION_KEY
from graphquant.recipes import PassStep, Recipe, preset_names

CUSTOM = """
name = "mine"
description = "W4 weights, percentile activations"
target = "qdq"

[[passes]]
name = "quantize"
options = { wbits = 4, abits = 8, activation_method = "percentile", percentile = 99.9 }

[[overrides]]
nodes = "fc2"
skip = true

[[overrides]]
nodes = "fc1*"
wbits = 6
"""


def write(tmp_path, text: str, name: str = "recipe.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_presets_are_listed_and_load():
    names = preset_names()
    assert "w8a8" in names
    assert names == sorted(names)
    for name in names:
        recipe = Recipe.named(name)
        assert recipe.name == name and recipe.steps and recipe.target in TARGETS
    w8a8 = Recipe.named("w8a8")
    assert w8a8.steps == (PassStep("quantize", {"wbits": 8, "abits": 8, "activation_method": "minmax"}),)
    assert w8a8.overrides == ()


def test_toml_round_trip_with_overrides(tmp_path):
    expected = Recipe(
        name="mine",
        description="W4 weights, percentile activations",
        target="qdq",
        steps=(PassStep("quantize", {"wbits": 4, "abits": 8, "activation_method": "percentile", "percentile": 99.9}),),
        overrides=(NodeOverride("fc2", {"skip": True}), NodeOverride("fc1*", {"wbits": 6})),
    )
    path = write(tmp_path, CUSTOM)
    assert Recipe.from_toml(path) == expected
    assert Recipe.named(str(path)) == expected  # a .toml path is accepted where a preset name is
    unnamed = write(tmp_path, CUSTOM.replace('name = "mine"\n', ""), "my_recipe.toml")
    assert Recipe.from_toml(unnamed).name == "my_recipe"  # the file stem names an unnamed recipe


def test_toml_recipe_builds_the_pipeline_it_describes(tmp_path):
    rng = np.random.default_rng(0)
    model = named_mlp(rng)
    calibrator = Calibrator.for_model(model, feeds(rng, 2, 64, 16), show_progress=False)
    pipeline = Recipe.from_toml(write(tmp_path, CUSTOM)).to_pipeline(calibrator)
    assert pipeline.describe() == [
        "UpgradeOpsetPass",
        "FoldConstantsPass",
        "NameFixPass",
        "FoldBatchNormPass",
        "QuantizePass",
        "QdqLoweringPass",
        "UnsignedWeightsPass",
        "RemoveUnusedNodesPass",
        "TopologicalSortPass",
    ]
    quantize = pipeline.passes[4]
    assert isinstance(quantize, QuantizePass)
    assert (quantize.defaults.wbits, quantize.defaults.abits) == (4, 8)
    assert (quantize.activation_method, quantize.percentile) == ("percentile", 99.9)
    assert quantize.calibrator is calibrator
    pipeline(model)
    decisions = {node.name: node.meta[DECISION_KEY] for node in model.graph if DECISION_KEY in node.meta}
    assert decisions["fc2"].status == "float"
    assert decisions["fc1"].scheme == "W6 per-channel, A8 per-tensor percentile"
    codes = model.graph.initializers["w1_quantized"].const_value.numpy()
    assert np.abs(codes).max() == 31
    assert "w2" in model.graph.initializers  # fc2 kept its float weight


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[passes]]\nname = "fold-everything"\n', "unknown pass 'fold-everything'"),
        ('[[passes]]\nname = "quantize"\noptions = { wbitz = 4 }\n', "unknown option 'wbitz'"),
        ('target = "tensorrt-int4"\n[[passes]]\nname = "quantize"\n', "unknown target 'tensorrt-int4'"),
        ('[[passes]\nname = "quantize"\n', "cannot read recipe"),
        ("[[passes]]\noptions = { wbits = 4 }\n", "malformed"),
        ('passes = "quantize"\n', "malformed"),
        ('[[passes]]\nname = "quantize"\n[[overrides]]\nwbits = 4\n', "malformed"),
        ('name = "nothing"\n', "lists no passes"),
    ],
    ids=["unknown-pass", "unknown-option", "unknown-target", "bad-toml", "no-name", "not-a-table", "no-nodes", "empty"],
)
def test_bad_recipes_are_refused(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_toml(write(tmp_path, text))


@pytest.mark.parametrize(
    ("override", "message"),
    [("wbits = 9", "wbits must be in 2..8"), ("wbit = 4", "unknown options")],
)
def test_bad_overrides_are_refused_when_the_pipeline_is_built(tmp_path, override, message):
    text = f'[[passes]]\nname = "quantize"\n[[overrides]]\nnodes = "fc1"\n{override}\n'
    recipe = Recipe.from_toml(write(tmp_path, text))
    with pytest.raises(RecipeError, match=message):
        recipe.to_pipeline(None)


def test_missing_recipe_file_and_unknown_preset_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        Recipe.named(str(tmp_path / "absent.toml"))
    with pytest.raises(RecipeError, match="unknown recipe 'w3a3'"):
        Recipe.named("w3a3")


def test_with_options_sets_the_option_on_passes_that_take_it():
    recipe = Recipe.named("w8a8")
    changed = recipe.with_options(wbits=4, abits=None)
    assert changed.steps[0].options == {"wbits": 4, "abits": 8, "activation_method": "minmax"}
    assert recipe.steps[0].options["wbits"] == 8  # the original is unchanged
    assert recipe.with_options() == recipe
    with pytest.raises(RecipeError, match="no pass takes option 'bogus'"):
        recipe.with_options(bogus=1)


def test_with_passes_and_with_target():
    recipe = Recipe.named("w8a8")
    assert recipe.with_passes(["quantize"]).steps == recipe.steps  # options carried over
    with pytest.raises(RecipeError, match="unknown pass 'nope'"):
        recipe.with_passes(["quantize", "nope"])
    assert recipe.with_target(None) is recipe
    assert recipe.with_target("qdq").target == "qdq"
    with pytest.raises(RecipeError, match="unknown target 'tflite'"):
        recipe.with_target("tflite")


class ScaleInitializerPass(ir.passes.InPlacePass):
    """Multiply one initializer by a factor."""

    def __init__(self, name: str, factor: float, log: list[str]):
        super().__init__()
        self.name, self.factor, self.log = name, factor, log

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value = model.graph.initializers[self.name]
        value.const_value = ir.tensor(value.const_value.numpy() * np.float32(self.factor), name=self.name)
        self.log.append(f"scale {self.name}")
        return ir.passes.PassResult(model, modified=True)


class CountNodesPass(ir.passes.InPlacePass):
    """Record the node count; change nothing."""

    def __init__(self, log: list[str]):
        super().__init__()
        self.log = log

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.log.append(f"count {len(model.graph)}")
        return ir.passes.PassResult(model, modified=False)


def test_pipeline_runs_hand_made_passes_in_order():
    rng = np.random.default_rng(1)
    model = named_mlp(rng)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    (before,) = run(model, {"x": x})
    log: list[str] = []
    passes = [CountNodesPass(log), ScaleInitializerPass("w2", 2.0, log), ScaleInitializerPass("b2", 2.0, log)]
    pipeline = Pipeline(passes)
    assert pipeline.describe() == ["CountNodesPass", "ScaleInitializerPass", "ScaleInitializerPass"]
    result = pipeline(model)
    assert result.modified and result.model is model
    assert log == ["count 4", "scale w2", "scale b2"]
    (after,) = run(model, {"x": x})
    np.testing.assert_allclose(after, 2.0 * before, rtol=1e-6, atol=1e-6)
    log.clear()
    assert not Pipeline([CountNodesPass(log)])(model).modified


def test_empty_pipeline_is_refused():
    with pytest.raises(ValueError, match="at least one pass"):
        Pipeline([])


def test_splitquant_runs_the_weight_only_steps_with_the_same_options():
    """SplitQuant is compared with weight-only at equal options: only the split-quant step differs."""
    weight_only, splitquant = Recipe.named("weight-only"), Recipe.named("splitquant")
    assert [step for step in splitquant.steps if step.name != "split-quant"] == list(weight_only.steps)


TRANSPOSED_WEIGHT = """
<ir_version: 8, opset_import: ["" : 17]>
transposed (float[N, 16] x) => (float[N, 8] y) {
  [wt] t = Transpose<perm: ints = [1, 0]>(w)
  [fc] y = MatMul(x, t)
}
"""


@pytest.mark.parametrize("recipe", ["w8a8", "outliertune", "weight-only"])
def test_every_recipe_quantizes_a_weight_that_a_constant_subgraph_computes(recipe):
    rng = np.random.default_rng(7)
    model = build(TRANSPOSED_WEIGHT, {"w": weights(rng, 8, 16)})
    result = graphquant.optimize(model, recipe, calibration=feeds(rng, 2, 32, 16), show_progress=False)
    assert [layer.node for layer in result.report.quantized] == ["fc"]
    assert result.report.outputs["y"].sqnr_db > 15.0  # weight-only is W4
