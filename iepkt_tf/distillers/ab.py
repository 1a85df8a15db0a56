"""``--Distillation AB``: activation-boundary distillation (Heo, Lee, Yun & Choi, "Knowledge
Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons", AAAI 2019).

The student learns where the teacher's neurons switch on or off. At a sensing point, with ``t``
the teacher's response before its ReLU and ``s = BN(conv1x1(student's pre-ReLU response))`` (the
connector, to the teacher's width), the paper's alternative loss (eq. 7, the hinge-squared
surrogate of the boundary mismatch, margin ``mu``) is::

    L_k = sum_{b,h,w,c} [ (s + mu)^2 * 1(s > -mu and t <= 0) + (s - mu)^2 * 1(s <= mu and t > 0) ] / (B H W)

It depends on the teacher only through the sign of ``t`` (so the teacher's post-ReLU map would give
the same loss; the student's side must be pre-ReLU), and is zero once every student response is on
the teacher's side of 0 by at least the margin. Over the sensing points ``k = 0..n-1``
(shallow to deep) the initial-phase loss is ``sum_k 2^(k - n + 1) L_k`` (deepest weight 1).

Phases, as in the authors' code: the initial phase trains the student and the connectors on this
loss alone (``init_trains_student``); the connectors are then dropped and the main phase is plain
cross-entropy (no distillation term), i.e. AB is a student initialisation.

Defaults and their sources (sseung0703/Knowledge_distillation_via_TF2.0 ``distiller/AB.py``):

* sensing points: ``BasicBlock1.0/bn``, ``BasicBlock2.0/bn`` and ``bn_last``, each with
  ``keep_feat = 'pre_act'`` (lines 28-33): the BN outputs before the ReLU at the entries of groups
  1 and 2 and the final BN, i.e. our ``pre_feats[1:4]`` of both networks (``needs_pre_relu``);
* margin ``mu = 1`` (line 26), flag ``ab_margin``;
* the ``/(B H W)`` normalisation (lines 38-41) and the point weights ``2^(k - n + 1)`` (line 54);
* connector ``conv1x1`` (no bias) + BN in training mode, one per point (lines 21-24, 36);
* initial phase ``int(0.3 * train_epoch) = 30`` epochs of the authors' 100 (AB.py line 64,
  ``initialize_student``; the TF1 KD_methods_with_TF ``train_w_distill.py`` line 34 uses 40),
  then the connectors are deleted (``train_w_distillation.py`` lines 143-145) and the main loop
  trains on cross-entropy only (AB has no ``forward``: ``op_util.py`` falls back to the target
  loss).

Widths: the connector maps any student width to the teacher's; the spatial sizes must agree
(checked in ``__init__``).

Deviations:

* The connector's kernel uses the project's FAN_OUT initialiser (TF2: ``he_normal``, fan-in);
  the BN after it removes the kernel's scale, so only the direction of the draw differs.
* KD_methods_with_TF (TF1, ``nets/Multiple.py`` ``AB_distillation``) normalises by ``B`` only,
  weights the points ``2^k`` and scales by ``3e-3``; we follow the TF2 code (the defaults rule).
* The authors run the initial phase with their own optimiser at the constant base rate 0.1 and
  start the main phase with zero momentum (TF1 ``train_w_distill.py`` resets the Momentum slots);
  here the project's initial phase and optimiser apply.
"""
from __future__ import annotations

import tensorflow as tf

from iepkt_tf.distillers.base import Distiller, Flag, connector, connector_layers, positive

DEFAULT_MARGIN = 1.0
POINTS = (1, 2, 3)  # pre_feats[1:4]: entries of groups 1, 2 and the final BN, before their ReLU


def point_weights(n):
    """``2^(k - n + 1)`` for ``k = 0..n-1``: ``(1/4, 1/2, 1)`` for three points."""
    return tuple(2.0 ** (k - n + 1) for k in range(n))


