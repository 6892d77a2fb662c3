"""MFGHMoEModel: padding, tiling, train-mode restore, auxiliary loss, routing statistics, loading HAT weights."""
import errno
import math
import os
import re
from pathlib import Path
from typing import Any, Dict

import cv2
import pytest
import torch
from basicsr.models import build_model
from basicsr.utils.registry import MODEL_REGISTRY

from hmoe_arch import MFGHMoEArch, MFGHMoEModel
from hmoe_arch.errors import OptionError
from hmoe_arch.tiling import padded_forward

from util import SMALL_GROUPS, load_reference, tiny


def options(tmp_path: Path, **overrides: Any) -> Dict[str, Any]:
    opt = {
        'name': 'unit', 'model_type': 'MFGHMoEModel', 'scale': 2, 'num_gpu': 0, 'dist': False, 'rank': 0,
        'world_size': 1, 'is_train': True, 'manual_seed': 0,
        'network_g': {'type': 'MFGHMoEArch', **tiny(upscale=2, expert_groups=SMALL_GROUPS)},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None,
                 'experiments_root': str(tmp_path), 'models': str(tmp_path / 'models'),
                 'training_states': str(tmp_path / 'states'), 'visualization': str(tmp_path / 'vis')},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'pixel_opt': {'type': 'L1Loss',
                                                                                          'loss_weight': 1.0},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5}},
    }
    for key, value in overrides.items():
        opt[key] = {**opt[key], **value} if key in ('train', 'path') else value
    return opt


def feed(model: MFGHMoEModel, height: int = 8, width: int = 8) -> None:
    model.feed_data({'lq': torch.rand(2, 3, height, width), 'gt': torch.rand(2, 3, 2 * height, 2 * width)})


def test_registered_under_both_names() -> None:
    assert MODEL_REGISTRY.get('MFGHMoEModel') is MFGHMoEModel
    assert MODEL_REGISTRY.get('MFGHMOEModel') is MFGHMoEModel


def test_test_pads_crops_and_restores_train_mode(tmp_path: Path) -> None:
    model = build_model(options(tmp_path))
    model.net_g.train()
    model.feed_data({'lq': torch.rand(1, 3, 10, 9)})
    model.test()
    assert model.output.shape == (1, 3, 20, 18)
    assert model.net_g.training
    model.net_g.eval()
    with torch.no_grad():
        expected = padded_forward(model.net_g, model.lq, 2, 4)
    model.test()
    assert not model.net_g.training
    torch.testing.assert_close(model.output, expected)


def test_test_uses_ema_and_leaves_net_g_alone(tmp_path: Path) -> None:
    model = build_model(options(tmp_path, train={'ema_decay': 0.999}))
    model.net_g.train()
    model.feed_data({'lq': torch.rand(1, 3, 8, 8)})
    model.test()
    assert model.net_g.training and not model.net_g_ema.training


def test_tiled_test_matches_untiled(tmp_path: Path) -> None:
    untiled = build_model(options(tmp_path))
    tiled = build_model(options(tmp_path, tile={'tile_size': 8, 'tile_pad': 4}))
    tiled.net_g.load_state_dict(untiled.net_g.state_dict())
    lq = torch.rand(1, 3, 20, 17)
    for model in (untiled, tiled):
        model.feed_data({'lq': lq})
        model.test()
    assert tiled.output.shape == untiled.output.shape == (1, 3, 40, 34)
    assert (tiled.output - untiled.output).abs().mean() < 0.02


