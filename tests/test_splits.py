"""The seeded, class-stratified split rule and the committed UCMerced split."""
import random
from pathlib import Path

from hmoe_arch.data.splits import split_class, stratified_split

from util import UCMERCED_CLASSES

SPLITS = Path(__file__).resolve().parents[1] / 'datasets' / 'splits'


def published_ucmerced_names():
    return {c: [f'{c}{i:02d}.tif' for i in range(100)] for c in UCMERCED_CLASSES}


def test_split_is_stratified_disjoint_and_complete() -> None:
    names = published_ucmerced_names()
    train, test = stratified_split(names, 0.25, 0)
    assert len(train) == 1575 and len(test) == 525
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(n for group in names.values() for n in group)
    for class_name in UCMERCED_CLASSES:
        assert sum(n.startswith(class_name) and n[len(class_name):-4].isdigit() for n in test) == 25


def test_split_depends_only_on_names_and_seed() -> None:
    names = published_ucmerced_names()
    shuffled = {c: random.Random(1).sample(v, len(v)) for c, v in reversed(list(names.items()))}
    assert stratified_split(names, 0.25, 0) == stratified_split(shuffled, 0.25, 0)
    assert stratified_split(names, 0.25, 0) != stratified_split(names, 0.25, 1)


def test_aid_ratio_and_rounding() -> None:
    train, test = split_class([f'airport_{i}.jpg' for i in range(1, 361)], 'airport', 0.2, 0)
    assert (len(train), len(test)) == (288, 72)
    train, test = split_class([f'x{i}' for i in range(10)], 'x', 0.25, 0)
    assert (len(train), len(test)) == (7, 3)


def test_committed_ucmerced_split_is_the_seed_0_rule() -> None:
    train, test = stratified_split(published_ucmerced_names(), 0.25, 0)
    assert (SPLITS / 'ucmerced_train.txt').read_text().splitlines() == train
    assert (SPLITS / 'ucmerced_test.txt').read_text().splitlines() == test
