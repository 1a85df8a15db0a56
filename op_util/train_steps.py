"""Compiled training and evaluation steps (the authors' ``train_op``, ``train_op2`` and validation).

Every factory returns a ``tf.function`` (``reduce_retracing=True``; ``jit_compile`` off by default:
XLA is 1.3-6x slower on CPU for these networks and very slow for eigh/SVD, see NOTES.md). The steps
only compute and return metrics (losses as float32 scalars); the training loop checks them for
non-finite values and logs them.

Randomness inside a step comes from a ``seed`` argument (int64 ``[2]``, e.g. ``[run seed, global
step]``) through stateless ops: the student's dropout keep-masks and the drop-head noise of the
estimator. A step is therefore a pure function of (state, batch, seed), which makes ``--resume``
reproduce an uninterrupted run exactly.

* ``make_plain_step``: ``Distillation None``: cross-entropy, L2 weight decay (gradient ``wd * w``
  on weights/gamma/beta), Nesterov momentum.
* ``make_iep_init_step``: phase 1 (``epoch < init_epoch``, the authors' ``train_op2``): teacher
  forward in inference mode, the distillation module in training mode (IPCA state and module BN
  statistics update), update of the module only on ``MHA_loss + wd * sum(v**2)``
  (``Optimizer_w_MHGD``). The student is not run.
* ``make_iep_main_step``: phase 2 (``train_op``): teacher forward (inference), student forward
  (training), cross-entropy; K_int, K_alt and K_BB with the module in inference mode and its state
  frozen; gradients of the cross-entropy and of each distillation loss taken separately, each
  distillation gradient clipped per variable to ``||g_ce|| * warm-up`` (op_util.clipping), weight
  decay added, Nesterov update of the student (and the student-side adapters, if any).
* ``make_kd_step``: ``Distillation KD`` (Hinton et al. 2015): teacher forward (inference), student
  on ``(1 - alpha) CE + alpha T^2 KL`` (+ L2), Nesterov momentum.
* ``make_eval_step``: inference forward -> (correct count, summed cross-entropy).
"""
from __future__ import annotations

import re

import tensorflow as tf

from op_util.clipping import clip_with_norms, grad_norm
from op_util.multi_grad import per_loss_gradients
from op_util.optimizer import (add_grads, global_norm, module_l2_loss, norm_of_norms,
                               weight_decay_grads, weight_decay_loss)

# Offsets folded into the per-step seed so each random draw has its own stream.
_DROPOUT_STREAM = 1
_NOISE_STREAM = 2
_DISTILL_LOSSES = ("k_int", "k_alt", "k_bb")


def trainable_named(tf1_variables):
    """``(names, variables)`` of the trainable entries of a ``{TF1 name: variable}`` dict."""
    names = [n for n, v in tf1_variables.items() if v.trainable]
    return names, [tf1_variables[n] for n in names]


def cross_entropy(logits, labels):
    """``tf.losses.softmax_cross_entropy`` with one-hot labels: mean over the batch."""
    logits = tf.cast(logits, tf.float32)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=logits))


def correct_count(logits, labels):
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32),
                                          tf.cast(labels, tf.int32)), tf.float32))


def step_seed(run_seed, global_step):
    """The seed of one step: ``[run_seed, global_step]`` as int64 (for stateless random ops)."""
    return tf.constant([int(run_seed), int(global_step)], dtype=tf.int64)


def dropout_masks(model, images, seed):
    """Stateless keep-masks for the network's dropout layers (None when it does not drop).

    WResNet drops after ``bn0`` of every block (``dropout_scopes``) with ``keep_rate``; the mask of
    a block in group g has the shape of that group's output, ``feature_shapes(...)[g + 1]``.
    The draw is ``U[0,1) < keep_rate`` like ``tf.nn.dropout``.
    """
    scopes = list(getattr(model, "dropout_scopes", None) or [])
    keep = float(getattr(model, "keep_rate", 1.0))
    if not scopes or keep >= 1.0:
        return None
    batch, height, width = (int(d) for d in images.shape[:3])
    shapes = model.feature_shapes((height, width))
    masks = {}
    for k, scope in enumerate(scopes):
        group = re.search(r"Resblock(\d+)/", scope)
        if group is None:
            raise ValueError(f"dropout scope {scope!r} names no group (expected '.../WResblock<g>/...')")
        h, w, c = shapes[int(group.group(1)) + 1]
        s = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(seed, _DROPOUT_STREAM), k)
        masks[scope] = tf.random.stateless_uniform([batch, h, w, c], seed=s) < keep
    return masks