@pytest.mark.parametrize('tile, message', [
    ({'tile_size': 8}, r'`tile` must be \{tile_size, tile_pad\}'),
    ({'tile_size': 0, 'tile_pad': 2}, r'`tile.tile_size` must be'),
    ({'tile_size': 8, 'tile_pad': -1}, r'`tile.tile_pad` must be'),
])
def test_tile_option_is_validated(tmp_path: Path, tile: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(options(tmp_path, tile=tile))


def test_aux_loss_is_added_with_its_weight(tmp_path: Path) -> None:
    learning = {'type': 'MFGHMoEArch', **tiny(upscale=2, expert_groups=SMALL_GROUPS), 'routing_grad': 'isolated'}
    model = build_model(options(tmp_path, network_g=learning, train={'aux_loss_weight': 0.5}))
    feed(model)
    model.optimize_parameters(1)
    log = model.get_current_log()
    bare = model.get_bare_model(model.net_g)
    assert log['l_aux'] == pytest.approx(0.5 * bare.aux_loss().item(), rel=1e-5)
    plain = build_model(options(tmp_path))
    feed(plain)
    plain.optimize_parameters(1)
    assert 'l_aux' not in plain.get_current_log()
    with pytest.raises(ValueError, match='aux_loss_weight` must be a number >= 0'):
        build_model(options(tmp_path, train={'aux_loss_weight': -1}))


def test_aux_loss_needs_routers_that_learn(tmp_path: Path) -> None:
    opt = options(tmp_path, train={'aux_loss_weight': 0.1})
    opt['network_g']['routing_grad'] = 'none'
    with pytest.raises(ValueError, match='aux_loss_weight` > 0 needs routers that learn, but `network_g.routing_grad` '
                                         'is none'):
        build_model(opt)


def test_aux_loss_needs_a_network_with_routers(tmp_path: Path) -> None:
    opt = options(tmp_path, train={'aux_loss_weight': 0.1})
    opt['network_g'].update(moe=False, mfa=False, routing_grad='isolated')
    with pytest.raises(ValueError, match=r'aux_loss_weight` > 0 needs an MFGHMoEArch network with `moe: true` .* '
                                         'but network_g is MFGHMoEArch with moe: false; set the weight to 0'):
        build_model(opt)
    opt['network_g'] = {'type': 'MSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1,
                        'upscale': 2}
    with pytest.raises(ValueError, match='but network_g is MSRResNet; set the weight to 0'):
        build_model(opt)


def test_routing_statistics_since_the_last_log(tmp_path: Path) -> None:
    model = build_model(options(tmp_path))
    bare = model.get_bare_model(model.net_g)
    counts = torch.zeros(4)
    for step in range(3):
        feed(model)
        model.optimize_parameters(step + 1)
        counts += torch.bincount(bare.routing_maps()['expert'].flatten(), minlength=4)
    log = model.get_current_log()
    share = counts / counts.sum()
    for e in range(4):
        assert log[f'routing/expert_{e:02d}'] == pytest.approx(float(share[e]))
    assert log['routing/group_0'] == pytest.approx(float(share[:2].sum()))
    used = share[share > 0]
    assert log['routing/entropy'] == pytest.approx(float(-(used * used.log()).sum()))
    assert 0 <= log['routing/entropy'] <= math.log(4)
    assert 'routing/entropy' not in model.get_current_log()


def test_log_line_of_sixteen_experts_names_the_used_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         basicsr_log) -> None:
    from hmoe_arch.training_log import TrainingMessageLogger
    groups = [{'kernel_size': 1, 'num_experts': 8}, {'kernel_size': 3, 'num_experts': 8}]
    model = build_model(options(tmp_path, network_g={'type': 'MFGHMoEArch', **tiny(upscale=2, expert_groups=groups)}))
    bare = model.get_bare_model(model.net_g)
    experts = torch.tensor([3] * 71 + [9] * 22 + [0] * 7).reshape(1, 10, 10, 1)  # 13 of 16 experts unused
    monkeypatch.setattr(bare, 'routing_maps', lambda: {'group': (experts[..., 0] >= 8).long(), 'expert': experts})
    feed(model)
    model.optimize_parameters(1)

    class TensorBoard:
        def __init__(self) -> None:
            self.tags = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.tags.append(tag)

    opt = {**model.opt, 'logger': {'print_freq': 1, 'use_tb_logger': True}, 'train': {'total_iter': 10}}
    tb = TensorBoard()
    TrainingMessageLogger(opt, 0, tb)({'epoch': 0, 'iter': 1, 'lrs': model.get_current_learning_rate(),
                                       **model.get_current_log()})
    line = basicsr_log[-1]
    entropy = -sum(p * math.log(p) for p in (0.71, 0.22, 0.07))
    assert line.endswith(f'experts: e3 71%, e9 22%, e0 7.0% (13 unused) groups: g0 78%, g1 22% entropy: {entropy:.3f}')
    assert 'routing/' not in line and len(line) < 160
    assert sorted(tb.tags) == sorted(['losses/l_pix', 'routing/group_0', 'routing/group_1', 'routing/entropy',
                                               *(f'routing/expert_{e:02d}' for e in range(16))])


