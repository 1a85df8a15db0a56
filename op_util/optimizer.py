"""The authors' optimiser: TF1 Nesterov momentum, L2 weight decay, and a loss scale for float16.

``tf.train.MomentumOptimizer(LR, 0.9, use_nesterov=True)`` (KD_methods_with_TF op_util.py, used by
IEPKT's train_w_distill.py) applies, per variable, the ``ApplyMomentum`` kernel::

    accum = momentum * accum + grad
    var  -= lr * grad + lr * momentum * accum

Keras' SGD(nesterov=True) is a different parametrisation (it stores ``-lr * accum``), so the
TF1 update is written out here with one ``Momentum`` slot per variable, created when the optimiser is
built (never inside a ``tf.function``) and checkpointable through ``tf.train.Checkpoint``.

Weight decay: the authors' arg scope (KD_methods_with_TF nets/ResNet.py ``ResNet_arg_scope``) puts
``l2_regularizer(5e-4)`` on every conv/FC ``weights`` and every BN ``gamma`` and ``beta``;
``l2_regularizer(wd)(w) = wd * sum(w**2) / 2``, so its gradient is ``wd * w``
(``weight_decay_grads``). A method's own variables are decayed in its authors' form (the
method's ``module_decay``, :mod:`iepkt_tf.distillers.base`): MHGD's and IEP's module in the
optimiser (``Optimizer_w_MHGD``: ``mha_loss += 5e-4 * sum(v**2)`` over variables whose leaf name
starts with ``g``, ``w`` or ``b``: gamma, weights, biases, beta; see ``module_l2_loss``); the
methods taken from the authors' TF2 repository by ``gradient += wd * v`` on every variable
(``weight_decay_grads(..., every_leaf=True)``).
"""
from __future__ import annotations

import tensorflow as tf

# Leaf names that carry the authors' l2_regularizer (conv/FC weights, BN gamma/beta).
DECAYED_LEAVES = ("weights", "gamma", "beta")


def leaf_name(name):
    """Last component of a TF1 variable name (``Student/full/biases`` -> ``biases``)."""
    return name.rstrip("/").split("/")[-1].split(":")[0]


def is_decayed(name):
    """True for the variables the authors' arg scope regularises: conv/FC ``weights`` and BN
    ``gamma``/``beta``; False for FC ``biases`` and BN moving statistics."""
    return leaf_name(name) in DECAYED_LEAVES


def weight_decay_grads(variables, names, wd, every_leaf=False):
    """The gradient of the authors' L2 regularisation: ``wd * v`` where ``is_decayed(name)`` (or for
    every variable with ``every_leaf``: the TF2 repository's ``g + v * weight_decay``, its
    ``op_util.py`` line 38), else None (one entry per variable, aligned with ``variables``)."""
    variables, names = list(variables), list(names)
    if len(variables) != len(names):
        raise ValueError(f"weight_decay_grads: {len(variables)} variables but {len(names)} names")
    out = []
    for v, n in zip(variables, names):
        out.append(tf.convert_to_tensor(v) * wd if wd and (every_leaf or is_decayed(n)) else None)
    return out


def weight_decay_loss(variables, names, wd, every_leaf=False):
    """The regularisation loss whose gradient :func:`weight_decay_grads` is: ``wd/2 * sum v**2``
    (the authors' ``sum wd * l2_loss(v)``; for logging)."""
    terms = [tf.reduce_sum(tf.square(tf.convert_to_tensor(v)))
             for v, n in zip(variables, names) if every_leaf or is_decayed(n)]
    if not terms or not wd:
        return tf.constant(0.0)
    return 0.5 * wd * tf.add_n(terms)


def module_l2_loss(variables, names, wd=5e-4):
    """``Optimizer_w_MHGD``: ``wd * sum(v**2)`` over module variables whose leaf name starts with
    g/w/b (gamma, weights, biases, beta). Note: no 1/2, so the gradient is ``2 * wd * v``."""
    terms = [tf.reduce_sum(tf.square(tf.convert_to_tensor(v)))
             for v, n in zip(variables, names) if leaf_name(n)[:1] in ("g", "w", "b")]
    if not terms or not wd:
        return tf.constant(0.0)
    return tf.add_n(terms) * wd


def add_grads(*grad_lists):
    """Element-wise sum of aligned gradient lists; None entries are treated as absent."""
    out = []
    for gs in zip(*grad_lists):
        present = [g for g in gs if g is not None]
        out.append(None if not present else (present[0] if len(present) == 1 else tf.add_n(present)))
    return out


def norm_of_norms(norms):
    """``sqrt(sum n^2)`` of per-variable norms (None skipped): ``global_norm`` from norms already
    computed, without another pass over the gradients."""
    present = [tf.square(n) for n in norms if n is not None]
    if not present:
        return tf.constant(0.0)
    return tf.sqrt(tf.add_n(present))


def global_norm(grads):
    """sqrt(sum ||g||^2) over the non-None gradients (0 if there are none)."""
    present = [tf.reduce_sum(tf.square(g)) for g in grads if g is not None]
    if not present:
        return tf.constant(0.0)
    return tf.sqrt(tf.add_n(present))


class _Untracked:
    """A plain holder: attributes of a tf.Module stored in it are not checkpoint dependencies."""

    def __init__(self, **items):
        self.__dict__.update(items)


