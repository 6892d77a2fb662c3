"""``basicsr train`` and ``basicsr test``: BasicSR's own pipelines (``basicsr.train.train_pipeline``,
``basicsr.test.test_pipeline``) with the plugin registered and the current directory as the root
(``experiments/``, ``tb_logger/``, ``results/`` land there). Steps of BasicSR's that are replaced, because they
fail on current PyTorch or on CPU, or say too little:

- option parsing (:func:`parse_options`, in place of ``basicsr.utils.options.parse_options``): the same flags,
  but ``--force_yml key:sub=value`` parses ``value`` as YAML and walks the keys (BasicSR ``exec``s the string);
  it is applied before anything derives from the options, and the options actually used are what gets copied
  into the experiment folder; packages that register the types an option file names are imported
  (:func:`import_plugins`); ``--launcher pytorch`` reads torchrun's environment and uses nccl on GPUs, gloo on
  CPU; what would fail deep inside BasicSR or silently train the wrong thing is refused first
  (:func:`validate_options`);
- resuming: the training state is mapped to the training device (BasicSR maps it to
  ``torch.cuda.current_device()``, which fails on CPU);
- the message logger: :class:`hmoe_arch.training_log.TrainingMessageLogger` (routing in a few words, no
  negative ETA).

This module imports torch and basicsr; :mod:`hmoe_arch.commands.cli` imports it only once the arguments and the
option file have passed the checks that need neither.
"""
import argparse
import importlib
import logging
import os
import os.path as osp
import pickle
import random
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import yaml
from basicsr.archs import build_network
from basicsr.utils import get_root_logger, scandir, set_random_seed
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.misc import check_resume
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

from ..archs.config import HAT_RGB_MEAN
from ..data.rs_paired_dataset import IMAGE_SUFFIXES
from ..errors import OptionError
from ..locking import exclusive_lock
from ..models import MFGHMoEModel
from ..options import plain_options, precheck_option_file
from ..training_log import TrainingMessageLogger