def test_first_iterations_log_the_run_estimate(tmp_path: Path, basicsr_log) -> None:
    from hmoe_arch.training_log import RunEstimate
    model = build_model(options(tmp_path, train={'total_iter': 6}))
    assert model.run_estimate is None
    feed(model)
    model.optimize_parameters(1)
    made = model.run_estimate
    assert (made.total_iter, made.on_cpu, made.first_iter) == (6, True, 1)
    threads = torch.get_num_threads()
    assert made.device == f'the CPU ({threads} thread{"s" if threads > 1 else ""})'
    ticks = iter(range(0, 100, 10))  # 10 s per iteration
    model.run_estimate = RunEstimate(6, 'the CPU', True, clock=lambda: float(next(ticks)))
    losses = []
    for step in range(1, 6):
        feed(model)
        model.optimize_parameters(step)
        losses.append(model.log_dict['l_pix'])
    lines = [m for m in basicsr_log if m.startswith('run estimate')]
    assert lines == [f'run estimate: 10.000 s per iteration on the CPU (iterations 2-4; iteration 1, with the warm-up, '
                     f'not timed); loss so far (mean of 4 iterations): l_pix {sum(losses[:4]) / 4:.4e}; the remaining '
                     '2 of 6 iterations take about 0:00:20 (validation and checkpoints not included)']
    untimed = build_model(options(tmp_path))  # not BasicSR's training: no train.total_iter
    feed(untimed)
    untimed.optimize_parameters(1)
    assert untimed.run_estimate is None


@pytest.mark.parametrize('name', ['tiny_hat_x2', 'hat_x2'])
def test_hat_checkpoint_as_pretrained_network(tmp_path: Path, basicsr_log, name: str) -> None:
    ref = load_reference(name)
    path = tmp_path / 'HAT_SRx2.pth'
    torch.save({'params_ema': ref['state_dict']}, path)
    network = {'type': 'MFGHMoEArch', **ref['config']}
    model = build_model(options(tmp_path, network_g=network, path={'pretrain_network_g': str(path),
                                                                   'param_key_g': 'params_ema',
                                                                   'strict_load_g': False}))
    own = model.get_bare_model(model.net_g).state_dict()
    assert torch.equal(own['layers.1.conv.weight'], ref['state_dict']['layers.1.conv.weight'])
    assert sum('Kept their initialisation: mfg, aggr_conv, upsample' in m for m in basicsr_log) == 1
    with pytest.raises(OptionError, match=r'path.pretrain_network_g .*HAT_SRx2.pth: .*strict=True'):
        build_model(options(tmp_path, network_g=network, path={'pretrain_network_g': str(path),
                                                                'param_key_g': 'params_ema', 'strict_load_g': True}))


def test_other_basicsr_networks_still_work(tmp_path: Path) -> None:
    network = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 2}
    model = build_model(options(tmp_path, network_g=network))
    feed(model, 5, 7)
    model.optimize_parameters(1)
    assert set(model.get_current_log()) == {'l_pix'}
    model.test()
    assert model.output.shape == (2, 3, 10, 14)
    assert not isinstance(model.get_bare_model(model.net_g), MFGHMoEArch)


def test_validation_saves_expert_maps_and_usage(tmp_path: Path, workdir: Path) -> None:
    from basicsr.data import build_dataloader, build_dataset
    dataset = build_dataset({'name': 'UCM', 'type': 'RSPairedDataset', 'phase': 'val', 'scale': 2,
                             'dataroot_gt': str(workdir / 'datasets/UCMerced/Test_HR'),
                             'dataroot_lq': str(workdir / 'datasets/UCMerced/Test_LR_x2')})
    loader = build_dataloader(dataset, {'phase': 'val'}, num_gpu=0, dist=False)
    opt = options(tmp_path, is_train=False, val={'save_img': False, 'save_expert_maps': True,
                                                 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2,
                                                                      'test_y_channel': True}}})
    opt['path']['results_root'] = str(tmp_path)
    model = build_model(opt)
    model.validation(loader, 'unit', None, save_img=False)
    maps = tmp_path / 'expert_maps' / 'UCM'
    assert sorted(p.stem for p in maps.glob('*.png')) == sorted(dataset.stems)
    assert 'psnr' in model.metric_results
    image = cv2.imread(str(maps / f'{dataset.stems[0]}.png'))
    assert image.shape[1] > 2 * 256
    assert (maps / 'expert_usage.csv').read_text().count('\n') == 1 + 3


