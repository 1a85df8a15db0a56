"""CIFAR ResNet (ResNet-8/14/20/56/..., depth = 6n+2) with the TF1 names of the same authors'
``nets/ResNet.py`` (sseung0703/KD_methods_with_TF).

Stem ``conv0`` + ``bn0`` + ReLU, then three stages ``Resblock{0,1,2}`` of ``n = (depth-2)//6``
post-activation blocks ``BasicBlock{i}`` (``conv0``-``bn0``-ReLU, ``conv1``-``bn1``, shortcut
``conv2``-``bn2`` when the stride or width changes, add, ReLU), global average pooling and ``full``
with a zero-initialised bias. Widths 16/32/64 (He et al.'s CIFAR ResNets), strides 1, 2, 2; no dropout.

Differences from the authors' ``ResNet.py`` (documented choices): their widths are 32/64/128/256
with a fixed block count per scope; for inputs that are not 32 pixels high they add two stages,
whereas this family keeps three stages and uses the WResNet stem rule instead (7x7/2 stem), so every
network exposes the same four sensing points.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from nets.base import SensingNetwork, stem_for_height
from nets.layers import BatchNorm, Conv2D, Dense


class ResBlock(keras.layers.Layer):
    """ResNet.py ``ResBlock``: ``relu(shortcut + bn1(conv1(relu(bn0(conv0(x))))))``."""

    def __init__(self, in_planes, out_planes, stride, **kwargs):
        super().__init__(**kwargs)
        self.conv0 = Conv2D(out_planes, 3, stride, name="conv0")
        self.bn0 = BatchNorm(name="bn0")
        self.conv1 = Conv2D(out_planes, 3, 1, name="conv1")
        self.bn1 = BatchNorm(name="bn1")
        self.projection = stride > 1 or int(in_planes) != int(out_planes)
        self.conv2 = Conv2D(out_planes, 1, stride, name="conv2") if self.projection else None
        self.bn2 = BatchNorm(name="bn2") if self.projection else None

    def tf1_layers(self):
        out = {"conv0": self.conv0, "bn0": self.bn0, "conv1": self.conv1, "bn1": self.bn1}
        if self.projection:
            out.update(conv2=self.conv2, bn2=self.bn2)
        return out

    def call(self, x, training=False, pre_relu=False):
        out = tf.nn.relu(self.bn0(self.conv0(x), training=training))
        out = self.bn1(self.conv1(out), training=training)
        if self.projection:
            x = self.bn2(self.conv2(x), training=training)
        pre = tf.cast(x, out.dtype) + out
        return (tf.nn.relu(pre), pre) if pre_relu else tf.nn.relu(pre)


class ResNet(SensingNetwork):
    """ResNet-``depth`` under TF1 scope ``scope``, with the WResNet interface.

    ``call(images, training=False, dropout_masks=None) -> (logits, feats)``; ``feats`` are the
    entries of the three stages (the stem output, the outputs of ``Resblock0`` and ``Resblock1``)
    and the final output (of ``Resblock2``), so ``feats[1:4]`` are the authors' ResNet ``feat``
    collection (the output of the last block of every stage). ``keep_rate`` is always 1: the
    authors' ResNet has no dropout, and passing ``dropout_masks`` is an error.
    ``pre_relu=True`` returns ``(logits, feats, pre_feats)``: the same points before their ReLU
    (the stem's BN output, each stage's last residual sum); :meth:`sensing_bns` are the BNs
    nearest before them (``bn0``, each stage's last ``bn1``: the residual branch's, as CO's code takes).
    """

    def __init__(self, depth, num_classes, scope="Student", name=None):
        super().__init__(name=name or scope)
        depth, num_classes = int(depth), int(num_classes)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.depth, self.num_classes, self.scope = depth, num_classes, scope
        self.widen_factor = 1
        self.keep_rate = 1.0
        self.n = (depth - 2) // 6
        self.n_channels = [16, 16, 32, 64]
        self.strides = [1, 2, 2]
        self.feature_channels = list(self.n_channels)
        self.arch = f"ResNet-{depth}"
        self.input_height = None
        self.conv0 = None  # built from the input height (see build)
        self.bn0 = BatchNorm(name="bn0")
        self.stages = []
        in_planes = self.n_channels[0]
        for g in range(3):
            blocks = []
            for i in range(self.n):
                blocks.append(ResBlock(in_planes, self.n_channels[g + 1], self.strides[g] if i == 0 else 1,
                                       name=f"Resblock{g}_BasicBlock{i}"))
                in_planes = self.n_channels[g + 1]
            self.stages.append(blocks)
        self.full = Dense(num_classes, use_bias=True, name="full")
        self.dropout_scopes = []

    def call(self, images, training=False, dropout_masks=None, pre_relu=False):
        if dropout_masks:
            raise ValueError(f"dropout_masks: {self.arch} has no dropout, got keys {sorted(dropout_masks)}")
        if images.shape[1] is not None and (int(images.shape[1]) == 32) != (self.input_height == 32):
            raise ValueError(f"{self.scope} was built for {self.input_height}-pixel-high images "
                             f"(stem {stem_for_height(self.input_height)}), got height {images.shape[1]}")
        pre = self.bn0(self.conv0(images), training=training)
        x = tf.nn.relu(pre)
        feats, pres = [x], [pre]
        for blocks in self.stages:
            for block in blocks:
                x, pre = block(x, training=training, pre_relu=True)
            feats.append(x)
            pres.append(pre)
        logits = tf.cast(self.full(tf.reduce_mean(x, [1, 2])), tf.float32)
        return (logits, feats, pres) if pre_relu else (logits, feats)

    def sensing_bns(self):
        """``bn0`` and the last block's ``bn1`` of every stage (see the class docstring)."""
        return [self.bn0] + [blocks[-1].bn1 for blocks in self.stages]

    def tf1_layers(self):
        """``{TF1 scope relative to self.scope: leaf layer}`` in creation order."""
        out = {"conv0": self.conv0, "bn0": self.bn0}
        for g, blocks in enumerate(self.stages):
            for i, block in enumerate(blocks):
                for sub, layer in block.tf1_layers().items():
                    out[f"Resblock{g}/BasicBlock{i}/{sub}"] = layer
        out["full"] = self.full
        return out
