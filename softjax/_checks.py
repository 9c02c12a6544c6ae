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


# Class indices are int32 inside softjax: an index computed in a narrower dtype (a uint8
# label against 300 classes) wraps around.
_INT32 = np.iinfo(np.int32)


def class_labels(x, name: str = "labels") -> jax.Array:
    """Integer class indices of any integer dtype as int32, saturating.

    Values beyond the int32 range (uint32, int64) become its bounds, which lie outside any
    vocabulary, so they stay out of range (and loud) rather than wrapping onto a class.
    """
    x = integer(x, name)
    if x.dtype == jnp.int32:
        return x
    info = np.iinfo(x.dtype)
    if info.min < _INT32.min or info.max > _INT32.max:
        x = jnp.clip(x, max(info.min, _INT32.min), min(info.max, _INT32.max))
    return x.astype(jnp.int32)


def ignore_index(value) -> int | None:
    """``ignore_index`` as a Python int in the int32 range of :func:`class_labels`, or None."""
    if value is None:
        return None
    value = number(value, "ignore_index", integral=True)
    if not _INT32.min <= value <= _INT32.max:
        raise ValueError(f"ignore_index must be within the int32 range, got {value}")
    return value


def number(value, name: str, *, integral: bool = False):
    """A concrete real scalar (Python, NumPy or a 0-d JAX array) as a Python number.

    ``integral=True`` asks for an integer (an integer dtype, or a Python int). Raises
    ``TypeError`` naming ``name`` for anything else (bools, strings, arrays, tracers).
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = concrete_value(value) if not isinstance(value, (int, float)) else np.asarray(value)
    if (
        v is None
        or v.ndim != 0
        or not (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating))
    ):
        raise TypeError(f"{name} must be a concrete number, got {value!r}")
    if integral:
        if not np.issubdtype(v.dtype, np.integer):
            raise TypeError(f"{name} must be an int, got {value!r}")
        return int(v)
    return float(v)


def softcap(value, name: str = "logit_softcap"):
    """``logit_softcap`` checked: None for None or ``+inf`` (no cap), else ``value`` itself.

    A concrete cap must be > 0 (``+inf`` means no cap: ``c tanh(x / c) -> x``); a traced
    one passes unchecked, and must be finite.
    """
    if value is None:
        return None
    v = concrete_value(value)
    if v is not None:
        if v.ndim != 0 or not (np.issubdtype(v.dtype, np.number) and not np.iscomplexobj(v)):
            raise TypeError(f"{name} must be a number > 0 or None, got {value!r}")
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {_short(v)}")
        if np.isposinf(v):
            return None
    return value


def normalize_axes(axis: int | Sequence[int] | None, ndim: int, name: str = "axis") -> tuple:
    """``axis`` (int, tuple of ints or None for all) as a sorted tuple of non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axes = (axis,)
    elif isinstance(axis, (tuple, list)):
        axes = tuple(axis)
    else:
        raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}")
    if not axes:
        raise ValueError(f"{name} must name at least one axis, got {axis!r}")
    out = []
    for a in axes:
        if not isinstance(a, (int, np.integer)) or isinstance(a, (bool, np.bool_)):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axis!r} is out of range for an array of rank {ndim}")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same axis twice")
    return tuple(sorted(out))


def broadcasts_to(shape: tuple, target: tuple, name: str, what: str | None = None) -> None:
    """Raises ValueError unless an array of ``shape`` broadcasts to ``target`` as it is
    (NumPy's rules from the right, without growing ``target``). ``what`` describes
    ``target`` in the message (default: the shape itself)."""
    shape, target = tuple(shape), tuple(target)
    fits = len(shape) <= len(target) and all(
        d in (1, t) for d, t in zip(reversed(shape), reversed(target), strict=False)
    )
    if not fits:
        raise ValueError(f"{name} has shape {shape}, which does not broadcast to {what or target}")


def mask(where, shape: tuple, name: str = "where") -> jax.Array | None:
    """``where`` as a boolean array broadcast to ``shape``, or None."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {where.dtype}")
    broadcasts_to(where.shape, shape, name)
    return jnp.broadcast_to(where, shape)


def has_classes(num_classes: int, name: str, shape: tuple, axis) -> None:
    """Raises ValueError when the class axis is empty: no class, no label can be right."""
    if num_classes == 0:
        raise ValueError(
            f"{name} has shape {shape}, with no class along axis {axis}: at least one is needed"
        )


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


def temperature(t, shape: tuple, axes: tuple, name: str = "temperature"):
    """Validates ``temperature`` (called ``name``) for an input of ``shape`` reduced over ``axes``.

    Returns None for the plain case ``t == 1`` given as a Python number (so the division is
    skipped entirely), else ``t`` as a floating array. An array must broadcast to ``shape``
    with size 1 along the reduced axes: one temperature per row.
    """
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        if not t > 0:
            raise ValueError(f"{name} must be > 0, got {t}")
        return None if t == 1 else t
    t = floating(t, name)
    broadcasts_to(t.shape, shape, name)
    padded = (1,) * (len(shape) - t.ndim) + t.shape
    for i, dt in enumerate(padded):
        if i in axes and dt != 1:
            raise ValueError(
                f"{name} has shape {t.shape}, but it must have size 1 along the "
                f"reduced axes {axes} of an input of shape {shape} (one temperature per row)"
            )
    positive(t, name)
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


def loss_options(label_smoothing, z_loss, logit_softcap, reduction_value):
    """Checks the scalar options shared by the cross-entropies; returns the softcap (None,
    or the cap: ``+inf`` is no cap)."""
    reduction(reduction_value)
    unit_interval(label_smoothing, "label_smoothing")
    non_negative(z_loss, "z_loss")
    return softcap(logit_softcap)


def int_labels(labels, batch_shape: tuple, logits_desc: str, caller: str | None = None):
    """``labels`` must be integer with the ``batch_shape`` (logits without the class axis).

    Returns them as int32 (:func:`class_labels`), whatever their dtype. ``caller`` names a
    function that takes no class probabilities (for its message).
    """
    labels = jnp.asarray(labels)
    if caller is not None and jnp.issubdtype(labels.dtype, jnp.floating):
        raise TypeError(
            f"{caller} takes integer class labels; got labels of floating dtype "
            f"{labels.dtype} (for class probabilities use cross_entropy on the logits)"
        )
    if jnp.issubdtype(labels.dtype, jnp.floating):
        raise ValueError(
            f"labels has floating dtype {labels.dtype} and shape {labels.shape}: class "
            f"probabilities must have the shape of {logits_desc}"
        )
    labels = class_labels(labels, "labels")
    if labels.shape != batch_shape:
        raise ValueError(
            f"labels has shape {labels.shape} but {logits_desc} has shape {batch_shape}"
        )
    return labels