def test_bf16_training_and_inference_keep_routing_in_fp32(tmp_path: Path) -> None:
    learning = {'type': 'MFGHMoEArch', **tiny(upscale=2, expert_groups=SMALL_GROUPS),
                'routing_grad': 'straight_through'}
    fp32 = build_model(options(tmp_path, network_g=learning))
    bf16 = build_model(options(tmp_path, network_g=learning, use_amp='bf16'))
    bf16.net_g.load_state_dict(fp32.net_g.state_dict())
    lq = torch.rand(1, 3, 8, 8)
    for model in (fp32, bf16):
        model.feed_data({'lq': lq})
        model.test()
    assert bf16.output.dtype == torch.float32
    assert (bf16.output - fp32.output).abs().mean() < 0.05
    bare = bf16.get_bare_model(bf16.net_g)
    routing = bare.upsample.moe.last_routing
    assert routing.group_probs.dtype == torch.float32 and routing.weight.dtype == torch.float32
    feed(bf16)
    bf16.optimize_parameters(1)
    assert math.isfinite(bf16.get_current_log()['l_pix'])
    assert all(p.dtype == torch.float32 for p in bare.parameters())
    assert bare.upsample.moe.gate.w_group_gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="`use_amp` must be false or 'bf16'"):
        build_model(options(tmp_path, use_amp='fp16'))


@pytest.mark.slow
def test_compiled_training_and_inference_match_eager(tmp_path: Path) -> None:
    eager = build_model(options(tmp_path, train={'ema_decay': 0.5}))
    compiled = build_model(options(tmp_path, train={'ema_decay': 0.5}, compile=True))
    compiled.get_bare_model(compiled.net_g).load_state_dict(eager.net_g.state_dict())
    compiled.get_bare_model(compiled.net_g_ema).load_state_dict(eager.net_g_ema.state_dict())
    torch.manual_seed(3)
    data = {'lq': torch.rand(2, 3, 8, 8), 'gt': torch.rand(2, 3, 16, 16)}
    for model in (eager, compiled):
        model.feed_data(data)
        model.optimize_parameters(1)
        model.test()
    assert compiled.get_current_log()['l_pix'] == pytest.approx(eager.get_current_log()['l_pix'], rel=1e-4)
    torch.testing.assert_close(compiled.output, eager.output, atol=1e-4, rtol=1e-4)
    (tmp_path / 'models').mkdir()
    (tmp_path / 'states').mkdir()
    compiled.save(0, 1)
    saved = torch.load(tmp_path / 'models' / 'net_g_1.pth', weights_only=True)
    assert not any('_orig_mod' in key for key in saved['params'])
    assert set(saved['params']) == set(eager.net_g.state_dict())


def test_non_finite_loss_stops_before_the_step(tmp_path: Path) -> None:
    from hmoe_arch.models import NonFiniteLossError
    model = build_model(options(tmp_path))
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    model.feed_data({'lq': torch.rand(2, 3, 8, 8), 'gt': torch.full((2, 3, 16, 16), float('nan'))})
    with pytest.raises(NonFiniteLossError, match=r'iteration 7: non-finite l_pix; training stopped before the '
                                                 r'optimizer step'):
        model.optimize_parameters(7)
    assert all(torch.equal(v, before[k]) for k, v in model.net_g.state_dict().items())


