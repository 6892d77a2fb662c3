"""Checkpoint files: .safetensors with the network options, export (safetensors, ONNX of any input size with its
metadata, the docs' onnxruntime snippet), weights from a URL (a SHA-256 check, one cached copy per URL, a timeout
and a size cap, no partial download left behind, a warning with the hash to pin), the permissions of written
files, networks rebuilt from checkpoints alone (ours, the authors', HAT's), and a checkpoint given as a loaded
dict, a path or a URL, the state_dict inside it and the part of it that fits a network."""
import errno
import functools
import hashlib
import http.server
import json
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import hmoe_arch
from hmoe_arch import MFGHMoEArch
from hmoe_arch.checkpoints import (
    UNNAMED,
    LoadReport,
    check_stored_values,
    check_tensor_values,
    fetch_weights,
    local_checkpoint,
    match_state_dict,
    nonfinite_keys,
    plain_file_mode,
    read_checkpoint,
    read_checkpoint_file,
    source_name,
    state_dict_of,
    write_safetensors,
)
from hmoe_arch.commands.cli import main
from hmoe_arch.commands.infer import infer, read_rgb
from hmoe_arch.errors import CheckpointError
from hmoe_arch.loading import load_network, local_weights
from hmoe_arch.tiling import padded_forward

from util import HAT_RGB_MEAN, SMALL_GROUPS, docs_block, load_reference, tiny, ucmerced_mini, write_image

pytest.importorskip('safetensors', reason='safetensors is not installed (pip install -e .[export])')

OURS = tiny(upscale=2, top_k=2, rgb_mean=[0.5, 0.4, 0.3], img_range=2.0,
            expert_groups=[{'kernel_size': 1, 'num_experts': 2}, {'kernel_size': 3, 'num_experts': 2}])


INFERENCE_DOCS = Path(__file__).resolve().parents[1] / 'docs' / 'inference.md'


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    """The process umask 0o027 for the test; yields the mode ``open(path, 'w')`` then gives (0o640, neither the
    0o600 of a private temporary file nor the usual 0o644)."""
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


@pytest.fixture
def ours(tmp_path: Path) -> Path:
    """A checkpoint as MFGHMoEModel writes it: params, params_ema and network_g."""
    net = MFGHMoEArch(**OURS)
    path = tmp_path / 'net_g_latest.pth'
    torch.save({'params': net.state_dict(), 'params_ema': net.state_dict(), 'network_g': {'type': 'MFGHMoEArch',
                                                                                          **OURS}}, path)
    return path


@pytest.mark.parametrize('label', ['ours', 'tiny_authors_x2', 'tiny_hat_x2', 'official_mfghmoe_x4', 'hat_x4'])
def test_infer_rebuilds_each_origin_from_the_checkpoint_alone(ours: Path, tmp_path: Path, label: str) -> None:
    write_image(tmp_path / 'in.png', 16, 16, 1)
    path, options = ours, OURS
    if label != 'ours':
        ref = load_reference(label)
        path = tmp_path / f'{label}.pth'
        torch.save({'params': ref['state_dict']}, path)
        options = ref['config'] if 'hat' not in label else {**ref['config'], 'moe': False, 'mfa': False,
                                                            'rgb_mean': HAT_RGB_MEAN}
    net = load_network(path, None, torch.device('cpu'))
    expected = MFGHMoEArch(**options).eval()
    expected.load_state_dict(torch.load(path, weights_only=True)['params'])
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected(x), msg=label)
    written = infer(path, tmp_path / 'in.png', tmp_path / f'{label}_sr.png', progress=False)
    assert cv2.imread(str(written[0])).shape[0] == 16 * options['upscale']


