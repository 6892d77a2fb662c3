"""MFGHMoEArch: shapes, HAT-exact and authors'-exact configurations, validation, gradients, loading."""
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch

from hmoe_arch import MFGHMoEArch
from hmoe_arch.archs.mfghmoe_arch import checkpoint_filter_fn
from hmoe_arch.archs.routing import ROUTING_GRAD_MODES, ROUTING_GRADS

from util import (
    AUTHORS_REFERENCES,
    HAT_REFERENCES,
    HAT_RGB_MEAN,
    REFERENCE_DIR,
    SMALL_GROUPS,
    TEST_DATA,
    full_size_spec,
    load_reference,
    reference_file,
    tiny,
    tiny_hat,
)

REFERENCE_PEERS = REFERENCE_DIR.parent / 'peers'


def spec_keys(name: str) -> Dict[str, Any]:
    return full_size_spec(name)


def shapes(net: torch.nn.Module) -> Dict[str, List[int]]:
    return {k: list(v.shape) for k, v in net.state_dict().items()}


# ------------------------------------------------------------------------------------------------------
# shapes
@pytest.mark.parametrize('scale', [2, 3, 4, 8])
@pytest.mark.parametrize('moe', [False, True])
def test_output_shape_for_every_scale(scale: int, moe: bool) -> None:
    config = tiny(upscale=scale, expert_groups=SMALL_GROUPS) if moe else tiny_hat(upscale=scale)
    net = MFGHMoEArch(**config).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 8, 12))
    assert out.shape == (1, 3, 8 * scale, 12 * scale)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('size', [(4, 4), (8, 16), (20, 12)])
def test_non_square_inputs_and_other_sizes(size: tuple) -> None:
    net = MFGHMoEArch(**tiny(upscale=2, expert_groups=SMALL_GROUPS)).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, size[0] * 2, size[1] * 2)


def test_input_not_multiple_of_window_is_rejected() -> None:
    net = MFGHMoEArch(**tiny_hat())
    with pytest.raises(ValueError, match=r'multiples of window_size \(4\).*\(1, 3, 6, 8\)'):
        net(torch.rand(1, 3, 6, 8))


def test_single_channel_input() -> None:
    net = MFGHMoEArch(**tiny(in_chans=1, upscale=2, expert_groups=SMALL_GROUPS)).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 8, 8)).shape == (1, 1, 16, 16)


# ------------------------------------------------------------------------------------------------------
# HAT's keywords do what HAT does
def record(module: torch.nn.Module, seen: dict, name: str, output: bool = False) -> None:
    """Keep the input (or output) of ``module``'s forward in ``seen[name]``."""
    def hook(mod, inputs, out) -> None:
        seen[name] = out if output else inputs[0]

    module.register_forward_hook(hook)


def test_img_range_scales_the_input_and_output() -> None:
    net = MFGHMoEArch(**tiny_hat(img_range=255.0)).eval()
    seen = {}
    record(net.conv_first, seen, 'in')
    record(net.conv_last, seen, 'out', output=True)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        y = net(x)
    mean = torch.tensor(HAT_RGB_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(seen['in'], (x - mean) * 255.0)
    torch.testing.assert_close(y, seen['out'] / 255.0 + mean)


def test_no_rgb_mean_leaves_the_input_unshifted() -> None:
    net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS)).eval()
    seen = {}
    record(net.conv_first, seen, 'in')
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        net(x)
    assert torch.equal(seen['in'], x)


def saved_bytes_and_grads(net: torch.nn.Module, x: torch.Tensor):
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    out.mean().backward()
    return sum(saved), {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}


