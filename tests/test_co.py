"""CO (Heo et al., ICCV 2019): margin, partial L2 and the whole distiller against NumPy/SciPy and
hand-computed cases, its gradient, the paper's skip rule, and the distiller over tiny networks."""
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import norm, truncnorm

from iepkt_tf.distillers.base import Sensed
from iepkt_tf.distillers.co import CO, co_margin, partial_l2
from nets.nets_factory import get_network

OPTIONS = {"co_weight": 1e-3, "init_epoch": 0, "image_size": (16, 16)}


def _nets():
    student = get_network("WResNet-10-1", 5, "Student", (16, 16), is_main=True)
    teacher = get_network("WResNet-10-2", 5, "Teacher", (16, 16), is_main=False)
    return student, teacher


def _np_margin(gamma, beta):
    """get_margin_from_BN with scipy, channel by channel (the authors' loop)."""
    out = []
    for g, b in zip(gamma, beta):
        s = abs(float(g))
        c = norm.cdf(-b / s)
        out.append(-s * np.exp(-(b / s) ** 2 / 2) / np.sqrt(2 * np.pi) / c + b if c > 1e-3 else -3 * s)
    return np.array(out)


def _np_partial_l2(s, t, m):
    t = np.maximum(t, m)
    return float(np.sum((s - t) ** 2 * ((s > t) | (t > 0))))


