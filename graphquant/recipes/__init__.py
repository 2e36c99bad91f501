"""Recipes as data: a named, ordered list of passes with options, per-node overrides and a lowering target."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import sys
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass, TopologicalSortPass

from graphquant.analysis.calibration import Calibrator
from graphquant.errors import RecipeError
from graphquant.lowering import TARGETS
from graphquant.passes import PASSES
from graphquant.passes.fold_batchnorm import FoldBatchNormPass
from graphquant.passes.fold_constants import FoldConstantsPass
from graphquant.passes.quantize import NodeOverride
from graphquant.passes.upgrade_opset import UpgradeOpsetPass
from graphquant.pipeline import Pipeline

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Constructor parameters filled from the run's context, never from recipe options.
CONTEXT_PARAMETERS = ("calibrator", "overrides")


@dataclasses.dataclass(frozen=True)
class PassStep:
    """One pass of a recipe: its CLI name and its options."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named pass list with per-node overrides, lowered for one target."""

    name: str
    steps: tuple[PassStep, ...]
    description: str = ""
    target: str = "qdq"
    overrides: tuple[NodeOverride, ...] = ()

    def __post_init__(self) -> None:
        """Check pass names, options and target up front."""
        if self.target not in TARGETS:
            raise RecipeError(f"recipe {self.name!r}: unknown target {self.target!r} (known: {sorted(TARGETS)})")
        for step in self.steps:
            _check_options(step)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_name: str = "custom") -> Recipe:
        """Build a recipe from parsed TOML."""
        try:
            steps = tuple(PassStep(str(p["name"]), dict(p.get("options", {}))) for p in data.get("passes", []))
            overrides = tuple(
                NodeOverride(str(o["nodes"]), {k: v for k, v in o.items() if k != "nodes"})
                for o in data.get("overrides", [])
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise RecipeError(f"recipe {default_name!r}: malformed ({exc})") from exc
        if not steps:
            raise RecipeError(f"recipe {default_name!r} lists no passes")
        return cls(
            name=str(data.get("name", default_name)),
            steps=steps,
            description=str(data.get("description", "")),
            target=str(data.get("target", "qdq")),
            overrides=overrides,
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> Recipe:
        """Read a recipe file."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RecipeError(f"{path}: cannot read recipe ({exc})") from exc
        try:
            return cls.from_dict(data, default_name=Path(path).stem)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None

    @classmethod
    def named(cls, name_or_path: str | Path) -> Recipe:
        """A preset by name, or a recipe file by path."""
        if str(name_or_path).endswith(".toml"):
            return cls.from_toml(name_or_path)
        presets = preset_names()
        if name_or_path not in presets:
            raise RecipeError(f"unknown recipe {str(name_or_path)!r} (presets: {', '.join(presets)})")
        text = resources.files("graphquant.recipes.presets").joinpath(f"{name_or_path}.toml").read_text("utf-8")
        return cls.from_dict(tomllib.loads(text), default_name=str(name_or_path))

    def with_options(self, **options: Any) -> Recipe:
        """Set each option on every step whose pass accepts it; options no step accepts are refused."""
        given = {key: value for key, value in options.items() if value is not None}
        used: set[str] = set()
        steps = []
        for step in self.steps:
            accepted = {k: v for k, v in given.items() if k in _parameters(PASSES[step.name])}
            used.update(accepted)
            steps.append(PassStep(step.name, {**step.options, **accepted}))
        unused = sorted(set(given) - used)
        if unused:
            raise RecipeError(f"recipe {self.name!r}: no pass takes option {unused[0]!r}")
        return dataclasses.replace(self, steps=tuple(steps))

    def with_passes(self, names: Sequence[str]) -> Recipe:
        """The same recipe running the given passes, each keeping its options from this recipe."""
        options = {step.name: step.options for step in self.steps}
        return dataclasses.replace(self, steps=tuple(PassStep(n, options.get(n, {})) for n in names))

    def with_target(self, target: str | None) -> Recipe:
        """The same recipe lowered for another target."""
        return self if target is None else dataclasses.replace(self, target=target)

    def to_pipeline(
        self, calibrator: Calibrator | None = None, *, first_step: int = 0, prelude: bool = True, lower: bool = True
    ) -> Pipeline:
        """Opset floor, constant folding, name fixing, BN folding, the passes, lowering, dead-node removal, a sort.

        ``prelude`` False leaves out the four clean-ups, ``first_step`` the steps before it, ``lower`` False the
        lowering and the clean-up after it (the auto search prepares a graph once and finishes clones of it).
        """
        passes: list[ir.passes.PassBase] = []
        if prelude:
            passes.extend([UpgradeOpsetPass(), FoldConstantsPass(), NameFixPass(), FoldBatchNormPass()])
        passes.extend(self._build(step, calibrator) for step in self.steps[first_step:])
        if lower:
            passes.extend(lowering() for lowering in TARGETS[self.target])
            passes.extend([RemoveUnusedNodesPass(), TopologicalSortPass()])
        return Pipeline(passes)

    def _build(self, step: PassStep, calibrator: Calibrator | None) -> ir.passes.PassBase:
        """Construct one pass with its options and the run's context."""
        pass_class = PASSES[step.name]
        context = {"calibrator": calibrator, "overrides": self.overrides}
        arguments = {k: v for k, v in context.items() if k in _parameters(pass_class, context=True)}
        try:
            return pass_class(**arguments, **step.options)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"pass {step.name!r}: {exc}") from exc


def preset_names() -> list[str]:
    """Names of the recipes shipped with graphquant (``auto``, the search, is not a fixed pass list: see auto.py)."""
    folder = resources.files("graphquant.recipes.presets")
    return sorted(entry.name.removesuffix(".toml") for entry in folder.iterdir() if entry.name.endswith(".toml"))


def _parameters(pass_class: type, context: bool = False) -> set[str]:
    """Keyword options of a pass constructor (context parameters only if asked)."""
    names = set(inspect.signature(pass_class.__init__).parameters) - {"self"}
    return names & set(CONTEXT_PARAMETERS) if context else names - set(CONTEXT_PARAMETERS)


def _check_options(step: PassStep) -> None:
    """Refuse unknown pass names and options."""
    if step.name not in PASSES:
        raise RecipeError(f"unknown pass {step.name!r} (passes: {', '.join(sorted(PASSES))})")
    unknown = sorted(set(step.options) - _parameters(PASSES[step.name]))
    if unknown:
        raise RecipeError(f"pass {step.name!r}: unknown option {unknown[0]!r}")
    hints = typing.get_type_hints(PASSES[step.name].__init__)
    for key, value in step.options.items():
        allowed = typing.get_args(hints[key]) or (hints[key],)  # X | None gives (X, NoneType)
        if all(isinstance(kind, type) for kind in allowed) and not _fits(value, allowed):
            names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in allowed)
            raise RecipeError(f"pass {step.name!r}: option {key!r} must be {names}, got {value!r}")
        if isinstance(value, numbers.Real) and not math.isfinite(value):
            raise RecipeError(f"pass {step.name!r}: option {key!r} must be a finite number, got {value!r}")


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    """Whether an option value has one of the allowed types (any integer passes for a float; a bool only for a bool)."""
    if isinstance(value, (bool, np.bool_)):
        return bool in allowed
    if isinstance(value, numbers.Integral) and (int in allowed or float in allowed):
        return True
    return isinstance(value, allowed) or (isinstance(value, numbers.Real) and float in allowed)
