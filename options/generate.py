"""Writes ``options/baselines/*.yml`` and ``options/ablations/*.yml`` from the paper's option files.

Every baseline is the paper file of its dataset and scale (``options/train_{ucm,aid}_x{2,4}.yml``: data, split,
degradation, schedule, metrics) with only ``name`` and ``network_g`` replaced (and ``train.aux_loss_weight``,
which only MoE networks have, removed); every Table III ablation is ``options/train_ucm_x4.yml`` with only
``name`` and the MoE keys of ``network_g`` (``mfa``, ``routing``, ``expert_groups``) replaced.
``tests/test_option_files.py`` checks that the committed files equal this script's output.

Usage: ``python options/generate.py`` (from anywhere; ``--check`` only reports files that differ).
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import yaml

OPTIONS = Path(__file__).resolve().parent
DATASETS = {'ucm': 'UCMerced', 'aid': 'AID'}
SCALES = (2, 4)
HAT_RGB_MEAN = [0.4488, 0.4371, 0.404]

BASELINES: Dict[str, Tuple[str, str, dict]] = {
    'edsr': ('EDSR', "EDSR-L (Lim et al. 2017), BasicSR's published EDSR_L settings",
             {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 256, 'num_block': 32, 'upscale': None,
              'res_scale': 0.1, 'img_range': 255.0, 'rgb_mean': HAT_RGB_MEAN}),
    'rcan': ('RCAN', "RCAN (Zhang et al. 2018), BasicSR's published RCAN settings",
             {'type': 'RCAN', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 64, 'num_group': 10, 'num_block': 20,
              'squeeze_factor': 16, 'upscale': None, 'res_scale': 1, 'img_range': 255.0, 'rgb_mean': HAT_RGB_MEAN}),
    'rrdbnet': ('RRDBNet', "RRDBNet (ESRGAN's PSNR-oriented RRDB, Wang et al. 2018)",
                {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'scale': None, 'num_feat': 64, 'num_block': 23,
                 'num_grow_ch': 32}),
    'swinir': ('SwinIR', 'SwinIR classical SR (Liang et al. 2021): embed 180, 6x6 blocks, window 8',
               {'type': 'SwinIR', 'upscale': None, 'in_chans': 3, 'img_size': 48, 'window_size': 8, 'img_range': 1.0,
                'depths': [6] * 6, 'embed_dim': 180, 'num_heads': [6] * 6, 'mlp_ratio': 2,
                'upsampler': 'pixelshuffle', 'resi_connection': '1conv'}),
    'hat': ('HAT', 'HAT (Chen et al. 2023), the exact HAT configuration of MFGHMoEArch (HAT checkpoints load strictly)',
            None),
}
"""file suffix -> (name in the experiment name, header line, network_g; ``None`` for the upscale key, filled per
file; HAT's is the paper file's backbone with the MoE keys removed and HAT's RGB mean)."""

MOE_KEYS = ('mfa', 'moe', 'routing', 'top_k', 'expert_groups')


def groups(*pairs: Tuple[int, int]) -> List[dict]:
    return [{'kernel_size': k, 'num_experts': n} for k, n in pairs]


ABLATIONS: Dict[str, Tuple[str, dict]] = {
    'dual_k1k3_8x8': ("dual routing over 8 x 1x1 + 8 x 3x3 experts (the paper's best, = train_ucm_x4.yml).",
                      {'mfa': True, 'routing': 'dual', 'expert_groups': groups((1, 8), (3, 8))}),
    'dual_k1k3_8x8_nomfa': ('dual routing over 8 x 1x1 + 8 x 3x3 experts, without MFA.',
                            {'mfa': False, 'routing': 'dual', 'expert_groups': groups((1, 8), (3, 8))}),
    'dual_k1k3k5_5x6x5': ('dual routing over 5 x 1x1 + 6 x 3x3 + 5 x 5x5 experts.',
                          {'mfa': True, 'routing': 'dual', 'expert_groups': groups((1, 5), (3, 6), (5, 5))}),
    'dual_k3k5_8x8': ('dual routing over 8 x 3x3 + 8 x 5x5 experts.',
                      {'mfa': True, 'routing': 'dual', 'expert_groups': groups((3, 8), (5, 8))}),
    'experts16_k1': ('16 homogeneous 1x1 experts, one router.',
                     {'mfa': True, 'routing': 'single', 'expert_groups': groups((1, 16))}),
    'experts16_k3': ('16 homogeneous 3x3 experts, one router.',
                     {'mfa': True, 'routing': 'single', 'expert_groups': groups((3, 16))}),
    'experts16_k3_nomfa': ('16 homogeneous 3x3 experts, one router, without MFA.',
                           {'mfa': False, 'routing': 'single', 'expert_groups': groups((3, 16))}),
    'experts16_k5': ('16 homogeneous 5x5 experts, one router.',
                     {'mfa': True, 'routing': 'single', 'expert_groups': groups((5, 16))}),
    'experts1_k3': ('1 expert (3x3), i.e. no mixture.',
                    {'mfa': True, 'routing': 'single', 'expert_groups': groups((3, 1))}),
    'experts32_k3': ('32 homogeneous 3x3 experts, one router.',
                     {'mfa': True, 'routing': 'single', 'expert_groups': groups((3, 32))}),
    'experts8_k3': ('8 homogeneous 3x3 experts, one router.',
                    {'mfa': True, 'routing': 'single', 'expert_groups': groups((3, 8))}),
}
"""file suffix -> (header line, the MoE keys of network_g)."""


def dump(header: List[str], opt: dict) -> str:
    body = yaml.safe_dump(opt, sort_keys=False, default_flow_style=None, width=120)
    return ''.join(f'# {line}\n' for line in header) + '\n' + body


def baseline_files() -> Dict[Path, str]:
    files = {}
    for short, dataset in DATASETS.items():
        for scale in SCALES:
            paper_name = f'train_{short}_x{scale}.yml'
            paper = yaml.safe_load((OPTIONS / paper_name).read_text())
            for suffix, (model, title, network) in BASELINES.items():
                opt = yaml.safe_load((OPTIONS / paper_name).read_text())
                opt['train'].pop('aux_loss_weight', None)
                if network is None:
                    network = {k: v for k, v in paper['network_g'].items() if k not in MOE_KEYS}
                    network.update(moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN)
                else:
                    network = {k: (scale if v is None else v) for k, v in network.items()}
                opt['name'] = f'train_{model}_{dataset}_x{scale}'
                opt['network_g'] = network
                header = [f'Baseline: {title}',
                          f'x{scale} on {dataset} with exactly the data, split, degradation, schedule and metrics of',
                          f'options/{paper_name} (generated from it by options/generate.py; only name and network_g '
                          'differ).']
                files[OPTIONS / 'baselines' / f'train_{short}_x{scale}_{suffix}.yml'] = dump(header, opt)
    return files


def ablation_files() -> Dict[Path, str]:
    files = {}
    for suffix, (title, moe) in ABLATIONS.items():
        opt = yaml.safe_load((OPTIONS / 'train_ucm_x4.yml').read_text())
        opt['name'] = f'ablation_UCMerced_x4_{suffix}'
        opt['network_g'].update(moe)
        header = [f'Table III ablation: {title}',
                  'UCMerced x4 with the data, schedule and metrics of options/train_ucm_x4.yml (generated from it',
                  'by options/generate.py; only name and the MoE keys of network_g differ).']
        files[OPTIONS / 'ablations' / f'ablation_ucm_x4_{suffix}.yml'] = dump(header, opt)
    return files


def generated() -> Dict[Path, str]:
    """Every generated file and its text."""
    return {**baseline_files(), **ablation_files()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--check', action='store_true', help='only list files that differ from the generator')
    args = parser.parse_args(argv)
    stale = [path for path, text in generated().items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f'differs: {path.relative_to(OPTIONS.parent)}')
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_text(generated()[path])
        print(f'wrote {path.relative_to(OPTIONS.parent)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
