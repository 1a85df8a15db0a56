"""``--Distillation IEP``: interpretable embedding procedure knowledge transfer (Lee & Song 2021).

The method over :class:`~iepkt_tf.iep.IEPDistiller` (the authors' ``EKI`` layer): sensing points
``feats[1:4]`` of both networks (the authors' ``feat`` collection); an initial phase of 20 epochs
trains the module (``MHA_loss`` + L2, the authors' ``train_op2``) with the drop-head noise of
:func:`~iepkt_tf.attention_heads.drop_head_noise`; the main phase adds K_int, K_alt and K_BB with
the clip rule (each term's gradient clipped on its own, ``--dist_clip separate``, or their sum once,
``summed``), the student-side adapters (unequal widths) trained with the student.
"""
from __future__ import annotations

import tensorflow as tf

from iepkt_tf.attention_heads import drop_head_noise
from iepkt_tf.distillers.base import Distiller, Flag
from iepkt_tf.iep import ADAPTERS, IEPDistiller

TERMS = ("k_int", "k_alt", "k_bb")
POINTS = slice(1, 4)
CLIP_RULES = ("separate", "summed")


def _at_least_one(value):
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "must be an integer >= 1"


class IEP(Distiller):
    name = "IEP"
    default_init_epoch = 20
    grad_rule = "clip"
    module_decay = "mhgd"  # Optimizer_w_MHGD: wd * sum(v**2) on the module
    draws_panels = True
    flags = (
        Flag("integer", "mpnn_iter", 2, "IEP: message-passing iterations of the module (paper "
             "ablation 1-4).", check=_at_least_one),
        Flag("boolean", "k_int", True, "IEP: use the interim-knowledge loss K_int (MPNN read-out KL)."),
        Flag("boolean", "k_alt", True, "IEP: use the alteration-knowledge loss K_alt (message L1)."),
        Flag("boolean", "k_bb", True, "IEP: use the black-box (multi-head graph) loss K_BB."),
        Flag("enum", "pca", "ipca", "IEP: second PCA of the stacked PCA: 'ipca' incremental PCA "
             "(the authors') or 'pca' plain per-batch PCA (the paper's ablation).", ("ipca", "pca")),
        Flag("enum", "adapter", "bn_relu",
             "IEP with a student of other widths than the teacher: the learned adapter at each such "
             "sensing point. bn_relu = 1x1 conv + BN + ReLU (non-negative like the teacher's "
             "post-ReLU map); bn = 1x1 conv + BN (signed). Beyond the authors' code (equal widths "
             "only).", tuple(ADAPTERS)),
        Flag("enum", "dist_clip", "separate",
             "IEP main phase: separate = the gradients of K_int, K_alt and K_BB are clipped one by "
             "one, per variable, to the cross-entropy gradient's norm x warm-up (our reconstruction "
             "of the unpublished Optimizer_w_IEP); summed = the gradient of their sum is clipped "
             "once (as Optimizer_w_MHGD does its one loss; one distillation backward pass instead "
             "of three).", CLIP_RULES),
    )

    @staticmethod
    def check_options(options):
        if not (options["k_int"] or options["k_alt"] or options["k_bb"]):
            return "--Distillation IEP needs at least one of --k_int, --k_alt, --k_bb"
        return None

    def __init__(self, student, teacher, options, layer=None):
        super().__init__(student, teacher, options)
        o = self.options
        if o["dist_clip"] not in CLIP_RULES:
            raise ValueError(f"dist_clip must be one of {CLIP_RULES}, got {o['dist_clip']!r}")
        self.clip_rule = o["dist_clip"]
        self.layer = layer or IEPDistiller(
            teacher.feature_channels[POINTS], student.feature_channels[POINTS],
            mpnn_iter=o["mpnn_iter"], pca={"ipca": "ipca", "pca": "batch"}[o["pca"]],
            use_k_int=o["k_int"], use_k_alt=o["k_alt"], use_k_bb=o["k_bb"], adapter=o["adapter"])
        self.terms = tuple(k for k in TERMS if getattr(self.layer, "use_" + k))

    @classmethod
    def over(cls, layer, dist_clip="separate"):
        """The method over an existing :class:`IEPDistiller` (its own settings; for parity
        checks, tests and the benchmark)."""
        options = {f.name: f.default for f in cls.flags}
        options.update(dist_clip=dist_clip, init_epoch=cls.default_init_epoch)
        return cls(None, None, options, layer=layer)

    def init_variables(self):
        return list(self.layer.module_variables())

    def init_losses(self, student, teacher, seed):
        layer = self.layer
        feats = teacher.feats[POINTS]
        noise = drop_head_noise(len(layer.teacher_channels) - 1, layer.num_head,
                                int(feats[0].shape[0]), seed)
        losses = layer.module_losses(feats, noise=noise, training=True, update_state=True)
        return {"total": losses["total"], "mha_loss": losses["total"],
                "mpnn_kld": tf.reduce_sum(losses["mpnn_kld"]),
                "est_loss": tf.reduce_sum(losses["est_loss"])}

    def main_variables(self):
        return list(self.layer.adapter_variables())

    def main_losses(self, student, teacher, labels, seed):
        raw = self.layer.distill_losses(student.feats[POINTS], teacher.feats[POINTS])
        return {k: raw[k] for k in self.terms}

    def clip_groups(self, terms):
        if self.clip_rule == "separate":
            return {k: (k,) for k in terms}
        return {"distill": tuple(terms)}

    def tf1_variables(self):
        return self.layer.tf1_variables()

    def state_variables(self):
        """The TF1 names plus the state the authors do not name (the incremental PCAs'
        ``initialized`` flags), under their Keras paths."""
        named = dict(self.layer.tf1_variables())
        known = {id(v) for v in named.values()}
        for v in self.layer.variables:
            if id(v) not in known:
                named[v.path] = v
        return named

    def panel_layer(self):
        return self.layer
