"""MFGHMoEModel: BasicSR's SRModel with what MFG-HMoE training and evaluation need on top.

Differences from ``SRModel`` (everything else is SRModel's):

- ``use_amp: bf16`` (top level): training forward and inference under bf16 autocast (the MoE routing stays
  fp32; outputs and losses are fp32);
- ``compile: true`` (top level): ``torch.compile`` of net_g (and of its EMA copy for inference); checkpoints
  keep plain keys. The sparse MoE dispatch splits the graph where it reads the per-expert pixel counts
  (one graph break per forward);
- ``test``: pads LR to a multiple of ``window_size`` and crops the output (HAT's behaviour); with
  ``tile: {tile_size, tile_pad}`` it runs tile by tile (:mod:`hmoe_arch.tiling`), and errors surface; the
  network's train/eval mode is restored afterwards;
- ``get_optimizer``: Adam with its fused kernel (``fused: true``) unless ``optim_g`` says ``fused`` or ``foreach``;
- ``setup_optimizers``: with ``train.routing_lr_scale`` the routing parameters (routers, group embedding, MFA
  branches, ``aggr_conv``) learn at that multiple of the learning rate (a second Adam parameter group);
- ``optimize_parameters``: adds ``train.aux_loss_weight * net_g.aux_loss()`` (logged as ``l_aux``) when the
  weight is positive, records which expert each LR pixel used, and times the first iterations: one early log
  line with the time per iteration, the loss so far and the estimated time left
  (:class:`~hmoe_arch.training_log.RunEstimate`);
- ``get_current_log``: adds expert usage since the last log (``routing/group_{g}``, ``routing/expert_{e}``:
  fractions of routed LR pixels, summed over ranks; ``routing/entropy``: entropy of the expert usage in nats,
  ``log(num_experts)`` when balanced), which BasicSR's MessageLogger writes to the log and TensorBoard
  (:class:`~hmoe_arch.training_log.TrainingMessageLogger` summarises them in the log line);
- ``model_to_device``: DistributedDataParallel on CPU (gloo) as well as GPUs, with unused parameters allowed
  (experts that no pixel of a batch selected get no gradient);
- ``load_network``: :meth:`MFGHMoEArch.load_pretrained` (``weights_only`` loading, one report of what kept its
  initialisation), so ``strict_load_g: false`` starts from a HAT checkpoint;
- ``save``: in distributed training, checks that all replicas hold identical weights before writing; every
  checkpoint and training state is written into a temporary folder beside its folder, read back
  (``weights_only``), flushed and renamed, so a run killed while saving never leaves a truncated file; a save that
  fails (a full disk) is not retried and ignored as in BasicSR but stops training with one line naming the file
  (:class:`OptionError`, exit status 2), the files saved before intact;
- non-finite losses or gradients stop training before the optimizer step (:class:`NonFiniteLossError`
  names the iteration and the term), or with ``train.skip_nonfinite: N`` skip up to N such steps with a
  warning each;
- validation (during training and in ``basicsr test``) shows SRModel's progress bar (images, with an ETA, on
  stderr; rank 0 only) unless ``val.pbar: false``;
- validation with ``val.save_expert_maps: true``: per image an expert map (SR image, map, legend) in
  ``<results or experiment>/expert_maps/<dataset>/`` and ``expert_usage.csv`` per scene class there;
- every validation of an MoE network logs the routing over all its images after BasicSR's lines
  (:class:`~hmoe_arch.expert_maps.RoutingStats`: experts serving >= 1 % of the LR pixels, usage entropy, group
  shares, the share of pixels rerouted since the previous validation of the set, and every expert's share), and
  sends them to TensorBoard under ``val_routing/<set>/``; with ``tile`` the routing of every tile is merged.
"""
import errno
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY
from torch.nn.parallel import DistributedDataParallel

from ..archs import MFGHMoEArch
from ..atomic import staged_files
from ..checkpoints import CONFIG_ENTRY
from ..errors import NonFiniteLossError, OptionError
from ..expert_maps import ExpertMapWriter, RoutingStats, RoutingSummary, group_sizes_of, lr_routing_map
from ..options import check_model_options, plain_options
from ..tiling import padded_forward, tiled_forward, window_size_of
from ..training_log import RunEstimate