def test_non_finite_gradient_is_named_and_can_be_skipped(tmp_path: Path, basicsr_log) -> None:
    model = build_model(options(tmp_path, train={'skip_nonfinite': 1}))
    bare = model.get_bare_model(model.net_g)
    before = {k: v.clone() for k, v in bare.state_dict().items()}
    handle = bare.conv_last.weight.register_hook(lambda grad: grad * float('inf'))
    feed(model)
    model.optimize_parameters(3)
    assert any('iteration 3: non-finite gradient of conv_last.weight; step skipped (1 of train.skip_nonfinite=1)'
               in m for m in basicsr_log)
    assert all(torch.equal(v, before[k]) for k, v in bare.state_dict().items())
    from hmoe_arch.models import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match='iteration 4: non-finite gradient of conv_last.weight'):
        model.optimize_parameters(4)
    handle.remove()
    model.optimize_parameters(5)
    assert not torch.equal(bare.conv_last.weight, before['conv_last.weight'])


def test_checkpoints_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(options(tmp_path))
    model.save(0, 2)
    assert sorted(p.name for p in (tmp_path / 'models').iterdir()) == ['net_g_2.pth']
    assert sorted(p.name for p in (tmp_path / 'states').iterdir()) == ['2.state']

    def interrupted(obj, path, *args, **kwargs):
        with open(path, 'wb') as f:
            f.write(b'half a checkpoint')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save(0, 4)
    assert sorted(p.name for p in (tmp_path / 'models').iterdir()) == ['net_g_2.pth']
    assert torch.load(tmp_path / 'models' / 'net_g_2.pth', weights_only=True)['params']


