"""``--Distillation AT``: attention transfer (Zagoruyko & Komodakis, "Paying More Attention to
Attention", ICLR 2017).

Two forms, flag ``at_form``:

``paper`` -- the paper's activation-based attention transfer, Eq. (2) with the ``F_sum^p``
attention map of Sec. 3.1::

    Q(A)  = vec( (1/C) sum_c |A_c|^p )                         (attention map of a [H,W,C] map A)
    q(A)  = Q(A) / ||Q(A)||_2
    L_AT  = beta/2 * sum_j  mean_{b,hw} ( q(S_j) - q(T_j) )^2

The mean over the batch and the ``H W`` positions is the paper's "beta = 10^3 divided by the number
of elements in the attention map and the batch size" (Sec. 4.1) and the original code's
``(at(x) - at(y)).pow(2).mean()`` (szagoruyko/attention-transfer); the channel mean instead of the
sum does not matter after the normalisation. Attention maps have no channel axis, so any student
width works without a connector; the spatial sizes must agree (checked in ``__init__``).

``tf2`` (default) -- what the same authors' TF2 repository runs as "AT"
(sseung0703/Knowledge_distillation_via_TF2.0 ``distiller/AT.py``): the student's pre-ReLU map goes
through a connector ``r`` (1x1 conv + BN, batch statistics, to the teacher's width) and every
channel of both maps is L2-normalised over the spatial positions before the squared difference::

    n(X)_{b,:,:,c} = X_{b,:,:,c} / ||X_{b,:,:,c}||_2           (per sample and channel, over H, W)
    L_AT  = beta * sum_k 2^-(K-1-k) * mean_{b,h,w,c} ( n(r(S_k)) - n(T_k) )^2     (k = 0..K-1, K = 3)

i.e. a per-channel spatial attention rather than the paper's channel-pooled one. It is the default
because it is the IEP authors' latest AT code (the README calls that repository the upgrade of
their TF1 benchmark) and it is run there on the paper's setting (CIFAR-100, WRN-40-4 -> WRN-16-4).
Which code produced the paper's Table 1 is not established: that README's results (lines 50-63)
give the student 76.25 against the paper's 76.09, and none of its method rows equals the paper's
rate-1 column (AT 78.14 vs 76.98, FT 77.30 vs 77.14, AB 76.52 vs 77.29, RKD 77.69 vs 77.02, CO
78.54 vs 78.21; ``experiments.PAPER_TABLE``). The ``paper`` form is there for that reason.

Sources of the defaults (all sseung0703/Knowledge_distillation_via_TF2.0 ``distiller/AT.py``
unless stated):

* ``at_beta = 1e3``: ``self.beta = 1e3`` (line 27); the same value in the authors' TF1
  KD_methods_with_TF ``nets/Multiple.py`` ``Attention_transfer(beta=1e3)`` (line 20) and the paper
  (Sec. 4.1).
* ``tf2`` form: sensing points ``BasicBlock1.0/bn``, ``BasicBlock2.0/bn``, ``bn_last`` with
  ``keep_feat = 'pre_act'`` (lines 29-34); connector ``Conv2d([1,1], teacher width)`` + ``BatchNorm``
  at every point, also at equal widths (lines 22-26, applied in training mode line 37); per-channel
  spatial L2 normalisation and ``reduce_mean`` of the squared difference (line 39); point weights
  ``1/2^(K-1-k)`` and ``* beta`` (lines 43-44).
* ``paper`` form: the channel-pooled map with ``p = 2`` (``at_p``, paper Sec. 3.1; TF1
  ``Attention_transfer`` lines 34-38: ``reduce_mean(square(.), -1)`` then ``l2_normalize`` over
  ``[1, 2]``), ``beta/2`` and equal point weights (TF1 line 40, paper Eq. 2), the post-ReLU
  ``feat`` collection (TF1 ``nets/ResNet.py``, ``tf.get_collection('feat')``).
* no initial phase, the loss added to the cross-entropy (``grad_rule = "weighted"``): TF2
  ``forward`` returns ``target_loss + ...``; TF1 ``op_util.py`` "simple multi-task learning" for
  ``{'AT', 'RKD', 'VID'}``.

Sensing points: ``tf2`` reads our ``pre_feats[1]``, ``pre_feats[2]``, ``pre_feats[3]`` (the BN
outputs before the ReLU at the entries of groups 1 and 2 and the final BN), exactly the authors'
three points; ``paper`` reads the same three points after their ReLU, ``feats[1:4]`` (the authors'
TF1 ``feat`` collection is post-ReLU; the original PyTorch code takes the three group outputs
before the next BN, i.e. these points without their BN+ReLU). ``feats[0]`` (16 channels, the stem)
is never used.

Connectors (``tf2`` only): ``Distillation/AT/Connector{k}/conv`` (1x1, no bias) and
``Distillation/AT/Connector{k}/bn``, ``k`` the sensing point, main-phase variables weight-decayed
with the student. The connector's BN removes any per-channel constant, so the student's final
``bn0/beta`` (whose only path to the loss is ``pre_feats[3]`` -> connector) gets no gradient from
this loss -- a property of the authors' design, not a bug.

Deviations: the connector's kernel uses the project's TF-Slim FAN_OUT truncated normal (TF2:
``he_normal``); the BN after it removes the kernel's scale. The teacher runs in inference mode (as
in both authors' codes). Spatial sizes are required to match (neither authors' code resizes).
"""
from __future__ import annotations

