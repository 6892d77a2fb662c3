"""Expert maps (the paper's Fig. 3): which expert super-resolved each LR pixel, and usage per scene class.

A map image is ``[SR image | map | legend]``: the map has the SR image's size (each LR pixel a
``scale x scale`` block) and colours each block by its (group, expert); each group gets its own range of
hues, its experts alternate bright and dark shades within it. The legend names every colour.
"""
import colorsys
import csv
import re
from pathlib import Path
from typing import Dict, List, Sequence

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
    maps = net.routing_maps()
    return maps['expert'][0, :lr_height, :lr_width, 0].cpu().numpy()


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
