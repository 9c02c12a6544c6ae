"""Shared test set-up: float64 on (references are float64), hypothesis profiles.

The tolerance table and the assertion helpers live in ``_tolerances.py``; ``TOL`` and
``tol`` are re-exported here for the modules that import them from ``conftest``.
"""

import os

# 8 virtual CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite runs on the CPU even where the accelerator plugins (the `accel` extra) are
# installed: they compile for chips this machine lacks, in their own processes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from _tolerances import TOL as TOL  # noqa: E402
from _tolerances import tol as tol  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

# "ci" (the default): the same examples on every run and every machine, so a red CI run is
# reproducible and a green one is not luck; no example database, which would replay
# failures seen locally and make runs depend on the machine's history; no deadline, since
# the first example of a test pays for XLA compilation. max_examples is hypothesis's own
# default (tests that need fewer set their own).
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=100, print_blob=True
)
# "dev": fresh random examples each run (and the local database replaying past failures),
# to look for new counterexamples: HYPOTHESIS_PROFILE=dev pytest ...
settings.register_profile("dev", derandomize=False, deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
