"""The `graphquant` command line: a thin layer over the library.

The library (numpy, onnx, onnxruntime) is imported inside main's try, by the functions that need it, so that Ctrl-C
while it loads ends in one line too.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import graphquant
from graphquant.errors import CalibrationError, GraphQuantError, InternalError, InvalidModelError

if TYPE_CHECKING:
    import onnx_ir as ir

    from graphquant.analysis.data import CalibrationSource
    from graphquant.analysis.image_calib import ImagePreprocess

# Signals that end the run through an exception, so that every context manager removes its temp files.
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
# onnxruntime's logger severity for the whole process: fatal only (graphquant reports its errors as exceptions).
ORT_LOG_SEVERITY = 4
# The label of --report-html's output in errors.
HTML = "the HTML report"
CALIB_FORMS = ".npz, test-data folder, image folder, or text file (with --tokenizer)"


class Terminated(BaseException):
    """A terminating signal arrived (a BaseException, so that no `except Exception` in a library swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand and return its exit code."""
    args: argparse.Namespace | None = None
    try:
        with _signals_raise():
            args = _parser().parse_args(argv)
            warnings.simplefilter("always")
            warnings.showwarning = _show_warning
            _quiet_onnxruntime()
            return int(args.run(args) or 0)
    except GraphQuantError as exc:
        return _fail(args, str(exc))
    except KeyboardInterrupt:
        return _fail(args, "interrupted", code=130)
    except Terminated as exc:
        return _fail(args, f"terminated by {exc}", code=128 + exc.signum)
    except Exception as exc:  # last resort: one line, traceback only under --debug
        causes = _causes(exc)
        user_error = next((cause for cause in causes if isinstance(cause, GraphQuantError)), None)
        if user_error is not None:  # wrapped, e.g. in onnx_ir's PassError
            return _fail(args, str(user_error))
        if isinstance(exc, InternalError):  # already one line naming the pass and its root cause
            return _fail(args, f"internal error: {exc}")
        return _fail(args, f"internal error: {type(causes[-1]).__name__}: {_first_line(causes[-1])}")


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While the block runs (in the main thread), a terminating signal raises Terminated instead of killing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_terminated(signum: int, _frame: object) -> None:
    """Signal handler: ignore repeats of the signal while cleaning up, and unwind the run."""
    signal.signal(signum, signal.SIG_IGN)
    raise Terminated(signum)


def _quiet_onnxruntime() -> None:
    """Keep onnxruntime's own log lines (default logger included, not only sessions') off the terminal."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(ORT_LOG_SEVERITY)


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and its chain of causes, outermost first (a wrapper such as onnx_ir's PassError, ..., root)."""
    chain = [exc]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    return chain


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _fail(args: argparse.Namespace | None, message: str, code: int = 1) -> int:
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
    from graphquant.analysis.openvino_run import EXECUTORS
    from graphquant.lowering import TARGETS
    from graphquant.passes.quantize import ROUNDINGS
    from graphquant.validate import DEFAULT_MIN_COSINE

    parser = argparse.ArgumentParser(prog="graphquant", description="Post-training quantization compiler for ONNX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # --debug after the subcommand too; SUPPRESS keeps a subcommand from resetting `graphquant --debug ...`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    data = _data_options()

    optimize = commands.add_parser("optimize", help="quantize a model with a recipe", parents=[common, data])
    optimize.add_argument("model", type=Path)
    optimize.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output model: a new path or a regular file, which is replaced; never a directory or device, nor the "
        "input (without --overwrite), its external data or a file the run reads",
    )
    optimize.add_argument(
        "--recipe",
        default="auto",
        help="'auto' (default: per-layer search under --max-drop), a preset name, or a recipe .toml",
    )
    optimize.add_argument(
        "--max-drop",
        type=float,
        help="auto: the largest error on held-out data (1 - output cosine, default 0.002; with --metric sqnr, "
        "the least output SQNR in dB)",
    )
    optimize.add_argument(
        "--objective", choices=("latency", "size"), help="auto: what the search minimizes (default latency)"
    )
    optimize.add_argument("--metric", choices=("cosine", "sqnr"), help="auto: the budget's metric (default cosine)")
    optimize.add_argument("--calib", help=f"calibration data: {CALIB_FORMS}, or 'random'")
    optimize.add_argument("--validate-data", help="held-out data for validation (default: the calibration data)")
    optimize.add_argument(
        "--ray", metavar="ADDRESS", help="calibrate on the Ray cluster at ADDRESS (HOST:PORT or auto)"
    )
    optimize.add_argument(
        "--workers", type=int, help="calibrate on N Ray workers (a local cluster of N CPUs unless --ray is given)"
    )
    optimize.add_argument("--wbits", type=int)
    optimize.add_argument("--abits", type=int)
    optimize.add_argument("--block-size", type=int, help="weight block size along the input channels")
    optimize.add_argument("--gptq", action="store_const", const=True, help="GPTQ rounding of the weights")
    optimize.add_argument(
        "--gptq-sequential",
        action="store_const",
        const=True,
        help="with GPTQ: fit conv weights one layer at a time on the inputs of the model quantized so far",
    )
    optimize.add_argument(
        "--asymmetric-conv-weights",
        action="store_const",
        const=True,
        help="Conv weights below 8 bits on asymmetric grids (a zero point per channel; still QLinearConv on ort-cpu)",
    )
    optimize.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        help="how weights are rounded (overrides --gptq): nearest, gptq, flexround (learned from RTN's grid), "
        "gptq-flexround (learned from GPTQ's codes) or flexround-block (learned block by block from GPTQ's codes on "
        "the block's output, convs included; needs torch)",
    )
    optimize.add_argument("--embed-bits", type=int, help="bits of the embedding tables (recipes that quantize them)")
    optimize.add_argument("--embed-block-size", type=int, help="embedding block size along the hidden axis")
    optimize.add_argument("--max-overhead", type=float, help="extra MACs the split passes may add (default 0.10)")
    optimize.add_argument(
        "--keep-8bit",
        help="comma-separated node-name globs or roles (@first, @last, @depthwise) whose weights stay 8-bit",
    )
    optimize.add_argument("--passes", help="comma-separated pass names replacing the recipe's list")
    optimize.add_argument("--target", choices=sorted(TARGETS))
    optimize.add_argument("--report", type=Path, help="write the run report as JSON (same rules as -o)")
    optimize.add_argument(
        "--report-html",
        type=Path,
        help="write the run report as one self-contained HTML page with plots (needs graphquant[report]; same "
        "rules as -o)",
    )
    optimize.add_argument("--layers", action="store_true", help="print every layer's scheme, SQNR and reason")
    optimize.add_argument(
        "--overwrite", action="store_true", help="allow -o to replace the input model (never its external data)"
    )
    optimize.add_argument(
        "--min-cosine",
        type=float,
        help=f"fail unless every output's cosine against the float model reaches this (default {DEFAULT_MIN_COSINE})",
    )
    optimize.add_argument(
        "--keep-failed", action="store_true", help="write the model even if validation fails (exit 1)"
    )
    optimize.add_argument(
        "--validate-on",
        choices=EXECUTORS,
        default="onnxruntime",
        help="run the validation on this executor (openvino: pip install 'graphquant[openvino]')",
    )
    optimize.set_defaults(run=_optimize)

    inspect = commands.add_parser(
        "inspect", help="graph inputs, op histogram, quantizable layers, activation outliers", parents=[common, data]
    )
    inspect.add_argument("model", type=Path)
    inspect.add_argument("--calib", help=f"calibration data for per-layer activation ranges: {CALIB_FORMS}")
    inspect.set_defaults(run=_inspect)

    validate = commands.add_parser(
        "validate", help="compare a model with its reference in onnxruntime or OpenVINO", parents=[common, data]
    )
    validate.add_argument("reference", type=Path)
    validate.add_argument("candidate", type=Path)
    validate.add_argument("--calib", required=True, help=f"inputs: {CALIB_FORMS}, or 'random'")
    validate.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="onnxruntime",
        help="run both models on this executor (openvino: the reference in float32, the candidate as deployed)",
    )
    validate.set_defaults(run=_validate)

    commands.add_parser("passes", help="list the rewrite passes", parents=[common]).set_defaults(run=_list_passes)
    commands.add_parser("recipes", help="list the preset recipes and targets", parents=[common]).set_defaults(
        run=_list_recipes
    )
    return parser


