"""Scaled dot-product attention: ``"xla"`` (materialising) and ``"chunked"`` (online softmax)."""

from .api import dot_product_attention as dot_product_attention

__all__ = ["dot_product_attention"]
