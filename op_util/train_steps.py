"""Compiled training and evaluation steps (the authors' ``train_op``, ``train_op2`` and validation).

One builder serves every method of :mod:`iepkt_tf.distillers` (the interface in
``distillers/base.py``): :func:`make_init_step` for a method's initial phase, :func:`make_main_step`
for the main phase, :func:`make_eval_step` for validation. Each returns a ``tf.function``
(``reduce_retracing=True``; ``jit_compile`` off by default: XLA is 1.3-6x slower on CPU for these
networks and very slow for eigh/SVD) compiled once per phase. The steps only compute and return
metrics (losses as float32 scalars); the training loop checks them for non-finite values and logs
them.

Randomness inside a step comes from a ``seed`` argument (int64 ``[2]``, e.g. ``[run seed, global
step]``) through stateless ops: the student's dropout keep-masks here, a method's own noise (IEP's
drop-head) in the method. A step is therefore a pure function of (state, batch, seed), which makes
``--resume`` reproduce an uninterrupted run exactly.

* initial phase (the authors' ``train_op2``): teacher forward in inference mode, the method's
  ``init_losses``, update of its ``init_variables`` (and of the student when
  ``init_trains_student``); weight decay in the method's authors' form (``module_decay``:
  ``wd * sum(v**2)`` in the loss, ``Optimizer_w_MHGD``, or ``wd * v`` on the gradient, TF2) and on
  the student's gradient, in both cases only on variables the losses reach.
* main phase (``train_op``): teacher forward (inference), student forward (training),
  cross-entropy, the method's ``main_losses``; ``grad_rule "weighted"`` differentiates
  ``ce_weight * CE + sum(terms)``, ``"clip"`` clips the gradient of each of the method's
  ``clip_groups`` per variable to ``||g_ce|| * warm-up`` (op_util.clipping) before adding it to the
  cross-entropy gradient; weight decay ``wd * w`` on the student's weights/gamma/beta and on
  the method's variables (every one of them with ``module_decay = "tf2"``); Nesterov momentum.
* ``make_eval_step``: inference forward -> (correct count, summed cross-entropy).
"""
from __future__ import annotations

import re

import tensorflow as tf

from op_util.clipping import clip_with_norms, grad_norm
from op_util.distribute import Replicas
from op_util.multi_grad import per_loss_gradients
from op_util.optimizer import (add_grads, global_norm, module_l2_loss, norm_of_norms,
                               weight_decay_grads, weight_decay_loss)

# Offset folded into the per-step seed so the dropout draw has its own stream (a method's own
# noise uses another, e.g. attention_heads.NOISE_STREAM).
_DROPOUT_STREAM = 1


def trainable_named(tf1_variables):
    """``(names, variables)`` of the trainable entries of a ``{TF1 name: variable}`` dict."""
    names = [n for n, v in tf1_variables.items() if v.trainable]
    return names, [tf1_variables[n] for n in names]


def optimizer_variables(network, method):
    """``{TF1 name: variable}`` an optimiser updates: the network's trainables, then the method's
    (initial-phase and main-phase ones)."""
    from nets.layers import names_of

    named = {n: v for n, v in network.tf1_variables().items() if v.trainable}
    init = list(method.init_variables())
    seen = {id(v) for v in init}
    own = init + [v for v in method.main_variables() if id(v) not in seen]
    named.update(zip(names_of(own, method.tf1_variables()), own))
    return named


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


def dropout_masks(model, images, seed, replicas=None):
    """Stateless keep-masks for the network's dropout layers (None when it does not drop).

    WResNet drops after ``bn0`` of every block (``dropout_scopes``) with ``keep_rate``; the mask of
    a block in group g has the shape of that group's output, ``feature_shapes(...)[g + 1]``.
    The draw is ``U[0,1) < keep_rate`` like ``tf.nn.dropout``; on replicas (``op_util.distribute``)
    it is drawn for the global batch and each replica keeps its rows, as one device would.
    """
    scopes = list(getattr(model, "dropout_scopes", None) or [])
    keep = float(getattr(model, "keep_rate", 1.0))
    if not scopes or keep >= 1.0:
        return None
    batch, height, width = (int(d) for d in images.shape[:3])
    count = 1 if replicas is None else replicas.count
    shapes = model.feature_shapes((height, width))
    masks = {}
    for k, scope in enumerate(scopes):
        group = re.search(r"Resblock(\d+)/", scope)
        if group is None:
            raise ValueError(f"dropout scope {scope!r} names no group (expected '.../WResblock<g>/...')")
        h, w, c = shapes[int(group.group(1)) + 1]
        s = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(seed, _DROPOUT_STREAM), k)
        mask = tf.random.stateless_uniform([batch * count, h, w, c], seed=s) < keep
        masks[scope] = mask if replicas is None else replicas.slice_rows(mask)
    return masks


