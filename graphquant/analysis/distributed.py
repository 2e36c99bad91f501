"""Calibration as a map-reduce on Ray: workers run onnxruntime on their batches, the driver folds the statistics.

Batch i goes to worker i mod N, each worker reduces it to its statistics, and the driver folds those in batch order,
as the single-process Calibrator folds its own: the result is the same to the bit (sums, row samples and Gram
matrices included), whatever the number of workers. Each worker gets the model's bytes once per calibration run.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import socket
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import onnx
import onnx_ir as ir

from graphquant.analysis.calibration import reduce_batch
from graphquant.analysis.data import Feed
from graphquant.analysis.runner import (
    PROTO_SIZE_LIMIT,
    initializer_bytes,
    inlined_mapped_data,
    open_session,
    release_mappings,
    run_views,
    shares_weights,
)
from graphquant.analysis.stats import CalibrationStats
from graphquant.errors import CalibrationError, GraphQuantError

# Batches sent ahead to each worker: enough to keep it busy, few enough that the driver holds little.
IN_FLIGHT_PER_WORKER = 2
# Seconds to wait for the workers to start and load the model (their CPUs may be taken by other work).
START_TIMEOUT_S = 300.0
# Seconds to wait for a Ray cluster's address to accept a connection before refusing it.
CONNECT_TIMEOUT_S = 5.0
INSTALL_HINT = "pip install 'graphquant[ray]'"


class RayCluster:
    """A connected Ray cluster and its calibration workers (one CPU each), started on first use and kept for reuse."""

    def __init__(self, workers: int):
        self.workers = workers
        self._actors: list[Any] = []

    def collect(
        self,
        model: ir.Model,
        names: Sequence[str],
        feeds: Iterable[Feed],
        sample_rows: int = 0,
        gram_names: Sequence[str] = (),
    ) -> CalibrationStats:
        """The statistics of the named tensors over the feeds, each batch reduced on a worker, folded in order."""
        import ray

        shipped = ray.put(_model_bytes(model))
        workers = self._started()
        stats = CalibrationStats()
        with _task_errors_raised():
            options = (list(names), shares_weights(model), sample_rows, list(gram_names))
            _started_within(ray, [worker.load.remote(shipped, *options) for worker in workers])
            del shipped  # the workers hold their copies; the object store may drop its own
            pending: collections.deque[Any] = collections.deque()
            for index, feed in enumerate(feeds):
                pending.append(workers[index % self.workers].reduce.remote(feed))
                if len(pending) >= IN_FLIGHT_PER_WORKER * self.workers:
                    stats = stats.merge(ray.get(pending.popleft()))
            for batch in pending:
                stats = stats.merge(ray.get(batch))
            ray.get([worker.unload.remote() for worker in workers])
        return stats

    def _started(self) -> list[Any]:
        """The worker actors, started the first time (Ray ends them once this object is gone)."""
        if not self._actors:
            self._actors = [_actor_class().remote() for _ in range(self.workers)]
        return self._actors


class ShardWorker:
    """A Ray actor's state: one onnxruntime session on the model it was last sent, reducing each batch it is sent."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._names: list[str] = []
        self._sample_rows = 0
        self._gram_names: list[str] = []
        self._session: Any = None

    def load(self, model: bytes, names: list[str], share: bool, sample_rows: int, gram_names: list[str]) -> None:
        """Open a session on the model (its serialized proto) that exposes the named tensors."""
        self.unload()
        self._names, self._sample_rows, self._gram_names = names, sample_rows, gram_names
        # The same weight handling as the driver's session, so that onnxruntime runs the same kernels.
        self._session = self._stack.enter_context(
            open_session(ir.from_proto(onnx.load_from_string(model)), names, share)
        )

    def unload(self) -> None:
        """Close the session and free the model."""
        self._session = None
        self._stack.close()

    def reduce(self, feed: Feed) -> CalibrationStats:
        """The statistics of one batch (as Calibrator.collect reduces it)."""
        stats = CalibrationStats(batches=1)
        outputs = dict(zip(self._names, run_views(self._session, self._names, feed)))
        reduce_batch(stats, outputs, self._sample_rows, self._gram_names, None)
        return stats


def _started_within(ray: Any, loads: list[Any]) -> None:
    """Wait for the workers' model loads, or refuse if they do not start in time."""
    try:
        ray.get(loads, timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise CalibrationError(
            f"Ray calibration workers did not start within {START_TIMEOUT_S:.0f} s (are the cluster's CPUs taken?)"
        ) from None


@functools.cache
def _actor_class() -> Any:
    """ShardWorker as a Ray actor class taking one CPU."""
    import ray

    return ray.remote(num_cpus=1)(ShardWorker)


def connect(address: str | None, workers: int | None) -> RayCluster | None:
    """The Ray cluster at ``address``, or a local one of ``workers`` CPUs started here; None if neither is given.

    A Ray already initialized in this process is used as it is. Without ``workers``, one worker per cluster CPU.
    """
    if address is None and workers is None:
        return None
    if workers is not None and workers < 1:
        raise CalibrationError(f"--workers must be at least 1, got {workers}")
    ray = _imported_ray()
    if address is not None:
        _check_reachable(address)
    if not ray.is_initialized():
        _init(ray, address, workers)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    wanted = cpus if workers is None else workers
    if not 1 <= wanted <= cpus:
        raise CalibrationError(f"--workers {wanted}: the Ray cluster has {cpus} CPUs (one per worker)")
    return RayCluster(wanted)


def _imported_ray() -> Any:
    """The ray module, or a CalibrationError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise CalibrationError(f"--ray/--workers need Ray, which is not installed ({INSTALL_HINT})") from None
    return ray


def _init(ray: Any, address: str | None, workers: int | None) -> None:
    """Connect to the cluster at ``address``, or start a local one of ``workers`` CPUs (no dashboard)."""
    if address is None:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        return
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CalibrationError(f"--ray {address}: cannot connect to a Ray cluster ({_first_line(exc)})") from None


def _check_reachable(address: str) -> None:
    """Refuse a host:port address that accepts no connection ('auto' and ray:// addresses go to Ray as they are)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CalibrationError(f"--ray {address}: expected HOST:PORT, 'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise CalibrationError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def _model_bytes(model: ir.Model) -> bytes:
    """The model as one serialized proto, its memory-mapped weights read in (the driver keeps no copy)."""
    if initializer_bytes(model) > PROTO_SIZE_LIMIT:
        raise CalibrationError(
            f"--ray/--workers: the model's weights exceed {PROTO_SIZE_LIMIT >> 30} GiB, which Ray calibration ships "
            "as one protobuf; calibrate in one process (without --ray/--workers)"
        )
    with inlined_mapped_data(model):
        serialized = ir.to_proto(model).SerializeToString()
    release_mappings(model)
    return serialized


@contextlib.contextmanager
def _task_errors_raised() -> Iterator[None]:
    """A graphquant error raised on a worker is raised here as itself (Ray wraps it in its own type)."""
    import ray

    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, GraphQuantError):
            raise exc.cause from None
        raise


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