def disk_full_after(limit: int):
    """A ``torch.save`` that writes ``limit`` bytes of the real file and then fails as a full disk does."""
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, 'r+b') as f:
            f.truncate(limit)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def listing(tmp_path: Path) -> Dict[str, Dict[str, bytes]]:
    """Every file under ``tmp_path``, by folder, with its bytes (hidden staging folders included)."""
    return {folder.name: {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
            for folder in sorted(tmp_path.iterdir())}


@pytest.mark.parametrize('failing', ['models', 'states'])
def test_a_save_on_a_full_disk_stops_training_and_keeps_what_was_saved_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    import basicsr.models.base_model
    model = build_model(options(tmp_path))
    model.save(0, 2)
    before = listing(tmp_path)
    real_save = torch.save
    full = disk_full_after(100)

    def save(obj, path, *args, **kwargs):
        return (full if Path(path).suffix == ('.state' if failing == 'states' else '.pth') else real_save)(
            obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save)
    monkeypatch.setattr(basicsr.models.base_model.time, 'sleep', lambda seconds: None)  # BasicSR's retries
    name = '4.state' if failing == 'states' else 'net_g_4.pth'
    with pytest.raises(OptionError, match=rf'^{re.escape(str(tmp_path / failing / name))}: cannot save it \(No '
                                          r'space left on device\); training stopped, the checkpoints and training '
                                          r'states saved before are intact'):
        model.save(0, 4)
    after = listing(tmp_path)
    if failing == 'states':  # the checkpoint of iteration 4 was complete before its state failed
        assert set(after['models']) == {'net_g_2.pth', 'net_g_4.pth'}
        after['models'].pop('net_g_4.pth')
    assert after == before
    assert torch.load(tmp_path / 'states' / '2.state', weights_only=True)['iter'] == 2


def test_a_saved_file_that_does_not_load_back_is_never_moved_in(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(options(tmp_path))
    model.save(0, 2)
    before = listing(tmp_path)

    def short(obj, path, *args, **kwargs):  # a write cut short that reported nothing
        with open(path, 'wb') as f:
            f.write(b'PK\x03\x04 half a zip archive')

    monkeypatch.setattr(torch, 'save', short)
    with pytest.raises(OptionError, match=r'states/2\.state: cannot save it \(the written file \(23 bytes\) does not '
                                          r'load back: RuntimeError: PytorchStreamReader failed reading zip archive: '
                                          r'failed finding central directory\); training stopped'):
        model.save_training_state(0, 2)
    monkeypatch.setattr(torch, 'save', lambda obj, path: open(path, 'wb').close())
    with pytest.raises(OptionError, match=r'models/net_g_2\.pth: cannot save it \(the written file is empty\)'):
        model.save_network(model.net_g, 'net_g', 2)
    assert listing(tmp_path) == before


def test_torchs_own_write_error_is_reported_with_the_space_left(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(options(tmp_path))

    def torch_full_disk(obj, path, *args, **kwargs):  # what torch.save raises when the disk fills up
        open(path, 'wb').close()
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')

    monkeypatch.setattr(torch, 'save', torch_full_disk)
    with pytest.raises(OptionError, match=r'states/6\.state: cannot save it \(\[enforce fail at inline_container.cc:'
                                          r'672\] \. unexpected pos 704 vs 598; [0-9.]+ MiB free on its file system\)'):
        model.save_training_state(1, 6)
    assert list((tmp_path / 'states').iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ['states']


def test_a_training_state_holds_what_basicsrs_own_saver_writes(tmp_path: Path) -> None:
    from basicsr.models.base_model import BaseModel
    model = build_model(options(tmp_path))
    feed(model)
    model.optimize_parameters(1)
    model.update_learning_rate(2)
    model.save_training_state(3, 5)
    model.save_training_state(3, -1)  # BasicSR's "latest" save: no state
    assert sorted(p.name for p in (tmp_path / 'states').iterdir()) == ['5.state']
    model.opt['path']['training_states'] = str(tmp_path / 'basicsr')
    (tmp_path / 'basicsr').mkdir()
    BaseModel.save_training_state(model, 3, 5)
    ours = torch.load(tmp_path / 'states' / '5.state', weights_only=True)
    theirs = torch.load(tmp_path / 'basicsr' / '5.state', weights_only=True)
    assert (ours['epoch'], ours['iter']) == (3, 5)
    torch.testing.assert_close(ours, theirs)


def test_routing_lr_scale_gives_the_routing_parameters_their_own_learning_rate(tmp_path: Path) -> None:
    opt = options(tmp_path, train={'routing_lr_scale': 0.1})
    opt['network_g']['routing_grad'] = 'isolated'
    model = build_model(opt)
    bare = model.get_bare_model(model.net_g)
    names = {id(p): n for n, p in bare.named_parameters()}
    main, routing = model.optimizer_g.param_groups
    assert main['lr'] == pytest.approx(1e-3) and routing['lr'] == pytest.approx(1e-4)
    assert sorted(names[id(p)] for p in routing['params']) == sorted(bare.routing_parameter_names())
    assert len(main['params']) + len(routing['params']) == len(list(bare.parameters()))
    assert 'upsample.0.gate.group_embedding.weight' in bare.routing_parameter_names()
    assert 'mfg.0.weight' not in bare.routing_parameter_names()  # MFA's LayerNorms are on the main path
    feed(model)
    model.optimize_parameters(1)
    model.update_learning_rate(2)
    assert [g['lr'] for g in model.optimizer_g.param_groups] == pytest.approx([1e-3, 1e-4])
    with pytest.raises(ValueError, match='routing_lr_scale` needs routers that learn'):
        build_model(options(tmp_path, train={'routing_lr_scale': 0.1},
                            network_g={**opt['network_g'], 'routing_grad': 'none'}))
    with pytest.raises(ValueError, match='routing_lr_scale` must be a number > 0'):
        build_model(options(tmp_path, train={'routing_lr_scale': 0}))
    assert len(build_model(options(tmp_path)).optimizer_g.param_groups) == 1


class TinyPairs(torch.utils.data.Dataset):
    """Three random 8x8 LR / 16x16 GT pairs, as BasicSR's paired datasets return them."""

    opt = {'name': 'tiny'}

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Dict[str, Any]:
        generator = torch.Generator().manual_seed(index)
        return {'lq': torch.rand(3, 8, 8, generator=generator), 'gt': torch.rand(3, 16, 16, generator=generator),
                'lq_path': f'img{index}.png'}


@pytest.mark.parametrize('val, rank, shown', [({}, 0, True), ({'pbar': True}, 0, True), ({'pbar': False}, 0, False),
                                              ({}, 1, False)])
def test_validation_shows_a_progress_bar_by_default(tmp_path: Path, capsys, val: dict, rank: int,
                                                    shown: bool) -> None:
    val = {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2}}, **val}
    model = build_model(options(tmp_path, is_train=False, rank=rank, val=dict(val)))
    loader = torch.utils.data.DataLoader(TinyPairs(), batch_size=1)
    capsys.readouterr()
    model.validation(loader, 'unit', None, save_img=False)
    err = capsys.readouterr().err
    # tqdm's bar: images done of all, elapsed<remaining (the ETA), in images
    bar = re.search(r'Test img2: 100%.*\| 3/3 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+image/s\]', err)
    assert (bar is not None) == shown, err
    assert 'image/s' in err if shown else 'image/s' not in err
    assert model.opt['val'] == val and model.metric_results['psnr'] > 0  # the options as given; validated
    with pytest.raises(OptionError, match=r'`val.pbar` must be true or false, got .yes.'):
        build_model(options(tmp_path, is_train=False, val={**val, 'pbar': 'yes'})).validation(loader, 'unit', None,
                                                                                             save_img=False)


class Scalars:
    """A TensorBoard logger that keeps what it is given."""

    def __init__(self) -> None:
        self.values: Dict[str, Dict[Any, float]] = {}

    def add_scalar(self, tag: str, value: float, step: Any) -> None:
        self.values.setdefault(tag, {})[step] = value


class OddPairs(TinyPairs):
    """Three random 10x9 LR pairs (sizes that need padding and leave partial tiles)."""

    def __getitem__(self, index: int) -> Dict[str, Any]:
        generator = torch.Generator().manual_seed(index)
        return {'lq': torch.rand(3, 10, 9, generator=generator), 'gt': torch.rand(3, 20, 18, generator=generator),
                'lq_path': f'img{index}.png'}


def top1_maps(model: MFGHMoEModel, dataset: torch.utils.data.Dataset) -> Dict[str, torch.Tensor]:
    """``(H, W)`` top-1 expert of every LR pixel of each image, from the network run on the whole image."""
    net = model.get_bare_model(model.net_g).eval()
    maps = {}
    for index in range(len(dataset)):
        lq = dataset[index]['lq'][None]
        with torch.no_grad():
            padded_forward(net, lq, 2, 4)
        maps[f'img{index}'] = net.routing_maps()['expert'][0, :lq.shape[2], :lq.shape[3], 0]
    return maps


def test_validation_logs_the_routing_of_all_images_and_what_changed(tmp_path: Path, basicsr_log) -> None:
    val = {'save_img': False, 'pbar': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2}}}
    network = {'type': 'MFGHMoEArch', **tiny(upscale=2, expert_groups=SMALL_GROUPS),
               'routing_grad': 'straight_through'}  # routers that learn, so that pixels change expert
    model = build_model(options(tmp_path, network_g=network, val=val, train={'optim_g': {'type': 'Adam', 'lr': 1e-2}}))
    loader = torch.utils.data.DataLoader(OddPairs(), batch_size=1)
    tb = Scalars()
    before = top1_maps(model, OddPairs())
    model.validation(loader, 10, tb, save_img=False)
    share = torch.bincount(torch.cat([m.flatten() for m in before.values()]), minlength=4) / (3 * 90)
    used = share[share > 0]
    entropy = float(-(used * used.log()).sum())
    lines = [m for m in basicsr_log if m.startswith('routing on tiny')]
    assert lines == [
        f'routing on tiny: {int((share >= 0.01).sum())} of 4 experts serve >= 1% of LR pixels, entropy {entropy:.3f} '
        f'nats, groups g0 {100 * float(share[:2].sum()):.0f}% g1 {100 * float(share[2:].sum()):.0f}%',
        'routing on tiny, % of LR pixels per expert: ' + ' '.join(
            f'g{g} [{100 * float(share[2 * g]):.2f} {100 * float(share[2 * g + 1]):.2f}]' for g in range(2))]
    assert basicsr_log.index(lines[0]) > next(i for i, m in enumerate(basicsr_log) if m.startswith('Validation tiny'))
    first = {tag: steps[10] for tag, steps in tb.values.items() if tag.startswith('val_routing/')}
    assert set(first) == {'val_routing/tiny/experts_1pct', 'val_routing/tiny/entropy', 'val_routing/tiny/group_0',
                          'val_routing/tiny/group_1', *(f'val_routing/tiny/expert_{e:02d}' for e in range(4))}
    assert first['val_routing/tiny/entropy'] == pytest.approx(entropy, abs=1e-6)
    assert [first[f'val_routing/tiny/expert_{e:02d}'] for e in range(4)] == pytest.approx(share.tolist())
    for step in range(1, 6):
        feed(model)
        model.optimize_parameters(step)
    after = top1_maps(model, OddPairs())
    rerouted = sum(int((after[k] != before[k]).sum()) for k in after) / (3 * 90)
    assert rerouted > 0
    basicsr_log.clear()
    model.validation(loader, 20, tb, save_img=False)
    line = next(m for m in basicsr_log if m.startswith('routing on tiny:'))
    assert line.endswith(f', {100 * rerouted:.2f}% of pixels rerouted since iteration 10')
    assert tb.values['val_routing/tiny/rerouted'] == {20: pytest.approx(rerouted)}


