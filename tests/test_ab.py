"""AB (activation boundaries, Heo et al. 2019): the boundary loss against NumPy and hand numbers,
its gradient by finite differences and the invariances the paper states (teacher enters by sign
only; zero once the margin is met), and the distiller over two tiny networks of different widths
(initial phase trains the student and the connectors, main phase adds nothing)."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.distillers.ab import AB, POINTS, ab_loss, boundary_mismatch, point_weights
from iepkt_tf.distillers.base import Sensed
from tests.conftest import nonzero, random_images, trainable

IMAGE = (16, 16)


def _np_ab_loss(s, t, m):
    s = s.astype(np.float64)
    off = (s + m) ** 2 * ((s > -m) & (t <= 0))
    on = (s - m) ** 2 * ((s <= m) & (t > 0))
    b, h, w = s.shape[:3]
    return (off + on).sum() / (b * h * w)


# ---------------------------------------------------------------- the loss as a function

def test_ab_loss_hand_case():
    # margin 1; two positions of two channels, (teacher t, student s):
    #   (2, 0.5):  t > 0, s <= 1   -> (0.5 - 1)^2 = 0.25
    #   (-1, -0.2): t <= 0, s > -1 -> (-0.2 + 1)^2 = 0.64
    #   (0.5, 1.5): t > 0, s > 1   -> 0 (margin met)
    #   (0, 0):    t <= 0 (0 counts as off), s > -1 -> (0 + 1)^2 = 1
    # sum 1.89 over B*H*W = 2 positions -> 0.945
    t = np.array([2.0, -1.0, 0.5, 0.0], np.float32).reshape(1, 1, 2, 2)
    s = np.array([0.5, -0.2, 1.5, 0.0], np.float32).reshape(1, 1, 2, 2)
    assert float(ab_loss(s, t, 1.0)) == pytest.approx(0.945, rel=1e-6)
    # margin 0.5: (0.5-0.5)^2 = 0, (-0.2+0.5)^2 = 0.09, 0, (0+0.5)^2 = 0.25 -> 0.34 / 2 = 0.17
    assert float(ab_loss(s, t, 0.5)) == pytest.approx(0.17, rel=1e-5)
    # activation states (x > 0) of s and t agree everywhere: (0.5, 2) on/on, (-0.2, -1) off/off,
    # (1.5, 0.5) on/on, (0, 0) off/off -> no mismatch; -s = (-0.5, 0.2, -1.5, 0) flips the
    # first three (the zero stays off) -> 3/4
    assert float(boundary_mismatch(s, t)) == 0.0
    assert float(boundary_mismatch(-s, t)) == pytest.approx(0.75)


def test_ab_loss_matches_numpy():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(8, 4, 4, 6)).astype(np.float32) * 1.5
    t = rng.normal(size=(8, 4, 4, 6)).astype(np.float32)
    for m in (1.0, 0.3):
        assert float(ab_loss(s, t, m)) == pytest.approx(_np_ab_loss(s, t, m), rel=1e-5)


def test_point_weights_double_towards_the_deepest_point():
    assert point_weights(3) == (0.25, 0.5, 1.0)
    assert point_weights(1) == (1.0,)


def test_teacher_enters_by_sign_only_and_margin_met_gives_zero():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(8, 3, 3, 5)).astype(np.float32)
    t = rng.normal(size=(8, 3, 3, 5)).astype(np.float32)
    scale = rng.uniform(0.01, 100.0, size=t.shape).astype(np.float32)
    base = float(ab_loss(s, t, 1.0))
    assert base > 0
    assert float(ab_loss(s, t * scale, 1.0)) == pytest.approx(base, rel=1e-6)
    # a student on the teacher's side by at least the margin everywhere: no loss, no gradient
    sv = tf.Variable(np.where(t > 0, 1.0 + scale / 100, -1.0 - scale / 100).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = ab_loss(sv, t, 1.0)
    assert float(loss) == 0.0
    assert float(tf.reduce_max(tf.abs(tape.gradient(loss, sv)))) == 0.0
    # the teacher gets no gradient through the loss
    tv = tf.Variable(t)
    with tf.GradientTape() as tape:
        loss = ab_loss(s, tv, 1.0)
    assert tape.gradient(loss, tv) is None


def test_ab_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    t = rng.normal(size=(2, 2, 2, 3))
    base = rng.normal(size=(2, 2, 2, 3)) * 2
    m = 1.0
    # keep away from the kinks at s = +-m, where the indicator switches
    base = np.where(np.abs(np.abs(base) - m) < 0.05, base + 0.2, base)
    s = tf.Variable(base)
    with tf.GradientTape() as tape:
        loss = ab_loss(s, t, m)
    assert loss.dtype == tf.float64
    g = tape.gradient(loss, s).numpy()
    eps = 1e-6
    num = np.zeros_like(g)
    for idx in np.ndindex(*base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += eps
        minus[idx] -= eps
        num[idx] = (float(ab_loss(plus, t, m)) - float(ab_loss(minus, t, m))) / (2 * eps)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-9)
    # closed form: 2 (s + m) on active "off" elements, 2 (s - m) on active "on" elements, / BHW
    ref = (2 * (base + m) * ((base > -m) & (t <= 0)) + 2 * (base - m) * ((base <= m) & (t > 0))) / 8
    np.testing.assert_allclose(g, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the distiller

def _options(**kw):
    return {"ab_margin": 1.0, "init_epoch": 30, "image_size": IMAGE, **kw}


def _images():
    return random_images([5, 6])


def test_declaration_and_variable_names(nets):
    student, teacher = nets
    assert AB.name == "AB" and AB.default_init_epoch == 30
    assert AB.needs_pre_relu and AB.init_trains_student and AB.needs_teacher
    assert [f.name for f in AB.flags] == ["ab_margin"] and AB.flags[0].default == 1.0
    assert AB.flags[0].check(-1.0) and AB.flags[0].check(1.0) is None
    assert POINTS == (1, 2, 3)
    ab = AB(student, teacher, _options())
    names = ab.tf1_variables()
    # student widths 16, 32, 64 -> teacher widths 32, 64, 128 at pre_feats[1:4]
    assert names["Distillation/Connector1/conv/weights"].shape == (1, 1, 16, 32)
    assert names["Distillation/Connector2/conv/weights"].shape == (1, 1, 32, 64)
    assert names["Distillation/Connector3/conv/weights"].shape == (1, 1, 64, 128)
    assert names["Distillation/Connector3/bn/moving_variance"].shape == (128,)
    assert not any(n.endswith("biases") for n in names)
    assert {id(v) for v in ab.init_variables()} == {id(v) for v in names.values() if v.trainable}
    assert ab.main_variables() == []


def test_init_losses_train_the_student_and_connectors(nets):
    student, teacher = nets
    ab = AB(student, teacher, _options(ab_margin=0.5))
    images = _images()
    s_named = trainable(student.tf1_variables())
    t_named = trainable(teacher.tf1_variables())
    d_named = trainable(ab.tf1_variables())
    mean = ab.tf1_variables()["Distillation/Connector2/bn/moving_mean"]
    before = mean.numpy().copy()
    with tf.GradientTape() as tape:
        s_out = Sensed(*student(images, training=True, pre_relu=True))
        t_out = Sensed(*teacher(images, training=False, pre_relu=True))  # not stopped: AB stops it
        losses = ab.init_losses(s_out, t_out, tf.constant([0, 0], tf.int64))
    assert {"total", "ab1", "ab2", "ab3"} <= set(losses)
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert float(losses["total"]) == pytest.approx(float(losses["ab1"] + losses["ab2"] + losses["ab3"]), rel=1e-6)
    allv = {**s_named, **t_named, **d_named}
    grads = dict(zip(allv, tape.gradient(losses["total"], list(allv.values()))))
    # everything up to the final BN (not the classifier), every connector, nothing of the teacher
    expected = {n for n in s_named if not n.startswith("Student/full/")} | set(d_named)
    assert nonzero(grads) == expected
    assert np.abs(mean.numpy() - before).max() > 0  # connector BN in training mode
    # each term against NumPy on the connector outputs of the same forward (batch statistics)
    for i, k in enumerate(POINTS):
        s = ab.connect(i, s_out.pre_feats[k]).numpy()
        t = t_out.pre_feats[k].numpy()
        assert s.shape == t.shape
        ref = point_weights(3)[i] * _np_ab_loss(s, t, 0.5)
        assert float(losses[f"ab{k}"]) == pytest.approx(ref, rel=1e-5)
        # both signs occur at every point: there is a boundary to learn
        assert (t < 0).any() and (t > 0).any()


def test_init_losses_need_the_pre_relu_maps(nets):
    student, teacher = nets
    ab = AB(student, teacher, _options())
    images = _images()
    t_out = Sensed(*teacher(images, training=False))
    with pytest.raises(ValueError, match="pre_feats"):
        ab.init_losses(None, t_out, None)


def test_main_phase_is_plain_cross_entropy(nets):
    student, teacher = nets
    ab = AB(student, teacher, _options())
    images = _images()
    s_out = Sensed(*student(images, training=True, pre_relu=True))
    t_out = Sensed(*teacher(images, training=False, pre_relu=True))
    assert ab.main_losses(s_out, t_out, tf.zeros([8], tf.int32), None) == {}


def test_init_steps_reduce_the_boundary_loss(nets):
    """A few initial-phase steps of the project's step builder: the boundary loss falls and the
    student's activation states move towards the teacher's; the teacher does not change."""
    from op_util.optimizer import NesterovMomentum
    from op_util.train_steps import make_init_step

    student, teacher = nets
    ab = AB(student, teacher, _options())
    named = {**trainable(student.tf1_variables()), **trainable(ab.tf1_variables())}
    step = make_init_step(ab, student, teacher, NesterovMomentum(named), 5e-4)
    images, labels = _images(), tf.constant([0, 1, 2, 3, 4, 0, 1, 2], tf.int32)
    t_before = {n: v.numpy().copy() for n, v in teacher.tf1_variables().items()}
    losses, mismatch = [], []
    for i in range(6):
        m = step(images, labels, tf.constant(0.05), tf.constant([0, i], tf.int64))
        losses.append(float(m["loss"]))
        mismatch.append(float(m["mismatch3"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]
    assert mismatch[-1] < mismatch[0]
    for n, v in teacher.tf1_variables().items():
        np.testing.assert_array_equal(v.numpy(), t_before[n])
