"""The im2col Gram of a Conv/ConvTranspose input, streamed over calibration batches (GPTQ's Hessian for conv weights).

SequentialConvGrams measures them one layer at a time on the model as quantized so far, beside the float model
(GPTQ's true-sequential order, with the float model's output as the target).

A Conv output channel o of group g is y_o[p] = sum_(tap, c) patch_p[tap, c] · W[o, c, tap], so its X^T X is the Gram
of the unfolded patches of group g: [C_in/group · taps] squared, tap-major, the row order of weight_fit.in_major.
A ConvTranspose is the Conv of its zero-stuffed, re-padded input with the flipped kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphquant.analysis.data import Feed
from graphquant.analysis.gptq import mean_shift, sequential_target
from graphquant.analysis.layers import Layer
from graphquant.analysis.runner import open_session, run_views
from graphquant.analysis.weight_fit import in_major

# Images unfolded at a time: one image's float32 patches are taps x its input.
IMAGES_PER_CHUNK = 1


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """What unfolds a Conv input into patches: kernel, strides, dilations, begin/end pads, groups.

    ``transposed`` marks a ConvTranspose: strides then stuff zeros between inputs, and the taps are flipped.
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    group: int
    transposed: bool = False
    auto_pad: str = "NOTSET"

    @classmethod
    def of_layer(cls, layer: Layer) -> ConvGeometry | None:
        """The geometry of a Conv, or of a group-1 ConvTranspose with explicit pads; None for anything else."""
        node = layer.node
        if node.op_type not in ("Conv", "ConvTranspose") or layer.out_axis is None:
            return None
        attributes = node.attributes
        kernel = tuple(layer.weight_array.shape[2:])
        spatial = len(kernel)
        auto_pad = attributes.get_string("auto_pad", "NOTSET")
        transposed = node.op_type == "ConvTranspose"
        if transposed and (auto_pad != "NOTSET" or "output_shape" in attributes):
            return None
        return cls(
            kernel=kernel,
            strides=tuple(attributes.get_ints("strides", [1] * spatial)),
            dilations=tuple(attributes.get_ints("dilations", [1] * spatial)),
            pads=_transposed_pads(attributes, kernel)
            if transposed
            else tuple(attributes.get_ints("pads", [0] * 2 * spatial)),
            group=attributes.get_int("group", 1),
            transposed=transposed,
            auto_pad=auto_pad,
        )

    @property
    def taps(self) -> int:
        """Kernel positions per input channel."""
        return int(np.prod(self.kernel))


def _transposed_pads(attributes: ir.Attributes, kernel: tuple[int, ...]) -> tuple[int, ...]:
    """The pads of the equivalent Conv of a ConvTranspose: d·(k-1) - pad at each end, plus output_padding at the end.

    Negative values crop.
    """
    spatial = len(kernel)
    pads = attributes.get_ints("pads", [0] * 2 * spatial)
    dilations = attributes.get_ints("dilations", [1] * spatial)
    extra = attributes.get_ints("output_padding", [0] * spatial)
    begin = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:spatial])]
    end = [d * (k - 1) - p + e for d, k, p, e in zip(dilations, kernel, pads[spatial:], extra)]
    return (*begin, *end)


