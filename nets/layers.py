"""Small Keras layers with the authors' TF1 variable names and arg-scope defaults.

The authors build every network and the distillation module inside ``WResNet_arg_scope``
(WResNet.py): convolutions and fully connected layers without bias or activation and with
TF-Slim's ``variance_scaling_initializer(mode='FAN_OUT')``; batch norm with scale and centre,
decay 0.9 and epsilon 1e-5. These layers reproduce that, and each one reports its variables under
the TF1 leaf names (``weights``, ``biases``, ``gamma``, ``beta``, ``moving_mean``,
``moving_variance``) so a container can map them 1:1 to the authors' ``.mat`` keys.

All layers run with ``autocast=False`` and cast explicitly: matmuls and convolutions use the
layer's compute dtype (float16/bfloat16 under a mixed policy), parameters and batch-norm
statistics stay float32.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf


class FanOutTruncatedNormal(keras.initializers.Initializer):
    """TF-Slim ``variance_scaling_initializer(factor=2.0, mode='FAN_OUT', uniform=False)``.

    A normal truncated at 2 sigma with sigma = sqrt(1.3 * 2 / fan_out); fan_out = kh*kw*out for a
    convolution and ``out`` for a fully connected layer (the 1.3 corrects the truncation).
    """

    def __call__(self, shape, dtype=None):
        fan_out = shape[-1]
        for d in shape[:-2]:
            fan_out *= d
        stddev = math.sqrt(1.3 * 2.0 / max(1, fan_out))
        return tf.random.truncated_normal(shape, stddev=stddev, dtype=dtype or "float32")


class Conv2D(keras.layers.Layer):
    """``tcl.conv2d`` under WResNet_arg_scope: SAME padding, no bias; variable ``weights``."""

    def __init__(self, filters, kernel_size, stride=1, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="weights",
            shape=(self.kernel_size, self.kernel_size, int(input_shape[-1]), self.filters),
            initializer=FanOutTruncatedNormal(), trainable=True, dtype="float32", autocast=False)

    def call(self, x):
        x = tf.cast(x, self.compute_dtype)
        w = tf.cast(self.kernel, self.compute_dtype)
        return tf.nn.conv2d(x, w, strides=self.stride, padding="SAME")

    def tf1_variables(self):
        return {"weights": self.kernel}


class Dense(keras.layers.Layer):
    """``tcl.fully_connected`` under WResNet_arg_scope: no activation; bias only if asked
    (the authors pass ``biases_initializer=tf.zeros_initializer()`` for ``full`` and
    ``Estimator/fc1``). Works on any rank; the last axis is contracted."""

    def __init__(self, units, use_bias=False, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.units = int(units)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="weights", shape=(int(input_shape[-1]), self.units),
            initializer=FanOutTruncatedNormal(), trainable=True, dtype="float32", autocast=False)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="biases", shape=(self.units,), initializer="zeros",
                                        trainable=True, dtype="float32", autocast=False)

    def call(self, x):
        x = tf.cast(x, self.compute_dtype)
        w = tf.cast(self.kernel, self.compute_dtype)
        if x.shape.rank == 2:
            y = tf.matmul(x, w)
        else:
            shape = tf.shape(x)
            y = tf.matmul(tf.reshape(x, [-1, shape[-1]]), w)
            y = tf.reshape(y, tf.concat([shape[:-1], [self.units]], 0))
        if self.bias is not None:
            y = y + tf.cast(self.bias, self.compute_dtype)
        return y

    def tf1_variables(self):
        out = {"weights": self.kernel}
        if self.bias is not None:
            out["biases"] = self.bias
        return out


class BatchNorm(keras.layers.Layer):
    """``tcl.batch_norm(scale=True, center=True, decay=0.9, epsilon=1e-5)``.

    Rank-4 and rank-2 inputs use the fused kernel (as TF-Slim does: rank 2 is reshaped to
    ``[N,1,1,C]``), which normalises with the biased batch variance and feeds the **unbiased** one
    to the moving average. Other ranks (the MPNN's ``[B,B,D]`` messages) use ``tf.nn.moments`` and
    the **biased** variance for both; ``moving_variance='unbiased'|'biased'`` overrides the
    moving-average convention when a caller needs the other one.

    ``call(x, training, update)``: ``training`` selects batch statistics, ``update`` (default: same
    as ``training``) whether the moving averages are assigned. The authors' MPNN runs a second
    message iteration in training mode without updating (Distillation.py line 91).

    ``synchronized`` (set by :func:`synchronize_batch_norm`, ``--sync_bn``): under a
    ``tf.distribute`` strategy with several replicas, training mode normalises with the moments
    of the global batch (all-reduced sums, two passes; Keras' ``synchronized=True``), so the
    replicas compute what one device computes on the whole batch.
    """

    synchronized = False

    def __init__(self, momentum=0.9, epsilon=1e-5, moving_variance=None, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        if moving_variance not in (None, "biased", "unbiased"):
            raise ValueError(f"moving_variance must be 'biased' or 'unbiased', got {moving_variance!r}")
        self.moving_variance_mode = moving_variance

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.rank = len(input_shape)
        self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones", dtype="float32", autocast=False)
        self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros", dtype="float32", autocast=False)
        self.moving_mean = self.add_weight(name="moving_mean", shape=(c,), initializer="zeros",
                                           trainable=False, dtype="float32", autocast=False)
        self.moving_variance = self.add_weight(name="moving_variance", shape=(c,),
                                               initializer="ones", trainable=False, dtype="float32", autocast=False)

    def _fused(self, x, training):
        shape = None
        if x.shape.rank == 2:
            shape = tf.shape(x)
            x = tf.reshape(x, [-1, 1, 1, x.shape[-1]])
        if training:
            y, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=tf.convert_to_tensor(self.gamma), offset=tf.convert_to_tensor(self.beta),
                mean=tf.zeros([0]), variance=tf.zeros([0]), epsilon=self.epsilon,
                exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
            n = tf.cast(tf.size(x) // x.shape[-1], tf.float32)
            biased = var * (n - 1.0) / n
        else:
            y, *_ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=tf.convert_to_tensor(self.gamma), offset=tf.convert_to_tensor(self.beta),
                mean=tf.convert_to_tensor(self.moving_mean),
                variance=tf.convert_to_tensor(self.moving_variance),
                epsilon=self.epsilon, exponential_avg_factor=1.0, data_format="NHWC",
                is_training=False)
            mean = var = biased = None
        if shape is not None:
            y = tf.reshape(y, shape)
        return y, mean, var, biased

    def _moments(self, x, training):
        if training:
            x32 = tf.cast(x, tf.float32)
            axes = list(range(x.shape.rank - 1))
            mean, biased = tf.nn.moments(x32, axes)
            n = tf.cast(tf.size(x) // x.shape[-1], tf.float32)
            unbiased = biased * n / (n - 1.0)
        else:
            mean = tf.convert_to_tensor(self.moving_mean)
            biased = unbiased = tf.convert_to_tensor(self.moving_variance)
        inv = tf.math.rsqrt(biased + self.epsilon) * self.gamma
        y = tf.cast(x, tf.float32) * inv + (self.beta - mean * inv)
        y = tf.cast(y, x.dtype)
        return y, (mean if training else None), (unbiased if training else None), \
            (biased if training else None)

    def _synced(self, x, ctx):
        """Training-mode moments of the global batch: ``mean = sum(x)/n``, then
        ``var = sum((x - mean)^2)/n``, each sum all-reduced over the replicas (differentiable)."""
        x32 = tf.cast(x, tf.float32)
        axes = list(range(x.shape.rank - 1))
        local_n = tf.cast(tf.size(x32) // x.shape[-1], tf.float32)
        total, n = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [tf.reduce_sum(x32, axes), local_n])
        mean = total / n
        biased = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                tf.reduce_sum(tf.square(x32 - mean), axes)) / n
        unbiased = biased * n / (n - 1.0)
        inv = tf.math.rsqrt(biased + self.epsilon) * self.gamma
        y = tf.cast(x32 * inv + (self.beta - mean * inv), x.dtype)
        return y, mean, unbiased, biased

    def call(self, x, training=False, update=None):
        if update is None:
            update = training
        x = tf.cast(x, self.compute_dtype)
        ctx = tf.distribute.get_replica_context() if (training and self.synchronized) else None
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            y, mean, unbiased, biased = self._synced(x, ctx)
            default_mode = "unbiased" if x.shape.rank in (2, 4) else "biased"
        elif x.shape.rank in (2, 4):
            y, mean, unbiased, biased = self._fused(x, training)
            default_mode = "unbiased"
        else:
            y, mean, unbiased, biased = self._moments(x, training)
            default_mode = "biased"
        if training and update:
            mode = self.moving_variance_mode or default_mode
            var = unbiased if mode == "unbiased" else biased
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + var * (1.0 - m))
        return y

    def tf1_variables(self):
        return {"beta": self.beta, "gamma": self.gamma, "moving_mean": self.moving_mean,
                "moving_variance": self.moving_variance}


def synchronize_batch_norm(model):
    """Mark every :class:`BatchNorm` of ``model`` ``synchronized`` (``--sync_bn``); returns how many."""
    bns = [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, BatchNorm)]
    for bn in bns:
        bn.synchronized = True
    return len(bns)


def collect_tf1_variables(named_layers, prefix=""):
    """Flatten ``{tf1_scope: layer}`` into ``{prefix/tf1_scope/leaf: variable}``.

    ``named_layers`` maps the TF1 scope of each leaf layer (relative to ``prefix``) to the layer.
    """
    out = {}
    for scope, layer in named_layers.items():
        for leaf, var in layer.tf1_variables().items():
            parts = [p for p in (prefix, scope, leaf) if p]
            out["/".join(parts)] = var
    return out


def names_of(variables, named):
    """The TF1 names of ``variables`` in ``named`` (``{TF1 name: variable}``), matched by identity:
    the one name map of the project (optimiser slots, weight-decay rules, checkpoints)."""
    by_id = {id(v): n for n, v in named.items()}
    missing = [getattr(v, "path", v) for v in variables if id(v) not in by_id]
    if missing:
        raise ValueError(f"variable(s) without a TF1 name: {missing[:3]}")
    return [by_id[id(v)] for v in variables]
