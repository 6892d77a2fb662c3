"""The ``basicsr`` console command of the plugin: ``basicsr prepare ...``.

Run ``basicsr -h`` or ``basicsr prepare -h`` for the flags. Exit status: 0 on success, 2 on a bad argument,
input or output location (the message names the file and what was expected).
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from basicsr.utils import get_root_logger

from .data.degradations import DEGRADATIONS
from .data.prepare import DATASETS, PrepareError, prepare


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='basicsr', description='MFG-HMoE (hmoe_arch) commands on top of BasicSR.')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    prep = commands.add_parser(
        'prepare', help='published UCMerced/AID archive or folder -> split lists, HR/LR PNGs and LMDBs',
        description='Split each class with the seeded rule, crop GT to a multiple of every scale, write '
                    'DIR/{train,test}.txt, DIR/Train, DIR/Test_HR, DIR/Test_LR_x{s} (and LMDBs) atomically.')
    prep.add_argument('dataset', choices=sorted(DATASETS))
    prep.add_argument('--source', type=Path, required=True,
                      help='the published .zip archive or its extracted folder (with --download: where to save '
                           'the archive)')
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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logger = get_root_logger()
    logger.setLevel(logging.INFO)
    if args.command == 'prepare':
        try:
            prepare(args.dataset, args.source, args.out, scales=args.scales, seed=args.seed,
                    degradation=args.degradation, lmdb=args.lmdb, skip_bad=args.skip_bad, download=args.download,
                    progress=not args.no_progress)
        except PrepareError as error:
            logger.error(f'basicsr prepare: {error}')
            return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
