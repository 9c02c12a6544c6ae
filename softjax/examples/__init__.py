"""Worked examples built on softjax, importable from an installed package.

``softjax.examples.tiny_lm``: a byte-level decoder-only transformer trained with
:func:`softjax.dot_product_attention`, :func:`softjax.linear_cross_entropy`,
:func:`softjax.sample` and :mod:`softjax.calibration` (``python -m softjax.examples.tiny_lm``;
needs Flax, ``pip install "softjax-nn[notebooks]"``). ``import softjax`` does not load it.
"""
