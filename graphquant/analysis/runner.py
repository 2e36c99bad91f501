"""Run an onnx_ir model in onnxruntime with chosen intermediate tensors exposed as outputs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphquant.analysis import segments as segment_plan
from graphquant.analysis.data import Feed
from graphquant.errors import InvalidModelError
from graphquant.frontends.mapped_weights import INLINE_KEY
from graphquant.graph_edit import read_in_slices, release_mapping
from graphquant.scratch import scratch_folder

# Above this many initializer bytes the model is written with external data (the protobuf limit is 2 GiB).
PROTO_SIZE_LIMIT = 1 << 30
# Above this many initializer bytes (or with external data) a session shares the weights instead of copying them.
SHARED_MODEL_BYTES = 256 << 20
# In those models, initializers from this size on reach onnxruntime as shared buffers (zero copy), not as bytes.
SHARED_INITIALIZER_BYTES = 1024
# The placeholder file the shared initializers point at; onnxruntime takes their data from the session options.
SHARED_LOCATION = "shared-initializers.bin"
# The file a model's weights wait in while another model runs (parked_weights).
# Models with fewer initializer bytes keep their weights in memory while their own session holds a copy (park).
PARKED_MODEL_BYTES = 64 << 20
PARKED_LOCATION = "parked-weights.bin"
# Ops whose numerics depend on prepacked weights (runs_prepacked).
PREPACK_SENSITIVE_OPS = frozenset({"MatMulNBits", "DequantizeLinear"})
# Models that share weights run in segments of about 1 / SEGMENTS of their weight bytes each (see open_segmented).
SEGMENTS = 4
# The file a recorded run's feeds and outputs wait in (recorded_runs).
RECORDED_LOCATION = "recorded-outputs.npy"
# glibc's mallopt parameter number of M_MMAP_THRESHOLD, and the threshold graphquant sets (see _map_large_allocations).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
SHAREABLE_DTYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT32,
        ir.DataType.UINT32,
        ir.DataType.INT64,
        ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes held by the model's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer lives in an external data file (a model file's own mapped weights do not count)."""
    return any(
        isinstance(v.const_value, ir.ExternalTensor) and not v.const_value.meta.get(INLINE_KEY)
        for v in model.graph.initializers.values()
    )


def has_mapped_data(model: ir.Model) -> bool:
    """Whether any initializer is memory-mapped from a file (external data or the model file's own weights)."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def shares_weights(model: ir.Model) -> bool:
    """Whether open_session hands the model's initializers to onnxruntime as shared buffers (and runs unoptimized)."""
    return initializer_bytes(model) > SHARED_MODEL_BYTES or has_mapped_data(model)


def runs_prepacked(model: ir.Model) -> bool:
    """Whether onnxruntime computes the model differently with its weights prepacked, as deployed sessions have them.

    A MatMulNBits at accuracy_level 4 quantizes its input to int8 per block only when its weight is prepacked;
    unpacked, it computes in float. onnxruntime also fuses a DequantizeLinear weight into its MatMul as such a
    MatMulNBits, so any DequantizeLinear counts.
    """
    return any(node.op_type in PREPACK_SENSITIVE_OPS for node in ir.traversal.RecursiveGraphIterator(model.graph))


