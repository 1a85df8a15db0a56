"""Attention heads of multi-head graph distillation (MHGD), as IEP's black-box knowledge uses them.

Mirrors the authors' ``Attention_knowledge``, ``Attention_head``, ``Estimator`` and ``drop_head``
(Distillation.py lines 159-219), built under ``WResNet_arg_scope`` (FC without bias except
``Estimator/fc1``, BN with scale and centre, decay 0.9, eps 1e-5; every BN here is rank 2, so
fused, and its moving variance update uses the unbiased batch variance).

* :class:`AttentionHeads` (``Attention_head``): learned B x B attention heads between the
  embedding of point l (sender) and of point l-1 (receiver).
* :class:`Estimator` (``Estimator`` + ``drop_head``): module training only; predicts the point-l
  embedding from the point-l-1 embedding mixed by the (dropped) heads; :func:`est_loss` is its loss.
* :func:`k_bb_term`: the K_BB distillation term ``kld(tanh G_S, tanh G_T)`` (line 171).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from iepkt_tf.kld import kld_loss
from nets.layers import BatchNorm, Dense, collect_tf1_variables


class AttentionHeads(keras.layers.Layer):
    """``Attention_head(K=t_b, Q=t_f, D, num_head)``: ``call(t_b, t_f, training)`` -> ``[num_head,B,B]``.

    ``sender = Sbn(Sfc(t_b))`` and ``receiver = Rbn(Rfc(t_f))``, each ``[B, D*num_head]`` reshaped
    to ``[B, D, num_head]`` (head index fastest, lines 179-183);
    ``heads[h,i,j] = sum_d sender[i,d,h] * receiver[j,d,h]`` (lines 185-187). ``D`` is the
    authors' ``(Df+Db)//2``; ``num_head`` counts the learned heads (8 - 1 extrinsic = 7).
    ``training=True`` is the module-training call (batch statistics, moving update);
    ``training=False`` the reuse calls (moving statistics).
    """

    def __init__(self, D, num_head=7, name="Attention", **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(name=name, **kwargs)
        if int(D) < 1 or int(num_head) < 1:
            raise ValueError(f"AttentionHeads: D and num_head must be positive integers, got "
                             f"D={D!r}, num_head={num_head!r}")
        self.D = int(D)
        self.num_head = int(num_head)
        dt = self.dtype_policy
        self.Sfc = Dense(self.D * self.num_head, name="Sfc", dtype=dt)
        self.Sbn = BatchNorm(name="Sbn", dtype=dt)
        self.Rfc = Dense(self.D * self.num_head, name="Rfc", dtype=dt)
        self.Rbn = BatchNorm(name="Rbn", dtype=dt)

    def build(self, t_b_shape, t_f_shape):
        if t_b_shape[-1] is None or t_f_shape[-1] is None:
            raise ValueError(f"AttentionHeads: the last axes of t_b and t_f must be known, got "
                             f"{t_b_shape} and {t_f_shape}")
        width = self.D * self.num_head
        self.Sfc.build((None, int(t_b_shape[-1])))
        self.Sbn.build((None, width))
        self.Rfc.build((None, int(t_f_shape[-1])))
        self.Rbn.build((None, width))

    def call(self, t_b, t_f, training=False):
        t_b = tf.cast(t_b, self.compute_dtype)
        t_f = tf.cast(t_f, self.compute_dtype)
        if t_b.shape.rank != 2 or t_f.shape.rank != 2:
            raise ValueError(f"AttentionHeads: t_b and t_f must be [B, D] matrices, got shapes "
                             f"{t_b.shape} and {t_f.shape}")
        training = bool(training)
        b = tf.shape(t_b)[0]
        sender = self.Sbn(self.Sfc(t_b), training=training)
        receiver = self.Rbn(self.Rfc(t_f), training=training)
        sender = tf.transpose(tf.reshape(sender, [b, self.D, self.num_head]), [2, 0, 1])
        receiver = tf.transpose(tf.reshape(receiver, [b, self.D, self.num_head]), [2, 1, 0])
        return tf.matmul(sender, receiver)

    def tf1_variables(self):
        """``{TF1 path relative to .../EKI_module{i}/MHA/Attention_Knowledge/: variable}``."""
        return collect_tf1_variables({"Attention/Sfc": self.Sfc, "Attention/Sbn": self.Sbn,
                                      "Attention/Rfc": self.Rfc, "Attention/Rbn": self.Rbn})

    def get_config(self):
        cfg = super().get_config()
        cfg.update(D=self.D, num_head=self.num_head)
        return cfg


def drop_head(g, noise):
    """``drop_head`` (lines 215-219): zero the rows ``g[h,i,:]`` where
    ``noise[h,i] - mean_h noise[:,i] <= 0``. ``g [H,B,B]``, ``noise [H,B,1]`` (the authors draw
    ``tf.random.normal([H,B,1])``; it is an argument here so a step can be replayed)."""
    noise = tf.cast(noise, g.dtype)
    heads_mismatch = None not in (noise.shape[0], g.shape[0]) and noise.shape[0] != g.shape[0]
    if noise.shape.rank != 3 or noise.shape[-1] not in (1, None) or heads_mismatch:
        raise ValueError(f"drop_head: noise must be [{g.shape[0]}, B, 1] for heads of shape "
                         f"{g.shape}, got {noise.shape}")
    keep = noise - tf.reduce_mean(noise, 0, keepdims=True) > 0
    return g * tf.cast(keep, g.dtype)


# Offset folded into a step's seed for the drop-head noise (the dropout masks use 1).
NOISE_STREAM = 2


def drop_head_noise(num_modules, num_head, batch, seed):
    """Stateless drop-head noise ``[num_head, B, 1]`` per module (the authors' ``tf.random.normal``
    in ``drop_head``), from the step's ``seed`` (int64 ``[2]``)."""
    base = tf.random.experimental.stateless_fold_in(seed, NOISE_STREAM)
    return [tf.random.stateless_normal([int(num_head), batch, 1],
                                       seed=tf.random.experimental.stateless_fold_in(base, i))
            for i in range(num_modules)]


