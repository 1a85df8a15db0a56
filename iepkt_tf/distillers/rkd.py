"""``--Distillation RKD``: relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019).

The student reproduces the teacher's *relations* between the samples of a batch, not their
embeddings. With ``t_i``, ``s_i`` the teacher's and student's embeddings of sample ``i``, each first
L2-normalised (as in both of the authors' codes)::

    psi_D(t_i, t_j)      = ||t_i - t_j||_2 / mu,   mu = mean_{i != j} ||t_i - t_j||_2     (Eq. 4)
    L_RKD-D              = mean_{i,j} l_delta( psi_D(s_i, s_j), psi_D(t_i, t_j) )          (Eq. 5)
    psi_A(t_i, t_j, t_k) = < e_ij, e_ik >,         e_ij = (t_j - t_i) / ||t_j - t_i||_2   (Eq. 6)
    L_RKD-A              = mean_{i,j,k} l_delta( psi_A(s), psi_A(t) )                      (Eq. 7)
    loss                 = lambda_D * L_RKD-D + lambda_A * L_RKD-A

``l_delta`` is the Huber loss with delta 1 (``0.5 x^2`` for ``|x| <= 1``, else ``|x| - 0.5``). The
means run over all ``B^2`` pairs and ``B^3`` triplets (degenerate ones, ``i = j`` or ``i = k``, have
potential 0 in both networks), as the paper's reference code (lenscloth/RKD ``metric/loss.py``,
``smooth_l1_loss`` with mean reduction) and the authors' TF code do. The potentials are relational,
so any student width works without a connector; the loss is invariant to rotations and scalings of
either embedding (Sec. 3.2).

Sources of the defaults (sseung0703/Knowledge_distillation_via_TF2.0 ``distiller/RKD.py``):

* embedding ``rkd_embedding = logits``: ``sampled_layer`` keeps the output of ``fc`` (lines
  34-37), i.e. our ``Sensed.logits``; ``pooled`` is the authors' TF1 choice (KD_methods_with_TF
  ``nets/ResNet.py`` line 119, ``Relation.RKD(fcs, fct)``, the global-average-pooled last feature
  map feeding the classifier), i.e. the spatial mean of our ``feats[3]`` (the final BN+ReLU).
* ``rkd_distance_weight = 100``, ``rkd_angle_weight = 200``: ``self.l = [1e2, 2e2]`` (line 32)
  (TF1: ``l = [25, 50]`` on the pooled features, ``nets/ResNet.py`` line 119; the paper's
  CIFAR-100 distillation uses 25 / 50 too).
* L2 normalisation of both embeddings along the feature axis, Huber loss and both potentials:
  ``loss`` (lines 39-44) and the helpers ``Huber_loss``, ``Distance_wise_potential``,
  ``Angle_wise_potential`` (lines 4-17).
* no initial phase, the loss added to the cross-entropy (``grad_rule = "weighted"``): ``forward``
  returns ``target_loss + ...``; TF1 ``op_util.py`` "simple multi-task learning".

Sensing points: ``Sensed.logits`` (default) or the spatial mean of ``feats[3]``; the four feature
maps are not used otherwise. No trainable variable of its own.

``mu`` (``rkd_mu``): by default the authors' (TF2 ``Distance_wise_potential``, lines 7-12): every
squared distance is floored at 1e-12, so the diagonal distances are ``1e-6`` and count in the mean,
``mu = sum_{i,j} d_ij / B^2`` (the TF1 ``Relation.RKD`` does the same); ``--rkd_mu=paper`` takes
the paper's Eq. 4 (and lenscloth's ``d[d > 0].mean()``): the diagonal exactly 0 and ``mu`` the mean
over the ``B(B-1)`` pairs ``i != j``, larger by about ``B/(B-1)``. Remaining departure: distances
are computed from the pairwise differences, where the authors expand ``|x|^2 + |y|^2 - 2 x.y``,
whose cancellation leaves their diagonal at up to ``sqrt(float32 eps) ~ 3e-4`` instead of ``1e-6``
(measured: 5e-6 relative on the loss at batch 16-32).
"""
from __future__ import annotations

import tensorflow as tf

from iepkt_tf.distillers.base import Distiller, Flag, non_negative

EMBEDDINGS = ("logits", "pooled")
MU_FORMS = ("authors", "paper")
DEFAULT_DISTANCE_WEIGHT = 1e2
DEFAULT_ANGLE_WEIGHT = 2e2
EPS = 1e-12


def _float(x):
    x = tf.convert_to_tensor(x)
    return x if x.dtype == tf.float64 else tf.cast(x, tf.float32)


def huber(x, y, delta=1.0):
    """Mean Huber (smooth L1) loss with threshold ``delta``."""
    d = tf.abs(x - y)
    return tf.reduce_mean(tf.where(d <= delta, 0.5 * tf.square(d), delta * (d - 0.5 * delta)))