def forward(model, images, training, seed=None):
    """``model(images, training)`` with stateless dropout masks in training mode."""
    masks = dropout_masks(model, images, seed) if (training and seed is not None) else None
    if masks:
        return model(images, training=training, dropout_masks=masks)
    return model(images, training=training)


def _function(fn, jit_compile):
    return tf.function(fn, reduce_retracing=True, jit_compile=bool(jit_compile))


def _scaled(loss, loss_scale):
    """The loss to differentiate (scaled for float16); must be computed inside the tape."""
    return loss if loss_scale is None else loss_scale.scale_loss(loss)


def _grads(tape, scaled_loss, variables, loss_scale):
    """Gradients of a loss returned by ``_scaled`` (unscaled again for float16)."""
    grads = tape.gradient(scaled_loss, variables)
    return grads if loss_scale is None else loss_scale.unscale(grads)


def _apply(optimizer, grads, variables, lr, loss_scale):
    if loss_scale is None:
        optimizer.apply(grads, variables, lr)
        return tf.constant(True)
    return loss_scale.apply(optimizer, grads, variables, lr)


def make_plain_step(model, optimizer, wd, loss_scale=None, jit_compile=False):
    """``step(images, labels, lr, seed) -> dict`` training ``model`` on cross-entropy (+ L2).

    Metrics: ``loss`` (CE + the authors' L2 loss ``wd/2 * sum w**2``), ``cross_entropy``,
    ``weight_decay``, ``accuracy`` (batch fraction), ``grad_norm`` (global norm of the CE gradient),
    ``applied`` (False when a float16 step was skipped).
    """
    names, variables = trainable_named(model.tf1_variables())

    def step(images, labels, lr, seed):
        with tf.GradientTape() as tape:
            logits, _ = forward(model, images, True, seed)
            ce = cross_entropy(logits, labels)
            scaled = _scaled(ce, loss_scale)
        g_ce = _grads(tape, scaled, variables, loss_scale)
        grads = add_grads(g_ce, weight_decay_grads(variables, names, wd))
        applied = _apply(optimizer, grads, variables, lr, loss_scale)
        l2 = weight_decay_loss(variables, names, wd)
        return {"loss": ce + l2, "cross_entropy": ce, "weight_decay": l2,
                "accuracy": correct_count(logits, labels) / tf.cast(tf.shape(labels)[0], tf.float32),
                "grad_norm": global_norm(g_ce), "applied": applied}

    return _function(step, jit_compile)


def make_kd_step(student, teacher, optimizer, wd, temperature=4.0, alpha=0.9, loss_scale=None,
                 jit_compile=False):
    """``Distillation KD``: ``step(images, labels, lr, seed) -> dict`` training the student on
    ``(1 - alpha) * CE + alpha * kd_loss`` (:mod:`iepkt_tf.kd`) with the teacher in inference mode.

    Metrics as :func:`make_plain_step` plus ``kd`` (the soft term before ``alpha``); ``loss`` is the
    weighted sum + L2, ``grad_norm`` the global norm of the weighted gradient.
    """
    from iepkt_tf.kd import kd_loss

    names, variables = trainable_named(student.tf1_variables())

    def step(images, labels, lr, seed):
        t_logits, _ = teacher(images, training=False)
        t_logits = tf.stop_gradient(t_logits)
        with tf.GradientTape() as tape:
            logits, _ = forward(student, images, True, seed)
            ce = cross_entropy(logits, labels)
            soft = kd_loss(logits, t_logits, temperature)
            total = (1.0 - alpha) * ce + alpha * soft
            scaled = _scaled(total, loss_scale)
        g = _grads(tape, scaled, variables, loss_scale)
        grads = add_grads(g, weight_decay_grads(variables, names, wd))
        applied = _apply(optimizer, grads, variables, lr, loss_scale)
        l2 = weight_decay_loss(variables, names, wd)
        return {"loss": total + l2, "cross_entropy": ce, "kd": soft, "weight_decay": l2,
                "accuracy": correct_count(logits, labels) / tf.cast(tf.shape(labels)[0], tf.float32),
                "grad_norm": global_norm(g), "applied": applied}

    return _function(step, jit_compile)


