"""Vocabulary-scale cross-entropy: one entry point, several backends (see ``api.py``)."""

from .api import linear_cross_entropy as linear_cross_entropy

__all__ = ["linear_cross_entropy"]
