"""``--Distillation FT``: factor transfer (Kim, Park & Kwak, "Paraphrasing Complex Network: Network
Compression via Factor Transfer", NeurIPS 2018).

Two networks of the method's own, on the teacher's and the student's last map (``feats[3]``):

* the **paraphraser**, encoder ``P`` (the teacher factor ``F_T = P(T)``) and decoder ``Q``, trained
  alone in the initial phase (teacher frozen, student untouched) on the reconstruction loss, the
  paper's eq. (1) with ``p = 1`` plus the authors' small L1 on the code (FT.py lines 77-81)::

      code = lrelu(F_T),  L_rec = sum|T - relu(Q(code))| / (B H W) + 1e-6 * sum|code| / (B H W)

* the **translator** ``R`` (the student factor ``F_S = R(S)``), trained with the student in the
  main phase on eq. (2)-(3), ``p = 1`` (lines 61-64)::

      L = CE + beta * mean_{b,h,w,c} | F_T/||F_T||_2 - F_S/||F_S||_2 |

  each factor L2-normalised per sample over (H, W, C); ``F_T`` from the frozen encoder in
  inference mode (line 61), without gradient.

Layers (rate ``r = 0.5``, ``D`` the teacher's channels; FT.py lines 25-45): encoder and translator
``conv3x3(rD), BN, conv3x3(r^2 D, stride 1/r), BN, conv3x3(r^3 D), BN``; decoder ``convT3x3(r^2 D),
BN, convT3x3(rD, stride 1/r), BN, convT3x3(D)``; no conv bias. Line references: FT.py and
nets/tcl.py of sseung0703/Knowledge_distillation_via_TF2.0.

``--ft_form=authors`` (default): the network FT.py *runs*, the code behind the authors' FT
result (kdparity reproduces its losses and gradients to float32 rounding). tcl's ``arg_scope``
(tcl.py lines 4-10) overwrites every argument named in a class's ``pre_defined`` with that
value, even when passed explicitly; FT.py sets ``pre_defined`` to
``use_biases=False, trainable=True`` for Conv2d/Conv2d_transpose and ``activation_fn=leaky_relu``
for BatchNorm (lines 21-23), and the remaining arguments follow the call or tcl's defaults
(Conv2d/Conv2d_transpose ``activation_fn=tf.nn.relu``, tcl.py lines 18, 78). As run:

* encoder: ReLU after conv0-2 (default), leaky ReLU (slope 0.2) after bn0-bn2, bn2's explicit
  ``activation_fn=None`` (line 33) overwritten;
* decoder: ReLU after convt0-2, leaky ReLU after bnt0/bnt1; convt2's ``use_biases=True``
  (line 38) overwritten: no bias; the code is thus ``lrelu(lrelu(bn2))`` (line 77);
* translator: ReLU after conv0/conv1; conv2 keeps its explicit ``activation_fn=None`` (line 44;
  ``pre_defined`` has no such key); leaky ReLU after bn0-bn2 (bn2's ``None``, line 45, overwritten);
* BN state: ``auxiliary_training`` calls the paraphraser without ``training`` (lines 77-78), so
  tcl's BatchNorm takes its inference branch (tcl.py lines 307-313: the moving statistics, never
  updated), and ``forward`` calls the encoder with ``training=False`` (line 61): the paraphraser
  normalises with its initial moving statistics (0, 1; tcl.py lines 255-258) in both phases and
  never changes them.
  The translator uses batch statistics (line 62) and updates its moving averages with decay 0.9
  and the biased batch variance (tcl.py lines 246, 299-310).

``--ft_form=paper``: the network FT.py's text writes, without tcl's overwriting: no conv
activation, no activation after bn2, convt2 with a bias; the paraphraser's BNs on batch
statistics (updating the moving averages, the project's unbiased-variance convention) in the
initial phase and on those moving statistics in the main phase. It is the project's FT before
this flag; use it to study FT as FT.py reads and the paper describes it (a trained conv-BN
paraphraser, the factor the linear bn2 output) or to compare with re-implementations that follow
FT.py's text. Variable names are the same in both forms, except that convt2 has a ``biases``
leaf only in the paper form.

Other defaults and sources (FT.py):

* sensing point: the teacher's and the student's ``bn_last`` output (lines 54-57, ``keep_feat =
  'output'``: the final BN+ReLU), our ``feats[3]``; the decoder ends with the teacher's ReLU
  (line 79);
* ``beta = 100`` (line 52), flag ``ft_beta``; ``r = 0.5`` (line 25); code L1 weight ``1e-6`` and
  the ``/(B H W)`` normalisation (line 81); leaky-ReLU slope 0.2 (``tf.nn.leaky_relu``'s default);
* initial phase ``int(0.3 * train_epoch) = 30`` epochs of the authors' 100 (line 87; the TF1
  ``KD_methods_with_TF`` ``train_w_distill.py`` line 34 uses 40).

Widths: the translator reads any student width and ends at the teacher's ``r^3 D`` channels, so
student and teacher need only share the map's spatial size (checked in ``__init__``).

Deviations from the authors' code (both forms):

* The authors train the paraphraser with its own Nesterov SGD at a constant ``1e-3`` (line 67,
  weight decay ``g + wd * v`` on its trainables, line 83); here at the same
  ``init_learning_rate`` through the project's initial phase (one shared optimiser, weight decay
  on :meth:`init_variables` as ``module_decay`` says, :mod:`iepkt_tf.distillers.base`).
* The stride-``1/r`` transposed convolution outputs the teacher map's exact size, so odd sizes
  work (the TF2 code assumes the size doubles).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from iepkt_tf.distillers.base import Distiller, Flag, positive
from nets.layers import BatchNorm, Conv2D, Dense, FanOutTruncatedNormal

RATE = 0.5
DEFAULT_BETA = 100.0
CODE_L1_WEIGHT = 1e-6
LEAKY_SLOPE = 0.2
POINT = 3  # feats[3]: the final BN+ReLU (the authors' bn_last output)
FORMS = ("authors", "paper")


def _compute_dtype(x):
    """float64 stays float64 (for finite differences in tests), everything else is float32."""
    x = tf.convert_to_tensor(x)
    return x if x.dtype == tf.float64 else tf.cast(x, tf.float32)


def normalize_factor(factor):
    """``F / ||F||_2`` per sample, the norm over (H, W, C) (``tf.nn.l2_normalize``'s epsilon)."""
    return tf.nn.l2_normalize(_compute_dtype(factor), axis=[1, 2, 3])


def ft_loss(teacher_factor, student_factor):
    """``mean_{b,h,w,c} |F_T/||F_T|| - F_S/||F_S|| |``, before ``beta`` (eq. 2 with p = 1)."""
    t = normalize_factor(teacher_factor)
    s = normalize_factor(student_factor)
    return tf.reduce_mean(tf.abs(t - tf.cast(s, t.dtype)))


def reconstruction_loss(feat, recon, code):
    """``(sum|feat - recon| / (B H W), 1e-6 * sum|code| / (B H W))``; ``B, H, W`` of ``feat``."""
    feat = _compute_dtype(feat)
    recon = tf.cast(recon, feat.dtype)
    code = tf.cast(code, feat.dtype)
    shape = tf.shape(feat)
    n = tf.cast(shape[0] * shape[1] * shape[2], feat.dtype)
    return (tf.reduce_sum(tf.abs(feat - recon)) / n,
            CODE_L1_WEIGHT * tf.reduce_sum(tf.abs(code)) / n)


def _lrelu(x):
    return tf.nn.leaky_relu(x, LEAKY_SLOPE)


class Conv2DTranspose(keras.layers.Layer):
    """``conv2d_transpose`` with SAME padding and the project's conventions (TF1 leaf names
    ``weights`` ``[k, k, out, in]`` and ``biases``, TF-Slim's FAN_OUT initialiser as in
    :mod:`nets.layers`). ``output_hw``: the output's (H, W); default ``stride *`` the input's."""

    def __init__(self, filters, kernel_size, stride=1, use_bias=False, output_hw=None, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.stride = int(filters), int(kernel_size), int(stride)
        self.use_bias = bool(use_bias)
        self.output_hw = None if output_hw is None else (int(output_hw[0]), int(output_hw[1]))

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="weights", shape=(self.kernel_size, self.kernel_size, self.filters, int(input_shape[-1])),
            initializer=FanOutTruncatedNormal(), trainable=True, dtype="float32", autocast=False)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="biases", shape=(self.filters,), initializer="zeros",
                                        trainable=True, dtype="float32", autocast=False)

    def call(self, x):
        x = tf.cast(x, self.compute_dtype)
        if self.output_hw is not None:
            h, w = self.output_hw
        else:
            h, w = int(x.shape[1]) * self.stride, int(x.shape[2]) * self.stride
        out_shape = tf.stack([tf.shape(x)[0], h, w, self.filters])
        y = tf.nn.conv2d_transpose(x, tf.cast(self.kernel, self.compute_dtype), out_shape,
                                   strides=self.stride, padding="SAME")
        y = tf.ensure_shape(y, [x.shape[0], h, w, self.filters])
        if self.bias is not None:
            y = y + tf.cast(self.bias, self.compute_dtype)
        return y

    tf1_variables = Dense.tf1_variables  # the same ``weights`` / ``biases`` leaves


