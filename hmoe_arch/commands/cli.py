"""The ``basicsr`` console command of the plugin: ``basicsr {train,test,prepare,bench,infer,export}``.

``train`` and ``test`` run BasicSR's own pipelines (:mod:`hmoe_arch.commands.pipeline`); ``prepare``, ``bench``,
``infer`` and ``export`` are this plugin's (one module each under :mod:`hmoe_arch.commands`).

Start-up: this module imports only the standard library and :mod:`hmoe_arch.options`, so ``--help``, a bad
argument and an option file that cannot be used are answered before torch, basicsr, timm and OpenCV are
imported (seconds on a busy machine); each command imports what it needs once its input has passed those checks.

CPU threads: ``--num-threads N`` (or ``num_threads: N`` in an option file) sets torch's intra-op threads;
the default (``auto``) is :func:`hmoe_arch.threads.choose_num_threads`. On the CPU, every command but ``prepare``
has glibc keep freed memory for the next tensors (:func:`hmoe_arch.allocator.keep_freed_memory`).

Exit status: 0 on success, 2 on a bad argument, option, input or output location, 3 when training stopped
on a non-finite loss or gradient.
"""
import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import HmoeError
from ..options import check_max_memory, check_num_threads, precheck_option_file

DATASETS = ('aid', 'rsscn7', 'ucmerced', 'whurs19')
"""``basicsr prepare``'s data sets: :data:`hmoe_arch.commands.prepare.DATASETS`. This and the next tables name the
choices without importing the modules that implement them (torch, basicsr, OpenCV), so ``--help`` and argument
errors come at once; a test checks each against the implementing module's own table."""
DEGRADATIONS = ('bicubic', 'bilinear')
"""LR synthesis: :data:`hmoe_arch.data.degradations.DEGRADATIONS`."""
PROTOCOLS = ('basicsr-y', 'ttst-y', 'transenet-rgb', 'haunet-rgb')
"""Evaluation protocols: :data:`hmoe_arch.protocols.PROTOCOLS`."""
DEFAULT_PROTOCOL = 'basicsr-y'
"""``bench``'s default protocol: :data:`hmoe_arch.protocols.DEFAULT_PROTOCOL`."""
EXPORT_FORMATS = ('safetensors', 'onnx')
"""``basicsr export`` formats: :data:`hmoe_arch.commands.export.FORMATS`."""
LOG_FORMAT = '%(asctime)s %(levelname)s: %(message)s'
"""The format of basicsr's root logger (``basicsr.utils.logger.get_root_logger``), for messages written before
basicsr is imported."""


def num_threads_argument(text: str) -> Optional[int]:
    """``--num-threads``: ``auto`` or an integer >= 1."""
    try:
        return check_num_threads(text if text == 'auto' else int(text), key='--num-threads')
    except (ValueError, HmoeError):
        raise argparse.ArgumentTypeError(f'expected an integer >= 1 or auto, got {text!r}') from None


def max_memory_argument(text: str) -> float:
    """``--max-memory``: a number of GiB > 0."""
    try:
        return check_max_memory(float(text), key='--max-memory')
    except (ValueError, HmoeError):
        raise argparse.ArgumentTypeError(f'expected a number of GiB > 0, got {text!r}') from None


def add_max_memory(parser: argparse.ArgumentParser) -> None:
    """``--max-memory GIB`` of the commands that read weights (``infer``, ``export``, ``bench``)."""
    parser.add_argument('--max-memory', type=max_memory_argument, default=None, metavar='GIB',
                        help='refuse a network whose estimated memory (its parameters and buffers, plus one 64x64 '
                             'LR forward in float32) is above GIB (default 8, or the environment variable '
                             'HMOE_MAX_MEMORY_GIB); the check runs before anything is built (docs/inference.md)')


