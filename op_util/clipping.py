"""Per-variable clipping of the distillation gradients (our reconstruction of Optimizer_w_IEP).

The authors did not publish the optimiser of IEPKT (``op_util.Optimizer_w_IEP`` is imported by
train_w_distill.py but not in the repository). The paper says each distillation gradient is
clipped to the norm of the target (cross-entropy) gradient; the same authors' ``Optimizer_w_MHGD``
(KD_methods_with_TF op_util.py) does exactly that, per variable::

    norm = sqrt(sum(square(g_ce))) * sigmoid(epoch - init_epoch)
    g    = g_wdecay + g_ce + clip_by_norm(g_dist, norm)

IEP has three distillation losses (K_int, K_alt, K_BB). We compute their gradients separately and
clip each one on its own against the same bound, then sum (``op_util.train_steps.make_main_step``), so one
loss with a large gradient cannot use up the budget of the others.

Variables that the cross-entropy does not reach (the student-side channel adapters, which the
authors' code does not have) have no reference norm; their distillation gradients are scaled by the
warm-up factor and not clipped (``unreached="warm"``), or dropped (``unreached="drop"``).
"""
from __future__ import annotations

import tensorflow as tf


def grad_norm(g):
    """``sqrt(sum(square(g)))`` as in Optimizer_w_MHGD."""
    return tf.sqrt(tf.reduce_sum(tf.square(g)))


def _factor(norm, bound):
    """``bound / max(norm, bound)``, 0 where both are 0 (tf.clip_by_norm's scale, NaN-free)."""
    denom = tf.maximum(norm, bound)
    return tf.where(denom > 0, bound / tf.where(denom > 0, denom, tf.ones_like(denom)),
                    tf.zeros_like(denom))


def clip_with_norms(g_dist, ce_norm, warm, unreached="warm"):
    """``clip_by_norm(g_dist, ce_norm * warm)`` for one variable, with the norms it needed.

    Returns ``(clipped, norm, clipped_norm)`` (all None when ``g_dist`` is None). ``ce_norm`` is
    ``grad_norm(g_ce)`` of the same variable, or None where the cross-entropy does not reach it
    (then ``unreached`` applies). The gradient is scaled once by the scalar
    ``bound / max(||g||, bound)`` (exactly 1 when it is within the bound), so the step reads each
    gradient twice (norm, scale) and the logged norms cost no further pass.
    """
    if g_dist is None:
        return None, None, None
    warm = tf.cast(warm, g_dist.dtype)
    norm = grad_norm(g_dist)
    if ce_norm is None:
        if unreached == "warm":
            return g_dist * warm, norm, norm * warm
        if unreached == "drop":
            return None, norm, None
        raise ValueError(f"clip_with_norms: unreached must be 'warm' or 'drop', got {unreached!r}")
    factor = _factor(norm, tf.cast(ce_norm, g_dist.dtype) * warm)
    return g_dist * factor, norm, norm * factor
