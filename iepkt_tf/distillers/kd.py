"""Soft-logits knowledge distillation (Hinton, Vinyals & Dean 2015), the control for IEP.

One objective, three flags::

    loss = (1 - alpha) * CE(student, labels) + alpha * c * mean_b KL(softmax(t/T) || softmax(s/T))
    c    = T^2 if kd_t_squared else 1

(``t``, ``s`` the teacher's and the student's logits, KL summed over the classes, ``alpha`` =
``--kd_weight``, ``T`` = ``--kd_temperature``). The default, ``T = 4``, ``alpha = 0.9``, ``c = T^2``,
is the standard form of the KD benchmarks (RepDistiller, mdistiller's CIFAR configs) and of Keras'
own ``keras.distillation.LogitsDistillation(loss=KLDivergence())``; it is the default because it is
the usual control, and the ``T^2`` keeps the soft term's gradient, ``T (p_s - p_t) / B``, on the
scale of the hard term's when ``T`` changes (Hinton et al., section 2).

The same authors' own Soft_logits codes are this formula without ``T^2``, with their own ``T`` and
``alpha`` (both: KL(teacher || student) of the softened distributions, the teacher in inference mode,
no epsilon, no ``T^2``; the weight decay is outside the weighting):

* TF2, sseung0703/Knowledge_distillation_via_TF2.0 ``distiller/Soft_logits.py``: ``T = 5``
  (line 18); ``KLD(x, y)`` (lines 25-29) divides both logits by ``T`` and returns
  ``reduce_sum(softmax(x) * (log_softmax(x) - log_softmax(y))) / B`` (sum over classes and batch,
  over the batch size: the batch mean) with ``x`` the teacher's and ``y`` the student's ``fc``
  output; ``forward`` (line 34) returns ``(target_loss + KLD) / 2``, ``target_loss`` the batch-mean
  sparse softmax cross-entropy (``op_util.py`` lines 9, 24), the weight decay added to the gradient
  afterwards (``op_util.py`` lines 37-38). That is ``(CE + KL_5) / 2``:
  ``--kd_temperature=5 --kd_weight=0.5 --nokd_t_squared``.
* TF1, sseung0703/KD_methods_with_TF ``nets/Response.py`` lines 3-10: ``Soft_logits(student,
  teacher, T=2)`` = ``reduce_mean_b sum_c softmax(t/T) (log_softmax(t/T) - log_softmax(s/T))``,
  called with ``T = 4`` (``nets/ResNet.py`` line 100) and weighted ``class_loss*0.7 + dist*0.3``
  (``op_util.py`` line 23; ``class_loss`` the batch-mean ``tf.losses.softmax_cross_entropy``,
  ``train_w_distill.py`` line 217). That is ``0.7 CE + 0.3 KL_4``:
  ``--kd_temperature=4 --kd_weight=0.3 --nokd_t_squared``.

Every form has ``ce_weight = 1 - alpha``, so no separate cross-entropy weight is needed; without
``T^2`` the soft term's gradient is ``T^2`` times smaller than the standard form's at the same
``alpha`` (the authors' ``T = 5``: 25 times).
"""
from __future__ import annotations

import tensorflow as tf

from iepkt_tf.distillers.base import Distiller, Flag, positive, unit_interval

DEFAULT_TEMPERATURE = 4.0
DEFAULT_WEIGHT = 0.9
DEFAULT_T_SQUARED = True


def kd_loss(student_logits, teacher_logits, temperature=DEFAULT_TEMPERATURE, t_squared=DEFAULT_T_SQUARED):
    """``c * mean_batch KL(softmax(t/T) || softmax(s/T))``, ``c = T^2`` if ``t_squared`` else 1
    (the soft term, before ``alpha``)."""
    s = tf.cast(student_logits, tf.float32) / temperature
    t = tf.cast(teacher_logits, tf.float32) / temperature
    log_pt = tf.nn.log_softmax(t, axis=-1)
    kl = tf.reduce_mean(tf.reduce_sum(tf.exp(log_pt) * (log_pt - tf.nn.log_softmax(s, axis=-1)), axis=-1))
    return temperature ** 2 * kl if t_squared else kl


class KD(Distiller):
    """``ce_weight = 1 - alpha``; the one term ``kd = alpha * kd_loss`` on the logits."""
    name = "KD"
    flags = (
        Flag("float", "kd_temperature", DEFAULT_TEMPERATURE,
             "KD: softmax temperature T (standard 4; the authors' TF2 code 5, their TF1 code 4).",
             check=positive),
        Flag("float", "kd_weight", DEFAULT_WEIGHT,
             "KD: weight alpha of the soft term; the cross-entropy gets 1 - alpha (standard 0.9; "
             "the authors' TF2 code 0.5, their TF1 code 0.3).", check=unit_interval),
        Flag("boolean", "kd_t_squared", DEFAULT_T_SQUARED,
             "KD: multiply the soft term by T^2 (standard, Hinton et al.); --nokd_t_squared as in "
             "both authors' codes (TF2: --kd_temperature=5 --kd_weight=0.5 --nokd_t_squared)."),
    )

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.temperature = float(self.options["kd_temperature"])
        self.alpha = float(self.options["kd_weight"])
        self.t_squared = bool(self.options["kd_t_squared"])
        self.ce_weight = 1.0 - self.alpha

    def main_losses(self, student, teacher, labels, seed):
        return {"kd": self.alpha * kd_loss(student.logits, teacher.logits, self.temperature, self.t_squared)}