def factor_channels(teacher_channels):
    """The channels of each conv of the encoder/translator: ``(r D, r^2 D, r^3 D)``."""
    d = int(teacher_channels)
    chans = tuple(int(d * RATE ** i) for i in (1, 2, 3))
    if min(chans) < 1:
        raise ValueError(f"FT: the teacher map has {d} channels; the factor needs >= {int(1 / RATE ** 3)}")
    return chans


def _bn(name, form):
    # the authors' tcl EMA feeds the biased batch variance (tcl.py line 308); the paper form
    # keeps the project's default (TF1 convention, unbiased)
    return BatchNorm(name=name, dtype="float32", moving_variance="biased" if form == "authors" else None)


class _ConvStack:
    """``conv3x3, BN, conv3x3(stride 1/r), BN, conv3x3, BN`` (encoder and translator);
    ``conv_relu[i]``/``bn_lrelu[i]``: a ReLU after conv ``i`` / a leaky ReLU after BN ``i``."""

    def __init__(self, channels, scope, conv_relu, bn_lrelu, form):
        stride = int(round(1 / RATE))
        self.scope = scope
        self.conv_relu, self.bn_lrelu = tuple(conv_relu), tuple(bn_lrelu)
        self.convs = [Conv2D(c, 3, s, name=f"{scope}_conv{i}", dtype="float32")
                      for i, (c, s) in enumerate(zip(channels, (1, stride, 1)))]
        self.bns = [_bn(f"{scope}_bn{i}", form) for i in range(3)]

    def __call__(self, x, training):
        x = tf.cast(x, tf.float32)
        for conv, bn, relu, lrelu in zip(self.convs, self.bns, self.conv_relu, self.bn_lrelu):
            x = conv(x)
            if relu:
                x = tf.nn.relu(x)
            x = bn(x, training=training)
            if lrelu:
                x = _lrelu(x)
        return x

    def tf1_layers(self):
        out = {}
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            out[f"{self.scope}/conv{i}"] = conv
            out[f"{self.scope}/bn{i}"] = bn
        return out


