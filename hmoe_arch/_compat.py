"""Compatibility shims that must run before ``basicsr`` is imported.

basicsr 1.4.2 imports ``rgb_to_grayscale`` from ``torchvision.transforms.functional_tensor``, a module that
torchvision removed in 0.17. :func:`install_functional_tensor_stand_in` registers a small stand-in module
under that name, and only when the real module cannot be found, so older torchvision releases keep theirs.
"""
import importlib.util
import sys
import types

FUNCTIONAL_TENSOR = 'torchvision.transforms.functional_tensor'


def _real_module_exists(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def install_functional_tensor_stand_in() -> bool:
    """Register a stand-in for ``torchvision.transforms.functional_tensor`` where torchvision lacks it.

    Returns:
        True when the stand-in was installed by this call, False when the real module (or an earlier
        stand-in) is already importable and nothing was changed.
    """
    if _real_module_exists(FUNCTIONAL_TENSOR):
        return False
    from torchvision.transforms import functional

    stand_in = types.ModuleType(FUNCTIONAL_TENSOR)
    stand_in.__doc__ = ('hmoe_arch stand-in for the module removed in torchvision 0.17; it exposes the '
                        'functions basicsr 1.4.2 imports from it.')
    stand_in.rgb_to_grayscale = functional.rgb_to_grayscale
    stand_in.__hmoe_arch_stand_in__ = True
    sys.modules[FUNCTIONAL_TENSOR] = stand_in
    return True
