"""The package import: BasicSR importable on current torchvision, registration, names left free for HAT; the
import graph (no circle, the library below the commands)."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

import hmoe_arch
from hmoe_arch import MFGHMoEArch, RSPairedDataset


def test_arch_alias_and_dataset_registered() -> None:
    assert ARCH_REGISTRY.get('MFGHMoEArch') is MFGHMoEArch
    assert ARCH_REGISTRY.get('MFGHMOE') is MFGHMoEArch
    assert DATASET_REGISTRY.get('RSPairedDataset') is RSPairedDataset


def test_hat_names_left_free() -> None:
    assert 'HAT' not in ARCH_REGISTRY
    assert 'HATModel' not in MODEL_REGISTRY
    assert 'ImageNetPairedDataset' not in DATASET_REGISTRY


@pytest.mark.slow
def test_hat_package_can_register_its_names_in_the_same_process() -> None:
    code = '\n'.join([
        'import hmoe_arch',
        'import torch.nn as nn',
        'from basicsr.models.sr_model import SRModel',
        'from basicsr.data.paired_image_dataset import PairedImageDataset',
        'from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY',
        '@ARCH_REGISTRY.register()',
        'class HAT(nn.Module): pass',
        '@MODEL_REGISTRY.register()',
        'class HATModel(SRModel): pass',
        '@DATASET_REGISTRY.register()',
        'class ImageNetPairedDataset(PairedImageDataset): pass',
        'print(ARCH_REGISTRY.get("HAT").__name__, ARCH_REGISTRY.get("MFGHMoEArch").__name__)',
    ])
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['HAT', 'MFGHMoEArch']


@pytest.mark.slow
def test_basicsr_modules_that_need_the_removed_torchvision_module_import() -> None:
    result = subprocess.run([sys.executable, '-c', 'import hmoe_arch; import basicsr.data.degradations as d; '
                             'print(d.rgb_to_grayscale.__name__)'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'rgb_to_grayscale'


def import_graph(root: Path) -> Dict[str, Set[str]]:
    """module -> the modules of the package at ``root`` it imports, read from the source: relative and absolute
    imports, at module level and inside functions (a function-level import closes a circle as surely as one at
    the top, only later). ``from .x import y`` counts as importing ``x.y`` when that is a module, else ``x``."""
    top = root.name
    sources = {}
    for path in root.rglob('*.py'):
        parts = list(path.relative_to(root.parent).with_suffix('').parts)
        sources['.'.join(parts[:-1] if path.name == '__init__.py' else parts)] = (path, parts)
    graph = {}
    for name, (path, parts) in sources.items():
        package = parts[:-1]  # the folder that holds the file, which relative imports start from
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = '.'.join(package[:len(package) - node.level + 1]) if node.level else ''
                module = '.'.join(p for p in (base, node.module or '') if p)
                targets |= {f'{module}.{a.name}' if f'{module}.{a.name}' in sources else module for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        resolved = {t if t in sources else t.rsplit('.', 1)[0] for t in targets if t.split('.')[0] == top}
        graph[name] = {t for t in resolved if t in sources and t != name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """An import circle of ``graph`` as the list of modules along it, or None. Package ``__init__`` files are
    modules like any other: ``options -> models (package) -> models.mfghmoe_model -> options`` is a circle."""
    state: Dict[str, str] = {}

    def visit(module: str, path: List[str]) -> Optional[List[str]]:
        state[module] = 'open'
        for target in sorted(graph[module]):
            if state.get(target) == 'open':
                chain = path + [module]
                return chain[chain.index(target):] + [target]
            if target not in state:
                found = visit(target, path + [module])
                if found:
                    return found
        state[module] = 'done'
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [])
            if found:
                return found
    return None


PACKAGE_GRAPH = import_graph(Path(hmoe_arch.__file__).parent)
COMMAND_MODULES = {m for m in PACKAGE_GRAPH if m.startswith('hmoe_arch.commands')}


def test_the_cycle_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    package = tmp_path / 'pkg'
    (package / 'sub').mkdir(parents=True)
    for name, text in {'__init__.py': 'from .a import f\n', 'a.py': 'def f():\n    from .sub import b\n',
                       'sub/__init__.py': '', 'sub/b.py': 'from ..a import f\n'}.items():
        (package / name).write_text(text)
    graph = import_graph(package)
    assert graph['pkg.a'] == {'pkg.sub.b'} and graph['pkg.sub.b'] == {'pkg.a'}
    assert find_cycle(graph) == ['pkg.a', 'pkg.sub.b', 'pkg.a']
    (package / 'a.py').write_text('def f():\n    return 1\n')
    assert find_cycle(import_graph(package)) is None


def test_the_import_graph_has_no_cycles() -> None:
    assert find_cycle(PACKAGE_GRAPH) is None


def test_the_cycle_check_finds_the_circle_an_earlier_release_had(tmp_path: Path) -> None:
    """Release a8ebbfd: ``options.moe_model_warning`` imported the models inside the function while the model
    imported ``options`` at the top."""
    package = tmp_path / 'hmoe_arch'
    (package / 'models').mkdir(parents=True)
    for name, text in {'__init__.py': '', 'options.py': 'def moe_model_warning():\n    from .models import M\n',
                       'models/__init__.py': 'from .mfghmoe_model import M\n',
                       'models/mfghmoe_model.py': 'from ..options import plain_options\nM = 1\n'}.items():
        (package / name).write_text(text)
    assert find_cycle(import_graph(package)) == ['hmoe_arch.models', 'hmoe_arch.models.mfghmoe_model',
                                                 'hmoe_arch.options', 'hmoe_arch.models']


def test_the_library_never_imports_the_commands() -> None:
    library = [m for m in PACKAGE_GRAPH if m not in COMMAND_MODULES and m != 'hmoe_arch.__main__']
    assert {m: sorted(PACKAGE_GRAPH[m] & COMMAND_MODULES) for m in library if PACKAGE_GRAPH[m] & COMMAND_MODULES} == {}


def test_commands_stand_on_the_library_not_on_each_other() -> None:
    """Only the dispatcher (``cli``) reaches into the commands; a command's own parts (``bench/``, infer's GeoTIFF
    path) are the only other links between command modules."""
    links = {(m, t) for m in COMMAND_MODULES for t in PACKAGE_GRAPH[m] & COMMAND_MODULES
             if m != 'hmoe_arch.commands.cli' and not t.startswith(m + '.')
             and not (m.startswith('hmoe_arch.commands.bench') and t.startswith('hmoe_arch.commands.bench'))}
    assert links == {('hmoe_arch.commands.infer', 'hmoe_arch.commands.geotiff')}


def reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_configuration_and_file_reading_sit_below_the_network_and_loading_above_it() -> None:
    network = 'hmoe_arch.archs.mfghmoe_arch'
    assert network not in reachable(PACKAGE_GRAPH, 'hmoe_arch.archs.config')
    assert network not in reachable(PACKAGE_GRAPH, 'hmoe_arch.checkpoints')
    assert 'hmoe_arch.loading' not in reachable(PACKAGE_GRAPH, network)
    assert {'hmoe_arch.archs', 'hmoe_arch.checkpoints'} <= reachable(PACKAGE_GRAPH, 'hmoe_arch.loading')
    assert not reachable(PACKAGE_GRAPH, 'hmoe_arch.options') - {'hmoe_arch.errors'}  # plain data, no torch