class _Decoder:
    """``convT3x3(r^2 D), BN, lrelu, convT3x3(r D, stride 1/r), BN, lrelu, convT3x3(D)``;
    ``convt_relu``: a ReLU after every transposed conv; ``bias``: convt2's bias."""

    def __init__(self, teacher_channels, output_hw, scope, convt_relu, bias, form):
        d = int(teacher_channels)
        c1, c0 = factor_channels(d)[:2]
        stride = int(round(1 / RATE))
        self.scope = scope
        self.convt_relu = bool(convt_relu)
        self.convts = [Conv2DTranspose(c0, 3, 1, name=f"{scope}_convt0", dtype="float32"),
                       Conv2DTranspose(c1, 3, stride, output_hw=output_hw, name=f"{scope}_convt1",
                                       dtype="float32"),
                       Conv2DTranspose(d, 3, 1, use_bias=bias, name=f"{scope}_convt2", dtype="float32")]
        self.bns = [_bn(f"{scope}_bnt{i}", form) for i in range(2)]

    def _convt(self, i, x):
        x = self.convts[i](x)
        return tf.nn.relu(x) if self.convt_relu else x

    def __call__(self, x, training):
        x = tf.cast(x, tf.float32)
        for i, bn in enumerate(self.bns):
            x = _lrelu(bn(self._convt(i, x), training=training))
        return self._convt(2, x)

    def tf1_layers(self):
        out = {}
        for i, convt in enumerate(self.convts):
            out[f"{self.scope}/convt{i}"] = convt
            if i < 2:
                out[f"{self.scope}/bnt{i}"] = self.bns[i]
        return out


def _trainable(layers):
    return [v for layer in layers.values() for v in layer.tf1_variables().values() if v.trainable]