def test_export_safetensors_round_trip(ours: Path, tmp_path: Path, basicsr_log) -> None:
    out = tmp_path / 'model.safetensors'
    assert main(['export', '--weights', str(ours), '--out', str(out)]) == 0
    checkpoint = read_checkpoint_file(out)
    original = torch.load(ours, weights_only=True)
    assert checkpoint['network_g']['top_k'] == 2 and checkpoint['network_g']['rgb_mean'] == [0.5, 0.4, 0.3]
    assert set(checkpoint['params_ema']) == set(original['params_ema'])
    assert all(torch.equal(checkpoint['params_ema'][k], v) for k, v in original['params_ema'].items())
    net = MFGHMoEArch(**OURS)
    assert net.load_pretrained(out, strict=True).unused == []
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_network(out, None, torch.device('cpu'))(x),
                                   load_network(ours, None, torch.device('cpu'))(x))
    assert main(['export', '--weights', str(ours), '--out', str(out)]) == 2
    assert 'already exists; choose another name (nothing is overwritten)' in basicsr_log[-1]


def test_export_names_a_name_too_long_in_one_line(ours: Path, tmp_path: Path, basicsr_log) -> None:
    out = tmp_path / 'out' / ('m' * 240 + '.safetensors')  # a valid name, but its temporary name is too long
    assert main(['export', '--weights', str(ours), '--out', str(out)]) == 2
    assert basicsr_log[-1] == (f'basicsr export: --out {out}: cannot write it (File name too long; it is written '
                               'under a temporary name about 15 characters longer first: choose a shorter name); '
                               'nothing was written')
    assert list((tmp_path / 'out').iterdir()) == []
    out = tmp_path / ('m' * 256 + '.safetensors')
    assert main(['export', '--weights', str(ours), '--out', str(out)]) == 2
    assert basicsr_log[-1] == f'basicsr export: --out {out}: cannot use it (File name too long)'


@pytest.mark.parametrize('fmt, error, reason', [
    ('safetensors', OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 'No space left on device'),
    ('safetensors', 'SafetensorError', 'Read-only file system'),
    ('onnx', PermissionError(errno.EACCES, os.strerror(errno.EACCES)), 'Permission denied'),
])
def test_export_to_a_full_or_read_only_location_is_refused_in_one_line(
        ours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, basicsr_log, fmt: str, error, reason: str) -> None:
    import safetensors

    import hmoe_arch.commands.export as export_module
    if error == 'SafetensorError':  # what safetensors raises for an OS error
        error = safetensors.SafetensorError('Error while serializing: I/O error: Read-only file system (os error 30)')

    def failing(*args) -> None:
        Path(args[-1] if fmt == 'onnx' else args[1]).write_bytes(b'half a file')
        raise error

    monkeypatch.setattr(export_module, 'export_onnx' if fmt == 'onnx' else 'write_safetensors', failing)
    out = tmp_path / 'out' / f'model.{fmt}'
    assert main(['export', '--weights', str(ours), '--format', fmt, '--out', str(out)]) == 2
    assert basicsr_log[-1] == f'basicsr export: --out {out}: cannot write it ({reason}); nothing was written'
    assert list((tmp_path / 'out').iterdir()) == []


def test_safetensors_initialise_training(ours: Path, tmp_path: Path) -> None:
    from basicsr.models import build_model
    write_safetensors(MFGHMoEArch(**OURS).state_dict(), tmp_path / 'init.safetensors', {'type': 'MFGHMoEArch'})
    opt = {'name': 'unit', 'model_type': 'MFGHMoEModel', 'scale': 2, 'num_gpu': 0, 'dist': False, 'rank': 0,
           'world_size': 1, 'is_train': False, 'network_g': {'type': 'MFGHMoEArch', **OURS},
           'path': {'pretrain_network_g': str(tmp_path / 'init.safetensors'), 'strict_load_g': True,
                    'param_key_g': 'params_ema'}, 'val': {}}
    model = build_model(opt)
    expected = read_checkpoint_file(tmp_path / 'init.safetensors')['params_ema']
    assert all(torch.equal(model.net_g.state_dict()[k], v) for k, v in expected.items())


def test_missing_safetensors_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / 'w.safetensors').write_bytes(b'x')
    monkeypatch.setitem(__import__('sys').modules, 'safetensors', None)
    with pytest.raises(CheckpointError, match=r'^.safetensors files need the safetensors package: pip install -e '
                                              r'.\[export\]$'):
        read_checkpoint_file(tmp_path / 'w.safetensors')


