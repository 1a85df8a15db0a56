"""What every network of the project shares: the stem choice, static-shape helpers, lazy build,
and the TF1-named variable map built from ``tf1_layers()``."""
from __future__ import annotations

import numbers

import keras
import tensorflow as tf

from nets.layers import Conv2D, collect_tf1_variables


def stem_for_height(height):
    """(kernel, stride) of the stem ``conv0``: 3x3/1 for 32-pixel-high inputs, else 7x7/2."""
    return (3, 1) if int(height) == 32 else (7, 2)


def image_hw(image_size):
    """``(H, W)`` from an int, ``(H, W)`` or ``(H, W, C)``."""
    try:
        if isinstance(image_size, numbers.Integral):
            h = w = int(image_size)
        else:
            h, w = int(image_size[0]), int(image_size[1])
    except (TypeError, IndexError, ValueError):
        h = w = 0
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be a positive int or (H, W[, C]), got {image_size!r}")
    return h, w


def ceil_div(a, b):
    return -(-a // b)


class SensingNetwork(keras.Model):
    """Base of :class:`~nets.wresnet.WResNet` and :class:`~nets.resnet.ResNet`: ``call`` returns
    ``(logits, feats)``; subclasses set ``scope``, ``n_channels``, ``strides`` and ``conv0 = None`` in
    ``__init__`` and implement ``tf1_layers()`` (``{TF1 scope relative to scope: leaf layer}``).
    The stem is created in ``build`` because its shape depends on the input height."""

    def build(self, input_shape):
        height = input_shape[1]
        if height is None:
            raise ValueError(f"{self.scope}: the image height must be static (the stem depends on it)")
        kernel, stride = stem_for_height(height)
        self.input_height = int(height)
        self.conv0 = Conv2D(self.n_channels[0], kernel, stride, name="conv0")

    def build_for(self, image_size):
        """Create every variable by one inference call on zeros of ``image_size`` (H, W[, C])."""
        h, w = image_hw(image_size)
        self(tf.zeros([1, h, w, 3]), training=False)
        return self

    def feature_shapes(self, image_size):
        """``[(H, W, C)]`` of the 4 feats for an input of ``image_size`` (SAME padding)."""
        h, w = image_hw(image_size)
        s = stem_for_height(h)[1]
        h, w = ceil_div(h, s), ceil_div(w, s)
        shapes = [(h, w, self.n_channels[0])]
        for g in range(3):  # feats[g+1] is the output of group g (its stride applied)
            h, w = ceil_div(h, self.strides[g]), ceil_div(w, self.strides[g])
            shapes.append((h, w, self.n_channels[g + 1]))
        return shapes

    def tf1_variables(self):
        """``{TF1 name: variable}``: every trainable variable and BN moving statistic."""
        layers = self.tf1_layers()
        if self.conv0 is None or not all(layer.built for layer in layers.values()):
            raise RuntimeError(f"{self.scope}: variables are created on the first call; "
                               "call the model or build_for(image_size) first")
        return collect_tf1_variables(layers, prefix=self.scope)
