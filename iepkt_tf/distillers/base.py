"""The distiller interface: what a ``--Distillation`` method declares (mdistiller's ``distillers/``).

A method is one module of :mod:`iepkt_tf.distillers` with one subclass of :class:`Distiller`,
listed in ``iepkt_tf.distillers.METHODS``. The training loop and the one train-step builder
(:mod:`op_util.train_steps`) only use what is declared here:

* **sensing**: ``student(images)`` and ``teacher(images)`` are run once per step and handed to the
  method as :class:`Sensed` (logits, the 4 post-ReLU ``feats`` of the networks and, when
  ``needs_pre_relu``, the same points before their ReLU);
* **phases**: an initial phase of ``options['init_epoch']`` epochs (default ``default_init_epoch``)
  trains :meth:`init_variables` (plus the student when ``init_trains_student``; the optimiser's
  momentum is then reset when the main phase starts, as the authors' separate optimisers do) on
  :meth:`init_losses` at ``init_learning_rate`` (if set, else the schedule's rate); then the main phase trains the student and :meth:`main_variables` on
  ``ce_weight * CE + `` the terms of :meth:`main_losses`;
* **weight decay** of the method's own variables, ``module_decay`` (the student is always decayed
  by ``gradient += wd * w`` on conv/FC weights and BN gamma/beta, the TF1 arg scope, and only where
  the phase's losses reach it): ``"tf2"`` adds ``wd * v`` to the gradient of every variable the
  phase trains (the TF2 repository's ``op_util.py`` line 38, ``FT.py`` line 83, ``AB.py`` lines
  58-60); ``"mhgd"`` adds ``wd * sum(v**2)`` over the gamma/weights/biases/beta leaves of
  :meth:`init_variables` to the initial-phase loss (``Optimizer_w_MHGD``, gradient ``2 wd v``) and
  decays main-phase variables like the student's;
* **gradient rule**: ``grad_rule = "weighted"`` differentiates the weighted sum;
  ``"clip"`` clips the gradient of each group of :meth:`clip_groups` per variable against the
  cross-entropy gradient's norm times the warm-up (the authors' ``Optimizer_w_MHGD``, IEP);
* **flags**: ``flags`` lists the method's own ``Flag``\\ s; their values reach ``__init__`` as
  ``options`` (with ``init_epoch``), a flag of another method is refused by the config;
* **names**: :meth:`tf1_layers` ``{TF1 scope under "Distillation": layer}`` gives the TF1 names
  of checkpoints and ``.mat`` files.

Every method trains the same student, IEPKT's WRN (``nets/wresnet.py``): each pre-activation block
applies dropout with keep rate 0.7 between its two 3x3 convs (lines 73-74; the trained network on
32x32 inputs, 1 otherwise and for the teacher, ``nets_factory.keep_rate_for``), and its 1x1 shortcut
conv (where the width changes) reads the BN+ReLU of the block's input (line 71). The authors' TF2
baselines (sseung0703/Knowledge_distillation_via_TF2.0 ``nets/WResNet.py``) ran on a WRN with no
dropout (``call``, lines 48-73) whose shortcut conv reads the raw input (line 59, ``conv2(x)``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

TF1_SCOPE = "Distillation"


@dataclasses.dataclass(frozen=True)
class Flag:
    """A method's own flag: ``kind`` is absl's DEFINE_<kind> (string, integer, float, boolean,
    enum); ``check(value) -> error text or None`` validates it."""
    kind: str
    name: str
    default: Any
    help: str
    enum: tuple = ()
    check: Any = None


class Sensed(NamedTuple):
    """One network's forward pass: ``logits`` float32 ``[B, K]``; ``feats`` the 4 sensing maps
    (post-ReLU, compute dtype: the entries of groups 0-2 and the final BN+ReLU); ``pre_feats``
    the same 4 points before their ReLU (None unless the method ``needs_pre_relu``)."""
    logits: Any
    feats: list
    pre_feats: list | None = None


def positive(value):
    return None if isinstance(value, (int, float)) and value > 0 else "must be > 0"


def non_negative(value):
    return None if isinstance(value, (int, float)) and value >= 0 else "must be >= 0"


def unit_interval(value):
    return None if isinstance(value, (int, float)) and 0 <= value <= 1 else "must be in [0, 1]"


def connector(in_channels, out_channels, name):
    """The student-side 1x1 conv + BN of a sensing point (AT, AB, CO, MHGD), ``(conv, bn)`` with
    their variables created (float32; Keras names ``<name>_conv``/``<name>_bn``)."""
    from nets.layers import BatchNorm, Conv2D

    conv = Conv2D(out_channels, 1, name=f"{name}_conv", dtype="float32")
    conv.build((None, None, None, int(in_channels)))
    bn = BatchNorm(name=f"{name}_bn", dtype="float32")
    bn.build((None, None, None, int(out_channels)))
    return conv, bn


def connector_layers(prefix, points, convs, bns):
    """``{f"{prefix}Connector{k}/conv": conv, .../bn: bn}``: the connectors' TF1 scopes."""
    out = {}
    for k, conv, bn in zip(points, convs, bns):
        out[f"{prefix}Connector{k}/conv"] = conv
        out[f"{prefix}Connector{k}/bn"] = bn
    return out


