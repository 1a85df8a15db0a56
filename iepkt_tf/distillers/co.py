"""``--Distillation CO``: a comprehensive overhaul of feature distillation (Heo et al., ICCV 2019).

The student's pre-ReLU map goes through a connector ``r`` (1x1 conv + BN) and is compared with the
teacher's pre-ReLU map ``T`` raised to a per-channel margin ``m`` (paper Eqs. 2-4)::

    t     = max(T, m)                                   (teacher transform, Eq. 2)
    d_p   = 0 if (s_p <= t_p and t_p <= 0) else (s_p - t_p)^2,   s = r(S)   (partial L2, Eq. 4)
    L_CO  = w * (1/B) * sum_k 2^-(n-1-k) * sum_{b,h,w,c} d            (k = 0..n-1, n = 3)

``m_c = E[x | x < 0]`` for ``x ~ N(beta_c, gamma_c^2)``, the teacher's BN producing the map (Eq. 3):
``m = beta - |gamma| phi(beta/|gamma|) / Phi(-beta/|gamma|)``, and ``-3 |gamma|`` where
``Phi(-beta/|gamma|) <= 1e-3`` (the authors' guard). It is computed in-graph from the teacher's
current ``gamma``/``beta`` (``teacher.sensing_bns()``) at every call, so it holds whenever the teacher's
parameters are loaded; the teacher is frozen, so it is the authors' constant.

Sources of the defaults:

* sensing points, margin, connector and loss: the same authors' TF2 repository,
  sseung0703/Knowledge_distillation_via_TF2.0 ``distiller/CO.py`` (``sampled_layer``: the pre-ReLU
  outputs of ``BasicBlock1.0/bn``, ``BasicBlock2.0/bn`` and ``bn_last``; ``get_margin``; ``loss``;
  ``forward``), which follows Heo's clovaai/overhaul-distillation ``CIFAR-100/distiller.py``
  (``distillation_loss``, ``build_feature_connector``, ``get_margin_from_BN``,
  ``Distiller.forward``) and ``CIFAR-100/models/WideResNet.py`` (``get_bn_before_relu``:
  ``block2.layer[0].bn1``, ``block3.layer[0].bn1``, ``bn1``).
* feature-loss weight ``co_weight = 1e-3`` with the ``1/B`` batch mean: TF2 ``CO.py`` ``forward``
  (``/input.shape[0] * 1e-3``) = Heo's ``CIFAR-100/train_with_distillation.py``
  (``loss_distill.sum() / batch_size / 1000``).
* per-point weight ``2^-(n-1-k)`` (1/4, 1/2, 1 from the shallowest point): both ``forward``\\ s.
* no initial phase, the loss simply added to the cross-entropy (``grad_rule = "weighted"``), the
  connectors trained and weight-decayed with the student: TF2 ``CO.py`` (``student.aux_layers``)
  and Heo's optimiser over ``s_net`` + ``Connectors``.

Sensing points: our ``pre_feats[1]``, ``pre_feats[2]``, ``pre_feats[3]`` (the BN outputs before the
ReLU at the entry of groups 1 and 2 and the final BN), i.e. exactly the authors' three points;
``pre_feats[0]`` (the entry of group 0, 16 channels) is not used, as in the authors' code.

Connectors: one 1x1 conv + BN per point, from the student's width to the teacher's, at every point
(also where the widths agree, as in both reference implementations), under
``Distillation/CO/Connector{k}/{conv,bn}`` (``k`` the sensing point), main-phase variables. The BN
runs on batch statistics (training mode) in the main step.

Deviations: the connector's conv is initialised by the project's TF-Slim fan-out truncated normal
(Heo: fan-out normal ``sqrt(2/n)``; TF2: He normal); the teacher runs in inference mode (as in the
TF2 code; Heo's CIFAR script leaves the teacher's BN in training mode); the margin reads the
teacher's variables at each step instead of a constant taken once; a zero ``gamma`` is guarded
(``|gamma|`` floored at 1e-12, where the reference code divides by zero).
"""
from __future__ import annotations

import math

import tensorflow as tf

from iepkt_tf.distillers.base import Distiller, Flag, connector, connector_layers, positive

POINTS = (1, 2, 3)
DEFAULT_WEIGHT = 1e-3
CDF_FLOOR = 1e-3       # get_margin: below this Phi(-beta/|gamma|) the margin is -3 |gamma|
GAMMA_FLOOR = 1e-12


