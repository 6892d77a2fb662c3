"""Expert maps (the paper's Fig. 3): which expert super-resolved each LR pixel, and usage per scene class.

A map image is ``[SR image | map | legend]``: the map has the SR image's size (each LR pixel a
``scale x scale`` block) and colours each block by its (group, expert); each group gets its own range of
hues, its experts alternate bright and dark shades within it. The legend names every colour.

:class:`RoutingStats` summarises the routing of every validation pass (:class:`RoutingSummary`: experts serving
>= 1 % of the LR pixels, usage entropy, group shares, pixels rerouted since the previous pass).
"""
import colorsys
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import cv2
import numpy as np

GAP = 8
LEGEND_ROW = 18


def expert_palette(group_sizes: Sequence[int]) -> np.ndarray:
    """``(num_experts, 3)`` uint8 BGR colours, experts numbered group after group."""
    colours = []
    for g, size in enumerate(group_sizes):
        for e in range(size):
            hue = (g + 0.35 * e / max(size, 1)) / max(len(group_sizes), 1)
            value = 1.0 - 0.45 * (e % 2)
            r, gr, b = colorsys.hsv_to_rgb(hue % 1.0, 0.85, value)
            colours.append((int(b * 255), int(gr * 255), int(r * 255)))
    return np.array(colours, dtype=np.uint8)


def map_image(expert: np.ndarray, palette: np.ndarray, scale: int) -> np.ndarray:
    """``(H, W)`` global expert indices -> ``(H*scale, W*scale, 3)`` BGR map."""
    return np.repeat(np.repeat(palette[expert], scale, axis=0), scale, axis=1)


