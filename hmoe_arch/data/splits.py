"""The class-stratified, seeded train/test split of UCMerced and AID.

Rule: for each class, its file names are sorted; ``n * test_fraction`` (rounded half up) of them are drawn
for the test split with ``random.Random(f'{seed}:{class}').sample``; the rest is the training split. String
seeds are hashed with SHA-512 by Python's ``random`` and ``sample`` has been stable since Python 3.2, so the lists are
the same on every machine. The split depends only on the names, never on file contents or their order on
disk. The paper's ratios: UCMerced 3:1 (``test_fraction`` 0.25), AID 4:1 (0.2).
"""
import math
import random
from typing import Dict, List, Sequence, Tuple


def split_class(names: Sequence[str], class_name: str, test_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """Split one class: ``(train, test)``, both sorted."""
    ordered = sorted(names)
    num_test = math.floor(len(ordered) * test_fraction + 0.5)
    test = set(random.Random(f'{seed}:{class_name}').sample(ordered, num_test))
    return [n for n in ordered if n not in test], sorted(test)


def stratified_split(names_by_class: Dict[str, Sequence[str]], test_fraction: float, seed: int
                     ) -> Tuple[List[str], List[str]]:
    """Split every class; ``(train, test)`` ordered by class name, then file name."""
    train: List[str] = []
    test: List[str] = []
    for class_name in sorted(names_by_class):
        class_train, class_test = split_class(names_by_class[class_name], class_name, test_fraction, seed)
        train += class_train
        test += class_test
    return train, test
