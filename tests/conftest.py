"""Make the shared test builders importable as ``builders`` from every test folder; hypothesis profiles."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

# Hypothesis profiles: "ci" (the default) is small and derandomized; GRAPHQUANT_HYPOTHESIS=deep runs many more examples.
settings.register_profile(
    "ci", max_examples=10, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("deep", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("GRAPHQUANT_HYPOTHESIS", "ci"))