def render(sr_bgr: np.ndarray, expert: np.ndarray, group_sizes: Sequence[int], scale: int) -> np.ndarray:
    """``[SR | map | legend]`` as one BGR image; the map starts at column ``sr_width + GAP``."""
    palette = expert_palette(group_sizes)
    panel = map_image(expert, palette, scale)
    height, width = sr_bgr.shape[:2]
    legend_width = 150
    rows = max(height, LEGEND_ROW * (len(palette) + 1))
    canvas = np.full((rows, 2 * width + 2 * GAP + legend_width, 3), 255, np.uint8)
    canvas[:height, :width] = sr_bgr
    canvas[:height, width + GAP:2 * width + GAP] = panel
    left = 2 * width + 2 * GAP
    index = 0
    for g, size in enumerate(group_sizes):
        for e in range(size):
            top = LEGEND_ROW * index + 4
            canvas[top:top + 12, left:left + 12] = palette[index]
            cv2.putText(canvas, f'group {g} expert {e}', (left + 16, top + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (0, 0, 0), 1, cv2.LINE_AA)
            index += 1
    return canvas


def scene_class(stem: str) -> str:
    """Scene class of a UCMerced (``golfcourse04``) or AID (``airport_12``) file stem."""
    match = re.fullmatch(r'([A-Za-z]+?)_?\d+', stem)
    return match.group(1).lower() if match else stem


class UsageByClass:
    """Counts of LR pixels per (scene class, expert)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts: Dict[str, np.ndarray] = {}

    def add(self, stem: str, expert: np.ndarray) -> None:
        counts = np.bincount(expert.reshape(-1), minlength=self.num_experts)
        key = scene_class(stem)
        self.counts[key] = self.counts.get(key, 0) + counts

    def write_csv(self, path: Path) -> None:
        """One row per class: pixel fractions per expert (rows sum to 1) and the pixel count."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['class', 'lr_pixels'] + [f'expert_{e:02d}' for e in range(self.num_experts)])
            for key in sorted(self.counts):
                counts = self.counts[key]
                writer.writerow([key, int(counts.sum())] + [f'{c / counts.sum():.6f}' for c in counts])


def save_expert_map(path: Path, sr_bgr: np.ndarray, expert: np.ndarray, group_sizes: Sequence[int],
                    scale: int) -> None:
    """Write :func:`render` to ``path`` (PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), render(sr_bgr, expert, group_sizes, scale)):
        raise OSError(f'could not write the expert map {path}')


def group_sizes_of(net) -> List[int]:
    """Group sizes of an MFGHMoEArch with MoE."""
    return [count for _, count in net.upsample.moe.expert_groups]


def lr_expert_map(net, lr_height: int, lr_width: int) -> np.ndarray:
    """Top-1 expert of each LR pixel of the last forward's first image, cropped to the unpadded LR size."""
    return lr_routing_map(net, lr_height, lr_width)[..., 0]


def lr_routing_map(net, lr_height: int, lr_width: int) -> np.ndarray:
    """``(lr_height, lr_width, K)`` experts of each LR pixel of the last forward's first image (the ``top_k``
    selected ones, the top-1 first), cropped to the unpadded LR size."""
    maps = net.routing_maps()
    return maps['expert'][0, :lr_height, :lr_width].cpu().numpy()


USED_SHARE = 0.01
"""An expert counts as serving a validation set when it takes at least this share of its LR pixels."""


@dataclass
class RoutingSummary:
    """The routing of one validation pass over a set (:class:`RoutingStats`).

    Attributes:
        name: The validation set.
        share: ``(num_experts,)`` share of the LR pixels per expert (sums to 1; with ``top_k`` > 1 a pixel counts
            ``1 / top_k`` for each expert it selected).
        group_sizes: Experts per group (experts numbered group after group).
        pixels: LR pixels of the pass.
        rerouted: Share of the LR pixels whose top-1 expert differs from the previous pass over the same images;
            ``None`` on the first pass (or when no image of the previous pass is in this one).
        since: The iteration of that previous pass (``None`` with ``rerouted``).
    """

    name: str
    share: np.ndarray
    group_sizes: List[int]
    pixels: int
    rerouted: Optional[float] = None
    since: Any = None

    @property
    def experts_used(self) -> int:
        """Experts taking at least :data:`USED_SHARE` of the LR pixels."""
        return int((self.share >= USED_SHARE).sum())

    @property
    def entropy(self) -> float:
        """Entropy of :attr:`share` in nats (``log(num_experts)`` when balanced, 0 for a single expert)."""
        used = self.share[self.share > 0]
        return abs(float(-(used * np.log(used)).sum()))

    @property
    def group_share(self) -> List[float]:
        """Share of the LR pixels per group."""
        bounds = np.cumsum([0] + list(self.group_sizes))
        return [float(self.share[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]

    def lines(self) -> List[str]:
        """Two log lines: the summary (experts >= 1 %, entropy, groups, rerouted share), then the share of every
        expert in percent, group by group."""
        groups = ' '.join(f'g{g} {100 * s:.0f}%' for g, s in enumerate(self.group_share))
        summary = (f'routing on {self.name}: {self.experts_used} of {len(self.share)} experts serve >= '
                   f'{100 * USED_SHARE:.0f}% of LR pixels, entropy {self.entropy:.3f} nats, groups {groups}')
        if self.rerouted is not None:
            summary += f', {100 * self.rerouted:.2f}% of pixels rerouted since iteration {self.since}'
        bounds = np.cumsum([0] + list(self.group_sizes))
        experts = ' '.join(f'g{g} [' + ' '.join(f'{100 * s:.2f}' for s in self.share[a:b]) + ']'
                           for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])))
        return [summary, f'routing on {self.name}, % of LR pixels per expert: {experts}']

    def scalars(self) -> Dict[str, float]:
        """TensorBoard values under ``val_routing/<set>/``: ``experts_1pct``, ``entropy``, ``group_<g>``,
        ``expert_<ee>`` (shares) and, after the first pass, ``rerouted`` (share)."""
        prefix = f'val_routing/{self.name}/'
        values = {f'{prefix}experts_1pct': float(self.experts_used), f'{prefix}entropy': self.entropy}
        values.update({f'{prefix}group_{g}': s for g, s in enumerate(self.group_share)})
        values.update({f'{prefix}expert_{e:02d}': float(s) for e, s in enumerate(self.share)})
        if self.rerouted is not None:
            values[f'{prefix}rerouted'] = self.rerouted
        return values


