"""Shared test configuration: hypothesis profiles and the GPU skip."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# "ci" keeps the whole suite well under 15 minutes on 2 cores; "dev" explores more.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("DETKIT_HYPOTHESIS_PROFILE", "ci"))