def test_use_checkpoint_recomputes_instead_of_storing() -> None:
    x = torch.rand(2, 3, 16, 16)
    plain = MFGHMoEArch(**tiny_hat(drop_path_rate=0.0, depths=[3, 3])).train()
    ckpt = MFGHMoEArch(**tiny_hat(drop_path_rate=0.0, depths=[3, 3], use_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    plain_bytes, plain_grads = saved_bytes_and_grads(plain, x)
    ckpt_bytes, ckpt_grads = saved_bytes_and_grads(ckpt, x)
    assert ckpt_bytes < 0.6 * plain_bytes
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_and_plain_attention_give_the_same_training_step() -> None:
    x = torch.rand(2, 3, 16, 16)
    results = []
    for attention in ('plain', 'sdpa'):
        torch.manual_seed(0)
        net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS, drop_path_rate=0.0, attention=attention)).train()
        out = net(x)
        out.abs().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
    assert results[1][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_drop_path_and_dropout_act_in_training_only() -> None:
    net = MFGHMoEArch(**tiny_hat(drop_path_rate=0.5, drop_rate=0.3, attn_drop_rate=0.3))
    x = torch.rand(1, 3, 8, 8)
    net.train()
    assert not torch.allclose(net(x), net(x))
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


def test_ape_adds_a_learned_position_embedding_for_img_size_inputs() -> None:
    net = MFGHMoEArch(**tiny_hat(ape=True, img_size=8))
    assert net.absolute_pos_embed.shape == (1, 64, 24)
    net(torch.rand(1, 3, 8, 8)).mean().backward()
    assert net.absolute_pos_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='ape'):
        net(torch.rand(1, 3, 16, 16))


def test_window_no_larger_than_img_size_disables_the_shift_like_hat() -> None:
    assert MFGHMoEArch(**tiny_hat(img_size=4)).shift_size == 0
    assert MFGHMoEArch(**tiny_hat(img_size=16)).shift_size == 2


def test_patch_norm_and_resi_connection_change_the_layout() -> None:
    keys = MFGHMoEArch(**tiny_hat(patch_norm=False, resi_connection='identity')).state_dict()
    assert 'patch_embed.norm.weight' not in keys
    assert 'conv_after_body.weight' not in keys and 'layers.0.conv.weight' not in keys


def test_qkv_bias_and_qk_scale() -> None:
    net = MFGHMoEArch(**tiny_hat(qkv_bias=False, qk_scale=0.5))
    block = net.layers[0].residual_group.blocks[0]
    assert block.attn.qkv.bias is None and block.attn.scale == 0.5
    assert net.layers[0].residual_group.overlap_attn.scale == 0.5


# ------------------------------------------------------------------------------------------------------
# gradients
def spread_router(net: MFGHMoEArch) -> None:
    """Give the gates the spread of a trained router (at initialisation they send most pixels to one or two
    experts), so that one small batch reaches every expert."""
    gate = net.upsample.moe.gate
    for linear in (gate.w_group_gate, *gate.w_expert_gates):
        torch.nn.init.normal_(linear.weight, std=3.0)
        torch.nn.init.zeros_(linear.bias)
    torch.nn.init.normal_(gate.group_embedding.weight, std=0.1)


def test_every_parameter_gets_a_gradient_in_hat_mode() -> None:
    net = MFGHMoEArch(**tiny_hat()).train()
    net(torch.rand(2, 3, 16, 16)).abs().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_every_parameter_gets_a_gradient_with_moe_and_mfa() -> None:
    net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS, upscale=2, routing_grad='straight_through')).train()
    spread_router(net)
    out = net(torch.rand(2, 3, 16, 16))
    used = set(net.routing_maps()['expert'].flatten().tolist())
    assert used == {0, 1, 2, 3}, 'precondition: the input routes pixels to every expert'
    assert set(net.routing_maps()['group'].flatten().tolist()) == {0, 1}
    (out.abs().mean() + 0.01 * net.aux_loss()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    for name in ('upsample.0.gate.w_group_gate.weight', 'upsample.0.gate.w_expert_gates.0.weight',
                 'upsample.0.gate.w_expert_gates.1.weight', 'upsample.0.gate.group_embedding.weight',
                 'mfg.1.0.weight', 'mfg.3.2.weight', 'aggr_conv.0.weight'):
        assert dict(net.named_parameters())[name].grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------------
# reference vectors
@pytest.mark.parametrize('attention', ['sdpa', 'plain'])
@pytest.mark.parametrize('name', HAT_REFERENCES)
def test_hat_reference_vectors(name: str, attention: str) -> None:
    ref = load_reference(f'{name}.pt')
    net = MFGHMoEArch(**ref['config'], moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN, attention=attention).eval()
    net.load_state_dict(ref['state_dict'], strict=True)
    with torch.no_grad():
        out = net(ref['input'])
    assert out.shape == ref['output'].shape
    assert (out - ref['output']).abs().max() <= 1e-4


@pytest.mark.parametrize('attention', ['sdpa', 'plain'])
@pytest.mark.parametrize('name', AUTHORS_REFERENCES)
def test_authors_reference_vectors(name: str, attention: str) -> None:
    ref = load_reference(f'{name}.pt')
    net = MFGHMoEArch(**ref['config'], attention=attention).eval()
    net.load_state_dict(ref['state_dict'], strict=True)
    with torch.no_grad():
        out = net(ref['input'])
    assert (out - ref['output']).abs().max() <= 1e-4


@pytest.mark.parametrize('name', AUTHORS_REFERENCES)
def test_authors_weights_load_strictly_into_the_balancing_options_and_give_their_outputs(name: str) -> None:
    ref = load_reference(f'{name}.pt')
    net = MFGHMoEArch(**ref['config'], balance='bias', routing_norm='center').eval()
    net.load_state_dict(ref['state_dict'], strict=True)  # the missing balance state starts at zero
    assert set(net.balance_state_names()) == {'upsample.0.gate.group_bias', 'upsample.0.gate.expert_bias',
                                              'upsample.0.gate.balance_updates', 'upsample.0.feature_mean',
                                              'upsample.0.feature_batches'}
    with torch.no_grad():
        out = net(ref['input'])
    assert (out - ref['output']).abs().max() <= 1e-4
    from hmoe_arch.archs.config import config_from_state_dict
    config = config_from_state_dict(net.state_dict())
    assert (config['balance'], config['routing_norm']) == ('bias', 'center')
    assert 'balance' not in config_from_state_dict(ref['state_dict'])


def test_balance_state_follows_training_and_the_ema_copy() -> None:
    torch.manual_seed(0)
    net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS), balance='bias', routing_norm='center',
                      balance_rate=0.01).train()
    net(torch.rand(2, 3, 16, 16))
    state = net.state_dict()
    assert state['upsample.0.gate.expert_bias'].abs().sum() > 0 and int(state['upsample.0.feature_batches']) == 1
    net.eval()
    net(torch.rand(2, 3, 16, 16))
    assert torch.equal(net.state_dict()['upsample.0.gate.expert_bias'], state['upsample.0.gate.expert_bias'])


