"""``basicsr export``: a checkpoint as ``.safetensors`` (the network options in its metadata) or ONNX.

ONNX: the network is traced with PyTorch's TorchScript-based exporter (opset 17) with the batch, height and width
dynamic. The sparse expert dispatch has shapes that depend on the routing (the number of pixels per expert), so
the exported graph evaluates every expert on every pixel and masks the results
(:attr:`~hmoe_arch.archs.experts.HeterogeneousMoE.dense`, the authors' computation: same outputs, more
arithmetic). Input sides must be multiples of ``window_size``, as for the PyTorch network. When onnxruntime is
installed the file is checked against PyTorch on two input sizes before it is kept (largest difference at most
1e-4). Needs the optional extra ``pip install -e .[export]`` (onnx, onnxruntime, safetensors).
"""
import copy
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from basicsr.utils import get_root_logger

from ..archs import MFGHMoEArch
from ..checkpoints import write_safetensors
from ..errors import OptionError
from ..options import plain_options
from ..tiling import window_size_of
from .infer import load_network, network_options

FORMATS = ('safetensors', 'onnx')
ONNX_TOLERANCE = 1e-4


def export(weights: str, out: Path, *, fmt: str = 'safetensors', opt_path: Optional[Path] = None,
           arch_args: Sequence[str] = ()) -> Path:
    """Write the network of ``weights`` (a file or URL; its options from ``-opt``/``--arch-args`` or the
    checkpoint) to ``out`` in ``fmt``; the file appears complete or not at all.

    Raises:
        OptionError: for an unknown format, an existing ``out``, weights that cannot be loaded, a missing extra, or
            an ONNX file whose outputs differ from PyTorch's.
    """
    if fmt not in FORMATS:
        raise OptionError(f'--format {fmt}: expected one of {", ".join(FORMATS)}')
    if out.exists():
        raise OptionError(f'--out {out}: already exists; choose another name (nothing is overwritten)')
    if out.suffix.lower() != f'.{fmt}':
        raise OptionError(f'--out {out}: expected a .{fmt} file name')
    network = network_options(opt_path, ()) if opt_path is not None else None
    net = load_network(weights, network, torch.device('cpu'), overrides=arch_args)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f'.{out.stem}.partial-{os.getpid()}{out.suffix}')
    try:
        if fmt == 'safetensors':
            write_safetensors(net.state_dict(), partial, plain_options(net.network_options))
            detail = f'{sum(t.numel() for t in net.state_dict().values())} values'
        else:
            detail = export_onnx(net, window_size_of(net, net.network_options), partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    get_root_logger().info(f'export: {out} ({fmt}; {detail})')
    return out


def export_onnx(net: torch.nn.Module, window: int, path: Path) -> str:
    """Trace ``net`` to ONNX at ``path`` (see the module docstring); returns what the check found."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise OptionError('--format onnx needs onnx: pip install -e .[export]') from None
    net = copy.deepcopy(net).eval()
    if isinstance(net, MFGHMoEArch) and net.moe:
        net.upsample.moe.dense = True
    in_chans = int(getattr(getattr(net, 'conv_first', None), 'in_channels', 3))
    side = window * max(1, -(-16 // window))
    example = torch.rand(1, in_chans, side, side)
    with warnings.catch_warnings():  # the tracer's notes on shape arithmetic; the check below is what counts
        warnings.simplefilter('ignore')
        torch.onnx.export(net, (example,), str(path), input_names=['lr'], output_names=['sr'], opset_version=17,
                          dynamic_axes={'lr': {0: 'batch', 2: 'height', 3: 'width'},
                                        'sr': {0: 'batch', 2: 'out_height', 3: 'out_width'}}, dynamo=False)
    try:
        import onnxruntime
    except ImportError:
        return 'not checked: onnxruntime is not installed'
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    worst = 0.0
    for height, width in ((side, side), (side + window, 2 * side)):
        x = torch.rand(1, in_chans, height, width)
        with torch.no_grad():
            expected = net(x).numpy()
        worst = max(worst, float(abs(session.run(None, {'lr': x.numpy()})[0] - expected).max()))
    if worst > ONNX_TOLERANCE:
        raise OptionError(f'the ONNX model differs from PyTorch by {worst:.2e} (more than {ONNX_TOLERANCE}); not kept')
    return f'checked with onnxruntime on two sizes: largest difference {worst:.2e}'