KNOWN_PLUGINS: Dict[str, Dict[str, Any]] = {
    'hat': {
        'title': 'HAT (the `hat` package)',
        'install': 'pip install --no-deps -e <your HAT checkout>',
        'types': {'HATModel': 'model_type: MFGHMoEModel, which adds what HATModel does (window padding, tiling)',
                  'RealHATGANModel': None, 'RealHATMSEModel': None,
                  'ImageNetPairedDataset': 'type: RSPairedDataset (or BasicSR\'s PairedImageDataset)',
                  'RealESRGANDataset': None, 'HAT': 'type: MFGHMoEArch with moe: false, mfa: false, rgb_mean: '
                                                   f'{list(HAT_RGB_MEAN)} (exactly HAT)'},
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
    from basicsr.data import build_dataset  # noqa: F401  (registers BasicSR's own dataset and model types)
    from basicsr.models import build_model  # noqa: F401

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


def load_resume_state(opt: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """BasicSR's resume logic, with the state mapped to the training device (CPU included).

    With ``--auto_resume`` the newest training state that loads is used: a truncated or corrupt state (e.g.
    written in place by plain BasicSR when its run was killed, or on a full disk) is reported and the previous
    one is used. States are listed by ``*.state`` file name in ``training_states/``; an interrupted save leaves
    its files in a hidden staging folder beside it (:func:`hmoe_arch.atomic.staged_files`), never among them.
    """
    device = torch.device(f'cuda:{torch.cuda.current_device()}') if opt['num_gpu'] > 0 else torch.device('cpu')
    state, path = None, None
    if opt['auto_resume']:
        state_dir = osp.join('experiments', opt['name'], 'training_states')
        names = sorted(scandir(state_dir, suffix='state', recursive=False), key=lambda n: int(n.split('.state')[0]),
                       reverse=True) if osp.isdir(state_dir) else []
        for name in names:
            candidate = osp.join(state_dir, name)
            try:
                state = torch.load(candidate, map_location=device, weights_only=True)
            except (EOFError, RuntimeError, pickle.UnpicklingError) as error:
                get_root_logger().warning(f'auto_resume: {candidate} cannot be read ({type(error).__name__}: '
                                          f'{error}); it was probably being written when the run stopped. '
                                          'Trying the previous state.')
                continue
            path = candidate
            opt['path']['resume_state'] = path
            break
    elif opt['path'].get('resume_state'):
        path = opt['path']['resume_state']
        state = torch.load(path, map_location=device, weights_only=True)
    if state is None:
        return None
    check_resume(opt, state['iter'])
    return state


@contextmanager
def basicsr_pipeline(module: Any, args: argparse.Namespace, is_train: bool) -> Iterator[None]:
    """Run a BasicSR pipeline module with this file's option parsing (and resume) in place of its own.

    Also: the experiment (or results) folder is locked for the run (``.<name>.lock`` beside it, so BasicSR's
    renaming of a finished folder to ``*_archived_*`` does not move it); BasicSR's log file is
    written (the plugin's logger exists before BasicSR asks for one with a file); and in training the option
    file is copied into the experiment folder only once training starts, so a refused resume leaves the
    recorded options of the previous run as they were.
    """
    from basicsr.utils.options import copy_opt_file

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as held:
        pending_copies = []
        file_handlers = []
        warnings_at_start = []

        def parse(root_path: str, is_train: bool = is_train):
            opt = parse_options(args, root_path, is_train)
            warning = moe_model_warning(opt)
            if warning is not None:
                warnings_at_start.append(warning)
            if opt['rank'] == 0:
                folder = osp.join(root_path, 'experiments' if is_train else 'results', opt['name'])
                kind = 'training' if is_train else 'test'
                held.enter_context(exclusive_lock(
                    Path(folder).with_name(f'.{osp.basename(folder)}.lock'),
                    lambda holder: OptionError(f'{folder}: another {kind} with this name is running ({holder}); '
                                               'wait for it to finish or choose another name')))
            used = osp.join(tmp, osp.basename(args.opt))
            with open(used, 'w') as f:
                f.write(f'# {" ".join(sys.argv)}\n')
                yaml.safe_dump(plain_options(opt), f, sort_keys=False)
            return opt, argparse.Namespace(opt=used)

        def root_logger(logger_name: str = 'basicsr', log_level: int = logging.INFO, log_file: Optional[str] = None):
            logger = get_root_logger(logger_name, log_level)
            if log_file is not None and get_dist_info()[0] == 0:
                handler = logging.FileHandler(log_file, 'w')
                handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s: %(message)s'))
                handler.setLevel(log_level)
                logger.addHandler(handler)
                file_handlers.append((logger, handler))
                if warnings_at_start:  # once, now that the log file exists
                    logger.warning(warnings_at_start.pop())
            return logger

        def copy_when_training_starts(opt_file: str, experiments_root: str) -> None:
            pending_copies.append((opt_file, experiments_root))

        def message_logger(*message_args, **message_kwargs):
            # created right after the model is built and the training state restored: the run has started
            while pending_copies:
                copy_opt_file(*pending_copies.pop(0))
            return TrainingMessageLogger(*message_args, **message_kwargs)

        replaced = {'parse_options': parse, 'get_root_logger': root_logger}
        if is_train:
            replaced.update(load_resume_state=load_resume_state, copy_opt_file=copy_when_training_starts,
                            MessageLogger=message_logger)
        saved = {name: getattr(module, name) for name in replaced}
        for name, function in replaced.items():
            setattr(module, name, function)
        try:
            yield
        finally:
            for name, function in saved.items():
                setattr(module, name, function)
            for logger, handler in file_handlers:
                logger.removeHandler(handler)
                handler.close()


def run_pipeline(args: argparse.Namespace) -> None:
    if args.command == 'train':
        import basicsr.train as module
        entry = module.train_pipeline
    else:
        import basicsr.test as module
        entry = module.test_pipeline
    with basicsr_pipeline(module, args, args.command == 'train'):
        try:
            entry(os.getcwd())
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
