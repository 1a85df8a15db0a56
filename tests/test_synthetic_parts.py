"""The part-constellation task (``--dataset synthetic_parts``): deterministic, class-balanced,
fixed by its own seed, classes that share parts, and learnable but not from raw pixels alone."""
import numpy as np
import pytest

from dataloader.datasets import load_dataset
from dataloader.synthetic_parts import LAYOUTS, NUM_PARTS, class_parts, make_synthetic_parts

SMALL = dict(num_classes=8, train_per_class=12, test_per_class=5, image_size=32)


def test_deterministic_and_fixed_by_its_own_seed():
    a = make_synthetic_parts(**SMALL)
    b = load_dataset("synthetic_parts", seed=5, **SMALL)  # the run seed does not change the task
    for split in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
    assert a.train_images.dtype == np.uint8 and a.train_images.shape == (96, 32, 32, 3)
    c = make_synthetic_parts(**SMALL, seed=1)
    assert class_parts(8, 1) != class_parts(8, 0)
    assert not np.array_equal(a.train_images, c.train_images)
    more = make_synthetic_parts(**{**SMALL, "train_per_class": 20})
    np.testing.assert_array_equal(more.test_images, a.test_images)  # own stream for the test split
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_parts(num_classes=1)


def test_class_balanced_and_named():
    d = make_synthetic_parts(**SMALL)
    assert np.bincount(d.train_labels, minlength=8).tolist() == [12] * 8
    assert np.bincount(d.test_labels, minlength=8).tolist() == [5] * 8
    assert len(set(d.class_names)) == 8 and d.class_names[0].startswith("c00:")


def test_classes_share_parts_and_twins_differ_by_layout_only():
    parts = class_parts(40)
    types = [frozenset((s, h) for s, h, _, _ in c) for c in parts]
    assert all(len(t) == NUM_PARTS for t in types)
    for k in range(0, 40, LAYOUTS):   # layout twins: same part types, other positions
        assert types[k] == types[k + 1]
        pos_a = sorted((s, h, x, y) for s, h, x, y in parts[k])
        pos_b = sorted((s, h, x, y) for s, h, x, y in parts[k + 1])
        assert max(abs(a[2] - b[2]) + abs(a[3] - b[3]) for a, b in zip(pos_a, pos_b)) > 0.1
    assert len(set(types)) == 40 // LAYOUTS
    counts = {}
    for t in types:
        for p in t:
            counts[p] = counts.get(p, 0) + 1
    assert min(counts.values()) >= 2   # no part type names a class


def test_learnable_from_pixels_but_far_from_solved():
    """Nearest class mean on raw pixels (defaults, 40 classes, chance 2.5 %) is well above chance
    (there is signal) but far from perfect (a network has to find parts and arrangements)."""
    d = make_synthetic_parts()
    assert d.train_images.shape[0] == 5000 and d.test_images.shape[0] == 2000
    x = d.train_images.reshape(5000, -1).astype(np.float32) / 255
    xt = d.test_images.reshape(2000, -1).astype(np.float32) / 255
    means = np.stack([x[d.train_labels == c].mean(0) for c in range(40)])
    dist = (xt ** 2).sum(1)[:, None] - 2 * xt @ means.T + (means ** 2).sum(1)[None]
    acc = float(np.mean(np.argmin(dist, 1) == d.test_labels))
    assert 0.10 < acc < 0.5, acc
