"""``--Distillation MHGD``: multi-head graph distillation (Lee & Song, BMVC 2019).

The IEP authors' own earlier method. Each sensing map ``F [B, HW, C]`` is embedded per sample by
its leading right singular vector (``SVP.SVD_eid``), and multi-head attention between consecutive
points ``l-1 -> l`` gives ``H`` graphs ``G [H, B, B]`` over the batch:

* teacher: ``v_T = V_1(F_T)`` (the leading right singular vector, unit norm);
* student: the ``r = 4`` leading right singular vectors of ``F_S`` with the authors' SVD gradient,
  of which ``Align_rsv`` keeps the one most aligned with ``v_T`` (``argmax |cos|``), times the sign
  of that cosine;
* heads ``G = AttentionHeads(v_l, v_{l-1})`` (:class:`~iepkt_tf.attention_heads.AttentionHeads`,
  ``D = (C_l + C_{l-1}) // 2``, 8 heads), the same for both networks.

Initial phase (``init_epoch`` epochs, the authors' ``train_op_mha``): the heads learn on the
teacher alone, with an :class:`~iepkt_tf.attention_heads.Estimator` that predicts ``v_T,l`` from
``v_T,l-1`` mixed by the softmaxed, drop-head'ed heads:
``L_init = sum_l mean_b (1 - <v_T,l, est_l>)`` (:func:`~iepkt_tf.attention_heads.est_loss`), plus
``5e-4 * sum v^2`` over the head and estimator variables (the builder adds it). Main phase: the
heads are frozen (BN on moving statistics) and the student is trained on
``L_MHGD = sum_l KL(softmax tanh G_S,l || softmax tanh G_T,l)`` summed over heads and rows
(:func:`~iepkt_tf.attention_heads.k_bb_term`), whose gradient is clipped per variable to the
cross-entropy gradient's norm times ``sigmoid(epoch - init_epoch)`` (``grad_rule = "clip"``, one
group), then added to the cross-entropy gradient.

Sources (sseung0703/KD_methods_with_TF; the TF2 repository has no MHGD):

* ``nets/Relation.py`` ``MHGD``: ``num_head = 8`` learned heads (no extrinsic head), teacher rank 1
  and student rank 4 of ``SVP.SVD_eid``, ``SVP.Align_rsv``, the ``MHA_loss`` estimator loss and the
  ``kld_loss(tanh G_S, tanh G_T)`` distillation loss; ``Attention_head``, ``Estimator``,
  ``drop_head`` (reused from :mod:`iepkt_tf.attention_heads`, which mirrors the same functions
  of IEPKT's Distillation.py); ``nets/SVP.py`` ``SVD_eid``, ``gradient_svd`` (reused from
  :mod:`iepkt_tf.stacked_pca`);
* ``train_w_distill.py``: ``init_epoch = 40`` for MHGD (with ``train_epoch = 100``);
* ``op_util.py`` ``Optimizer_w_MHGD``: the per-variable clip of the distillation gradient against
  the cross-entropy gradient with the ``sigmoid(epoch - init_epoch)`` warm-up, the unweighted
  distillation loss, the module's ``5e-4 * sum v^2`` over leaves ``g*``/``w*``/``b*``, and that
  the initial phase updates only the module (``train_op_mha``; the student is not trained).

Sensing points: our ``feats[1]``, ``feats[2]``, ``feats[3]`` (post-ReLU: entries of groups 1 and 2
and the final BN+ReLU), two modules (1-2, 2-3). The authors' ResNet ``feat`` collection is the
post-ReLU output of each of the three groups; in our pre-activation WRN the output of group ``g``
is read after the next BN+ReLU, i.e. ``feats[g+1]`` -- the same points IEP senses (``feats[1:4]``).

Variables, all under ``Distillation/MHGD/`` (never IEP's ``Distillation/EKI/``):
``MHGD/MHA{l}/Attention/{Sfc,Sbn,Rfc,Rbn}`` and ``MHGD/MHA{l}/Estimator/{fc0,bn0,fc1}`` (the authors'
scopes ``MHGD/MHA%d``), initial-phase variables; and where the student's width differs from the
teacher's at a point ``k``, a connector ``MHGD/Connector{k}/{conv,bn}`` (1x1 conv + BN, + ReLU by
default) on the student side, a main-phase variable. Drop-head noise is stateless, from the step
seed (:func:`~iepkt_tf.attention_heads.drop_head_noise`).

Deviations: (1) the connectors (the authors' MHGD needs equal widths: ``Align_rsv`` multiplies
the two embeddings); the default ``bn_relu`` keeps the adapted map non-negative like the
teacher's post-ReLU map, as IEP's adapter does; the connector's gradient is not reached by the
cross-entropy, so the clip rule scales it by the warm-up only (op_util.clipping
``unreached="warm"``). (2) The teacher's singular vector gets a fixed sign (``max + min >= 0``,
:func:`~iepkt_tf.stacked_pca.first_pca`) where the authors keep the decomposition's arbitrary one;
the student is aligned to it as in the authors' code. (3) Where a map is near-square
(``2/3 < HW/C < 3/2``) ``SVD_eid`` computes on ``stop_gradient(x)``, so the student would get no
gradient there; we apply the same SVD gradient formula instead (``near_square_grad="override"``).
The authors' CIFAR points (1024x64, 256x128, 64x256) are never near-square, so this changes
nothing there. (4) The student rank is ``min(4, HW, C)`` (the authors' 4 needs ``HW, C >= 4``).
``mhgd_svd_grad=exact`` replaces the published SVD gradient (twice the derivative of ``V`` for
``C <= HW``, not proportional to it for ``C > HW``; see :mod:`iepkt_tf.stacked_pca`) by the exact one.
"""
from __future__ import annotations

