"""FT (factor transfer, Kim et al. 2018): the factor loss and the reconstruction loss against NumPy
and hand numbers, the factor loss's gradient by finite differences and its scale invariance, the
transposed convolution against its adjoint; both ``ft_form``s against a plain ``tf.nn``
re-implementation (losses, gradients, BN state); and the distiller over two tiny networks of
different widths (which variables each phase moves, one compiled step of each phase)."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.distillers.base import Sensed
from iepkt_tf.distillers import build
from iepkt_tf.distillers.ft import (CODE_L1_WEIGHT, FT, Conv2DTranspose, factor_channels, ft_loss,
                                    reconstruction_loss)
from nets.nets_factory import get_network
from tests.conftest import nonzero, random_images, trainable

IMAGE = (16, 16)


def _np_ft_loss(t, s):
    t = t.reshape(len(t), -1).astype(np.float64)
    s = s.reshape(len(s), -1).astype(np.float64)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)
    return np.mean(np.abs(tn - sn))


# ---------------------------------------------------------------- the losses as functions

def test_ft_loss_hand_case():
    # one sample, 1x1x2 factors: t = (3, 4) -> (0.6, 0.8); s = (1, 0) -> (1, 0);
    # |diff| = (0.4, 0.8), mean = 0.6
    t = np.array([3.0, 4.0], np.float32).reshape(1, 1, 1, 2)
    s = np.array([1.0, 0.0], np.float32).reshape(1, 1, 1, 2)
    assert float(ft_loss(t, s)) == pytest.approx(0.6, rel=1e-6)
    # two samples, the second identical in both: mean over 4 elements = (0.4 + 0.8 + 0 + 0) / 4
    t2 = np.concatenate([t, t])
    s2 = np.concatenate([s, t])
    assert float(ft_loss(t2, s2)) == pytest.approx(0.3, rel=1e-6)


def test_ft_loss_matches_numpy_and_normalises_per_sample():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(8, 2, 3, 6)).astype(np.float32)
    s = rng.normal(size=(8, 2, 3, 6)).astype(np.float32)
    assert float(ft_loss(t, s)) == pytest.approx(_np_ft_loss(t, s), rel=1e-5)
    # the norm is over (H, W, C) of each sample, not over channels at each position
    tc = t / np.linalg.norm(t, axis=-1, keepdims=True)
    sc = s / np.linalg.norm(s, axis=-1, keepdims=True)
    assert abs(float(ft_loss(t, s)) - np.mean(np.abs(tc - sc))) > 1e-3


def test_ft_loss_is_invariant_to_per_sample_positive_scale():
    """The paper normalises the factors so that only their direction is transferred."""
    rng = np.random.default_rng(2)
    t = rng.normal(size=(8, 2, 2, 4)).astype(np.float32)
    s = rng.normal(size=(8, 2, 2, 4)).astype(np.float32)
    a = rng.uniform(0.1, 10.0, size=(8, 1, 1, 1)).astype(np.float32)
    b = rng.uniform(0.1, 10.0, size=(8, 1, 1, 1)).astype(np.float32)
    base = float(ft_loss(t, s))
    assert float(ft_loss(a * t, b * s)) == pytest.approx(base, rel=1e-5)
    assert float(ft_loss(t, 7.0 * t)) == pytest.approx(0.0, abs=1e-7)
    # a sign flip is not a scale: |t_n - (-t_n)| = 2 |t_n|
    tn = t.reshape(8, -1) / np.linalg.norm(t.reshape(8, -1), axis=1, keepdims=True)
    assert float(ft_loss(t, -t)) == pytest.approx(2 * np.mean(np.abs(tn)), rel=1e-5)


def test_ft_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    t = tf.constant(rng.normal(size=(2, 2, 2, 3)))
    s = tf.Variable(rng.normal(size=(2, 2, 2, 3)))
    with tf.GradientTape() as tape:
        loss = ft_loss(t, s)
    assert loss.dtype == tf.float64
    g = tape.gradient(loss, s).numpy()
    eps = 1e-6
    num = np.zeros_like(g)
    base = s.numpy()
    for idx in np.ndindex(*base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += eps
        minus[idx] -= eps
        num[idx] = (float(ft_loss(t, plus)) - float(ft_loss(t, minus))) / (2 * eps)
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-9)
    assert np.abs(g).max() > 1e-3


def test_reconstruction_loss_hand_case_and_numpy():
    # feat (1,1,2,1) = [1, 2], recon = [0.5, 3]: sum|diff| = 0.5 + 1 = 1.5, B*H*W = 2 -> 0.75;
    # code (1,1,1,2) = [-2, 4]: 1e-6 * 6 / 2 = 3e-6 (normalised by the *feature map's* B*H*W)
    feat = np.array([1.0, 2.0], np.float32).reshape(1, 1, 2, 1)
    recon = np.array([0.5, 3.0], np.float32).reshape(1, 1, 2, 1)
    code = np.array([-2.0, 4.0], np.float32).reshape(1, 1, 1, 2)
    rec, l1 = reconstruction_loss(feat, recon, code)
    assert float(rec) == pytest.approx(0.75, rel=1e-6)
    assert float(l1) == pytest.approx(3e-6, rel=1e-5)
    rng = np.random.default_rng(4)
    f = rng.normal(size=(8, 4, 4, 6))
    r = rng.normal(size=(8, 4, 4, 6))
    c = rng.normal(size=(8, 2, 2, 3))
    rec, l1 = reconstruction_loss(f, r, c)
    assert float(rec) == pytest.approx(np.abs(f - r).sum() / (8 * 4 * 4), rel=1e-10)
    assert float(l1) == pytest.approx(CODE_L1_WEIGHT * np.abs(c).sum() / (8 * 4 * 4), rel=1e-10)


def test_factor_channels_follow_rate_one_half():
    assert factor_channels(256) == (128, 64, 32)
    assert factor_channels(128) == (64, 32, 16)
    with pytest.raises(ValueError):
        factor_channels(4)


@pytest.mark.parametrize("in_hw,stride,out_hw", [((3, 3), 1, None), ((2, 2), 2, (3, 3)), ((2, 3), 2, (4, 6))])
def test_conv2d_transpose_is_the_adjoint_of_conv2d(in_hw, stride, out_hw):
    """<convT_K(y), x> = <y, conv_K(x)> for SAME padding, with the kernel [k, k, out, in]."""
    rng = np.random.default_rng(5)
    layer = Conv2DTranspose(4, 3, stride, use_bias=True, output_hw=out_hw, dtype="float32")
    y = tf.constant(rng.normal(size=(2,) + in_hw + (5,)).astype(np.float32))
    layer.build(y.shape)
    layer.bias.assign(rng.normal(size=(4,)).astype(np.float32))
    out = layer(y)
    hw = out_hw or (in_hw[0] * stride, in_hw[1] * stride)
    assert tuple(out.shape) == (2,) + hw + (4,)
    x = tf.constant(rng.normal(size=(2,) + hw + (4,)).astype(np.float32))
    lhs = float(tf.reduce_sum((out - layer.bias) * x))
    rhs = float(tf.reduce_sum(y * tf.nn.conv2d(x, layer.kernel, stride, "SAME")))
    assert lhs == pytest.approx(rhs, rel=1e-4)
    assert set(layer.tf1_variables()) == {"weights", "biases"}
    plain = Conv2DTranspose(4, 3, stride, output_hw=out_hw, dtype="float32")
    plain.build(y.shape)
    assert set(plain.tf1_variables()) == {"weights"}


# ---------------------------------------------------------------- both forms against plain tf.nn

P, T = "Distillation/Paraphraser", "Distillation/Translator"
FORMS = ("authors", "paper")


class _Shapes:
    """A stand-in network: only the widths and the (4x4) last map the distiller reads."""

    def __init__(self, channels):
        self.feature_channels = [channels] * 4
        self.num_classes = 5

    def feature_shapes(self, image_size):
        return [(4, 4, self.feature_channels[0])] * 4


def _random_ft(form, beta=100.0):
    """FT over a 16-channel teacher map and an 8-channel student map, every variable random
    (moving statistics away from (0, 1) so that the choice of statistics shows)."""
    ft = build("FT", _Shapes(8), _Shapes(16), image_size=IMAGE, ft_form=form, ft_beta=beta)
    rng = np.random.default_rng(7)
    for name, v in sorted(ft.tf1_variables().items()):
        if name.endswith(("moving_variance", "gamma")):
            v.assign(rng.uniform(0.5, 2.0, v.shape).astype(np.float32))
        else:
            v.assign(rng.normal(0.0, 0.5, v.shape).astype(np.float32))
    return ft


def _maps():
    rng = np.random.default_rng(8)
    t = np.maximum(rng.normal(size=(4, 4, 4, 16)), 0).astype(np.float32)
    s = np.maximum(rng.normal(size=(4, 4, 4, 8)), 0).astype(np.float32)
    return tf.constant(t), tf.Variable(s)


def _sensed(feat):
    return Sensed(None, [None, None, None, feat])


def _ref_bn(x, V, scope, batch):
    """tcl BatchNorm: batch moments (biased variance) or the moving ones, epsilon 1e-5."""
    if batch:
        mean, var = tf.nn.moments(x, [0, 1, 2])
    else:
        mean, var = V[scope + "/moving_mean"], V[scope + "/moving_variance"]
    y = tf.nn.batch_normalization(x, mean, var, V[scope + "/beta"], V[scope + "/gamma"], 1e-5)
    return y, (scope, mean, var, int(np.prod(x.shape[:3])))


def _ref_stack(V, scope, x, conv_relu, bn_lrelu, batch):
    stats = []
    for i, stride in enumerate((1, 2, 1)):
        x = tf.nn.conv2d(x, V[f"{scope}/conv{i}/weights"], stride, "SAME")
        if conv_relu[i]:
            x = tf.nn.relu(x)
        x, st = _ref_bn(x, V, f"{scope}/bn{i}", batch)
        stats.append(st)
        if bn_lrelu[i]:
            x = tf.nn.leaky_relu(x, 0.2)
    return x, stats


def _ref_decoder(V, x, authors, batch):
    stats = []
    for i, stride in enumerate((1, 2, 1)):
        w = V[f"{P}/convt{i}/weights"]
        b, h, wd = int(x.shape[0]), int(x.shape[1]) * stride, int(x.shape[2]) * stride
        x = tf.nn.conv2d_transpose(x, w, [b, h, wd, int(w.shape[2])], stride, "SAME")
        if i == 2 and not authors:
            x = x + V[f"{P}/convt2/biases"]
        if authors:
            x = tf.nn.relu(x)
        if i < 2:
            x, st = _ref_bn(x, V, f"{P}/bnt{i}", batch)
            stats.append(st)
            x = tf.nn.leaky_relu(x, 0.2)
    return x, stats


def _enc_flags(form):
    a = form == "authors"
    return dict(conv_relu=(a, a, a), bn_lrelu=(True, True, a))


def _ref_init(V, feat, form):
    """authors: enc = lrelu(P(T)), dec = relu(Q(enc)), BNs on their moving statistics."""
    authors, batch = form == "authors", form == "paper"
    factor, st = _ref_stack(V, P, feat, batch=batch, **_enc_flags(form))
    enc = tf.nn.leaky_relu(factor, 0.2)
    dec, st2 = _ref_decoder(V, enc, authors, batch)
    dec = tf.nn.relu(dec)
    n = 4 * 4 * 4
    return tf.reduce_sum(tf.abs(feat - dec)) / n + 1e-6 * tf.reduce_sum(tf.abs(enc)) / n, st + st2


def _l2n(x):
    sq = tf.reduce_sum(tf.square(x), [1, 2, 3], keepdims=True)
    return x * tf.math.rsqrt(tf.maximum(sq, 1e-12))


def _ref_main(V, t, s, form, beta):
    a = form == "authors"
    f_t, _ = _ref_stack(V, P, t, batch=False, **_enc_flags(form))
    f_s, st = _ref_stack(V, T, s, conv_relu=(a, a, False), bn_lrelu=(True, True, a), batch=True)
    return beta * tf.reduce_mean(tf.abs(_l2n(f_t) - _l2n(f_s))), st


def _expected_moving(V, stats, unbiased):
    """The moving averages after one update with decay 0.9 (tcl's EMA)."""
    out = {}
    for scope, mean, var, n in stats:
        var = var * n / (n - 1) if unbiased else var
        out[scope + "/moving_mean"] = 0.9 * V[scope + "/moving_mean"].numpy() + 0.1 * mean.numpy()
        out[scope + "/moving_variance"] = 0.9 * V[scope + "/moving_variance"].numpy() + 0.1 * var.numpy()
    return out


def _assert_close(actual, expected, rel=2e-4):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) <= rel * max(np.max(np.abs(expected)), 1e-12)


