"""``basicsr export``: a checkpoint as ``.safetensors`` (the network options in its metadata) or ONNX.

ONNX: the network is traced with PyTorch's TorchScript-based exporter (opset 17) with the batch, height and width
dynamic. The sparse expert dispatch has shapes that depend on the routing (the number of pixels per expert), so
the exported graph evaluates every expert on every pixel and masks the results
(:attr:`~hmoe_arch.archs.experts.HeterogeneousMoE.dense`, the authors' computation: same outputs, more
arithmetic). The network is wrapped in :class:`PaddedNetwork`, so the graph takes inputs of any height and width
>= 1: it pads them to multiples of ``window_size`` and crops the output exactly as PyTorch inference does
(:func:`hmoe_arch.tiling.padded_forward`). The file's ``metadata_props`` (:func:`onnx_metadata`) record the scale,
the window size, the network options, the tensor layout and value range and this package's version. When
onnxruntime is installed the file is checked against PyTorch on four input sizes, two of them not multiples of a
window size above 1, before it is kept (largest difference at most 1e-4). Needs the optional extra
``pip install -e .[export]`` (onnx, onnxruntime, safetensors).

Files appear complete or not at all, with the permissions ``open(out, 'w')`` would give them
(:func:`hmoe_arch.atomic.atomic_path`).
"""
import copy
import errno
import json
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from basicsr.utils import get_root_logger

from ..archs import MFGHMoEArch
from ..atomic import atomic_path
from ..checkpoints import write_safetensors
from ..errors import OptionError
from ..loading import load_network, measured_scale, network_options
from ..options import plain_options
from ..tiling import padded_forward, window_size_of

FORMATS = ('safetensors', 'onnx')
ONNX_TOLERANCE = 1e-4


def export(weights: str, out: Path, *, fmt: str = 'safetensors', opt_path: Optional[Path] = None,
           arch_args: Sequence[str] = (), max_memory: Optional[float] = None) -> Path:
    """Write the network of ``weights`` (a file or URL; its options from ``-opt``/``--arch-args`` or the
    checkpoint) to ``out`` in ``fmt``; the file appears complete or not at all. ``max_memory`` (GiB; None: the
    default) bounds the network's estimated memory (:func:`hmoe_arch.loading.load_network`).

    Raises:
        OptionError: for an unknown format, an existing ``out``, weights that cannot be loaded, a missing extra, an
            ONNX file whose outputs differ from PyTorch's, or an ``out`` that cannot be written (read-only or full
            file system, a name too long: :func:`write_refusal`).
    """
    if fmt not in FORMATS:
        raise OptionError(f'--format {fmt}: expected one of {", ".join(FORMATS)}')
    try:
        exists = out.exists()
    except OSError as error:  # a name too long, a folder that cannot be searched
        raise OptionError(f'--out {out}: cannot use it ({error.strerror or error})') from None
    if exists:
        raise OptionError(f'--out {out}: already exists; choose another name (nothing is overwritten)')
    if out.suffix.lower() != f'.{fmt}':
        raise OptionError(f'--out {out}: expected a .{fmt} file name')
    network = network_options(opt_path, ()) if opt_path is not None else None
    net = load_network(weights, network, torch.device('cpu'), overrides=arch_args, max_memory=max_memory)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as partial:
            if fmt == 'safetensors':
                write_safetensors(net.state_dict(), partial, plain_options(net.network_options))
                detail = f'{sum(t.numel() for t in net.state_dict().values())} values'
            else:
                detail = export_onnx(net, window_size_of(net, net.network_options), partial)
    except Exception as error:
        refusal = write_refusal(out, error)
        if refusal is None:
            raise
        raise refusal from None
    get_root_logger().info(f'export: {out} ({fmt}; {detail})')
    return out


def write_refusal(out: Path, error: Exception) -> Optional[OptionError]:
    """The one-line refusal for ``error``, raised while writing ``out``, when it is the file system's: an
    ``OSError`` (read-only or full file system, a name too long, no permission), or safetensors' own error for an
    I/O error (which carries the OS's reason in its message); ``None`` for other errors."""
    if isinstance(error, OSError):
        code, reason = error.errno, error.strerror or str(error)
    else:
        found = re.search(r'I/O error: (.+?) \(os error (\d+)\)', str(error))
        if found is None:
            return None
        reason, code = found.group(1), int(found.group(2))
    if code == errno.ENAMETOOLONG:  # the partial name (atomic_path) is longer than the name asked for
        reason += '; it is written under a temporary name about 15 characters longer first: choose a shorter name'
    return OptionError(f'--out {out}: cannot write it ({reason}); nothing was written')