@pytest.mark.parametrize('name', AUTHORS_REFERENCES)
def test_authors_option_file_type_builds_the_same_network(name: str) -> None:
    from basicsr.archs import build_network
    ref = load_reference(f'{name}.pt')
    net = build_network({'type': 'MFGHMOE', **ref['config']}).eval()
    net.load_state_dict(ref['state_dict'], strict=True)
    with torch.no_grad():
        assert (net(ref['input']) - ref['output']).abs().max() <= 1e-4


def test_full_size_hat_layout() -> None:
    spec = spec_keys('hat_x4')
    with torch.device('meta'):  # shapes only
        net = MFGHMoEArch(**spec['config'], moe=False, mfa=False, rgb_mean=HAT_RGB_MEAN)
    assert shapes(net) == spec['keys']
    assert list(net.state_dict()) == list(spec['keys'])


def test_full_size_authors_layout() -> None:
    spec = spec_keys('official_mfghmoe_x4')
    with torch.device('meta'):  # shapes only
        net = MFGHMoEArch(**spec['config'])
    assert shapes(net) == spec['keys']


def test_committed_layouts_equal_the_shared_ones() -> None:
    with open(reference_file('state_dict_spec_full.json')) as f:
        shared = json.load(f)
    assert {name: full_size_spec(name) for name in shared} == shared