def test_tiled_validation_merges_the_routing_of_every_tile(tmp_path: Path) -> None:
    val = {'save_img': False, 'pbar': False}
    untiled = build_model(options(tmp_path, val=val))
    tiled = build_model(options(tmp_path, val=val, tile={'tile_size': 4, 'tile_pad': 2}))
    whole = build_model(options(tmp_path, val=val, tile={'tile_size': 16, 'tile_pad': 0}))  # one tile per image
    for model in (tiled, whole):
        model.net_g.load_state_dict(untiled.net_g.state_dict())
    loader = torch.utils.data.DataLoader(OddPairs(), batch_size=1)
    for model in (untiled, tiled, whole):
        model.validation(loader, 10, None, save_img=False)
    net = untiled.get_bare_model(untiled.net_g).eval()
    for index in range(3):
        lq = OddPairs()[index]['lq'][None]
        expected = torch.full((10, 9), -1)
        for top in range(0, 10, 4):  # each tile's own area, routed with 2 pixels of context around it
            for left in range(0, 9, 4):
                bottom, right = min(top + 4, 10), min(left + 4, 9)
                context_top, context_left = max(top - 2, 0), max(left - 2, 0)
                with torch.no_grad():
                    padded_forward(net, lq[..., context_top:bottom + 2, context_left:right + 2], 2, 4)
                experts = net.routing_maps()['expert'][0, ..., 0]
                expected[top:bottom, left:right] = experts[top - context_top:bottom - context_top,
                                                           left - context_left:right - context_left]
        assert (expected >= 0).all()
        assert tiled.routing_stats['tiny'].previous[f'img{index}'].tolist() == expected.tolist()
        assert (whole.routing_stats['tiny'].previous[f'img{index}'].tolist()
                == untiled.routing_stats['tiny'].previous[f'img{index}'].tolist())
    pixels = torch.cat([torch.as_tensor(m).flatten() for m in tiled.routing_stats['tiny'].previous.values()])
    assert pixels.numel() == 3 * 90


