"""Start-up hook of hmoe_arch: ``torchvision.transforms.functional_tensor`` for basicsr 1.4.2 in any import order.

basicsr 1.4.2 imports ``rgb_to_grayscale`` from ``torchvision.transforms.functional_tensor``, which torchvision
removed in 0.17. Installing hmoe_arch puts ``hmoe_arch_import_hook.pth`` in site-packages; Python runs it at
start-up, and it appends :class:`FunctionalTensorFinder` to ``sys.meta_path``. Being last there, the finder is
asked only when no other finder has the module, that is when torchvision lacks it; it then serves a stand-in
that takes ``rgb_to_grayscale`` from ``torchvision.transforms.functional``. So ``import basicsr`` works before,
after or without ``import hmoe_arch``, and nothing changes where torchvision still has the module.

At start-up this module imports only ``sys`` and ``importlib.machinery`` (already loaded by the interpreter):
torch and torchvision are imported when, and only when, the stand-in is first needed.
"""
import sys
from importlib.machinery import ModuleSpec

FUNCTIONAL_TENSOR = 'torchvision.transforms.functional_tensor'


class FunctionalTensorLoader:
    """Fills the stand-in module."""

    @staticmethod
    def create_module(spec: ModuleSpec) -> None:
        return None  # the default module object

    @staticmethod
    def exec_module(module) -> None:
        from torchvision.transforms.functional import rgb_to_grayscale

        module.__doc__ = ('hmoe_arch stand-in for the module removed in torchvision 0.17; it exposes the functions '
                          'basicsr 1.4.2 imports from it.')
        module.rgb_to_grayscale = rgb_to_grayscale
        module.__hmoe_arch_stand_in__ = True


class FunctionalTensorFinder:
    """Finds the stand-in for ``torchvision.transforms.functional_tensor`` (and nothing else)."""

    @staticmethod
    def find_spec(fullname: str, path=None, target=None):
        if fullname != FUNCTIONAL_TENSOR:
            return None
        return ModuleSpec(fullname, FunctionalTensorLoader(), origin='hmoe_arch stand-in')


def install() -> bool:
    """Append the finder to ``sys.meta_path`` once; returns whether this call added it."""
    if any(isinstance(finder, FunctionalTensorFinder) for finder in sys.meta_path):
        return False
    sys.meta_path.append(FunctionalTensorFinder())
    return True
