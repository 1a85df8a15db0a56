"""Data side: every on-disk format generated small in tmp_path and loaded through the real code,
the sample rate, the tf.data pipelines, the authors' preprocessing and the synthetic dataset."""
import os
import pickle
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from dataloader import datasets, pipeline, preprocessing, synthetic
from dataloader.datasets import Dataset, DatasetNotFoundError, load_dataset


# ----------------------------------------------------------------------------- helpers

def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(hwc):
    """The CIFAR pickle layout: [N, 3072] uint8, row-major CHW."""
    return hwc.transpose(0, 3, 1, 2).reshape(len(hwc), 3072)


def _write_jpeg(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_jpeg(tf.constant(image, tf.uint8), quality=100))


def _flat(h, w, colour):
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, len(colour))).copy()


# ----------------------------------------------------------------------------- CIFAR

def test_cifar100_pickle_tree(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _pickle(root / "train", {b"data": _cifar_rows(train), b"fine_labels": [0, 99, 5, 5, 42, 7],
                             b"coarse_labels": [0, 1, 2, 3, 4, 5], b"filenames": [b"a"] * 6})
    _pickle(root / "test", {b"data": _cifar_rows(test), b"fine_labels": [3, 2, 1, 0],
                            b"coarse_labels": [0, 0, 0, 0]})
    _pickle(root / "meta", {b"fine_label_names": [b"c%d" % i for i in range(100)],
                            b"coarse_label_names": [b"k"] * 20})
    ds = load_dataset("cifar100", data_dir=str(tmp_path))
    assert ds.name == "cifar100" and ds.num_classes == 100 and ds.class_names[42] == "c42"
    assert ds.train_images.dtype == np.uint8 and ds.train_images.shape == (6, 32, 32, 3)
    assert ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_labels, [0, 99, 5, 5, 42, 7])
    np.testing.assert_array_equal(ds.test_labels, [3, 2, 1, 0])
    np.testing.assert_array_equal(ds.train_images, train)
    np.testing.assert_array_equal(ds.test_images, test)
    # CHW -> HWC by hand: byte c*1024 + y*32 + x of a row is pixel (y, x) of channel c.
    rows = _cifar_rows(train)
    assert ds.train_images[0, 1, 2, 0] == rows[0, 0 * 1024 + 1 * 32 + 2]
    assert ds.train_images[3, 30, 7, 2] == rows[3, 2 * 1024 + 30 * 32 + 7]


def test_cifar10_batches_and_archive(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 12)
    root = tmp_path / "extracted" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for b in range(5):  # batch b holds images 2b, 2b+1; the test batch the last two
        _pickle(root / ("data_batch_%d" % (b + 1)),
                {b"data": _cifar_rows(images[2 * b:2 * b + 2]), b"labels": labels[2 * b:2 * b + 2].tolist()})
    _pickle(root / "test_batch", {b"data": _cifar_rows(images[10:]), b"labels": labels[10:].tolist()})
    _pickle(root / "batches.meta", {b"label_names": [b"airplane"] + [b"x"] * 9})
    ds = load_dataset("cifar10", data_dir=str(tmp_path / "extracted"))
    assert ds.num_classes == 10 and ds.class_names[0] == "airplane"
    np.testing.assert_array_equal(ds.train_images, images[:10])
    np.testing.assert_array_equal(ds.train_labels, labels[:10])
    np.testing.assert_array_equal(ds.test_images, images[10:])
    # The downloaded archive, read without extracting.
    (tmp_path / "archive").mkdir()
    with tarfile.open(tmp_path / "archive" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    ds2 = load_dataset("cifar10", data_dir=str(tmp_path / "archive"))
    np.testing.assert_array_equal(ds2.train_images, ds.train_images)
    np.testing.assert_array_equal(ds2.test_labels, ds.test_labels)


def test_cifar_pickle_cannot_run_code(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _pickle(root / "train", {b"data": os.getcwd})  # a pickled reference to a function
    _pickle(root / "test", {})
    with pytest.raises(ValueError, match="unexpected object"):
        load_dataset("cifar100", data_dir=str(tmp_path))


@pytest.mark.parametrize("name,num_classes", [("cifar100", 100), ("cifar10", 10)])
def test_cifar_tfds(tmp_path, name, num_classes):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=10):
        ds = load_dataset(name, data_dir=str(tmp_path))
        ref = tfds.as_numpy(tfds.load(name, split="train", data_dir=str(tmp_path),
                                      as_supervised=True, download=False).batch(100))
        ref_images, ref_labels = next(iter(ref))
    assert ds.num_classes == num_classes
    assert ds.train_images.shape == (10, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10, 32, 32, 3) and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images, ref_images)
    np.testing.assert_array_equal(ds.train_labels, ref_labels)
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < num_classes


