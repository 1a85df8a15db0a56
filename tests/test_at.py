"""AT (attention transfer): both forms against independent NumPy computations and hand-made cases,
finite-difference gradients, the invariances of the normalised maps, and the distiller over two
tiny WResNets of different widths (losses, variables, which gradients are nonzero)."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.distillers.at import (AT, POINTS, at_channel_loss, at_paper_loss, attention_map,
                                    channel_normalize)
from iepkt_tf.distillers.base import Sensed
from tests.conftest import make_nets

# ----------------------------------------------------------------------------- NumPy references


def np_attention(a, p=2.0):
    """[B,H,W,C] -> [B,H*W]: mean_c |a|^p, each row divided by its L2 norm (loops, float64)."""
    b, h, w, c = a.shape
    out = np.zeros((b, h * w))
    for i in range(b):
        q = np.array([np.mean(np.abs(a[i, y, x, :]) ** p) for y in range(h) for x in range(w)])
        out[i] = q / np.sqrt(np.sum(q ** 2))
    return out


def np_channel_norm(a):
    b, h, w, c = a.shape
    out = np.zeros_like(a, dtype=np.float64)
    for i in range(b):
        for k in range(c):
            out[i, :, :, k] = a[i, :, :, k] / np.sqrt(np.sum(a[i, :, :, k] ** 2))
    return out


def np_bn_train(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))  # biased: the fused kernel's normalisation
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


# ----------------------------------------------------------------------------- the loss functions


def test_attention_map_and_paper_loss_match_numpy():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(3, 4, 5, 3))
    t = np.abs(rng.normal(size=(3, 4, 5, 6)))  # other width: attention maps have no channel axis
    for p in (2.0, 1.0, 3.0):
        np.testing.assert_allclose(attention_map(s.astype(np.float32), p).numpy(), np_attention(s, p),
                                   rtol=1e-5, atol=1e-7)
        ref = np.mean((np_attention(s, p) - np_attention(t, p)) ** 2)
        assert float(at_paper_loss(s.astype(np.float32), t.astype(np.float32), p)) == \
            pytest.approx(ref, rel=1e-5)


def test_paper_loss_hand_case():
    # Student map 2x2 with 2 channels: c0 = [[1,0],[0,1]], c1 = [[1,2],[0,0]].
    #   Q = mean_c A^2 = [1, 2, 0, 0.5], ||Q|| = sqrt(5.25) = 2.291288,
    #   q = [0.436436, 0.872872, 0, 0.218218].
    # Teacher map, 1 channel of ones: q_t = [0.5, 0.5, 0.5, 0.5].
    # mean (q - q_t)^2 = (0.004040 + 0.139033 + 0.25 + 0.079402) / 4 = 0.118119;
    # with beta/2 = 500: 59.0593.
    s = np.zeros((1, 2, 2, 2), np.float32)
    s[0, :, :, 0] = [[1, 0], [0, 1]]
    s[0, :, :, 1] = [[1, 2], [0, 0]]
    t = np.ones((1, 2, 2, 1), np.float32)
    np.testing.assert_allclose(attention_map(s).numpy()[0], [0.436436, 0.872872, 0.0, 0.218218], atol=1e-6)
    assert float(at_paper_loss(s, t)) == pytest.approx(0.118119, abs=1e-6)
    assert 500.0 * float(at_paper_loss(s, t)) == pytest.approx(59.0593, abs=1e-3)


def test_channel_loss_matches_numpy_and_hand_case():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(2, 3, 4, 5))
    t = rng.normal(size=(2, 3, 4, 5))
    np.testing.assert_allclose(channel_normalize(s.astype(np.float32)).numpy(), np_channel_norm(s),
                               rtol=1e-5, atol=1e-7)
    ref = np.mean((np_channel_norm(s) - np_channel_norm(t)) ** 2)
    assert float(at_channel_loss(s.astype(np.float32), t.astype(np.float32))) == pytest.approx(ref, rel=1e-5)
    # Hand case: one 2x2 channel [[3,0],[0,4]] -> /5 -> [0.6,0,0,0.8]; teacher ones -> 0.5 each;
    # mean of (0.1^2, 0.5^2, 0.5^2, 0.3^2) = (0.01 + 0.25 + 0.25 + 0.09) / 4 = 0.15.
    s1 = np.array([[3.0, 0.0], [0.0, 4.0]], np.float32).reshape(1, 2, 2, 1)
    assert float(at_channel_loss(s1, np.ones((1, 2, 2, 1), np.float32))) == pytest.approx(0.15, abs=1e-7)


def test_invariances_of_the_normalised_maps():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    t = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
    base = float(at_paper_loss(s, t))
    assert base > 1e-4
    # paper: the map is invariant to a global scale and to a permutation of the channels
    assert float(at_paper_loss(7.5 * s, 0.01 * t)) == pytest.approx(base, rel=1e-5)
    assert float(at_paper_loss(s[..., ::-1], t[..., [2, 0, 4, 1, 3]])) == pytest.approx(base, rel=1e-5)
    assert float(at_paper_loss(s, s)) == pytest.approx(0.0, abs=1e-12)
    # ... but not to a change of where the energy is
    moved = s.copy()
    moved[:, 0, 0, :] *= 5.0
    assert abs(float(at_paper_loss(moved, t)) - base) > 1e-3
    # tf2 form: every channel is normalised on its own -> invariant to per-channel positive scales
    t3 = t[..., :3]
    cbase = float(at_channel_loss(s, t3))
    scales = np.array([0.1, 3.0, 40.0], np.float32)
    assert float(at_channel_loss(s * scales, t3 / scales)) == pytest.approx(cbase, rel=1e-5)
    assert abs(float(at_channel_loss(s[..., ::-1], t3)) - cbase) > 1e-3  # channels are matched 1:1


@pytest.mark.parametrize("form", ["paper", "channel"])
def test_finite_difference_gradients(form):
    rng = np.random.default_rng(4)
    s = rng.normal(size=(2, 3, 3, 4))
    t = rng.normal(size=(2, 3, 3, 4))

    def f(x):
        x = tf.constant(x, tf.float64)
        return at_paper_loss(x, t) if form == "paper" else at_channel_loss(x, t)

    x = tf.constant(s, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = at_paper_loss(x, t) if form == "paper" else at_channel_loss(x, t)
    g = tape.gradient(loss, x).numpy()
    num = np.zeros_like(s)
    h = 1e-6
    for idx in np.ndindex(s.shape):
        d = np.zeros_like(s)
        d[idx] = h
        num[idx] = (float(f(s + d)) - float(f(s - d))) / (2 * h)
    assert np.max(np.abs(g)) > 1e-4
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- the distiller


@pytest.fixture(scope="module")
def nets():
    return make_nets(11)


def _options(**kw):
    o = {"at_beta": 1e3, "at_form": "tf2", "at_p": 2.0, "init_epoch": 0, "image_size": (16, 16)}
    o.update(kw)
    return o


def _run(distiller, student, teacher, images):
    t_logits, t_feats, t_pres = teacher(images, training=False, pre_relu=True)
    t_sensed = Sensed(tf.stop_gradient(t_logits), [tf.stop_gradient(f) for f in t_feats],
                      [tf.stop_gradient(f) for f in t_pres])
    variables = ([v for v in student.trainable_variables] + distiller.main_variables()
                 + list(teacher.trainable_variables))
    with tf.GradientTape() as tape:
        logits, feats, pres = student(images, training=True, pre_relu=True)
        s_sensed = Sensed(logits, feats, pres)
        terms = distiller.main_losses(s_sensed, t_sensed, tf.zeros([8], tf.int32), tf.constant([1, 2], tf.int64))
        total = tf.add_n(list(terms.values()))
    grads = tape.gradient(total, variables)
    return terms, dict(zip([id(v) for v in variables], grads)), s_sensed, t_sensed


def _norm(g):
    return 0.0 if g is None else float(tf.norm(g))


def test_class_attributes_and_flags():
    assert AT.name == "AT" and AT.grad_rule == "weighted" and AT.default_init_epoch == 0
    assert AT.needs_teacher and not AT.init_trains_student
    flags = {f.name: f for f in AT.flags}
    assert set(flags) == {"at_beta", "at_form", "at_p"}
    assert flags["at_beta"].default == 1e3 and flags["at_form"].default == "tf2"
    assert set(flags["at_form"].enum) == {"tf2", "paper"}
    assert flags["at_beta"].check(0.0) and flags["at_beta"].check(1.0) is None
    assert flags["at_p"].check(-1.0) and flags["at_p"].check(2.0) is None


def test_tf2_form_over_tiny_networks(nets):
    student, teacher = nets
    d = AT(student, teacher, _options())
    assert d.needs_pre_relu
    names = d.tf1_variables()
    assert set(names) == {f"Distillation/AT/Connector{k}/{leaf}" for k in POINTS
                          for leaf in ("conv/weights", "bn/gamma", "bn/beta", "bn/moving_mean",
                                       "bn/moving_variance")}
    # connector widths: student 16/32/64 -> teacher 32/64/128
    for k, cs, ct in zip(POINTS, (16, 32, 64), (32, 64, 128)):
        assert tuple(names[f"Distillation/AT/Connector{k}/conv/weights"].shape) == (1, 1, cs, ct)
    main_vars = d.main_variables()
    assert len(main_vars) == 9 and all(v.trainable for v in main_vars)
    images = tf.random.stateless_normal([8, 16, 16, 3], seed=[5, 6])

    # at initialisation (connector beta = 0) each channel's map is gamma * z: its normalisation
    # removes gamma, so the connector gammas get no gradient (the per-channel scale invariance)
    terms, grads, _, _ = _run(d, student, teacher, images)
    for k in POINTS:
        g = grads[id(names[f"Distillation/AT/Connector{k}/bn/gamma"])]
        assert _norm(g) <= 1e-5 * _norm(grads[id(names[f"Distillation/AT/Connector{k}/conv/weights"])])

    # a trained-looking connector: nonzero betas and gammas
    rng = np.random.default_rng(7)
    for k in POINTS:
        bn_vars = (names[f"Distillation/AT/Connector{k}/bn/gamma"], names[f"Distillation/AT/Connector{k}/bn/beta"])
        bn_vars[0].assign(rng.uniform(0.5, 1.5, bn_vars[0].shape).astype(np.float32))
        bn_vars[1].assign(rng.normal(0, 0.5, bn_vars[1].shape).astype(np.float32))
    terms, grads, s_sensed, t_sensed = _run(d, student, teacher, images)
    assert set(terms) == {"at1", "at2", "at3"}
    # independent NumPy computation of the three weighted terms (1x1 conv, BN on batch statistics)
    for i, k in enumerate(POINTS):
        w = names[f"Distillation/AT/Connector{k}/conv/weights"].numpy()[0, 0]
        gamma = names[f"Distillation/AT/Connector{k}/bn/gamma"].numpy()
        beta = names[f"Distillation/AT/Connector{k}/bn/beta"].numpy()
        x = np.einsum("bhwc,cd->bhwd", s_sensed.pre_feats[k].numpy().astype(np.float64), w)
        r = np_bn_train(x, gamma, beta)
        ref = np.mean((np_channel_norm(r) - np_channel_norm(t_sensed.pre_feats[k].numpy().astype(np.float64))) ** 2)
        ref *= 1e3 / 2.0 ** (len(POINTS) - 1 - i)  # point weights 1/4, 1/2, 1
        assert np.isfinite(float(terms[f"at{k}"]))
        assert float(terms[f"at{k}"]) == pytest.approx(ref, rel=2e-4)

    s_names = {id(v): n for n, v in student.tf1_variables().items()}
    for v in student.trainable_variables:
        n = s_names[id(v)]
        g = _norm(grads[id(v)])
        if n.startswith("Student/full/"):
            assert g == 0.0, n  # the head is downstream of every sensing point
        elif n == "Student/bn0/beta":
            # its only path is pre_feats[3] -> connector BN, which removes per-channel constants
            gamma_g = _norm(grads[id(student.tf1_variables()["Student/bn0/gamma"])])
            assert g <= 1e-4 * gamma_g, n
        else:
            assert g > 0.0, n
    for v in main_vars:
        assert _norm(grads[id(v)]) > 0.0, v.path
    for v in teacher.trainable_variables:
        assert grads[id(v)] is None, v.path


def test_paper_form_over_tiny_networks(nets):
    student, teacher = nets
    d = AT(student, teacher, _options(at_form="paper", at_beta=500.0))
    assert not d.needs_pre_relu and d.main_variables() == [] and d.tf1_variables() == {}
    images = tf.random.stateless_normal([8, 16, 16, 3], seed=[8, 9])
    terms, grads, s_sensed, t_sensed = _run(d, student, teacher, images)
    assert set(terms) == {"at1", "at2", "at3"}
    for k in POINTS:
        ref = 250.0 * np.mean((np_attention(s_sensed.feats[k].numpy().astype(np.float64))
                               - np_attention(t_sensed.feats[k].numpy().astype(np.float64))) ** 2)
        assert float(terms[f"at{k}"]) == pytest.approx(ref, rel=2e-4) and ref > 0
    s_names = {id(v): n for n, v in student.tf1_variables().items()}
    for v in student.trainable_variables:
        n = s_names[id(v)]
        g = _norm(grads[id(v)])
        assert (g == 0.0) if n.startswith("Student/full/") else (g > 0.0), n
    for v in teacher.trainable_variables:
        assert grads[id(v)] is None, v.path
    # the paper form needs no pre-ReLU maps
    logits, feats = student(images, training=True)
    t_logits, t_feats = teacher(images, training=False)
    out = d.main_losses(Sensed(logits, feats), Sensed(t_logits, t_feats), None, None)
    assert all(np.isfinite(float(v)) for v in out.values())


def test_mismatched_inputs_are_refused(nets):
    student, teacher = nets
    d = AT(student, teacher, _options())
    images = tf.zeros([2, 16, 16, 3])
    logits, feats = student(images)
    with pytest.raises(ValueError, match="pre-ReLU"):
        d.main_losses(Sensed(logits, feats), Sensed(logits, feats), None, None)
    p = AT(student, teacher, _options(at_form="paper"))
    small = [f[:, :2, :2] for f in feats]
    with pytest.raises(ValueError, match="spatial"):
        p.main_losses(Sensed(logits, feats), Sensed(logits, small), None, None)
