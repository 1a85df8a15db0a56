"""Wide ResNet exactly as the authors build it (sseung0703/IEPKT ``nets/WResNet.py``).

Widths ``[16, 16k, 32k, 64k]``, ``n = (depth-4)//6`` pre-activation basic blocks per group, group
strides 1, 2, 2. The stem ``conv0`` is 3x3/1 when the input is 32 pixels high and 7x7/2 otherwise
(WResNet.py: ``image.get_shape().as_list()[1] == 32``). The head is ``bn0`` + ReLU, global average
pooling and the fully connected ``full`` with a zero-initialised bias.

Every variable is reported under its TF1 name (``tf1_variables()``), e.g.
``Student/WResblock1/BasicBlock0/conv2/weights``, so the authors' ``train_params.mat`` loads 1:1.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from nets.base import SensingNetwork, stem_for_height
from nets.layers import BatchNorm, Conv2D, Dense


def dropout(x, keep_rate, mask=None):
    """``tcl.dropout(x, keep_rate)`` in training mode, with tf.nn.dropout's arithmetic:
    ``x * (1/(1-rate))`` where kept, 0 elsewhere, ``rate = 1 - keep_rate``, keep-mask
    ``U[0,1) < keep_rate`` unless one is given.

    Computed as ``x * m`` with ``m = cast(mask) / (1-rate)``: the kept values are the same floats as
    ``where(mask, x * scale, 0)``, and every backward pass through it is one multiply (``where``
    costs a select and a multiply per pass, and IEP's main step runs four student backward passes).
    """
    rate = 1.0 - keep_rate
    if mask is None:
        mask = tf.random.uniform(tf.shape(x), dtype=tf.float32) < keep_rate
    else:
        mask = tf.convert_to_tensor(mask)
        if mask.dtype != tf.bool:
            raise ValueError(f"dropout mask must be bool, got {mask.dtype.name}")
        if mask.shape.is_fully_defined() and x.shape.is_fully_defined() and mask.shape != x.shape:
            raise ValueError(f"dropout mask has shape {mask.shape.as_list()}, expected {x.shape.as_list()}")
    scale = tf.cast(1.0 / (1.0 - rate), x.dtype)
    return x * (tf.cast(mask, x.dtype) * scale)


class BasicBlock(keras.layers.Layer):
    """WResNet.py ``BasicBlock``: pre-activation block with TF1 sub-scopes ``bn``, ``conv0``,
    ``bn0``, ``conv1`` and (when the width changes) the 1x1 shortcut ``conv2``.

    ``call(x, training, dropout_mask)`` returns ``(x + out, entry)`` where ``entry`` is the
    BN+ReLU of the input (the tensor the authors add to ``feat`` in ``BasicBlock0``); with
    ``pre_relu=True`` ``(x + out, entry, pre)``, ``pre`` the BN output before that ReLU.
    """

    def __init__(self, in_planes, out_planes, stride, keep_rate=1.0, **kwargs):
        super().__init__(**kwargs)
        self.equal_in_out = int(in_planes) == int(out_planes)
        self.keep_rate = float(keep_rate)
        self.bn = BatchNorm(name="bn")
        self.conv0 = Conv2D(out_planes, 3, stride, name="conv0")
        self.bn0 = BatchNorm(name="bn0")
        self.conv1 = Conv2D(out_planes, 3, 1, name="conv1")
        self.conv2 = None if self.equal_in_out else Conv2D(out_planes, 1, stride, name="conv2")

    def tf1_layers(self):
        out = {"bn": self.bn, "conv0": self.conv0, "bn0": self.bn0, "conv1": self.conv1}
        if self.conv2 is not None:
            out["conv2"] = self.conv2
        return out

    def call(self, x, training=False, dropout_mask=None, pre_relu=False):
        pre = self.bn(x, training=training)
        entry = tf.nn.relu(pre)
        # equalInOut: residual reads BN+ReLU(x), shortcut is the raw x; otherwise both read it.
        shortcut = x if self.equal_in_out else self.conv2(entry)
        out = tf.nn.relu(self.bn0(self.conv0(entry), training=training))
        if training and self.keep_rate < 1.0:
            out = dropout(out, self.keep_rate, dropout_mask)
        out = self.conv1(out)
        y = tf.cast(shortcut, out.dtype) + out
        return (y, entry, pre) if pre_relu else (y, entry)


class WResNet(SensingNetwork):
    """WRN-``depth``-``widen_factor`` under TF1 scope ``scope`` (``Student`` / ``Teacher``).

    ``call(images, training=False, dropout_masks=None) -> (logits, feats)``: ``logits`` float32
    ``[B, num_classes]``; ``feats`` the authors' ``feat`` collection for this network (compute
    dtype): BN+ReLU at the entry of ``WResblock{0,1,2}/BasicBlock0`` and the final BN+ReLU.
    IEP senses ``feats[1:4]`` (WResNet.py lines 205-207). ``pre_relu=True`` returns
    ``(logits, feats, pre_feats)``, ``pre_feats`` the same BN outputs before their ReLU (AB, CO),
    from the same forward pass; :meth:`sensing_bns` are those four BN layers.

    Deviation: the authors' ``name[-1] == '0'`` test also records ``BasicBlock10``, ``20``... for
    depth >= 70; we record only ``BasicBlock0`` of each group, so there are always 4 feats.

    ``training=True``: batch statistics with a moving-average update, and dropout with
    ``keep_rate`` (0.7 for the trained network on 32x32 inputs, see ``nets_factory``).
    ``dropout_masks``: optional ``{"<scope>/WResblock{g}/BasicBlock{i}/Dropout": bool keep-mask}``
    replacing the random draw (used where dropout is active, i.e. training and keep_rate < 1).
    """

    def __init__(self, depth, widen_factor, num_classes, scope="Student", keep_rate=1.0, name=None):
        super().__init__(name=name or scope)
        depth, widen_factor, num_classes = int(depth), int(widen_factor), int(num_classes)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WResNet widen_factor must be >= 1, got {widen_factor}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 < float(keep_rate) <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        self.depth, self.widen_factor, self.num_classes = depth, widen_factor, num_classes
        self.scope = scope
        self.keep_rate = float(keep_rate)
        self.n = (depth - 4) // 6
        self.n_channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.strides = [1, 2, 2]
        self.feature_channels = list(self.n_channels)
        self.arch = f"WResNet-{depth}-{widen_factor}"
        self.input_height = None
        self.conv0 = None  # the stem; its kernel depends on the input height (see build)
        self.groups = []
        in_planes = self.n_channels[0]
        for g in range(3):
            blocks = []
            for i in range(self.n):
                blocks.append(BasicBlock(in_planes, self.n_channels[g + 1],
                                         self.strides[g] if i == 0 else 1, self.keep_rate,
                                         name=f"WResblock{g}_BasicBlock{i}"))
                in_planes = self.n_channels[g + 1]
            self.groups.append(blocks)
        self.bn0 = BatchNorm(name="bn0")
        self.full = Dense(num_classes, use_bias=True, name="full")
        self.dropout_scopes = [f"{scope}/WResblock{g}/BasicBlock{i}/Dropout"
                               for g in range(3) for i in range(self.n)]

    def _check_masks(self, dropout_masks):
        if not dropout_masks:
            return {}
        unknown = sorted(set(dropout_masks) - set(self.dropout_scopes))
        if unknown:
            raise ValueError(f"dropout_masks: unknown scope(s) {unknown}; expected keys among "
                             f"{self.dropout_scopes}")
        return dropout_masks

    def call(self, images, training=False, dropout_masks=None, pre_relu=False):
        masks = self._check_masks(dropout_masks)
        if images.shape[1] is not None and (int(images.shape[1]) == 32) != (self.input_height == 32):
            raise ValueError(f"{self.scope} was built for {self.input_height}-pixel-high images "
                             f"(stem {stem_for_height(self.input_height)}), got height {images.shape[1]}")
        x = self.conv0(images)
        feats, pres = [], []
        for g, blocks in enumerate(self.groups):
            for i, block in enumerate(blocks):
                x, entry, pre = block(x, training=training, pre_relu=True,
                                      dropout_mask=masks.get(f"{self.scope}/WResblock{g}/BasicBlock{i}/Dropout"))
                if i == 0:
                    feats.append(entry)
                    pres.append(pre)
        pre = self.bn0(x, training=training)
        x = tf.nn.relu(pre)
        feats.append(x)
        pres.append(pre)
        logits = tf.cast(self.full(tf.reduce_mean(x, [1, 2])), tf.float32)
        return (logits, feats, pres) if pre_relu else (logits, feats)

    def sensing_bns(self):
        """The BN layers whose outputs are ``pre_feats`` (``WResblock{g}/BasicBlock0/bn``, ``bn0``)."""
        return [blocks[0].bn for blocks in self.groups] + [self.bn0]

    def tf1_layers(self):
        """``{TF1 scope relative to self.scope: leaf layer}`` in the authors' creation order."""
        out = {"conv0": self.conv0}
        for g, blocks in enumerate(self.groups):
            for i, block in enumerate(blocks):
                for sub, layer in block.tf1_layers().items():
                    out[f"WResblock{g}/BasicBlock{i}/{sub}"] = layer
        out["bn0"] = self.bn0
        out["full"] = self.full
        return out
