"""Option files: BasicSR's option semantics with a safe ``--force_yml`` and CPU-capable distributed setup.

Reading and the checks that need no network are in :mod:`hmoe_arch.option_file` (no torch, no basicsr; its
readers are re-exported here). Used by ``basicsr train``/``test`` (in place of
``basicsr.utils.options.parse_options``) and ``basicsr bench``.
"""
import argparse
import os
import os.path as osp
import random
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from basicsr.utils import set_random_seed
from basicsr.utils.dist_util import get_dist_info

from .data.rs_paired_dataset import IMAGE_SUFFIXES
from .errors import OptionError
from .option_file import apply_force_yml, load_yaml, plain_options, precheck_option_file, read_option_file  # noqa: F401

KNOWN_PLUGINS: Dict[str, Dict[str, Any]] = {
    'hat': {
        'title': 'HAT (the `hat` package)',
        'install': 'pip install --no-deps -e <your HAT checkout>',
        'types': {'HATModel': 'model_type: MFGHMoEModel, which adds what HATModel does (window padding, tiling)',
                  'RealHATGANModel': None, 'RealHATMSEModel': None,
                  'ImageNetPairedDataset': 'type: RSPairedDataset (or BasicSR\'s PairedImageDataset)',
                  'RealESRGANDataset': None, 'HAT': 'type: MFGHMoEArch with moe: false, mfa: false, rgb_mean: '
                                                   '[0.4488, 0.4371, 0.4040] (exactly HAT)'},
    },
}
"""Packages that register BasicSR types users pair with this plugin (names read from their code): imported
automatically when an option file names one of their types. ``types`` maps each type to this plugin's
replacement, where there is one."""


def import_plugins(opt: Dict[str, Any], requested: Sequence[str] = ()) -> List[str]:
    """Import the packages listed under the top-level ``plugins`` key and in ``requested`` (``--plugin``), then
    every known package (:data:`KNOWN_PLUGINS`) that registers a type the options name but BasicSR lacks;
    returns the imported names.

    Raises:
        OptionError: naming the key, for a plugin that cannot be imported and for a type nobody registers (for a
            known package's type: that it comes from there, how to install it, and this plugin's replacement).
    """
    import importlib

    from basicsr.archs import build_network  # noqa: F401  (registers BasicSR's own types)
    from basicsr.data import build_dataset  # noqa: F401
    from basicsr.models import build_model  # noqa: F401
    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

    listed = opt.get('plugins') or []
    if isinstance(listed, str) or not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise OptionError(f'plugins: expected a list of package names, got {listed!r}')
    imported = []
    for name in [*listed, *requested]:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise OptionError(f'plugins: cannot import {name} ({error})') from None
        imported.append(name)
    wanted = [('model_type', opt.get('model_type'), MODEL_REGISTRY, 'model')]
    wanted += [(f'datasets.{phase}.type', d.get('type'), DATASET_REGISTRY, 'dataset')
               for phase, d in (opt.get('datasets') or {}).items() if isinstance(d, dict)]
    wanted += [(f'{key}.type', opt[key].get('type'), ARCH_REGISTRY, 'network') for key in ('network_g', 'network_d')
               if isinstance(opt.get(key), dict)]
    for key, type_name, registry, kind in wanted:
        if type_name is None or type_name in registry:
            continue
        package = next((p for p, info in KNOWN_PLUGINS.items() if type_name in info['types']), None)
        if package is None:
            raise OptionError(f'{key}: no {kind} named {type_name} is registered in BasicSR or this plugin; if '
                              'another package provides it, name it under `plugins:` (or --plugin)')
        info = KNOWN_PLUGINS[package]
        try:
            importlib.import_module(package)
        except ImportError as error:
            instead = info['types'][type_name]
            raise OptionError(f'{key}: {type_name} comes from {info["title"]}, which cannot be imported ({error}); '
                              f'install it ({info["install"]})' + (f' or use {instead}' if instead else '')) \
                from None
        imported.append(package)
    return imported


def moe_model_warning(opt: Dict[str, Any]) -> Optional[str]:
    """A warning for an MoE network trained by a model other than :class:`MFGHMoEModel` (e.g. HAT's ``HATModel``),
    which neither adds the load-balancing loss nor logs the routing; None otherwise."""
    from basicsr.utils.registry import MODEL_REGISTRY

    from .models import MFGHMoEModel

    network = opt.get('network_g') or {}
    if network.get('type') not in ('MFGHMoEArch', 'MFGHMOE') or network.get('moe', True) is False:
        return None
    model = MODEL_REGISTRY.get(opt['model_type']) if opt.get('model_type') in MODEL_REGISTRY else None
    if model is None or issubclass(model, MFGHMoEModel):
        return None
    return (f'model_type {opt["model_type"]} trains the MoE network without what MFGHMoEModel adds: '
            'train.aux_loss_weight (the load-balancing loss) is not applied and the routing is not logged; use '
            'model_type: MFGHMoEModel for those')