@contextlib.contextmanager
def inlined_mapped_data(model: ir.Model) -> Iterator[None]:
    """The model with its memory-mapped initializers as in-memory tensors (views of the mapping) for a while."""
    mapped = {
        name: ir.Tensor(value.const_value.numpy(), dtype=value.const_value.dtype, name=name)
        for name, value in model.graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    with _swapped(model, mapped):
        yield


def session_options(prepack: bool = False) -> ort.SessionOptions:
    """Quiet CPU options; idle intra-op threads sleep rather than spin (spinning takes CPU from everything else on a
    loaded machine; the outputs are the same). Without ``prepack`` they keep one copy of the weights: no prepacked
    duplicates, external data memory-mapped. With it, kernels prepack their weights as a deployed session does
    (runs_prepacked says where that changes the numbers)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failed run raises, and graphquant reports it in one line
    options.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_session(source: str | os.PathLike[str] | bytes, options: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime CPU session, its load failure turned into an InvalidModelError."""
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        # The path onnxruntime names is often graphquant's temporary copy, not a file the user knows.
        reason = _first_line(exc).replace(f"Load model from {source} failed:", "").strip()
        raise InvalidModelError(f"onnxruntime cannot load the model: {reason}") from exc


@contextlib.contextmanager
def open_session(
    model: ir.Model, extra_outputs: Sequence[str] = (), share: bool | None = None, park: bool = False
) -> Iterator[ort.InferenceSession]:
    """An onnxruntime CPU session on the model, with extra named tensors appended to its outputs.

    For models over SHARED_MODEL_BYTES or with external data, the initializers reach onnxruntime as shared buffers
    (zero copy; memory-mapped ones stay mapped), so the session holds no second copy of the weights. The proto
    written for it names them as external data in a sparse placeholder file that onnxruntime never reads. Smaller
    models' in-memory initializers reach it the same way but as external initializers, which it copies before it
    optimizes the graph: the session is the one a full proto gives, without serializing and parsing the weights. ``share``
    overrides that choice (a copy of a model runs as its original did: analysis/distributed.py's workers). With
    ``park``, a session that holds its own copy of a model over PARKED_MODEL_BYTES has the model's in-memory weights
    wait in a file while it is open (see parked_weights); the caller must not change them meanwhile.
    """
    _map_large_allocations()
    # Weights a pass replaced can wait in reference cycles (graph objects) until a full collection frees them. A full
    # collection takes seconds in a large heap (a test process), so it runs only where the weights are large.
    weight_bytes = initializer_bytes(model)
    if weight_bytes > PARKED_MODEL_BYTES:
        gc.collect()
    output_names = {value.name for value in model.graph.outputs}
    large = shares_weights(model) if share is None else share
    parks = park and not large and weight_bytes > PARKED_MODEL_BYTES
    shared = _shared_initializers(model) if large or not parks else {}
    if not large:  # handed over in memory: onnxruntime copies them before it optimizes, as it would from the proto
        shared = {name: tensor for name, tensor in shared.items() if not isinstance(tensor, ir.ExternalTensor)}
    release_mappings(model)
    proto = _session_proto(model, shared)
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra_outputs if n not in output_names)
    # The shared-buffer path stays unpacked: prepacking would copy every weight (see its note in the README).
    options = session_options(prepack=not large and runs_prepacked(model))
    if parks:
        # The arena would keep each run's largest buffers (a float copy of a weight behind its DequantizeLinear).
        options.enable_cpu_mem_arena = False
    if large and shared:
        # onnxruntime's graph optimizers (constant folding, QDQ fusions) read initializer data from the proto, which
        # for shared initializers is the placeholder's zeros: the unoptimized graph runs instead.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # Unoptimized, a DequantizeLinear of a weight makes a float copy on every run: the arena would keep it.
        options.enable_cpu_mem_arena = False
    buffers = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor.numpy())) for tensor in shared.values()]
    if large:
        for name, buffer in zip(shared, buffers):
            options.add_initializer(name, buffer)
    elif shared:
        # Not serialized into the proto: onnxruntime takes them at load time, so its optimizers read the real data.
        options.add_external_initializers(list(shared), buffers)
    with contextlib.ExitStack() as parking:  # closed last: parked weights come back once the session is gone
        try:
            with scratch_folder() as scratch:
                with open(scratch / SHARED_LOCATION, "wb") as placeholder:
                    placeholder.truncate(max((tensor.nbytes for tensor in shared.values()), default=0))
                onnx.save(proto, scratch / "model.onnx")
                proto = None  # before onnxruntime reads its own copy of the weights
                release_mappings(model)
                session = load_session(str(scratch / "model.onnx"), options)
            if parks:
                parking.enter_context(_parked(_in_memory_weights(model), parking.enter_context(scratch_folder())))
            yield session
        finally:
            # The mappings can only close once nothing holds the buffers: callers drop the session first.
            session = options = buffers = proto = None
            release_mappings(model)
            _return_freed_memory()


Outputs = dict[str, np.ndarray]


@contextlib.contextmanager
def open_segmented(model: ir.Model, names: Sequence[str]) -> Iterator[Callable[[Feed], Iterator[Outputs]]]:
    """A run of the model that yields the named tensors of one feed in parts, one graph segment at a time.

    A model that shares its weights (see open_session) and splits (analysis/segments.py) runs as consecutive
    segments of about 1 / SEGMENTS of its weight bytes, each in its own session, whose weight pages are dropped
    once it has run: one segment's weights are resident at a time. Values crossing segments are passed on in
    memory. Other models run whole, as one part. Each part is yielded before the next segment runs.
    """
    segments = segment_plan.plan(model.graph, names, SEGMENTS) if shares_weights(model) else None
    if segments is None:
        with open_session(model, names) as session:
            yield lambda feed: iter([dict(zip(names, run_views(session, names, feed)))])
            del session  # before open_session unmaps the weights that it shares
        return
    with _segmented_runs(model, names, segments) as run:
        yield run


