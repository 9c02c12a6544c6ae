"""Shared test set-up: float64 on (references are float64), tolerances in one place."""

import os

# 8 virtual CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite runs on the CPU even where the accelerator plugins (the `accel` extra) are
# installed: they compile for chips this machine lacks, in their own processes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Relative tolerance of a result against a float64 reference, by the dtype it is computed
# in and returned as: the rounding of that dtype plus a few float32 ulps of arithmetic.
TOL = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 8e-3, "float16": 1e-3}


def tol(dtype) -> float:
    """The relative tolerance for results of ``dtype`` (see ``TOL``)."""
    return TOL[np.dtype(dtype).name]