import tensorflow as tf

from iepkt_tf.attention_heads import AttentionHeads, Estimator, drop_head_noise, est_loss, k_bb_term
from iepkt_tf.distillers.base import Distiller, Flag, connector
from iepkt_tf.stacked_pca import first_pca, svd_eid

POINTS = (1, 2, 3)
NUM_HEAD = 8            # Relation.py MHGD: num_head = 8
STUDENT_RANK = 4        # Relation.py MHGD: SVP.SVD_eid(sfm, 4)
INIT_EPOCH = 40         # train_w_distill.py: init_epoch = 40 for MHGD
CONNECTORS = {"bn_relu": tf.nn.relu, "bn": tf.identity}
SVD_GRADS = ("authors", "exact")


def _head_count(value):
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 2
    return None if ok else "must be an integer >= 2 (drop_head keeps the heads above their mean)"


def teacher_embedding(feat):
    """``v_T [B, C]``: the leading right singular vector of each sample's ``HW x C`` map, unit norm,
    signed so that ``max + min >= 0``; no gradient."""
    _, v = first_pca(tf.stop_gradient(tf.cast(feat, tf.float32)), differentiable=False)
    return tf.stop_gradient(v[:, :, 0])


def align_rsv(v_s, v_t):
    """``SVP.Align_rsv``: ``v_s [B, C, r]``, ``v_t [B, C]`` -> ``[B, C]``, the column of ``v_s`` with
    the largest ``|cos|`` to ``v_t`` times the sign of that cosine (all tied columns are summed, as
    in the authors' mask product). The selection mask carries no gradient."""
    cos = tf.matmul(v_s, v_t[:, :, None], transpose_a=True)                 # [B, r, 1]
    best = tf.equal(tf.abs(cos), tf.reduce_max(tf.abs(cos), axis=1, keepdims=True))
    mask = tf.stop_gradient(tf.where(best, tf.sign(cos), tf.zeros_like(cos)))
    return tf.matmul(v_s, mask)[:, :, 0]


def student_embedding(feat, v_t, rank=STUDENT_RANK, grad="authors"):
    """``v_S [B, C]``: the ``min(rank, HW, C)`` leading right singular vectors of the student map
    (gradient by ``grad``, see :func:`~iepkt_tf.stacked_pca.svd_eid`), aligned to ``v_t``."""
    f = tf.cast(feat, tf.float32)
    hw, c = int(f.shape[1]) * int(f.shape[2]), int(f.shape[3])
    n = max(1, min(int(rank), hw, c))
    _, _, v = svd_eid(f, n, near_square_grad="override", grad=grad)
    return align_rsv(v, tf.cast(v_t, v.dtype))


class _Group:
    """Several layers reported under one TF1 scope (heads and estimator share ``MHA{l}``)."""

    def __init__(self, *layers):
        self.layers = layers

    def tf1_variables(self):
        out = {}
        for layer in self.layers:
            out.update(layer.tf1_variables())
        return out


