"""Optional bench metrics: NIQE (BasicSR's) and LPIPS from weights on disk only, with the messages when they are
missing."""
import builtins
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_niqe

from hmoe_arch.commands.bench.perceptual import ALEXNET_FILE, load_lpips, niqe
from hmoe_arch.errors import OptionError


def image(seed: int, size=(48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3)).astype(np.uint8)


def test_niqe_is_basicsrs_on_y_with_the_border() -> None:
    img = image(0, (200, 208))
    assert niqe(img, 4) == calculate_niqe(img, 4, input_order='HWC', convert_to='y')
    assert niqe(img, 4) != niqe(img, 0)
    assert math.isnan(niqe(np.full((200, 200, 3), 7, np.uint8), 0))
    with pytest.raises(OptionError, match=r'--niqe: set/a \(m\) is 92x180 after the border; NIQE needs at least two '
                                          r'96x96 blocks \(e.g. 96x192\)'):
        niqe(image(0, (100, 188)), 4, 'set/a (m)')
    assert niqe(image(0, (100, 200)), 0) > 0


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    return tmp_path / 'torch' / 'hub' / 'checkpoints'


def test_lpips_refuses_to_download(torch_home: Path) -> None:
    pytest.importorskip('lpips')
    with pytest.raises(OptionError, match=rf'--lpips needs the AlexNet weights LPIPS is built on at '
                                          rf'{torch_home / ALEXNET_FILE}, and bench never downloads during a run; '
                                          r'fetch them once with: python -c "import torchvision; '):
        load_lpips(torch.device('cpu'))
    assert not torch_home.exists()


def test_lpips_without_the_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_lpips(name, *args, **kwargs):
        if name == 'lpips':
            raise ImportError('No module named lpips')
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, 'lpips', raising=False)
    monkeypatch.setattr(builtins, '__import__', no_lpips)
    with pytest.raises(OptionError, match=r"--lpips needs the lpips package: pip install 'hmoe_arch\[lpips\]'"):
        load_lpips(torch.device('cpu'))


@pytest.mark.slow
def test_lpips_from_weights_on_disk(torch_home: Path) -> None:
    lpips = pytest.importorskip('lpips')
    import torchvision
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).state_dict()
    torch_home.mkdir(parents=True)
    torch.save(alexnet, torch_home / ALEXNET_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        distance = load_lpips(torch.device('cpu'))
    a, b = image(1), image(2)
    assert distance(a, a, 0) == 0
    # the same as the lpips package's own model given those AlexNet weights
    with pytest.warns(UserWarning, match='deprecated'):  # lpips's call into torchvision (load_lpips hides it)
        reference = lpips.LPIPS(net='alex', version='0.1', pnet_rand=True, verbose=False).eval()
    for name, value in reference.net.state_dict().items():
        value.copy_(alexnet[f'features.{name.split(".", 1)[1]}'])
    pair = [torch.from_numpy(np.ascontiguousarray(x[4:-4, 4:-4, ::-1])).permute(2, 0, 1)[None].float() / 127.5 - 1
            for x in (a, b)]
    with torch.no_grad():
        expected = float(reference(*pair))
    assert distance(a, b, 4) == pytest.approx(expected, rel=1e-6) and expected > 0
    torch.save({'features.0.weight': torch.zeros(1)}, torch_home / ALEXNET_FILE)
    with pytest.raises(OptionError, match=f"{ALEXNET_FILE}: not torchvision's AlexNet weights"):
        load_lpips(torch.device('cpu'))
