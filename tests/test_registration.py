"""The plugin's types reach BasicSR's registries on lookup (hmoe_arch.registration), so ``import hmoe_arch`` is
cheap and still enough for ``type: MFGHMoEArch`` / ``model_type: MFGHMoEModel`` / ``type: RSPairedDataset``."""
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hmoe_arch.registration import PLUGIN_TYPES, PluginTypes


def test_the_table_names_exactly_what_the_modules_register() -> None:
    import basicsr.utils.registry as registries

    import hmoe_arch.archs  # noqa: F401
    import hmoe_arch.data  # noqa: F401
    import hmoe_arch.models  # noqa: F401
    for registry_name, modules in PLUGIN_TYPES.items():
        registry = getattr(registries, registry_name)
        assert isinstance(registry._obj_map, PluginTypes)
        ours = {name: obj.__module__ for name, obj in registry if obj.__module__.startswith('hmoe_arch.')}
        assert set(ours) == set(modules)
        assert all(ours[name].startswith(module + '.') for name, module in modules.items())


def test_a_lookup_imports_the_registering_module_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = types.ModuleType('probe_registry_holder')
    holder.MAP = PluginTypes({'Other': 1}, {'Thing': 'probe_registering_module'})
    monkeypatch.setitem(sys.modules, 'probe_registry_holder', holder)
    (tmp_path / 'probe_registering_module.py').write_text(
        'import probe_registry_holder\nprobe_registry_holder.MAP["Thing"] = "registered"\n'
        'probe_registry_holder.IMPORTS = getattr(probe_registry_holder, "IMPORTS", 0) + 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, 'probe_registering_module', raising=False)
    assert 'Missing' not in holder.MAP and holder.MAP.get('Other') == 1
    assert not hasattr(holder, 'IMPORTS')  # other names import nothing
    assert 'Thing' in holder.MAP
    assert (holder.MAP.get('Thing'), holder.MAP['Thing'], holder.IMPORTS) == ('registered', 'registered', 1)


def test_a_module_being_imported_is_not_imported_again() -> None:
    registry = PluginTypes({}, {'Busy': 'probe_busy_module'})
    sys.modules['probe_busy_module'] = types.ModuleType('probe_busy_module')  # as during its own registration
    try:
        assert 'Busy' not in registry
    finally:
        del sys.modules['probe_busy_module']


@pytest.mark.slow
def test_import_hmoe_arch_is_cheap_and_enough_for_basicsr() -> None:
    code = '\n'.join([
        'import sys, hmoe_arch',
        'print(sorted(m for m in ("torch", "basicsr", "timm", "cv2") if m in sys.modules))',
        'from basicsr.archs import build_network',
        'from basicsr.utils.registry import DATASET_REGISTRY, MODEL_REGISTRY',
        'net = build_network({"type": "MFGHMoEArch", "embed_dim": 24, "depths": [1], "num_heads": [2], '
        '"window_size": 4, "upscale": 2, "squeeze_factor": 6})',
        'print(type(net).__name__, MODEL_REGISTRY.get("MFGHMOEModel").__name__, "RSPairedDataset" in DATASET_REGISTRY)',
        'print(hmoe_arch.MFGHMoEArch is type(net), "MFGHMoEModel" in dir(hmoe_arch))',
    ])
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd='/')
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split('\n')[:3] == ['[]', 'MFGHMoEArch MFGHMoEModel True', 'True True']


def test_unknown_attributes_are_attribute_errors() -> None:
    import hmoe_arch
    with pytest.raises(AttributeError, match="module 'hmoe_arch' has no attribute 'Nothing'"):
        hmoe_arch.Nothing  # noqa: B018