def co_margin(gamma, beta):
    """Per-channel margin ``E[x | x < 0]``, ``x ~ N(beta, gamma^2)`` (``-3|gamma|`` where
    ``Phi(-beta/|gamma|) <= 1e-3``); float32 ``[C]``, no gradient."""
    gamma = tf.stop_gradient(tf.cast(tf.convert_to_tensor(gamma), tf.float64))
    beta = tf.stop_gradient(tf.cast(tf.convert_to_tensor(beta), tf.float64))
    s = tf.maximum(tf.abs(gamma), GAMMA_FLOOR)
    z = beta / s
    cdf = 0.5 * tf.math.erfc(z / math.sqrt(2.0))           # Phi(-z)
    pdf = tf.exp(-0.5 * tf.square(z)) / math.sqrt(2.0 * math.pi)
    use = cdf > CDF_FLOOR
    expected = beta - s * pdf / tf.where(use, cdf, tf.ones_like(cdf))
    return tf.cast(tf.where(use, expected, -3.0 * s), tf.float32)


def partial_l2(student, teacher, margin):
    """``sum (s - t)^2`` over the positions where ``s > t`` or ``t > 0``, ``t = max(T, margin)``
    (``margin`` broadcast over the last axis); float32 scalar, no gradient to the teacher."""
    s = tf.cast(student, tf.float32)
    t = tf.maximum(tf.stop_gradient(tf.cast(teacher, tf.float32)), tf.cast(margin, tf.float32))
    keep = tf.logical_or(s > t, t > 0.0)
    return tf.reduce_sum(tf.square(s - t) * tf.cast(keep, tf.float32))


class CO(Distiller):
    """Heo et al.'s overhaul distillation at the authors' three pre-ReLU points (module docstring)."""
    name = "CO"
    needs_pre_relu = True
    flags = (
        Flag("float", "co_weight", DEFAULT_WEIGHT,
             "CO: weight of the feature loss; the loss is this times the point-weighted partial L2 "
             "summed over positions and averaged over the batch (the authors' 1e-3).",
             check=positive),
    )

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.weight = float(self.options.get("co_weight", DEFAULT_WEIGHT))
        self.points = POINTS
        t_ch = [int(teacher.feature_channels[k]) for k in POINTS]
        s_ch = [int(student.feature_channels[k]) for k in POINTS]
        self.teacher_channels, self.student_channels = t_ch, s_ch
        self.bns = [teacher.sensing_bns()[k] for k in POINTS]
        for k, bn in zip(POINTS, self.bns):
            if int(bn.gamma.shape[-1]) != t_ch[POINTS.index(k)]:
                raise ValueError(f"CO: the teacher's sensing BN {k} has {bn.gamma.shape[-1]} channels, "
                                 f"its feature map {t_ch[POINTS.index(k)]}")
        self.convs, self.conv_bns = [], []
        for k, ct, cs in zip(POINTS, t_ch, s_ch):
            conv, bn = connector(cs, ct, f"CO_Connector{k}")
            self.convs.append(conv)
            self.conv_bns.append(bn)

    def margins(self):
        """The three teacher margins ``[C_k]`` from the current teacher BN parameters."""
        return [co_margin(bn.gamma, bn.beta) for bn in self.bns]

    def connect(self, student_pre_feats, training=True):
        """The connector outputs (teacher widths) at the three points."""
        out = []
        for k, conv, bn in zip(POINTS, self.convs, self.conv_bns):
            x = tf.cast(student_pre_feats[k], tf.float32)
            out.append(bn(conv(x), training=training))
        return out

    def point_losses(self, student_pre_feats, teacher_pre_feats, training=True):
        """Unweighted ``partial_l2`` per point (sums over batch and positions)."""
        if student_pre_feats is None or teacher_pre_feats is None:
            raise ValueError("CO needs the pre-ReLU maps of both networks (Sensed.pre_feats)")
        connected = self.connect(student_pre_feats, training=training)
        out = []
        for k, s, m in zip(POINTS, connected, self.margins()):
            t = teacher_pre_feats[k]
            if s.shape[1:3] != t.shape[1:3]:
                raise ValueError(f"CO: student map {k} has spatial size {s.shape[1:3]}, the "
                                 f"teacher's {t.shape[1:3]}; they must match")
            out.append(partial_l2(s, t, m))
        return out

    def main_variables(self):
        return [v for layer in self.convs + self.conv_bns for v in layer.trainable_weights]

    def main_losses(self, student, teacher, labels, seed):
        losses = self.point_losses(student.pre_feats, teacher.pre_feats, training=True)
        n = len(losses)
        total = tf.add_n([l / 2.0 ** (n - 1 - i) for i, l in enumerate(losses)])
        batch = tf.cast(tf.shape(student.pre_feats[POINTS[0]])[0], tf.float32)
        return {"co": self.weight * total / batch}

    def tf1_layers(self):
        return connector_layers("CO/", POINTS, self.convs, self.conv_bns)
