"""The outputs of ``basicsr bench``: Markdown and CSV tables, per-class CSV, and the PSNR-latency plot."""
import csv
import math
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


def plot_psnr_latency(rows: List[BenchRow], path: Path) -> None:
    """PSNR under the first protocol against latency, one point per model and test set (bicubic has no latency
    and is left out)."""
    first = rows[0].protocol if rows else ''
    points = [(r.latency_ms, r.psnr, f'{r.model.name} ({r.test_set} x{r.model.scale})') for r in rows
              if not math.isnan(r.latency_ms) and r.protocol == first]
    width, height, margin = 900, 560, 70
    canvas = np.full((height, width, 3), 255, np.uint8)
    cv2.rectangle(canvas, (margin, margin // 2), (width - margin // 2, height - margin), (0, 0, 0), 1)
    cv2.putText(canvas, 'latency (ms)', (width // 2 - 40, height - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(canvas, f'PSNR (dB), {first}', (5, margin // 2 - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x_lo, x_hi = min(xs) * 0.9, max(xs) * 1.1 + 1e-9
        y_lo, y_hi = min(ys) - 0.1, max(ys) + 0.1

        def position(x: float, y: float):
            px = margin + (x - x_lo) / (x_hi - x_lo) * (width - 1.5 * margin)
            py = height - margin - (y - y_lo) / (y_hi - y_lo) * (height - 1.5 * margin)
            return int(px), int(py)

        for value, label in ((x_lo, f'{x_lo:.1f}'), (x_hi, f'{x_hi:.1f}')):
            cv2.putText(canvas, label, (position(value, y_lo)[0] - 10, height - margin + 18), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for value in (y_lo, y_hi):
            cv2.putText(canvas, f'{value:.2f}', (8, position(x_lo, value)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (0, 0, 0), 1, cv2.LINE_AA)
        for x, y, label in points:
            px, py = position(x, y)
            cv2.circle(canvas, (px, py), 5, (200, 80, 0), -1, cv2.LINE_AA)
            cv2.putText(canvas, label, (px + 8, py - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f'could not write {path}')


#
