"""The message-passing network of IEP (authors' ``Distillation.MPNN``, Distillation.py lines 78-117).

It turns the stacked-PCA embedding of two consecutive sensing points into a B x B graph:
vertices are the embeddings at point l (``X_B``), edges start from the embedding at point l-1
(``X_F``) and are refined by gated messages. The read-out ``R`` is the interim knowledge (K_int),
the concatenated messages ``M`` are the alteration knowledge (K_alt, :func:`message_l1`).

Built as the authors build it under ``WResNet_arg_scope`` (FC without bias, BN with scale and
centre, decay 0.9, eps 1e-5). Batch-norm modes follow the fixtures README table:

* ``training=True`` (the module-training call, ``MPNN(..., is_training=True)``): ``Ebn`` uses
  batch statistics and updates its moving averages with the unbiased variance (rank 2, fused);
  ``Mbn``/``Gbn`` normalise the ``[B,B,D]`` messages over all B*B pairs with the batch statistics
  of the current iteration in every iteration, but only iteration 0 updates the moving averages,
  with the biased variance (line 91: the later iterations are built ``trainable=False``).
* ``training=False`` (the two reuse calls, lines 62-63): moving statistics, no update.

The moving-average assignments in a training call never change that call's outputs (training
mode normalises with batch statistics only), so a step is "forward first, then all updates from
what the forward saw", as the fixtures define it.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from nets.layers import BatchNorm, Dense, collect_tf1_variables


class MPNN(keras.layers.Layer):
    """``MPNN(X_B, X_F, D, num_iter)``: ``call(x_b, x_f, training)`` -> ``(R, M, E0)``.

    * ``x_b [B,Db]``: vertices (teacher or student ``P`` at point l); ``H[v,w] = x_b[v] - x_b[w]``
      is fixed over the iterations (``Vertices`` returns ``X_B``, line 109).
    * ``x_f [B,Df]``: edge input (``P`` at point l-1). ``q = l2norm(Ebn(Efc(x_f)))``,
      ``E0[v,w] = q_v * q_w * D`` (``Edge``, lines 83-87).
    * ``num_iter`` times, weights shared: ``h = concat(H, mean_c(E))``,
      ``m = Mbn(Mfc(h)) * sigmoid(Gbn(Gfc(h)))``, ``E <- E + m`` (``Message``/``Update``).
    * ``R = mean_c(E)`` ``[B,B]`` (``Readout``); ``M`` ``[B,B,num_iter*D]`` the messages
      concatenated in iteration order; ``E0`` ``[B,B,D]``.

    ``num_iter`` is the paper's MPNN-iterations ablation (the authors' code fixes it to 2).
    Sub-layers inherit this layer's dtype policy (pass ``dtype="float32"`` to pin it).
    """

    def __init__(self, D, num_iter=2, name="MPNN", **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(name=name, **kwargs)
        if int(D) < 1:
            raise ValueError(f"MPNN: D must be a positive integer, got {D!r}")
        if int(num_iter) < 1:
            raise ValueError(f"MPNN: num_iter (--mpnn_iter) must be >= 1, got {num_iter!r}")
        self.D = int(D)
        self.num_iter = int(num_iter)
        dt = self.dtype_policy
        self.Efc = Dense(self.D, name="Efc", dtype=dt)
        self.Ebn = BatchNorm(name="Ebn", dtype=dt)
        self.Mfc = Dense(self.D, name="Mfc", dtype=dt)
        self.Mbn = BatchNorm(name="Mbn", dtype=dt)
        self.Gfc = Dense(self.D, name="Gfc", dtype=dt)
        self.Gbn = BatchNorm(name="Gbn", dtype=dt)

    def build(self, x_b_shape, x_f_shape):
        db, df = x_b_shape[-1], x_f_shape[-1]
        if db is None or df is None:
            raise ValueError(f"MPNN: the last axes of x_b and x_f must be known, got "
                             f"{x_b_shape} and {x_f_shape}")
        self.Efc.build((None, int(df)))
        self.Ebn.build((None, self.D))
        # Message input: concat(H [.., Db], mean_c(E) [.., 1]).
        self.Mfc.build((None, None, int(db) + 1))
        self.Mbn.build((None, None, self.D))
        self.Gfc.build((None, None, int(db) + 1))
        self.Gbn.build((None, None, self.D))

    def edge(self, x_f, training):
        """``Edge`` (lines 83-87): ``E0[v,w] = q_v * q_w * D``, ``q = l2norm(Ebn(Efc(x_f)))``."""
        q = self.Ebn(self.Efc(x_f), training=training)
        q = tf.nn.l2_normalize(q, -1)
        return tf.expand_dims(q, 1) * tf.expand_dims(q, 0) * tf.cast(self.D, q.dtype)

    @staticmethod
    def _pairwise_part(fc, x_b):
        """The ``H`` rows of ``fc``'s kernel applied to ``H[v,w] = x_b[v] - x_b[w]``, computed as
        ``p[v] - p[w]`` with ``p = x_b W_H`` (the FC is linear and bias-free): a ``[B,D]`` product
        instead of a ``[B*B, Db+1] x [Db+1, D]`` one, and ``H`` itself is never formed."""
        w = tf.cast(fc.kernel, fc.compute_dtype)
        p = tf.matmul(x_b, w[:-1])
        return tf.expand_dims(p, 1) - tf.expand_dims(p, 0), w[-1]

    def message(self, H, E, training, update):
        """``Message`` (lines 89-95): gated message from ``h = concat(H, mean_c(E))``.

        ``H`` is ``(HM, wM, HG, wG)`` from :meth:`_pairwise_part`: ``Mfc(h) = HM + mean_c(E) wM``
        (the same sum as the authors' FC of the concatenation, in another order).
        """
        hm, wm, hg, wg = H
        e = tf.reduce_mean(E, -1, keepdims=True)
        m = self.Mbn(hm + e * wm, training=training, update=update)
        g = tf.sigmoid(self.Gbn(hg + e * wg, training=training, update=update))
        return m * g

    def call(self, x_b, x_f, training=False):
        x_b = tf.cast(x_b, self.compute_dtype)
        x_f = tf.cast(x_f, self.compute_dtype)
        if x_b.shape.rank != 2 or x_f.shape.rank != 2:
            raise ValueError(f"MPNN: x_b and x_f must be [B, D] matrices, got shapes "
                             f"{x_b.shape} and {x_f.shape}")
        training = bool(training)
        E0 = self.edge(x_f, training)
        if self.Mfc.use_bias or self.Gfc.use_bias:
            raise ValueError("MPNN: Mfc/Gfc must be bias-free (the authors' arg scope)")
        H = self._pairwise_part(self.Mfc, x_b) + self._pairwise_part(self.Gfc, x_b)
        E = E0
        messages = []
        for it in range(self.num_iter):
            # Only the first iteration of a training call updates the message BN statistics.
            m = self.message(H, E, training, update=training and it == 0)
            E = E + m
            messages.append(m)
        R = tf.reduce_mean(E, -1)
        return R, tf.concat(messages, -1), E0

    def tf1_variables(self):
        """``{TF1 path relative to .../EKI_module{i}/MPNN/MPNN/: variable}``."""
        return collect_tf1_variables({
            "Edge/Efc": self.Efc, "Edge/Ebn": self.Ebn,
            "Message/Mfc": self.Mfc, "Message/Mbn": self.Mbn,
            "Message/Gfc": self.Gfc, "Message/Gbn": self.Gbn})

    def get_config(self):
        cfg = super().get_config()
        cfg.update(D=self.D, num_iter=self.num_iter)
        return cfg


def message_l1(m_s, m_t):
    """K_alt term (line 65): ``mean over (v,w) of sum_c |m_s - m_t|`` for ``[B,B,C]`` messages."""
    return tf.reduce_mean(tf.reduce_sum(tf.abs(m_s - m_t), -1))