class FT(Distiller):
    """Paraphraser (``Distillation/Paraphraser/...``, initial phase) on the teacher's ``feats[3]``,
    translator (``Distillation/Translator/...``, main phase, with the student) on the student's."""
    name = "FT"
    default_init_epoch = 30
    init_learning_rate = 1e-3  # FT.py line 67: the paraphraser's own constant rate
    flags = (
        Flag("float", "ft_beta", DEFAULT_BETA,
             "FT: weight beta of the factor-transfer loss mean|F_T/||F_T|| - F_S/||F_S|||.",
             check=positive),
        Flag("enum", "ft_form", "authors",
             "FT: authors = the network the authors' TF2 FT.py runs under tcl's arg scope (ReLU "
             "after every conv but the translator's conv2, leaky ReLU after every BN, convt2 "
             "without bias, the paraphraser's BNs on their initial moving statistics in both "
             "phases); paper = the network FT.py writes (no conv activation, bn2 linear, convt2 "
             "with bias, the paraphraser's BNs trained on batch statistics).", enum=FORMS),
    )

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.beta = float(self.options["ft_beta"])
        self.form = self.options.get("ft_form", "authors")
        if self.form not in FORMS:
            raise ValueError(f"ft_form must be one of {FORMS}, got {self.form!r}")
        image_size = self.options["image_size"]
        t_shape = tuple(teacher.feature_shapes(image_size)[POINT])
        s_shape = tuple(student.feature_shapes(image_size)[POINT])
        if t_shape[:2] != s_shape[:2]:
            raise ValueError(f"FT: the student's last map is {s_shape[0]}x{s_shape[1]}, the teacher's "
                             f"{t_shape[0]}x{t_shape[1]}; the factors need the same spatial size")
        d = t_shape[2]
        chans = factor_channels(d)
        authors = self.form == "authors"
        self.encoder = _ConvStack(chans, "Paraphraser", conv_relu=(authors,) * 3,
                                  bn_lrelu=(True, True, authors), form=self.form)
        self.decoder = _Decoder(d, t_shape[:2], "Paraphraser", convt_relu=authors, bias=not authors,
                                form=self.form)
        self.translator = _ConvStack(chans, "Translator", conv_relu=(authors, authors, False),
                                     bn_lrelu=(True, True, authors), form=self.form)
        # create every variable now (inference calls change no state)
        code = self.encoder(tf.zeros((1,) + t_shape), training=False)
        self.decoder(code, training=False)
        self.translator(tf.zeros((1,) + s_shape), training=False)
        self._paraphraser_layers = {**self.encoder.tf1_layers(), **self.decoder.tf1_layers()}
        self._translator_layers = self.translator.tf1_layers()

    # ---- initial phase: the paraphraser
    def init_variables(self):
        """The paraphraser's kernels, BN gamma/beta (and convt2's bias in the paper form)."""
        return _trainable(self._paraphraser_layers)

    @property
    def init_bn_training(self):
        """Whether the initial phase runs the paraphraser's BNs on batch statistics (and updates
        their moving averages): the paper form only."""
        return self.form == "paper"

    def paraphrase(self, teacher_feat, training):
        """``(factor, code, reconstruction)`` of the teacher map (``code = lrelu(factor)``)."""
        factor = self.encoder(teacher_feat, training=training)
        code = _lrelu(factor)
        recon = tf.nn.relu(self.decoder(code, training=training))
        return factor, code, recon

    def init_losses(self, student, teacher, seed):
        feat = tf.stop_gradient(tf.cast(teacher.feats[POINT], tf.float32))
        _, code, recon = self.paraphrase(feat, training=self.init_bn_training)
        rec, code_l1 = reconstruction_loss(feat, recon, code)
        return {"total": rec + code_l1, "reconstruction": rec, "code_l1": code_l1}

    # ---- main phase: the translator
    def main_variables(self):
        return _trainable(self._translator_layers)

    def factors(self, student, teacher):
        """``(F_T, F_S)``: the frozen encoder's factor (no gradient) and the translator's."""
        t = tf.stop_gradient(tf.cast(teacher.feats[POINT], tf.float32))
        f_t = tf.stop_gradient(self.encoder(t, training=False))
        f_s = self.translator(student.feats[POINT], training=True)
        return f_t, f_s

    def main_losses(self, student, teacher, labels, seed):
        f_t, f_s = self.factors(student, teacher)
        return {"ft": self.beta * ft_loss(f_t, f_s)}

    def tf1_layers(self):
        return {**self._paraphraser_layers, **self._translator_layers}