def test_adam_takes_the_fused_kernel_unless_the_options_choose(tmp_path: Path) -> None:
    fused = build_model(options(tmp_path))
    assert fused.optimizer_g.defaults['fused'] is True
    for choice in ({'fused': False}, {'foreach': True}):
        opt = options(tmp_path)
        opt['train']['optim_g'] = {'type': 'Adam', 'lr': 1e-3, **choice}
        chosen = build_model(opt).optimizer_g.defaults
        assert not chosen['fused'] and chosen['foreach'] == choice.get('foreach')
    scaled = options(tmp_path, train={'routing_lr_scale': 0.1})
    scaled['network_g']['routing_grad'] = 'isolated'
    assert build_model(scaled).optimizer_g.defaults['fused'] is True  # two parameter groups
    # the same step as the per-tensor loop, to float rounding
    opt = options(tmp_path)
    opt['train']['optim_g'] = {'type': 'Adam', 'lr': 1e-3, 'fused': False}
    loop = build_model(opt)
    loop.net_g.load_state_dict(fused.net_g.state_dict())
    for model in (fused, loop):
        torch.manual_seed(3)
        for step in (1, 2):
            feed(model)
            model.optimize_parameters(step)
    for (name, a), b in zip(fused.net_g.state_dict().items(), loop.net_g.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
