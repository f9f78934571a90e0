"""Attention backends. Each exposes ``BACKEND`` with ``not_supported_reasons`` and ``forward``."""
