"""The ``basicsr`` console command of the plugin: ``basicsr {train,test,prepare,bench,infer}``.

``train`` and ``test`` run BasicSR's own pipelines (``basicsr.train.train_pipeline``,
``basicsr.test.test_pipeline``) with the plugin registered and the current directory as the root
(``experiments/``, ``tb_logger/``, ``results/`` land there). Two of BasicSR's steps are replaced, because
they fail on current PyTorch or on CPU:

- option parsing: the same flags, but ``--force_yml key:sub=value`` parses ``value`` as YAML and walks the
  keys (BasicSR ``exec``s the string); it is applied before anything derives from the options, and the
  options actually used are what gets copied into the experiment folder; ``--launcher pytorch`` reads
  torchrun's environment and uses nccl on GPUs, gloo on CPU;
- resuming: the training state is mapped to the training device (BasicSR maps it to
  ``torch.cuda.current_device()``, which fails on CPU).

Exit status: 0 on success, 2 on a bad argument, option, input or output location, 3 when training stopped
on a non-finite loss or gradient.
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
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import yaml
from basicsr.utils import get_root_logger, scandir
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.misc import check_resume

from ..data.degradations import DEGRADATIONS
from ..errors import HmoeError, OptionError
from ..options import moe_model_warning, parse_options, plain_options
from ..protocols import DEFAULT_PROTOCOL, PROTOCOLS
from .bench import run_bench
from .export import FORMATS, export
from .infer import infer
from .locking import exclusive_lock
from .prepare import DATASETS, prepare


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
    from basicsr.utils import MessageLogger
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
            return MessageLogger(*message_args, **message_kwargs)

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


# ----------------------------------------------------------------------------------------------------------
# command line
def add_prepare_parser(commands) -> None:
    """``basicsr prepare``."""
    prep = commands.add_parser(
        'prepare', help='published UCMerced/AID (train+test) or RSSCN7/WHU-RS19 (test only) archive or folder -> '
                        'split lists, HR/LR PNGs and LMDBs',
        description='Split each class with the seeded rule, crop GT to a multiple of every scale, write '
                    'DIR/{train,test}.txt, DIR/Train, DIR/Test_HR, DIR/Test_LR_x{s} (and LMDBs) atomically. '
                    'rsscn7 and whurs19 are test-only sets (every image in Test_HR, no Train), for '
                    'basicsr bench --test-set.')
    prep.add_argument('dataset', choices=sorted(DATASETS))
    prep.add_argument('--source', type=Path, default=None,
                      help='the published .zip archive or its extracted folder (with --download: where to save '
                           'the archive; default: the folder that holds --out)')
    prep.add_argument('--out', type=Path, required=True, help='output folder DIR (must not exist, or be a '
                      'finished run with the same arguments)')
    prep.add_argument('--scales', type=int, nargs='+', default=[2, 4], help='LR scales of the test split')
    prep.add_argument('--seed', type=int, default=0, help='split seed (0 gives the committed UCMerced split)')
    prep.add_argument('--degradation', choices=DEGRADATIONS, default='bicubic', help='LR synthesis')
    prep.add_argument('--lmdb', action='store_true', help='also write Train.lmdb, Test_HR.lmdb, Test_LR_x{s}.lmdb')
    prep.add_argument('--skip-bad', action='store_true', help='skip unreadable or non-RGB files (listed in the '
                      'summary) instead of stopping')
    prep.add_argument('--download', action='store_true', help='fetch the official archive and verify its MD5')
    prep.add_argument('--no-progress', action='store_true', help='no progress bar')


def add_bench_parser(commands) -> None:
    """``basicsr bench``."""
    bench = commands.add_parser(
        'bench', help='evaluate models on their test split: PSNR/SSIM table, MACs, latency, memory, plot',
        description='Evaluate test option files or experiment folders (plus bicubic) and write bench.md, '
                    'bench.csv and bench_psnr_latency.png.')
    bench.add_argument('sources', nargs='+', type=Path, help='test option files (weights from '
                       'path.pretrain_network_g) or experiment folders (experiments/<name>)')
    bench.add_argument('--out', type=Path, default=Path('results/bench'), help='output folder')
    bench.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    bench.add_argument('--lr-size', type=int, default=64, help='LR side for MACs, latency and memory')
    bench.add_argument('--runs', type=int, default=5, help='timed forwards per model (median)')
    bench.add_argument('--per-class', action='store_true', help='also write bench_per_class.csv')
    bench.add_argument('--expert-maps', action='store_true', help='write expert maps and usage per scene class '
                       'for every MoE model')
    bench.add_argument('--force_yml', nargs='+', default=(), metavar='KEY:SUB=VALUE',
                       help='override options of every source (VALUE is YAML)')
    bench.add_argument('--protocol', dest='protocols', action='append', choices=list(PROTOCOLS), default=None,
                       help=f'how PSNR/SSIM are measured (repeatable, one table per protocol; default '
                            f'{DEFAULT_PROTOCOL}; see docs/protocols.md)')
    bench.add_argument('--test-set', dest='test_sets', action='append', type=Path, default=None, metavar='DIR',
                       help='evaluate on DIR/Test_HR and DIR/Test_LR_x<scale> (basicsr prepare\'s layout) instead '
                            'of each model\'s own test set (repeatable, one table per set)')
    bench.add_argument('--niqe', action='store_true', help='add NIQE of the SR images (no reference; BasicSR\'s)')
    bench.add_argument('--lpips', action='store_true', help='add LPIPS (AlexNet; needs the lpips extra and the '
                       'AlexNet weights already on disk: nothing is downloaded)')

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='basicsr', description='MFG-HMoE (hmoe_arch) commands on top of BasicSR.')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, help_text in (('train', 'train with a BasicSR option file (experiments/ in the current directory)'),
                            ('test', 'evaluate with a BasicSR option file (results/ in the current directory)')):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument('-opt', required=True, help='path to the option YAML file')
        sub.add_argument('--launcher', choices=['none', 'pytorch'], default='none',
                         help='pytorch: distributed data parallel under torchrun (nccl on GPUs, gloo on CPU)')
        sub.add_argument('--force_yml', nargs='+', default=None, metavar='KEY:SUB=VALUE',
                         help='override options; VALUE is YAML (e.g. train:total_iter=10 network_g:depths=[2,2])')
        sub.add_argument('--plugin', action='append', default=[], metavar='PACKAGE',
                         help='import PACKAGE first so its BasicSR types register (repeatable; same as the '
                              'top-level option `plugins: [PACKAGE]`); HAT is imported by itself when the options '
                              'name one of its types')
        if name == 'train':
            sub.add_argument('--auto_resume', action='store_true',
                             help='continue from the latest training state of this experiment, if any')
            sub.add_argument('--debug', action='store_true', help="BasicSR's debug mode (prefixes the name)")
        sub.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    add_prepare_parser(commands)
    add_bench_parser(commands)
    inf = commands.add_parser(
        'infer', help='super-resolve images, folders and GeoTIFFs (tiled, feathered blending)',
        description='Super-resolve an image, a GeoTIFF or every one of a folder with tiled inference.')
    inf.add_argument('--weights', required=True, help='checkpoint file (.pth or .safetensors: this project\'s, the '
                     'authors\' release or HAT\'s) or https:// URL (cached; #sha256=<hex> checks it); params_ema is '
                     'used when present; the network is read from the checkpoint unless -opt/--arch-args say otherwise')
    inf.add_argument('-opt', type=Path, default=None, help='option file whose network_g builds the network '
                     '(default: MFGHMoEArch defaults, the paper x4 model)')
    inf.add_argument('--arch-args', nargs='+', default=(), metavar='KEY=VALUE',
                     help='network_g overrides, VALUE is YAML (e.g. upscale=2 moe=false)')
    inf.add_argument('--input', type=Path, required=True, help='an image or GeoTIFF, or a folder of them')
    inf.add_argument('--output', type=Path, required=True, help='output image file (single input) or folder')
    inf.add_argument('--tile', type=int, default=256, help='LR tile side')
    inf.add_argument('--tile-pad', type=int, default=32, help='LR overlap between tiles, blended with feathering')
    inf.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    inf.add_argument('--expert-map', action='store_true', help='also write <name>_experts.png (or a '
                     'georeferenced <name>_experts.tif for GeoTIFFs; MoE networks)')
    inf.add_argument('--bands', type=lambda text: [int(b) for b in text.split(',')], default=None,
                     metavar='R,G,B', help='GeoTIFF bands (1-based) to use as RGB, e.g. 3,2,1')
    inf.add_argument('--block', type=int, default=1024, help='GeoTIFF block side in LR pixels (bounds memory)')
    inf.add_argument('--no-progress', action='store_true')
    exp = commands.add_parser('export', help='write a checkpoint as .safetensors (with its network options) or ONNX',
                              description='write a checkpoint as .safetensors, with the network options in its '
                                          'metadata (readable by infer, load_pretrained and pretrain_network_g), or '
                                          'as ONNX with dynamic batch, height and width (checked with onnxruntime)')
    exp.add_argument('--weights', required=True, help='checkpoint file or https:// URL (#sha256=... to check it)')
    exp.add_argument('--format', dest='fmt', choices=FORMATS, default='safetensors')
    exp.add_argument('--out', type=Path, required=True, help='output file (must not exist)')
    exp.add_argument('-opt', type=Path, default=None, help='option file whose network_g builds the network '
                                                           '(default: read from the checkpoint)')
    exp.add_argument('--arch-args', nargs='+', default=(), metavar='KEY=VALUE', help='network_g overrides')
    return parser


def one_line(error: BaseException) -> str:
    """The message of ``error``; for one re-raised from a DataLoader worker (whose message is PyTorch's
    "Caught X in DataLoader worker process N" and the worker's traceback) the original message."""
    text = str(error)
    if text.startswith('Caught ') and 'Original Traceback' in text:
        last = text.rstrip().splitlines()[-1]
        prefix = f'{type(error).__module__}.{type(error).__qualname__}: '
        for name in (prefix, f'{type(error).__qualname__}: '):
            if last.startswith(name):
                return last[len(name):]
        return last
    return text


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logger = get_root_logger()
    # under torchrun only rank 0 reports progress, as in BasicSR
    logger.setLevel(logging.INFO if int(os.environ.get('RANK', 0)) == 0 else logging.ERROR)
    try:
        if args.command == 'prepare':
            prepare(args.dataset, args.source, args.out, scales=args.scales, seed=args.seed,
                    degradation=args.degradation, lmdb=args.lmdb, skip_bad=args.skip_bad, download=args.download,
                    progress=not args.no_progress)
        elif args.command == 'infer':
            infer(args.weights, args.input, args.output, opt_path=args.opt, arch_args=args.arch_args, tile=args.tile,
                  tile_pad=args.tile_pad, device=args.device, expert_map=args.expert_map, bands=args.bands,
                  block=args.block, progress=not args.no_progress)
        elif args.command == 'export':
            export(args.weights, args.out, fmt=args.fmt, opt_path=args.opt, arch_args=args.arch_args)
        elif args.command == 'bench':
            run_bench(args.sources, args.out, device=args.device, lr_size=args.lr_size, runs=args.runs,
                      per_class=args.per_class, expert_maps=args.expert_maps, force_yml=args.force_yml,
                      protocols=args.protocols or [DEFAULT_PROTOCOL], test_sets=args.test_sets or [],
                      metrics=[m for m in ('niqe', 'lpips') if getattr(args, m)])
        else:
            run_pipeline(args)
    except HmoeError as error:  # every refusal of this package: one line, the class's exit status
        logger.error(f'basicsr {args.command}: {one_line(error)}')
        return error.exit_status
    return 0


if __name__ == '__main__':
    sys.exit(main())
