"""Start-up hook of hmoe_arch: basicsr 1.4.2 (and HAT on it) importable in any order on current torchvision.

Installing hmoe_arch puts ``hmoe_arch_import_hook.pth`` in site-packages; Python runs it at start-up and it calls
:func:`install`, which adds two finders to ``sys.meta_path``:

- :class:`FunctionalTensorFinder`, last: basicsr 1.4.2 imports ``rgb_to_grayscale`` from
  ``torchvision.transforms.functional_tensor``, which torchvision removed in 0.17. Being last, the finder is asked
  only when no other finder has the module, that is when torchvision lacks it; it then serves a stand-in that
  takes ``rgb_to_grayscale`` from ``torchvision.transforms.functional``.
- :class:`AfterImportFinder`, first: runs callbacks right after a named module has executed. :func:`install`
  registers one, :func:`restore_basicsr_names`, for ``basicsr.utils.matlab_functions``: HAT's datasets import
  ``rgb2ycbcr`` from there, where basicsr 1.4.2 no longer has it. So ``import hat`` works before, after or without
  ``import hmoe_arch``.

Nothing changes where torchvision and basicsr still have those names. At start-up this module imports only ``sys``
and ``importlib.machinery`` (already loaded by the interpreter): torch, torchvision and basicsr are imported when,
and only when, the program itself imports them.
"""
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Callable, Dict, List

FUNCTIONAL_TENSOR = 'torchvision.transforms.functional_tensor'
MATLAB_FUNCTIONS = 'basicsr.utils.matlab_functions'
RESTORED_NAMES = ('rgb2ycbcr', 'bgr2ycbcr', 'ycbcr2rgb', 'ycbcr2bgr')
"""Names older basicsr releases had in :data:`MATLAB_FUNCTIONS` and HAT imports from there."""


class FunctionalTensorLoader:
    """Fills the stand-in module."""

    @staticmethod
    def create_module(spec: ModuleSpec) -> None:
        return None  # the default module object

    @staticmethod
    def exec_module(module: ModuleType) -> None:
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


class CallbackLoader:
    """Wraps a module's own loader: executes the module with it, then runs the callbacks on the module. Every
    other attribute (``get_source``, ``get_code``, ...) is the wrapped loader's."""

    def __init__(self, loader, callbacks: List[Callable[[ModuleType], None]]) -> None:
        self.loader = loader
        self.callbacks = callbacks

    def create_module(self, spec: ModuleSpec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        for callback in self.callbacks:
            callback(module)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


class AfterImportFinder:
    """Finds nothing itself: for a module with pending callbacks it asks the finders after it for the module's
    spec and wraps the spec's loader in a :class:`CallbackLoader`. Callbacks run once."""

    def __init__(self) -> None:
        self.pending: Dict[str, List[Callable[[ModuleType], None]]] = {}

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        spec.loader = CallbackLoader(spec.loader, self.pending.pop(fullname))
        return spec


def after_import_finder() -> AfterImportFinder:
    """The :class:`AfterImportFinder` at the front of ``sys.meta_path`` (put there on first use)."""
    for finder in sys.meta_path:
        if isinstance(finder, AfterImportFinder):
            return finder
    finder = AfterImportFinder()
    sys.meta_path.insert(0, finder)
    return finder


def after_import(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Run ``callback(module)`` right after module ``name`` has executed, or now if it already has."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    after_import_finder().pending.setdefault(name, []).append(callback)


def restore_basicsr_names(matlab_functions: ModuleType) -> List[str]:
    """Add :data:`RESTORED_NAMES` to basicsr's ``matlab_functions`` from ``color_util``, only where missing;
    returns what was added."""
    import importlib

    color_util = importlib.import_module('basicsr.utils.color_util')
    added = []
    for name in RESTORED_NAMES:
        if not hasattr(matlab_functions, name) and hasattr(color_util, name):
            setattr(matlab_functions, name, getattr(color_util, name))
            added.append(name)
    return added


def install() -> bool:
    """Append :class:`FunctionalTensorFinder` to ``sys.meta_path`` and have :func:`restore_basicsr_names` run when
    basicsr's ``matlab_functions`` is imported, once; returns whether this call did it."""
    if any(isinstance(finder, FunctionalTensorFinder) for finder in sys.meta_path):
        return False
    sys.meta_path.append(FunctionalTensorFinder())
    after_import(MATLAB_FUNCTIONS, restore_basicsr_names)
    return True