class NesterovMomentum(tf.Module):
    """``tf.train.MomentumOptimizer(lr, momentum, use_nesterov=True)`` with TF1 semantics.

    ``variables``: a dict ``{TF1 name: variable}`` or a list of variables (then named by their
    ``path``/``name``). One ``<name>/Momentum`` slot per variable is created here.
    ``apply(grads, variables, lr)`` skips None gradients (as TF1 ``apply_gradients`` does) and
    increments ``iterations`` (the authors' ``global_step``).
    """

    def __init__(self, variables, momentum=0.9, name="Momentum"):
        super().__init__(name=name)
        if isinstance(variables, dict):
            items = list(variables.items())
        else:
            items = [(getattr(v, "path", None) or v.name, v) for v in variables]
        if not items:
            raise ValueError("NesterovMomentum: empty variable list")
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError("NesterovMomentum: duplicate variable names")
        self.momentum = float(momentum)
        # The trained variables belong to their networks: kept out of this module's checkpoint
        # dependencies (only the slots and the step counter are the optimiser's state).
        self._untracked = _Untracked(variables=[v for _, v in items], names=names)
        self._index = {id(v): i for i, v in enumerate(self._untracked.variables)}
        # slots dict keyed by TF1 name: readable checkpoint keys (".../weights/Momentum").
        self.slots = {n + "/Momentum": tf.Variable(tf.zeros(v.shape, dtype=v.dtype),
                                                   trainable=False, name="Momentum")
                      for n, v in items}
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")

    @property
    def names(self):
        return list(self._untracked.names)

    def slot(self, variable):
        """The ``Momentum`` accumulator of ``variable``."""
        i = self._index.get(id(variable))
        if i is None:
            raise ValueError(f"NesterovMomentum: variable {getattr(variable, 'path', variable)} "
                             "was not given to the optimiser at construction")
        return self.slots[self._untracked.names[i] + "/Momentum"]

    def apply(self, grads, variables, lr, where=None):
        """One TF1 Nesterov step on ``variables`` with ``grads`` (None entries skipped); with a
        boolean ``where`` tensor, a step that changes nothing when it is False (no ``tf.cond``:
        a strategy's replica context cannot assign inside one)."""
        grads, variables = list(grads), list(variables)
        if len(grads) != len(variables):
            raise ValueError(f"NesterovMomentum.apply: {len(grads)} gradients for "
                             f"{len(variables)} variables")
        lr = tf.cast(lr, tf.float32)
        m = tf.constant(self.momentum, tf.float32)
        for g, v in zip(grads, variables):
            if g is None:
                continue
            accum = self.slot(v)
            g = tf.cast(g, accum.dtype)
            if where is None:
                new_accum = accum * m + g
                accum.assign(new_accum)
                v.assign_sub(g * lr + new_accum * m * lr)
                continue
            g = tf.where(where, g, tf.zeros_like(g))
            new_accum = tf.where(where, accum * m + g, accum)
            accum.assign(new_accum)
            v.assign_sub(tf.where(where, g * lr + new_accum * m * lr, tf.zeros_like(g)))
        self.iterations.assign_add(1 if where is None else tf.cast(where, tf.int64))


class DynamicLossScale(tf.Module):
    """A small dynamic loss scale for ``mixed_float16`` (Keras' LossScaleOptimizer policy).

    ``scale_loss`` multiplies a loss by the current scale, ``unscale`` divides gradients by it.
    ``apply(optimizer, grads, variables, lr)`` applies the step only when every gradient is finite;
    a non-finite step is skipped and halves the scale (not below 1); after ``growth_interval``
    consecutive finite steps the scale doubles.
    """

    def __init__(self, initial_scale=2.0 ** 15, growth_interval=2000, name="loss_scale"):
        super().__init__(name=name)
        self.growth_interval = int(growth_interval)
        self.scale = tf.Variable(float(initial_scale), dtype=tf.float32, trainable=False,
                                 name="scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")

    def scale_loss(self, loss):
        return loss * tf.cast(self.scale, loss.dtype)

    def unscale(self, grads):
        inv = 1.0 / self.scale
        return [None if g is None else tf.cast(g, tf.float32) * inv for g in grads]

    @staticmethod
    def all_finite(grads):
        flags = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
        return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)

    def update(self, finite):
        """Grow/shrink the scale after a step whose gradients were ``finite`` (bool tensor)."""
        finite = tf.convert_to_tensor(finite)
        good = tf.where(finite, self.good_steps + 1, tf.zeros_like(self.good_steps))
        grow = good >= self.growth_interval
        new_scale = tf.where(finite, tf.where(grow, self.scale * 2.0, self.scale),
                             tf.maximum(self.scale * 0.5, 1.0))
        self.scale.assign(new_scale)
        self.good_steps.assign(tf.where(grow, tf.zeros_like(good), good))

    def apply(self, optimizer, grads, variables, lr):
        """Apply ``optimizer`` if the (already unscaled) ``grads`` are finite; returns that flag."""
        finite = self.all_finite(grads)
        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            optimizer.apply(grads, variables, lr, where=finite)
            self.update(finite)
            return finite

        def do_apply():
            optimizer.apply(grads, variables, lr)
            return tf.constant(True)

        tf.cond(finite, do_apply, lambda: tf.constant(False))
        self.update(finite)
        return finite