def _with_bias(V):
    """``V`` with a zero convt2 bias when it has none (to evaluate the paper form's reference)."""
    return {f"{P}/convt2/biases": tf.zeros([16]), **V}


def _moving(V):
    return {n: v.numpy().copy() for n, v in V.items() if "moving" in n}


@pytest.mark.parametrize("form", FORMS)
def test_initial_phase_against_plain_tf_nn(form):
    """The reconstruction loss, its gradient w.r.t. every paraphraser variable, and the BN state:
    authors = inference BNs, untouched; paper = batch statistics, moving averages updated."""
    ft = _random_ft(form)
    V = ft.tf1_variables()
    t, _ = _maps()
    names = {id(v): n for n, v in V.items()}
    variables = ft.init_variables()
    with tf.GradientTape() as tape:
        ref, stats = _ref_init(V, t, form)
    ref_grads = tape.gradient(ref, variables)
    other, _ = _ref_init(_with_bias(V), t, "paper" if form == "authors" else "authors")
    assert abs(float(other) - float(ref)) > 1e-2 * abs(float(ref))  # the forms differ here
    before = _moving(V)
    expected_moving = dict(before)
    if form == "paper":
        expected_moving.update(_expected_moving(V, stats, unbiased=True))
    with tf.GradientTape() as tape:
        losses = ft.init_losses(None, _sensed(t), tf.constant([0, 0], tf.int64))
    grads = tape.gradient(losses["total"], variables)
    assert float(losses["total"]) == pytest.approx(float(ref), rel=1e-5)
    assert len(variables) == len(ref_grads) == (16 if form == "authors" else 17)
    for v, g, r in zip(variables, grads, ref_grads):
        assert np.max(np.abs(r)) > 0, names[id(v)]
        _assert_close(g, r)
    after = _moving(V)
    for n in before:
        _assert_close(after[n], expected_moving[n], rel=1e-5)
    para = [n for n in before if "/Paraphraser/" in n]
    changed = {n for n in para if np.max(np.abs(after[n] - before[n])) > 0}
    assert changed == (set() if form == "authors" else set(para))


