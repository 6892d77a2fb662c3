"""Writes the small reference vectors in ``tests/data/reference/`` (how and why: README.md beside this script).

    python tests/data/make_reference.py [--shared ../shared] [--out tests/data/reference] [--check]

Needs ``../shared`` (HAT's code in ``peers/HAT`` and the authors' vectors in ``reference/``). Every file is written
only after the checks it depends on have passed; a failing check stops the script with its reason. ``--check``
writes the files into a temporary folder instead and compares them with those in ``--out`` (:func:`differences`:
weights, inputs, configurations and the layout file byte for byte, outputs within :data:`OUTPUT_TOLERANCE`); it
prints every difference and exits with 1 if there is one.
"""
import argparse
import gzip
import importlib.util
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch

from hmoe_arch import MFGHMoEArch

HERE = Path(__file__).resolve().parent
HAT_RGB_MEAN = [0.4488, 0.4371, 0.4040]
TINY_HAT_CONFIG: Dict[str, Any] = dict(img_size=16, in_chans=3, window_size=4, compress_ratio=3, squeeze_factor=4,
                                       conv_scale=0.01, overlap_ratio=0.5, img_range=1.0, depths=[1, 1],
                                       embed_dim=12, num_heads=[2, 2], mlp_ratio=2, upsampler='pixelshuffle',
                                       resi_connection='1conv', upscale=2)
"""HAT's constructor arguments (its names) for the HAT vector: two RHAGs, shifted windows, OCAB, x2."""
TINY_AUTHORS_CONFIG: Dict[str, Any] = dict(TINY_HAT_CONFIG, expert_groups=[{'kernel_size': 1, 'num_experts': 2},
                                                                           {'kernel_size': 3, 'num_experts': 2}])
"""The authors' layout (MFA, dual routing, heterogeneous groups) with two experts per group instead of eight."""
NOISE_STD = 0.05
INPUT_SHAPE = (2, 3, 12, 16)
TOLERANCE = 1e-4
OUTPUT_TOLERANCE = 1e-5
"""How far a rerun's outputs may be from the committed ones (largest absolute difference; the outputs reach
about 3). Float32 results depend in their last bits on the torch build and the CPU's instructions (a new pip
install of torch 2.14.1 gave 9.5e-7 and 2.0e-6); the float64 check in :func:`check_stable` keeps every output
this close to its exact value, so that no routing decision hangs on such bits."""


