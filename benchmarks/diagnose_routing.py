"""Where does the routing gradient go, and what does it do to the routing? One short training per ``routing_grad``.

Trains the tiny network of ``bench_quality.py`` (same data, batch, optimiser, seed) once per mode and, every
``--every`` iterations, on that iteration's batch, measures

- ``g_mfa / g_rec``: norm of the gradient that reaches the backbone's features through the MFA branches (summed
  over levels) over the norm reaching them through the reconstruction path (the input of ``conv_after_body``);
- ``backbone shift``: ``||g - g_none|| / ||g_none||`` over all backbone parameters, ``g_none`` being the gradient
  of the same batch and weights with the routing gradient switched off (how much the routing gradient perturbs
  the backbone's update);
- ``router grad``: norm of the gradient of the routers, group embedding and MFA branches;
- expert usage of the interval (entropy in nats of the share of LR pixels per expert, experts used by >= 0.5% of
  the pixels), the mean per-pixel entropy of the expert router (confidence), and how many pixels of a fixed probe
  batch changed expert since the previous measurement (routing stability);
- per-expert update counts: in how many iterations each expert was selected by at least one pixel.

Writes ``OUT/diagnose.csv`` and ``OUT/diagnose.md``; the summary is in ``docs/does_it_learn.md``::

    python benchmarks/diagnose_routing.py --data datasets/UCMerced --out results/diagnose
"""
import argparse
import csv
import math
import random
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hmoe_arch  # noqa: E402,F401
from hmoe_arch import MFGHMoEArch  # noqa: E402
from hmoe_arch.archs.routing import ROUTING_GRADS  # noqa: E402
from hmoe_arch.data.rs_paired_dataset import RSPairedDataset  # noqa: E402

TINY = dict(embed_dim=24, depths=[2, 2], num_heads=[4, 4], window_size=8, squeeze_factor=8, upscale=4)


def backbone_grads(net: MFGHMoEArch) -> torch.Tensor:
    """Gradients of the backbone: neither the routing parameters nor the expert bank."""
    routing = set(net.routing_parameter_names())
    return torch.cat([p.grad.flatten() for n, p in net.named_parameters()
                      if p.grad is not None and n not in routing and not n.startswith('upsample.')])


def train(mode: str, args: argparse.Namespace) -> List[Dict[str, float]]:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    net = MFGHMoEArch(**TINY, routing_grad=mode).train()
    aux_weight = args.aux_weight if net.routing_grad.learns else 0.0  # else the loss would reach no parameter
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.9, 0.99))
    dataset = RSPairedDataset({'phase': 'train', 'scale': 4, 'dataroot_gt': str(args.data / 'Train'),
                               'split_file': str(args.data / 'train.txt'), 'degradation': 'bicubic',
                               'io_backend': {'type': 'disk'}, 'gt_size': 64, 'use_hflip': True, 'use_rot': True})
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    probe = torch.stack([dataset[i]['lq'] for i in range(4)])
    moe = net.upsample.moe
    experts = len(moe.experts)
    updates = torch.zeros(experts)
    interval = torch.zeros(experts)
    branch_grads: List[torch.Tensor] = []

    def keep_branch_grad(module, inputs) -> None:
        if inputs[0].requires_grad:
            inputs[0].register_hook(lambda g: branch_grads.append(g.norm()))

    rec_grads: List[torch.Tensor] = []

    def keep_rec_grad(module, inputs) -> None:
        if inputs[0].requires_grad:
            inputs[0].register_hook(lambda g: rec_grads.append(g.norm()))

    for level in range(len(TINY['depths'])):
        net.mfg.branch(level).register_forward_pre_hook(keep_branch_grad)
    net.conv_after_body.register_forward_pre_hook(keep_rec_grad)
    previous_probe = None
    rows: List[Dict[str, float]] = []
    iteration = 0
    while iteration < args.iters:
        for batch in loader:
            iteration += 1
            measure = iteration % args.every == 0 or iteration == 1
            branch_grads.clear()
            rec_grads.clear()
            optimiser.zero_grad()
            rng = torch.get_rng_state()  # the reference pass below draws the same drop-path masks
            loss = (net(batch['lq']) - batch['gt']).abs().mean()
            if aux_weight:
                (loss + aux_weight * net.aux_loss()).backward()
            else:
                loss.backward()
            chosen = moe.last_routing.expert.flatten()
            counts = torch.bincount(chosen, minlength=experts).float()
            updates += counts > 0
            interval += counts
            if measure:
                row = {'mode': mode + (f' + aux {aux_weight:g}' if aux_weight else ''),
                       'iteration': iteration, 'loss': float(loss)}
                g_mfa = math.sqrt(sum(float(g) ** 2 for g in branch_grads))
                row['g_mfa / g_rec'] = g_mfa / float(rec_grads[0])
                routing = set(net.routing_parameter_names())
                routing_grad = [p.grad.flatten() for n, p in net.named_parameters()
                                if p.grad is not None and n in routing]
                row['router grad'] = float(torch.cat(routing_grad).norm()) if routing_grad else 0.0
                own = backbone_grads(net).clone()
                saved = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
                net.set_routing_grad('none')
                optimiser.zero_grad()
                torch.set_rng_state(rng)
                (net(batch['lq']) - batch['gt']).abs().mean().backward()
                reference = backbone_grads(net)
                net.set_routing_grad(mode)
                for n, p in net.named_parameters():
                    p.grad = saved.get(n)
                row['backbone shift'] = float((own - reference).norm() / reference.norm())
                share = interval / interval.sum()
                used = share[share > 0]
                row['usage entropy'] = float(-(used * used.log()).sum())
                row['experts used'] = int((share >= 0.005).sum())
                probs = moe.last_routing.expert_probs
                row['router entropy'] = float(-(probs.clamp_min(1e-12).log() * probs).sum(-1).mean())
                with torch.no_grad():
                    net.eval()
                    net(probe)
                    net.train()
                    now = moe.last_routing.expert.flatten().clone()
                row['probe pixels rerouted'] = math.nan if previous_probe is None else float(
                    (now != previous_probe).float().mean())
                previous_probe = now
                row['experts never updated'] = int((updates == 0).sum())
                row['updates min/median/max'] = (f'{int(updates.min())}/{int(updates.median())}/'
                                                 f'{int(updates.max())}')
                interval.zero_()
                rows.append(row)
                print(' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()),
                      flush=True)
            optimiser.step()
            if iteration >= args.iters:
                break
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', type=Path, default=Path('datasets/UCMerced'))
    parser.add_argument('--out', type=Path, default=Path('results/diagnose'))
    parser.add_argument('--modes', nargs='+', choices=ROUTING_GRADS, default=list(ROUTING_GRADS))
    parser.add_argument('--iters', type=int, default=500)
    parser.add_argument('--every', type=int, default=50)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--aux-weight', type=float, default=0.0,
                        help='load-balancing loss weight for the modes whose routers learn')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for mode in args.modes for row in train(mode, args)]
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(args.out / 'diagnose.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = ['| ' + ' | '.join(keys) + ' |', '| --- ' * len(keys) + '|']
    for row in rows:
        lines.append('| ' + ' | '.join(f'{v:.3g}' if isinstance(v, float) else str(v) for v in row.values()) + ' |')
    (args.out / 'diagnose.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
