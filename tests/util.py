"""Helpers the tests share (configurations, reference vectors, synthetic datasets); fixtures are in conftest.py."""
import gzip
import json
import re
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

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


TEST_DATA = Path(__file__).resolve().parent / 'data' / 'reference'
"""Small reference vectors committed with the tests (how they were made: tests/data/README.md)."""
SHARED_REFERENCES = ['hat_x2', 'hat_x4', 'official_mfghmoe_x2', 'official_mfghmoe_x4']
"""In ../shared/reference (the paper's small config: 37 MB in all, so not in the repository)."""
HAT_REFERENCES = ['tiny_hat_x2', 'hat_x2', 'hat_x4']
AUTHORS_REFERENCES = ['tiny_authors_x2', 'official_mfghmoe_x2', 'official_mfghmoe_x4']
"""Reference names, committed ones first: a fresh clone runs those, CI runs all."""


def reference_file(name: str) -> Path:
    """Path of a reference file in ../shared/reference; skips the test with the reason when it is missing."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f'reference vectors not available: {path} is missing (they ship in ../shared/reference)')
    return path


def load_reference(name: str) -> Dict[str, Any]:
    """``config``, ``state_dict``, ``input`` and ``output`` of a reference vector (``name`` with or without
    ``.pt``): the committed ones in tests/data/reference, the others from ../shared/reference."""
    stem = name[:-3] if name.endswith('.pt') else name
    local = TEST_DATA / f'{stem}.pt'
    if not local.is_file():
        return torch.load(reference_file(f'{stem}.pt'), map_location='cpu', weights_only=True)
    stored = torch.load(local, map_location='cpu', weights_only=True)
    weights = {k: v.float() * 2.0 ** stored['state_dict_exponent'][k] for k, v in stored['state_dict_int8'].items()}
    return {'config': stored['config'], 'state_dict': {**weights, **stored['state_dict_other']},
            'input': stored['input_uint8'].float() / 255, 'output': stored['output']}


def full_size_spec(name: str) -> Dict[str, Any]:
    """Every state_dict key and shape of ``official_mfghmoe_x4`` or ``hat_x4`` at the paper's full size."""
    with gzip.open(TEST_DATA / 'state_dict_spec_full.json.gz', 'rt') as f:
        return json.load(f)[name]


SHARED_DATA = REFERENCE_DIR.parent / 'data'
UCMERCED_CLASSES = ('agricultural airplane baseballdiamond beach buildings chaparral denseresidential forest freeway '
                    'golfcourse harbor intersection mediumresidential mobilehomepark overpass parkinglot river runway '
                    'sparseresidential storagetanks tenniscourt').split()


def ucmerced_mini() -> Path:
    """The real 210-image UCMerced subset in ../shared/data; skips with the reason when absent."""
    path = SHARED_DATA / 'UCMerced_mini'
    if not (path / 'Images').is_dir():
        pytest.skip(f'real UCMerced subset not available: {path}/Images is missing (it ships in ../shared/data)')
    return path


def write_image(path: Path, height: int, width: int, seed: int, channels: int = 3, dtype=None) -> None:
    """A random image file (format from the suffix)."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    dtype = dtype or np.uint8
    high = 65535 if dtype == np.uint16 else 255
    shape = (height, width) if channels == 1 else (height, width, channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rng.integers(0, high, shape).astype(dtype))


def make_ucmerced_tree(root: Path, classes=('agricultural', 'beach', 'golfcourse'), per_class: int = 8,
                       size=(24, 24), odd=None) -> Path:
    """``root/UCMerced_LandUse/Images/<class>/<class>NN.tif``; ``odd`` maps names to (H, W)."""
    odd = odd or {}
    images = root / 'UCMerced_LandUse' / 'Images'
    for c, class_name in enumerate(classes):
        for i in range(per_class):
            name = f'{class_name}{i:02d}.tif'
            write_image(images / class_name / name, *odd.get(name, size), seed=c * 100 + i)
    return root / 'UCMerced_LandUse'


def make_aid_tree(root: Path, classes=('Airport', 'BareLand'), per_class: int = 5, size=(30, 30)) -> Path:
    """``root/AID/<Class>/<class>_N.jpg``."""
    for c, class_name in enumerate(classes):
        for i in range(1, per_class + 1):
            write_image(root / 'AID' / class_name / f'{class_name.lower()}_{i}.jpg', *size, seed=c * 100 + i)
    return root / 'AID'


TINY_TRAINING = ['network_g:embed_dim=12', 'network_g:depths=[1]', 'network_g:num_heads=[2]', 'network_g:window_size=4',
                 'network_g:squeeze_factor=4',
                 'network_g:expert_groups=[{kernel_size: 1, num_experts: 2}, {kernel_size: 3, num_experts: 2}]',
                 'datasets:train:gt_size=32', 'datasets:train:batch_size_per_gpu=2',
                 'datasets:train:num_worker_per_gpu=0', 'logger:print_freq=1']
"""``--force_yml`` entries that turn a paper option file into a seconds-long CPU run."""


DOCS = Path(__file__).resolve().parents[1] / 'docs'


def docs_block(page: str, language: str, containing: str) -> str:
    """The one fenced ``language`` block of ``docs/<page>`` (or ``README.md`` with ``page='../README.md'``) that
    contains ``containing``; fails naming the page when there is not exactly one."""
    path = DOCS / page
    blocks = [block for block in re.findall(rf'```{language}\n(.*?)```', path.read_text(), re.S) if containing in block]
    assert len(blocks) == 1, f'{path}: {len(blocks)} {language} blocks contain {containing!r}, expected 1'
    return blocks[0]
