"""Second PCA of the stacked PCA: across the batch (Distillation.Incremental_PCA / PCA_Graph,
lines 119-157), its per-batch ablation, and the cosine graph (inter_cosine_sim, lines 14-17).

For plane-mapped rows ``X [B,C]`` the incremental PCA keeps a state of mean ``M [1,C]``, singular
values ``S [1,D]`` and basis ``V [C,D]`` with ``D = C//2``, all zero at start. Its outputs use the
**stored** state, gradient-stopped: ``P = (X - M) V`` (so ``P = 0`` before the first update). The
update stacks the centred batch, the rows of ``(S*V)^T`` and one row ``M' - bm`` (``M' = bm`` while
no update has happened yet), takes an SVD, fixes each right singular vector's sign so that
``max + min >= 0``, keeps ``D`` of them and moves ``M <- 0.1 M + 0.9 bm``.

The authors detect "no state yet" with the float test ``sum(S*V) == 0`` (line 133), which is
rounding noise once the plane-mapped rows sum to zero (fixtures README, "How the batches were
chosen"). Here an explicit ``initialized`` flag is kept instead; a state that was loaded by
assignment (a non-zero ``S``) also counts as initialised.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from iepkt_tf.stacked_pca import sign_of


def cosine_graph(p):
    """inter_cosine_sim: ``G [B,B]`` = cosine similarity of the rows of ``P`` (``tf.nn.l2_normalize``,
    eps 1e-12 on the squared norm, so zero rows give zero similarities)."""
    p = tf.math.l2_normalize(p, axis=-1)
    return tf.matmul(p, p, transpose_b=True)


def _check_rows(x, channels, what):
    if x.shape.rank != 2 or x.shape[-1] != channels:
        raise ValueError(f"{what}: expected plane-mapped rows [B,{channels}], got shape {x.shape}")


class IncrementalPCA(keras.layers.Layer):
    """The authors' ``Incremental_PCA`` (TF1 scope ``.../PCA_Graph/Incremental_PCA/{M,S,V}``).

    ``call(x)`` -> ``(P [B,D], mean [1,C], V [C,D])`` with the stored state (lines 148, 155);
    ``compute_update(x)`` -> the new ``{M, S, V}`` (lines 128-143) without writing it;
    ``assign_state(new)`` writes it; ``update(x)`` does both.
    """

    tf1_scope = "Incremental_PCA"

    def __init__(self, channels=None, name="Incremental_PCA", **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(name=name, **kwargs)
        self.rate = 0.9
        if channels is not None:
            self.build((None, int(channels)))

    def build(self, input_shape):
        if self.built:
            return
        c = int(input_shape[-1])
        if c < 2:
            raise ValueError(f"{self.name}: need at least 2 channels to keep C//2 components, got {c}")
        self.channels, self.num_components = c, c // 2
        zeros = "zeros"
        self.M = self.add_weight(name="M", shape=(1, c), initializer=zeros, trainable=False, dtype="float32")
        self.S = self.add_weight(name="S", shape=(1, c // 2), initializer=zeros, trainable=False,
                                 dtype="float32")
        self.V = self.add_weight(name="V", shape=(c, c // 2), initializer=zeros, trainable=False,
                                 dtype="float32")
        self.initialized = self.add_weight(name="initialized", shape=(), initializer="zeros",
                                           trainable=False, dtype="bool")
        self.built = True

    def call(self, x):
        x = tf.cast(x, tf.float32)
        _check_rows(x, self.channels, self.name)
        mean = tf.stop_gradient(tf.convert_to_tensor(self.M))
        v = tf.stop_gradient(tf.convert_to_tensor(self.V))
        return tf.matmul(x - mean, v), mean, v

    def is_initialized(self):
        """The explicit flag, or a non-zero loaded ``S`` (replaces the authors' ``sum(S*V) == 0``)."""
        return tf.logical_or(tf.convert_to_tensor(self.initialized),
                             tf.reduce_any(tf.not_equal(self.S, 0.0)))

    def compute_update(self, x):
        """Lines 128-143: the state after seeing batch ``x`` (not written)."""
        x = tf.stop_gradient(tf.cast(x, tf.float32))
        _check_rows(x, self.channels, self.name)
        sv = tf.transpose(self.S * self.V)                                  # [D,C]
        bm = tf.reduce_mean(x, axis=0, keepdims=True)
        m_ = tf.where(self.is_initialized(), tf.convert_to_tensor(self.M), bm)
        stacked = tf.concat([x - bm, sv, m_ - bm], axis=0)                 # [B+D+1, C]
        s, _, v = tf.linalg.svd(stacked, full_matrices=False)
        v = v * sign_of(v, axis=0)
        d = self.num_components
        v = tf.ensure_shape(v[:, :d], [self.channels, d])
        s = tf.ensure_shape(s[None, :d], [1, d])
        return {"M": self.M * (1.0 - self.rate) + bm * self.rate, "S": s, "V": v}

    def assign_state(self, new):
        self.M.assign(new["M"])
        self.S.assign(new["S"])
        self.V.assign(new["V"])
        self.initialized.assign(True)

    def update(self, x):
        self.assign_state(self.compute_update(x))

    def set_state(self, M, S, V):  # noqa: N803 (the authors' names)
        """Load a state (e.g. from the authors' ``.mat`` or a fixture) and mark it initialised."""
        self.assign_state({"M": M, "S": S, "V": V})

    def tf1_variables(self):
        return {"M": self.M, "S": self.S, "V": self.V}


class BatchPCA(IncrementalPCA):
    """The paper's ablation "plain per-batch PCA": the mean and basis of the **current** batch only
    (``D = C//2`` right singular vectors of the centred batch, sign-fixed like the incremental PCA).

    ``call(x)`` -> ``(P, mean, V)`` of this batch, gradient-stopped basis. The variables only keep the
    last batch's ``M, S, V`` for inference and visualisation (written by ``update``); they never enter
    the computation. TF1 scope ``.../PCA_Graph/Batch_PCA/{M,S,V}`` (not in the authors' code).
    """

    tf1_scope = "Batch_PCA"

    def __init__(self, channels=None, name="Batch_PCA", **kwargs):
        super().__init__(channels=channels, name=name, **kwargs)

    def _batch_pca(self, x):
        x = tf.stop_gradient(tf.cast(x, tf.float32))
        _check_rows(x, self.channels, self.name)
        bm = tf.reduce_mean(x, axis=0, keepdims=True)
        # full_matrices: D columns exist even when B < D (the extra ones span the null space).
        s, _, v = tf.linalg.svd(x - bm, full_matrices=True)
        v = v * sign_of(v, axis=0)
        d = self.num_components
        s = tf.pad(s, [[0, tf.maximum(d - tf.shape(s)[0], 0)]])[:d]
        return bm, tf.reshape(s, [1, d]), v[:, :d]

    def call(self, x):
        bm, _, v = self._batch_pca(x)
        return tf.matmul(tf.cast(x, tf.float32) - bm, v), bm, v

    def compute_update(self, x):
        bm, s, v = self._batch_pca(x)
        return {"M": bm, "S": s, "V": v}
