"""Compatibility of basicsr 1.4.2 (and HAT) with current PyTorch, torchvision and OpenCV.

- ``torchvision.transforms.functional_tensor`` (removed in torchvision 0.17, imported by basicsr 1.4.2): served
  by :mod:`hmoe_arch_import_hook`, which the installed ``hmoe_arch_import_hook.pth`` registers at interpreter
  start-up, so ``import basicsr`` works whatever the import order. :func:`install_functional_tensor_stand_in`
  registers the same finder when that start-up file did not run (a source checkout on ``PYTHONPATH``).
- ``basicsr.utils.matlab_functions.rgb2ycbcr``: HAT's datasets import it from there; basicsr 1.4.2 moved it to
  ``basicsr.utils.color_util``. :func:`restore_basicsr_names` adds the name back, only where it is missing.
"""
import sys

import hmoe_arch_import_hook

FUNCTIONAL_TENSOR = hmoe_arch_import_hook.FUNCTIONAL_TENSOR


def install_functional_tensor_stand_in() -> bool:
    """Make sure the stand-in finder is on ``sys.meta_path`` (it serves the module only where torchvision lacks
    it); returns True when this call had to add it, False when the start-up hook (or an earlier call) had."""
    return hmoe_arch_import_hook.install()


def restore_basicsr_names() -> list:
    """Names that older basicsr releases had and HAT imports, added back where basicsr 1.4.2 lacks them;
    returns what was added."""
    from basicsr.utils import color_util, matlab_functions

    added = []
    for name in ('rgb2ycbcr', 'bgr2ycbcr', 'ycbcr2rgb', 'ycbcr2bgr'):
        if not hasattr(matlab_functions, name) and hasattr(color_util, name):
            setattr(matlab_functions, name, getattr(color_util, name))
            added.append(name)
    return added


def is_stand_in() -> bool:
    """Whether the loaded ``torchvision.transforms.functional_tensor`` is this project's stand-in."""
    module = sys.modules.get(FUNCTIONAL_TENSOR)
    return bool(getattr(module, '__hmoe_arch_stand_in__', False))