@pytest.fixture
def server(tmp_path: Path):
    """A local HTTP server over ``tmp_path / 'served'`` (these machines have no internet); yields its base URL, that
    folder and the list of requested paths. Paths under ``/silent/`` never get an answer (until the test ends),
    those under ``/stream/`` get up to 64 MiB of zeros without a ``Content-Length``."""
    folder = tmp_path / 'served'
    folder.mkdir()
    requests = []
    released = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            requests.append(self.path)

        def do_GET(self) -> None:
            if self.path.startswith('/silent/'):  # accepts the request and never answers
                released.wait(30)
            elif self.path.startswith('/stream/'):  # up to 64 MiB of zeros, with no Content-Length
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(1024):
                        self.wfile.write(bytes(1 << 16))
                except OSError:  # the client hung up
                    pass
            else:
                super().do_GET()

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.01}, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}', folder, requests
    released.set()
    httpd.shutdown()
    httpd.server_close()


def test_weights_from_a_url_are_cached_and_checked(ours: Path, tmp_path: Path, server) -> None:
    base, folder, requests = server
    (folder / 'w.pth').write_bytes(ours.read_bytes())
    digest = hashlib.sha256(ours.read_bytes()).hexdigest()
    cache = tmp_path / 'cache'
    first = fetch_weights(f'{base}/w.pth#sha256={digest}', cache)
    assert first.read_bytes() == ours.read_bytes()
    assert fetch_weights(f'{base}/w.pth#sha256={digest}', cache) == first
    assert len([r for r in requests if 'w.pth' in r]) == 1  # the second call used the cache
    with pytest.raises(CheckpointError, match=f'the downloaded file has SHA-256 {digest}, not {"0" * 64}; it was '
                                              'not kept'):
        fetch_weights(f'{base}/w.pth#sha256={"0" * 64}', cache)
    assert sorted(p.name for p in cache.iterdir()) == [first.name]
    with pytest.raises(CheckpointError, match='cannot download it'):
        fetch_weights(f'{base}/missing.pth', cache)
    with pytest.raises(CheckpointError, match='the part after # must be sha256=<64 hex digits>'):
        fetch_weights(f'{base}/w.pth#md5=abc', cache)
    first.write_bytes(b'changed')  # a pinned copy in the cache that no longer matches is refused, not used
    with pytest.raises(CheckpointError, match=rf'^{base}/w.pth#sha256={digest}: the cached copy {first} has SHA-256 '
                                              rf'{hashlib.sha256(b"changed").hexdigest()}, not {digest}; remove it to '
                                              r'download again$'):
        fetch_weights(f'{base}/w.pth#sha256={digest}', cache)


def test_urls_with_the_same_file_name_are_cached_apart(tmp_path: Path, server) -> None:
    base, folder, requests = server
    weights = {}
    for name, value in [('a', 1.0), ('b', 2.0), ('b/c', 3.0)]:
        (folder / name).mkdir()
        weights[name] = {'params': {'conv.weight': torch.full((2,), value)}}
        torch.save(weights[name], folder / name / 'net.pth')
    cache = tmp_path / 'cache'
    fetched = {name: fetch_weights(f'{base}/{name}/net.pth', cache) for name in weights}
    assert len(set(fetched.values())) == 3
    for name, path in fetched.items():
        assert path.parent == cache and path.name.endswith('-net.pth')  # still recognisable by its file name
        assert torch.equal(read_checkpoint_file(path)['params']['conv.weight'], weights[name]['params']['conv.weight'])
    assert fetch_weights(f'{base}/a/net.pth', cache) == fetched['a']  # the cache is still used per URL
    assert fetch_weights(f'{base}/a/net.pth?v=2', cache) != fetched['a']  # the query is part of the URL
    assert len([r for r in requests if r.startswith('/a/net.pth')]) == 2
    digest = hashlib.sha256((folder / 'b' / 'net.pth').read_bytes()).hexdigest()
    pinned = fetch_weights(f'{base}/b/net.pth#sha256={digest}', cache)
    assert pinned != fetched['b'] and pinned.read_bytes() == fetched['b'].read_bytes()
    found = hashlib.sha256((folder / 'a' / 'net.pth').read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match=f'the downloaded file has SHA-256 {found}, not {digest}; it was not'):
        fetch_weights(f'{base}/a/net.pth#sha256={digest}', cache)  # b's hash does not vouch for a's file


