"""The outputs of ``basicsr bench``: Markdown and CSV tables, per-class CSV, and the PSNR-latency plot."""
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from ...protocols import PROTOCOLS
from .rows import BenchRow, columns

HEADINGS = {'psnr': 'PSNR', 'ssim': 'SSIM', 'niqe': 'NIQE', 'lpips': 'LPIPS'}


def blocks(rows: Sequence[BenchRow]) -> Dict[Tuple[str, str, int], List[BenchRow]]:
    """Rows by (protocol, test set, scale), in order of first appearance."""
    grouped: Dict[Tuple[str, str, int], List[BenchRow]] = {}
    for row in rows:
        grouped.setdefault((row.protocol, row.test_set, row.model.scale), []).append(row)
    return grouped


def write_tables(rows: List[BenchRow], out: Path, optional_metrics: Sequence[str] = ()) -> None:
    """``bench.csv`` (one row per protocol, test set and model; the protocol in every row) and ``bench.md`` (one
    table per protocol, test set and scale, headed by what the protocol measures)."""
    optional = list(optional_metrics)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / 'bench.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(columns(optional))
        for row in rows:
            writer.writerow(row.values(optional))
    lines: List[str] = []
    for (name, test_set, scale), group in blocks(rows).items():
        metric_heads = [f'{HEADINGS[m]} ({name})' for m in ['psnr', 'ssim'] + optional]
        header = ['Model'] + metric_heads + ['Params (M)', 'MACs @64x64 (G)', 'Latency (ms)', 'Peak mem (MiB)',
                                             'Train iters', 'Source']
        lines += [f'### {test_set} x{scale}, {PROTOCOLS[name].describe(scale)}', '',
                  '| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
        # the protocol, test set and scale are in the heading: the table starts at the model
        lines += ['| ' + ' | '.join(str(v) for v in row.values(optional)[3:]) + ' |' for row in group]
        lines.append('')
    (out / 'bench.md').write_text('\n'.join(lines))


def write_per_class(rows: List[BenchRow], path: Path) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['protocol', 'test_set', 'scale', 'model', 'class', 'images', 'psnr'])
        for row in rows:
            for key in sorted(row.per_class):
                values = row.per_class[key]
                writer.writerow([row.protocol, row.test_set, row.model.scale, row.model.name, key, len(values),
                                 f'{np.mean(values):.4f}'])


FONT = cv2.FONT_HERSHEY_SIMPLEX
THICKNESS = 1
TEXT_PAD = 3
"""Pixels every text keeps from the edges of the plot (anti-aliasing draws about one beyond OpenCV's box)."""
MIN_TEXT_SCALE = 0.3
"""Smallest font scale a label is shrunk to; a label still too wide is shortened with '...'."""


@dataclass(frozen=True)
class PlotText:
    """One text drawn on the PSNR-latency plot: ``org`` is its baseline's left end (OpenCV's origin), in pixels."""

    text: str
    org: Tuple[int, int]
    scale: float

    def box(self) -> Tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` in pixels the text covers by OpenCV's own font metrics
        (``cv2.getTextSize``), descenders included."""
        (width, height), baseline = cv2.getTextSize(self.text, FONT, self.scale, THICKNESS)
        return self.org[0], self.org[1] - height, self.org[0] + width, self.org[1] + baseline


def fit_text(text: str, x: int, y: int, scale: float, canvas: Tuple[int, int], *, right: bool = False) -> PlotText:
    """``text`` with its baseline at ``y`` starting at ``x`` (ending there with ``right``), moved, and where wider
    than the ``(height, width)`` canvas shrunk (then shortened), so that it lies inside with ``TEXT_PAD`` to spare."""
    height, width = canvas
    room = width - 2 * TEXT_PAD
    while True:
        (w, h), baseline = cv2.getTextSize(text, FONT, scale, THICKNESS)
        if w <= room or len(text) <= 4:
            break
        if scale > MIN_TEXT_SCALE:
            scale = max(MIN_TEXT_SCALE, scale * 0.9)
        else:
            text = text[:-4] + '...'
    left = x - w if right else x
    left = min(max(left, TEXT_PAD), width - TEXT_PAD - w)
    y = min(max(y, TEXT_PAD + h), height - TEXT_PAD - baseline)
    return PlotText(text, (int(left), int(y)), scale)


def plot_psnr_latency(rows: List[BenchRow], path: Path) -> List[PlotText]:
    """PSNR under the first protocol against latency, one point per model and test set (bicubic has no latency
    and is left out), as a 900x560 PNG; returns every text drawn. A point's label is on its right, or on its
    left where the right has no room, and no text reaches beyond the image."""
    first = rows[0].protocol if rows else ''
    points = [(r.latency_ms, r.psnr, f'{r.model.name} ({r.test_set} x{r.model.scale})') for r in rows
              if not math.isnan(r.latency_ms) and r.protocol == first]
    width, height, margin = 900, 560, 70
    canvas = np.full((height, width, 3), 255, np.uint8)
    size = (height, width)
    cv2.rectangle(canvas, (margin, margin // 2), (width - margin // 2, height - margin), (0, 0, 0), 1)
    texts = [fit_text('latency (ms)', width // 2 - 40, height - 20, 0.5, size),
             fit_text(f'PSNR (dB), {first}', 5, margin // 2 - 8, 0.5, size)]
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x_lo, x_hi = min(xs) * 0.9, max(xs) * 1.1 + 1e-9
        y_lo, y_hi = min(ys) - 0.1, max(ys) + 0.1

        def position(x: float, y: float) -> Tuple[int, int]:
            px = margin + (x - x_lo) / (x_hi - x_lo) * (width - 1.5 * margin)
            py = height - margin - (y - y_lo) / (y_hi - y_lo) * (height - 1.5 * margin)
            return int(px), int(py)

        for value in (x_lo, x_hi):
            texts.append(fit_text(f'{value:.1f}', position(value, y_lo)[0] - 10, height - margin + 18, 0.4, size))
        for value in (y_lo, y_hi):
            texts.append(fit_text(f'{value:.2f}', 8, position(x_lo, value)[1] + 4, 0.4, size))
        for x, y, label in points:
            px, py = position(x, y)
            cv2.circle(canvas, (px, py), 5, (200, 80, 0), -1, cv2.LINE_AA)
            (label_width, _), _ = cv2.getTextSize(label, FONT, 0.4, THICKNESS)
            on_right = px + 8 + label_width <= width - TEXT_PAD
            texts.append(fit_text(label, px + 8 if on_right else px - 8, py - 6, 0.4, size, right=not on_right))
    for text in texts:
        cv2.putText(canvas, text.text, text.org, FONT, text.scale, (0, 0, 0), THICKNESS, cv2.LINE_AA)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f'could not write {path}')
    return texts