def make_reference_script():
    """tests/data/make_reference.py as a module (it is a script, not a package member)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('make_reference', TEST_DATA.parent / 'make_reference.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_committed_vectors_are_what_the_script_makes() -> None:
    """tests/data/make_reference.py --check rebuilds the committed files from HAT's code and the authors' vectors in
    ../shared: weights, inputs and configurations byte for byte, outputs within its stated float tolerance."""
    import subprocess
    import sys
    reference_file('official_mfghmoe_x2.pt')
    if not (REFERENCE_PEERS / 'HAT' / 'hat' / 'archs' / 'hat_arch.py').is_file():
        pytest.skip(f'HAT peer code not available: {REFERENCE_PEERS}/HAT is missing (it ships in ../shared/peers)')
    result = subprocess.run([sys.executable, str(TEST_DATA.parent / 'make_reference.py'), '--check'],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (f'make_reference --check: the rebuild matches {TEST_DATA} (outputs within 1e-05, the rest byte for '
            'byte)') in result.stdout


def copy_of_committed_vectors(folder: Path) -> Path:
    """The committed reference files, copied into ``folder`` (a stand-in for a rerun of the script)."""
    import shutil
    shutil.copytree(TEST_DATA, folder)
    return folder


def test_reference_check_accepts_float_drift_of_the_outputs_up_to_its_tolerance(tmp_path) -> None:
    script = make_reference_script()
    assert script.OUTPUT_TOLERANCE == 1e-5
    made = copy_of_committed_vectors(tmp_path / 'made')
    assert script.differences(made, TEST_DATA) == []
    for name, shift in (('tiny_hat_x2.pt', 9.5e-7), ('tiny_authors_x2.pt', -9e-6)):
        stored = torch.load(made / name, weights_only=True)
        stored['output'] = stored['output'] + shift
        torch.save(stored, made / name)
    assert script.differences(made, TEST_DATA) == []
    stored['output'][0, 1, 2, 3] += 2e-4
    torch.save(stored, made / 'tiny_authors_x2.pt')
    problems = script.differences(made, TEST_DATA)
    assert len(problems) == 1
    assert re.fullmatch(r'tiny_authors_x2\.pt: output differs by 1\.9\de-04 \(tolerance 1e-05\)', problems[0])
    stored['output'] = stored['output'][:, :, :-1]
    torch.save(stored, made / 'tiny_authors_x2.pt')
    assert script.differences(made, TEST_DATA) == ['tiny_authors_x2.pt: output is torch.float32 (2, 3, 23, 32), '
                                                   'expected torch.float32 (2, 3, 24, 32)']


def test_reference_check_wants_weights_inputs_and_layouts_byte_for_byte(tmp_path) -> None:
    """One int8 code, one exponent, one input level, the configuration or the layout text changed: each is named."""
    import gzip
    script = make_reference_script()
    made = copy_of_committed_vectors(tmp_path / 'made')
    stored = torch.load(made / 'tiny_hat_x2.pt', weights_only=True)
    key = 'conv_first.weight'
    stored['state_dict_int8'][key].view(-1)[5] += 1
    stored['state_dict_exponent']['conv_last.bias'] -= 1
    stored['input_uint8'][1, 2, 3, 4] ^= 1
    stored['config'] = {**stored['config'], 'window_size': 8}
    torch.save(stored, made / 'tiny_hat_x2.pt')
    spec = made / 'state_dict_spec_full.json.gz'
    spec.write_bytes(gzip.compress(gzip.decompress(spec.read_bytes()) + b' '))
    (made / 'extra.pt').write_bytes(b'')
    assert script.differences(made, TEST_DATA) == [
        "files ['extra.pt', 'state_dict_spec_full.json.gz', 'tiny_authors_x2.pt', 'tiny_hat_x2.pt'], expected "
        "['state_dict_spec_full.json.gz', 'tiny_authors_x2.pt', 'tiny_hat_x2.pt']",
        'state_dict_spec_full.json.gz: the decompressed text is not byte for byte the same',
        "tiny_hat_x2.pt: config['window_size'] is not byte for byte the same",
        'tiny_hat_x2.pt: input_uint8 is not byte for byte the same',
        "tiny_hat_x2.pt: state_dict_exponent['conv_last.bias'] is not byte for byte the same",
        "tiny_hat_x2.pt: state_dict_int8['conv_first.weight'] is not byte for byte the same"]


def test_reference_check_compares_the_layout_text_not_its_gzip_stream(tmp_path) -> None:
    """Another zlib build may compress the same JSON text into other bytes; that is no difference."""
    import gzip
    script = make_reference_script()
    made = copy_of_committed_vectors(tmp_path / 'made')
    spec = made / 'state_dict_spec_full.json.gz'
    recompressed = gzip.compress(gzip.decompress(spec.read_bytes()), compresslevel=1, mtime=1)
    assert recompressed != spec.read_bytes()
    spec.write_bytes(recompressed)
    assert script.differences(made, TEST_DATA) == []


def test_default_is_the_paper_configuration() -> None:
    spec = spec_keys('official_mfghmoe_x4')
    assert shapes(MFGHMoEArch()) == spec['keys']


# ------------------------------------------------------------------------------------------------------
# loading foreign checkpoints
@pytest.mark.parametrize('name', ['tiny_hat_x2', 'hat_x4'])
def test_hat_checkpoint_fills_the_backbone_and_reports_the_rest(tmp_path, basicsr_log, name: str) -> None:
    ref = load_reference(name)
    path = tmp_path / 'net_g_hat.pth'
    torch.save({'params_ema': ref['state_dict']}, path)
    net = MFGHMoEArch(**ref['config'])
    report = net.load_pretrained(path, param_key='params_ema')
    own = net.state_dict()
    backbone = [k for k in ref['state_dict'] if not k.startswith('upsample.')]
    assert sorted(report.loaded) == sorted(backbone)
    for key in backbone:
        assert torch.equal(own[key], ref['state_dict'][key]), key
    assert report.kept_init == ['mfg', 'aggr_conv', 'upsample']
    hat_upsampler = [k for k in ref['state_dict'] if k.startswith('upsample.')]
    assert [u.split()[0] for u in report.unused] == hat_upsampler and len(hat_upsampler) == 2 * (
        ref['config']['upscale'] // 2)
    assert len(basicsr_log) == 1
    assert 'Kept their initialisation: mfg, aggr_conv, upsample' in basicsr_log[0]
    assert str(path) in basicsr_log[0]


def test_strict_load_names_what_differs() -> None:
    ref = load_reference('tiny_hat_x2')
    net = MFGHMoEArch(**ref['config'])
    with pytest.raises(ValueError, match=r'(?s)strict=True.*mfg, aggr_conv, upsample.*upsample\.0\.weight'):
        net.load_pretrained(ref['state_dict'], strict=True)


@pytest.mark.parametrize('name', ['tiny_authors_x2', 'official_mfghmoe_x2'])
def test_authors_checkpoint_loads_strictly_with_module_prefix(basicsr_log, name: str) -> None:
    ref = load_reference(name)
    net = MFGHMoEArch(**ref['config']).eval()
    report = net.load_pretrained({'params': {f'module.{k}': v for k, v in ref['state_dict'].items()}}, strict=True)
    assert report.kept_init == [] and report.unused == []
    with torch.no_grad():
        assert (net(ref['input']) - ref['output']).abs().max() <= 1e-4


def test_loading_errors_name_the_file(tmp_path) -> None:
    net = MFGHMoEArch(**tiny_hat())
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        net.load_pretrained(tmp_path / 'nope.pth')
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='bad.pth'):
        net.load_pretrained(bad)
    odd = tmp_path / 'odd.pth'
    torch.save({'epoch': 3}, odd)
    with pytest.raises(ValueError, match=r"odd.pth: expected a state_dict .*\['epoch'\]"):
        net.load_pretrained(odd)


def test_shape_mismatch_is_reported_not_loaded(basicsr_log) -> None:
    small = MFGHMoEArch(**tiny_hat(upscale=2))
    big = MFGHMoEArch(**tiny_hat(upscale=3))
    report = big.load_pretrained(small.state_dict())
    assert 'upsample.0.weight [256, 64, 3, 3] (network has [576, 64, 3, 3])' in report.unused
    assert report.kept_init == ['upsample']


def test_values_of_another_kind_and_changed_index_buffers_are_reported_not_loaded(basicsr_log) -> None:
    source = MFGHMoEArch(**tiny_hat(upscale=2)).state_dict()
    net = MFGHMoEArch(**tiny_hat(upscale=2))
    before = net.state_dict()
    crafted = {**source, 'conv_first.weight': source['conv_first.weight'].long(),
               'relative_position_index_SA': source['relative_position_index_SA'].clone().fill_(-1)}
    report = net.load_pretrained(crafted)
    assert report.unused == [
        'relative_position_index_SA [16, 16] (holds -1 at [0, 0], a negative index (the network has 24); this buffer '
        'follows from the window sizes and is never learned)',
        'conv_first.weight [24, 3, 3, 3] (a torch.int64 tensor (integer values) where the network expects floating '
        'point values (torch.float32))']
    for key in ('conv_first.weight', 'relative_position_index_SA'):
        assert torch.equal(net.state_dict()[key], before[key])
    assert torch.equal(net.state_dict()['conv_last.weight'], source['conv_last.weight'])
    with pytest.raises(ValueError, match=r'(?s)strict=True.*conv_first.weight \[24, 3, 3, 3\] \(a torch.int64 tensor'):
        net.load_pretrained(crafted, strict=True)


def test_checkpoint_filter_fn_gives_the_state_dict_in_this_networks_names() -> None:
    state = MFGHMoEArch(**tiny_hat()).state_dict()
    filtered = checkpoint_filter_fn({'params_ema': {f'module.{k}': v for k, v in state.items()}}, 'params_ema', 'w.pth')
    assert list(filtered) == list(state)
    MFGHMoEArch(**tiny_hat()).load_state_dict(filtered, strict=True)
    with pytest.raises(ValueError, match=r"^w.pth: expected a state_dict .*\['epoch'\]$"):
        checkpoint_filter_fn({'epoch': 3}, source='w.pth')


# ------------------------------------------------------------------------------------------------------
# routing_grad: where the routing gradient goes
ROUTING_PARTS = ('upsample.0.gate.', 'mfg.1.', 'mfg.3.', 'aggr_conv.')
"""Parameters that only the routing gradient reaches (routers, group embedding, MFA branches, projection)."""


def routed_step(routing_grad: str, mfa: bool = True, built_as: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Gradients of one loss through a network whose weights do not depend on ``routing_grad`` (with ``built_as``:
    built with that mode and switched to ``routing_grad`` by :meth:`MFGHMoEArch.set_routing_grad`)."""
    torch.manual_seed(0)
    net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS, mfa=mfa, routing_grad=built_as or routing_grad)).train()
    if built_as is not None:
        net.set_routing_grad(routing_grad)
    spread_router(net)
    torch.manual_seed(1)
    out = net(torch.rand(2, 3, 16, 16))
    assert len(set(net.routing_maps()['expert'].flatten().tolist())) == 4, 'precondition: every expert is used'
    (out - torch.rand_like(out)).abs().mean().backward()
    return {'output': out.detach(), **{n: p.grad for n, p in net.named_parameters()}}


