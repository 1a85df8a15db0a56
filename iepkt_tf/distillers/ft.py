"""``--Distillation FT``: factor transfer (Kim, Park & Kwak, "Paraphrasing Complex Network: Network
Compression via Factor Transfer", NeurIPS 2018).

Two networks of the method's own:

* the **paraphraser** on the teacher's map ``T``: an encoder ``P`` (the *factor* ``F_T = P(T)``)
  and a decoder ``Q``; the initial phase trains them (teacher frozen, student untouched) on the
  reconstruction loss, the paper's eq. (1) with ``p = 1`` plus the small L1 on the code that the
  authors' code adds::

      L_rec = sum|T - relu(Q(lrelu(F_T)))| / (B H W)  +  1e-6 * sum|lrelu(F_T)| / (B H W)

* the **translator** ``R`` on the student's map ``S`` (the student factor ``F_S = R(S)``), trained
  with the student in the main phase on the paper's eq. (2)-(3), ``p = 1``::

      L = CE + beta * mean_{b,h,w,c} | F_T/||F_T||_2 - F_S/||F_S||_2 |

  each factor L2-normalised per sample over (H, W, C); ``F_T`` comes from the frozen encoder in
  inference mode and carries no gradient.

Architecture (rate ``r = 0.5``, ``D`` = the teacher's channels at the sensing point), from the
authors' TF2 code (sseung0703/Knowledge_distillation_via_TF2.0 ``distiller/FT.py`` lines 25-45):
encoder and translator ``conv3x3(rD)-BN-lrelu, conv3x3(r^2 D, stride 1/r)-BN-lrelu,
conv3x3(r^3 D)-BN``; decoder ``convT3x3(r^2 D)-BN-lrelu, convT3x3(r D, stride 1/r)-BN-lrelu,
convT3x3(D, bias)``, then the teacher's own ReLU (line 79). Convolutions have no bias (line 21).

Defaults and their sources (all Knowledge_distillation_via_TF2.0 ``distiller/FT.py``):

* sensing point: the teacher's and the student's ``bn_last`` output (lines 54-57, ``keep_feat =
  'output'``: the final BN+ReLU), i.e. our ``feats[3]`` of both networks; KD_methods_with_TF
  ``nets/ResNet.py`` line 104 also uses the last map;
* ``beta = 100`` (line 52, ``self.beta = 1e2``), flag ``ft_beta``; ``r = 0.5`` (line 25);
* code L1 weight ``1e-6`` and the ``/(B H W)`` normalisation of the reconstruction (line 81);
  leaky-ReLU slope 0.2 (``tf.nn.leaky_relu``'s default, lines 23 and 77);
* initial phase ``int(0.3 * train_epoch) = 30`` epochs of the authors' 100 (line 87; the TF1
  ``KD_methods_with_TF`` ``train_w_distill.py`` line 34 uses 40).

Widths: the translator reads any student width and ends at the teacher's ``r^3 D`` channels, so
student and teacher need only share the map's spatial size (checked in ``__init__``).

Deviations from the authors' TF2 code:

* The TF2 ``tcl`` arg scope (``nets/tcl.py`` ``arg_scope``) overwrites explicitly passed
  arguments with the class-wide ``pre_defined`` ones, and FT's ``pre_defined`` omits
  ``activation_fn``: as run, every conv there gets tcl's default ReLU, ``bn2`` a leaky ReLU and
  ``convt2`` no bias, against what FT.py writes. We build what FT.py writes (and what the
  initial-phase code implies: the factor is the pre-activation BN output, line 61 vs line 77).
* The paraphraser's BNs: the TF2 auxiliary step calls the encoder/decoder without ``training``,
  so they normalise with their never-updated initial moving statistics (0, 1). We use batch
  statistics (with the moving-average update) in the initial phase and the moving statistics
  in the main phase (encoder in inference, as line 61 asks).
* The authors train the paraphraser with its own Nesterov SGD at a constant ``1e-3`` (line 67)
  and gradient-form weight decay; here at the same ``init_learning_rate`` through the project's
  initial phase (one shared optimiser, ``wd * sum(v**2)`` on :meth:`init_variables`).
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


class _ConvStack:
    """``conv3x3-BN-lrelu, conv3x3(stride 1/r)-BN-lrelu, conv3x3-BN`` (encoder and translator)."""

    def __init__(self, channels, scope):
        stride = int(round(1 / RATE))
        self.scope = scope
        self.convs = [Conv2D(c, 3, s, name=f"{scope}_conv{i}", dtype="float32")
                      for i, (c, s) in enumerate(zip(channels, (1, stride, 1)))]
        self.bns = [BatchNorm(name=f"{scope}_bn{i}", dtype="float32") for i in range(3)]

    def __call__(self, x, training):
        x = tf.cast(x, tf.float32)
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = bn(conv(x), training=training)
            if i < 2:
                x = tf.nn.leaky_relu(x, LEAKY_SLOPE)
        return x

    def tf1_layers(self):
        out = {}
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            out[f"{self.scope}/conv{i}"] = conv
            out[f"{self.scope}/bn{i}"] = bn
        return out


class _Decoder:
    """``convT3x3(r^2 D)-BN-lrelu, convT3x3(r D, stride 1/r)-BN-lrelu, convT3x3(D, bias)``."""

    def __init__(self, teacher_channels, output_hw, scope):
        d = int(teacher_channels)
        c1, c0 = factor_channels(d)[:2]
        stride = int(round(1 / RATE))
        self.scope = scope
        self.convts = [Conv2DTranspose(c0, 3, 1, name=f"{scope}_convt0", dtype="float32"),
                       Conv2DTranspose(c1, 3, stride, output_hw=output_hw, name=f"{scope}_convt1",
                                       dtype="float32"),
                       Conv2DTranspose(d, 3, 1, use_bias=True, name=f"{scope}_convt2", dtype="float32")]
        self.bns = [BatchNorm(name=f"{scope}_bnt{i}", dtype="float32") for i in range(2)]

    def __call__(self, x, training):
        x = tf.cast(x, tf.float32)
        for convt, bn in zip(self.convts[:2], self.bns):
            x = tf.nn.leaky_relu(bn(convt(x), training=training), LEAKY_SLOPE)
        return self.convts[2](x)

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
    )

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.beta = float(self.options["ft_beta"])
        image_size = self.options["image_size"]
        t_shape = tuple(teacher.feature_shapes(image_size)[POINT])
        s_shape = tuple(student.feature_shapes(image_size)[POINT])
        if t_shape[:2] != s_shape[:2]:
            raise ValueError(f"FT: the student's last map is {s_shape[0]}x{s_shape[1]}, the teacher's "
                             f"{t_shape[0]}x{t_shape[1]}; the factors need the same spatial size")
        d = t_shape[2]
        chans = factor_channels(d)
        self.encoder = _ConvStack(chans, "Paraphraser")
        self.decoder = _Decoder(d, t_shape[:2], "Paraphraser")
        self.translator = _ConvStack(chans, "Translator")
        # create every variable now (inference calls change no state)
        code = self.encoder(tf.zeros((1,) + t_shape), training=False)
        self.decoder(code, training=False)
        self.translator(tf.zeros((1,) + s_shape), training=False)
        self._paraphraser_layers = {**self.encoder.tf1_layers(), **self.decoder.tf1_layers()}
        self._translator_layers = self.translator.tf1_layers()

    # ---- initial phase: the paraphraser
    def init_variables(self):
        return _trainable(self._paraphraser_layers)

    def paraphrase(self, teacher_feat, training):
        """``(factor, code, reconstruction)`` of the teacher map (``code = lrelu(factor)``)."""
        factor = self.encoder(teacher_feat, training=training)
        code = tf.nn.leaky_relu(factor, LEAKY_SLOPE)
        recon = tf.nn.relu(self.decoder(code, training=training))
        return factor, code, recon

    def init_losses(self, student, teacher, seed):
        feat = tf.stop_gradient(tf.cast(teacher.feats[POINT], tf.float32))
        _, code, recon = self.paraphrase(feat, training=True)
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
