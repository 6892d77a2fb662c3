"""The package import: BasicSR importable on current torchvision, registration, names left free for HAT."""
import subprocess
import sys
from pathlib import Path

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


def test_basicsr_modules_that_need_the_removed_torchvision_module_import() -> None:
    result = subprocess.run([sys.executable, '-c', 'import hmoe_arch; import basicsr.data.degradations as d; '
                             'print(d.rgb_to_grayscale.__name__)'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'rgb_to_grayscale'


def _package_imports() -> dict:
    """module -> the hmoe_arch modules it imports at module level (relative and absolute), from the source."""
    import ast
    root = Path(hmoe_arch.__file__).parent
    graph = {}
    for path in root.rglob('*.py'):
        parts = list(path.relative_to(root.parent).with_suffix('').parts)
        package = parts if path.name == '__init__.py' else parts[:-1]
        name = '.'.join(parts[:-1] if path.name == '__init__.py' else parts)
        targets = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    module = '.'.join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ''
                if module.startswith('hmoe_arch'):
                    targets.add(module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith('hmoe_arch')}
        graph[name] = targets
    return graph


def test_the_library_never_imports_the_commands() -> None:
    graph = _package_imports()
    library = [m for m in graph if not m.startswith('hmoe_arch.commands') and m != 'hmoe_arch.__main__']
    assert {m: sorted(t for t in graph[m] if t.startswith('hmoe_arch.commands')) for m in library
            if any(t.startswith('hmoe_arch.commands') for t in graph[m])} == {}


def test_the_import_graph_has_no_cycles() -> None:
    graph = _package_imports()

    def resolve(target: str) -> str:  # `from .x import y` may name a module y inside package x
        return target if target in graph else target.rsplit('.', 1)[0]

    edges = {m: {resolve(t) for t in ts if resolve(t) in graph and resolve(t) != m} for m, ts in graph.items()}
    # a package's __init__ importing its own submodules is not a cycle through them
    state = {}

    def visit(module: str, path: list) -> None:
        state[module] = 'open'
        for target in edges[module]:
            if target.startswith(module + '.'):
                continue
            if state.get(target) == 'open':
                raise AssertionError(f'import cycle: {" -> ".join(path + [module, target])}')
            if target not in state:
                visit(target, path + [module])
        state[module] = 'done'

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