def _data_options() -> argparse.ArgumentParser:
    """The options that say how to read text and image calibration data (analysis/text_calib.py, image_calib.py)."""
    data = argparse.ArgumentParser(add_help=False)
    text = data.add_argument_group("text data (--calib FILE.txt: one sample per non-blank line)")
    text.add_argument("--tokenizer", type=Path, help="a Hugging Face tokenizer folder or its tokenizer.json")
    text.add_argument(
        "--seq-len", type=int, help="pad and truncate to this many tokens (default: each batch's longest line)"
    )
    data.add_argument("--batch-size", type=int, help="samples per batch of text or image data (default 8)")
    image = data.add_argument_group("image data (--calib DIR of .png/.jpg; also a recipe's [preprocess] table)")
    image.add_argument("--image-size", type=_image_size, help="HxW or N (default: the input's fixed dims)")
    image.add_argument("--resize", choices=("stretch", "crop", "pad"), help="how images reach the size (stretch)")
    image.add_argument("--scale", type=float, help="pixel values are multiplied by this first (default 1/255)")
    image.add_argument("--mean", type=_floats, help="subtracted after scaling, one value or one per channel (0)")
    image.add_argument("--std", type=_floats, help="divided by last, one value or one per channel (1)")
    image.add_argument("--layout", choices=("NCHW", "NHWC"), help="default: guessed from the input's shape")
    image.add_argument("--channels", choices=("RGB", "BGR"), help="channel order of 3-channel inputs (RGB)")
    return data


