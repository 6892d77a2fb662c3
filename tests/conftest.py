"""Shared fixtures: tiny configurations and the reference vectors in ../shared (skipped when absent)."""
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

import hmoe_arch  # noqa: F401  (installs the torchvision stand-in and registers the plugin)

REFERENCE_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'reference'
HAT_RGB_MEAN = [0.4488, 0.4371, 0.4040]

TINY: Dict[str, Any] = dict(img_size=16, embed_dim=24, depths=[1, 1], num_heads=[2, 2], window_size=4,
                            compress_ratio=3, squeeze_factor=6, mlp_ratio=2.0)
"""A small configuration that exercises every code path (shifted windows, OCAB, two RHAGs) in milliseconds."""

SMALL_GROUPS = [{'kernel_size': 1, 'num_experts': 2}, {'kernel_size': 3, 'num_experts': 2}]


def tiny(**overrides: Any) -> Dict[str, Any]:
    """The tiny configuration with overrides."""
    return {**TINY, **overrides}


def tiny_hat(**overrides: Any) -> Dict[str, Any]:
    """The tiny configuration in HAT's exact mode."""
    return tiny(moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN, **overrides)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def reference_file(name: str) -> Path:
    """Path of a reference file; skips the test with the reason when ../shared/reference lacks it."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f'reference vectors not available: {path} is missing (they ship in ../shared/reference)')
    return path


def load_reference(name: str) -> Dict[str, Any]:
    return torch.load(reference_file(name), map_location='cpu', weights_only=True)
