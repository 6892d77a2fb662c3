"""``basicsr export``: a checkpoint as ``.safetensors`` (the network options in its metadata) or ONNX."""
import os
from pathlib import Path
from typing import Optional, Sequence

from basicsr.utils import get_root_logger

from .checkpoints import write_safetensors
from .infer import _options, load_network
from .options import OptionError, plain_options

FORMATS = ('safetensors',)


def export(weights: str, out: Path, *, fmt: str = 'safetensors', opt_path: Optional[Path] = None,
           arch_args: Sequence[str] = ()) -> Path:
    """Write the network of ``weights`` (a file or URL; its options from ``-opt``/``--arch-args`` or the
    checkpoint) to ``out`` in ``fmt``; the file appears complete or not at all.

    Raises:
        OptionError: for an unknown format, an existing ``out`` or weights that cannot be loaded.
    """
    if fmt not in FORMATS:
        raise OptionError(f'--format {fmt}: expected one of {", ".join(FORMATS)}')
    if out.exists():
        raise OptionError(f'--out {out}: already exists; choose another name (nothing is overwritten)')
    if out.suffix.lower() != f'.{fmt}':
        raise OptionError(f'--out {out}: expected a .{fmt} file name')
    network = _options(opt_path, ())[0] if opt_path is not None else None
    net = load_network(weights, network, 'cpu', overrides=arch_args)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f'.{out.name}.partial-{os.getpid()}')
    try:
        write_safetensors(net.state_dict(), partial, plain_options(net.network_options))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    get_root_logger().info(f'export: {out} ({fmt}, {sum(t.numel() for t in net.state_dict().values())} values)')
    return out
