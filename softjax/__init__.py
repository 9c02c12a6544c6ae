"""softjax: the softmax family for JAX, exact, NaN-free and memory-lean."""

from importlib import metadata as _metadata

from . import calibration as calibration
from . import conformal as conformal
from . import metrics as metrics
from ._attention import dot_product_attention as dot_product_attention
from ._gumbel import gumbel_softmax as gumbel_softmax
from ._log_prob_losses import kl_divergence as kl_divergence
from ._log_prob_losses import log_sigmoid as log_sigmoid
from ._log_prob_losses import nll_loss as nll_loss
from ._losses import binary_cross_entropy as binary_cross_entropy
from ._losses import cross_entropy as cross_entropy
from ._reweighted_losses import poly_loss as poly_loss
from ._reweighted_losses import sigmoid_focal_loss as sigmoid_focal_loss
from ._softmax import log_softmax as log_softmax
from ._softmax import logsumexp as logsumexp
from ._softmax import softmax as softmax
from ._sparse import entmax15 as entmax15
from ._sparse import sparsemax as sparsemax
from ._sparse_losses import entmax15_loss as entmax15_loss
from ._sparse_losses import sparsemax_loss as sparsemax_loss
from ._vocab import linear_cross_entropy as linear_cross_entropy
from ._vocab import linear_kl_divergence as linear_kl_divergence
from ._vocab import linear_log_probs as linear_log_probs
from ._vocab import sampled_softmax_cross_entropy as sampled_softmax_cross_entropy
from .sampling import sample as sample

try:
    __version__ = _metadata.version("softjax-nn")  # the distribution name
except _metadata.PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    # `softjax.flax` is loaded on first use, as `jax.nn`-style code expects the attribute.
    if name == "flax":
        import importlib

        return importlib.import_module(".flax", __name__)
    raise AttributeError(f"module 'softjax' has no attribute {name!r}")


__all__ = [
    "binary_cross_entropy",
    "calibration",
    "conformal",
    "cross_entropy",
    "dot_product_attention",
    "entmax15",
    "entmax15_loss",
    "gumbel_softmax",
    "kl_divergence",
    "linear_cross_entropy",
    "linear_kl_divergence",
    "linear_log_probs",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "metrics",
    "nll_loss",
    "poly_loss",
    "sample",
    "sampled_softmax_cross_entropy",
    "sigmoid_focal_loss",
    "softmax",
    "sparsemax",
    "sparsemax_loss",
]
