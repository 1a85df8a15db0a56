"""The authors' KL divergence between two sets of logits (Distillation.kld_loss, line 221).

``kld_loss(X, Y) = sum_all softmax(X) * (log_softmax(X) - log_softmax(Y))``: the softmax runs over
the last axis and the result is a **sum** over every row (and head), not a mean. ``X`` is the
distribution the KL is taken from (the target in module training, ``kld(G_B, R)``; the teacher for
K_int, ``kld(R_T, R_S)``; the student for K_BB, ``kld(tanh G_S, tanh G_T)``).
"""
from __future__ import annotations

import tensorflow as tf


def kld_loss(x, y):
    """KL(softmax x || softmax y) summed over all rows; x, y of equal shape, softmax on axis -1."""
    x = tf.convert_to_tensor(x)
    y = tf.convert_to_tensor(y, dtype=x.dtype)
    if x.shape.rank is not None and y.shape.rank is not None and x.shape.is_fully_defined() \
            and y.shape.is_fully_defined() and x.shape != y.shape:
        raise ValueError(f"kld_loss: x and y must have the same shape, got {x.shape} and {y.shape}")
    log_px = tf.nn.log_softmax(x, axis=-1)
    log_py = tf.nn.log_softmax(y, axis=-1)
    return tf.reduce_sum(tf.nn.softmax(x, axis=-1) * (log_px - log_py))
