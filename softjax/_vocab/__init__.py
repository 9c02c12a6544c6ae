"""Vocabulary-scale losses and scores: one entry point each, several backends (``api.py``)."""

from .api import linear_cross_entropy as linear_cross_entropy
from .distill import linear_kl_divergence as linear_kl_divergence
from .log_probs import linear_log_probs as linear_log_probs
from .sampled import sampled_softmax_cross_entropy as sampled_softmax_cross_entropy

__all__ = [
    "linear_cross_entropy",
    "linear_kl_divergence",
    "linear_log_probs",
    "sampled_softmax_cross_entropy",
]
