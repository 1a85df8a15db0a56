"""The authors' input normalisation and training augmentation (KD_methods_with_TF ``dataloader.py``,
``pre_processing``), as pure TF functions for tf.data maps.

* Normalisation: ``(x - MEAN) / STD`` per channel with the authors' constants. They look like
  BGR statistics (CIFAR's RGB means are about (129, 124, 112)), but the authors subtract them from
  the RGB images in this order; we keep that so the teacher's ``.mat`` parameters see the same
  inputs.
* Augmentation: random horizontal flip, REFLECT padding by 4 pixels, random crop back to size.
  The authors flip per image but call ``tf.random_crop`` on the whole batch, so all images of a
  batch share one crop offset; here every image gets its own offset (the standard recipe).
  For images larger than 32 pixels the padding is ``size // 8`` (4 for 32).

Augmentation uses stateless random ops: the same ``seed`` always gives the same result.
Flipping/padding/cropping only move pixels, so augmenting the uint8 image and then normalising
equals the authors' normalise-then-augment exactly.
"""
from __future__ import annotations

import tensorflow as tf

MEAN = (112.4776, 124.1058, 129.3773)
STD = (70.4587, 65.4312, 68.2094)


def normalize(images):
    """float32 ``(images - MEAN) / STD`` over the last (RGB) axis; any leading shape, any real dtype."""
    x = tf.cast(images, tf.float32)
    return (x - tf.constant(MEAN, tf.float32)) / tf.constant(STD, tf.float32)


def pad_size(size):
    """Reflect padding for one side of length ``size``: 4 up to 32 pixels, ``size // 8`` above."""
    return 4 if size <= 32 else size // 8


def augment(image, seed):
    """Flip left-right with probability 1/2, REFLECT-pad, random-crop back to the input size.

    ``image``: one ``[H, W, C]`` image (static H, W; any dtype). ``seed``: shape ``[2]`` integer
    tensor for the stateless ops (flip and crop use two seeds split from it).
    """
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 3 or image.shape[0] is None or image.shape[1] is None:
        raise ValueError("augment expects one [H, W, C] image with static H and W, got shape %s"
                         % (image.shape,))
    h, w, c = image.shape
    ph, pw = pad_size(h), pad_size(w)
    if ph >= h or pw >= w:
        raise ValueError("augment: REFLECT padding of %dx%d needs images larger than that, got %dx%d"
                         % (ph, pw, h, w))
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    padded = tf.pad(image, [[ph, ph], [pw, pw], [0, 0]], mode="REFLECT")
    size = [h, w, c if c is not None else tf.shape(image)[2]]
    return tf.image.stateless_random_crop(padded, size, seeds[1])