def make_eval_step(model, jit_compile=False):
    """``step(images, labels) -> (correct count, summed cross-entropy)`` in inference mode."""

    def step(images, labels):
        logits, _ = model(images, training=False)
        logits = tf.cast(logits, tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32),
                                                            logits=logits)
        return correct_count(logits, labels), tf.reduce_sum(ce)

    return _function(step, jit_compile)


def _named_subset(distiller, variables):
    """TF1 names of ``variables`` as reported by ``distiller.tf1_variables()``."""
    by_id = {id(v): n for n, v in distiller.tf1_variables().items()}
    names = []
    for v in variables:
        if id(v) not in by_id:
            raise ValueError(f"distiller variable {getattr(v, 'path', v)} has no TF1 name")
        names.append(by_id[id(v)])
    return names


def drop_head_noise(distiller, batch, seed):
    """Stateless drop-head noise ``[num_head, B, 1]`` per EKI module (the authors'
    ``tf.random.normal`` in ``drop_head``), in the layout ``distiller.module_losses`` takes."""
    num_modules = len(distiller.teacher_channels) - 1
    num_head = int(distiller.num_head)
    base = tf.random.experimental.stateless_fold_in(seed, _NOISE_STREAM)
    return [tf.random.stateless_normal([num_head, batch, 1],
                                       seed=tf.random.experimental.stateless_fold_in(base, i))
            for i in range(num_modules)]


def make_iep_init_step(teacher, distiller, optimizer, wd_module=5e-4, loss_scale=None,
                       jit_compile=False):
    """Phase 1: ``step(images, labels, lr, seed) -> dict`` updating only the module.

    Metrics: ``loss`` (= ``module_total``: MHA_loss + module L2, the authors' ``train_op2`` value),
    ``mha_loss``, ``mpnn_kld``, ``est_loss`` (summed over modules), ``module_l2``, ``grad_norm``.
    """
    variables = list(distiller.module_variables())
    names = _named_subset(distiller, variables)

    def step(images, labels, lr, seed):
        del labels  # the module is trained on the teacher's features only
        _, t_feats = teacher(images, training=False)
        t_feats = [tf.stop_gradient(f) for f in t_feats[1:4]]
        noise = drop_head_noise(distiller, int(images.shape[0]), seed)
        with tf.GradientTape() as tape:
            losses = distiller.module_losses(t_feats, noise=noise, training=True,
                                             update_state=True)
            l2 = module_l2_loss(variables, names, wd_module)
            total = losses["total"] + l2
            scaled = _scaled(total, loss_scale)
        grads = _grads(tape, scaled, variables, loss_scale)
        applied = _apply(optimizer, grads, variables, lr, loss_scale)
        return {"loss": total, "module_total": total, "mha_loss": losses["total"],
                "mpnn_kld": tf.reduce_sum(losses["mpnn_kld"]),
                "est_loss": tf.reduce_sum(losses["est_loss"]), "module_l2": l2,
                "grad_norm": global_norm(grads), "applied": applied}

    return _function(step, jit_compile)


def enabled_terms(distiller):
    """The distillation losses the distiller computes (``k_int``, ``k_alt``, ``k_bb`` unless
    switched off with ``use_k_*``)."""
    return tuple(k for k in _DISTILL_LOSSES if getattr(distiller, "use_" + k, True))