def test_routing_grad_changes_no_output_value() -> None:
    outputs = [routed_step(mode)['output'] for mode in ('none', 'straight_through', 'isolated', 'centered')]
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_routing_grad_none_is_the_authors_training() -> None:
    grads = routed_step('none')
    routing = [n for n in grads if n.startswith(ROUTING_PARTS)]
    assert len(routing) == 17 and all(grads[n] is None for n in routing)
    others = [n for n in grads if n != 'output' and n not in routing]
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in others)
    assert grads['mfg.0.weight'].abs().sum() > 0  # the LayerNorms of MFA sit on the main path


@pytest.mark.parametrize('mode', ['isolated', 'centered'])
@pytest.mark.parametrize('mfa', [True, False])
def test_isolated_routing_gradient_trains_the_routers_but_stops_at_the_backbone(mode: str, mfa: bool) -> None:
    none, isolated, through = routed_step('none', mfa), routed_step(mode, mfa), routed_step('straight_through', mfa)
    routing = [n for n in none if n.startswith(ROUTING_PARTS)]
    shared = [n for n in none if n != 'output' and n not in routing]
    assert all(isolated[n].abs().sum() > 0 for n in routing)
    for name in shared:  # the backbone, reconstruction and experts see exactly the authors' gradient
        torch.testing.assert_close(isolated[name], none[name], rtol=0, atol=0, msg=name)
    changed = [n for n in shared if not torch.equal(through[n], none[n])]
    assert 'conv_first.weight' in changed and 'layers.0.residual_group.blocks.0.attn.qkv.weight' in changed
    if mfa:
        assert 'norm.weight' in changed