def test_a_download_that_gets_no_answer_times_out(tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, _ = server
    monkeypatch.setenv('HMOE_DOWNLOAD_TIMEOUT', '0.5')
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=rf'^{base}/silent/w.pth: cannot download it \(no answer within 0.5 s; '
                                              r'HMOE_DOWNLOAD_TIMEOUT sets the limit\)$'):
        fetch_weights(f'{base}/silent/w.pth', tmp_path / 'cache')
    assert time.monotonic() - started < 10
    assert list((tmp_path / 'cache').iterdir()) == []
    for bad in ['0', '-1', 'abc', 'nan']:
        monkeypatch.setenv('HMOE_DOWNLOAD_TIMEOUT', bad)
        with pytest.raises(CheckpointError, match=rf"^{base}/w.pth: the environment variable HMOE_DOWNLOAD_TIMEOUT "
                                                  rf"must be a number of seconds > 0, got '{bad}'$"):
            fetch_weights(f'{base}/w.pth', tmp_path / 'cache')


def test_a_download_over_the_size_cap_is_stopped(ours: Path, tmp_path: Path, server,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    base, folder, _ = server
    cache = tmp_path / 'cache'
    monkeypatch.setenv('HMOE_DOWNLOAD_MAX_BYTES', '100000')
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=rf'^{base}/stream/w.pth: the download passed 100000 bytes, the '
                                              r'limit HMOE_DOWNLOAD_MAX_BYTES sets; it was stopped and not kept$'):
        fetch_weights(f'{base}/stream/w.pth', cache)
    assert time.monotonic() - started < 10
    assert list(cache.iterdir()) == []
    (folder / 'big.pth').write_bytes(bytes(100001))  # a Content-Length over the cap: refused before reading
    with pytest.raises(CheckpointError, match=rf'^{base}/big.pth: the server announces 100001 bytes, more than the '
                                              r'100000 HMOE_DOWNLOAD_MAX_BYTES allows; it was not downloaded$'):
        fetch_weights(f'{base}/big.pth', cache)
    assert list(cache.iterdir()) == []
    (folder / 'w.pth').write_bytes(ours.read_bytes())
    monkeypatch.setenv('HMOE_DOWNLOAD_MAX_BYTES', str(ours.stat().st_size))  # exactly at the cap: fine
    assert fetch_weights(f'{base}/w.pth', cache).read_bytes() == ours.read_bytes()
    monkeypatch.setenv('HMOE_DOWNLOAD_MAX_BYTES', '1.5')
    with pytest.raises(CheckpointError, match=r"HMOE_DOWNLOAD_MAX_BYTES must be a whole number of bytes > 0, got "
                                              r"'1.5'$"):
        fetch_weights(f'{base}/w.pth', cache)


def test_an_interrupted_download_leaves_nothing(tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, _ = server
    opened = urllib.request.urlopen
    chunks = []

    def interrupted(*args, **kwargs):
        response = opened(*args, **kwargs)
        read = response.read

        def read_then_stop(size: int = -1) -> bytes:
            if chunks:
                raise KeyboardInterrupt
            chunks.append(read(size))
            return chunks[-1]
        response.read = read_then_stop
        return response

    monkeypatch.setattr(urllib.request, 'urlopen', interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_weights(f'{base}/stream/w.pth', tmp_path / 'cache')
    assert chunks and chunks[0] and list((tmp_path / 'cache').iterdir()) == []


def test_partial_downloads_of_killed_runs_are_removed(ours: Path, tmp_path: Path, server) -> None:
    base, folder, _ = server
    (folder / 'w.pth').write_bytes(ours.read_bytes())
    cache = tmp_path / 'cache'
    target = fetch_weights(f'{base}/w.pth', cache)
    target.unlink()
    finished = subprocess.Popen(['true'])
    finished.wait()  # a process id that is no longer running: a run killed mid-download
    killed = cache / f'.{target.stem}.partial-{finished.pid}.pth'
    running = cache / f'.{target.stem}.partial-{os.getppid()}.pth'  # another run still downloading: left alone
    other = cache / f'.other.partial-{finished.pid}.pth'  # a partial download of another URL
    for path in (killed, running, other):
        path.write_bytes(b'half a checkpoint')
    assert fetch_weights(f'{base}/w.pth', cache).read_bytes() == ours.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, running.name, other.name])


