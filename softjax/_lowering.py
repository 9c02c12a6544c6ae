"""A function with one implementation per platform, chosen when it is lowered.

``jax.default_backend()`` is the host, not the target: a function jitted for a TPU topology
from a CPU host, or exported for ``["cpu", "cuda", "tpu"]``, must hold the TPU kernel for
the TPU and the GPU kernel for the GPU. :func:`platform_dependent` stages one primitive out
whose lowering rule, registered per platform, lowers only that platform's implementation.

``lax.platform_dependent`` does the same for plain JAX code, but in a multi-platform lowering
it lowers every branch for every platform, and a compiled Pallas kernel cannot be lowered
for a platform it was not written for (a Mosaic kernel for the CPU, say): here each
implementation is lowered for its own platforms only.
"""

from __future__ import annotations

import functools

import jax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

_call_p = Primitive("softjax_platform_dependent")
_call_p.multiple_results = True


def platform_dependent(*args, default, **per_platform):
    """``per_platform[p](*args)`` on platform ``p`` (``default`` elsewhere).

    Every implementation takes and returns the same pytrees of arrays, and must have the
    output shapes of ``default`` (which is traced once to find them).
    """
    unknown = set(per_platform) - set(PLATFORMS)
    if unknown:
        raise ValueError(f"unknown platforms {sorted(unknown)}; expected some of {PLATFORMS}")
    flat, in_tree = jax.tree.flatten(args)
    out_shapes = jax.eval_shape(default, *args)
    out_flat, out_tree = jax.tree.flatten(out_shapes)
    outs = _call_p.bind(
        *flat,
        branches=tuple((p, _flat(fn, in_tree)) for p, fn in sorted(per_platform.items())),
        default=_flat(default, in_tree),
        out_avals=tuple(jax.core.ShapedArray(s.shape, s.dtype) for s in out_flat),
    )
    return jax.tree.unflatten(out_tree, outs)


def _flat(fn, in_tree):
    @functools.wraps(fn)
    def flat_fn(*flat_args):
        return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, flat_args)))

    return flat_fn


def _abstract_eval(*avals, branches, default, out_avals):
    return out_avals


def _impl(*args, branches, default, out_avals):
    return jax.jit(_call_p.bind, static_argnames=("branches", "default", "out_avals"))(
        *args, branches=branches, default=default, out_avals=out_avals
    )


def _lowering(platform):
    def rule(ctx, *args, branches, default, out_avals):
        fn = dict(branches).get(platform, default)
        return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)

    return rule


def _batch(args, dims, *, branches, default, out_avals):
    """``vmap``: one call per batch element (``lax.map``), the kernels being unbatched."""
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    moved = [
        jax.numpy.broadcast_to(a, (size, *a.shape)) if d is None else jax.numpy.moveaxis(a, d, 0)
        for a, d in zip(args, dims, strict=True)
    ]

    def one(xs):
        return _call_p.bind(*xs, branches=branches, default=default, out_avals=out_avals)

    return jax.lax.map(one, moved), [0] * len(out_avals)


_call_p.def_impl(_impl)
_call_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[_call_p] = _batch
mlir.register_lowering(_call_p, _lowering(None))
for _platform in PLATFORMS:
    mlir.register_lowering(_call_p, _lowering(_platform), platform=_platform)