@pytest.mark.parametrize('name', ROUTING_GRADS)
def test_each_routing_grad_record_decides_where_the_routing_gradient_goes(name: str) -> None:
    mode, none, grads = ROUTING_GRAD_MODES[name], routed_step('none'), routed_step(name)
    routing = [n for n in none if n.startswith(ROUTING_PARTS)]
    shared = [n for n in none if n != 'output' and n not in routing]
    assert all((grads[n] is not None and grads[n].abs().sum() > 0) == mode.learns for n in routing)
    reaches_backbone = any(not torch.equal(grads[n], none[n]) for n in shared)
    assert reaches_backbone == (mode.learns and not mode.stops_at_backbone)


def test_set_routing_grad_switches_the_network_its_bank_and_its_routers() -> None:
    for name, built_as in (('isolated', 'none'), ('none', 'straight_through'), ('centered', 'straight_through')):
        switched, direct = routed_step(name, built_as=built_as), routed_step(name)
        assert switched.keys() == direct.keys()
        for key, value in direct.items():
            assert (switched[key] is None) if value is None else torch.equal(switched[key], value), (name, key)
    net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS))
    net.set_routing_grad('centered')
    moe = net.upsample.moe
    assert net.routing_grad is moe.routing_grad is moe.gate.routing_grad is ROUTING_GRAD_MODES['centered']
    with pytest.raises(ValueError, match=r"^MFGHMoEArch: `routing_grad` must be one of .*, got 'reinforce'$"):
        net.set_routing_grad('reinforce')
    hat = MFGHMoEArch(**tiny_hat())
    hat.set_routing_grad('isolated')
    assert hat.routing_grad is ROUTING_GRAD_MODES['isolated']