def _np_bn_train(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def test_margin_hand_cases():
    # By hand, m = beta - |gamma| phi(z)/Phi(-z), z = beta/|gamma|:
    #   gamma=1,  beta=0: -phi(0)/0.5 = -0.398942/0.5 = -0.797885
    #   gamma=1,  beta=3: Phi(-3) = 0.0013499 > 1e-3: 3 - 0.0044318/0.0013499 = -0.283099
    #   gamma=1,  beta=4: Phi(-4) = 3.17e-5 <= 1e-3: the guard, -3|gamma| = -3
    #   gamma=-2, beta=0: |gamma| = 2: -2 * 0.797885 = -1.595769
    got = co_margin([1.0, 1.0, 1.0, -2.0], [0.0, 3.0, 4.0, 0.0]).numpy()
    np.testing.assert_allclose(got, [-0.797885, -0.283099, -3.0, -1.595769], rtol=0, atol=2e-6)


def test_margin_is_negative_part_expectation_against_scipy():
    rng = np.random.default_rng(1)
    gamma = rng.uniform(0.2, 2.0, 64) * rng.choice([-1.0, 1.0], 64)
    beta = rng.normal(0.0, 1.5, 64)
    got = co_margin(gamma.astype(np.float32), beta.astype(np.float32)).numpy()
    ref = _np_margin(gamma.astype(np.float32), beta.astype(np.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # Where the guard does not apply it is E[x | x < 0] of N(beta, gamma^2) (truncated-normal mean).
    s = np.abs(gamma)
    inside = norm.cdf(-beta / s) > 1e-3
    assert inside.sum() > 40
    tmean = truncnorm(-np.inf, -beta / s, loc=beta, scale=s).mean()
    np.testing.assert_allclose(got[inside], tmean[inside], rtol=1e-4, atol=1e-5)
    assert np.all(got < 0)
    # A zero gamma stays finite (the reference code divides by zero): beta<0 -> beta, beta>=0 -> 0.
    np.testing.assert_allclose(co_margin([0.0, 0.0], [-0.5, 0.5]).numpy(), [-0.5, 0.0], atol=1e-6)


def test_partial_l2_hand_case():
    # One channel, margin -0.8; T = [-2, 0.5, -0.1] -> t = max(T, m) = [-0.8, 0.5, -0.1];
    # s = [-1, 0, 0.2]:
    #   p0: s=-1 <= t=-0.8 and t <= 0 -> skipped
    #   p1: t = 0.5 > 0 -> (0 - 0.5)^2 = 0.25
    #   p2: s = 0.2 > t = -0.1 -> (0.2 + 0.1)^2 = 0.09          total 0.34
    s = np.array([-1.0, 0.0, 0.2], np.float32).reshape(1, 1, 3, 1)
    t = np.array([-2.0, 0.5, -0.1], np.float32).reshape(1, 1, 3, 1)
    assert float(partial_l2(s, t, [-0.8])) == pytest.approx(0.34, abs=1e-6)


def test_partial_l2_random_and_gradient():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
    t = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
    m = -rng.uniform(0.1, 1.0, 5).astype(np.float32)
    assert float(partial_l2(s, t, m)) == pytest.approx(_np_partial_l2(s, t, m), rel=1e-5)
    st, tt = tf.constant(s), tf.constant(t)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([st, tt])
        loss = partial_l2(st, tt, m)
    tm = np.maximum(t, m)
    np.testing.assert_allclose(tape.gradient(loss, st).numpy(),
                               2 * (s - tm) * ((s > tm) | (tm > 0)), rtol=1e-5, atol=1e-6)
    assert tape.gradient(loss, tt) is None  # the teacher is a target


def test_skipped_positions_and_exact_target_cost_nothing():
    """Eq. 4: a student below a non-positive target costs nothing, so pushing it further down
    does not change the loss; matching max(T, m) everywhere gives 0."""
    rng = np.random.default_rng(3)
    t = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    m = np.array([-0.3, -0.6, -1.0], np.float32)
    s = rng.normal(size=t.shape).astype(np.float32)
    tm = np.maximum(t, m)
    skipped = (s <= tm) & (tm <= 0)
    assert skipped.any() and (~skipped).any()
    lower = np.where(skipped, s - rng.uniform(0, 5, s.shape).astype(np.float32), s)
    assert float(partial_l2(lower, t, m)) == pytest.approx(float(partial_l2(s, t, m)), rel=1e-6)
    assert float(partial_l2(tm, t, m)) == 0.0
    assert float(partial_l2(tm + 0.1, t, m)) > 0.0


def _random_sensed(net, rng, b=8):
    shapes = net.feature_shapes((16, 16))
    pre = [tf.constant(rng.normal(0.2, 1.0, (b,) + s).astype(np.float32)) for s in shapes]
    return Sensed(tf.zeros([b, 5]), [tf.nn.relu(p) for p in pre], pre)


def test_main_loss_matches_numpy_on_tiny_networks():
    student, teacher = _nets()
    rng = np.random.default_rng(4)
    for bn in teacher.sensing_bns():  # a trained-looking teacher: margins differ per channel
        c = bn.gamma.shape[0]
        bn.gamma.assign(rng.uniform(0.3, 2.0, c) * rng.choice([-1.0, 1.0], c))
        bn.beta.assign(rng.normal(0, 1.0, c))
    co = CO(student, teacher, OPTIONS)
    for conv, bn in zip(co.convs, co.conv_bns):
        bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape[0]))
        bn.beta.assign(rng.normal(0, 0.3, bn.beta.shape[0]))
    s_out, t_out = _random_sensed(student, rng), _random_sensed(teacher, rng)
    got = float(co.main_losses(s_out, t_out, None, None)["co"])

    terms = []
    for i, (k, conv, cbn) in enumerate(zip((1, 2, 3), co.convs, co.conv_bns)):
        x = s_out.pre_feats[k].numpy().astype(np.float64) @ conv.kernel.numpy()[0, 0]
        s = _np_bn_train(x, cbn.gamma.numpy(), cbn.beta.numpy())
        tbn = teacher.sensing_bns()[k]
        m = _np_margin(tbn.gamma.numpy(), tbn.beta.numpy())
        terms.append(_np_partial_l2(s, t_out.pre_feats[k].numpy(), m) / 2 ** (2 - i))
    ref = 1e-3 * sum(terms) / 8
    assert got == pytest.approx(ref, rel=2e-5)
    # the weight scales the loss linearly
    co2 = CO(student, teacher, {**OPTIONS, "co_weight": 3e-3})
    co2.convs, co2.conv_bns = co.convs, co.conv_bns
    assert float(co2.main_losses(s_out, t_out, None, None)["co"]) == pytest.approx(3 * got, rel=1e-5)


def test_connector_gradient_matches_finite_differences():
    student, teacher = _nets()
    co = CO(student, teacher, OPTIONS)
    rng = np.random.default_rng(5)
    s_out, t_out = _random_sensed(student, rng), _random_sensed(teacher, rng)
    kernel = co.convs[1].kernel
    with tf.GradientTape() as tape:
        loss = co.main_losses(s_out, t_out, None, None)["co"]
    g = tape.gradient(loss, kernel).numpy()
    d = rng.normal(size=kernel.shape).astype(np.float32)
    d /= np.linalg.norm(d)
    k0 = kernel.numpy()
    h = 1e-2
    vals = []
    for sign in (1.0, -1.0):
        kernel.assign(k0 + sign * h * d)
        vals.append(float(co.main_losses(s_out, t_out, None, None)["co"]))
    kernel.assign(k0)
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(float(np.sum(g * d))) > 1e-4
    assert float(np.sum(g * d)) == pytest.approx(fd, rel=2e-2)


def test_distiller_over_networks_gradients_and_names():
    student, teacher = _nets()
    co = CO(student, teacher, OPTIONS)
    assert (CO.name, CO.needs_pre_relu, CO.grad_rule, CO.default_init_epoch) == ("CO", True, "weighted", 0)
    assert all(f.name.startswith("co_") for f in CO.flags)
    names = co.tf1_variables()
    expected = {f"Distillation/CO/Connector{k}/{leaf}" for k in (1, 2, 3)
                for leaf in ("conv/weights", "bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance")}
    assert set(names) == expected
    for k, ct, cs in zip((1, 2, 3), teacher.feature_channels[1:], student.feature_channels[1:]):
        assert tuple(names[f"Distillation/CO/Connector{k}/conv/weights"].shape) == (1, 1, cs, ct)
    assert {id(v) for v in co.main_variables()} == {id(v) for v in names.values() if v.trainable}
    assert co.init_variables() == []

    images = tf.random.stateless_normal([8, 16, 16, 3], seed=[1, 2])
    s_vars = [v for n, v in student.tf1_variables().items() if v.trainable]
    s_names = [n for n, v in student.tf1_variables().items() if v.trainable]
    t_vars = [v for v in teacher.tf1_variables().values() if v.trainable]
    with tf.GradientTape() as tape:
        s_out = Sensed(*student(images, training=True, pre_relu=True))
        t_out = Sensed(*teacher(images, training=False, pre_relu=True))  # not stopped: CO must stop it
        losses = co.main_losses(s_out, t_out, None, tf.constant([0, 1], tf.int64))
    assert set(losses) == {"co"} and np.isfinite(float(losses["co"])) and float(losses["co"]) > 0
    grads = tape.gradient(losses["co"], s_vars + co.main_variables() + t_vars)
    n_s, n_c = len(s_vars), len(co.main_variables())
    for name, g in zip(s_names, grads[:n_s]):
        if name.startswith("Student/full/"):
            assert g is None, name  # the logits are not sensed
        else:
            assert g is not None and float(tf.reduce_max(tf.abs(g))) > 0, name
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads[n_s:n_s + n_c])
    assert all(g is None for g in grads[n_s + n_c:])


def test_missing_pre_relu_maps_are_refused():
    student, teacher = _nets()
    co = CO(student, teacher, OPTIONS)
    images = tf.zeros([2, 16, 16, 3])
    s_out = Sensed(*student(images, training=True))
    t_out = Sensed(*teacher(images, training=False))
    with pytest.raises(ValueError, match="pre-ReLU"):
        co.main_losses(s_out, t_out, None, None)
