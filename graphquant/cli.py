"""The `graphquant` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import graphquant
from graphquant.analysis.calibration import Calibrator
from graphquant.errors import GraphQuantError
from graphquant.lowering import TARGET_DOCS, TARGETS
from graphquant.passes import PASSES
from graphquant.recipes import Recipe, preset_names
from graphquant.summary import activation_summaries, layer_table, op_histogram
from graphquant.validate import DEFAULT_MIN_COSINE, compare_models


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand and return its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    warnings.simplefilter("always")
    warnings.showwarning = _show_warning
    try:
        return int(args.run(args) or 0)
    except GraphQuantError as exc:
        return _fail(args, str(exc))
    except KeyboardInterrupt:
        return _fail(args, "interrupted", code=130)
    except Exception as exc:  # last resort: one line, traceback only under --debug
        return _fail(args, f"internal error: {type(exc).__name__}: {exc}".splitlines()[0])


def _fail(args: argparse.Namespace, message: str, code: int = 1) -> int:
    """Print one error line (and the traceback under --debug) and return the exit code."""
    if getattr(args, "debug", False):
        traceback.print_exc()
    print(f"graphquant: error: {message}", file=sys.stderr)
    return code


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    """Warnings as one line each."""
    print(f"graphquant: warning: {message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="graphquant", description="Post-training quantization compiler for ONNX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    optimize = commands.add_parser("optimize", help="quantize a model with a recipe")
    optimize.add_argument("model", type=Path)
    optimize.add_argument("-o", "--output", type=Path, required=True)
    optimize.add_argument("--recipe", default="w8a8", help="preset name or recipe .toml")
    optimize.add_argument("--calib", help="calibration .npz, test-data folder, or 'random'")
    optimize.add_argument("--validate-data", help="held-out data for validation (default: the calibration data)")
    optimize.add_argument("--wbits", type=int)
    optimize.add_argument("--abits", type=int)
    optimize.add_argument("--block-size", type=int, help="weight block size along the input channels")
    optimize.add_argument("--gptq", action="store_const", const=True, help="GPTQ rounding of the weights")
    optimize.add_argument("--embed-bits", type=int, help="bits of the embedding tables (recipes that quantize them)")
    optimize.add_argument("--embed-block-size", type=int, help="embedding block size along the hidden axis")
    optimize.add_argument("--max-overhead", type=float, help="extra MACs the split passes may add (default 0.10)")
    optimize.add_argument("--passes", help="comma-separated pass names replacing the recipe's list")
    optimize.add_argument("--target", choices=sorted(TARGETS))
    optimize.add_argument("--report", type=Path, help="write the run report as JSON")
    optimize.add_argument("--layers", action="store_true", help="print every layer's scheme, SQNR and reason")
    optimize.add_argument("--overwrite", action="store_true", help="allow -o to name the input file")
    optimize.add_argument(
        "--min-cosine",
        type=float,
        help=f"fail unless every output's cosine against the float model reaches this (default {DEFAULT_MIN_COSINE})",
    )
    optimize.add_argument(
        "--keep-failed", action="store_true", help="write the model even if validation fails (exit 1)"
    )
    optimize.set_defaults(run=_optimize)

    inspect = commands.add_parser("inspect", help="op histogram, quantizable layers, activation outliers")
    inspect.add_argument("model", type=Path)
    inspect.add_argument("--calib", help="calibration data for per-layer activation ranges")
    inspect.set_defaults(run=_inspect)

    validate = commands.add_parser("validate", help="compare a model with its reference in onnxruntime")
    validate.add_argument("reference", type=Path)
    validate.add_argument("candidate", type=Path)
    validate.add_argument("--calib", required=True, help="inputs: .npz, test-data folder, or 'random'")
    validate.set_defaults(run=_validate)

    commands.add_parser("passes", help="list the rewrite passes").set_defaults(run=_list_passes)
    commands.add_parser("recipes", help="list the preset recipes and targets").set_defaults(run=_list_recipes)
    return parser


def _optimize(args: argparse.Namespace) -> int:
    """graphquant optimize."""
    if args.output.resolve() == args.model.resolve() and not args.overwrite:
        raise graphquant.OutputError(f"{args.output}: -o names the input file; pass --overwrite to replace it")
    model = graphquant.load(args.model)
    passes = [name.strip() for name in args.passes.split(",") if name.strip()] if args.passes else None
    result = graphquant.optimize(
        model,
        recipe=args.recipe,
        calibration=args.calib,
        passes=passes,
        target=args.target,
        validation=args.validate_data,
        wbits=args.wbits,
        abits=args.abits,
        block_size=args.block_size,
        gptq=args.gptq,
        embed_bits=args.embed_bits,
        embed_block_size=args.embed_block_size,
        max_overhead=args.max_overhead,
        min_cosine=args.min_cosine,
        keep_failed=args.keep_failed,
    )
    graphquant.save(result, args.output, overwrite=args.overwrite)
    if args.layers:
        print(result.report.format_layers())
    print(result.report.format_table())
    print(f"wrote {args.output}")
    if args.report:
        result.report.save_json(args.report)
        print(f"wrote {args.report}")
    if result.report.failures:
        return _fail(args, f"validation failed: {result.report.failures[0]} (written anyway: --keep-failed)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """graphquant inspect."""
    model = graphquant.load(args.model)
    print("op histogram:")
    for op, count in op_histogram(model).items():
        print(f"  {op:<28} {count}")
    layers = layer_table(model)
    print(f"MatMul/Gemm/Conv layers: {len(layers)}")
    for name, op, status in layers:
        print(f"  {name:<40} {op:<7} {status}")
    if args.calib:
        summaries = activation_summaries(model, Calibrator.for_model(model, args.calib))
        print("activations (outlier: channel max|x| > 6x the median channel's):")
        print(f"  {'layer':<40} {'min':>9} {'max':>9} {'outliers':>9} {'spread':>8}")
        for s in summaries:
            print(
                f"  {s.layer:<40} {s.minimum:9.3g} {s.maximum:9.3g} "
                f"{f'{s.outlier_channels}/{s.channels}':>9} {s.spread:8.1f}"
            )
    return 0


def _validate(args: argparse.Namespace) -> int:
    """graphquant validate."""
    reference = graphquant.load(args.reference)
    candidate = graphquant.load(args.candidate)
    data = Calibrator.for_model(reference, args.calib).data
    print(f"  {'output':<30} {'cosine':>9} {'SQNR dB':>9} {'max abs err':>12}")
    for name, comparison in compare_models(reference, candidate, data).items():
        print(f"  {name:<30} {comparison.cosine:9.5f} {comparison.sqnr_db:9.1f} {comparison.max_abs_error:12.4g}")
    return 0


def _list_passes(args: argparse.Namespace) -> int:
    """graphquant passes."""
    for name, pass_class in sorted(PASSES.items()):
        print(f"{name:<22} {(pass_class.__doc__ or '').strip().splitlines()[0]}")
    return 0


def _list_recipes(args: argparse.Namespace) -> int:
    """graphquant recipes."""
    for name in preset_names():
        recipe = Recipe.named(name)
        print(f"{name:<14} {recipe.description}  [{' -> '.join(s.name for s in recipe.steps)} -> {recipe.target}]")
    print("targets:")
    for name, doc in TARGET_DOCS.items():
        print(f"  {name:<12} {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
