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


def _authors_loss_np(s, t, labels, temp, alpha):
    """The authors' Soft_logits objective written out in float64 NumPy: ``(1 - alpha) CE +
    alpha KL_T``, ``KL_T = sum_{b,c} softmax(t/T) (log_softmax(t/T) - log_softmax(s/T)) / B``, no
    ``T^2`` (TF2 ``distiller/Soft_logits.py`` lines 25-34: ``(target_loss + KLD)/2``, T = 5; TF1
    ``nets/Response.py`` line 10 with T = 4, ``op_util.py`` line 23: ``0.7 CE + 0.3 KL``)."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    b = s.shape[0]
    ce = -np.mean(log_softmax(s)[np.arange(b), labels])
    x, y = t / temp, s / temp
    kl = np.sum(np.exp(log_softmax(x)) * (log_softmax(x) - log_softmax(y))) / b
    return (1 - alpha) * ce + alpha * kl


@pytest.mark.parametrize("temp, alpha", [(5.0, 0.5), (4.0, 0.3)], ids=["authors_tf2", "authors_tf1"])
def test_authors_setting_equals_their_formula_with_the_step_cross_entropy(temp, alpha):
    """``--kd_temperature=T --kd_weight=alpha --nokd_t_squared``: the step's objective
    ``ce_weight * cross_entropy + kd`` (op_util.train_steps) against the authors' formula in
    float64 NumPy; loss to rel 1e-6, gradient w.r.t. the student logits to rtol 1e-5 / atol 1e-7
    (float32 in the project), the NumPy gradient itself checked by central differences."""
    from iepkt_tf.distillers import build
    from iepkt_tf.distillers.base import Sensed
    from op_util.train_steps import cross_entropy

    rng = np.random.default_rng(1)
    s = rng.normal(scale=3.0, size=(6, 10))
    t = rng.normal(scale=3.0, size=(6, 10))
    labels = rng.integers(0, 10, 6)
    kd = build("KD", None, None, kd_temperature=temp, kd_weight=alpha, kd_t_squared=False)
    assert kd.ce_weight == pytest.approx(1 - alpha)
    sv = tf.constant(s, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(sv)
        terms = kd.main_losses(Sensed(sv, []), Sensed(tf.constant(t, tf.float32), []),
                               tf.constant(labels), None)
        total = kd.ce_weight * cross_entropy(sv, tf.constant(labels)) + tf.add_n(list(terms.values()))
    grad = tape.gradient(total, sv).numpy()

    ref = _authors_loss_np(s, t, labels, temp, alpha)
    assert float(total) == pytest.approx(ref, rel=1e-6)
    b = s.shape[0]
    onehot = np.eye(10)[labels]
    ref_grad = ((1 - alpha) * (_softmax(s) - onehot) + alpha * (_softmax(s / temp) - _softmax(t / temp)) / temp) / b
    eps, fd = 1e-6, np.zeros_like(s)
    for i in np.ndindex(s.shape):
        d = np.zeros_like(s)
        d[i] = eps
        fd[i] = (_authors_loss_np(s + d, t, labels, temp, alpha)
                 - _authors_loss_np(s - d, t, labels, temp, alpha)) / (2 * eps)
    np.testing.assert_allclose(ref_grad, fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_default_equals_keras_logits_distillation():
    """The default form is Keras 3's ``LogitsDistillation(temperature=T, loss=KLDivergence())``
    (softmax of logits/T, batch-mean KL(teacher || student), times T^2): the soft term with alpha
    to 1e-6, and the whole objective ``ce_weight * CE + kd`` to Keras' ``Distiller`` with
    ``student_loss_weight = 1 - alpha`` (its total ``w CE + (1 - w) * soft``). Keras' default
    ``loss="kl_divergence"`` string applies the KL to the scaled logits without softmax nor T^2, so
    the class instance is used."""
    import keras

    from iepkt_tf.distillers import build
    from iepkt_tf.distillers.base import Sensed
    from op_util.train_steps import cross_entropy

    kd = build("KD", None, None)
    assert (kd.temperature, kd.alpha, kd.t_squared, kd.ce_weight) == (4.0, 0.9, True, pytest.approx(0.1))

    def net(seed):
        inp = keras.Input((6,))
        out = keras.layers.Dense(10, kernel_initializer=keras.initializers.RandomNormal(stddev=2.0, seed=seed))(inp)
        return keras.Model(inp, out)

    teacher, student = net(1), net(2)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    t_logits, s_logits = teacher(x), student(x)
    soft = keras.distillation.LogitsDistillation(temperature=kd.temperature, loss=keras.losses.KLDivergence())
    terms = kd.main_losses(Sensed(s_logits, []), Sensed(t_logits, []), tf.constant(labels), None)
    ref_soft = kd.alpha * float(soft.compute_loss(t_logits, s_logits))
    assert ref_soft > 0.1
    assert float(terms["kd"]) == pytest.approx(ref_soft, rel=1e-6, abs=1e-6)

    distiller = keras.distillation.Distiller(teacher=teacher, student=student, distillation_losses=soft,
                                             student_loss_weight=1.0 - kd.alpha)
    distiller.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ref_total = float(distiller.compute_loss(x, labels, s_logits))
    total = kd.ce_weight * float(cross_entropy(s_logits, tf.constant(labels))) + float(terms["kd"])
    assert total == pytest.approx(ref_total, rel=1e-6)


def test_kd_t_squared_off_divides_the_soft_term_by_t_squared():
    s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    assert float(kd_loss(s, t, 5.0, t_squared=False)) * 25 == pytest.approx(float(kd_loss(s, t, 5.0)), rel=1e-6)
