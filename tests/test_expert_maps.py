"""Expert maps: layout, colours, legend, usage per scene class; routing statistics of validation passes."""
import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from hmoe_arch.expert_maps import (
    GAP,
    RoutingStats,
    RoutingSummary,
    UsageByClass,
    expert_palette,
    map_image,
    render,
    save_expert_map,
    scene_class,
)


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


def routed(counts: dict, shape=(10, 10)) -> np.ndarray:
    """A ``shape`` map with ``counts[e]`` pixels of expert ``e``, in order."""
    return np.concatenate([np.full(n, e) for e, n in counts.items()]).reshape(shape)


def test_routing_statistics_of_a_first_pass() -> None:
    stats = RoutingStats('UCM', [2, 3])
    stats.add('a', routed({0: 60, 3: 38, 4: 2}))
    stats.add('b', routed({0: 60, 3: 40}, (5, 20))[..., None])  # (H, W, 1) as the routing maps give it
    summary = stats.finish(500)
    assert summary.pixels == 200
    np.testing.assert_allclose(summary.share, [0.6, 0, 0, 0.39, 0.01])
    assert summary.experts_used == 3  # expert 4 serves exactly 1 %
    assert summary.group_share == pytest.approx([0.6, 0.4])
    entropy = -(0.6 * math.log(0.6) + 0.39 * math.log(0.39) + 0.01 * math.log(0.01))
    assert summary.entropy == pytest.approx(entropy)
    assert summary.rerouted is None and summary.since is None  # nothing to compare with yet
    assert summary.lines() == [
        f'routing on UCM: 3 of 5 experts serve >= 1% of LR pixels, entropy {entropy:.3f} nats, groups g0 60% g1 40%',
        'routing on UCM, % of LR pixels per expert: g0 [60.00 0.00] g1 [0.00 39.00 1.00]']
    scalars = summary.scalars()
    assert scalars == pytest.approx({'val_routing/UCM/experts_1pct': 3.0, 'val_routing/UCM/entropy': entropy,
                                     'val_routing/UCM/group_0': 0.6, 'val_routing/UCM/group_1': 0.4,
                                     **{f'val_routing/UCM/expert_{e:02d}': s
                                        for e, s in enumerate([0.6, 0, 0, 0.39, 0.01])}})
    assert stats.previous['a'].dtype == np.int16 and stats.previous_iteration == 500


def test_an_expert_under_one_percent_does_not_count_as_serving() -> None:
    summary = RoutingSummary('UCM', np.array([0.9901, 0.0099]), [1, 1], 10000)
    assert summary.experts_used == 1
    assert RoutingSummary('UCM', np.array([1.0, 0.0]), [1, 1], 5).entropy == 0


def test_rerouted_share_against_the_previous_pass_of_the_same_images() -> None:
    stats = RoutingStats('UCM', [2, 2])
    first = routed({0: 50, 2: 50})
    stats.add('a', first)
    stats.add('b', routed({1: 100}))
    stats.finish(500)
    changed = first.copy()
    changed[0, :10] = 3  # 10 of the 200 pixels seen before change expert
    stats.add('a', changed)
    stats.add('b', routed({1: 100}))
    stats.add('c', routed({3: 100}))  # new: nothing to compare it with
    summary = stats.finish(1000)
    assert summary.rerouted == pytest.approx(10 / 200) and summary.since == 500
    assert summary.lines()[0].endswith('groups g0 47% g1 53%, 5.00% of pixels rerouted since iteration 500')
    assert summary.scalars()['val_routing/UCM/rerouted'] == pytest.approx(0.05)
    for stem, image in (('a', changed), ('b', routed({1: 100})), ('c', routed({3: 100}))):
        stats.add(stem, image)
    again = stats.finish(1500)
    assert again.rerouted == 0 and again.since == 1000  # against the pass at 1000, not the first one


def test_top_k_counts_each_selection_and_reroutes_by_the_top_one() -> None:
    stats = RoutingStats('UCM', [2, 2])
    stats.add('a', np.stack([routed({0: 100}), routed({1: 100})], axis=-1))
    assert stats.finish(1).share.tolist() == [0.5, 0.5, 0, 0]
    stats.add('a', np.stack([routed({1: 100}), routed({0: 100})], axis=-1))  # same experts, top-1 swapped
    summary = stats.finish(2)
    assert summary.share.tolist() == [0.5, 0.5, 0, 0] and summary.rerouted == 1


def test_a_pass_begun_again_drops_what_it_had_and_an_empty_pass_keeps_the_previous_maps() -> None:
    stats = RoutingStats('UCM', [1, 1])
    stats.add('a', routed({0: 100}))
    stats.begin()  # e.g. a validation that raised half-way
    stats.add('a', routed({1: 100}))
    assert stats.finish(10).share.tolist() == [0, 1]
    assert stats.finish(20) is None
    assert stats.previous_iteration == 10 and stats.previous['a'].tolist() == routed({1: 100}).tolist()
    shaped = RoutingStats('UCM', [1, 1])
    shaped.add('a', routed({0: 100}))
    shaped.finish(1)
    shaped.add('a', routed({1: 50}, (5, 10)))  # another size (a different image under the same name)
    assert shaped.finish(2).rerouted is None