# ------------------------------------------------------------------------------------------------------
# validation
@pytest.mark.parametrize('overrides, message', [
    (dict(embed_dim=25), r'`embed_dim` \(25\) must be divisible by every head count; num_heads\[0\] = 2'),
    (dict(num_heads=[2, 2, 2]), r'`depths` and `num_heads` must have the same length.*got 2 and 3'),
    (dict(upsampler='pixelshuffledirect'), r'`upsampler` must be one of'),
    (dict(resi_connection='3conv'), r'`resi_connection` must be one of'),
    (dict(routing='triple'), r'`routing` must be one of'),
    (dict(attention='flash'), r'`attention` must be one of'),
    (dict(routing_grad='reinforce'), r"`routing_grad` must be one of \('none', 'straight_through', 'isolated', "
                                     r"'centered'\), got 'reinforce'"),
    (dict(routing_grad=['none']), r"`routing_grad` must be one of \(.*\), got \['none'\]"),
    (dict(window_size=0), r'`window_size` must be an integer >= 1'),
    (dict(depths=[1, 0]), r'`depths\[1\]` must be an integer >= 1'),
    (dict(img_size=2), r'`img_size` must be at least window_size'),
    (dict(overlap_ratio=0.25), r'`overlap_ratio` must be >= 0 with int\(window_size \* overlap_ratio\) even'),
    (dict(rgb_mean=[0.5, 0.5]), r'`rgb_mean` must be null or a list of in_chans \(3\)'),
    (dict(drop_path_rate=1.5), r'`drop_path_rate` must be a number in \[0, 1\)'),
    (dict(use_checkpoint='yes'), r'`use_checkpoint` must be true or false'),
    (dict(balance='loss'), r"`balance` must be one of \('none', 'bias'\), got 'loss'"),
    (dict(balance='bias', balance_rate=0), r'`balance_rate` must be a number in \(0, 1\], got 0'),
    (dict(balance='bias', balance_until=0), r'`balance_until` must be null or a positive number of training '
                                            r'iterations, got 0'),
    (dict(balance='bias', balance_until=1.5), r'`balance_until` must be null or a positive'),
    (dict(balance_until=100), r'`balance_until` must be null unless balance is bias .*, got 100'),
    (dict(routing_norm='batch'), r"`routing_norm` must be one of \('none', 'center'\)"),
    (dict(moe=False, mfa=False, balance='bias'), r'`balance` must be none when moe is false'),
    (dict(moe=False, mfa=False, routing_norm='center'), r'`routing_norm` must be none when moe is false'),
    (dict(squeeze_factor=100), r'`squeeze_factor` must be at most embed_dim'),
    (dict(moe=False, mfa=True), r'`mfa` must be false when moe is false'),
    (dict(moe=False, mfa=False, upscale=5), r'`upscale` must be a power of 2 or 3'),
    (dict(top_k=9), r'`top_k` must be at most 8'),
    (dict(top_k=17, routing='single'), r'`top_k` must be at most 16'),
    (dict(expert_groups=[{'kernel_size': 2, 'num_experts': 4}]), r'`expert_groups\[0\].kernel_size` must be odd'),
    (dict(expert_groups=[{'kernel_size': 3}]), r'`expert_groups\[0\]` must be a mapping with exactly'),
    (dict(expert_groups=[]), r'`expert_groups` must be a non-empty list'),
    (dict(expert_groups=[{'kernel_size': 1, 'num_experts': 0}]), r'`expert_groups\[0\].num_experts` must be'),
])
def test_invalid_configurations_raise_value_error_naming_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MFGHMoEArch(**tiny(**overrides))


def test_unknown_keyword_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['embed_dims'\] \(did you mean: embed_dims -> "
                                         r"embed_dim\?\); valid keys: img_size"):
        MFGHMoEArch(**tiny(embed_dims=16))


def test_constructor_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        MFGHMoEArch(64)


