"""Datasets that ship with the package (no download needed)."""
