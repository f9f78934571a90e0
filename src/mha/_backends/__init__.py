"""Attention backends. Each exposes ``BACKEND``: a ``name``, a capability record ``caps``
(:class:`mha._types.Capabilities`) and ``forward(call)``; :mod:`mha._dispatch` registers them."""