CLIP_RULES = ("separate", "summed")


def make_iep_main_step(student, teacher, distiller, optimizer, wd, loss_scale=None,
                       jit_compile=False, grad_method="auto", clip="separate"):
    """Phase 2: ``step(images, labels, lr, warm, seed) -> dict`` updating the student.

    Metrics: ``loss`` (CE + sum of the enabled distillation losses + L2), ``cross_entropy``,
    ``k_int``/``k_alt``/``k_bb``, ``weight_decay``, ``accuracy``, ``grad_norm`` (CE),
    ``grad_norm/<k>`` and ``grad_norm/<k>_clipped`` (global norms of each distillation gradient
    before and after clipping), ``grad_norm/total`` (the applied gradient), ``warmup``.
    ``grad_method``: how the per-loss gradients are taken (op_util.multi_grad; ``auto`` = the
    measured faster one, separate backward passes on this CPU).
    ``clip``: ``"separate"`` clips each loss's gradient on its own (per variable, against the
    cross-entropy gradient; the distillation part may reach 3x its norm); ``"summed"`` clips the
    gradient of ``k_int + k_alt + k_bb`` once (as ``Optimizer_w_MHGD`` does its one loss; one
    distillation backward pass instead of three). Its metrics are ``grad_norm/distill[_clipped]``.
    """
    if clip not in CLIP_RULES:
        raise ValueError(f"make_iep_main_step: clip must be one of {CLIP_RULES}, got {clip!r}")
    s_names, s_vars = trainable_named(student.tf1_variables())
    a_vars = list(distiller.adapter_variables())
    a_names = _named_subset(distiller, a_vars) if a_vars else []
    names, variables = s_names + a_names, s_vars + a_vars
    terms = enabled_terms(distiller)
    groups = [(k,) for k in terms] if clip == "separate" else [terms]

    def step(images, labels, lr, warm, seed):
        _, t_feats = teacher(images, training=False)
        t_feats = [tf.stop_gradient(f) for f in t_feats[1:4]]
        with tf.GradientTape(persistent=True) as tape:
            logits, s_feats = forward(student, images, True, seed)
            ce = cross_entropy(logits, labels)
            raw = distiller.distill_losses(s_feats[1:4], t_feats)
            dist = {k: tf.cast(raw[k], tf.float32) for k in terms}
            scaled = [_scaled(tf.add_n([dist[k] for k in group]), loss_scale) for group in groups]
            scaled_ce = _scaled(ce, loss_scale)
        g_ce = _grads(tape, scaled_ce, variables, loss_scale)
        g_dist = per_loss_gradients(tape, scaled, variables, grad_method)
        metrics = {"cross_entropy": ce, **dist}
        ce_norms = [None if g is None else grad_norm(g) for g in g_ce]
        clipped_all = []
        for group, g_k in zip(groups, g_dist):
            k = group[0] if clip == "separate" else "distill"
            if loss_scale is not None:
                g_k = loss_scale.unscale(g_k)
            clipped, norms, clipped_norms = zip(*[clip_with_norms(g, n, warm)
                                                  for g, n in zip(g_k, ce_norms)])
            clipped_all.append(list(clipped))
            metrics["grad_norm/" + k] = norm_of_norms(norms)
            metrics["grad_norm/" + k + "_clipped"] = norm_of_norms(clipped_norms)
        del tape
        grads = add_grads(g_ce, *clipped_all, weight_decay_grads(variables, names, wd))
        applied = _apply(optimizer, grads, variables, lr, loss_scale)
        l2 = weight_decay_loss(variables, names, wd)
        total = ce + l2
        for k in terms:
            total = total + metrics[k]
        metrics.update({"loss": total, "weight_decay": l2,
                        "accuracy": correct_count(logits, labels)
                        / tf.cast(tf.shape(labels)[0], tf.float32),
                        "grad_norm": norm_of_norms(ce_norms), "grad_norm/total": global_norm(grads),
                        "warmup": tf.cast(warm, tf.float32), "applied": applied})
        return metrics

    return _function(step, jit_compile)
