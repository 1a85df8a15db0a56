"""tf.data pipelines over the in-memory uint8 images, and the paper's training-set sample rate.

Determinism: an epoch's order and augmentation depend only on ``(seed, epoch)``, so a run resumed
at epoch ``e`` sees exactly the batches an uninterrupted run would. Differences from the authors'
feed loop (train_w_distill.py): their index list carries the images left over at the end of an
epoch into the next one, while here each epoch is one fresh permutation and the incomplete last
batch is dropped (static batch shape for the compiled step; a different remainder each epoch).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from dataloader.preprocessing import augment, normalize

_PERMUTATION, _AUGMENTATION = 0, 1  # independent seed streams per (seed, epoch)


def _check_int(flag, value, low):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError("%s must be an integer >= %d, got %r" % (flag, low, value))


def subsample(labels, rate, seed):
    """Sorted indices of a class-balanced subset: ``max(1, round(rate * n_c))`` images per class.

    ``round`` is half-up. ``rate == 1`` keeps everything. Per class, one seeded permutation is cut,
    so for one seed the subsets are nested (rate 0.1 within 0.25 within 0.5). Only the training
    set is subsampled (the paper's "Rate"); never call this on the test set.
    """
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise ValueError("--sample_rate must be a number in (0, 1], got %r" % (rate,)) from None
    if not 0.0 < rate <= 1.0:
        raise ValueError("--sample_rate must be in (0, 1], got %r" % (rate,))
    _check_int("--seed", seed, 0)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("subsample expects labels of shape [N], got %s" % (labels.shape,))
    if rate == 1.0:
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A4]))
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(np.floor(rate * len(members) + 0.5)))
        keep.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def steps_per_epoch(n, batch_size):
    """Full batches per epoch (the remainder is dropped); errors if ``batch_size > n``."""
    _check_int("--batch_size", batch_size, 1)
    if batch_size > n:
        raise ValueError("--batch_size=%d is larger than the training set (%d images, after "
                         "--sample_rate)" % (batch_size, n))
    return n // batch_size


def _epoch_stream(seed, epoch, stream):
    return np.random.SeedSequence([int(seed), int(epoch), stream])


def epoch_permutation(n, seed, epoch):
    """The order in which epoch ``epoch`` visits the ``n`` training images (depends on seed, epoch only)."""
    _check_int("--seed", seed, 0)
    _check_int("epoch", epoch, 0)
    return np.random.default_rng(_epoch_stream(seed, epoch, _PERMUTATION)).permutation(n)


def train_dataset(images, labels, batch_size, seed, epoch, start_batch=0):
    """One shuffled, augmented, normalised epoch: batches of (float32 [B,H,W,3], int32 [B]),
    from batch ``start_batch`` on (a run resumed inside an epoch gets the same later batches).

    ``images`` uint8 ``[N,H,W,3]`` (numpy or a tf.Tensor; pass a tensor to skip the per-call
    conversion), ``labels`` ``[N]``. Order: :func:`epoch_permutation`; image ``i`` is augmented with
    the stateless seed ``(k(seed, epoch), i)``; ``drop_remainder=True``; ordered parallel map;
    prefetch.
    """
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8 or images.shape.rank != 4:
        raise ValueError("train_dataset expects uint8 images [N,H,W,C], got %s %s"
                         % (images.dtype.name, images.shape))
    n = int(images.shape[0])
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    if labels.shape != [n]:
        raise ValueError("train_dataset: labels must have shape [%d], got %s" % (n, labels.shape))
    steps_per_epoch(n, batch_size)
    order = epoch_permutation(n, seed, epoch)
    key = int(_epoch_stream(seed, epoch, _AUGMENTATION).generate_state(1, np.uint32)[0])

    def load(i):
        image = augment(tf.gather(images, i), tf.stack([tf.constant(key, tf.int64), i]))
        return normalize(image), tf.gather(labels, i)

    ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64)[int(start_batch) * batch_size:])
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_dataset(images, labels, batch_size):
    """Normalised, unaugmented batches in the stored order; the last batch keeps the remainder."""
    _check_int("--val_batch_size", batch_size, 1)
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8 or images.shape.rank != 4:
        raise ValueError("eval_dataset expects uint8 images [N,H,W,C], got %s %s"
                         % (images.dtype.name, images.shape))
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    ds = ds.map(lambda x, y: (normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
