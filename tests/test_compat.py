"""The torchvision stand-in: installed only where torchvision lacks functional_tensor, and it works."""
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
from torchvision.transforms import functional

from hmoe_arch import _compat
from hmoe_arch._compat import FUNCTIONAL_TENSOR, install_functional_tensor_stand_in


@pytest.fixture
def no_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process where the module is neither imported nor importable (torchvision >= 0.17)."""
    monkeypatch.delitem(sys.modules, FUNCTIONAL_TENSOR, raising=False)
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, package=None: None)


def test_installed_when_missing(no_module: None) -> None:
    assert install_functional_tensor_stand_in() is True
    stand_in = sys.modules[FUNCTIONAL_TENSOR]
    assert stand_in.__hmoe_arch_stand_in__ is True
    img = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(stand_in.rgb_to_grayscale(img), functional.rgb_to_grayscale(img))
    assert stand_in.rgb_to_grayscale(img, num_output_channels=3).shape == (2, 3, 5, 7)


def test_second_call_is_a_no_op(no_module: None) -> None:
    assert install_functional_tensor_stand_in() is True
    first = sys.modules[FUNCTIONAL_TENSOR]
    assert install_functional_tensor_stand_in() is False
    assert sys.modules[FUNCTIONAL_TENSOR] is first


def test_not_installed_when_real_module_is_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, FUNCTIONAL_TENSOR, raising=False)
    spec = importlib.machinery.ModuleSpec(FUNCTIONAL_TENSOR, loader=None)
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, package=None: spec)
    assert install_functional_tensor_stand_in() is False
    assert FUNCTIONAL_TENSOR not in sys.modules


def test_not_installed_when_real_module_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    real = types.ModuleType(FUNCTIONAL_TENSOR)
    monkeypatch.setitem(sys.modules, FUNCTIONAL_TENSOR, real)
    assert install_functional_tensor_stand_in() is False
    assert sys.modules[FUNCTIONAL_TENSOR] is real


def test_this_torchvision_needs_it() -> None:
    import torchvision
    major, minor = (int(p) for p in torchvision.__version__.split('.')[:2])
    if (major, minor) < (0, 17):
        pytest.skip(f'torchvision {torchvision.__version__} still ships {FUNCTIONAL_TENSOR}')
    assert getattr(sys.modules[FUNCTIONAL_TENSOR], '__hmoe_arch_stand_in__', False), _compat.__doc__