def test_infer_takes_a_url(ours: Path, tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch,
                           basicsr_records) -> None:
    base, folder, _ = server
    (folder / 'w.pth').write_bytes(ours.read_bytes())
    digest = hashlib.sha256(ours.read_bytes()).hexdigest()
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    write_image(tmp_path / 'in.png', 16, 16, 1)
    assert main(['infer', '--weights', f'{base}/w.pth', '--input', str(tmp_path / 'in.png'), '--output',
                 str(tmp_path / 'out.png'), '--no-progress']) == 0
    assert [p.name[-6:] for p in (tmp_path / 'hub' / 'checkpoints').iterdir()] == ['-w.pth']
    assert (tmp_path / 'out.png').is_file()
    warnings = [message for level, message in basicsr_records if level == logging.WARNING]
    assert warnings == [f'--weights {base}/w.pth is not pinned to its content: append #sha256={digest} to the URL '
                        'to check the download on every use']
    assert main(['infer', '--weights', f'{base}/w.pth#sha256={digest}', '--input', str(tmp_path / 'in.png'),
                 '--output', str(tmp_path / 'out2.png'), '--no-progress']) == 0
    assert [level for level, _ in basicsr_records].count(logging.WARNING) == 1  # a pinned URL: no warning
    assert local_weights(f'{base}/w.pth').read_bytes() == ours.read_bytes()
    assert [level for level, _ in basicsr_records].count(logging.WARNING) == 1  # each URL is named once a process


@pytest.mark.parametrize('config', [tiny(upscale=2, window_size=8, img_size=32),
                                    tiny(upscale=3, routing='single', attention='plain'),
                                    tiny(moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN, upscale=4)], ids=range(3))
@pytest.mark.slow
def test_onnx_export_takes_any_input_size_and_matches_pytorch(config: dict, tmp_path: Path, umask_027: int) -> None:
    onnxruntime = pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (pip install -e .[export])')
    net = MFGHMoEArch(**config).eval()
    torch.save({'params': net.state_dict(), 'network_g': {'type': 'MFGHMoEArch', **config}}, tmp_path / 'w.pth')
    assert main(['export', '--weights', str(tmp_path / 'w.pth'), '--format', 'onnx', '--out',
                 str(tmp_path / 'w.onnx')]) == 0
    assert mode_of(tmp_path / 'w.onnx') == umask_027
    session = onnxruntime.InferenceSession(str(tmp_path / 'w.onnx'), providers=['CPUExecutionProvider'])
    window, scale = config['window_size'], config['upscale']
    # 37x53: neither side a multiple of the window (padded by reflection); 3x1: too small to reflect (replicated)
    for batch, height, width in [(1, 37, 53), (2, 64, 64), (2, 2 * window, 3 * window), (1, 3, 1)]:
        x = torch.rand(batch, 3, height, width)
        with torch.no_grad():
            expected = padded_forward(net, x, scale, window).numpy()
        out = session.run(None, {'lr': x.numpy()})[0]
        assert out.shape == expected.shape == (batch, 3, height * scale, width * scale)
        assert abs(out - expected).max() <= 1e-4, (height, width)