import tensorflow as tf

from iepkt_tf.distillers.base import Distiller, Flag, connector, connector_layers, positive

POINTS = (1, 2, 3)
FORMS = ("tf2", "paper")
DEFAULT_BETA = 1e3
DEFAULT_P = 2.0
EPS = 1e-12  # tf.nn.l2_normalize's floor on the squared norm


def _float(x):
    """float32 for the compute dtypes (float16/bfloat16/float32); float64 stays (gradient checks)."""
    x = tf.convert_to_tensor(x)
    return x if x.dtype == tf.float64 else tf.cast(x, tf.float32)


def attention_map(feature, p=DEFAULT_P):
    """The paper's normalised attention map: ``[B, H, W, C] -> [B, H*W]``,
    ``q = Q / ||Q||_2`` with ``Q = mean_c |A_c|^p``."""
    a = _float(feature)
    q = tf.reduce_mean(tf.pow(tf.abs(a), p), axis=-1)
    q = tf.reshape(q, [tf.shape(q)[0], -1])
    return tf.math.l2_normalize(q, axis=1, epsilon=EPS)


def at_paper_loss(student, teacher, p=DEFAULT_P):
    """``mean_{b,hw} (q(S) - q(T))^2`` for one point (before ``beta/2``); no gradient to the teacher."""
    qs = attention_map(student, p)
    qt = tf.stop_gradient(attention_map(teacher, p))
    return tf.reduce_mean(tf.square(qs - qt))


def channel_normalize(feature):
    """Every channel of every sample L2-normalised over the spatial positions (TF2 AT's map)."""
    return tf.math.l2_normalize(_float(feature), axis=[1, 2], epsilon=EPS)


def at_channel_loss(student, teacher):
    """``mean_{b,h,w,c} (n(S) - n(T))^2`` for one point (``S`` already through the connector)."""
    ns = channel_normalize(student)
    nt = tf.stop_gradient(channel_normalize(teacher))
    return tf.reduce_mean(tf.square(ns - nt))


