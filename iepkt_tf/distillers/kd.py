"""Soft-logits knowledge distillation (Hinton, Vinyals & Dean 2015), the control for IEP.

``loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``,
the KL averaged over the batch; the ``T^2`` factor keeps the soft term's gradient on the scale of
the hard term's when ``T`` changes (the paper's section 2). Defaults ``T = 4``, ``alpha = 0.9`` are
the usual ones of the KD benchmarks (RepDistiller, mdistiller's CIFAR configs). The same authors'
TF2 ``Soft_logits`` distiller is the special case ``T = 1``, ``alpha = 0.5``.
"""
from __future__ import annotations

import tensorflow as tf

from iepkt_tf.distillers.base import Distiller, Flag, positive, unit_interval

DEFAULT_TEMPERATURE = 4.0
DEFAULT_WEIGHT = 0.9


def kd_loss(student_logits, teacher_logits, temperature=DEFAULT_TEMPERATURE):
    """``T^2 * mean_batch KL(softmax(t/T) || softmax(s/T))`` (the soft term, before ``alpha``)."""
    s = tf.cast(student_logits, tf.float32) / temperature
    t = tf.cast(teacher_logits, tf.float32) / temperature
    log_pt = tf.nn.log_softmax(t, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_pt) * (log_pt - tf.nn.log_softmax(s, axis=-1)), axis=-1)
    return temperature ** 2 * tf.reduce_mean(kl)


class KD(Distiller):
    """``ce_weight = 1 - alpha``; the one term ``kd = alpha * kd_loss`` on the logits."""
    name = "KD"
    flags = (
        Flag("float", "kd_temperature", DEFAULT_TEMPERATURE,
             "KD: softmax temperature T (the soft term is scaled by T^2).", check=positive),
        Flag("float", "kd_weight", DEFAULT_WEIGHT,
             "KD: weight alpha of the soft term; the cross-entropy gets 1 - alpha.", check=unit_interval),
    )

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.temperature = float(self.options["kd_temperature"])
        self.alpha = float(self.options["kd_weight"])
        self.ce_weight = 1.0 - self.alpha

    def main_losses(self, student, teacher, labels, seed):
        return {"kd": self.alpha * kd_loss(student.logits, teacher.logits, self.temperature)}
