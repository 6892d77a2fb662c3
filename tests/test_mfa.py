"""Multi-level feature aggregation: layout of the authors' ``mfg`` list and the aggregation path."""
import torch
import torch.nn.functional as F

from hmoe_arch import MFGHMoEArch
from hmoe_arch.archs.hat_blocks import shifted_window_mask
from hmoe_arch.archs.mfa import MultiLevelFeatureAggregation, routing_projection

from util import SMALL_GROUPS, tiny


def test_interleaved_layout_and_named_access() -> None:
    mfa = MultiLevelFeatureAggregation(3, 12, 8)
    assert len(mfa) == 6
    assert isinstance(mfa.level_norm(2), torch.nn.LayerNorm) and mfa.level_norm(2) is mfa[4]
    assert mfa.branch(1) is mfa[3]
    shapes = {k: tuple(v.shape) for k, v in mfa.state_dict().items()}
    assert shapes['0.weight'] == (12,) and shapes['1.0.weight'] == (8, 12, 3, 3) and shapes['5.2.weight'] == (12, 8,
                                                                                                              3, 3)
    assert tuple(routing_projection(12, 8)(torch.randn(1, 12, 4, 4)).shape) == (1, 8, 4, 4)


def test_routing_features_are_the_normalised_sum_of_the_branches() -> None:
    net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS)).eval()
    seen = {}

    def keep(module, inputs, output) -> None:
        seen['routing'] = inputs[1]

    net.upsample.register_forward_hook(keep)
    x = torch.rand(1, 3, 8, 8)
    mask = shifted_window_mask(8, 8, net.window_size, net.shift_size)
    with torch.no_grad():
        net(x)
        tokens = net.patch_embed(net.conv_first(x))
        branch_sum = torch.zeros(1, 24, 8, 8)
        for i, layer in enumerate(net.layers):
            tokens = layer(tokens, (8, 8), net.relative_position_index_SA, net.relative_position_index_OCA, mask)
            tokens = net.mfg.level_norm(i)(tokens)
            branch_sum += net.mfg.branch(i)(tokens.transpose(1, 2).reshape(1, 24, 8, 8))
        normed = net.norm(branch_sum.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(1, 24, 8, 8)
        expected = F.leaky_relu(net.aggr_conv[0](normed), 0.01)
    torch.testing.assert_close(seen['routing'], expected)


def test_main_path_is_normalised_after_every_group() -> None:
    net = MFGHMoEArch(**tiny(expert_groups=SMALL_GROUPS)).eval()
    seen = {}

    def keep(module, inputs, output) -> None:
        seen['next_input'] = inputs[0]

    net.layers[1].register_forward_hook(keep)
    with torch.no_grad():
        net(torch.rand(1, 3, 8, 8))
    tokens = seen['next_input']
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(1, 64), atol=1e-5, rtol=0)
