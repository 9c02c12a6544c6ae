"""Shared test set-up: float64 on (references are float64), tolerances in one place."""

import os

# Tests that need several devices set this before jax is imported; harmless otherwise.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Tolerance of a result against a float64 reference, by the dtype it is computed in: the
# rounding of the output dtype plus a few ulps of the float32 compute.
RTOL = {
    np.dtype("float64"): 1e-12,
    np.dtype("float32"): 2e-6,
    np.dtype("bfloat16") if hasattr(np, "bfloat16") else "bfloat16": 1e-2,
}
TOL = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 8e-3, "float16": 1e-3}


def tol(dtype) -> float:
    return TOL[np.dtype(dtype).name]