def forward(model, images, training, seed=None, pre_relu=False, replicas=None):
    """``model(images, training)`` with stateless dropout masks in training mode, as a
    :class:`~iepkt_tf.distillers.base.Sensed` (``pre_feats`` with ``pre_relu``)."""
    from iepkt_tf.distillers.base import Sensed

    masks = dropout_masks(model, images, seed, replicas) if (training and seed is not None) else None
    kwargs = {"dropout_masks": masks} if masks else {}
    if pre_relu:
        kwargs["pre_relu"] = True
    return Sensed(*model(images, training=training, **kwargs))


def sense_teacher(teacher, images, pre_relu=False):
    """The teacher's forward pass in inference mode, gradient-stopped."""
    out = forward(teacher, images, False, pre_relu=pre_relu)
    stop = tf.stop_gradient
    return out._replace(logits=stop(out.logits), feats=[stop(f) for f in out.feats],
                        pre_feats=None if out.pre_feats is None else [stop(f) for f in out.pre_feats])


def _function(fn, jit_compile, replicas=None):
    if replicas is not None:
        return replicas.compile(fn, jit_compile)
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


def _module_decay(method):
    form = getattr(method, "module_decay", "tf2")
    if form not in ("tf2", "mhgd"):
        raise ValueError(f"{method.name}: module_decay must be 'tf2' or 'mhgd', got {form!r}")
    return form


def _where_reached(decay, grads):
    """``decay`` where the loss's gradient exists, else None: a variable the phase's losses do not
    reach is neither decayed nor moved (TF2 ``AB.py`` lines 58-60, ``g + v * wd if g is not None``)."""
    return [None if g is None else d for d, g in zip(decay, grads)]


def batch_accuracy(logits, labels):
    return correct_count(logits, labels) / tf.cast(tf.shape(labels)[0], tf.float32)


def make_init_step(method, student, teacher, optimizer, wd, loss_scale=None, jit_compile=False,
                   replicas=None):
    """The initial phase of ``method``: ``step(images, labels, lr, seed) -> dict``.

    Metrics: ``loss`` (= ``module_total``: the method's ``total`` + the L2 of its variables, the
    authors' ``train_op2`` value), ``module_l2``, the method's other terms, ``grad_norm`` (of the
    applied gradient), ``applied``; with ``init_trains_student`` also ``weight_decay`` and
    ``accuracy``. ``replicas``: an ``op_util.distribute.Replicas`` to run on a strategy's replicas
    (the losses of the all-gathered global batch, or of each replica's own with
    ``batch_graph="replica"``; gradients all-reduced), None for one device.
    """
    from nets.layers import names_of

    m_vars = list(method.init_variables())
    m_names = names_of(m_vars, method.tf1_variables())
    s_names, s_vars = trainable_named(student.tf1_variables()) if method.init_trains_student else ([], [])
    variables = m_vars + s_vars
    tf2_decay = _module_decay(method) == "tf2"
    rep = replicas or Replicas()

    def step(images, labels, lr, seed):
        t_out = rep.gather_sensed(sense_teacher(teacher, images, method.needs_pre_relu))
        labels = rep.gather(labels)
        with tf.GradientTape() as tape:
            s_out = None
            if method.init_trains_student:
                s_out = rep.gather_sensed(forward(student, images, True, seed, method.needs_pre_relu,
                                                  replicas))
            losses = method.init_losses(s_out, t_out, seed)
            if tf2_decay:
                l2 = weight_decay_loss(m_vars, m_names, wd, every_leaf=True)
                total = losses["total"] + tf.stop_gradient(l2)
            else:
                l2 = module_l2_loss(m_vars, m_names, wd)
                total = losses["total"] + l2
            scaled = _scaled(rep.scale(total), loss_scale)
        grads = rep.sum(_grads(tape, scaled, variables, loss_scale))
        decay = (weight_decay_grads(m_vars, m_names, wd, every_leaf=True) if tf2_decay
                 else [None] * len(m_vars)) + weight_decay_grads(s_vars, s_names, wd)
        grads = add_grads(grads, _where_reached(decay, grads))
        applied = _apply(optimizer, grads, variables, lr, loss_scale)
        metrics = {k: v for k, v in losses.items() if k != "total"}
        metrics.update({"loss": total, "module_total": total, "module_l2": l2,
                        "grad_norm": global_norm(grads), "applied": applied})
        if s_vars:
            reached = [(v, n) for v, n, g in zip(s_vars, s_names, grads[len(m_vars):]) if g is not None]
            metrics["weight_decay"] = weight_decay_loss(*zip(*reached), wd) if reached else tf.constant(0.0)
            metrics["accuracy"] = batch_accuracy(s_out.logits, labels)
        return metrics

    return _function(step, jit_compile, replicas)


