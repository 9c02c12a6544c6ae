"""Argument validation at the boundary, with uniform messages.

Every check runs at trace time on shapes, dtypes and *concrete* Python/NumPy values only;
nothing here inspects traced data, so nothing raises inside ``jit``. Shape problems are
``ValueError``, dtype problems ``TypeError``, and each message names the argument, what was
expected and what was given.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("mean", "sum", "none")


def floating(x, name: str) -> jax.Array:
    """``x`` as a JAX array, which must have a floating dtype (TypeError otherwise)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def integer(x, name: str) -> jax.Array:
    """``x`` as a JAX array, which must have an integer dtype (TypeError otherwise)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    return x


def normalize_axes(axis: int | Sequence[int] | None, ndim: int, name: str = "axis") -> tuple:
    """``axis`` (int, tuple of ints or None for all) as a sorted tuple of non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if not axes:
        raise ValueError(f"{name} must name at least one axis, got {axis!r}")
    out = []
    for a in axes:
        if not isinstance(a, (int, np.integer)):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axis!r} is out of range for an array of rank {ndim}")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same axis twice")
    return tuple(sorted(out))


def mask(where, shape: tuple, name: str = "where") -> jax.Array | None:
    """``where`` as a boolean array broadcast to ``shape``, or None."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {where.dtype}")
    try:
        return jnp.broadcast_to(where, shape)
    except ValueError:
        raise ValueError(
            f"{name} has shape {where.shape}, which does not broadcast to {shape}"
        ) from None


def concrete_value(x):
    """The NumPy value of ``x`` if it is known at trace time, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def positive(x, name: str) -> None:
    """Raises ValueError if ``x`` is concrete and not everywhere > 0 (NaN included)."""
    value = concrete_value(x)
    if value is not None and not np.all(value > 0):
        raise ValueError(f"{name} must be > 0, got {_short(value)}")


def temperature(t, shape: tuple, axes: tuple):
    """Validates ``temperature`` for an input of ``shape`` reduced over ``axes``.

    Returns None for the plain case ``t == 1`` given as a Python number (so the division is
    skipped entirely), else ``t`` as a floating array. An array must broadcast to ``shape``
    with size 1 along the reduced axes: one temperature per row.
    """
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        if not t > 0:
            raise ValueError(f"temperature must be > 0, got {t}")
        return None if t == 1 else t
    t = floating(t, "temperature")
    if t.ndim > len(shape):
        raise ValueError(f"temperature has shape {t.shape}, which does not broadcast to {shape}")
    padded = (1,) * (len(shape) - t.ndim) + t.shape
    for i, (dt, dx) in enumerate(zip(padded, shape, strict=True)):
        if dt not in (1, dx):
            raise ValueError(
                f"temperature has shape {t.shape}, which does not broadcast to {shape}"
            )
        if i in axes and dt != 1:
            raise ValueError(
                f"temperature has shape {t.shape}, but it must have size 1 along the "
                f"reduced axes {axes} of an input of shape {shape} (one temperature per row)"
            )
    positive(t, "temperature")
    return t


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def unit_interval(value, name: str) -> None:
    """Raises ValueError unless ``value`` is concrete and in [0, 1] (tracers pass)."""
    v = concrete_value(value)
    if v is not None and not np.all((v >= 0) & (v <= 1)):
        raise ValueError(f"{name} must be in [0, 1], got {_short(v)}")


def non_negative(value, name: str) -> None:
    v = concrete_value(value)
    if v is not None and not np.all(v >= 0):
        raise ValueError(f"{name} must be >= 0, got {_short(v)}")


def vector(x, length: int, name: str, what: str) -> jax.Array | None:
    """``x`` as a floating vector of ``length`` entries (one per ``what``), or None."""
    if x is None:
        return None
    x = floating(x, name)
    if x.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) (one per {what}), got {x.shape}")
    return x


def _short(value: np.ndarray) -> str:
    return repr(value.item()) if value.size == 1 else f"an array with min {np.min(value)!r}"
