"""One dispatch point: the names of the implementations, what each can serve, the default.

Every op with more than one implementation (``dot_product_attention``,
``linear_cross_entropy``) registers them in a :class:`Registry` and resolves its
``implementation=`` argument with :meth:`Registry.select`. The names mean the same thing in
every op:

* ``"xla"``: plain XLA ops that materialise the full scores or logits (``[B, N, T, S]``,
  ``[N, V]``), as ``jax.nn.dot_product_attention(implementation="xla")`` does. The oracle
  of the other two, and the fastest for small sizes.
* ``"chunked"``: XLA loops over blocks with an online softmax and a custom VJP that
  recomputes each block; memory linear in the sequence length, flat in the vocabulary.
  Any backend.
* ``"pallas"``: Pallas kernels (Mosaic on TPU, Triton on GPU, interpreted on CPU), the
  family chosen when lowering (``softjax._lowering``).

``implementation=None`` takes the first name of the op's preference order (a function of
the call: attention prefers ``"xla"`` for short sequences on CPU) that can serve the call.
A named implementation that cannot serve it raises ``NotImplementedError`` saying what is
missing; a name outside the vocabulary raises ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax

Name = Literal["xla", "chunked", "pallas"]
NAMES: tuple[str, ...] = ("xla", "chunked", "pallas")

# Names of other libraries' implementations, and where a user finds them.
ELSEWHERE = {
    "cudnn": "jax.nn.dot_product_attention(implementation='cudnn')",
    "triton": "implementation='pallas' (Triton kernels on GPUs)",
    "mosaic_tpu": "implementation='pallas' (Mosaic kernels on TPUs)",
}


@dataclasses.dataclass(frozen=True)
class Call:
    """What a call asks of an implementation: the facts ``supported`` decides on.

    ``platform`` is the host's default backend (``jax.default_backend()``): a preference, not
    the lowering target (a Pallas implementation still picks its kernel family when lowered).
    """

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, Any]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    platform: str = dataclasses.field(default_factory=jax.default_backend)


def always(call: Call) -> str | None:
    """``supported`` for an implementation that serves every call."""
    del call
    return None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """``fn`` serves the calls for which ``supported(call)`` is None (else: what is missing)."""

    name: str
    fn: Callable
    supported: Callable[[Call], str | None] = always


class Registry:
    """The implementations of one op and its order of preference for ``None``."""

    def __init__(self, op: str, preference: Callable[[Call], tuple[str, ...]]):
        self.op = op
        self.preference = preference
        self._impls: dict[str, Implementation] = {}

    def register(self, name: str, fn: Callable, supported=always) -> None:
        if name not in NAMES:
            raise ValueError(f"{name!r} is not an implementation name; expected one of {NAMES}")
        self._impls[name] = Implementation(name, fn, supported)

    @property
    def names(self) -> tuple[str, ...]:
        """The registered names, in the vocabulary's order."""
        return tuple(n for n in NAMES if n in self._impls)

    def select(self, implementation: str | None, call: Call) -> Implementation:
        """The implementation that serves ``call`` (see the module docstring)."""
        if implementation is None:
            reasons = []
            for name in self.preference(call):
                impl = self._impls[name]
                reason = impl.supported(call)
                if reason is None:
                    return impl
                reasons.append(f"{name!r}: {reason}")
            raise NotImplementedError(
                f"no implementation of {self.op} serves this call ({reasons})"
            )
        if implementation in ELSEWHERE:
            raise NotImplementedError(
                f"{self.op} has no implementation {implementation!r}; "
                f"use {ELSEWHERE[implementation]}, or one of {self.names} or None"
            )
        if implementation not in NAMES:
            raise ValueError(
                f"implementation must be one of {self.names} or None, got {implementation!r}"
            )
        impl = self._impls.get(implementation)
        if impl is None:
            raise NotImplementedError(
                f"{self.op} has no {implementation!r} implementation yet; "
                f"choose from {self.names} or None"
            )
        reason = impl.supported(call)
        if reason is not None:
            raise NotImplementedError(
                f"{self.op}(implementation={implementation!r}) cannot serve this call: {reason}"
            )
        return impl