def _differences(x):
    """``e[i, j] = x[j] - x[i]``, ``[B, B, D]``."""
    return x[None, :, :] - x[:, None, :]


def distance_potential(x, mu_form="authors"):
    """``psi_D``: ``[B, D] -> [B, B]`` pairwise distances over their mean ``mu`` (``mu_form``:
    ``authors`` counts all ``B^2`` floored distances, the diagonal's ``sqrt(1e-12)`` included, as
    ``Distance_wise_potential`` does; ``paper`` the ``B(B-1)`` pairs ``i != j``, the diagonal 0)."""
    x = _float(x)
    b = tf.shape(x)[0]
    d2 = tf.reduce_sum(tf.square(_differences(x)), axis=-1)
    d = tf.sqrt(tf.maximum(d2, EPS))
    if mu_form == "authors":
        count = tf.cast(b * b, x.dtype)
    else:
        d = d * (1.0 - tf.eye(b, dtype=x.dtype))
        count = tf.maximum(tf.cast(b * (b - 1), x.dtype), 1.0)
    mu = tf.reduce_sum(d) / count
    return d / (mu + 1e-8)


def angle_potential(x):
    """``psi_A``: ``[B, D] -> [B, B, B]`` cosines ``<e_ij, e_ik>`` of the unit difference vectors."""
    e = tf.math.l2_normalize(_differences(_float(x)), axis=-1, epsilon=EPS)
    return tf.matmul(e, e, transpose_b=True)


def normalize_embedding(x):
    return tf.math.l2_normalize(_float(x), axis=1, epsilon=EPS)


def _prepare(student, teacher, normalize):
    s, t = _float(student), tf.stop_gradient(_float(teacher))
    if normalize:
        s, t = normalize_embedding(s), normalize_embedding(t)
    return s, tf.cast(t, s.dtype)


def rkd_distance_loss(student, teacher, normalize=True, mu_form="authors"):
    """``L_RKD-D`` (unweighted) of ``[B, D_s]`` and ``[B, D_t]`` embeddings; no gradient to the teacher."""
    s, t = _prepare(student, teacher, normalize)
    return huber(distance_potential(s, mu_form), distance_potential(t, mu_form))


def rkd_angle_loss(student, teacher, normalize=True):
    """``L_RKD-A`` (unweighted); no gradient to the teacher."""
    s, t = _prepare(student, teacher, normalize)
    return huber(angle_potential(s), angle_potential(t))


def embedding(sensed, kind):
    """The RKD embedding of one network's :class:`Sensed`: its logits or its pooled last map."""
    if kind == "logits":
        return _float(sensed.logits)
    return tf.reduce_mean(_float(sensed.feats[3]), axis=[1, 2])


class RKD(Distiller):
    """Distance- and angle-wise relational distillation (module docstring)."""
    name = "RKD"
    flags = (
        Flag("float", "rkd_distance_weight", DEFAULT_DISTANCE_WEIGHT,
             "RKD: weight lambda_D of the distance-wise term (the authors' TF2 100).", check=non_negative),
        Flag("float", "rkd_angle_weight", DEFAULT_ANGLE_WEIGHT,
             "RKD: weight lambda_A of the angle-wise term (the authors' TF2 200).", check=non_negative),
        Flag("enum", "rkd_embedding", "logits",
             "RKD: the embedding whose relations are transferred: logits (the authors' TF2 code) or "
             "pooled = the global-average-pooled last feature map (their TF1 code).", EMBEDDINGS),
        Flag("enum", "rkd_mu", "authors",
             "RKD: the distance normaliser mu: authors = the mean of all B^2 floored distances "
             "(their Distance_wise_potential), paper = the mean over the pairs i != j (Eq. 4).",
             MU_FORMS),
    )

    @staticmethod
    def check_options(options):
        if not (options.get("rkd_distance_weight", DEFAULT_DISTANCE_WEIGHT) > 0
                or options.get("rkd_angle_weight", DEFAULT_ANGLE_WEIGHT) > 0):
            return "--Distillation RKD needs --rkd_distance_weight or --rkd_angle_weight > 0"
        return None

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        o = self.options
        self.distance_weight = float(o.get("rkd_distance_weight", DEFAULT_DISTANCE_WEIGHT))
        self.angle_weight = float(o.get("rkd_angle_weight", DEFAULT_ANGLE_WEIGHT))
        self.embedding = o.get("rkd_embedding", "logits")
        self.mu_form = o.get("rkd_mu", "authors")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"rkd_embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")

    def main_losses(self, student, teacher, labels, seed):
        s, t = embedding(student, self.embedding), embedding(teacher, self.embedding)
        out = {}
        if self.distance_weight > 0:
            out["rkd_distance"] = tf.cast(self.distance_weight * rkd_distance_loss(s, t, mu_form=self.mu_form),
                                          tf.float32)
        if self.angle_weight > 0:
            out["rkd_angle"] = tf.cast(self.angle_weight * rkd_angle_loss(s, t), tf.float32)
        return out