@pytest.mark.parametrize("form", FORMS)
def test_main_phase_against_plain_tf_nn(form):
    """beta * mean|l2n(P(T)) - l2n(R(S))|, its gradient w.r.t. the student map and the
    translator, the translator's moving averages (decay 0.9; biased variance as in the TF2 tcl
    for authors, the project's unbiased one for paper), the paraphraser's untouched."""
    ft = _random_ft(form, beta=30.0)
    V = ft.tf1_variables()
    t, s = _maps()
    variables = [s] + ft.main_variables()
    with tf.GradientTape() as tape:
        ref, stats = _ref_main(V, t, s, form, 30.0)
    ref_grads = tape.gradient(ref, variables)
    other, _ = _ref_main(V, t, s, "paper" if form == "authors" else "authors", 30.0)
    assert abs(float(other) - float(ref)) > 1e-2 * abs(float(ref))
    before = _moving(V)
    expected_moving = dict(before)
    expected_moving.update(_expected_moving(V, stats, unbiased=form == "paper"))
    with tf.GradientTape() as tape:
        terms = ft.main_losses(_sensed(s), _sensed(t), None, tf.constant([0, 0], tf.int64))
    grads = tape.gradient(terms["ft"], variables)
    assert float(terms["ft"]) == pytest.approx(float(ref), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        assert np.max(np.abs(r)) > 0
        _assert_close(g, r)
    after = _moving(V)
    for n in before:
        _assert_close(after[n], expected_moving[n], rel=1e-5)
    assert {n for n in before if np.max(np.abs(after[n] - before[n])) > 0} == \
        {n for n in before if "/Translator/" in n}


# ---------------------------------------------------------------- the distiller

def _options(**kw):
    return {"ft_beta": 100.0, "init_epoch": 30, "image_size": IMAGE, **kw}


def _images():
    return random_images([1, 2])


def test_declaration_and_variable_names(nets):
    student, teacher = nets
    assert FT.name == "FT" and FT.default_init_epoch == 30 and FT.needs_teacher
    assert not FT.needs_pre_relu and not FT.init_trains_student and FT.grad_rule == "weighted"
    assert [f.name for f in FT.flags] == ["ft_beta", "ft_form"] and FT.flags[0].default == 100.0
    assert FT.flags[0].check(0.0) and FT.flags[0].check(100.0) is None
    form = FT.flags[1]
    assert (form.kind, form.default, tuple(form.enum)) == ("enum", "authors", ("authors", "paper"))
    with pytest.raises(ValueError, match="ft_form"):
        FT(student, teacher, _options(ft_form="tcl"))
    assert FT(student, teacher, _options()).form == "authors"  # absent: the flag's default
    names = {}
    for form in FORMS:
        ft = FT(student, teacher, _options(ft_form=form))
        names[form] = ft.tf1_variables()
        named = names[form]
        assert all(n.startswith(("Distillation/Paraphraser/", "Distillation/Translator/")) for n in named)
        # teacher WRN-10-2: 128 channels at feats[3] -> factor 16 channels; student 64 channels in
        assert named["Distillation/Paraphraser/conv0/weights"].shape == (3, 3, 128, 64)
        assert named["Distillation/Paraphraser/conv2/weights"].shape == (3, 3, 32, 16)
        assert named["Distillation/Paraphraser/convt2/weights"].shape == (3, 3, 128, 64)
        assert "Distillation/Paraphraser/convt0/biases" not in named
        assert named["Distillation/Translator/conv0/weights"].shape == (3, 3, 64, 64)
        assert named["Distillation/Translator/bn2/gamma"].shape == (16,)
        ids = lambda vs: {id(v) for v in vs}
        init, main = ids(ft.init_variables()), ids(ft.main_variables())
        assert not init & main
        assert init | main == {id(v) for v in named.values() if v.trainable}
        assert init == {id(v) for n, v in named.items() if "/Paraphraser/" in n and v.trainable}
    # convt2's bias exists in the paper form only; every other name is shared
    assert "Distillation/Paraphraser/convt2/biases" in names["paper"]
    assert set(names["paper"]) - set(names["authors"]) == {"Distillation/Paraphraser/convt2/biases"}
    assert set(names["authors"]) <= set(names["paper"])


@pytest.mark.parametrize("form", FORMS)
def test_odd_map_size_reconstructs_to_the_same_size(form):
    # 20x20 images: stem 7x7/2 -> 10, groups -> 10, 5, 3: feats[3] is 3x3, the factor 2x2
    student = get_network("WResNet-10-1", 5, "Student", (20, 20), is_main=True)
    teacher = get_network("WResNet-10-2", 5, "Teacher", (20, 20), is_main=False)
    ft = FT(student, teacher, _options(image_size=(20, 20), ft_form=form))
    feat = tf.nn.relu(tf.random.stateless_normal([8, 3, 3, 128], seed=[0, 1]))
    factor, code, recon = ft.paraphrase(feat, training=True)
    assert tuple(factor.shape) == (8, 2, 2, 16) and tuple(recon.shape) == (8, 3, 3, 128)
    assert float(tf.reduce_min(recon)) >= 0.0  # the teacher's own ReLU closes the decoder


def test_mismatched_spatial_sizes_are_refused():
    student = get_network("WResNet-10-1", 5, "Student", (32, 32), is_main=True)  # 3x3/1 stem
    teacher = get_network("WResNet-10-2", 5, "Teacher", (32, 32), is_main=False)

    class Half:  # a teacher whose last map is half the student's size
        feature_channels = teacher.feature_channels

        def feature_shapes(self, image_size):
            return [(h // 2, w // 2, c) for h, w, c in teacher.feature_shapes(image_size)]

    with pytest.raises(ValueError, match="spatial size"):
        FT(student, Half(), _options(image_size=(32, 32)))


@pytest.mark.parametrize("form", FORMS)
def test_init_losses_train_only_the_paraphraser(nets, form):
    student, teacher = nets
    ft = FT(student, teacher, _options(ft_form=form))
    images = _images()
    t_named = trainable(teacher.tf1_variables())
    d_named = trainable(ft.tf1_variables())
    moving = {n: v for n, v in ft.tf1_variables().items() if "moving" in n}
    before = {n: v.numpy().copy() for n, v in moving.items()}
    with tf.GradientTape() as tape:
        t_out = Sensed(*teacher(images, training=False))  # not gradient-stopped: FT must stop it
        losses = ft.init_losses(None, t_out, tf.constant([0, 0], tf.int64))
    assert set(losses) == {"total", "reconstruction", "code_l1"}
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert float(losses["total"]) == pytest.approx(float(losses["reconstruction"] + losses["code_l1"]))
    allv = {**t_named, **d_named}
    grads = dict(zip(allv, tape.gradient(losses["total"], list(allv.values()))))
    assert nonzero(grads) == {n for n in d_named if "/Paraphraser/" in n}
    # the paper form's paraphraser BNs ran on batch statistics and moved every average; the
    # authors' ran in inference mode and moved none; the translator's never move here
    moved = {n for n in moving if np.abs(moving[n].numpy() - before[n]).max() > 0}
    assert moved == ({n for n in moving if "/Paraphraser/" in n} if form == "paper" else set())
    # the value against NumPy on the same forward (deterministic given the batch)
    feat = t_out.feats[3]
    _, code, recon = ft.paraphrase(feat, training=form == "paper")
    f, r, c = feat.numpy(), recon.numpy(), code.numpy()
    assert float(losses["reconstruction"]) == pytest.approx(np.abs(f - r).sum() / (8 * 2 * 2), rel=1e-5)
    assert float(losses["code_l1"]) == pytest.approx(1e-6 * np.abs(c).sum() / (8 * 2 * 2), rel=1e-4)
    # the code is lrelu(factor), slope 0.2
    factor = ft.encoder(feat, training=form == "paper").numpy()
    np.testing.assert_allclose(c, np.where(factor > 0, factor, 0.2 * factor), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_main_losses_train_the_student_and_the_translator(nets, form):
    student, teacher = nets
    ft = FT(student, teacher, _options(ft_beta=50.0, ft_form=form))
    images = _images()
    s_named = trainable(student.tf1_variables())
    t_named = trainable(teacher.tf1_variables())
    d_named = trainable(ft.tf1_variables())
    para_mean = ft.tf1_variables()["Distillation/Paraphraser/bn1/moving_mean"]
    tr_mean = ft.tf1_variables()["Distillation/Translator/bn1/moving_mean"]
    para_before, tr_before = para_mean.numpy().copy(), tr_mean.numpy().copy()
    with tf.GradientTape() as tape:
        s_out = Sensed(*student(images, training=True))
        t_out = Sensed(*teacher(images, training=False))
        terms = ft.main_losses(s_out, t_out, tf.zeros([8], tf.int32), tf.constant([0, 0], tf.int64))
    assert set(terms) == {"ft"} and np.isfinite(float(terms["ft"]))
    allv = {**s_named, **t_named, **d_named}
    grads = dict(zip(allv, tape.gradient(terms["ft"], list(allv.values()))))
    expected = {n for n in s_named if not n.startswith("Student/full/")}
    expected |= {n for n in d_named if "/Translator/" in n}
    assert nonzero(grads) == expected
    # the encoder ran in inference mode (moving statistics untouched), the translator trained
    np.testing.assert_array_equal(para_mean.numpy(), para_before)
    assert np.abs(tr_mean.numpy() - tr_before).max() > 0
    # value: beta * the NumPy loss on the factors of the same forward
    f_t, f_s = ft.factors(s_out, t_out)
    assert tuple(f_t.shape) == tuple(f_s.shape) == (8, 1, 1, 16)
    assert float(terms["ft"]) == pytest.approx(50.0 * _np_ft_loss(f_t.numpy(), f_s.numpy()), rel=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_one_compiled_step_of_each_phase(nets, form):
    """The project's step builder over FT: the initial step moves only the paraphraser (and, in
    the authors' form, none of its BN statistics), the main step the student and the translator
    (the paraphraser stays frozen)."""
    from op_util.optimizer import NesterovMomentum
    from op_util.train_steps import make_init_step, make_main_step

    student, teacher = nets
    ft = FT(student, teacher, _options(ft_form=form))
    named = {**trainable(student.tf1_variables()), **trainable(ft.tf1_variables())}
    para_stats = {n: v for n, v in ft.tf1_variables().items() if "/Paraphraser/" in n and "moving" in n}
    opt = NesterovMomentum(named)
    init_step = make_init_step(ft, student, teacher, opt, 5e-4)
    main_step = make_main_step(ft, student, teacher, opt, 5e-4)
    images, labels = _images(), tf.constant([0, 1, 2, 3, 4, 0, 1, 2], tf.int32)
    seed = tf.constant([0, 1], tf.int64)

    def snap(d):
        return {n: v.numpy().copy() for n, v in d.items()}

    def moved(a, b):
        return {n for n in a if np.abs(a[n] - b[n]).max() > 0}

    s0, p0 = snap(named), snap(para_stats)
    m = init_step(images, labels, tf.constant(1e-3), seed)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["reconstruction"]))
    s1 = snap(named)
    assert moved(s0, s1) == {n for n in named if "/Paraphraser/" in n}
    assert moved(p0, snap(para_stats)) == (set() if form == "authors" else set(para_stats))
    m = main_step(images, labels, tf.constant(0.05), tf.constant(1.0), seed)
    assert np.isfinite(float(m["ft"])) and np.isfinite(float(m["loss"]))
    s2 = snap(named)
    assert moved(s1, s2) == {n for n in named if not n.startswith("Distillation/Paraphraser/")}
