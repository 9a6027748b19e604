"""Datasets (ImageFolder, .tar.gz, .npz, the built-in example), splits, batches and transforms."""

from kdtoolkit.data.datasets import ArrayData, DataSpec, Splits, batches, load_data

__all__ = ["ArrayData", "DataSpec", "Splits", "batches", "load_data"]