class MHGD(Distiller):
    """Lee & Song's multi-head graph distillation at ``feats[1:4]`` (module docstring)."""
    name = "MHGD"
    default_init_epoch = INIT_EPOCH
    init_trains_student = False
    grad_rule = "clip"
    module_decay = "mhgd"  # Optimizer_w_MHGD: wd * sum(v**2) on the module
    flags = (
        Flag("integer", "mhgd_num_head", NUM_HEAD,
             "MHGD: attention heads per module (the authors' 8).", check=_head_count),
        Flag("enum", "mhgd_connector", "bn_relu",
             "MHGD with a student of other widths than the teacher: the student-side connector at "
             "each such sensing point. bn_relu = 1x1 conv + BN + ReLU (non-negative like the "
             "teacher's post-ReLU map); bn = 1x1 conv + BN. Beyond the authors' code (equal "
             "widths only).", tuple(CONNECTORS)),
        Flag("enum", "mhgd_svd_grad", "authors",
             "MHGD: gradient of the student's SVD embedding. authors = SVP.gradient_svd as "
             "published; exact = the exact SVD derivative.", SVD_GRADS),
    )

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        o = self.options
        self.num_head = int(o.get("mhgd_num_head", NUM_HEAD))
        self.connector = o.get("mhgd_connector", "bn_relu")
        self.svd_grad = o.get("mhgd_svd_grad", "authors")
        if self.connector not in CONNECTORS:
            raise ValueError(f"MHGD: mhgd_connector must be one of {sorted(CONNECTORS)}, "
                             f"got {self.connector!r}")
        if self.svd_grad not in SVD_GRADS:
            raise ValueError(f"MHGD: mhgd_svd_grad must be one of {SVD_GRADS}, got {self.svd_grad!r}")
        if _head_count(self.num_head):
            raise ValueError(f"MHGD: mhgd_num_head {_head_count(self.num_head)}, got {self.num_head}")
        self.teacher_channels = [int(teacher.feature_channels[k]) for k in POINTS]
        self.student_channels = [int(student.feature_channels[k]) for k in POINTS]
        f32 = "float32"
        self.attentions, self.estimators = [], []
        for i in range(1, len(POINTS)):
            d, d_prev = self.teacher_channels[i], self.teacher_channels[i - 1]
            att = AttentionHeads((d + d_prev) // 2, num_head=self.num_head,
                                 name=f"MHGD_MHA{i}_Attention", dtype=f32)
            att.build((None, d), (None, d_prev))
            est = Estimator(d, num_head=self.num_head, name=f"MHGD_MHA{i}_Estimator", dtype=f32)
            est.build((None, d_prev))
            self.attentions.append(att)
            self.estimators.append(est)
        self.connectors = {}
        for k, ct, cs in zip(POINTS, self.teacher_channels, self.student_channels):
            if ct != cs:
                conv, bn = connector(cs, ct, f"MHGD_Connector{k}")
                self.connectors[k] = (conv, bn)

    # ---- embeddings
    def teacher_embeddings(self, teacher_feats):
        return [teacher_embedding(teacher_feats[k]) for k in POINTS]

    def connect(self, student_feats, training=True):
        """The student's maps at the points, through the connectors where widths differ."""
        out = []
        for k in POINTS:
            x = tf.cast(student_feats[k], tf.float32)
            if k in self.connectors:
                conv, bn = self.connectors[k]
                x = CONNECTORS[self.connector](bn(conv(x), training=training))
            out.append(x)
        return out

    def student_embeddings(self, student_feats, v_t, training=True):
        maps = self.connect(student_feats, training=training)
        return [student_embedding(m, t, STUDENT_RANK, self.svd_grad) for m, t in zip(maps, v_t)]

    # ---- initial phase
    def init_variables(self):
        return [v for layer in self.attentions + self.estimators for v in layer.trainable_weights]

    def init_losses(self, student, teacher, seed):
        v_t = self.teacher_embeddings(teacher.feats)
        batch = int(teacher.feats[POINTS[0]].shape[0])
        noise = drop_head_noise(len(self.attentions), self.num_head, batch, seed)
        losses = []
        for i, (att, est) in enumerate(zip(self.attentions, self.estimators), start=1):
            heads = att(v_t[i], v_t[i - 1], training=True)
            out = est(v_t[i - 1], heads, None, noise[i - 1], training=True)
            losses.append(est_loss(v_t[i], out))
        total = tf.add_n(losses)
        return {"total": total, "mha_loss": total}

    # ---- main phase
    def main_variables(self):
        return [v for conv, bn in self.connectors.values()
                for v in conv.trainable_weights + bn.trainable_weights]

    def graph_loss(self, v_s, v_t):
        """``sum_l kld(tanh G_S,l, tanh G_T,l)`` with the heads in inference mode."""
        terms = []
        for i, att in enumerate(self.attentions, start=1):
            g_t = tf.stop_gradient(att(v_t[i], v_t[i - 1], training=False))
            g_s = att(v_s[i], v_s[i - 1], training=False)
            terms.append(k_bb_term(g_s, g_t))
        return tf.add_n(terms)

    def main_losses(self, student, teacher, labels, seed):
        v_t = self.teacher_embeddings(teacher.feats)
        v_s = self.student_embeddings(student.feats, v_t, training=True)
        return {"mhgd": self.graph_loss(v_s, v_t)}

    def clip_groups(self, terms):
        return {"mhgd": tuple(terms)}

    # ---- names
    def tf1_layers(self):
        out = {}
        for i, (att, est) in enumerate(zip(self.attentions, self.estimators), start=1):
            out[f"MHGD/MHA{i}"] = _Group(att, est)
        for k, (conv, bn) in self.connectors.items():
            out[f"MHGD/Connector{k}/conv"] = conv
            out[f"MHGD/Connector{k}/bn"] = bn
        return out