def make_main_step(method, student, teacher, optimizer, wd, loss_scale=None, jit_compile=False,
                   grad_method="auto", replicas=None):
    """The main phase of ``method``: ``step(images, labels, lr, warm, seed) -> dict``.

    Metrics: ``loss`` (``ce_weight * CE`` + the method's terms + L2), ``cross_entropy``, each term,
    ``weight_decay``, ``accuracy``, ``grad_norm`` (of the cross-entropy gradient with the clip
    rule, else of the differentiated loss's), ``applied``; with the clip rule also
    ``grad_norm/<group>`` and ``grad_norm/<group>_clipped`` (global norms of each group's gradient
    before and after clipping), ``grad_norm/total`` (the applied gradient) and ``warmup``.
    ``grad_method``: how the per-group gradients are taken (op_util.multi_grad); ``replicas``
    as in :func:`make_init_step` (the clip rule clips the all-reduced gradients).
    """
    from nets.layers import names_of

    s_names, s_vars = trainable_named(student.tf1_variables())
    d_vars = list(method.main_variables())
    d_names = names_of(d_vars, method.tf1_variables()) if d_vars else []
    names, variables = s_names + d_names, s_vars + d_vars
    every_leaf = _module_decay(method) == "tf2"
    clip = method.grad_rule == "clip"
    if method.grad_rule not in ("weighted", "clip"):
        raise ValueError(f"{method.name}: grad_rule must be 'weighted' or 'clip', got {method.grad_rule!r}")
    ce_weight = float(method.ce_weight)
    rep = replicas or Replicas()

    def step(images, labels, lr, warm, seed):
        t_out = None
        if method.needs_teacher and method.main_needs_teacher:
            t_out = rep.gather_sensed(sense_teacher(teacher, images, method.needs_pre_relu))
        labels = rep.gather(labels)
        with tf.GradientTape(persistent=clip) as tape:
            s_out = rep.gather_sensed(forward(student, images, True, seed, method.needs_pre_relu,
                                              replicas))
            ce = cross_entropy(s_out.logits, labels)
            terms = {k: tf.cast(v, tf.float32)
                     for k, v in method.main_losses(s_out, t_out, labels, seed).items()}
            if clip:
                groups = method.clip_groups(tuple(terms))
                scaled = [_scaled(rep.scale(tf.add_n([terms[k] for k in group])), loss_scale)
                          for group in groups.values()]
                objective = ce
            else:
                objective = ce if ce_weight == 1.0 else ce_weight * ce
                for v in terms.values():
                    objective = objective + v
            scaled_objective = _scaled(rep.scale(objective), loss_scale)
        g_main = rep.sum(_grads(tape, scaled_objective, variables, loss_scale))
        metrics = {"cross_entropy": ce, **terms}
        parts = [g_main]
        if clip:
            g_groups = per_loss_gradients(tape, scaled, variables, grad_method)
            ce_norms = [None if g is None else grad_norm(g) for g in g_main]
            for name, g_k in zip(groups, g_groups):
                if loss_scale is not None:
                    g_k = loss_scale.unscale(g_k)
                g_k = rep.sum(g_k)
                clipped, norms, clipped_norms = zip(*[clip_with_norms(g, n, warm)
                                                      for g, n in zip(g_k, ce_norms)])
                parts.append(list(clipped))
                metrics["grad_norm/" + name] = norm_of_norms(norms)
                metrics["grad_norm/" + name + "_clipped"] = norm_of_norms(clipped_norms)
            del tape
        decay = (weight_decay_grads(s_vars, s_names, wd)
                 + weight_decay_grads(d_vars, d_names, wd, every_leaf=every_leaf))
        grads = add_grads(*parts, decay)
        applied = _apply(optimizer, grads, variables, lr, loss_scale)
        l2 = (weight_decay_loss(s_vars, s_names, wd)
              + weight_decay_loss(d_vars, d_names, wd, every_leaf=every_leaf))
        if clip:
            total = ce + l2
            for v in terms.values():
                total = total + v
            metrics.update({"grad_norm": norm_of_norms(ce_norms), "grad_norm/total": global_norm(grads),
                            "warmup": tf.cast(warm, tf.float32)})
        else:
            total = objective + l2
            metrics["grad_norm"] = global_norm(g_main)
        metrics.update({"loss": total, "weight_decay": l2,
                        "accuracy": batch_accuracy(s_out.logits, labels), "applied": applied})
        return metrics

    return _function(step, jit_compile, replicas)


def make_eval_step(model, jit_compile=False):
    """``step(images, labels) -> (correct count, summed cross-entropy)`` in inference mode."""

    def step(images, labels):
        logits, _ = model(images, training=False)
        logits = tf.cast(logits, tf.float32)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32),
                                                            logits=logits)
        return correct_count(logits, labels), tf.reduce_sum(ce)

    return _function(step, jit_compile)
