"""Layer-form latencies: measured once, then read from this process or the cache file."""

from __future__ import annotations

import json

from graphquant.analysis import cost


def test_latencies_are_measured_once_and_kept_in_the_cache_file(latency_cache):
    calls = []

    def measure() -> list[float]:
        calls.append(1)
        return [10.0, 20.0]

    keys = ["test|a", "test|b"]
    assert cost.cached_latencies(keys, measure) == [10.0, 20.0]
    assert cost.cached_latencies(keys, measure) == [10.0, 20.0]
    assert len(calls) == 1
    stored = json.loads((latency_cache / "latency.json").read_text())
    assert (stored["test|a"], stored["test|b"]) == (10.0, 20.0)
    assert cost.cached_latencies(["test|b"], measure) == [20.0] and len(calls) == 1


def test_an_unreadable_cache_file_is_measured_again(latency_cache):
    (latency_cache / "latency.json").write_text("{not json")
    assert cost.cached_latencies(["test|c"], lambda: [3.0]) == [3.0]
    assert json.loads((latency_cache / "latency.json").read_text())["test|c"] == 3.0
