"""The package import: BasicSR importable on current torchvision, registration, names left free for HAT."""
import subprocess
import sys

from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

from hmoe_arch import MFGHMoEArch, RSPairedDataset


def test_arch_alias_and_dataset_registered() -> None:
    assert ARCH_REGISTRY.get('MFGHMoEArch') is MFGHMoEArch
    assert ARCH_REGISTRY.get('MFGHMOE') is MFGHMoEArch
    assert DATASET_REGISTRY.get('RSPairedDataset') is RSPairedDataset


def test_hat_names_left_free() -> None:
    assert 'HAT' not in ARCH_REGISTRY
    assert 'HATModel' not in MODEL_REGISTRY
    assert 'ImageNetPairedDataset' not in DATASET_REGISTRY


def test_hat_package_can_register_its_names_in_the_same_process() -> None:
    code = '\n'.join([
        'import hmoe_arch',
        'import torch.nn as nn',
        'from basicsr.models.sr_model import SRModel',
        'from basicsr.data.paired_image_dataset import PairedImageDataset',
        'from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY',
        '@ARCH_REGISTRY.register()',
        'class HAT(nn.Module): pass',
        '@MODEL_REGISTRY.register()',
        'class HATModel(SRModel): pass',
        '@DATASET_REGISTRY.register()',
        'class ImageNetPairedDataset(PairedImageDataset): pass',
        'print(ARCH_REGISTRY.get("HAT").__name__, ARCH_REGISTRY.get("MFGHMoEArch").__name__)',
    ])
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['HAT', 'MFGHMoEArch']


def test_basicsr_modules_that_need_the_removed_torchvision_module_import() -> None:
    result = subprocess.run([sys.executable, '-c', 'import hmoe_arch; import basicsr.data.degradations as d; '
                             'print(d.rgb_to_grayscale.__name__)'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'rgb_to_grayscale'