def ab_loss(source, target, margin=DEFAULT_MARGIN):
    """The alternative (hinge-squared) boundary loss of one point, summed over every element and
    divided by ``B H W``; ``target`` only enters through ``target > 0``."""
    s = tf.convert_to_tensor(source)
    s = s if s.dtype == tf.float64 else tf.cast(s, tf.float32)
    on = tf.stop_gradient(tf.convert_to_tensor(target)) > 0
    m = tf.cast(margin, s.dtype)
    off_term = tf.square(s + m) * tf.cast(tf.logical_and(s > -m, tf.logical_not(on)), s.dtype)
    on_term = tf.square(s - m) * tf.cast(tf.logical_and(s <= m, on), s.dtype)
    shape = tf.shape(s)
    n = tf.cast(shape[0] * shape[1] * shape[2], s.dtype)
    return tf.reduce_sum(off_term + on_term) / n


def boundary_mismatch(source, target):
    """Fraction of elements whose activation state differs (``source > 0`` xor ``target > 0``):
    the quantity the alternative loss stands in for (the paper's eq. 3, for monitoring)."""
    s = tf.convert_to_tensor(source) > 0
    t = tf.convert_to_tensor(target) > 0
    return tf.reduce_mean(tf.cast(tf.math.logical_xor(s, t), tf.float32))


class AB(Distiller):
    """Connectors ``Distillation/Connector{k}/{conv,bn}`` for ``k`` in :data:`POINTS`, trained with
    the student in the initial phase; nothing in the main phase."""
    name = "AB"
    needs_pre_relu = True
    default_init_epoch = 30
    init_trains_student = True
    main_needs_teacher = False  # the main phase is cross-entropy alone
    flags = (
        Flag("float", "ab_margin", DEFAULT_MARGIN,
             "AB: margin mu of the activation-boundary loss (initial phase).", check=positive),
    )

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.margin = float(self.options["ab_margin"])
        image_size = self.options["image_size"]
        t_shapes = teacher.feature_shapes(image_size)
        s_shapes = student.feature_shapes(image_size)
        self.point_weights = point_weights(len(POINTS))
        self.convs, self.bns = [], []
        for k in POINTS:
            (ht, wt, ct), (hs, ws, cs) = t_shapes[k], s_shapes[k]
            if (ht, wt) != (hs, ws):
                raise ValueError(f"AB: at sensing point {k} the student's map is {hs}x{ws}, the "
                                 f"teacher's {ht}x{wt}; the connector needs the same spatial size")
            conv, bn = connector(cs, ct, f"Connector{k}")
            self.convs.append(conv)
            self.bns.append(bn)

    def connect(self, i, student_pre):
        """The ``i``-th connector on the student's pre-ReLU map (BN in training mode)."""
        return self.bns[i](self.convs[i](tf.cast(student_pre, tf.float32)), training=True)

    # ---- initial phase: student + connectors on the boundary loss
    def init_variables(self):
        return [v for layer in self.tf1_layers().values()
                for v in layer.tf1_variables().values() if v.trainable]

    def init_losses(self, student, teacher, seed):
        if student is None or student.pre_feats is None or teacher.pre_feats is None:
            raise ValueError("AB.init_losses needs the student's and the teacher's pre_feats")
        terms, total = {}, None
        for i, k in enumerate(POINTS):
            s = self.connect(i, student.pre_feats[k])
            t = tf.stop_gradient(tf.cast(teacher.pre_feats[k], tf.float32))
            term = self.point_weights[i] * ab_loss(s, t, self.margin)
            terms[f"ab{k}"] = term
            terms[f"mismatch{k}"] = tf.stop_gradient(boundary_mismatch(s, t))
            total = term if total is None else total + term
        return {"total": total, **terms}

    # ---- main phase: plain cross-entropy (the authors delete the connectors)
    def main_losses(self, student, teacher, labels, seed):
        return {}

    def tf1_layers(self):
        return connector_layers("", POINTS, self.convs, self.bns)