class RoutingStats:
    """Routing statistics of the validation passes over one set: usage over all its images, and the share of
    its LR pixels rerouted since the previous pass (the images are a fixed probe set).

    Between passes the top-1 expert map of every image is kept (``int16`` per LR pixel), keyed by the image's
    file stem; an image whose map has another size than before is not compared.

    Args:
        name: The validation set.
        group_sizes: Experts per group.
    """

    def __init__(self, name: str, group_sizes: Sequence[int]) -> None:
        self.name = name
        self.group_sizes = list(group_sizes)
        self.num_experts = sum(self.group_sizes)
        self.previous: Dict[str, np.ndarray] = {}
        """Stem -> ``(H, W)`` int16 top-1 experts of the last finished pass."""
        self.previous_iteration: Any = None
        self.begin()

    def begin(self) -> None:
        """Start a pass (what an unfinished pass had gathered is dropped)."""
        self._counts = np.zeros(self.num_experts, dtype=np.float64)
        self._pixels = 0
        self._maps: Dict[str, np.ndarray] = {}

    def add(self, stem: str, experts: np.ndarray) -> None:
        """Count one image: ``experts`` ``(H, W)`` or ``(H, W, K)`` global expert indices of its LR pixels (the
        top-1 first)."""
        experts = experts.reshape(*experts.shape[:2], -1)
        top_k = experts.shape[2]
        self._counts += np.bincount(experts.reshape(-1), minlength=self.num_experts) / top_k
        self._pixels += experts.shape[0] * experts.shape[1]
        self._maps[stem] = experts[..., 0].astype(np.int16)

    def finish(self, iteration: Any) -> Optional[RoutingSummary]:
        """The summary of the pass (``None`` when it counted no pixel); its maps become the ones the next pass is
        compared with, ``iteration`` the iteration named with it."""
        if self._pixels == 0:
            return None
        changed = compared = 0
        for stem, now in self._maps.items():
            before = self.previous.get(stem)
            if before is not None and before.shape == now.shape:
                changed += int((before != now).sum())
                compared += now.size
        summary = RoutingSummary(self.name, self._counts / self._counts.sum(), self.group_sizes, self._pixels)
        if compared:
            summary.rerouted, summary.since = changed / compared, self.previous_iteration
        self.previous, self.previous_iteration = self._maps, iteration
        self.begin()
        return summary


class ExpertMapWriter:
    """Routing maps of one evaluation pass: an overlay PNG per image (:func:`save_expert_map`) in ``folder``, and
    ``expert_usage.csv`` (pixel fractions per scene class, :class:`UsageByClass`) there on :meth:`close`.

    Args:
        folder: Output folder (created when the first file is written).
        net: The MFGHMoEArch (with MoE) whose routing is drawn.
        scale: Upscaling factor (LR pixel -> ``scale x scale`` block of the overlay).
    """

    def __init__(self, folder: Path, net, scale: int) -> None:
        self.folder = folder
        self.scale = scale
        self.group_sizes = group_sizes_of(net)
        self.usage = UsageByClass(sum(self.group_sizes))

    def add(self, stem: str, net, lr_height: int, lr_width: int, sr_bgr: np.ndarray) -> None:
        """Record the last forward of ``net`` (first image of the batch) as ``<stem>.png``."""
        expert = lr_expert_map(net, lr_height, lr_width)
        self.usage.add(stem, expert)
        save_expert_map(self.folder / f'{stem}.png', sr_bgr, expert, self.group_sizes, self.scale)

    def close(self) -> None:
        self.usage.write_csv(self.folder / 'expert_usage.csv')
