"""FT (factor transfer, Kim et al. 2018): the factor loss and the reconstruction loss against NumPy
and hand numbers, the factor loss's gradient by finite differences and its scale invariance, the
transposed convolution against its adjoint, and the distiller over two tiny networks of different
widths (which variables each phase moves, BN-state behaviour, one compiled step of each phase)."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.distillers.base import Sensed
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


# ---------------------------------------------------------------- the distiller

def _options(**kw):
    return {"ft_beta": 100.0, "init_epoch": 30, "image_size": IMAGE, **kw}


def _images():
    return random_images([1, 2])


def test_declaration_and_variable_names(nets):
    student, teacher = nets
    assert FT.name == "FT" and FT.default_init_epoch == 30 and FT.needs_teacher
    assert not FT.needs_pre_relu and not FT.init_trains_student and FT.grad_rule == "weighted"
    assert [f.name for f in FT.flags] == ["ft_beta"] and FT.flags[0].default == 100.0
    assert FT.flags[0].check(0.0) and FT.flags[0].check(100.0) is None
    ft = FT(student, teacher, _options())
    names = ft.tf1_variables()
    assert all(n.startswith(("Distillation/Paraphraser/", "Distillation/Translator/")) for n in names)
    # teacher WRN-10-2: 128 channels at feats[3] -> factor 16 channels; student 64 channels in
    assert names["Distillation/Paraphraser/conv0/weights"].shape == (3, 3, 128, 64)
    assert names["Distillation/Paraphraser/conv2/weights"].shape == (3, 3, 32, 16)
    assert names["Distillation/Paraphraser/convt2/weights"].shape == (3, 3, 128, 64)
    assert "Distillation/Paraphraser/convt2/biases" in names
    assert "Distillation/Paraphraser/convt0/biases" not in names
    assert names["Distillation/Translator/conv0/weights"].shape == (3, 3, 64, 64)
    assert names["Distillation/Translator/bn2/gamma"].shape == (16,)
    ids = lambda vs: {id(v) for v in vs}
    init, main = ids(ft.init_variables()), ids(ft.main_variables())
    assert not init & main
    assert init | main == {id(v) for v in names.values() if v.trainable}
    para = {id(v) for n, v in names.items() if "/Paraphraser/" in n and v.trainable}
    assert init == para


def test_odd_map_size_reconstructs_to_the_same_size():
    # 20x20 images: stem 7x7/2 -> 10, groups -> 10, 5, 3: feats[3] is 3x3, the factor 2x2
    student = get_network("WResNet-10-1", 5, "Student", (20, 20), is_main=True)
    teacher = get_network("WResNet-10-2", 5, "Teacher", (20, 20), is_main=False)
    ft = FT(student, teacher, _options(image_size=(20, 20)))
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


def test_init_losses_train_only_the_paraphraser(nets):
    student, teacher = nets
    ft = FT(student, teacher, _options())
    images = _images()
    t_named = trainable(teacher.tf1_variables())
    d_named = trainable(ft.tf1_variables())
    bn_mean = ft.tf1_variables()["Distillation/Paraphraser/bn0/moving_mean"]
    tr_mean = ft.tf1_variables()["Distillation/Translator/bn0/moving_mean"]
    before, tr_before = bn_mean.numpy().copy(), tr_mean.numpy().copy()
    with tf.GradientTape() as tape:
        t_out = Sensed(*teacher(images, training=False))  # not gradient-stopped: FT must stop it
        losses = ft.init_losses(None, t_out, tf.constant([0, 0], tf.int64))
    assert set(losses) == {"total", "reconstruction", "code_l1"}
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert float(losses["total"]) == pytest.approx(float(losses["reconstruction"] + losses["code_l1"]))
    allv = {**t_named, **d_named}
    grads = dict(zip(allv, tape.gradient(losses["total"], list(allv.values()))))
    assert nonzero(grads) == {n for n in d_named if "/Paraphraser/" in n}
    # the paraphraser's BNs ran with batch statistics and moved their averages, the translator's not
    assert np.abs(bn_mean.numpy() - before).max() > 0
    np.testing.assert_array_equal(tr_mean.numpy(), tr_before)
    # the value against NumPy on the same forward (deterministic given the batch)
    feat = t_out.feats[3]
    _, code, recon = ft.paraphrase(feat, training=True)
    f, r, c = feat.numpy(), recon.numpy(), code.numpy()
    assert float(losses["reconstruction"]) == pytest.approx(np.abs(f - r).sum() / (8 * 2 * 2), rel=1e-5)
    assert float(losses["code_l1"]) == pytest.approx(1e-6 * np.abs(c).sum() / (8 * 2 * 2), rel=1e-4)
    # the code is lrelu(factor), slope 0.2
    factor = ft.encoder(feat, training=True).numpy()
    np.testing.assert_allclose(c, np.where(factor > 0, factor, 0.2 * factor), rtol=1e-5, atol=1e-6)


def test_main_losses_train_the_student_and_the_translator(nets):
    student, teacher = nets
    ft = FT(student, teacher, _options(ft_beta=50.0))
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


def test_one_compiled_step_of_each_phase(nets):
    """The project's step builder over FT: the initial step moves only the paraphraser, the main
    step the student and the translator (the paraphraser stays frozen)."""
    from op_util.optimizer import NesterovMomentum
    from op_util.train_steps import make_init_step, make_main_step

    student, teacher = nets
    ft = FT(student, teacher, _options())
    named = {**trainable(student.tf1_variables()), **trainable(ft.tf1_variables())}
    opt = NesterovMomentum(named)
    init_step = make_init_step(ft, student, teacher, opt, 5e-4)
    main_step = make_main_step(ft, student, teacher, opt, 5e-4)
    images, labels = _images(), tf.constant([0, 1, 2, 3, 4, 0, 1, 2], tf.int32)
    seed = tf.constant([0, 1], tf.int64)

    def snap():
        return {n: v.numpy().copy() for n, v in named.items()}

    def moved(a, b):
        return {n for n in a if np.abs(a[n] - b[n]).max() > 0}

    s0 = snap()
    m = init_step(images, labels, tf.constant(1e-3), seed)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["reconstruction"]))
    s1 = snap()
    assert moved(s0, s1) == {n for n in named if "/Paraphraser/" in n}
    m = main_step(images, labels, tf.constant(0.05), tf.constant(1.0), seed)
    assert np.isfinite(float(m["ft"])) and np.isfinite(float(m["loss"]))
    s2 = snap()
    assert moved(s1, s2) == {n for n in named if not n.startswith("Distillation/Paraphraser/")}