def quantised(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Each float tensor as int8 codes times a power of two (exact in float32), the rest as they are."""
    codes, exponents, other = {}, {}, {}
    for key, value in state_dict.items():
        if not value.is_floating_point():
            other[key] = value.clone()
            continue
        peak = float(value.abs().max())
        exponent = math.ceil(math.log2(peak / 127)) if peak > 0 else 0
        codes[key] = torch.round(value / 2.0 ** exponent).clamp(-127, 127).to(torch.int8)
        exponents[key] = exponent
    return {'state_dict_int8': codes, 'state_dict_exponent': exponents, 'state_dict_other': other}


def dequantised(stored: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The float32 state_dict that :func:`quantised` encodes (the same rule as tests/util.py)."""
    weights = {k: v.float() * 2.0 ** stored['state_dict_exponent'][k] for k, v in stored['state_dict_int8'].items()}
    return {**weights, **stored['state_dict_other']}


def perturbed(net: torch.nn.Module, seed: int) -> None:
    """Noise on every float parameter and buffer, so that every bias and norm weight changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in net.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=generator) * NOISE_STD)


def reference_input(seed: int) -> torch.Tensor:
    """8-bit levels, stored as uint8: ``codes / 255`` is the network input."""
    return torch.randint(0, 256, INPUT_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def load_hat_class(shared: Path):
    """HAT's ``HAT`` class from ``peers/HAT/hat/archs/hat_arch.py`` (the file alone: it needs basicsr and einops)."""
    path = shared / 'peers' / 'HAT' / 'hat' / 'archs' / 'hat_arch.py'
    if not path.is_file():
        sys.exit(f'make_reference: {path} is missing (HAT peer code ships in ../shared/peers/HAT)')
    spec = importlib.util.spec_from_file_location('hat_peer_hat_arch', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HAT


def ours_in_hat_mode(config: Dict[str, Any], **overrides: Any) -> MFGHMoEArch:
    return MFGHMoEArch(**config, moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN, **overrides)


def max_difference(net: torch.nn.Module, state_dict, x: torch.Tensor, expected: torch.Tensor) -> float:
    net.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        return float((net.eval()(x) - expected).abs().max())


def check_authors_equivalence(shared: Path) -> None:
    """This implementation reproduces the authors' released code (../shared/reference) before it may stand in."""
    for name in ('official_mfghmoe_x2', 'official_mfghmoe_x4'):
        path = shared / 'reference' / f'{name}.pt'
        if not path.is_file():
            sys.exit(f'make_reference: {path} is missing (the authors\' vectors ship in ../shared/reference)')
        ref = torch.load(path, map_location='cpu', weights_only=True)
        for attention in ('sdpa', 'plain'):
            gap = max_difference(MFGHMoEArch(**ref['config'], attention=attention), ref['state_dict'], ref['input'],
                                 ref['output'])
            if gap > TOLERANCE:
                sys.exit(f'make_reference: {name} differs from the authors\' output by {gap:.2e} ({attention})')


def check_stable(net: torch.nn.Module, state_dict, x: torch.Tensor, output: torch.Tensor, label: str) -> None:
    """The same output in float64: no routing decision or rounding of the vector sits on a knife edge."""
    gap = max_difference(net.double(), {k: v.double() if v.is_floating_point() else v for k, v in state_dict.items()},
                         x.double(), output.double())
    if gap > 1e-5:
        sys.exit(f'make_reference: {label} changes by {gap:.2e} in float64; choose another seed')


def write(path: Path, stored: Dict[str, Any]) -> None:
    partial = path.with_suffix('.partial')
    torch.save(stored, partial)
    partial.replace(path)
    print(f'wrote {path} ({path.stat().st_size / 1024:.0f} KiB)')


def coded_run(net: torch.nn.Module, seed: int):
    """Perturb ``net``, code its weights and run the decoded weights on the seeded input:
    ``(stored, state_dict, codes, x, output)``."""
    perturbed(net, seed + 1)
    stored = quantised(net.state_dict())
    state_dict = dequantised(stored)
    codes = reference_input(seed + 2)
    x = codes.float() / 255
    with torch.no_grad():
        net.load_state_dict(state_dict, strict=True)
        output = net(x)
    return stored, state_dict, codes, x, output


def make_hat(shared: Path, out: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    net = load_hat_class(shared)(**TINY_HAT_CONFIG).eval()
    stored, state_dict, codes, x, output = coded_run(net, seed)
    for attention in ('sdpa', 'plain'):
        gap = max_difference(ours_in_hat_mode(TINY_HAT_CONFIG, attention=attention), state_dict, x, output)
        if gap > TOLERANCE:
            sys.exit(f'make_reference: MFGHMoEArch in HAT mode differs from HAT by {gap:.2e} ({attention})')
    check_stable(ours_in_hat_mode(TINY_HAT_CONFIG), state_dict, x, output, 'the HAT vector')
    write(out / 'tiny_hat_x2.pt', {'config': TINY_HAT_CONFIG, **stored, 'input_uint8': codes, 'output': output,
                                   'produced_by': 'HAT (XPixelGroup/HAT 1638a9a, hat/archs/hat_arch.py)'})


def make_authors(shared: Path, out: Path, seeds=range(10, 60)) -> None:
    """The first seed whose vector routes pixels to at least three of the four experts (at initialisation most
    networks send everything to one expert per group, which would leave the expert choice untested)."""
    check_authors_equivalence(shared)
    for seed in seeds:
        torch.manual_seed(seed)
        net = MFGHMoEArch(**TINY_AUTHORS_CONFIG).eval()
        stored, state_dict, codes, x, output = coded_run(net, seed)
        if int(net.routing_maps()['expert'].unique().numel()) >= 3:
            break
    else:
        sys.exit(f'make_reference: no seed in {seeds} routes to three of the four experts')
    check_stable(MFGHMoEArch(**TINY_AUTHORS_CONFIG), state_dict, x, output, 'the authors\' vector')
    origin = (f'hmoe_arch in the authors\' mode (seed {seed}), checked against '
              '../shared/reference/official_mfghmoe_x{2,4}.pt first')
    write(out / 'tiny_authors_x2.pt', {'config': TINY_AUTHORS_CONFIG, **stored, 'input_uint8': codes,
                                       'output': output, 'produced_by': origin})


def copy_spec(shared: Path, out: Path) -> None:
    source = shared / 'reference' / 'state_dict_spec_full.json'
    target = out / 'state_dict_spec_full.json.gz'
    with open(source, 'rb') as f_in, gzip.GzipFile(target, 'wb', mtime=0) as f_out:
        shutil.copyfileobj(f_in, f_out)
    print(f'wrote {target} ({target.stat().st_size / 1024:.0f} KiB)')


def exact_form(value: Any) -> Any:
    """``value`` with every tensor replaced by its dtype, shape and raw bytes, so that ``==`` is byte identity."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype), tuple(value.shape), value.contiguous().numpy().tobytes()
    if isinstance(value, dict):
        return {key: exact_form(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(exact_form(item) for item in value)
    return value


def vector_differences(name: str, made: Dict[str, Any], committed: Dict[str, Any]) -> List[str]:
    """How a rebuilt vector file's contents differ from the committed one's: every entry but ``output`` must be
    byte for byte the same (each ``state_dict_*`` tensor or exponent is named on its own), ``output`` must have the
    same dtype and shape and be within :data:`OUTPUT_TOLERANCE`."""
    problems = []
    if sorted(made) != sorted(committed):
        problems.append(f'{name}: entries {sorted(made)}, expected {sorted(committed)}')
    for entry in sorted(set(made) & set(committed) - {'output'}):
        new, old = made[entry], committed[entry]
        if isinstance(new, dict) and isinstance(old, dict) and sorted(new) == sorted(old):
            problems += [f'{name}: {entry}[{key!r}] is not byte for byte the same' for key in old
                         if exact_form(new[key]) != exact_form(old[key])]
        elif exact_form(new) != exact_form(old):
            problems.append(f'{name}: {entry} is not byte for byte the same')
    if 'output' in made and 'output' in committed:
        new, old = made['output'], committed['output']
        if new.dtype != old.dtype or new.shape != old.shape:
            problems.append(f'{name}: output is {new.dtype} {tuple(new.shape)}, expected {old.dtype} '
                            f'{tuple(old.shape)}')
        else:
            gap = float((new.double() - old.double()).abs().max())
            if not gap <= OUTPUT_TOLERANCE:
                problems.append(f'{name}: output differs by {gap:.2e} (tolerance {OUTPUT_TOLERANCE:.0e})')
    return problems


def differences(made: Path, committed: Path) -> List[str]:
    """What the files in ``made`` (a rerun) do not share with those in ``committed``, one line each; empty when the
    rerun keeps this script's promise: the same file names, the vectors as :func:`vector_differences` asks, the
    ``.json.gz`` layout file with the same JSON text once decompressed (the gzip stream itself may differ with the
    zlib build)."""
    made_names = sorted(p.name for p in made.iterdir())
    committed_names = sorted(p.name for p in committed.iterdir())
    problems = [] if made_names == committed_names else [f'files {made_names}, expected {committed_names}']
    for name in sorted(set(made_names) & set(committed_names)):
        if name.endswith('.pt'):
            problems += vector_differences(name, torch.load(made / name, map_location='cpu', weights_only=True),
                                           torch.load(committed / name, map_location='cpu', weights_only=True))
        elif name.endswith('.gz'):
            if gzip.decompress((made / name).read_bytes()) != gzip.decompress((committed / name).read_bytes()):
                problems.append(f'{name}: the decompressed text is not byte for byte the same')
        elif (made / name).read_bytes() != (committed / name).read_bytes():
            problems.append(f'{name}: not byte for byte the same')
    return problems


def make_all(shared: Path, out: Path) -> None:
    """Every file of ``tests/data/reference`` into ``out``."""
    make_hat(shared, out)
    make_authors(shared, out)
    copy_spec(shared, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--shared', type=Path, default=HERE.parents[2] / 'shared')
    parser.add_argument('--out', type=Path, default=HERE / 'reference')
    parser.add_argument('--check', action='store_true',
                        help='rebuild into a temporary folder and compare with --out instead of writing there')
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.check:
        args.out.mkdir(parents=True, exist_ok=True)
        make_all(args.shared, args.out)
        return
    if not args.out.is_dir():
        sys.exit(f'make_reference: {args.out} is not a folder (--check compares a rebuild with its files)')
    with tempfile.TemporaryDirectory(prefix='make_reference_') as made:
        make_all(args.shared, Path(made))
        problems = differences(Path(made), args.out)
    for problem in problems:
        print(f'make_reference --check: {problem}')
    if problems:
        sys.exit(1)
    print(f'make_reference --check: the rebuild matches {args.out} (outputs within {OUTPUT_TOLERANCE:.0e}, '
          'the rest byte for byte)')


if __name__ == '__main__':
    main()
