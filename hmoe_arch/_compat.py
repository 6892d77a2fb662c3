"""Compatibility of basicsr 1.4.2 (and HAT) with current PyTorch, torchvision and OpenCV.

- ``torchvision.transforms.functional_tensor`` (removed in torchvision 0.17, imported by basicsr 1.4.2): served
  by :mod:`hmoe_arch_import_hook`, which the installed ``hmoe_arch_import_hook.pth`` registers at interpreter
  start-up, so ``import basicsr`` works whatever the import order. :func:`install_functional_tensor_stand_in`
  registers the same finder when that start-up file did not run (a source checkout on ``PYTHONPATH``).
- ``basicsr.utils.matlab_functions.rgb2ycbcr``: HAT's datasets import it from there; basicsr 1.4.2 moved it to
  ``basicsr.utils.color_util``. The start-up hook adds the name back when basicsr imports that module (so
  ``import hat`` may come first); :func:`restore_basicsr_names` does it now, only where it is missing.
"""
import sys

import hmoe_arch_import_hook

FUNCTIONAL_TENSOR = hmoe_arch_import_hook.FUNCTIONAL_TENSOR


def install_functional_tensor_stand_in() -> bool:
    """Make sure the stand-in finder is on ``sys.meta_path`` (it serves the module only where torchvision lacks
    it) and that basicsr's names are restored when it is imported; returns True when this call had to add them,
    False when the start-up hook (or an earlier call) had."""
    return hmoe_arch_import_hook.install()


def restore_basicsr_names() -> list:
    """Names that older basicsr releases had and HAT imports, added back now where basicsr 1.4.2 lacks them
    (imports basicsr); returns what was added."""
    from basicsr.utils import matlab_functions

    return hmoe_arch_import_hook.restore_basicsr_names(matlab_functions)


def is_stand_in() -> bool:
    """Whether the loaded ``torchvision.transforms.functional_tensor`` is this project's stand-in."""
    module = sys.modules.get(FUNCTIONAL_TENSOR)
    return bool(getattr(module, '__hmoe_arch_stand_in__', False))
