"""Expert maps: layout, colours, legend, usage per scene class."""
import csv
from pathlib import Path

import cv2
import numpy as np

from hmoe_arch.expert_maps import GAP, UsageByClass, expert_palette, map_image, render, save_expert_map, scene_class


def test_palette_has_one_distinct_colour_per_expert() -> None:
    palette = expert_palette([5, 6, 5])
    assert palette.shape == (16, 3)
    assert len({tuple(c) for c in palette}) == 16


def test_map_has_the_sr_size_and_only_legend_colours(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    expert = rng.integers(0, 4, (6, 5))
    sr = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
    path = tmp_path / 'map.png'
    save_expert_map(path, sr, expert, [2, 2], scale=4)
    image = cv2.imread(str(path))
    assert np.array_equal(image[:24, :20], sr)
    panel = image[:24, 20 + GAP:40 + GAP]
    palette = expert_palette([2, 2])
    assert {tuple(c) for c in panel.reshape(-1, 3)} <= {tuple(c) for c in palette}
    for y in range(6):
        for x in range(5):
            assert np.all(panel[4 * y:4 * y + 4, 4 * x:4 * x + 4] == palette[expert[y, x]])
    legend = image[:, 40 + 2 * GAP:]
    for colour in palette:
        assert np.any(np.all(legend == colour, axis=-1)), 'every colour appears in the legend'
    assert np.array_equal(map_image(expert, palette, 4), panel)
    assert render(sr, expert, [2, 2], 4).shape[0] >= 24


def test_scene_classes_of_published_names() -> None:
    assert scene_class('golfcourse04') == 'golfcourse'
    assert scene_class('airport_12') == 'airport'
    assert scene_class('denseresidential99') == 'denseresidential'


def test_usage_per_class_csv(tmp_path: Path) -> None:
    usage = UsageByClass(3)
    usage.add('beach01', np.array([[0, 0], [2, 2]]))
    usage.add('beach02', np.array([[1, 1], [1, 1]]))
    usage.add('forest00', np.array([[2]]))
    usage.write_csv(tmp_path / 'usage.csv')
    with open(tmp_path / 'usage.csv') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['class', 'lr_pixels', 'expert_00', 'expert_01', 'expert_02']
    assert rows[1] == ['beach', '8', '0.250000', '0.500000', '0.250000']
    assert rows[2] == ['forest', '1', '0.000000', '0.000000', '1.000000']