def _image_size(text: str) -> tuple[int, int]:
    """--image-size: 'HxW' or one number for a square."""
    parts = text.lower().split("x")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW or N") from None
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW or N")
    return (sizes[0], sizes[-1])


def _floats(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _data_source(args: argparse.Namespace, value: str | None) -> CalibrationSource | None:
    """A --calib/--validate-data value as a calibration source: a text or image loader where it names one."""
    from graphquant.analysis.data import DEFAULT_BATCH_SIZE, is_test_data

    if value is None or value == "random":
        return value
    path = Path(value)
    if args.batch_size is not None and (path.suffix == ".npz" or is_test_data(path)):
        raise CalibrationError(f"{path}: --batch-size applies to text and image data only")
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    if args.tokenizer is not None and path.is_file() and path.suffix != ".npz":
        from graphquant.analysis.text_calib import TextCalibration

        return TextCalibration(path, args.tokenizer, args.seq_len, batch_size)
    if path.is_dir() and not is_test_data(path):
        from graphquant.analysis.image_calib import ImageCalibration

        return ImageCalibration(path, _preprocess(args), batch_size)
    return value


def _preprocess(args: argparse.Namespace) -> ImagePreprocess:
    """Image preprocessing: the recipe's [preprocess] table, with the command line's options over it."""
    from graphquant.analysis.image_calib import ImagePreprocess

    recipe = getattr(args, "recipe", None)
    base = ImagePreprocess.from_recipe(recipe) if recipe and recipe.endswith(".toml") else None
    return (base or ImagePreprocess()).replaced(
        size=args.image_size,
        resize=args.resize,
        scale=args.scale,
        mean=args.mean,
        std=args.std,
        layout=args.layout,
        channels=args.channels,
    )


def _check_data_options(args: argparse.Namespace) -> None:
    """Refuse text options without --tokenizer."""
    if args.seq_len is not None and args.tokenizer is None:
        raise CalibrationError("--seq-len applies to text data: give the tokenizer too (--tokenizer DIR)")


def _optimize(args: argparse.Namespace) -> int:
    """graphquant optimize."""
    from graphquant.output_paths import check_outputs, model_outputs, model_reads, source_reads

    model = graphquant.load(args.model)
    reads = [
        *model_reads(model),
        *source_reads(args.calib, "the calibration data"),
        *source_reads(args.validate_data, "the validation data"),
        *source_reads(args.recipe, "the recipe"),
    ]
    reports = {label: path for label, path in (("the report", args.report), (HTML, args.report_html)) if path}
    reads += source_reads(args.tokenizer, "the tokenizer")
    check_outputs({**model_outputs(args.output), **reports}, reads, overwrite=args.overwrite)
    if args.report_html:
        from graphquant.report_html import require_matplotlib

        require_matplotlib()
    _check_data_options(args)
    calibration, validation = _data_source(args, args.calib), _data_source(args, args.validate_data)
    for name, source in ((args.calib, calibration), (args.validate_data, validation)):
        if source not in (None, "random"):
            with _naming_data_file(name):
                graphquant.Calibrator.for_model(model, source, False)  # checks the first batch before any work
    passes = [name.strip() for name in args.passes.split(",") if name.strip()] if args.passes else None
    result = graphquant.optimize(
        model,
        recipe=args.recipe,
        calibration=calibration,
        passes=passes,
        target=args.target,
        validation=validation,
        wbits=args.wbits,
        abits=args.abits,
        block_size=args.block_size,
        gptq=args.gptq,
        gptq_sequential=args.gptq_sequential,
        asymmetric_conv_weights=args.asymmetric_conv_weights,
        rounding=args.rounding,
        embed_bits=args.embed_bits,
        embed_block_size=args.embed_block_size,
        max_overhead=args.max_overhead,
        keep_8bit=tuple(p.strip() for p in args.keep_8bit.split(",") if p.strip()) if args.keep_8bit else None,
        min_cosine=args.min_cosine,
        keep_failed=args.keep_failed,
        max_drop=args.max_drop,
        objective=args.objective,
        metric=args.metric,
        validate_on=args.validate_on,
        workers=args.workers,
        ray_address=args.ray,
    )
    _save_with_reports(result, model, args, reports)
    if args.layers:
        print(result.report.format_layers())
    print(result.report.format_table())
    print(f"wrote {args.output}")
    for path in reports.values():
        print(f"wrote {path}")
    if result.report.failures:
        return _fail(args, f"validation failed: {result.report.failures[0]} (written anyway: --keep-failed)")
    return 0


def _save_with_reports(
    result: graphquant.OptimizeResult, reference: ir.Model, args: argparse.Namespace, reports: dict[str, Path]
) -> None:
    """Save the model, then fill the reports (their timings include the save); all are renamed into place together.

    The reports are staged beside their paths first: a report that cannot be written leaves no model behind either.
    """
    from graphquant.output_paths import staged_file

    with contextlib.ExitStack() as stack:
        staged = {label: stack.enter_context(staged_file(path, label)) for label, path in reports.items()}
        graphquant.save(result, args.output, overwrite=args.overwrite)
        if "the report" in staged:
            staged["the report"].write(result.report.to_json())
        if HTML in staged:
            from graphquant.report_html import render

            staged[HTML].write(render(result.report, reference))


@contextlib.contextmanager
def _naming_data_file(source: str | None) -> Iterator[None]:
    """Calibration errors raised in the block name the data file they are about, if they do not already."""
    try:
        yield
    except CalibrationError as exc:
        if source is None or source == "random" or str(Path(source)) in str(exc):  # data.py names it as a Path
            raise
        raise CalibrationError(f"{source}: {exc}") from exc


def _inspect(args: argparse.Namespace) -> int:
    """graphquant inspect."""
    from graphquant.analysis.data import InputSpec
    from graphquant.analysis.image_calib import image_fit
    from graphquant.analysis.text_calib import text_fit
    from graphquant.summary import activation_summaries, graph_inputs, layer_table, op_histogram

    model = graphquant.load(args.model)
    print("op histogram:")
    for op, count in op_histogram(model).items():
        print(f"  {op:<28} {count}")
    layers = layer_table(model)
    print(f"MatMul/Gemm/Conv layers: {len(layers)}")
    for name, op, status in layers:
        print(f"  {name:<40} {op:<7} {status}")
    print("inputs (what a calibration .npz holds, one array per input, samples on the first axis):")
    for name, dtype, shape in graph_inputs(model):
        print(f"  {name:<40} {dtype:<9} {shape}")
    print("--calib forms that fit: an .npz or test-data folder of these inputs")
    specs = InputSpec.of_model(model)
    for fit in (text_fit(specs), image_fit(specs)):
        if fit:
            print(f"  or {fit}")
    if args.calib:
        _check_data_options(args)
        source = _data_source(args, args.calib)
        with _naming_data_file(args.calib):
            summaries = activation_summaries(model, graphquant.Calibrator.for_model(model, source))
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
    from graphquant.analysis.data import InputSpec
    from graphquant.summary import graph_inputs

    reference = graphquant.load(args.reference)
    candidate = graphquant.load(args.candidate)
    # What a feed must match: names, dtypes and static dims (symbolic dims may be named differently).
    if set(InputSpec.of_model(candidate)) != set(InputSpec.of_model(reference)):
        raise InvalidModelError(
            f"{args.candidate}: its inputs ({_signature(graph_inputs(candidate))}) differ from those of "
            f"{args.reference} ({_signature(graph_inputs(reference))})"
        )
    _check_data_options(args)
    source = _data_source(args, args.calib)
    with _naming_data_file(args.calib):
        data = graphquant.Calibrator.for_model(reference, source).data
        comparisons = graphquant.compare_models(reference, candidate, data, executor=args.executor)
    print(f"  {'output':<30} {'cosine':>9} {'SQNR dB':>9} {'max abs err':>12}")
    for name, comparison in comparisons.items():
        print(f"  {name:<30} {comparison.cosine:9.5f} {comparison.sqnr_db:9.1f} {comparison.max_abs_error:12.4g}")
    return 0


def _signature(inputs: Sequence[tuple[str, str, str]]) -> str:
    """Graph inputs as 'name: dtype shape', comma-separated."""
    return ", ".join(f"{name}: {dtype} {shape}" for name, dtype, shape in inputs)


def _list_passes(args: argparse.Namespace) -> int:
    """graphquant passes."""
    from graphquant.passes import PASSES

    for name, pass_class in sorted(PASSES.items()):
        print(f"{name:<22} {(pass_class.__doc__ or '').strip().splitlines()[0]}")
    return 0


def _list_recipes(args: argparse.Namespace) -> int:
    """graphquant recipes."""
    from graphquant.lowering import TARGET_DOCS
    from graphquant.recipes import preset_names

    print(f"{'auto':<14} the default: per-layer schemes searched under --max-drop, --objective latency|size")
    for name in preset_names():
        recipe = graphquant.Recipe.named(name)
        print(f"{name:<14} {recipe.description}  [{' -> '.join(s.name for s in recipe.steps)} -> {recipe.target}]")
    print("targets:")
    for name, doc in TARGET_DOCS.items():
        print(f"  {name:<12} {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
