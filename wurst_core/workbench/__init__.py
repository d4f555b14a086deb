"""The workbench on top: the notebooks' parameter contract (``notebook``), their registry, ``reproduce`` (papermill
runs, resume), ``report`` (reports/index.md) and the ``wurst`` command (``cli``)."""