class AT(Distiller):
    """Attention transfer at three sensing points (module docstring)."""
    name = "AT"
    # True for the class so that a builder asking before construction always provides the
    # pre-ReLU maps (free: the networks compute them in the same pass); an instance of the
    # ``paper`` form sets it to False.
    needs_pre_relu = True
    flags = (
        Flag("float", "at_beta", DEFAULT_BETA,
             "AT: loss weight beta (the authors' 1e3; the paper form uses beta/2).", check=positive),
        Flag("enum", "at_form", "tf2",
             "AT: tf2 = the authors' TF2 AT (pre-ReLU maps, 1x1 conv + BN connector, each channel "
             "L2-normalised over space, point weights 1/4, 1/2, 1); paper = Zagoruyko & Komodakis "
             "Eq. 2 (channel-pooled |A|^p attention maps of the post-ReLU maps, beta/2, no "
             "connector).", FORMS),
        Flag("float", "at_p", DEFAULT_P,
             "AT paper form: the exponent p of the attention map mean_c |A_c|^p (paper: 2).",
             check=positive),
    )

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        o = self.options
        self.beta = float(o.get("at_beta", DEFAULT_BETA))
        self.form = o.get("at_form", "tf2")
        if self.form not in FORMS:
            raise ValueError(f"at_form must be one of {FORMS}, got {self.form!r}")
        self.p = float(o.get("at_p", DEFAULT_P))
        self.needs_pre_relu = self.form == "tf2"
        self.points = POINTS
        self.teacher_channels = [int(teacher.feature_channels[k]) for k in POINTS]
        self.student_channels = [int(student.feature_channels[k]) for k in POINTS]
        if o.get("image_size") is not None:
            s_shapes = student.feature_shapes(o["image_size"])
            t_shapes = teacher.feature_shapes(o["image_size"])
            for k in POINTS:
                if tuple(s_shapes[k][:2]) != tuple(t_shapes[k][:2]):
                    raise ValueError(f"AT: sensing point {k} is {s_shapes[k][:2]} in the student and "
                                     f"{t_shapes[k][:2]} in the teacher; the spatial sizes must match")
        self.convs, self.conv_bns = [], []
        if self.form == "tf2":
            for k, cs, ct in zip(POINTS, self.student_channels, self.teacher_channels):
                conv, bn = connector(cs, ct, f"AT_Connector{k}")
                self.convs.append(conv)
                self.conv_bns.append(bn)

    def connect(self, student_pre_feats, training=True):
        """The ``tf2`` connectors' outputs (teacher widths) at the three points."""
        return [bn(conv(_float(student_pre_feats[k])), training=training)
                for k, conv, bn in zip(POINTS, self.convs, self.conv_bns)]

    @staticmethod
    def _check_spatial(s, t, k):
        if s.shape[1:3] != t.shape[1:3]:
            raise ValueError(f"AT: student map {k} has spatial size {s.shape[1:3]}, the teacher's "
                             f"{t.shape[1:3]}; they must match")

    def point_losses(self, student, teacher, training=True):
        """The unweighted per-point losses (``[L_1, L_2, L_3]``) of the chosen form."""
        out = []
        if self.form == "tf2":
            if student.pre_feats is None or teacher.pre_feats is None:
                raise ValueError("AT (tf2 form) needs the pre-ReLU maps of both networks (Sensed.pre_feats)")
            for k, s in zip(POINTS, self.connect(student.pre_feats, training=training)):
                t = teacher.pre_feats[k]
                self._check_spatial(s, t, k)
                out.append(at_channel_loss(s, t))
        else:
            for k in POINTS:
                s, t = student.feats[k], teacher.feats[k]
                self._check_spatial(s, t, k)
                out.append(at_paper_loss(s, t, self.p))
        return out

    def main_variables(self):
        return [v for layer in self.convs + self.conv_bns for v in layer.trainable_weights]

    def main_losses(self, student, teacher, labels, seed):
        losses = self.point_losses(student, teacher, training=True)
        n = len(losses)
        if self.form == "tf2":
            weights = [self.beta / 2.0 ** (n - 1 - i) for i in range(n)]
        else:
            weights = [self.beta / 2.0] * n
        return {f"at{k}": tf.cast(w * l, tf.float32) for k, w, l in zip(POINTS, weights, losses)}

    def tf1_layers(self):
        return connector_layers("AT/", POINTS, self.convs, self.conv_bns)
