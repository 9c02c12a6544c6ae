"""Shared test set-up: the suite runs as users run (x64 off), hypothesis profiles.

References are float64 NumPy, which needs no jax setting. A test that computes *in jax* in
float64 (float64 inputs, or a float64 result to compare bit for bit) opts in with
``@pytest.mark.x64`` (or ``pytestmark`` for a module): it then runs inside
``jax.enable_x64(True)``, and every other test sees the 32-bit defaults a user's program
sees, so a float64 array cannot slip into a float32 test unnoticed.

The tolerance table and the assertion helpers live in ``_tolerances.py``.
"""

import os
import shutil
import tempfile

# 8 virtual CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite runs on the CPU even where the accelerator plugins (the `accel` extra) are
# installed: they compile for chips this machine lacks, in their own processes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# XLA compilation is most of the suite's time, and many tests compile what another test (or
# the other worker) compiled already: a fresh closure or jit wrapper of the same computation
# misses jax's in-memory caches. A compilation cache on disk, made for this run, shared by its
# workers and removed at its end, serves them the same executables (keyed by the HLO and the
# compile options). The process that makes it (the xdist controller, or the only process)
# removes it; workers inherit its path.
if "SOFTJAX_TEST_JIT_CACHE" not in os.environ:
    os.environ["SOFTJAX_TEST_JIT_CACHE"] = tempfile.mkdtemp(prefix="softjax-tests-jit-")
    _OWNS_JIT_CACHE = True
else:
    _OWNS_JIT_CACHE = False
jax.config.update("jax_compilation_cache_dir", os.environ["SOFTJAX_TEST_JIT_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    if _OWNS_JIT_CACHE:
        shutil.rmtree(os.environ["SOFTJAX_TEST_JIT_CACHE"], ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Runs a test marked ``x64`` (set-up, call and tear-down) with 64-bit types enabled."""
    if item.get_closest_marker("x64") is None:
        return (yield)
    with jax.enable_x64(True):
        return (yield)


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


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocabulary blocks of at most 64 classes, token blocks of 5 and single-pass chunks of
    ``1000 // V`` tokens: the small problems of the fused-vocabulary tests (V ~ 150, N ~ 13)
    then span several ragged blocks and chunks of every loop."""
    from softjax._vocab import chunked

    monkeypatch.setattr(chunked, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(chunked, "MIN_BLOCK_V", 8)
    monkeypatch.setattr(chunked, "BLOCK_N", 5)
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 1000)