class Distiller:
    """Base of every method. Subclasses set the class attributes and override what they use.

    ``__init__(student, teacher, options)``: ``student``/``teacher`` are built networks (``teacher``
    None when ``needs_teacher`` is False; ``feature_channels``, ``feature_shapes(image_size)``,
    ``num_classes``), ``options`` ``{flag name: value}`` for ``flags`` plus ``init_epoch`` and
    ``image_size``. Create every variable here (build the layers on their input shapes), never
    inside a step.
    """
    name = "None"
    needs_teacher = True
    needs_pre_relu = False
    default_init_epoch = 0
    init_trains_student = False
    init_learning_rate = None  # a constant rate for the initial phase (None: the schedule's)
    main_needs_teacher = True  # False: the main phase is cross-entropy alone (AB)
    grad_rule = "weighted"  # or "clip"
    module_decay = "tf2"  # or "mhgd" (module docstring, "weight decay")
    ce_weight = 1.0
    flags: tuple = ()
    draws_panels = False

    def __init__(self, student, teacher, options):
        self.student, self.teacher, self.options = student, teacher, dict(options)

    @staticmethod
    def check_options(options):
        """An error text when the method's flag values do not go together (each flag's own
        ``check`` has passed), else None."""
        return None

    # ---- initial phase
    def init_variables(self):
        """Distiller variables trained by the initial phase (decayed as ``module_decay`` says)."""
        return []

    def init_losses(self, student, teacher, seed):
        """Initial-phase losses ``{"total": scalar, <term>: scalar ...}``, inside the tape.
        ``student`` is the student's :class:`Sensed` (training mode) when ``init_trains_student``,
        else None; ``teacher`` the teacher's (inference); ``seed`` int64 ``[2]`` for stateless
        randomness."""
        raise NotImplementedError(f"{self.name} has no initial phase")

    # ---- main phase
    def main_variables(self):
        """Distiller variables trained with the student in the main phase (connectors), decayed
        as ``module_decay`` says."""
        return []

    def main_losses(self, student, teacher, labels, seed):
        """The distillation terms ``{term: float32 scalar}`` of a main-phase step (already
        weighted), inside the tape; the step adds ``ce_weight * CE``."""
        return {}

    def clip_groups(self, terms):
        """With ``grad_rule == "clip"``: ``{group name: term names}``, each group's summed gradient
        clipped once (default: all terms as one group ``distill``)."""
        return {"distill": tuple(terms)}

    # ---- names and state
    def tf1_layers(self):
        """``{TF1 scope relative to "Distillation": layer with tf1_variables()}``."""
        return {}

    def tf1_variables(self):
        from nets.layers import collect_tf1_variables

        layers = self.tf1_layers()
        return collect_tf1_variables(layers, prefix=TF1_SCOPE) if layers else {}

    def panel_layer(self):
        """The layer drawn in the interpretability panels next to the student (IEP's), or None."""
        return None

    def state_variables(self):
        """Everything a checkpoint must hold: ``{name: variable}`` (default: the TF1 names)."""
        return dict(self.tf1_variables())