@contextlib.contextmanager
def _segmented_runs(
    model: ir.Model, names: Sequence[str], segments: list[segment_plan.Segment]
) -> Iterator[Callable[[Feed], Iterator[Outputs]]]:
    """open_segmented's run for a model that splits."""
    _map_large_allocations()
    gc.collect()
    with scratch_folder() as scratch:
        shared = _shared_initializers(model)
        with open(scratch / SHARED_LOCATION, "wb") as placeholder:
            placeholder.truncate(max((tensor.nbytes for tensor in shared.values()), default=0))
        release_mappings(model)
        run = _SegmentedRun(model, names, segments, shared, scratch)
        try:
            yield run
        finally:
            run.sessions.clear()
            run.buffers.clear()
            release_mappings(model)
            _return_freed_memory()


class _SegmentedRun:
    """Runs one feed through the segments in turn, each in its own session (opened on its first feed)."""

    def __init__(
        self,
        model: ir.Model,
        names: Sequence[str],
        segments: list[segment_plan.Segment],
        shared: dict[str, ir.TensorProtocol],
        scratch: Path,
    ):
        self.model, self.names, self.segments, self.scratch = model, names, segments, scratch
        self.whole = _session_proto(model, shared)
        self.buffers = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t.numpy())) for n, t in shared.items()}
        self.sessions: list[ort.InferenceSession | None] = [None] * len(segments)
        self.graph_inputs = {value.name for value in model.graph.inputs}

    def __call__(self, feed: Feed) -> Iterator[Outputs]:
        """The named tensors, one segment's at a time (the asked-for graph inputs with the first)."""
        available = dict(feed)
        part = {name: np.ascontiguousarray(feed[name]) for name in self.names if name in self.graph_inputs}
        for index, segment in enumerate(self.segments):
            session = self.sessions[index]
            if session is None:
                session = _segment_session(self.whole, segment, available, self.buffers, self.scratch / f"{index}.onnx")
                self.sessions[index] = session
            feed_part = {name: available[name] for name in segment.inputs}
            made = dict(zip(segment.outputs, run_views(session, segment.outputs, feed_part)))
            del session, feed_part
            release_mappings(self.model)  # this segment's weight pages
            later = {name for other in self.segments[index + 1 :] for name in other.inputs}
            available = {name: array for name, array in [*available.items(), *made.items()] if name in later}
            part.update((name, made[name]) for name in segment.wanted)
            del made
            yield part
            part = {}


def _segment_session(
    whole: onnx.ModelProto,
    segment: segment_plan.Segment,
    available: Outputs,
    buffers: dict[str, ort.OrtValue],
    path: Path,
) -> ort.InferenceSession:
    """A session on one segment of the whole model's proto, its crossing inputs typed as the arrays that feed them."""
    proto = onnx.ModelProto()
    proto.CopyFrom(whole)
    graph = proto.graph
    nodes = [whole.graph.node[i] for i in segment.nodes]
    made = {name for node in nodes for name in node.output}
    keep = set(segment.initializers)
    originals = {value.name: value for value in whole.graph.input}
    del graph.node[:], graph.initializer[:], graph.input[:], graph.output[:], graph.value_info[:]
    graph.node.extend(nodes)
    graph.initializer.extend(tensor for tensor in whole.graph.initializer if tensor.name in keep)
    graph.input.extend(
        originals.get(name)
        or onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(available[name].dtype), None)
        for name in segment.inputs
    )
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in segment.outputs)
    graph.value_info.extend(info for info in whole.graph.value_info if info.name in made)
    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as in open_session's shared runs
    options.enable_cpu_mem_arena = False
    for name in segment.initializers:
        if name in buffers:
            options.add_initializer(name, buffers[name])
    onnx.save(proto, path)
    return load_session(str(path), options)


def run_views(session: ort.InferenceSession, names: Sequence[str], feed: Feed) -> list[np.ndarray]:
    """The named outputs as numpy views of onnxruntime's own buffers (session.run copies each one).

    onnxruntime's run-time failure is an InvalidModelError ("cannot run the model").
    """
    arrays = {name: np.ascontiguousarray(value) for name, value in feed.items()}
    inputs = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    try:
        outputs = session.run_with_ort_values(list(names), inputs)
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise InvalidModelError(f"onnxruntime cannot run the model: {_first_line(exc)}") from exc
    # A graph input comes back as a view of its OrtValue, which does not keep the array alive: return the array.
    return [arrays[name] if name in arrays else value.numpy() for name, value in zip(names, outputs)]


