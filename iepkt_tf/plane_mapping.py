"""Plane mapping of unit vectors (Distillation.Plane_mapping, lines 7-12).

A unit vector ``x`` in ``C`` dimensions is sent from the sphere to the hyperplane orthogonal to the
centre ``c = (1, ..., 1)/sqrt(C)``. The authors write

    y = (x + c) / cos^2(acos(x.c) / 2) - 2c.

With ``cos^2(t/2) = (1 + cos t)/2`` this is exactly

    y = 2 (x + c) / (1 + x.c) - 2c,

which is what is computed here: it avoids the ``acos`` (NaN when rounding pushes ``|x.c|`` past 1)
and agrees with the authors' form to float rounding (8.7e-7 on the fixtures). As in the authors'
code, nothing guards ``x.c = -1`` (``x = -c``), where both forms are infinite.
"""
from __future__ import annotations

import math

import tensorflow as tf


def plane_mapping(x):
    """``[..., C]`` unit rows -> ``[..., C]`` rows on the plane ``sum_c y = 0``."""
    x = tf.convert_to_tensor(x)
    c_dim = x.shape[-1]
    if c_dim is None:
        raise ValueError("plane_mapping: the last axis of x must have a static size")
    center = tf.constant(1.0 / math.sqrt(c_dim), dtype=x.dtype)
    xc = tf.reduce_sum(x, axis=-1, keepdims=True) * center  # x . c
    return (x + center) * (2.0 / (1.0 + xc)) - 2.0 * center