def test_cifar_missing_names_paths(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar100", data_dir=str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg
    for part in (str(tmp_path), "cifar-100-python", "cifar-100-python.tar.gz", "--data_dir",
                 datasets.CIFAR_URL):
        assert part in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="nope"):
        load_dataset("cifar10", data_dir=str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- image folders

_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def test_tiny_imagenet_tree(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n09", "n01", "n05"]  # label = position in wnids.txt, not sorted order
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, w in enumerate(wnids):
        for i in range(2):
            _write_jpeg(str(root / "train" / w / "images" / ("%s_%d.JPEG" % (w, i))),
                        _flat(64, 64, _COLOURS[k]))
        (root / "train" / w / ("%s_boxes.txt" % w)).write_text("")
    _write_jpeg(str(root / "train" / "n05" / "images" / "n05_2.JPEG"), _flat(64, 64, (128,)))  # grey
    val = [("val_0.JPEG", "n05"), ("val_1.JPEG", "n09"), ("val_2.JPEG", "n01"), ("val_3.JPEG", "n05")]
    for fname, w in val:
        _write_jpeg(str(root / "val" / "images" / fname), _flat(64, 64, _COLOURS[wnids.index(w)]))
    (root / "val" / "val_annotations.txt").write_text(
        "".join("%s\t%s\t0\t0\t63\t63\n" % row for row in val))
    ds = load_dataset("TinyImageNet", data_dir=str(tmp_path))
    assert ds.num_classes == 3 and ds.class_names == tuple(wnids)
    assert ds.train_images.shape == (7, 64, 64, 3) and ds.train_images.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_labels, [0, 0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(ds.test_labels, [2, 0, 1, 2])
    mean = ds.train_images.reshape(7, -1, 3).mean(1)
    for i, label in enumerate(ds.train_labels[:6]):
        np.testing.assert_allclose(mean[i], _COLOURS[label], atol=4)
    np.testing.assert_allclose(mean[6], (128, 128, 128), atol=2)  # grey JPEG decoded to RGB
    test_mean = ds.test_images.reshape(4, -1, 3).mean(1)
    for i, label in enumerate(ds.test_labels):
        np.testing.assert_allclose(test_mean[i], _COLOURS[label], atol=4)


def test_cub200_tree(tmp_path):
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    # id, relative path, class (1-based), is_train, size
    rows = [(1, "001.A/a1.jpg", 1, 1, (40, 60)), (2, "001.A/a2.jpg", 1, 0, (50, 50)),
            (3, "002.B/b1.jpg", 2, 1, (30, 20)), (4, "003.C/c1.jpg", 3, 1, (64, 48)),
            (5, "003.C/c2.jpg", 3, 0, (16, 16)), (6, "002.B/b2.jpg", 2, 1, (33, 17))]
    order = [3, 0, 5, 1, 4, 2]  # the text files need not be sorted by id
    for name, col in (("images.txt", 1), ("image_class_labels.txt", 2), ("train_test_split.txt", 3)):
        (root / name).write_text("".join("%d %s\n" % (rows[i][0], rows[i][col]) for i in order))
    (root / "classes.txt").write_text("1 001.A\n2 002.B\n3 003.C\n")
    for _, rel, cls, _, (h, w) in rows:
        _write_jpeg(str(root / "images" / rel), _flat(h, w, _COLOURS[cls - 1]))
    ds = load_dataset("CUB200", data_dir=str(tmp_path), image_size=16)
    assert ds.num_classes == 3 and ds.class_names == ("001.A", "002.B", "003.C")
    assert ds.train_images.shape == (4, 16, 16, 3) and ds.test_images.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(ds.train_labels, [0, 1, 2, 1])  # ids 1, 3, 4, 6
    np.testing.assert_array_equal(ds.test_labels, [0, 2])  # ids 2, 5
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        for img, label in zip(images, labels):
            np.testing.assert_allclose(img.reshape(-1, 3).mean(0), _COLOURS[label], atol=4)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("CUB200", data_dir=str(tmp_path), image_size=0)


def test_folder_datasets_missing(tmp_path):
    for name, folder in (("TinyImageNet", "tiny-imagenet-200"), ("CUB200", "CUB_200_2011")):
        with pytest.raises(DatasetNotFoundError) as err:
            load_dataset(name, data_dir=str(tmp_path))
        assert str(tmp_path / folder) in str(err.value) and "--data_dir" in str(err.value)
        with pytest.raises(DatasetNotFoundError, match=folder):
            load_dataset(name)


def test_unknown_name_and_option():
    with pytest.raises(ValueError, match="cifar100, cifar10, TinyImageNet, CUB200"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("cifar100", image_size=32)
    with pytest.raises(ValueError, match=r"train_labels must lie in \[0, 3\)"):
        Dataset(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 3]), np.zeros((1, 4, 4, 3), np.uint8),
                np.array([0]), num_classes=3, name="bad")


# ----------------------------------------------------------------------------- sample rate

def test_subsample_balanced_and_seeded():
    labels = np.repeat(np.arange(4), [10, 7, 5, 3])
    idx = pipeline.subsample(labels, 0.5, seed=3)
    counts = np.bincount(labels[idx], minlength=4)
    np.testing.assert_array_equal(counts, [5, 4, 3, 2])  # round half up: 3.5 -> 4, 2.5 -> 3, 1.5 -> 2
    np.testing.assert_array_equal(np.bincount(labels[pipeline.subsample(labels, 0.1, 3)]), [1, 1, 1, 1])
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, pipeline.subsample(labels, 0.5, seed=3))
    assert not np.array_equal(idx, pipeline.subsample(labels, 0.5, seed=4))
    assert set(pipeline.subsample(labels, 0.25, 3)) <= set(idx)  # nested for one seed
    np.testing.assert_array_equal(pipeline.subsample(labels, 1.0, 3), np.arange(len(labels)))
    for bad in (0, -0.1, 1.5, "x"):
        with pytest.raises(ValueError, match="--sample_rate"):
            pipeline.subsample(labels, bad, 0)


# ----------------------------------------------------------------------------- preprocessing

def test_normalize_constants_rgb_order():
    mean, std = np.array(preprocessing.MEAN), np.array(preprocessing.STD)
    np.testing.assert_allclose(mean, (112.4776, 124.1058, 129.3773))
    np.testing.assert_allclose(std, (70.4587, 65.4312, 68.2094))
    x = np.stack([mean, mean + std, mean - 2 * std])[None]  # [1, 3, 3]: channel c gets MEAN[c]
    out = preprocessing.normalize(x).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [[0, 0, 0], [1, 1, 1], [-2, -2, -2]], atol=1e-5)
    img = np.full((2, 2, 3), 100, np.uint8)
    np.testing.assert_allclose(preprocessing.normalize(img).numpy()[0, 0], (100 - mean) / std, rtol=1e-6)