@contextlib.contextmanager
def recorded_runs(
    model: ir.Model, names: Sequence[str], feeds: Iterable[Feed], parked: ir.Model | None = None
) -> Iterator[Iterator[tuple[Feed, list[np.ndarray]]]]:
    """Run the model over the feeds, then replay each feed with its named outputs from a temporary file.

    The session is closed before the replay starts, so a second model can run with this one's session gone. For a
    large model, the ``parked`` model's own in-memory weights wait in that file meanwhile (see parked_weights).
    """
    with scratch_folder() as folder, contextlib.closing(RecordedOutputs(folder, names)) as recording:
        with parked_weights(parked, model, folder), open_segmented(model, names) as run:
            for feed in feeds:
                recording.start(feed)
                for outputs in run(feed):
                    recording.keep(outputs)
        yield recording.replay(names)


class RecordedOutputs:
    """Feeds and their ``names`` outputs written to a file in ``folder`` as they come, replayed later as memory maps."""

    def __init__(self, folder: Path, names: Sequence[str]):
        self.names = list(dict.fromkeys(names))
        self.path = folder / RECORDED_LOCATION
        self._store = open(self.path, "w+b")  # noqa: SIM115 - closed by close()
        # Each feed's input names and output names, in the order they were written.
        self._feeds: list[tuple[list[str], list[str]]] = []

    def close(self) -> None:
        """Close the file (the caller removes its folder)."""
        self._store.close()

    def start(self, feed: Feed) -> None:
        """Write the next feed's inputs; the outputs kept until the next start are this feed's."""
        for array in feed.values():
            np.save(self._store, array, allow_pickle=False)
        self._feeds.append((list(feed), []))

    def keep(self, outputs: Outputs) -> None:
        """Write the recorded names among one part of the current feed's outputs, dropping them from ``outputs``."""
        stored = self._feeds[-1][1]
        for name in [name for name in self.names if name in outputs]:
            np.save(self._store, outputs.pop(name), allow_pickle=False)
            stored.append(name)

    def holds(self, names: Iterable[str]) -> bool:
        """Whether every feed recorded has every named output."""
        wanted = set(names)
        return bool(self._feeds) and all(wanted <= set(stored) for _, stored in self._feeds)

    def replay(self, names: Sequence[str]) -> Iterator[tuple[Feed, list[np.ndarray]]]:
        """Each feed with its named outputs (memory-mapped), in the order recorded."""
        self._store.seek(0)
        for inputs, stored in self._feeds:
            yield _replayed(self._store, self.path, inputs, stored, names)


@contextlib.contextmanager
def parked_weights(model: ir.Model | None, running: ir.Model, folder: Path) -> Iterator[None]:
    """While a large ``running`` model runs, ``model``'s in-memory weights it does not share wait in a file.

    They are written to ``folder`` and memory-mapped (their pages are not resident until read), then read back
    into memory at the end, the same values under the same names. Only numeric full-byte tensors are parked.
    """
    if model is None or not shares_weights(running):
        yield
        return
    shared = {id(value.const_value) for value in running.graph.initializers.values()}
    with _parked([v for v in _in_memory_weights(model) if id(v.const_value) not in shared], folder):
        yield


def _in_memory_weights(model: ir.Model) -> list[ir.Value]:
    """The initializers whose numeric full-byte values of SHARED_INITIALIZER_BYTES or more are held in memory."""
    return [
        value
        for value in model.graph.initializers.values()
        if value.const_value is not None
        and not isinstance(value.const_value, ir.ExternalTensor)
        and value.const_value.dtype in SHAREABLE_DTYPES
        and value.const_value.nbytes >= SHARED_INITIALIZER_BYTES
    ]


@contextlib.contextmanager
def _parked(values: list[ir.Value], folder: Path) -> Iterator[None]:
    """The values' tensors written to ``folder`` and memory-mapped for a while, then read back into memory."""
    path = folder / PARKED_LOCATION
    gc.collect()  # replaced weights waiting in reference cycles go before the parked copies are made
    with open(path, "wb") as store:
        for value in values:
            assert value.const_value is not None
            value.const_value = _parked_tensor(store, value.const_value, folder)
    try:
        yield
    finally:
        for value in values:
            value.const_value = _unparked(value.const_value)