@pytest.mark.slow
def test_onnx_metadata_reads_back_with_onnx_load(ours: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip('onnx', reason='onnx is not installed (pip install -e .[export])')
    assert main(['export', '--weights', str(ours), '--format', 'onnx', '--out', str(tmp_path / 'w.onnx')]) == 0
    assert main(['export', '--weights', str(ours), '--out', str(tmp_path / 'w.safetensors')]) == 0
    metadata = {entry.key: entry.value for entry in onnx.load(str(tmp_path / 'w.onnx')).metadata_props}
    network = json.loads(metadata.pop('network_g'))
    assert network == read_checkpoint_file(tmp_path / 'w.safetensors')['network_g']  # the same options
    assert {key: network[key] for key in OURS} == OURS and network['type'] == 'MFGHMoEArch'
    assert metadata == {
        'scale': '2', 'window_size': '4', 'layout': 'NCHW', 'channels': 'RGB', 'dtype': 'float32',
        'value_range': '[0, 1]',
        'input': 'lr: float32 (batch, 3, height, width), RGB in [0, 1]; any height and width >= 1 (padded inside '
                 'the graph to multiples of 4)',
        'output': 'sr: float32 (batch, 3, height * 2, width * 2), RGB, nominally in [0, 1] (not clamped: clip '
                  'before converting to integers)',
        'hmoe_arch_version': hmoe_arch.__version__}


@pytest.mark.slow
def test_the_docs_onnxruntime_snippet_super_resolves_a_ucmerced_image(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (pip install -e .[export])')
    image = ucmerced_mini() / 'Images' / 'golfcourse' / 'golfcourse07.tif'  # 256 x 251: not a multiple of 4
    code = docs_block('inference.md', 'python', 'onnxruntime.InferenceSession')
    assert "'model.onnx'" in code and "'input.tif'" in code and "'input_SR.png'" in code
    config = tiny(upscale=2, expert_groups=SMALL_GROUPS)  # the ONNX graph evaluates every expert: keep them few
    net = MFGHMoEArch(**config).eval()
    torch.save({'params_ema': net.state_dict(), 'network_g': {'type': 'MFGHMoEArch', **config}}, tmp_path / 'w.pth')
    assert main(['export', '--weights', str(tmp_path / 'w.pth'), '--format', 'onnx', '--out',
                 str(tmp_path / 'model.onnx')]) == 0
    shutil.copyfile(image, tmp_path / 'input.tif')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f'{INFERENCE_DOCS} (onnxruntime snippet)', 'exec'), {'__name__': 'docs_snippet'})
    written = cv2.imread(str(tmp_path / 'input_SR.png'))[..., ::-1]
    lr = torch.from_numpy(read_rgb(image).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        expected = padded_forward(net, lr, 2, 4)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    assert written.shape == expected.shape == (251 * 2, 256 * 2, 3)
    assert np.abs(written.astype(np.int16) - expected).max() <= 1


def test_written_files_get_the_mode_a_plain_open_gives(ours: Path, tmp_path: Path, server, umask_027: int) -> None:
    assert plain_file_mode() == umask_027
    assert main(['export', '--weights', str(ours), '--out', str(tmp_path / 'model.safetensors')]) == 0
    base, folder, _ = server
    (folder / 'w.pth').write_bytes(ours.read_bytes())
    downloaded = fetch_weights(f'{base}/w.pth', tmp_path / 'cache')
    write_image(tmp_path / 'in.png', 16, 16, 1)
    assert main(['infer', '--weights', str(ours), '--input', str(tmp_path / 'in.png'), '--output',
                 str(tmp_path / 'out.png'), '--expert-map', '--no-progress']) == 0
    written = [tmp_path / 'model.safetensors', downloaded, tmp_path / 'out.png', tmp_path / 'out_experts.png']
    assert {path.name: oct(mode_of(path)) for path in written} == {path.name: oct(umask_027) for path in written}


def test_state_dict_of_picks_the_entry_and_strips_data_parallel_prefixes() -> None:
    ema, plain = {'conv.weight': torch.ones(2)}, {'module.conv.weight': torch.zeros(2)}
    assert state_dict_of({'params': plain, 'params_ema': ema}, 'params_ema') == ema
    picked = state_dict_of({'params': plain, 'params_ema': ema}, 'params_g')  # missing entry: params first
    assert list(picked) == ['conv.weight'] and torch.equal(picked['conv.weight'], torch.zeros(2))
    assert state_dict_of({'params_ema': ema}) == ema
    assert list(state_dict_of(plain)) == ['conv.weight']  # a bare state_dict
    with pytest.raises(CheckpointError, match=r"^w.pth: expected a state_dict \(parameter names -> tensors\) or a dict "
                                              r"with a `params` \(or `params`, `params_ema`\) state_dict, found the "
                                              r"entries \['epoch', 'params'\]$"):
        state_dict_of({'epoch': 3, 'params': [1, 2]}, source='w.pth')
    with pytest.raises(CheckpointError, match=r'^<state_dict>: expected a state_dict .* found a list$'):
        state_dict_of([torch.zeros(1)])
    with pytest.raises(CheckpointError, match=r'found the entries \[\]'):
        state_dict_of({})


def test_read_checkpoint_takes_a_loaded_checkpoint_a_path_or_a_url(ours: Path, tmp_path: Path, server,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = {'params': {'conv.weight': torch.zeros(1)}}
    assert read_checkpoint(loaded) is loaded and source_name(loaded) == UNNAMED
    assert source_name(ours) == str(ours) and local_checkpoint(ours) == ours
    from_file = read_checkpoint(ours)
    assert from_file['network_g']['top_k'] == 2 and set(from_file) == {'params', 'params_ema', 'network_g'}
    with pytest.raises(FileNotFoundError, match=r'^checkpoint not found: .*nope.pth$'):
        read_checkpoint(tmp_path / 'nope.pth')
    base, folder, _ = server
    (folder / 'w.pth').write_bytes(ours.read_bytes())
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    cached = local_checkpoint(f'{base}/w.pth')
    assert cached.parent == tmp_path / 'hub' / 'checkpoints' and cached.name.endswith('-w.pth')
    assert read_checkpoint(f'{base}/w.pth')['network_g'] == from_file['network_g']
    report = MFGHMoEArch(**OURS).load_pretrained(f'{base}/w.pth', param_key='params_ema', strict=True)
    assert report.unused == [] and report.kept_init == []
    with pytest.raises(CheckpointError, match='cannot download it'):
        read_checkpoint(f'{base}/missing.pth')


def test_match_state_dict_takes_what_fits_and_reports_the_rest() -> None:
    own = {'a.w': torch.zeros(2), 'a.b': torch.zeros(2), 'b.w': torch.zeros(3), 'c.x.w': torch.zeros(1),
           'c.y.w': torch.zeros(1)}
    state = {'a.w': torch.ones(2), 'b.w': torch.ones(4), 'd': torch.ones(1), 'c.x.w': torch.ones(1)}
    accepted, report = match_state_dict(own, state)
    assert list(accepted) == ['a.w', 'c.x.w'] and all(torch.equal(accepted[k], state[k]) for k in accepted)
    assert report == LoadReport(loaded=['a.w', 'c.x.w'], kept_init=['a.b', 'b', 'c.y'],
                                unused=['b.w [4] (network has [3])', 'd [1] (no such tensor in this network)'])
    assert report.summary() == ('Kept their initialisation: a.b, b, c.y\nCheckpoint tensors not used:\n'
                                '  b.w [4] (network has [3])\n  d [1] (no such tensor in this network)')
    assert LoadReport(loaded=['a.w']).summary() == 'Kept their initialisation: none\nCheckpoint tensors not used: none'


# ------------------------------------------------------------------------------------------------------
# tensors that are not what they claim
def test_a_view_larger_than_what_the_file_stores_is_refused_before_use(tmp_path: Path) -> None:
    torch.save({'params': {'conv_first.weight': torch.zeros(1).expand(300_000_000)}}, tmp_path / 'expand.pth')
    assert (tmp_path / 'expand.pth').stat().st_size < 4096  # a few hundred pickle bytes, 3e8 values
    with pytest.raises(CheckpointError, match=r'expand.pth: conv_first.weight shows 300,000,000 values \[300000000\] '
                                              r'but stores 1 \(a broadcast or overlapping view\); refused before its '
                                              r'values are used$'):
        state_dict_of(read_checkpoint_file(tmp_path / 'expand.pth'), 'params', str(tmp_path / 'expand.pth'))
    overlapping = torch.zeros(199).as_strided((100, 100), (1, 1))
    with pytest.raises(CheckpointError, match=r'^<state_dict>: w shows 10,000 values \[100, 100\] but stores 199 '):
        state_dict_of({'w': overlapping})
    storage = torch.zeros(1000)
    views = {f'v{i}': storage[i:] for i in range(10)}  # each fits its storage, together ten times it
    with pytest.raises(CheckpointError, match=r'^<state_dict>: its tensors show 39,820 bytes of values but store '
                                              r'4,000 \(views of shared storages\)'):
        check_stored_values(views)
    check_stored_values({'a': storage, 'tied': storage, 'part': storage[:10]})  # tied weights and slices are fine


@pytest.mark.filterwarnings('ignore:Validating sparse tensor invariants')  # torch's note on loading one
def test_tensors_that_are_not_plain_dense_values_are_refused(tmp_path: Path) -> None:
    sparse = torch.sparse_coo_tensor(torch.zeros(2, 1, dtype=torch.long), torch.ones(1), (100000, 100000))
    torch.save({'w': sparse, 'm': torch.empty(10 ** 12, device='meta')}, tmp_path / 'odd.pth')
    loaded = torch.load(tmp_path / 'odd.pth', weights_only=True)
    with pytest.raises(CheckpointError, match=r'^<state_dict>: w is a Tensor \(torch.sparse_coo\) tensor; expected a '
                                              r'plain dense tensor of values$'):
        check_stored_values({'w': loaded['w']})
    with pytest.raises(CheckpointError, match=r'^<state_dict>: m is a meta tensor'):
        check_stored_values({'m': loaded['m']})


def test_nonfinite_keys_checks_in_chunks_without_a_full_size_temporary() -> None:
    late = torch.zeros(7, 5, 3)
    late[6, 4, 2] = float('nan')
    strided = torch.zeros(6, 40).t()  # not contiguous
    strided[39, 5] = float('inf')
    state = {'late': late, 'strided': strided, 'fine': torch.ones(50), 'index': torch.arange(9),
             'empty': torch.zeros(0, 3), 'scalar': torch.tensor(float('-inf'))}
    for chunk in (1, 4, 16, 1 << 22):
        assert nonfinite_keys(state, chunk=chunk) == ['late', 'strided', 'scalar']
    checked = []
    real = torch.isfinite
    try:
        torch.isfinite = lambda t: checked.append(t.numel()) or real(t)
        assert nonfinite_keys({'w': torch.zeros(1000, 100)}, chunk=300) == []
    finally:
        torch.isfinite = real
    assert max(checked) <= 300 and sum(checked) == 100_000


def test_values_of_another_kind_and_changed_index_buffers_are_refused_naming_the_key() -> None:
    net = MFGHMoEArch(**OURS)
    own = net.state_dict()
    for key, value, message in (
            ('conv_first.weight', own['conv_first.weight'].long(), r'a torch.int64 tensor \(integer values\) where the '
             r'network expects floating point values \(torch.float32\)$'),
            ('conv_last.bias', torch.ones(3, dtype=torch.bool), r'a torch.bool tensor \(boolean values\)'),
            ('norm.weight', own['norm.weight'].to(torch.complex64), r'a torch.complex64 tensor \(complex values\)'),
            ('relative_position_index_SA', own['relative_position_index_SA'].float(), r'a torch.float32 tensor'),
            ('relative_position_index_SA',
             own['relative_position_index_SA'].clone().index_fill_(1, torch.tensor([3]), -5),
             r'holds -5 at \[0, 3\], a negative index \(the network has \d+\); '
             r'this buffer follows from the window sizes and is never learned$'),
            ('relative_position_index_OCA', own['relative_position_index_OCA'] + 10 ** 6,
             r'holds 999990 at \[0, 0\], a value out of range \(the network has -10\)')):
        state = {**own, key: value}
        with pytest.raises(CheckpointError, match=rf'^w.pth: {key} is refused: {message}'):
            check_tensor_values(own, state, 'w.pth')
        accepted, report = match_state_dict(own, {key: value})
        assert not accepted and report.unused[0].startswith(f'{key} {list(value.shape)} (') and 'network' in \
            report.unused[0]
    check_tensor_values(own, {**own, 'conv_first.weight': own['conv_first.weight'].double(),
                              'other': torch.zeros(1, dtype=torch.long)}, 'w.pth')  # float64 -> float32 is fine