def patch_gram(values: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """Sum over images and output positions of patch·patch^T per group: [group, taps·C_in/group, same], float64.

    Each image's product is computed in float32 (half the time of float64) and summed in float64. Non-finite
    inputs count as zeros, as in the calibration statistics.
    """
    data = np.asarray(values, dtype=np.float32)
    channels = data.shape[1] // geometry.group
    size = channels * geometry.taps
    gram = np.zeros((geometry.group, size, size))
    for start in range(0, data.shape[0], IMAGES_PER_CHUNK):
        patches = _patches(data[start : start + IMAGES_PER_CHUNK], geometry)  # [group, size, positions]
        gram += (patches @ patches.transpose(0, 2, 1)).astype(np.float64)
    return gram


def _patches(images: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """The unfolded patches of a few images: [group, taps·C_in/group (tap-major), images·output positions]."""
    clean = np.where(np.isfinite(images), images, np.float32(0.0))
    if geometry.transposed:
        clean = _zero_stuffed(clean, geometry.strides)
    padded = _padded(clean, _pads(geometry, clean.shape[2:]))
    strides = (1,) * len(geometry.kernel) if geometry.transposed else geometry.strides
    outputs = [
        (size - d * (k - 1) - 1) // s + 1
        for size, d, k, s in zip(padded.shape[2:], geometry.dilations, geometry.kernel, strides)
    ]
    views = []
    for tap in itertools.product(*(range(k) for k in geometry.kernel)):
        window = tuple(
            slice(t * d, t * d + s * (n - 1) + 1, s) for t, d, s, n in zip(tap, geometry.dilations, strides, outputs)
        )
        views.append(padded[(slice(None), slice(None), *window)])
    if geometry.transposed:  # tap t of the equivalent Conv multiplies the weight's tap (k - 1 - t)
        views.reverse()
    images_count, channels = clean.shape[:2]
    per_group = channels // geometry.group
    stacked = np.stack(views)  # [taps, images, channels, positions...]
    stacked = stacked.reshape(geometry.taps, images_count, geometry.group, per_group, -1)
    # -> [group, taps, per_group, images, positions] -> [group, taps·per_group, images·positions]
    return stacked.transpose(2, 0, 3, 1, 4).reshape(geometry.group, geometry.taps * per_group, -1)


def _pads(geometry: ConvGeometry, spatial: Sequence[int]) -> tuple[int, ...]:
    """Explicit begin/end pads, resolving auto_pad SAME_UPPER/SAME_LOWER/VALID against the input's spatial shape."""
    if geometry.auto_pad in ("NOTSET", ""):
        return geometry.pads
    if geometry.auto_pad == "VALID":
        return (0,) * (2 * len(spatial))
    totals = [
        max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
        for size, s, d, k in zip(spatial, geometry.strides, geometry.dilations, geometry.kernel)
    ]
    small = [total // 2 for total in totals]
    large = [total - half for total, half in zip(totals, small)]
    return (*small, *large) if geometry.auto_pad == "SAME_UPPER" else (*large, *small)


def _zero_stuffed(images: np.ndarray, strides: Sequence[int]) -> np.ndarray:
    """The input with stride - 1 zeros between neighbours along each spatial axis (ConvTranspose's upsampling)."""
    shape = [*images.shape[:2], *((n - 1) * s + 1 for n, s in zip(images.shape[2:], strides))]
    stuffed = np.zeros(shape, images.dtype)
    stuffed[(slice(None), slice(None), *(slice(None, None, s) for s in strides))] = images
    return stuffed


def _padded(images: np.ndarray, pads: Sequence[int]) -> np.ndarray:
    """Zero-pad (positive) or crop (negative) each spatial axis by its begin/end amounts."""
    spatial = len(pads) // 2
    widths = [(0, 0), (0, 0), *((max(b, 0), max(e, 0)) for b, e in zip(pads[:spatial], pads[spatial:]))]
    padded = np.pad(images, widths)
    crop = tuple(slice(max(-b, 0), n - max(-e, 0)) for b, e, n in zip(pads[:spatial], pads[spatial:], padded.shape[2:]))
    return padded[(slice(None), slice(None), *crop)]


class ConvGrams:
    """Accumulates the im2col Gram of each conv layer's input while calibration streams the batches."""

    def __init__(self, layers: Sequence[Layer]):
        self._readers: dict[str, list[tuple[ir.Node, ConvGeometry]]] = {}
        for layer in layers:
            geometry = ConvGeometry.of_layer(layer)
            if geometry is not None:
                self._readers.setdefault(layer.activation.name or "", []).append((layer.node, geometry))
        self._grams: dict[ir.Node, np.ndarray] = {}

    @property
    def input_names(self) -> list[str]:
        """The tensors whose batches :meth:`observe` needs."""
        return list(self._readers)

    def observe(self, name: str, values: np.ndarray) -> None:
        """Fold one batch of a tensor into the Gram of every layer that reads it (one Gram per distinct geometry)."""
        computed: dict[ConvGeometry, np.ndarray] = {}
        for node, geometry in self._readers.get(name, []):
            if geometry not in computed:
                computed[geometry] = patch_gram(values, geometry)
            previous = self._grams.get(node)
            self._grams[node] = computed[geometry] if previous is None else previous + computed[geometry]

    def gram(self, layer: Layer) -> np.ndarray | None:
        """The layer's [group, K, K] Gram, or None if it was not collected."""
        return self._grams.get(layer.node)

    def target(self, layer: Layer) -> np.ndarray | None:
        """The weights to round instead of the layer's own: none (they are measured on the float model)."""
        return None

    def bias_shift(self, layer: Layer) -> np.ndarray | None:
        """What the layer's bias should gain once its weight is rounded: nothing measured."""
        return None


@dataclasses.dataclass
class PairedMoments:
    """Sums over images and output positions of the patches p̃ of one input and p of its float twin, per group.

    gram: Σ p̃p̃^T, cross: Σ p̃p^T ([group, K, K], float64); quantized_sum: Σ p̃, float_sum: Σ p ([group, K]).
    """

    gram: np.ndarray
    cross: np.ndarray
    quantized_sum: np.ndarray
    float_sum: np.ndarray
    count: int

    def __add__(self, other: PairedMoments) -> PairedMoments:
        """The moments of both sets of patches."""
        return PairedMoments(
            self.gram + other.gram,
            self.cross + other.cross,
            self.quantized_sum + other.quantized_sum,
            self.float_sum + other.float_sum,
            self.count + other.count,
        )


def paired_moments(quantized: np.ndarray, reference: np.ndarray, geometry: ConvGeometry) -> PairedMoments:
    """The PairedMoments of one batch: a conv's input in the quantized model and the same input in the float one."""
    low = np.asarray(quantized, dtype=np.float32)
    high = np.asarray(reference, dtype=np.float32)
    size = low.shape[1] // geometry.group * geometry.taps
    moments = PairedMoments(
        np.zeros((geometry.group, size, size)),
        np.zeros((geometry.group, size, size)),
        np.zeros((geometry.group, size)),
        np.zeros((geometry.group, size)),
        0,
    )
    for start in range(0, low.shape[0], IMAGES_PER_CHUNK):
        window = slice(start, start + IMAGES_PER_CHUNK)
        tilde, plain = _patches(low[window], geometry), _patches(high[window], geometry)
        moments.gram += (tilde @ tilde.transpose(0, 2, 1)).astype(np.float64)
        moments.cross += (tilde @ plain.transpose(0, 2, 1)).astype(np.float64)
        moments.quantized_sum += tilde.sum(axis=2, dtype=np.float64)
        moments.float_sum += plain.sum(axis=2, dtype=np.float64)
        moments.count += tilde.shape[2]
    return moments


class SequentialConvGrams:
    """Conv Grams measured when a layer's turn comes, on the model as quantized so far and on a float copy of it.

    Ask for the layers in graph order, each after the ones before it are rounded: then gram(layer) is X̃^T X̃ of the
    layer's input X̃ in ``quantized(model)`` (the model with the specs annotated so far applied; by default the model
    itself, whose rounded weights are in place), target(layer) the weights that map X̃ best onto the float output
    (gptq.sequential_target) and bias_shift(layer) the mean output error left by the layer's rounded weight.
    """

    def __init__(
        self,
        model: ir.Model,
        layers: Sequence[Layer],
        data: Iterable[Feed],
        quantized: Callable[[ir.Model], ir.Model] = lambda model: model,
    ):
        self._model = model
        self._quantized = quantized
        self._reference = model.clone()
        twins = dict(zip(model.graph, self._reference.graph))  # clone() keeps the node order
        self._data = data
        self._geometries = {layer.node: g for layer in layers if (g := ConvGeometry.of_layer(layer)) is not None}
        self._moments: dict[ir.Node, PairedMoments] = {}
        self._targets: dict[ir.Node, np.ndarray] = {}
        self._twins = {node: twins[node] for node in self._geometries}
        self._inputs = sorted({layer.activation.name or "" for layer in layers if layer.node in self._geometries})
        self._sessions = contextlib.ExitStack()  # the float model's session, open until the last layer is measured
        self._float_session: ort.InferenceSession | None = None

    @property
    def input_names(self) -> list[str]:
        """Nothing is observed during calibration."""
        return []

    def observe(self, name: str, values: np.ndarray) -> None:
        """Unused: the Grams are measured per layer."""

    def gram(self, layer: Layer) -> np.ndarray | None:
        """X̃^T X̃ per group of the layer's input in the model as it is now, or None for a layer it does not fit."""
        if layer.node not in self._geometries:
            return None
        if layer.node not in self._moments:
            self._moments[layer.node] = self._measure(layer)
        return self._moments[layer.node].gram

    def target(self, layer: Layer) -> np.ndarray | None:
        """The in_major weights to round (gptq.sequential_target), or None for a layer it does not fit."""
        if self.gram(layer) is None:
            return None
        if layer.node not in self._targets:
            self._targets[layer.node] = sequential_target(in_major(layer), self._moments[layer.node])
        return self._targets[layer.node]

    def bias_shift(self, layer: Layer) -> np.ndarray | None:
        """E[p·W] - E[p̃·Q] per output channel, Q the layer's weight now (rounded), W the float model's."""
        moments = self._moments.get(layer.node)
        if moments is None:
            return None
        original = dataclasses.replace(layer, node=self._twins[layer.node])
        return mean_shift(in_major(original), in_major(layer), moments)

    def _measure(self, layer: Layer) -> PairedMoments:
        """Run both models over the data and sum the paired patch moments of the layer's input."""
        name = layer.activation.name or ""
        geometry = self._geometries[layer.node]
        total: PairedMoments | None = None
        reference = self._reference_session()
        with open_session(self._quantized(self._model), [name]) as current:
            for feed in self._data:
                quantized = run_views(current, [name], feed)[0]
                batch = paired_moments(quantized, run_views(reference, [name], feed)[0], geometry)
                total = batch if total is None else total + batch
            del current  # before open_session unmaps the weights that it shares
        if len(self._moments) + 1 == len(self._geometries):
            self._float_session = reference = None
            self._sessions.close()
        assert total is not None, "no calibration batch"
        return total

    def _reference_session(self) -> ort.InferenceSession:
        """The float model's session, with every measured layer's input as an output (opened once)."""
        if self._float_session is None:
            self._float_session = self._sessions.enter_context(open_session(self._reference, self._inputs))
        return self._float_session
