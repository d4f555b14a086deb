"""Evaluation modules; the public API is re-exported by :mod:`wurst_core.evaluate`."""