def add_num_threads(parser: argparse.ArgumentParser, option_file: bool = False) -> None:
    parser.add_argument('--num-threads', type=num_threads_argument, default=None, metavar='N',
                        help='CPU threads for torch (default auto: every core the machine has free, see '
                             'docs/performance.md)' + ('; overrides num_threads in the option file' if option_file
                                                       else ''))


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
    prep.add_argument('dataset', choices=DATASETS)
    prep.add_argument('--source', type=Path, default=None,
                      help='the published .zip archive or its extracted folder (with --download: where to save '
                           'the archive; default: the folder that holds --out)')
    prep.add_argument('--out', type=Path, required=True, help='output folder DIR (must not exist, be a finished '
                      'run with the same arguments, or a finished run without --lmdb, to which --lmdb adds the '
                      'LMDBs)')
    prep.add_argument('--scales', type=int, nargs='+', default=[2, 4], help='LR scales of the test split')
    prep.add_argument('--seed', type=int, default=0, help='split seed (0 gives the committed UCMerced split)')
    prep.add_argument('--degradation', choices=DEGRADATIONS, default='bicubic', help='LR synthesis')
    prep.add_argument('--lmdb', action='store_true', help='also write Train.lmdb, Test_HR.lmdb, Test_LR_x{s}.lmdb '
                      '(on a finished run made without it: added from its PNGs)')
    prep.add_argument('--skip-bad', action='store_true', help='skip unreadable or non-RGB files (listed in the '
                      'summary) instead of stopping')
    prep.add_argument('--download', action='store_true', help='fetch the official archive and verify its MD5')
    prep.add_argument('--no-progress', action='store_true', help='no progress bar')
    add_num_threads(prep)


def add_bench_parser(commands) -> None:
    """``basicsr bench``."""
    bench = commands.add_parser(
        'bench', help='evaluate models on their test split: PSNR/SSIM table, MACs, latency, memory, plot',
        description='Evaluate test option files or experiment folders (plus bicubic) and write bench.md, '
                    'bench.csv and bench_psnr_latency.png.')
    bench.add_argument('sources', nargs='+', type=Path, help='test option files (weights from '
                       'path.pretrain_network_g) or experiment folders (experiments/<name>)')
    bench.add_argument('--out', type=Path, default=Path('results/bench'), help='output folder')
    bench.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda where available)')
    bench.add_argument('--lr-size', type=int, default=64, help='LR side for MACs, latency and memory')
    bench.add_argument('--runs', type=int, default=5, help='timed forwards per model (median)')
    bench.add_argument('--per-class', action='store_true', help='also write bench_per_class.csv')
    bench.add_argument('--expert-maps', action='store_true', help='write expert maps and usage per scene class '
                       'for every MoE model')
    bench.add_argument('--force_yml', nargs='+', default=(), metavar='KEY:SUB=VALUE',
                       help='override options of every source (VALUE is YAML)')
    bench.add_argument('--protocol', dest='protocols', action='append', choices=PROTOCOLS, default=None,
                       help=f'how PSNR/SSIM are measured (repeatable, one table per protocol; default '
                            f'{DEFAULT_PROTOCOL}; see docs/protocols.md)')
    bench.add_argument('--test-set', dest='test_sets', action='append', type=Path, default=None, metavar='DIR',
                       help='evaluate on DIR/Test_HR and DIR/Test_LR_x<scale> (basicsr prepare\'s layout) instead '
                            'of each model\'s own test set (repeatable, one table per set)')
    bench.add_argument('--niqe', action='store_true', help='add NIQE of the SR images (no reference; BasicSR\'s)')
    bench.add_argument('--lpips', action='store_true', help='add LPIPS (AlexNet; needs the lpips extra and the '
                       'AlexNet weights already on disk: nothing is downloaded)')
    bench.add_argument('--no-progress', action='store_true', help='no progress bar')
    add_max_memory(bench)
    add_num_threads(bench)

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
                         help='import the installed package PACKAGE first so its BasicSR types register '
                              '(repeatable; the environment variable HMOE_ARCH_PLUGINS=PACKAGE,... does the same); '
                              'an option file\'s top-level `plugins: [PACKAGE]` is refused unless enabled this way; '
                              'HAT is imported by itself when the options name one of its types')
        if name == 'train':
            sub.add_argument('--auto_resume', action='store_true',
                             help='continue from the latest training state of this experiment, if any')
            sub.add_argument('--debug', action='store_true', help="BasicSR's debug mode (prefixes the name)")
        sub.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
        add_num_threads(sub, option_file=True)
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
    inf.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda where available)')
    inf.add_argument('--expert-map', action='store_true', help='also write <name>_experts.png (or a '
                     'georeferenced <name>_experts.tif for GeoTIFFs; MoE networks)')
    inf.add_argument('--bands', type=lambda text: [int(b) for b in text.split(',')], default=None,
                     metavar='R,G,B', help='GeoTIFF bands (1-based) to use as RGB, e.g. 3,2,1')
    inf.add_argument('--block', type=int, default=1024, help='GeoTIFF block side in LR pixels (bounds memory)')
    inf.add_argument('--no-progress', action='store_true', help='no progress bar')
    add_max_memory(inf)
    add_num_threads(inf)
    exp = commands.add_parser('export', help='write a checkpoint as .safetensors (with its network options) or ONNX',
                              description='write a checkpoint as .safetensors, with the network options in its '
                                          'metadata (readable by infer, load_pretrained and pretrain_network_g), or '
                                          'as ONNX with dynamic batch, height and width (checked with onnxruntime)')
    exp.add_argument('--weights', required=True, help='checkpoint file or https:// URL (#sha256=... to check it)')
    exp.add_argument('--format', dest='fmt', choices=EXPORT_FORMATS, default='safetensors')
    exp.add_argument('--out', type=Path, required=True, help='output file (must not exist)')
    exp.add_argument('-opt', type=Path, default=None, help='option file whose network_g builds the network '
                                                           '(default: read from the checkpoint)')
    exp.add_argument('--arch-args', nargs='+', default=(), metavar='KEY=VALUE', help='network_g overrides')
    add_max_memory(exp)
    add_num_threads(exp)
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