@MODEL_REGISTRY.register()
class MFGHMoEModel(SRModel):
    """SR model for MFGHMoEArch (and any BasicSR network: the MoE parts apply only where the network has them).

    Option keys on top of SRModel's: ``tile: {tile_size, tile_pad}``, ``use_amp: bf16``, ``compile`` (top level),
    ``train.aux_loss_weight`` (default 0), ``train.routing_lr_scale`` (default 1),
    ``train.skip_nonfinite`` (default 0), ``find_unused_parameters``
    (default true, distributed training).
    """

    def __init__(self, opt: Dict[str, Any]) -> None:
        check_model_options(opt)  # before anything is built
        super().__init__(opt)
        bare = self.get_bare_model(self.net_g)
        self.window_size = window_size_of(bare, opt.get('network_g'))
        self.scale = int(opt.get('scale', 1))
        self.tile = opt.get('tile')
        train = opt.get('train') or {}
        self.aux_loss_weight = float(train.get('aux_loss_weight', 0.0)) if self.is_train else 0.0
        if self.aux_loss_weight > 0 and not (isinstance(bare, MFGHMoEArch) and bare.moe):
            raise OptionError('MFGHMoEModel: `train.aux_loss_weight` > 0 needs an MFGHMoEArch network with `moe: true` '
                              f'(the load-balancing loss of its routers), but network_g is {type(bare).__name__}'
                              f'{" with moe: false" if isinstance(bare, MFGHMoEArch) else ""}; set the weight to 0')
        if self.aux_loss_weight > 0 and not bare.routing_grad.learns:
            raise OptionError('MFGHMoEModel: `train.aux_loss_weight` > 0 needs routers that learn, but '
                              f'`network_g.routing_grad` is {bare.routing_grad.name} (the load-balancing loss would '
                              'reach no parameter); set routing_grad to isolated or straight_through, or the weight '
                              'to 0')
        self.skip_nonfinite = train.get('skip_nonfinite', 0) if self.is_train else 0
        self.skipped_steps = 0
        self.steps_taken = 0
        """Optimizer steps taken since the model was built (or resumed): whether the weights changed."""
        self.validated: Dict[str, Tuple[int, int]] = {}
        """Validation set name -> (:attr:`steps_taken`, iteration) of its last validation in training."""
        amp = opt.get('use_amp', False)
        self.amp_dtype = torch.bfloat16 if amp == 'bf16' else None
        compiled = opt.get('compile', False)
        self._inference_net = None
        if compiled:
            self.net_g = torch.compile(self.net_g)
            if hasattr(self, 'net_g_ema'):
                # a compiled view of the same module: BasicSR's EMA update walks net_g_ema's own parameters
                self._inference_net = torch.compile(self.net_g_ema)
        self._expert_counts: Optional[torch.Tensor] = None
        self.expert_maps: Optional[ExpertMapWriter] = None
        """Where :meth:`test` draws the routing of each image: set by :meth:`nondist_validation` for one pass with
        ``val.save_expert_maps`` (BasicSR's validation loop calls ``test()`` per image), ``None`` otherwise."""
        self._lq_path: Optional[str] = None
        self.routing_stats: Dict[str, RoutingStats] = {}
        """Validation set name -> the routing statistics of its passes (MoE networks; :meth:`nondist_validation`)."""
        self._routing_pass: Optional[RoutingStats] = None
        """The statistics :meth:`test` adds each image's routing to during a validation pass, ``None`` otherwise."""

    # ------------------------------------------------------------------------------------------------------
    # devices and weights
    def get_bare_model(self, net: torch.nn.Module) -> torch.nn.Module:
        """The network inside DataParallel/DistributedDataParallel and ``torch.compile`` wrappers."""
        net = super().get_bare_model(getattr(net, '_orig_mod', net))
        return getattr(net, '_orig_mod', net)

    def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
        if not self.opt['dist']:
            return super().model_to_device(net)
        net = net.to(self.device)
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        return DistributedDataParallel(net, device_ids=device_ids,
                                       find_unused_parameters=self.opt.get('find_unused_parameters', True))

    def load_network(self, net: torch.nn.Module, load_path: str, strict: bool = True,
                     param_key: str = 'params') -> None:
        bare = self.get_bare_model(net)
        try:
            if not isinstance(bare, MFGHMoEArch):
                return super().load_network(net, load_path, strict, param_key)
            bare.load_pretrained(load_path, param_key=param_key, strict=strict)
        except (ValueError, FileNotFoundError, RuntimeError, KeyError) as error:
            raise OptionError(f'path.pretrain_network_g {load_path}: {error}') from error

    def setup_optimizers(self) -> None:
        """SRModel's optimizer; with ``train.routing_lr_scale`` the routing parameters
        (:meth:`MFGHMoEArch.routing_parameter_names`) form a second group at that multiple of the learning rate."""
        scale = self.opt['train'].get('routing_lr_scale', 1.0)  # a number > 0 (check_model_options)
        bare = self.get_bare_model(self.net_g)
        if scale == 1.0:
            return super().setup_optimizers()
        if not isinstance(bare, MFGHMoEArch) or not bare.moe or not bare.routing_grad.learns:
            raise OptionError('MFGHMoEModel: `train.routing_lr_scale` needs routers that learn (an MFGHMoEArch with '
                              'moe: true and routing_grad other than none)')
        routing = set(bare.routing_parameter_names())
        named = [(n, p) for n, p in bare.named_parameters() if p.requires_grad]
        optim = dict(self.opt['train']['optim_g'])
        optim_type = optim.pop('type')
        groups = [{'params': [p for n, p in named if n not in routing]},
                  {'params': [p for n, p in named if n in routing], 'lr': optim['lr'] * scale}]
        self.optimizer_g = self.get_optimizer(optim_type, groups, **optim)
        self.optimizers.append(self.optimizer_g)

    def get_optimizer(self, optim_type: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
        """BasicSR's optimizer, with Adam's fused kernel (``fused=True``: one kernel for all parameters instead of
        about ten small operations per parameter tensor; in a tiny CPU iteration 3.0 ms instead of 9.7,
        ``docs/performance.md``) unless ``optim_g`` sets ``fused`` or ``foreach`` itself, or a parameter is on
        a device or in a dtype the fused kernel does not take. The update is Adam's, to float rounding."""
        if optim_type == 'Adam' and 'fused' not in kwargs and 'foreach' not in kwargs and _fused_adam_applies(params):
            kwargs['fused'] = True
        return super().get_optimizer(optim_type, params, lr, **kwargs)

    def model_ema(self, decay: float = 0.999) -> None:
        """BasicSR's EMA of the parameters, plus the routing-balance buffers (``balance: bias``, ``routing_norm:
        center``), which decide the EMA network's routing too: floating ones averaged like the parameters, counters
        copied."""
        super().model_ema(decay)
        net = self.get_bare_model(self.net_g)
        names = net.balance_state_names() if isinstance(net, MFGHMoEArch) else []
        if not names:
            return
        ours, theirs = dict(net.named_buffers()), dict(self.net_g_ema.named_buffers())
        for name in names:
            if theirs[name].is_floating_point():
                theirs[name].mul_(decay).add_(ours[name], alpha=1 - decay)
            else:
                theirs[name].copy_(ours[name])

    def save(self, epoch: int, current_iter: int) -> None:
        if self.opt['dist']:
            self._check_replicas_in_sync()
        super().save(epoch, current_iter)

    def save_network(self, net, net_label, current_iter, param_key='params') -> None:
        """BasicSR's checkpoint (``{param_key: state_dict}``, ``module.`` prefixes removed, on the CPU) plus the
        network's options under ``network_g`` (:data:`~hmoe_arch.archs.config.CONFIG_ENTRY`), so that ``infer``,
        ``export`` and spandrel rebuild it from the file alone; written atomically and verified
        (:meth:`_atomically`)."""
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError(f'save_network: {len(nets)} networks but {len(keys)} parameter keys')
        label = 'latest' if current_iter == -1 else current_iter
        checkpoint: Dict[str, Any] = {}
        for one, key in zip(nets, keys):
            checkpoint[key] = {(k[len('module.'):] if k.startswith('module.') else k): v.cpu()
                               for k, v in self.get_bare_model(one).state_dict().items()}
        if net_label == 'net_g' and isinstance(self.opt.get('network_g'), dict):
            checkpoint[CONFIG_ENTRY] = plain_options(self.opt['network_g'])
        self._atomically('models', f'{net_label}_{label}.pth', checkpoint)

    def save_training_state(self, epoch, current_iter) -> None:
        """BasicSR's training state ``<current_iter>.state`` (``epoch``, ``iter`` and the ``state_dict`` of every
        optimizer and scheduler; nothing for ``current_iter == -1``), written atomically and verified
        (:meth:`_atomically`). Unlike BasicSR's, a failed write is not retried and logged but stops training."""
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter,
                 'optimizers': [optimizer.state_dict() for optimizer in self.optimizers],
                 'schedulers': [scheduler.state_dict() for scheduler in self.schedulers]}
        self._atomically('training_states', f'{current_iter}.state', state)

    def _atomically(self, folder_key: str, name: str, content: Dict[str, Any]) -> None:
        """Save ``content`` as ``opt['path'][folder_key]/name``, on rank 0 only: ``torch.save`` into a temporary
        folder beside the folder, checked (more than 0 bytes, and ``torch.load(..., weights_only=True)`` reads it
        back), flushed and renamed into the folder (:func:`hmoe_arch.atomic.staged_files`).

        Raises:
            OptionError: when the file cannot be written or read back (a full disk, a read-only or vanished
                folder), naming the file and the reason; nothing was moved into the folder, so the files saved
                before are intact.
        """
        if self.opt.get('rank', 0) != 0:
            return
        final = Path(self.opt['path'][folder_key])
        try:
            with staged_files(final) as staging:
                _save_checked(content, staging / name)
        except (OSError, RuntimeError) as error:
            raise OptionError(f'{final / name}: cannot save it ({_save_failure(error, final)}); training stopped, '
                              'the checkpoints and training states saved before are intact (free space, then '
                              '--auto_resume continues from the newest state)') from error

    def _check_replicas_in_sync(self) -> None:
        bare = self.get_bare_model(self.net_g)
        local = torch.stack([p.detach().double().sum() for p in bare.parameters()]).to(self.device)
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        if any(not torch.equal(g, gathered[0]) for g in gathered[1:]):
            raise RuntimeError('MFGHMoEModel: the replicas of net_g differ across ranks; refusing to save')
        get_root_logger().info(f'net_g replicas in sync across {len(gathered)} ranks '
                               f'(weight checksum {float(gathered[0].sum()):.6e})')

    # ------------------------------------------------------------------------------------------------------
    # training
    def _autocast(self):
        """bf16 autocast when ``use_amp: bf16`` (no loss scaling is needed for bf16), else a no-op context."""
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    run_estimate: Optional[RunEstimate] = None
    """Times the first training iterations and logs the estimate of the run's duration (:class:`RunEstimate`;
    created by the first :meth:`optimize_parameters` when the options have ``train.total_iter``)."""

    def optimize_parameters(self, current_iter: int) -> None:
        if self.run_estimate is None and self.opt['train'].get('total_iter') is not None:
            on_cpu, threads = self.device.type == 'cpu', torch.get_num_threads()
            self.run_estimate = RunEstimate(self.opt['train']['total_iter'], on_cpu=on_cpu,
                                            device=f'the CPU ({threads} thread{"s" * (threads != 1)})' if on_cpu
                                            else str(self.device))
        self.optimizer_g.zero_grad()
        with self._autocast():
            self.output = self.net_g(self.lq)
        self.output = self.output.float()
        bare = self.get_bare_model(self.net_g)
        l_total = 0
        loss_dict = OrderedDict()
        if self.cri_pix:
            l_pix = self.cri_pix(self.output, self.gt)
            l_total += l_pix
            loss_dict['l_pix'] = l_pix
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(self.output, self.gt)
            if l_percep is not None:
                l_total += l_percep
                loss_dict['l_percep'] = l_percep
            if l_style is not None:
                l_total += l_style
                loss_dict['l_style'] = l_style
        if self.aux_loss_weight > 0:
            l_aux = self.aux_loss_weight * bare.aux_loss()
            l_total += l_aux
            loss_dict['l_aux'] = l_aux
        bad = [name for name, value in loss_dict.items() if not torch.isfinite(value).all()]
        if not bad:
            l_total.backward()
            grads = [p.grad for p in bare.parameters() if p.grad is not None]
            if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
                bad = [f'gradient of {name}' for name, p in bare.named_parameters()
                       if p.grad is not None and not torch.isfinite(p.grad).all()][:3]
        if bad:
            self._non_finite(current_iter, bad)
            return
        self.optimizer_g.step()
        self.steps_taken += 1
        self._record_routing(bare)
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        if self.run_estimate is not None:
            self.run_estimate.step(current_iter, self.log_dict)

    def _non_finite(self, current_iter: int, terms) -> None:
        """Stop (or, within ``train.skip_nonfinite``, skip) a step whose loss or gradient is NaN/Inf."""
        self.optimizer_g.zero_grad()
        message = f'iteration {current_iter}: non-finite {", ".join(terms)}'
        if self.skipped_steps >= self.skip_nonfinite:
            raise NonFiniteLossError(f'{message}; training stopped before the optimizer step, the newest checkpoint '
                                     'is the last one saved (train.skip_nonfinite allows skipping such steps)')
        self.skipped_steps += 1
        get_root_logger().warning(f'{message}; step skipped ({self.skipped_steps} of '
                                  f'train.skip_nonfinite={self.skip_nonfinite})')
        self.log_dict = OrderedDict()

    def _record_routing(self, bare: torch.nn.Module) -> None:
        maps = bare.routing_maps() if isinstance(bare, MFGHMoEArch) else None
        if maps is None:
            return
        experts = maps['expert'].flatten()
        if self._expert_counts is None:
            self._expert_counts = torch.zeros(sum(group_sizes_of(bare)), dtype=torch.float64, device=experts.device)
        # accumulated on the training device (a fixed-size index_add, unlike bincount, needs no host sync)
        self._expert_counts.index_add_(0, experts, torch.ones_like(experts, dtype=torch.float64))

    def get_current_log(self) -> Dict[str, float]:
        log = dict(super().get_current_log())
        if self._expert_counts is None:
            return log
        counts, self._expert_counts = self._expert_counts, None
        if self.opt['dist']:
            dist.all_reduce(counts)
        share = (counts / counts.sum()).cpu()
        sizes = group_sizes_of(self.get_bare_model(self.net_g))
        for g, part in enumerate(share.split(sizes)):
            log[f'routing/group_{g}'] = float(part.sum())
        for e, value in enumerate(share.tolist()):
            log[f'routing/expert_{e:02d}'] = value
        used = share[share > 0]
        log['routing/entropy'] = abs(float(-(used * used.log()).sum()))
        return log

    # ------------------------------------------------------------------------------------------------------
    # inference
    def feed_data(self, data: Dict[str, Any]) -> None:
        super().feed_data(data)
        paths = data.get('lq_path')
        self._lq_path = paths[0] if isinstance(paths, (list, tuple)) else paths

    def validation(self, dataloader, current_iter, tb_logger, save_img=False) -> None:
        """BasicSR's validation, but in training weights that were already validated on this set are not validated
        again: BasicSR's training loop validates once more after its last iteration, which repeats the pass of
        that iteration whenever ``val_freq`` divides ``total_iter`` (one line in the log says so)."""
        name = dataloader.dataset.opt['name']
        last = self.validated.get(name)
        if self.is_train and last is not None and last[0] == self.steps_taken:
            get_root_logger().info(f'{name}: the weights are those validated at iteration {last[1]}; not validated '
                                   'again')
            return
        super().validation(dataloader, current_iter, tb_logger, save_img)
        if self.is_train:
            self.validated[name] = (self.steps_taken, current_iter)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """SRModel's validation loop (``validation`` during training, ``basicsr test``) with its progress bar
        (images, with an ETA, on stderr) on by default: ``val.pbar: false`` turns it off, and only rank 0 shows
        it; with ``val.save_expert_maps`` also the expert maps. On an MoE network the routing of the pass (all its
        images, :class:`RoutingStats`) is logged after BasicSR's lines and sent to ``tb_logger`` when given."""
        val = self.opt['val']
        shown = val.get('pbar', True)
        if not isinstance(shown, bool):
            raise OptionError(f'MFGHMoEModel: `val.pbar` must be true or false, got {shown!r}')
        given = {'pbar': val['pbar']} if 'pbar' in val else {}
        val['pbar'] = shown and self.opt.get('rank', 0) == 0  # what SRModel's loop reads (its default: no bar)
        self._routing_pass = self._routing_stats_of(dataloader.dataset.opt['name'])
        try:
            self._validation_with_expert_maps(dataloader, current_iter, tb_logger, save_img)
        finally:
            val.pop('pbar')
            val.update(given)
            stats, self._routing_pass = self._routing_pass, None
        if stats is not None:
            self._log_routing(stats.finish(current_iter), current_iter, tb_logger)

    def _routing_stats_of(self, name: str) -> Optional[RoutingStats]:
        """The routing statistics of validation set ``name``, a pass begun (``None`` without MoE)."""
        bare = self.get_bare_model(self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g)
        if not (isinstance(bare, MFGHMoEArch) and bare.moe):
            return None
        stats = self.routing_stats.get(name)
        if stats is None:
            stats = self.routing_stats[name] = RoutingStats(name, group_sizes_of(bare))
        stats.begin()
        return stats

    @staticmethod
    def _log_routing(summary: Optional[RoutingSummary], current_iter, tb_logger) -> None:
        """The routing lines of one validation pass in the log, and its values in TensorBoard when given."""
        if summary is None:
            return
        logger = get_root_logger()
        for line in summary.lines():
            logger.info(line)
        if tb_logger:
            for tag, value in summary.scalars().items():
                tb_logger.add_scalar(tag, value, current_iter)

    def _validation_with_expert_maps(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """SRModel's validation loop; with ``val.save_expert_maps`` on an MoE network, the expert map of every image
        and the usage per scene class in ``<results or experiment>/expert_maps/<dataset>/``."""
        bare = self.get_bare_model(self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g)
        wanted = self.opt['val'].get('save_expert_maps', False)
        if not wanted or not (isinstance(bare, MFGHMoEArch) and bare.moe):
            return super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
        if self.tile is not None:
            raise OptionError('MFGHMoEModel: val.save_expert_maps needs untiled inference (remove `tile`)')
        root = Path(self.opt['path']['visualization']).parent
        self.expert_maps = ExpertMapWriter(root / 'expert_maps' / dataloader.dataset.opt['name'], bare, self.scale)
        try:
            super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
            self.expert_maps.close()
        finally:
            self.expert_maps = None

    def test(self) -> None:
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        runner = net if self._inference_net is None else self._inference_net
        was_training = net.training
        net.eval()
        try:
            tiles: List[torch.Tensor] = []
            if self.tile is not None and self._routing_pass is not None:
                runner = self._recording_routing(runner, self.get_bare_model(net), tiles)
            with torch.no_grad(), self._autocast():
                if self.tile is None:
                    self.output = padded_forward(runner, self.lq, self.scale, self.window_size)
                else:
                    self.output = tiled_forward(runner, self.lq, self.scale, self.window_size,
                                                self.tile['tile_size'], self.tile['tile_pad'])
            self.output = self.output.float()
        finally:
            net.train(was_training)
        if self._routing_pass is not None:
            height, width = self.lq.shape[2:]
            experts = (lr_routing_map(self.get_bare_model(net), height, width) if self.tile is None
                       else self._tiled_routing(tiles, height, width))
            self._routing_pass.add(Path(self._lq_path).stem, experts)
        if self.expert_maps is not None:
            self.expert_maps.add(Path(self._lq_path).stem, self.get_bare_model(net), self.lq.shape[2],
                                 self.lq.shape[3], tensor2img(self.output.detach().cpu()))

    @staticmethod
    def _recording_routing(runner: Callable[[torch.Tensor], torch.Tensor], bare: torch.nn.Module,
                           tiles: List[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``runner`` that also appends each forward's experts ``(H, W, K)`` (first image, on the CPU) to ``tiles``."""
        def recording(x: torch.Tensor) -> torch.Tensor:
            out = runner(x)
            tiles.append(bare.routing_maps()['expert'][0].cpu())
            return out

        return recording

    def _tiled_routing(self, tiles: List[torch.Tensor], height: int, width: int) -> np.ndarray:
        """``(height, width, K)`` experts of an image inferred tile by tile, from the routing of each tile (``tiles``,
        in the order :func:`tiled_forward` ran them): every LR pixel from the tile whose output kept it. The maps
        are replayed through :func:`tiled_forward` itself (scale 1, no padding), so they are placed as its outputs
        were."""
        replay = iter(tiles)

        def recorded(context: torch.Tensor) -> torch.Tensor:
            """``(1, 1, h, w)`` context of the next tile -> its experts ``(1, K, h, w)`` (padding cropped)."""
            experts = next(replay, None)
            if experts is None:
                raise RuntimeError('MFGHMoEModel: tiled inference ran fewer forwards than it has tiles')
            return experts[:context.shape[2], :context.shape[3]].permute(2, 0, 1)[None].float()

        assembled = tiled_forward(recorded, torch.zeros(1, 1, height, width), 1, 1, self.tile['tile_size'],
                                  self.tile['tile_pad'])
        if next(replay, None) is not None:
            raise RuntimeError('MFGHMoEModel: tiled inference ran more forwards than it has tiles')
        return assembled[0].permute(1, 2, 0).long().numpy()


FUSED_ADAM_DEVICES = ('cpu', 'cuda')
"""Devices whose parameters get Adam's fused kernel by default (:meth:`MFGHMoEModel.get_optimizer`)."""


def _fused_adam_applies(params) -> bool:
    """Whether every parameter (a list of tensors or of parameter-group dicts) is a floating-point tensor on a
    device of :data:`FUSED_ADAM_DEVICES`."""
    tensors = [p for group in params for p in (group['params'] if isinstance(group, dict) else [group])]
    return bool(tensors) and all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in tensors)


def _save_checked(content: Dict[str, Any], path: Path) -> None:
    """``torch.save(content, path)``, then check that ``path`` holds more than 0 bytes and that
    ``torch.load(path, weights_only=True)`` reads it back (a write cut short by a full disk that no error reported).

    Raises:
        OSError, RuntimeError: from the write (torch reports a failed write, a full disk among them, as a
            RuntimeError).
        OSError: ``EIO`` when the file is empty or cannot be read back, with the reason.
    """
    torch.save(content, str(path))
    size = path.stat().st_size
    if size == 0:
        raise OSError(errno.EIO, 'the written file is empty')
    try:
        torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:
        first = str(error).split('. ')[0].splitlines()[0] if str(error).strip() else 'no message'
        raise OSError(errno.EIO, f'the written file ({size} bytes) does not load back: {type(error).__name__}: '
                                 f'{first}') from error


def _save_failure(error: BaseException, folder: Path) -> str:
    """What went wrong in a save into ``folder``, in words: the OS's reason for an ``OSError``; for torch's
    ``RuntimeError`` (which hides the OS's reason) its message and the space left on the folder's file system."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return message
    return f'{message}; {free / 2 ** 20:.1f} MiB free on its file system'


MODEL_REGISTRY._do_register('MFGHMOEModel', MFGHMoEModel)
"""The authors' registry name, so their option files (``model_type: MFGHMOEModel``) run."""
