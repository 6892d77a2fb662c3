"""Writes the small reference vectors in ``tests/data/reference/`` (how and why: README.md beside this script).

    python tests/data/make_reference.py [--shared ../shared] [--out tests/data/reference]

Needs ``../shared`` (HAT's code in ``peers/HAT`` and the authors' vectors in ``reference/``). Every file is written
only after the checks it depends on have passed; a failing check stops the script with its reason.
"""
import argparse
import gzip
import importlib.util
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Dict

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--shared', type=Path, default=HERE.parents[2] / 'shared')
    parser.add_argument('--out', type=Path, default=HERE / 'reference')
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    make_hat(args.shared, args.out)
    make_authors(args.shared, args.out)
    copy_spec(args.shared, args.out)


if __name__ == '__main__':
    main()
