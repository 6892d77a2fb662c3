"""spandrel support: ``import hmoe_arch.spandrel`` and spandrel loads MFG-HMoE checkpoints.

spandrel (used by ComfyUI, chaiNNer and others) detects an architecture from the keys of a state_dict. An
MFG-HMoE checkpoint has all of HAT's keys plus the MoE head's, so without this module spandrel takes it for HAT
and fails on the extra keys. Importing this module adds :class:`MFGHMoEArchitecture` to ``spandrel.MAIN_REGISTRY``,
detected before HAT: checkpoints with MoE experts (this project's and the authors') load as an
``ImageModelDescriptor`` of :class:`~hmoe_arch.MFGHMoEArch`; plain HAT checkpoints (and this project's exact-HAT
configuration) keep loading as spandrel's HAT.

spandrel hands architectures the state_dict only, so the network is rebuilt from its tensors
(:func:`~hmoe_arch.archs.config.config_from_state_dict`) with the authors' values for what tensors do not record
(top-1 routing, no RGB mean, ``img_range`` 1): a network trained with ``top_k`` > 1, an ``rgb_mean`` or another
``img_range`` loads correctly through ``basicsr infer`` (which reads the options this project stores in its
checkpoints), not through spandrel.

A state_dict is data: the network is built only after its tensors pass the checks of
:mod:`hmoe_arch.checkpoints` (no broadcast views, the kinds of values the network expects) and its configuration
the size bounds of :func:`~hmoe_arch.archs.config.check_network_size`; spandrel has no flag for the memory limit,
so the environment variable ``HMOE_MAX_MEMORY_GIB`` raises it (default 8 GiB).

Needs the optional extra: ``pip install -e .[spandrel]``.
"""
try:
    from spandrel import MAIN_REGISTRY, Architecture, ArchSupport, ImageModelDescriptor, SizeRequirements
    from spandrel.util import KeyCondition
except ImportError:
    raise ImportError('hmoe_arch.spandrel needs spandrel: pip install -e .[spandrel]') from None

from .archs import MFGHMoEArch
from .archs.config import RAISE_WITH_VARIABLE, config_from_state_dict
from .checkpoints import check_stored_values, check_tensor_values

ARCH_ID = 'MFGHMoE'


class MFGHMoEArchitecture(Architecture[MFGHMoEArch]):
    """spandrel's view of :class:`~hmoe_arch.MFGHMoEArch` with its MoE upsampler."""

    def __init__(self) -> None:
        super().__init__(id=ARCH_ID, detect=KeyCondition.has_all(
            'relative_position_index_SA', 'relative_position_index_OCA', 'conv_first.weight',
            'layers.0.residual_group.blocks.0.attn.relative_position_bias_table',
            'layers.0.residual_group.overlap_attn.relative_position_bias_table',
            'upsample.0.experts.0.weight', 'conv_last.weight'))

    def load(self, state_dict) -> ImageModelDescriptor[MFGHMoEArch]:
        """The descriptor of the network ``state_dict`` describes. Nothing is built before the tensors pass
        :func:`~hmoe_arch.checkpoints.check_stored_values` and the configuration the size bounds (the memory limit is
        8 GiB unless the environment variable ``HMOE_MAX_MEMORY_GIB`` says otherwise); the tensors are checked
        against the network (:func:`~hmoe_arch.checkpoints.check_tensor_values`) before loading.

        Raises:
            CheckpointError: naming the tensor that shows more values than it stores, or that does not fit.
            ConfigError: naming the missing tensor or the configuration that is too large.
        """
        check_stored_values(state_dict, 'spandrel state_dict')
        config = config_from_state_dict(state_dict, how_to_raise=RAISE_WITH_VARIABLE)
        model = MFGHMoEArch(**config)
        check_tensor_values(model.state_dict(), state_dict, 'spandrel state_dict')
        model.load_state_dict(state_dict, strict=True)
        groups = '+'.join(f'{g["num_experts"]}x{g["kernel_size"]}' for g in config['expert_groups'])
        tags = [f'{config["embed_dim"]}dim', f'w{config["window_size"]}', f'{config["routing"]}-{groups}',
                'mfa' if config['mfa'] else 'no-mfa']
        return ImageModelDescriptor(
            model, state_dict, architecture=self, purpose='SR', tags=tags, supports_half=False,
            supports_bfloat16=True, scale=config['upscale'], input_channels=config['in_chans'],
            output_channels=config['in_chans'], size_requirements=SizeRequirements(multiple_of=config['window_size']))


def register() -> bool:
    """Add the architecture to spandrel's main registry (before HAT) once; returns whether this call added it."""
    if any(support.architecture.id == ARCH_ID for support in MAIN_REGISTRY.architectures('insertion')):
        return False
    MAIN_REGISTRY.add(ArchSupport.from_architecture(MFGHMoEArchitecture(), before=('HAT',)))
    return True


register()
