"""The plugin's BasicSR types, registered when BasicSR first looks one of them up.

``import hmoe_arch`` must make ``type: MFGHMoEArch``, ``model_type: MFGHMoEModel`` and ``type: RSPairedDataset``
known to BasicSR (HAT's scripts and user code rely on it), but importing the networks costs torch, timm and
basicsr, seconds that ``basicsr --help`` and a refused option file should not pay. So the package import only
turns BasicSR's three registries into :class:`PluginTypes` maps (right after ``basicsr.utils.registry`` is
imported, or at once if it already is): looking up one of :data:`PLUGIN_TYPES`' names (``get``, ``in``) imports
the module that registers it. Everything else about the registries is BasicSR's.
"""
import importlib
import sys
from types import ModuleType
from typing import Dict

import hmoe_arch_import_hook

REGISTRY_MODULE = 'basicsr.utils.registry'
PLUGIN_TYPES: Dict[str, Dict[str, str]] = {
    'ARCH_REGISTRY': {'MFGHMoEArch': 'hmoe_arch.archs', 'MFGHMOE': 'hmoe_arch.archs'},
    'MODEL_REGISTRY': {'MFGHMoEModel': 'hmoe_arch.models', 'MFGHMOEModel': 'hmoe_arch.models'},
    'DATASET_REGISTRY': {'RSPairedDataset': 'hmoe_arch.data'},
}
"""registry name -> {type name: the module whose import registers it} (the authors' names included)."""


class PluginTypes(dict):
    """A registry's name -> object map whose lookups of this plugin's names import their module first."""

    def __init__(self, entries: Dict[str, object], modules: Dict[str, str]) -> None:
        super().__init__(entries)
        self.modules = modules

    def _register(self, name: object) -> None:
        module = self.modules.get(name) if isinstance(name, str) else None
        # a module already in sys.modules is registering (mid-import) or has registered: nothing to do
        if module is not None and not dict.__contains__(self, name) and module not in sys.modules:
            importlib.import_module(module)

    def get(self, name, default=None):
        self._register(name)
        return super().get(name, default)

    def __contains__(self, name) -> bool:
        self._register(name)
        return super().__contains__(name)

    def __getitem__(self, name):
        self._register(name)
        return super().__getitem__(name)


def make_registries_lazy(registry_module: ModuleType) -> None:
    """Give BasicSR's registries :class:`PluginTypes` maps (entries kept; idempotent)."""
    for registry_name, modules in PLUGIN_TYPES.items():
        registry = getattr(registry_module, registry_name)
        if not isinstance(registry._obj_map, PluginTypes):
            registry._obj_map = PluginTypes(registry._obj_map, modules)


def register_on_lookup() -> None:
    """Have BasicSR's registries import this plugin's types on lookup (see the module docstring)."""
    hmoe_arch_import_hook.after_import(REGISTRY_MODULE, make_registries_lazy)
