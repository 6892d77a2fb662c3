"""Compatibility layer: the torchvision stand-in (whatever the import order, only where needed, cheap at start-up)
and the basicsr names HAT imports."""
import os
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch
from torchvision.transforms import functional

import hmoe_arch_import_hook
from hmoe_arch._compat import FUNCTIONAL_TENSOR, install_functional_tensor_stand_in, is_stand_in, restore_basicsr_names


def python(code: str) -> str:
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd='/')
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


@pytest.mark.slow
def test_basicsr_imports_first_in_a_fresh_interpreter() -> None:
    out = python('import basicsr, sys; from basicsr.archs.arch_util import Upsample; '
                 f'print(getattr(sys.modules[{FUNCTIONAL_TENSOR!r}], "__hmoe_arch_stand_in__", False), '
                 '"hmoe_arch" in sys.modules)')
    assert out == 'True False'


@pytest.mark.slow
def test_start_up_hook_is_cheap() -> None:
    out = python('import sys; print("torch" in sys.modules, "torchvision" in sys.modules, '
                 '[type(f).__name__ for f in sys.meta_path][-1])')
    assert out == 'False False FunctionalTensorFinder'


def start_up_line() -> str:
    """The line the installed ``hmoe_arch_import_hook.pth`` holds (skips when the package is not installed)."""
    import sysconfig
    from pathlib import Path
    path = Path(sysconfig.get_paths()['purelib']) / 'hmoe_arch_import_hook.pth'
    if not path.is_file():
        pytest.skip(f'hmoe_arch is not pip-installed here: {path} is missing')
    return path.read_text()


@pytest.mark.slow
def test_start_up_line_is_silent_when_its_checkout_is_gone(tmp_path) -> None:
    # -S: no site-packages, so the module cannot be found, as after deleting an editable install's checkout
    line = start_up_line()
    result = subprocess.run([sys.executable, '-S', '-c', f'exec({line!r}); print("started")'], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, 'started', '')


def test_stand_in_matches_torchvision() -> None:
    import importlib
    module = importlib.import_module(FUNCTIONAL_TENSOR)
    img = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(module.rgb_to_grayscale(img), functional.rgb_to_grayscale(img))
    assert module.rgb_to_grayscale(img, num_output_channels=3).shape == (2, 3, 5, 7)
    assert is_stand_in()


def test_a_real_module_wins_over_the_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    real = types.ModuleType(FUNCTIONAL_TENSOR)

    class RealFinder:  # stands for torchvision < 0.17, whose files the path finder would find
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname != FUNCTIONAL_TENSOR:
                return None

            class Loader:
                create_module = staticmethod(lambda spec: real)
                exec_module = staticmethod(lambda module: None)
            return ModuleSpec(fullname, Loader())

    monkeypatch.delitem(sys.modules, FUNCTIONAL_TENSOR, raising=False)
    monkeypatch.setattr(sys, 'meta_path', [RealFinder()] + [f for f in sys.meta_path if not isinstance(
        f, hmoe_arch_import_hook.FunctionalTensorFinder)] + [hmoe_arch_import_hook.FunctionalTensorFinder()])
    import importlib
    assert importlib.import_module(FUNCTIONAL_TENSOR) is real
    assert not is_stand_in()


def test_install_adds_the_finder_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, 'meta_path', [f for f in sys.meta_path
                                           if not isinstance(f, hmoe_arch_import_hook.FunctionalTensorFinder)])
    assert install_functional_tensor_stand_in() is True
    assert install_functional_tensor_stand_in() is False
    assert sum(isinstance(f, hmoe_arch_import_hook.FunctionalTensorFinder) for f in sys.meta_path) == 1
    assert hmoe_arch_import_hook.FunctionalTensorFinder.find_spec('torchvision.transforms.functional') is None


def test_rgb2ycbcr_is_restored_only_where_basicsr_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from basicsr.utils import color_util, matlab_functions
    assert matlab_functions.rgb2ycbcr is color_util.rgb2ycbcr  # done when basicsr imported matlab_functions
    own = object()
    monkeypatch.setattr(matlab_functions, 'rgb2ycbcr', own)
    assert 'rgb2ycbcr' not in restore_basicsr_names()
    assert matlab_functions.rgb2ycbcr is own


HAT_CHECKOUT = Path(__file__).resolve().parents[2] / 'shared' / 'peers' / 'HAT'


@pytest.mark.slow
@pytest.mark.parametrize('order', ['import hat; import hmoe_arch', 'import hmoe_arch; import hat', 'import hat'])
def test_hat_imports_in_any_order(order: str) -> None:
    if not (HAT_CHECKOUT / 'hat' / '__init__.py').is_file():
        pytest.skip(f'HAT\'s code is not at {HAT_CHECKOUT}')
    code = (f'{order}; from basicsr.utils.registry import ARCH_REGISTRY; '
            'print(ARCH_REGISTRY.get("HAT").__module__, "MFGHMoEArch" in ARCH_REGISTRY)')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd='/',
                            env={**os.environ, 'PYTHONPATH': str(HAT_CHECKOUT)})
    assert result.returncode == 0, result.stderr[-3000:]
    # without `import hmoe_arch` nothing registers the plugin's types: the start-up hook only restores names
    assert result.stdout.split() == ['hat.archs.hat_arch', str('hmoe_arch' in order)]


def test_after_import_runs_once_when_the_module_has_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import inspect

    (tmp_path / 'probe_after_import.py').write_text('VALUE = 1\n\n\ndef answer():\n    return 42\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'probe_after_import', raising=False)
    seen = []
    hmoe_arch_import_hook.after_import('probe_after_import', lambda module: seen.append(module.VALUE))
    assert seen == []
    module = importlib.import_module('probe_after_import')
    assert seen == [1]
    assert 'return 42' in inspect.getsource(module.answer)  # the wrapped loader still serves the source
    importlib.reload(module)
    hmoe_arch_import_hook.after_import('probe_after_import', lambda module: seen.append('now'))
    assert seen == [1, 'now']  # once per registration; an imported module gets the callback at once