def test_pad_size():
    assert [preprocessing.pad_size(s) for s in (16, 32, 64, 224)] == [4, 4, 8, 28]


def test_augment_flips_and_crops():
    img = tf.reshape(tf.range(16 * 16 * 3, dtype=tf.int32), [16, 16, 3])
    windows = {}
    for flip in (False, True):
        src = tf.image.flip_left_right(img) if flip else img
        padded = tf.pad(src, [[4, 4], [4, 4], [0, 0]], "REFLECT").numpy()
        for dy in range(9):
            for dx in range(9):
                windows[padded[dy:dy + 16, dx:dx + 16].tobytes()] = (flip, dy, dx)
    seen = []
    for s in range(40):
        out = preprocessing.augment(img, tf.constant([7, s], tf.int64))
        assert out.shape == (16, 16, 3) and out.dtype == tf.int32
        seen.append(windows[out.numpy().tobytes()])  # KeyError if not a flip+window of the padding
        np.testing.assert_array_equal(out, preprocessing.augment(img, tf.constant([7, s], tf.int64)))
    assert {f for f, _, _ in seen} == {False, True}
    assert len({(dy, dx) for _, dy, dx in seen}) > 10


# ----------------------------------------------------------------------------- pipelines

@pytest.fixture
def small():
    return synthetic.make_synthetic(num_classes=4, train_per_class=10, test_per_class=5, image_size=16)


