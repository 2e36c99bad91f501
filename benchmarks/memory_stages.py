"""Where a `graphquant optimize` run peaks in memory: VmRSS (anonymous and file-backed) sampled beside the main thread's
stack, in the same process (tracemalloc cannot see onnxruntime's allocations).

Prints ru_maxrss, the sampled peak with its stack, the highest sample of each stage (the innermost graphquant frames)
and a timeline. Sizes are in GiB, or as a ratio of --weight-bytes when given (scale.py's "fp32 weights").

    .venv/bin/python benchmarks/memory_stages.py --weight-bytes 574668960 -- \\
        optimize benchmarks/out/scale/vgg19/model.onnx -o /tmp/out/model.onnx --recipe w8a8 --target qdq \\
        --calib benchmarks/out/scale/vgg19/calib.npz
    (scale.py --sizes vgg19 --keep leaves that model and its calibration data there)
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import threading
import time
import traceback

# Frames of these modules name a stage.
STAGE_MODULES = ("passes/", "lowering/", "analysis/", "graphquant/api.py", "graphquant/pipeline.py", "rewrites.py")


@dataclasses.dataclass
class Sample:
    """One reading: seconds since the start, resident bytes (total, anonymous, file-backed) and the stage."""

    seconds: float
    rss: int
    anon: int
    file: int
    stack: list[str]


def resident() -> tuple[int, int, int]:
    """VmRSS, RssAnon and RssFile of this process, in bytes."""
    found = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(line.split()[1]) * 1024
    return found["VmRSS"], found.get("RssAnon", 0), found.get("RssFile", 0)


def sample_until(stop: threading.Event, main: int, period: float, samples: list[Sample]) -> None:
    """Append a sample every ``period`` seconds until ``stop`` is set."""
    start = time.perf_counter()
    while not stop.is_set():
        frame = sys._current_frames().get(main)
        frames = traceback.extract_stack(frame) if frame is not None else []
        stack = [f"{f.filename.split('graphquant/')[-1]}:{f.lineno}:{f.name}" for f in frames]
        samples.append(Sample(time.perf_counter() - start, *resident(), stack))
        time.sleep(period)


def stage(sample: Sample) -> str:
    """The innermost four graphquant frames of the sample's stack."""
    frames = [frame for frame in sample.stack if any(module in frame for module in STAGE_MODULES)]
    return " > ".join(frames[-4:])


def main() -> None:
    """Run the CLI with the sampler, then print the peak, the per-stage maxima and the timeline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-bytes", type=int, default=0, help="report sizes as a ratio of this")
    parser.add_argument("--period", type=float, default=0.005, help="seconds between samples")
    parser.add_argument("--stages", type=int, default=15, help="how many stages to list")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="the graphquant command line, after --")
    args = parser.parse_args()
    unit = args.weight_bytes or 2**30

    def size(count: int) -> str:
        return f"{count / unit:.3f}{'x' if args.weight_bytes else ' GiB'}"

    samples: list[Sample] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_until, args=(stop, threading.get_ident(), args.period, samples))
    sampler.start()
    from graphquant import cli  # imported under the sampler: imports are part of the footprint

    sys.argv = ["graphquant", *[part for part in args.cli if part != "--"]]
    try:
        cli.main()
    except SystemExit:
        pass
    finally:
        stop.set()
        sampler.join()
    peak = max(samples, key=lambda s: s.rss)
    print(f"ru_maxrss {size(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")
    print(f"sampled peak {size(peak.rss)} (anonymous {size(peak.anon)}, file-backed {size(peak.file)}) at:")
    print("\n".join(f"    {frame}" for frame in peak.stack[-12:]))
    best: dict[str, Sample] = {}
    for sample in samples:
        key = stage(sample)
        if key not in best or sample.rss > best[key].rss:
            best[key] = sample
    print("highest sample of each stage:")
    for key, sample in sorted(best.items(), key=lambda item: -item[1].rss)[: args.stages]:
        print(f"  {size(sample.rss)} t={sample.seconds:6.1f} s  {key}")
    print("timeline:")
    last = -1e9
    for sample in samples:
        if sample.seconds - last >= 2.0:
            last = sample.seconds
            cells = f"{size(sample.rss)} (anon {size(sample.anon)}, file {size(sample.file)})"
            print(f"  t={sample.seconds:6.1f} s  {cells}  {stage(sample)[-100:]}")


if __name__ == "__main__":
    main()
