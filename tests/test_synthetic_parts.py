"""The part-constellation task (``--dataset synthetic_parts``): deterministic, class-balanced,
fixed by its own seed, classes that share parts, and learnable but not from raw pixels alone."""
import numpy as np
import pytest

from dataloader.datasets import load_dataset
from dataloader.synthetic_parts import LAYOUTS, NUM_PARTS, class_names, class_parts, make_synthetic_parts

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


# The default task (40 classes, 5,000 / 2,000 32x32 images) that the README's numbers were measured
# on: sha256 of train images, train labels, test images, test labels (in that order), computed
# before the renderer was chunked, threaded and moved to channels-first painting.
DEFAULT_TASK_SHA256 = "3db8bad662bd80386fe05258adbf6e32536d32ec7b42dcb80d65adb6ecbab317"
# CIFAR-100's size (the cpu_table1 preset): 100 classes, 500 / 100 images per class.
CIFAR_SIZE = dict(num_classes=100, train_per_class=500, test_per_class=100)


def digest(d):
    import hashlib

    h = hashlib.sha256()
    for a in (d.train_images, d.train_labels, d.test_images, d.test_labels):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_default_task_bytes_are_unchanged():
    import time

    t0 = time.perf_counter()
    d = make_synthetic_parts()
    print(f"default task (7,000 32x32 images): {time.perf_counter() - t0:.2f} s")
    assert digest(d) == DEFAULT_TASK_SHA256


def test_bytes_do_not_depend_on_chunks_or_threads(monkeypatch):
    import dataloader.synthetic_parts as sp

    args = dict(num_classes=100, train_per_class=3, test_per_class=2, image_size=24)
    a = make_synthetic_parts(**args)
    monkeypatch.setattr(sp, "CHUNK", 7)     # chunks that do not divide the sets
    monkeypatch.setattr(sp, "THREADS", 1)
    assert digest(make_synthetic_parts(**args)) == digest(a)
    monkeypatch.setattr(sp, "CHUNK", 1000)  # one chunk
    monkeypatch.setattr(sp, "THREADS", 3)
    assert digest(make_synthetic_parts(**args)) == digest(a)


def test_hundred_classes_from_the_same_vocabulary():
    """100 classes need 50 part sets of 3 distinct types out of 10 shapes x 6 hues (34,220 sets
    exist): the deck deals them without any change, and the first 40 classes are the default
    task's."""
    parts = class_parts(100)
    assert parts[:40] == class_parts(40)
    types = [frozenset((s, h) for s, h, _, _ in c) for c in parts]
    assert all(len(t) == NUM_PARTS for t in types)
    assert len(set(types)) == 100 // LAYOUTS
    assert len(set(parts)) == 100                     # no two classes alike
    for k in range(0, 100, LAYOUTS):
        assert types[k] == types[k + 1] and parts[k] != parts[k + 1]
    counts = {}
    for t in types[::LAYOUTS]:
        for p in t:
            counts[p] = counts.get(p, 0) + 1
    assert len(counts) == 60 and min(counts.values()) >= 2   # every type, none names a class
    assert len(set(class_names(100))) == 100


def test_more_layouts_per_part_set():
    """``layouts=4`` (``--synthetic_layouts``): each part set serves 4 consecutive classes, all with
    other positions; 100 classes use 25 sets; the default argument is the task as it was."""
    assert class_parts(40, 0, LAYOUTS) == class_parts(40)
    parts = class_parts(100, 0, 4)
    types = [frozenset((s, h) for s, h, _, _ in c) for c in parts]
    assert len(set(types)) == 25 and len(set(parts)) == 100
    for k in range(0, 100, 4):
        assert len({types[k + i] for i in range(4)}) == 1
        assert len({parts[k + i] for i in range(4)}) == 4
    assert types[3] != types[4]
    a = make_synthetic_parts(num_classes=8, train_per_class=2, test_per_class=1, image_size=16,
                             layouts=4)
    assert a.class_names == class_names(8, 0, 4) != class_names(8)
    with pytest.raises(ValueError, match="layouts must be an integer >= 1"):
        make_synthetic_parts(num_classes=8, layouts=0)


def test_cifar_sized_task_is_balanced_deterministic_and_fast():
    """The cpu_table1 preset's task: 50,000 / 10,000 images of 100 classes at 24x24 (rate 0.1 keeps
    50 images per class: 39 steps of 128). Its generation time is printed (-s), never asserted."""
    import time

    from dataloader.pipeline import steps_per_epoch, subsample

    t0 = time.perf_counter()
    d = make_synthetic_parts(**CIFAR_SIZE, image_size=24)
    seconds = time.perf_counter() - t0
    print(f"CIFAR-sized task (60,000 24x24 images): {seconds:.1f} s")
    assert d.train_images.shape == (50000, 24, 24, 3) and d.test_images.shape == (10000, 24, 24, 3)
    assert np.bincount(d.train_labels, minlength=100).tolist() == [500] * 100
    assert np.bincount(d.test_labels, minlength=100).tolist() == [100] * 100
    for rate, steps in ((0.1, 39), (0.25, 97), (1.0, 390)):
        assert steps_per_epoch(len(subsample(d.train_labels, rate, 0)), 128) == steps
    # same arguments -> identical arrays (checked on the first classes' worth of the test split,
    # which has its own seed stream: a smaller training split leaves it unchanged)
    again = make_synthetic_parts(num_classes=100, train_per_class=1, test_per_class=100, image_size=24)
    np.testing.assert_array_equal(again.test_images, d.test_images)
    np.testing.assert_array_equal(again.test_labels, d.test_labels)


def test_synthetic_layouts_flag_reaches_the_task():
    """``--synthetic_layouts`` goes through the trainer's data loading; other datasets refuse it."""
    from iepkt_tf import config, trainer

    cfg = config.resolve_config(config.make_config(
        dataset="synthetic_parts", synthetic_classes=8, synthetic_train_per_class=4,
        synthetic_test_per_class=2, synthetic_image_size=16, synthetic_layouts=4, batch_size=8,
        Distillation="None"))
    want = make_synthetic_parts(num_classes=8, train_per_class=4, test_per_class=2, image_size=16,
                                layouts=4)
    got = trainer.load_data(cfg)
    np.testing.assert_array_equal(got.test_images, want.test_images)
    assert not np.array_equal(got.test_images, make_synthetic_parts(
        num_classes=8, train_per_class=4, test_per_class=2, image_size=16).test_images)
    with pytest.raises(config.ConfigError, match="--synthetic_layouts applies only to --dataset "
                                                 "synthetic_parts, got --dataset synthetic"):
        config.resolve_config(config.make_config(dataset="synthetic", synthetic_layouts=4,
                                                 Distillation="None"))
    with pytest.raises(config.ConfigError, match="--synthetic_layouts"):
        config.resolve_config(config.make_config(dataset="synthetic_parts", synthetic_layouts=0,
                                                 Distillation="None"))