def init_distributed() -> None:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU)."""
    if dist.is_initialized():
        return
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
    if missing:
        raise OptionError(f'--launcher pytorch needs the environment torchrun sets; missing {missing} '
                          '(run: torchrun --nproc_per_node=N -m hmoe_arch train -opt X --launcher pytorch)')
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        dist.init_process_group(backend='nccl')
    else:
        dist.init_process_group(backend='gloo')


def parse_options(args: argparse.Namespace, root_path: str, is_train: bool) -> Dict[str, Any]:
    """BasicSR's option semantics (paths, phases, seeds, debug mode) with safe ``--force_yml``."""
    opt = precheck_option_file(args.opt, args.force_yml or (), is_train=is_train)
    import_plugins(opt, getattr(args, 'plugin', None) or ())

    if args.launcher == 'pytorch':
        init_distributed()
    opt['dist'] = args.launcher == 'pytorch'
    opt['rank'], opt['world_size'] = get_dist_info()
    if opt.get('manual_seed') is None:
        opt['manual_seed'] = random.randint(1, 10000)
    set_random_seed(opt['manual_seed'] + opt['rank'])
    opt['auto_resume'] = bool(getattr(args, 'auto_resume', False))
    opt['is_train'] = is_train
    if getattr(args, 'debug', False) and not opt['name'].startswith('debug'):
        opt['name'] = 'debug_' + opt['name']
    if opt.get('num_gpu', 'auto') == 'auto':
        opt['num_gpu'] = torch.cuda.device_count()

    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase.split('_')[0]
        if 'scale' in opt:
            dataset['scale'] = opt['scale']
        for key in ('dataroot_gt', 'dataroot_lq'):
            if dataset.get(key) is not None:
                dataset[key] = osp.expanduser(dataset[key])
    for key, value in opt['path'].items():
        if value is not None and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = osp.expanduser(value)

    if is_train:
        root = osp.join(root_path, 'experiments', opt['name'])
        opt['path'].update(experiments_root=root, models=osp.join(root, 'models'),
                           training_states=osp.join(root, 'training_states'), log=root,
                           visualization=osp.join(root, 'visualization'))
        if 'debug' in opt['name']:
            if 'val' in opt:
                opt['val']['val_freq'] = 8
            opt['logger']['print_freq'] = 1
            opt['logger']['save_checkpoint_freq'] = 8
    else:
        root = osp.join(root_path, 'results', opt['name'])
        opt['path'].update(results_root=root, log=root, visualization=osp.join(root, 'visualization'))
    validate_options(opt)
    return opt


def _count_images(dataset: Dict[str, Any]) -> Optional[int]:
    """Images a training dataset block selects (split list, LMDB meta_info or folder), if it can be told."""
    for key in ('split_file', 'meta_info_file'):
        if dataset.get(key):
            with open(dataset[key]) as f:
                return sum(1 for line in f if line.strip())
    root = dataset.get('dataroot_gt')
    if not root or not osp.isdir(root):
        return None
    meta = osp.join(root, 'meta_info.txt')
    if root.endswith('.lmdb') and osp.isfile(meta):
        with open(meta) as f:
            return sum(1 for line in f if line.strip())
    return sum(1 for name in os.listdir(root) if name.lower().endswith(IMAGE_SUFFIXES))


def validate_options(opt: Dict[str, Any]) -> None:
    """Checks that would otherwise fail deep inside BasicSR, or silently train the wrong thing; each raises
    :class:`OptionError` naming the key or path."""
    from basicsr.archs import build_network

    if 'network_g' in opt:
        try:
            try:
                with torch.device('meta'):  # no memory for the weights
                    build_network(dict(opt['network_g']))
            except (RuntimeError, NotImplementedError):  # a constructor that reads tensor values (SwinIR's .item())
                build_network(dict(opt['network_g']))
        except (ValueError, TypeError, KeyError) as error:
            raise OptionError(f'network_g: {error}') from error
        network = opt['network_g']
        upscale = network.get('upscale', network.get('scale'))
        if 'scale' in opt and upscale is not None and upscale != opt['scale']:
            raise OptionError(f'network_g.upscale is {upscale} but scale is {opt["scale"]}')
    for name, metric in (opt.get('val') or {}).get('metrics', {}).items():
        if 'crop_border' in metric and 'scale' in opt and metric['crop_border'] != opt['scale']:
            raise OptionError(f'val.metrics.{name}.crop_border is {metric["crop_border"]} but scale is {opt["scale"]} '
                              '(the paper protocol crops `scale` pixels)')
    for phase, dataset in opt['datasets'].items():
        for key in ('dataroot_gt', 'dataroot_lq', 'split_file', 'meta_info_file'):
            if dataset.get(key) is not None and not osp.exists(dataset[key]):
                raise OptionError(f'datasets.{phase}.{key}: {dataset[key]} does not exist')
        if dataset.get('phase') != 'train':
            continue
        window = int((opt.get('network_g') or {}).get('window_size', 1))
        gt_size, scale = dataset.get('gt_size'), opt.get('scale', 1)
        if gt_size is not None and gt_size % (scale * window):
            raise OptionError(f'datasets.{phase}.gt_size ({gt_size}) must be a multiple of scale x window_size '
                              f'({scale} x {window} = {scale * window})')
        count = _count_images(dataset)
        batch = dataset.get('batch_size_per_gpu', 1) * opt.get('world_size', 1)
        if count is not None and batch > count:
            raise OptionError(f'datasets.{phase}.batch_size_per_gpu: a batch of {batch} (x world size) is larger '
                              f'than the training set ({count} images)')
