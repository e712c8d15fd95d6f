"""Integrations with training frameworks, each imported only when used.

- :mod:`foresight_sparse.integrations.lightning`: :class:`EICallback
  <foresight_sparse.integrations.lightning.EICallback>` for PyTorch Lightning (the
  ``lightning`` extra: ``pip install 'foresight-sparse[lightning]'``).
"""

__all__: list[str] = []
