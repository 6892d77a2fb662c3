"""Datasets and data preparation; importing this package registers RSPairedDataset in BasicSR's
DATASET_REGISTRY."""
from .rs_paired_dataset import RSPairedDataset

__all__ = ['RSPairedDataset']
