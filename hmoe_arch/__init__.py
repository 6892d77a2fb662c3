"""hmoe_arch: MFG-HMoE (heterogeneous mixture of experts for remote-sensing super-resolution) as a BasicSR
plugin.

Importing the package makes its types known to BasicSR's registries (``MFGHMoEArch``, ``MFGHMoEModel``,
``RSPairedDataset`` and the authors' names): they are imported, and so registered, when BasicSR first looks one
up (:mod:`hmoe_arch.registration`), so ``import hmoe_arch`` itself imports neither torch nor basicsr. The classes
are attributes of the package, imported on first access.
"""
from ._compat import install_functional_tensor_stand_in
from .registration import register_on_lookup

install_functional_tensor_stand_in()
register_on_lookup()

__version__ = '0.1.0'
__all__ = ['MFGHMoEArch', 'MFGHMoEModel', 'RSPairedDataset', '__version__']

_LAZY_ATTRIBUTES = {'MFGHMoEArch': 'archs', 'MFGHMoEModel': 'models', 'RSPairedDataset': 'data'}


def __getattr__(name: str):
    if name in _LAZY_ATTRIBUTES:
        import importlib

        return getattr(importlib.import_module(f'{__name__}.{_LAZY_ATTRIBUTES[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted([*globals(), *_LAZY_ATTRIBUTES])
