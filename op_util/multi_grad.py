"""Per-loss gradients of several losses that share one forward pass.

IEP's main phase clips the gradient of every distillation loss (K_int, K_alt, K_BB) per variable
against the cross-entropy gradient (op_util.clipping), so the gradients of the losses are needed one
by one, not summed: the authors' TF1 graph runs one student backward pass per loss
(``tf.gradients`` of each term, then ``clip_by_norm`` per variable; our reconstruction of the
unpublished ``Optimizer_w_IEP`` from the same authors' ``Optimizer_w_MHGD``).

:func:`per_loss_gradients` returns exactly those per-loss gradients, computed either

* ``"separate"``: one ``tape.gradient`` per loss (what the authors' graph does), or
* ``"pfor"``: one vectorised backward pass over the stacked loss vector,
  ``tape.jacobian(stack(losses), variables, experimental_use_pfor=True)``: every backward op runs
  once on the ``n`` one-hot cotangents stacked on a leading axis (convolution input gradients on
  an ``n*B`` batch, filter gradients as one ``n``-times wider filter, batch-norm gradients over
  ``n*C`` channels).

Both give the same numbers (to float rounding) and the same structure: ``None`` wherever a loss
does not reach a variable. ``DEFAULT_METHOD`` is the faster of the two on this project's CPU
(``python -m iepkt_tf.benchmark --grad_method separate,pfor`` times both main steps once
``make_main_step`` takes ``grad_method``; the numbers are in ``DEFAULT_METHOD``'s comment).
"""
from __future__ import annotations

import tensorflow as tf

METHODS = ("separate", "pfor")
# Measured with `python -m iepkt_tf.benchmark --grad_method separate,pfor` (interleaved steps,
# quiet 2-core AVX512-BF16 CPU, TF 2.21, WRN-40-4 -> WRN-16-4, batch 128, median of 8): the whole
# IEP main step takes 5.88 s separate vs 6.15 s pfor in float32 and 3.58 s vs 3.77 s in
# mixed_bfloat16. pfor's batched filter gradients are cheaper, but the transposes it puts around
# every batch-norm gradient (it folds the loss axis into the channels) and the stacked
# element-wise backward ops cost more.
DEFAULT_METHOD = "separate"


def _check_method(method):
    if method == "auto":
        return DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"per_loss_gradients: method must be 'auto' or one of {METHODS}, "
                         f"got {method!r}")
    return method


def _as_losses(losses):
    losses = list(losses)
    if not losses:
        raise ValueError("per_loss_gradients: losses must be a non-empty list of scalar tensors")
    for i, loss in enumerate(losses):
        if not tf.is_tensor(loss) or loss.shape.rank not in (None, 0):
            raise ValueError(f"per_loss_gradients: loss {i} must be a scalar tensor recorded on the "
                             f"tape, got {getattr(loss, 'shape', type(loss).__name__)}")
    return losses


def _recorded(tape, fn):
    """``fn()`` with ``tape`` recording (entered here unless the caller is inside its block)."""
    try:
        tape.__enter__()
    except ValueError:  # "Tape is still recording": called inside the caller's `with tape:`
        return fn()
    try:
        return fn()
    finally:
        tape.__exit__(None, None, None)


def _reached(tape, losses, variables):
    """``[[bool per variable] per loss]``: whether loss k reaches variable v.

    Inside a ``tf.function`` this builds the symbolic per-loss gradients only to see which are
    ``None``; the runtime prunes those ops because nothing consumes them. Eagerly that would run
    every backward pass, so there every pair counts as reached (unreached gradients are zeros).
    """
    if tf.executing_eagerly():
        return [[True] * len(variables) for _ in losses]
    return [[g is not None for g in tape.gradient(loss, variables)] for loss in losses]


def per_loss_gradients(tape_or_fn, losses, variables, method="auto"):
    """The gradient of every loss in ``losses`` with respect to every variable in ``variables``.

    Args:
      tape_or_fn: a ``tf.GradientTape`` that recorded ``losses`` (persistent when there is more
        than one loss or the tape is used again), or a callable taking no arguments that computes
        and returns the list of losses (it is run under a new persistent tape; ``losses`` must then
        be ``None``).
      losses: scalar losses recorded on the tape (float32; ``"pfor"`` stacks them as float32).
      variables: list of variables (or watched tensors).
      method: ``"auto"`` (``DEFAULT_METHOD``), ``"separate"`` or ``"pfor"`` (see module docstring).

    Returns:
      ``grads[k][i]`` = d losses[k] / d variables[i] (float32 for float32 variables), ``None`` where
      loss ``k`` does not depend on variable ``i`` (for ``"pfor"`` outside a ``tf.function``:
      zeros, unless no loss reaches it).
    """
    method = _check_method(method)
    variables = list(variables)
    if not variables:
        raise ValueError("per_loss_gradients: variables must be a non-empty list")
    if isinstance(tape_or_fn, tf.GradientTape):
        if losses is None:
            raise ValueError("per_loss_gradients: with a GradientTape, pass the recorded losses")
        tape = tape_or_fn
        losses = _as_losses(losses)
    elif callable(tape_or_fn):
        if losses is not None:
            raise ValueError("per_loss_gradients: with a callable, losses must be None "
                             "(the callable returns them)")
        with tf.GradientTape(persistent=True) as tape:   # variables read are watched
            tape.watch([v for v in variables if tf.is_tensor(v) and not hasattr(v, "assign")])
            losses = _as_losses(tape_or_fn())
    else:
        raise ValueError("per_loss_gradients: tape_or_fn must be a tf.GradientTape or a callable "
                         f"returning the losses, got {type(tape_or_fn).__name__}")

    if method == "separate" or len(losses) == 1:
        return [list(tape.gradient(loss, variables)) for loss in losses]

    reached = _reached(tape, losses, variables)
    # The stacked target must be on the tape for the jacobian to reach the losses.
    stacked = _recorded(tape, lambda: tf.stack([tf.cast(loss, tf.float32) for loss in losses]))
    jac = tape.jacobian(stacked, variables, experimental_use_pfor=True)
    out = []
    for k in range(len(losses)):
        row = []
        for i, j in enumerate(jac):
            row.append(j[k] if (j is not None and reached[k][i]) else None)
        out.append(row)
    return out
