"""Soft-logits KD (Hinton et al. 2015): the loss against its formula computed by hand in NumPy, its
gradient, and one compiled KD step against the hand-made update."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.distillers.kd import kd_loss
from op_util.optimizer import NesterovMomentum, is_decayed


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_loss_is_t_squared_kl_of_softened_distributions():
    s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    for temp in (1.0, 4.0):
        ps, pt = _softmax(s / temp), _softmax(t / temp)
        ref = temp ** 2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
        assert float(kd_loss(s, t, temp)) == pytest.approx(ref, rel=1e-6)
    # the second row's teacher is uniform: KL = sum_i (1/3) (log(1/3) - log p_s,i)
    row = float(kd_loss(s[1:], t[1:], 1.0))
    ps = _softmax(s[1])
    assert row == pytest.approx(np.sum(np.full(3, 1 / 3) * (np.log(1 / 3) - np.log(ps))), rel=1e-6)
    assert float(kd_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_kd_gradient_is_t_times_probability_difference():
    """d/ds T^2 KL(p_t || p_s) = T (p_s - p_t) / B: the T^2 factor keeps the gradient's scale."""
    rng = np.random.default_rng(0)
    s = tf.constant(rng.normal(size=(4, 5)).astype(np.float32))
    t = rng.normal(size=(4, 5)).astype(np.float32)
    temp = 4.0
    with tf.GradientTape() as tape:
        tape.watch(s)
        loss = kd_loss(s, t, temp)
    g = tape.gradient(loss, s).numpy()
    ref = temp * (_softmax(s.numpy() / temp) - _softmax(t / temp)) / 4
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)


def test_kd_step_update_matches_hand_made_update():
    """One KD main-step update: g = d[(1-a) CE + a kd]/dv + wd v, Nesterov with zero accumulator."""
    from nets.nets_factory import get_network
    from iepkt_tf.distillers import build
    from op_util.train_steps import make_main_step, step_seed, trainable_named

    student = get_network("WResNet-10-1", 5, "Student", (16, 16), is_main=True)
    teacher = get_network("WResNet-10-2", 5, "Teacher", (16, 16), is_main=False)
    images = tf.random.stateless_normal([8, 16, 16, 3], seed=[3, 4])
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2], tf.int32)
    teacher(images, training=False)
    for name, v in teacher.tf1_variables().items():  # a teacher whose logits are far from uniform
        if name.endswith("/weights"):
            v.assign(v * 3.0)
    names, variables = trainable_named(student.tf1_variables())
    opt = NesterovMomentum(dict(zip(names, variables)))
    before = [v.numpy().copy() for v in variables]
    alpha, temp, wd, lr = 0.9, 4.0, 5e-4, 0.05
    t_logits = teacher(images, training=False)[0]
    with tf.GradientTape() as tape:
        logits, _ = student(images, training=True)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        soft = kd_loss(logits, t_logits, temp)
        total = (1 - alpha) * ce + alpha * soft
    grads = tape.gradient(total, variables)
    kd = build("KD", student, teacher, kd_temperature=temp, kd_weight=alpha)
    out = make_main_step(kd, student, teacher, opt, wd)(
        images, labels, tf.constant(lr), tf.constant(1.0), step_seed(0, 0))
    assert float(out["kd"]) == pytest.approx(alpha * float(soft), rel=1e-5) and float(soft) > 0.01
    assert float(out["cross_entropy"]) == pytest.approx(float(ce), rel=1e-5)
    for n, v, b, g in zip(names, variables, before, grads):
        g = g.numpy() + (wd * b if is_decayed(n) else 0.0)
        np.testing.assert_allclose(v.numpy(), b - lr * g - lr * 0.9 * g, rtol=1e-4, atol=1e-7,
                                   err_msg=n)
