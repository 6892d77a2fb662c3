"""Draws docs/images/pipeline.png, the MFG-HMoE pipeline of the README (OpenCV only).

Run from the repository root: ``python docs/figures/pipeline.py``.
"""
from pathlib import Path

import cv2
import numpy as np

OUT = Path(__file__).resolve().parents[1] / 'images' / 'pipeline.png'
FONT = dict(fontFace=cv2.FONT_HERSHEY_SIMPLEX, fontScale=0.45, thickness=1, lineType=cv2.LINE_AA)
BACKBONE, MFA, ROUTER, EXPERT = (235, 215, 190), (200, 235, 200), (190, 215, 245), (240, 200, 230)


def box(canvas: np.ndarray, x: int, y: int, w: int, h: int, lines, colour) -> tuple:
    cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, -1)
    cv2.rectangle(canvas, (x, y), (x + w, y + h), (60, 60, 60), 1)
    for i, text in enumerate(lines):
        (tw, th), _ = cv2.getTextSize(text, FONT['fontFace'], FONT['fontScale'], FONT['thickness'])
        ty = y + (h - len(lines) * (th + 6)) // 2 + (i + 1) * (th + 6) - 3
        cv2.putText(canvas, text, (x + (w - tw) // 2, ty), color=(20, 20, 20), **FONT)
    return x, y, w, h


def arrow(canvas: np.ndarray, start, end) -> None:
    cv2.arrowedLine(canvas, start, end, (60, 60, 60), 1, cv2.LINE_AA, tipLength=0.12)


def main() -> None:
    canvas = np.full((330, 1180, 3), 255, np.uint8)
    y = 40
    box(canvas, 10, y, 70, 50, ['LR'], (255, 255, 255))
    box(canvas, 100, y, 90, 50, ['conv_first'], BACKBONE)
    rhags = [box(canvas, 210 + i * 125, y, 105, 50, [f'RHAG {i + 1}', '+ LayerNorm'], BACKBONE) for i in range(3)]
    cv2.putText(canvas, '...', (585, y + 30), color=(20, 20, 20), **FONT)
    box(canvas, 620, y, 120, 50, ['norm, conv_after', '_body, + skip'], BACKBONE)
    box(canvas, 760, y, 120, 50, ['conv_before', '_upsample'], BACKBONE)
    arrow(canvas, (80, y + 25), (100, y + 25))
    arrow(canvas, (190, y + 25), (210, y + 25))
    for (x, _, w, _), nxt in zip(rhags, rhags[1:] + [None]):
        arrow(canvas, (x + w, y + 25), ((nxt[0] if nxt else 580), y + 25))
    arrow(canvas, (600, y + 25), (620, y + 25))
    arrow(canvas, (740, y + 25), (760, y + 25))
    branches = [box(canvas, x, 140, 105, 40, ['conv branch'], MFA) for x, _, _, _ in rhags]
    for (x, _, w, _), (bx, by, bw, _) in zip(rhags, branches):
        arrow(canvas, (x + w // 2, y + 50), (bx + bw // 2, by))
    box(canvas, 210, 215, 355, 40, ['MFA: sum -> norm -> aggr_conv  =  routing features X_agg'], MFA)
    for bx, by, bw, bh in branches:
        arrow(canvas, (bx + bw // 2, by + bh), (bx + bw // 2, 215))
    box(canvas, 620, 205, 120, 60, ['group router', '(top-1 group)'], ROUTER)
    box(canvas, 760, 205, 120, 60, ["group's expert", 'router (top-K)'], ROUTER)
    arrow(canvas, (565, 235), (620, 235))
    arrow(canvas, (740, 235), (760, 235))
    box(canvas, 905, 25, 120, 40, ['8 x Conv1x1'], EXPERT)
    box(canvas, 905, 80, 120, 40, ['8 x Conv3x3'], EXPERT)
    cv2.putText(canvas, 'experts: only the selected', (990, 150), color=(20, 20, 20), **FONT)
    cv2.putText(canvas, 'one runs for each LR pixel', (990, 170), color=(20, 20, 20), **FONT)
    arrow(canvas, (880, y + 25), (905, 45))
    arrow(canvas, (880, y + 25), (905, 100))
    arrow(canvas, (880, 235), (965, 122))
    box(canvas, 1045, 45, 125, 60, ['PixelShuffle,', 'conv_last -> SR'], BACKBONE)
    arrow(canvas, (1025, 45), (1045, 65))
    arrow(canvas, (1025, 100), (1045, 85))
    cv2.putText(canvas, 'MFG-HMoE: HAT backbone, multi-level feature aggregation (MFA), dual routing, heterogeneous '
                'experts', (10, 310), color=(20, 20, 20), **FONT)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(OUT), canvas):
        raise OSError(f'could not write {OUT}')


if __name__ == '__main__':
    main()