class PaddedNetwork(torch.nn.Module):
    """``net`` on ``(B, C, H, W)`` inputs of any height and width >= 1: padded to multiples of ``window`` and its
    ``(B, C, H * scale, W * scale)`` output cropped by :func:`hmoe_arch.tiling.padded_forward` (what ``infer``,
    ``bench`` and the model's validation run), so that tracing records the padding and the crop in the graph."""

    def __init__(self, net: torch.nn.Module, scale: int, window: int) -> None:
        super().__init__()
        self.net, self.scale, self.window = net, scale, window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H * scale, W * scale)``."""
        return padded_forward(self.net, x, self.scale, self.window)


def onnx_metadata(net: torch.nn.Module, scale: int, window: int, in_chans: int) -> Dict[str, str]:
    """The ``metadata_props`` of an exported file (all strings): ``scale``, ``window_size``, ``network_g`` (the
    network options as JSON, as in a ``.safetensors`` export; present when ``net`` was built from options, as
    ``basicsr export`` does), ``layout``, ``channels``, ``dtype``, ``value_range``, ``input``, ``output`` and
    ``hmoe_arch_version``."""
    from .. import __version__
    channels = 'RGB' if in_chans == 3 else f'{in_chans} channels'
    metadata = {'scale': str(scale), 'window_size': str(window)}
    options = getattr(net, 'network_options', None)
    if options is not None:
        metadata['network_g'] = json.dumps(plain_options(options))
    metadata.update({
        'layout': 'NCHW', 'channels': channels, 'dtype': 'float32', 'value_range': '[0, 1]',
        'input': f'lr: float32 (batch, {in_chans}, height, width), {channels} in [0, 1]; any height and width >= 1 '
                 f'(padded inside the graph to multiples of {window})',
        'output': f'sr: float32 (batch, {in_chans}, height * {scale}, width * {scale}), {channels}, nominally in '
                  '[0, 1] (not clamped: clip before converting to integers)',
        'hmoe_arch_version': __version__})
    return metadata


def export_onnx(net: torch.nn.Module, window: int, path: Path) -> str:
    """Trace ``net`` (wrapped in :class:`PaddedNetwork`) to ONNX at ``path`` with :func:`onnx_metadata` (see the
    module docstring); returns what the check found.

    Raises:
        OptionError: when onnx is missing, the network's scale is not an integer, or onnxruntime's output differs
            from PyTorch's by more than ``ONNX_TOLERANCE``.
    """
    try:
        import onnx
    except ImportError:
        raise OptionError('--format onnx needs onnx: pip install -e .[export]') from None
    net = copy.deepcopy(net).eval()
    if isinstance(net, MFGHMoEArch) and net.moe:
        net.upsample.moe.dense = True
    in_chans = int(getattr(getattr(net, 'conv_first', None), 'in_channels', 3))
    scale = measured_scale(net, {'the network\'s upscale': getattr(net, 'upscale', getattr(net, 'scale', None))},
                           torch.device('cpu'), window, in_chans)
    padded = PaddedNetwork(net, scale, window).eval()
    side = window * max(1, -(-16 // window))
    example = torch.rand(1, in_chans, side, side)
    with warnings.catch_warnings():  # the tracer's notes on shape arithmetic; the check below is what counts
        warnings.simplefilter('ignore')
        torch.onnx.export(padded, (example,), str(path), input_names=['lr'], output_names=['sr'], opset_version=17,
                          dynamic_axes={'lr': {0: 'batch', 2: 'height', 3: 'width'},
                                        'sr': {0: 'batch', 2: 'out_height', 3: 'out_width'}}, dynamo=False)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, onnx_metadata(net, scale, window, in_chans))
    onnx.save(model, str(path))
    try:
        import onnxruntime
    except ImportError:
        return 'not checked: onnxruntime is not installed'
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    sizes = ((side, side), (side + window, 2 * side), (side + window // 2 + 1, 2 * side - 1), (1, 2))
    worst = 0.0
    for height, width in sizes:
        x = torch.rand(1, in_chans, height, width)
        with torch.no_grad():
            expected = padded(x).numpy()
        worst = max(worst, float(abs(session.run(None, {'lr': x.numpy()})[0] - expected).max()))
    if worst > ONNX_TOLERANCE:
        raise OptionError(f'the ONNX model differs from PyTorch by {worst:.2e} (more than {ONNX_TOLERANCE}); not kept')
    return f'checked with onnxruntime on {len(sizes)} sizes: largest difference {worst:.2e}'
