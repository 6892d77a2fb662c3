"""``basicsr train`` and ``basicsr test``: BasicSR's own pipelines (``basicsr.train.train_pipeline``,
``basicsr.test.test_pipeline``) with the plugin registered and the current directory as the root
(``experiments/``, ``tb_logger/``, ``results/`` land there). Steps of BasicSR's that are replaced, because they
fail on current PyTorch or on CPU, or say too little:

- option parsing (:func:`parse_options`, in place of ``basicsr.utils.options.parse_options``): the same flags,
  but ``--force_yml key:sub=value`` parses ``value`` as YAML and walks the keys (BasicSR ``exec``s the string);
  it is applied before anything derives from the options, and the options actually used are what gets copied
  into the experiment folder; the plugins the user enabled (``--plugin``, ``HMOE_ARCH_PLUGINS``) and the known
  packages that register the types an option file names are imported, from installed distributions only
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
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import os.path as osp
import pickle
import random
import re
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
import yaml
from basicsr.archs import build_network
from basicsr.utils import get_root_logger, scandir, set_random_seed
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.misc import check_resume
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

from ..archs.config import HAT_RGB_MEAN, NETWORK_TYPES, RAISE_WITH_OPTION, check_network
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
"""Packages that register BasicSR types users pair with this plugin (names read from their code), keyed by their
top-level module: imported automatically when an option file names one of their types, but only from an installed
distribution (:func:`plugin_distribution`), as any plugin. ``types`` maps each type to this plugin's replacement,
where there is one."""


PLUGINS_VARIABLE = 'HMOE_ARCH_PLUGINS'
"""The environment variable that enables plugins: comma-separated package names, as many ``--plugin`` flags."""


def enabled_plugins(requested: Sequence[str], environ: Mapping[str, str]) -> Dict[str, str]:
    """The packages the user enabled, each mapped to how: ``'--plugin'`` for ``requested`` (the flags, first),
    :data:`PLUGINS_VARIABLE` for the comma-separated names of that variable in ``environ``.

    Raises:
        OptionError: naming the flag or the variable, for a name that is not a dotted module name.
    """
    given = [(name, '--plugin') for name in requested]
    given += [(name.strip(), PLUGINS_VARIABLE) for name in environ.get(PLUGINS_VARIABLE, '').split(',')
              if name.strip()]
    enabled: Dict[str, str] = {}
    for name, source in given:
        if not all(part.isidentifier() for part in name.split('.')):
            raise OptionError(f'{source}: expected a package name such as hat, got {name!r}')
        enabled.setdefault(name, source)
    return enabled


def untrusted_folders() -> Set[str]:
    """The real paths of the current folder and of the running script's folder: the first entry of ``sys.path``
    under ``python -m``, ``python -c`` and ``python script.py`` (and the console script's folder), where a file
    that came with an option file or a download may lie. Plugins are never looked up there."""
    folders = {os.path.realpath(os.getcwd())}
    script = sys.argv[0] if sys.argv else ''
    if script and osp.isfile(script):
        folders.add(osp.dirname(osp.realpath(script)))
    return folders


@contextmanager
def _search_path_without(folders: Set[str]) -> Iterator[None]:
    """``sys.path`` without the entries that resolve to one of ``folders`` (``''`` is the current folder),
    restored on exit."""
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if osp.realpath(os.fspath(entry) or os.curdir) not in folders]
    try:
        yield
    finally:
        sys.path[:] = saved


def installed_packages() -> Dict[str, List[str]]:
    """Top-level module name -> names of the installed distributions that provide it
    (``importlib.metadata.packages_distributions``), reading no metadata from :func:`untrusted_folders`."""
    with _search_path_without(untrusted_folders()):
        return importlib.metadata.packages_distributions()


def _find_spec(name: str) -> Optional[importlib.machinery.ModuleSpec]:
    """``importlib.util.find_spec`` of a top-level ``name`` (imports nothing); ImportError where it cannot be
    looked up."""
    try:
        return importlib.util.find_spec(name)
    except ValueError as error:  # in sys.modules without a spec
        raise ImportError(str(error)) from None


def _location(spec: importlib.machinery.ModuleSpec) -> str:
    """Where a module spec's code is: its file, or a namespace package's folders."""
    return spec.origin if spec.has_location else ', '.join(spec.submodule_search_locations or ()) or spec.name


def plugin_distribution(name: str, installed: Mapping[str, List[str]]) -> Tuple[str, str]:
    """The installed distribution (name, version) whose top-level module is the one ``import name`` loads, checked
    without importing anything: the module must be found where it is found with :func:`untrusted_folders` left out
    of ``sys.path`` (so ``python -m`` from a folder holding ``hat.py`` neither imports that file nor lets it
    shadow the installed ``hat``), and ``installed`` (:func:`installed_packages`) must name a distribution for it
    (a loose file, a standard-library module or a package reached only through ``PYTHONPATH`` is not one).

    Raises:
        ImportError: the reason, for a module that is missing, found only in (or first in) the current or the
            script's folder, or part of no installed distribution.
    """
    top = name.partition('.')[0]
    importlib.invalidate_caches()  # a file written since the last import is seen
    found = _find_spec(top)
    if found is None:
        raise ModuleNotFoundError(f'No module named {top!r}', name=top)
    with _search_path_without(untrusted_folders()):
        trusted = _find_spec(top)
    if trusted is None:
        raise ImportError(f'{_location(found)} is in the current folder or the script\'s, which are never searched '
                          'for plugins')
    if (trusted.origin, list(trusted.submodule_search_locations or ())) != \
            (found.origin, list(found.submodule_search_locations or ())):
        raise ImportError(f'{_location(found)} in the current folder or the script\'s would be imported in place of '
                          f'the installed {_location(trusted)}; rename it or run from another folder')
    distributions = installed.get(top)
    if not distributions:
        raise ImportError(f'{_location(found)} is not part of an installed distribution (pip install it first)')
    return distributions[0], importlib.metadata.version(distributions[0])


def import_plugins(opt: Dict[str, Any], requested: Sequence[str] = (),
                   environ: Optional[Mapping[str, str]] = None) -> List[str]:
    """Import the plugins the user enabled (``requested``: the ``--plugin`` flags, and :data:`PLUGINS_VARIABLE`
    in ``environ``, default ``os.environ``), then every known package (:data:`KNOWN_PLUGINS`) that registers a type
    the options name but BasicSR lacks; returns the imported names.

    An option file never imports code by itself: its top-level ``plugins`` list is refused unless the user enabled
    every package it names. Each plugin must be an installed distribution (:func:`plugin_distribution`, checked for
    all before any is imported); each import is logged (INFO on basicsr's root logger) with the distribution, its
    version and why.

    Raises:
        OptionError: naming the key, flag or variable: for a bad ``plugins`` list or one naming a package the user
            did not enable (with how to enable it), for a plugin that is not an installed distribution or cannot be
            imported, and for a type nobody registers (for a known package's type: that it comes from there, how to
            install it, and this plugin's replacement).
    """
    from basicsr.data import build_dataset  # noqa: F401  (registers BasicSR's own dataset and model types)
    from basicsr.models import build_model  # noqa: F401

    listed = opt.get('plugins') or []
    if isinstance(listed, str) or not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise OptionError(f'plugins: expected a list of package names, got {listed!r}')
    enabled = enabled_plugins(requested, os.environ if environ is None else environ)
    refused = list(dict.fromkeys(name for name in listed if name not in enabled))
    if refused:
        raise OptionError(f'plugins: the option file names {", ".join(refused)}, and an option file cannot import '
                          'code by itself; if you trust the package, install it and enable it with '
                          f'{" ".join(f"--plugin {name}" for name in refused)} (or {PLUGINS_VARIABLE}='
                          f'{",".join(refused)})')
    logger = get_root_logger()
    installed = installed_packages() if enabled else None
    checked = []
    for name, source in enabled.items():
        try:
            checked.append((name, source, *plugin_distribution(name, installed)))
        except ImportError as error:
            raise OptionError(f'{source}: cannot import {name} as a plugin ({error})') from None
    imported = []
    for name, source, distribution, version in checked:
        logger.info(f'importing plugin {name} (distribution {distribution} {version}), enabled by {source}')
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise OptionError(f'{source}: cannot import {name} ({error})') from None
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
                              'another package provides it, install it and enable it with --plugin PACKAGE (or '
                              f'{PLUGINS_VARIABLE}=PACKAGE)')
        info = KNOWN_PLUGINS[package]
        try:
            if installed is None:
                installed = installed_packages()
            distribution, version = plugin_distribution(package, installed)
            logger.info(f'importing plugin {package} (distribution {distribution} {version}), because {key} names '
                        f'its type {type_name}')
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
    """BasicSR's option semantics (paths, phases, seeds, debug mode) with safe ``--force_yml``; the run's folder
    is ``<root_path>/experiments/<name>`` (training) or ``<root_path>/results/<name>`` (test), and never anything
    else: ``name`` is one folder name (checked by :func:`~hmoe_arch.options.precheck_option_file`, and here again
    on the final path).

    Raises:
        OptionError: naming the option file or the key.
    """
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
                if not isinstance(dataset[key], str):
                    raise OptionError(f'{args.opt}: `datasets.{phase}.{key}` must be a path, got {dataset[key]!r}')
                dataset[key] = osp.expanduser(dataset[key])
    for key, value in opt['path'].items():
        if value is not None and ('resume_state' in key or 'pretrain_network' in key):
            if not isinstance(value, str):
                raise OptionError(f'{args.opt}: `path.{key}` must be a path, got {value!r}')
            opt['path'][key] = osp.expanduser(value)

    base = osp.join(root_path, 'experiments' if is_train else 'results')
    root = osp.join(base, opt['name'])
    if osp.dirname(osp.abspath(root)) != osp.abspath(base):
        raise OptionError(f'{args.opt}: `name` must be one folder name, got {opt["name"]!r} (the run would not be '
                          f'in {base})')
    if is_train:
        opt['path'].update(experiments_root=root, models=osp.join(root, 'models'),
                           training_states=osp.join(root, 'training_states'), log=root,
                           visualization=osp.join(root, 'visualization'))
        if 'debug' in opt['name']:
            if 'val' in opt:
                opt['val']['val_freq'] = 8
            opt['logger']['print_freq'] = 1
            opt['logger']['save_checkpoint_freq'] = 8
    else:
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
    :class:`OptionError` naming the key or path. A ``network_g`` of a type this project knows
    (:data:`hmoe_arch.archs.config.NETWORK_TYPES`) is first bounded without building anything
    (:func:`hmoe_arch.archs.config.check_network`: no file arguments, at most 1000 blocks, an estimated memory under
    the top-level ``max_memory`` GiB, default 8); then it is built on the meta device."""
    if 'network_g' in opt:
        try:
            if isinstance(opt['network_g'], dict) and opt['network_g'].get('type') in NETWORK_TYPES:
                check_network(opt['network_g'], opt.get('max_memory'), RAISE_WITH_OPTION)
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
    one is used. States are the files ``<iteration>.state`` (digits only, as BasicSR names them) in
    ``training_states/``, newest iteration first; any other ``*.state`` file there (``old.state``, a copy) is
    ignored, with one warning naming them. An interrupted save leaves its files in a hidden staging folder beside
    it (:func:`hmoe_arch.atomic.staged_files`), never among them.
    """
    device = torch.device(f'cuda:{torch.cuda.current_device()}') if opt['num_gpu'] > 0 else torch.device('cpu')
    state, path = None, None
    if opt['auto_resume']:
        state_dir = osp.join('experiments', opt['name'], 'training_states')
        found = sorted(scandir(state_dir, suffix='.state', recursive=False)) if osp.isdir(state_dir) else []
        stray = [n for n in found if not re.fullmatch(r'[0-9]+\.state', n)]
        names = sorted(set(found) - set(stray), key=lambda n: int(n[:-len('.state')]), reverse=True)
        if stray:
            get_root_logger().warning(f'auto_resume: ignoring {", ".join(stray)} in {state_dir}: not named '
                                      '<iteration>.state, as BasicSR names the training states it writes')
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
                    lambda holder: OptionError(  # a run records its PID; basicsr bench holds it shared, unrecorded
                        f'{folder}: another {kind} with this name is running ({holder}); wait for it to finish or '
                        'choose another name' if holder.startswith('pid ') else
                        f'{folder}: in use by another process (basicsr bench reading it, or a {kind} of this name '
                        'starting); wait for it to finish or choose another name')))
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