def report(message: str) -> None:
    """Log ``message`` as an error the way basicsr's root logger would, without importing basicsr when it is not
    imported yet (a refusal before the heavy imports)."""
    if 'basicsr.utils.logger' in sys.modules:
        from basicsr.utils import get_root_logger
        get_root_logger().error(message)
        return
    logger = logging.getLogger('basicsr')
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    try:
        logger.error(message)
    finally:
        logger.removeHandler(handler)


def precheck(args: argparse.Namespace) -> Optional[int]:
    """The checks that need neither torch nor basicsr; returns the ``--num-threads``/``num_threads`` asked for
    (None: auto)."""
    if args.command in ('train', 'test'):
        opt = precheck_option_file(args.opt, args.force_yml or (), is_train=args.command == 'train')
        if args.num_threads is None:
            return check_num_threads(opt.get('num_threads'))
    return args.num_threads


def run(args: argparse.Namespace, num_threads: Optional[int]) -> None:
    """Run the command (imports what it needs)."""
    import torch

    from ..allocator import keep_freed_memory
    from ..threads import apply_num_threads

    device = getattr(args, 'device', None) or ('cuda' if torch.cuda.is_available() else 'cpu')
    on_cpu = str(device).startswith('cpu') or not torch.cuda.is_available()
    threads, reason = apply_num_threads(num_threads, on_cpu=on_cpu)
    allocator = keep_freed_memory() if on_cpu and args.command != 'prepare' else None
    if args.command in ('train', 'test', 'bench'):
        from basicsr.utils import get_root_logger
        get_root_logger().info(f'torch uses {threads} CPU thread(s) ({reason}; --num-threads N to choose)')
        if allocator:
            get_root_logger().info(f'CPU memory: {allocator}')
    if args.command == 'prepare':
        from .prepare import prepare
        prepare(args.dataset, args.source, args.out, scales=args.scales, seed=args.seed, degradation=args.degradation,
                lmdb=args.lmdb, skip_bad=args.skip_bad, download=args.download, progress=not args.no_progress)
    elif args.command == 'infer':
        from .infer import infer
        infer(args.weights, args.input, args.output, opt_path=args.opt, arch_args=args.arch_args, tile=args.tile,
              tile_pad=args.tile_pad, device=device, expert_map=args.expert_map, bands=args.bands,
              block=args.block, progress=not args.no_progress, max_memory=args.max_memory)
    elif args.command == 'export':
        from .export import export
        export(args.weights, args.out, fmt=args.fmt, opt_path=args.opt, arch_args=args.arch_args,
               max_memory=args.max_memory)
    elif args.command == 'bench':
        from .bench import run_bench
        run_bench(args.sources, args.out, device=device, lr_size=args.lr_size, runs=args.runs,
                  per_class=args.per_class, expert_maps=args.expert_maps, force_yml=args.force_yml,
                  protocols=args.protocols or [DEFAULT_PROTOCOL], test_sets=args.test_sets or [],
                  metrics=[m for m in ('niqe', 'lpips') if getattr(args, m)], progress=not args.no_progress,
                  max_memory=args.max_memory)
    else:
        from .pipeline import run_pipeline
        run_pipeline(args)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        num_threads = precheck(args)
    except HmoeError as error:
        report(f'basicsr {args.command}: {one_line(error)}')
        return error.exit_status
    from basicsr.utils import get_root_logger

    logger = get_root_logger()
    # under torchrun only rank 0 reports progress, as in BasicSR
    logger.setLevel(logging.INFO if int(os.environ.get('RANK', 0)) == 0 else logging.ERROR)
    try:
        run(args, num_threads)
    except HmoeError as error:  # every refusal of this package: one line, the class's exit status
        logger.error(f'basicsr {args.command}: {one_line(error)}')
        return error.exit_status
    return 0


if __name__ == '__main__':
    sys.exit(main())
