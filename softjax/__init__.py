"""softjax: the softmax family for JAX, exact, NaN-free and memory-lean."""

from ._losses import binary_cross_entropy as binary_cross_entropy
from ._losses import cross_entropy as cross_entropy
from ._softmax import log_softmax as log_softmax
from ._softmax import logsumexp as logsumexp
from ._softmax import softmax as softmax
from .sampling import sample as sample

__all__ = [
    "binary_cross_entropy",
    "cross_entropy",
    "log_softmax",
    "logsumexp",
    "sample",
    "softmax",
]