def _parked_tensor(store: BinaryIO, tensor: ir.TensorProtocol, folder: Path) -> ir.ExternalTensor:
    """Append the tensor's bytes to the store and return a mapped tensor that reads them back."""
    offset = store.tell()
    array = np.ascontiguousarray(tensor.numpy())
    store.write(array.astype(array.dtype.newbyteorder("<"), copy=False).data)  # the bytes, uncopied where native
    return ir.ExternalTensor(
        PARKED_LOCATION,
        offset,
        tensor.nbytes,
        tensor.dtype,
        shape=tensor.shape,
        name=tensor.name or "",
        doc_string=tensor.doc_string,
        metadata_props=dict(tensor.metadata_props),
        base_dir=folder,
    )


def _unparked(tensor: ir.TensorProtocol) -> ir.Tensor:
    """A parked tensor's values in memory again (copied slice by slice), its mapping closed."""
    source = tensor.numpy()
    array = np.empty(source.shape, source.dtype)
    if source.ndim == 0:
        array[...] = source
    else:
        for part in read_in_slices(tensor, source):
            array[part] = source[part]
    del source
    release_mapping(tensor)
    return ir.Tensor(
        array,
        dtype=tensor.dtype,
        name=tensor.name,
        doc_string=tensor.doc_string,
        metadata_props=dict(tensor.metadata_props),
    )


def _replayed(
    store: BinaryIO, path: Path, input_names: list[str], stored: list[str], names: Sequence[str]
) -> tuple[Feed, list[np.ndarray]]:
    """One recorded feed and its outputs (stored in ``stored`` order, returned in ``names`` order) from the store's
    current position, the outputs memory-mapped from ``path``.

    Mapped, the outputs take no memory while the second model runs; their pages are read when they are compared.
    """
    feed = {name: np.load(store, allow_pickle=False) for name in input_names}
    outputs = {name: _mapped_array(store, path) for name in stored}
    return feed, [outputs[name] for name in names]


def _mapped_array(store: BinaryIO, path: Path) -> np.ndarray:
    """The .npy array at the store's position as a read-only memory map of ``path``; the store moves past it."""
    version = np.lib.format.read_magic(store)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(store)
    offset = store.tell()
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    store.seek(offset + size)
    if size == 0:  # nothing to map
        return np.empty(shape, dtype)
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order).view(np.ndarray)


def release_mappings(model: ir.Model) -> None:
    """Unmap the model's external tensors, dropping the pages read so far (they map again on the next read)."""
    for value in model.graph.initializers.values():
        release_mapping(value.const_value)


def _shared_initializers(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """The main graph's large, used initializers whose dtype numpy and onnxruntime share as is."""
    # onnxruntime drops unused initializers before it takes the shared ones, and then cannot find them.
    return {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if value.const_value is not None
        and (value.uses() or value.is_graph_output())
        and value.const_value.nbytes >= SHARED_INITIALIZER_BYTES
        and value.const_value.dtype in SHAREABLE_DTYPES
    }


def _session_proto(model: ir.Model, shared: dict[str, ir.TensorProtocol]) -> onnx.ModelProto:
    """The model's proto: shared initializers as data-less external references, other mapped data inlined."""
    # A proto in memory has no folder to resolve external data against.
    stand_ins = {
        name: ir.ExternalTensor(SHARED_LOCATION, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name)
        for name, tensor in shared.items()
    }
    with inlined_mapped_data(model), _swapped(model, stand_ins):
        return ir.to_proto(model)


@contextlib.contextmanager
def _swapped(model: ir.Model, tensors: dict[str, ir.TensorProtocol]) -> Iterator[None]:
    """The model with the named initializers' values replaced for a while."""
    originals = {name: model.graph.initializers[name].const_value for name in tensors}
    try:
        for name, tensor in tensors.items():
            model.graph.initializers[name].const_value = tensor
        yield
    finally:
        for name, tensor in originals.items():
            model.graph.initializers[name].const_value = tensor


def _return_freed_memory() -> None:
    """Hand the heap memory a closed session freed back to the system (glibc keeps it otherwise); elsewhere a no-op."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _map_large_allocations() -> None:
    """Have glibc serve every allocation from MMAP_THRESHOLD bytes on with its own mapping, unmapped when freed.

    By default glibc raises that threshold after each large free, so the next activations of that size come from
    the heap, which does not shrink: RSS creeps up by about a batch of outputs per run.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, where there is one to load."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
