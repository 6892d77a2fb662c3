"""``basicsr train`` and ``basicsr test``: BasicSR's own pipelines (``basicsr.train.train_pipeline``,
``basicsr.test.test_pipeline``) with the plugin registered and the current directory as the root
(``experiments/``, ``tb_logger/``, ``results/`` land there). Steps of BasicSR's that are replaced, because they
fail on current PyTorch or on CPU, or say too little:

- option parsing: the same flags, but ``--force_yml key:sub=value`` parses ``value`` as YAML and walks the
  keys (BasicSR ``exec``s the string); it is applied before anything derives from the options, and the
  options actually used are what gets copied into the experiment folder; ``--launcher pytorch`` reads
  torchrun's environment and uses nccl on GPUs, gloo on CPU;
- resuming: the training state is mapped to the training device (BasicSR maps it to
  ``torch.cuda.current_device()``, which fails on CPU);
- the message logger: :class:`hmoe_arch.training_log.TrainingMessageLogger` (routing in a few words, no
  negative ETA).

This module imports torch and basicsr; :mod:`hmoe_arch.commands.cli` imports it only once the arguments and the
option file have passed the checks that need neither.
"""
import argparse
import logging
import os
import os.path as osp
import pickle
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import torch.distributed as dist
import yaml
from basicsr.utils import get_root_logger, scandir
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.misc import check_resume

from ..errors import OptionError
from ..options import moe_model_warning, parse_options, plain_options
from ..training_log import TrainingMessageLogger
from .locking import exclusive_lock


def load_resume_state(opt: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """BasicSR's resume logic, with the state mapped to the training device (CPU included).

    With ``--auto_resume`` the newest training state that loads is used: a truncated or corrupt state (e.g.
    written in place by plain BasicSR when its run was killed, or on a full disk) is reported and the previous
    one is used. States are listed by ``*.state`` file name, so the hidden ``.partial-*`` folder of an
    interrupted atomic save is never a candidate.
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