# ------------------------------------------------------------------------------------------------------
# MoE configurations
def test_uneven_groups_over_three_kernel_sizes() -> None:
    groups = [{'kernel_size': 1, 'num_experts': 5}, {'kernel_size': 3, 'num_experts': 6},
              {'kernel_size': 5, 'num_experts': 5}]
    net = MFGHMoEArch(**tiny(expert_groups=groups, upscale=3)).eval()
    experts = net.upsample.moe.experts
    assert [tuple(e.weight.shape) for e in experts] == [(576, 64, 1, 1)] * 5 + [(576, 64, 3, 3)] * 6 + \
        [(576, 64, 5, 5)] * 5
    assert [g.out_features for g in net.upsample.moe.gate.w_expert_gates] == [5, 6, 5]
    assert net.upsample.moe.gate.group_embedding.weight.shape == (3, 64)
    with torch.no_grad():
        out = net(torch.rand(1, 3, 8, 12))
    assert out.shape == (1, 3, 24, 36)
    maps = net.routing_maps()
    starts = torch.tensor([0, 5, 11])
    local = maps['expert'][..., 0] - starts[maps['group']]
    assert (local >= 0).all() and (local < torch.tensor([5, 6, 5])[maps['group']]).all()


@pytest.mark.parametrize('routing, top_k', [('single', 1), ('single', 3), ('dual', 2)])
def test_routing_variants_train(routing: str, top_k: int) -> None:
    net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS, routing=routing, top_k=top_k, upscale=2,
                             routing_grad='straight_through')).train()
    out = net(torch.rand(2, 3, 8, 8))
    assert out.shape == (2, 3, 16, 16)
    assert net.routing_maps()['expert'].shape == (2, 8, 8, top_k)
    (out.mean() + net.aux_loss()).backward()
    gate = net.upsample.moe.gate
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
    if routing == 'single':
        assert set(dict(gate.named_parameters())) == {'w_gate.weight', 'w_gate.bias'}


def test_aux_loss_and_routing_maps_without_moe_are_none() -> None:
    net = MFGHMoEArch(**tiny_hat())
    net(torch.rand(1, 3, 8, 8))
    assert net.aux_loss() is None and net.routing_maps() is None


def test_routing_maps_are_from_the_last_forward_without_a_second_one() -> None:
    net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS)).eval()
    calls = []
    net.upsample.moe.gate.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        net(torch.rand(2, 3, 8, 12))
    maps = net.routing_maps()
    assert len(calls) == 1
    assert maps['group'].shape == (2, 8, 12) and maps['expert'].shape == (2, 8, 12, 1)
    assert torch.equal(maps['expert'][..., 0] // 2, maps['group'])


def test_without_mfa_the_routers_read_the_reconstruction_features() -> None:
    net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS, mfa=False, routing_grad='straight_through')).eval()
    assert not any(k.startswith(('mfg.', 'aggr_conv.')) for k in net.state_dict())
    seen = {}

    def keep(module, inputs, output) -> None:
        seen['inputs'] = inputs

    net.upsample.register_forward_hook(keep)
    with torch.no_grad():
        net(torch.rand(1, 3, 8, 8))
    assert seen['inputs'][0] is seen['inputs'][1]


def test_use_checkpoint_with_moe_gives_the_same_gradients() -> None:
    x = torch.rand(2, 3, 8, 8)
    plain = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS, drop_path_rate=0.0)).train()
    ckpt = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS, drop_path_rate=0.0, use_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    _, plain_grads = saved_bytes_and_grads(plain, x)
    _, ckpt_grads = saved_bytes_and_grads(ckpt, x)
    for name, grad in plain_grads.items():
        if grad is not None:
            torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class CodeOnLoad:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f'touch {self.marker}',)


def test_checkpoints_that_need_arbitrary_unpickling_are_refused(tmp_path) -> None:
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'evil.pth'
    torch.save({'params': CodeOnLoad(marker)}, path)
    net = MFGHMoEArch(**tiny_hat())
    with pytest.raises(ValueError, match=r'evil.pth: not a PyTorch checkpoint of tensors \(torch.load with '
                                         r'weights_only=True cannot read it'):
        net.load_pretrained(path)
    from hmoe_arch.errors import OptionError
    from hmoe_arch.loading import load_network
    with pytest.raises(OptionError, match=r'weights_only=True'):
        load_network(path, {'type': 'MFGHMoEArch', **tiny_hat()}, torch.device('cpu'))
    assert not marker.exists()