class Estimator(keras.layers.Layer):
    """``Estimator(X=x_f, G=heads, Dy, ...)``: ``call(x_f, heads, extrinsic, noise, training)`` -> ``[B,Dy]``.

    ``G = softmax_j(heads)``; the extrinsic head (the teacher's inference messages, channel mean
    times num_iter, line 69) is appended gradient-stopped and **not** softmaxed (line 198);
    :func:`drop_head` with ``noise [num_head,B,1]`` (a standard normal draw when ``None``);
    ``x = relu(bn0(fc0(x_f)))`` of width ``(Df+Dy)//2``; ``mix[b, h*D''+d] = sum_j G[h,b,j] x[j,d]``
    (head-major, lines 208-209); ``out = l2norm(fc1(mix) + fc1/biases)`` (bias initialised to 0).

    ``num_head`` counts every head that enters the mix: the learned ones plus the extrinsic one
    (the authors pass 8 and subtract 1 for the learned heads).
    """

    def __init__(self, Dy, num_head=8, name="Estimator", **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(name=name, **kwargs)
        if int(Dy) < 1 or int(num_head) < 1:
            raise ValueError(f"Estimator: Dy and num_head must be positive integers, got "
                             f"Dy={Dy!r}, num_head={num_head!r}")
        self.Dy = int(Dy)
        self.num_head = int(num_head)
        self.width = None
        dt = self.dtype_policy
        self.fc0 = None
        self.bn0 = BatchNorm(name="bn0", dtype=dt)
        self.fc1 = Dense(self.Dy, use_bias=True, name="fc1", dtype=dt)

    def build(self, x_f_shape):
        dx = x_f_shape[-1]
        if dx is None:
            raise ValueError(f"Estimator: the last axis of x_f must be known, got {x_f_shape}")
        self.width = (int(dx) + self.Dy) // 2
        self.fc0 = Dense(self.width, name="fc0", dtype=self.dtype_policy)
        self.fc0.build((None, int(dx)))
        self.bn0.build((None, self.width))
        self.fc1.build((None, self.width * self.num_head))

    def call(self, x_f, heads, extrinsic=None, noise=None, training=True):
        x_f = tf.cast(x_f, self.compute_dtype)
        heads = tf.cast(heads, self.compute_dtype)
        n_heads = heads.shape[0] + (extrinsic is not None)
        if x_f.shape.rank != 2:
            raise ValueError(f"Estimator: x_f must be a [B, Df] matrix, got shape {x_f.shape}")
        if heads.shape.rank != 3 or n_heads != self.num_head:
            raise ValueError(f"Estimator: expected {self.num_head} heads in total (learned heads "
                             f"[H,B,B] plus the extrinsic one if given), got heads {heads.shape} "
                             f"and extrinsic={'given' if extrinsic is not None else 'None'}")
        training = bool(training)
        b = tf.shape(heads)[1]
        g = tf.nn.softmax(heads)
        if extrinsic is not None:
            ext = tf.stop_gradient(tf.cast(extrinsic, g.dtype))
            g = tf.concat([g, tf.expand_dims(ext, 0)], 0)
        if noise is None:
            noise = tf.random.normal([self.num_head, b, 1])
        g = drop_head(g, noise)
        x = tf.nn.relu(self.bn0(self.fc0(x_f), training=training))
        mix = tf.matmul(tf.reshape(g, [self.num_head * b, b]), x)
        mix = tf.reshape(mix, [self.num_head, b, self.width])
        mix = tf.reshape(tf.transpose(mix, [1, 0, 2]), [b, self.num_head * self.width])
        return tf.nn.l2_normalize(self.fc1(mix), -1)

    def tf1_variables(self):
        """``{TF1 path relative to .../EKI_module{i}/MHA/Attention_Knowledge/: variable}``."""
        if self.fc0 is None:
            raise ValueError("Estimator.tf1_variables: build the layer first "
                             "(call it or call build((None, Df)))")
        return collect_tf1_variables({"Estimator/fc0": self.fc0, "Estimator/bn0": self.bn0,
                                      "Estimator/fc1": self.fc1})

    def get_config(self):
        cfg = super().get_config()
        cfg.update(Dy=self.Dy, num_head=self.num_head)
        return cfg


def est_loss(t_b, est_out):
    """Estimator loss (line 167): ``mean_b(1 - sum_c t_b * est_out)``; ``t_b`` is not normalised."""
    t_b = tf.cast(t_b, est_out.dtype)
    return tf.reduce_mean(1.0 - tf.reduce_sum(t_b * est_out, -1))


def k_bb_term(heads_s, heads_t):
    """K_BB term (line 171): ``kld(tanh heads_s, tanh heads_t)``, the student first."""
    return kld_loss(tf.tanh(heads_s), tf.tanh(heads_t))