def _collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.stack(xs), np.stack(ys)


def test_train_dataset_deterministic_per_epoch(small):
    n, bs = len(small.train_labels), 8
    ds = pipeline.train_dataset(small.train_images, small.train_labels, bs, seed=5, epoch=2)
    assert ds.element_spec[0].shape == (bs, 16, 16, 3) and ds.element_spec[0].dtype == tf.float32
    assert ds.element_spec[1].shape == (bs,) and ds.element_spec[1].dtype == tf.int32
    x, y = _collect(ds)
    assert x.shape[0] == pipeline.steps_per_epoch(n, bs) == n // bs
    order = pipeline.epoch_permutation(n, 5, 2)[:x.shape[0] * bs].reshape(-1, bs)
    np.testing.assert_array_equal(y, small.train_labels[order])
    # A fresh pipeline for the same (seed, epoch) -- e.g. after a resume -- gives identical batches.
    x2, y2 = _collect(pipeline.train_dataset(small.train_images, small.train_labels, bs, 5, 2))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, y3 = _collect(pipeline.train_dataset(small.train_images, small.train_labels, bs, 5, 3))
    assert not np.array_equal(y, y3) and not np.array_equal(x, x3)
    # Augmented (not just normalised) and still within the normalised pixel range.
    plain = preprocessing.normalize(small.train_images[order]).numpy()
    assert not np.allclose(x, plain)
    assert x.min() >= plain.min() - 1e-5 and x.max() <= plain.max() + 1e-5


def test_eval_dataset_keeps_remainder(small):
    x, y = zip(*[(a.numpy(), b.numpy()) for a, b in pipeline.eval_dataset(small.test_images,
                                                                           small.test_labels, 8)])
    assert [len(b) for b in y] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate(y), small.test_labels)
    np.testing.assert_array_equal(np.concatenate(x), preprocessing.normalize(small.test_images).numpy())


def test_batch_size_errors(small):
    with pytest.raises(ValueError, match="--batch_size"):
        pipeline.train_dataset(small.train_images, small.train_labels, 41, 0, 0)
    with pytest.raises(ValueError, match="--batch_size"):
        pipeline.steps_per_epoch(40, 0)


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic():
    a = load_dataset("synthetic", seed=3, num_classes=4, train_per_class=6, test_per_class=3)
    b = synthetic.make_synthetic(num_classes=4, train_per_class=6, test_per_class=3, seed=3)
    assert a.train_images.shape == (24, 32, 32, 3) and a.train_images.dtype == np.uint8
    assert a.train_images.tobytes() == b.train_images.tobytes()
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    np.testing.assert_array_equal(np.bincount(a.train_labels), [6] * 4)
    c = synthetic.make_synthetic(num_classes=4, train_per_class=6, test_per_class=3, seed=4)
    assert not np.array_equal(a.train_images, c.train_images)
    # The test split does not depend on the training size.
    d = synthetic.make_synthetic(num_classes=4, train_per_class=9, test_per_class=3, seed=3)
    np.testing.assert_array_equal(d.test_images, a.test_images)
    with pytest.raises(ValueError, match="train_per_class"):
        load_dataset("synthetic", train_per_class=0)


def test_synthetic_learnable_with_variation():
    ds = synthetic.make_synthetic()  # the defaults: 10 classes, 200 / 50 per class
    assert ds.num_classes == 10 and ds.train_images.shape == (2000, 32, 32, 3)
    x = ds.train_images.reshape(2000, -1).astype(np.float32)
    xt = ds.test_images.reshape(500, -1).astype(np.float32)
    means = np.stack([x[ds.train_labels == c].mean(0) for c in range(10)])
    dist = (xt ** 2).sum(1)[:, None] - 2 * xt @ means.T + (means ** 2).sum(1)[None]
    pred = dist.argmin(1)
    acc = (pred == ds.test_labels).mean()
    family_acc = (pred // 2 == ds.test_labels // 2).mean()
    assert 0.25 < acc < 0.8, acc  # well above chance (0.1), far from perfect
    assert family_acc > 0.7 and family_acc > acc + 0.2, (family_acc, acc)  # colour first
