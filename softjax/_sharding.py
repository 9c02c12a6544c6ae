"""Helpers for code that runs inside ``shard_map``: the mesh axes a value varies over.

With ``check_vma=True`` (the default), ``shard_map`` types every value with the set of manual
mesh axes it varies over. A loop carry must have the type of the loop body's results, and a
cotangent must be summed over the axes it varies over and its primal does not; these helpers
read and set that type, and are the identity outside ``shard_map``.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(a) -> set:
    """The manual mesh axes ``a`` varies over inside ``shard_map`` (empty outside)."""
    t = jax.typeof(a)
    vma = getattr(t, "vma", None)  # jax <= 0.9
    if vma is None:
        vma = getattr(getattr(t, "manual_axis_type", None), "varying", None)
    return set(vma or ())


def tracks_varying_axes(a) -> bool:
    """Whether this JAX records the mesh axes a value varies over (see ``varying_axes``)."""
    t = jax.typeof(a)
    return hasattr(t, "vma") or hasattr(t, "manual_axis_type")


def match_vma(tree, *like):
    """``tree`` marked as varying over every mesh axis that any of ``like`` varies over.

    Inside ``shard_map`` a loop carry must have the type of the loop body's results, which
    vary wherever ``x`` or ``w`` do (data and vocabulary axes); fresh zeros do not.
    Outside ``shard_map`` this is the identity.
    """
    axes = set()
    for a in jax.tree.leaves(like):
        axes |= varying_axes(a)
    if not axes:
        return tree

    def one(a):
        missing = tuple(sorted(axes - varying_axes(a), key=str))
        return lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(one, tree)


def sum_to_type(ct, primal):
    """``psum`` of a cotangent over the mesh axes it varies over and its primal does not."""
    extra = tuple(sorted(varying_axes(ct) - varying_axes(primal), key=str))
    return lax.psum(ct, extra) if extra else ct


def psum(a, axis):
    """``lax.psum(a, axis)``, or ``a`` itself when ``axis`` is None (unsharded)."""
    return a if axis is None else lax.psum(a, axis)
