"""Multi-level feature aggregation (MFA): routing features built from the output of every RHAG.

Layout of the authors' checkpoints (kept so that they load with ``strict=True``): one ``nn.ModuleList``
named ``mfg`` that interleaves, per RHAG ``i``,

- ``mfg[2*i]``: a LayerNorm on the RHAG's tokens. It sits on the main path: its output is what RHAG ``i+1``
  (or the final ``norm``) receives;
- ``mfg[2*i+1]``: the level's branch, Conv3x3(C -> hidden) -> LeakyReLU -> Conv3x3(hidden -> C), applied to
  that normalised tensor in image layout.

The branch outputs are summed, normalised by the backbone's final ``norm`` and projected by ``aggr_conv``
(Conv3x3(C -> routing_dim) -> LeakyReLU) into the routing features ``X_agg``. This class names the two
kinds of entries (:meth:`level_norm`, :meth:`branch`) so code never indexes ``2*i``.
"""
from typing import List

import torch.nn as nn

LEAKY_SLOPE = 0.01
"""Negative slope of the MFA LeakyReLUs (PyTorch's default, as in the authors' code)."""


class MultiLevelFeatureAggregation(nn.ModuleList):
    """Per-level LayerNorms and conv branches of MFA, stored interleaved as the authors' ``mfg``.

    Args:
        num_levels: Number of RHAGs.
        dim: Backbone channels C.
        hidden_dim: Channels inside each branch.
    """

    def __init__(self, num_levels: int, dim: int, hidden_dim: int) -> None:
        modules: List[nn.Module] = []
        for _ in range(num_levels):
            modules.append(nn.LayerNorm(dim))
            modules.append(nn.Sequential(
                nn.Conv2d(dim, hidden_dim, 3, 1, 1),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
                nn.Conv2d(hidden_dim, dim, 3, 1, 1),
            ))
        super().__init__(modules)

    def level_norm(self, level: int) -> nn.LayerNorm:
        """The main-path LayerNorm after RHAG ``level`` (``mfg[2 * level]``)."""
        return self[2 * level]

    def branch(self, level: int) -> nn.Sequential:
        """The conv branch of RHAG ``level`` (``mfg[2 * level + 1]``)."""
        return self[2 * level + 1]


def routing_projection(dim: int, routing_dim: int) -> nn.Sequential:
    """``aggr_conv``: Conv3x3(dim -> routing_dim) -> LeakyReLU, ``(B, dim, H, W) -> (B, routing_dim, H, W)``."""
    return nn.Sequential(nn.Conv2d(dim, routing_dim, 3, 1, 1), nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
