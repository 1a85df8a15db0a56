"""RKD (relational KD): the potentials and losses against NumPy loops and a hand-made 3-point case,
finite-difference gradients, the invariances the paper states, and the distiller over two tiny
WResNets of different widths."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.distillers.base import Sensed
from tests.conftest import make_nets
from iepkt_tf.distillers.rkd import (RKD, angle_potential, distance_potential, huber,
                                     rkd_angle_loss, rkd_distance_loss)

# ----------------------------------------------------------------------------- NumPy references


def np_distance_potential(x, mu_form="authors"):
    """``authors``: every squared distance floored at 1e-12 and all B^2 in mu; ``paper``: Eq. 4."""
    b = len(x)
    d = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            if mu_form == "authors":
                d[i, j] = np.sqrt(max(np.sum((x[i] - x[j]) ** 2), 1e-12))
            elif i != j:
                d[i, j] = np.sqrt(np.sum((x[i] - x[j]) ** 2))
    pairs = b * b if mu_form == "authors" else b * (b - 1)
    return d / (d.sum() / pairs)


def np_angle_potential(x):
    b = len(x)
    a = np.zeros((b, b, b))
    for i in range(b):
        for j in range(b):
            for k in range(b):
                e1, e2 = x[j] - x[i], x[k] - x[i]
                n1, n2 = np.linalg.norm(e1), np.linalg.norm(e2)
                a[i, j, k] = 0.0 if n1 == 0 or n2 == 0 else e1 @ e2 / (n1 * n2)
    return a


def np_huber(a, b):
    d = np.abs(a - b).ravel()
    return np.mean([0.5 * v * v if v <= 1 else v - 0.5 for v in d])


def np_unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_rkd(s, t, mu_form="authors"):
    s, t = np_unit(s), np_unit(t)
    return (np_huber(np_distance_potential(s, mu_form), np_distance_potential(t, mu_form)),
            np_huber(np_angle_potential(s), np_angle_potential(t)))


# ----------------------------------------------------------------------------- the loss functions


def test_huber_hand_values():
    # |d| = 0, 0.5, 2: 0, 0.5 * 0.25 = 0.125, 2 - 0.5 = 1.5; mean 1.625 / 3 = 0.541667
    assert float(huber(tf.constant([0.0, 0.5, -2.0]), tf.zeros(3))) == pytest.approx(1.625 / 3, abs=1e-7)


def test_potentials_and_losses_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4))
    d = distance_potential(x.astype(np.float32), "paper").numpy()
    np.testing.assert_allclose(d, np_distance_potential(x, "paper"), rtol=1e-5, atol=1e-6)
    assert np.all(np.diag(d) == 0.0)                       # paper: the diagonal is exactly 0 ...
    assert d[~np.eye(6, dtype=bool)].mean() == pytest.approx(1.0, rel=1e-5)  # ... and not in mu
    d = distance_potential(x.astype(np.float32)).numpy()   # authors: all B^2 floored distances
    np.testing.assert_allclose(d, np_distance_potential(x), rtol=1e-5, atol=1e-9)
    assert d.mean() == pytest.approx(1.0, rel=1e-5) and np.all(np.diag(d) > 0)
    np.testing.assert_allclose(angle_potential(x.astype(np.float32)).numpy(), np_angle_potential(x),
                               rtol=1e-5, atol=1e-6)
    s = rng.normal(size=(7, 3))
    t = rng.normal(size=(7, 9))  # other width: the potentials are B x B and B x B x B
    ref_d, ref_a = np_rkd(s, t)
    assert float(rkd_distance_loss(s.astype(np.float32), t.astype(np.float32))) == pytest.approx(ref_d, rel=1e-5)
    ref_paper = np_rkd(s, t, "paper")[0]
    assert float(rkd_distance_loss(s.astype(np.float32), t.astype(np.float32), mu_form="paper")) == \
        pytest.approx(ref_paper, rel=1e-5)
    assert abs(ref_paper - ref_d) > 1e-3 * ref_d  # the two forms are distinguishable here
    assert float(rkd_angle_loss(s.astype(np.float32), t.astype(np.float32))) == pytest.approx(ref_a, rel=1e-5)
    assert ref_d > 1e-3 and ref_a > 1e-3


def test_hand_case_three_points():
    # Teacher t = (1,0), (0,1), (-1,0); student s = (1,0), (-1,0), (0,1) (samples 1, 2 swapped);
    # all unit-norm, so the L2 normalisation changes nothing.
    # Eq. 4 (--rkd_mu=paper). Teacher distances d01 = sqrt2, d02 = 2, d12 = sqrt2; mu = 2 (2 sqrt2 + 2) / 6 = 1.609476
    # -> psi_D(t) = [[0, .878680, 1.242641], [.878680, 0, .878680], [1.242641, .878680, 0]];
    # the student has the same mu and d01, d02 swapped. 4 of the 9 entries differ by
    # (2 - sqrt2) / mu = 0.363961 < 1 -> Huber 0.5 * 0.132468 = 0.066234 each;
    # L_D = 4 * 0.066234 / 9 = 0.029437.
    # Angles: at vertex 0 both are the same (cos 45 deg = 0.707107 between e01 and e02); at vertex 1
    # the teacher has e10 . e12 = 0 (right angle), the student cos = 0.707107; at vertex 2 the
    # teacher has 0.707107, the student 0 -> 4 of the 27 entries differ by 0.707107 ->
    # Huber 0.5 * 0.5 = 0.25 each; L_A = 4 * 0.25 / 27 = 1/27 = 0.037037.
    t = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    s = np.array([[1, 0], [-1, 0], [0, 1]], np.float32)
    np.testing.assert_allclose(distance_potential(t, "paper").numpy(),
                               [[0, 0.878680, 1.242641], [0.878680, 0, 0.878680], [1.242641, 0.878680, 0]],
                               atol=1e-6)
    assert float(angle_potential(t)[0, 1, 2]) == pytest.approx(0.707107, abs=1e-6)
    assert float(angle_potential(t)[1, 0, 2]) == pytest.approx(0.0, abs=1e-6)
    assert float(rkd_distance_loss(s, t, mu_form="paper")) == pytest.approx(0.029437, abs=1e-6)
    assert float(rkd_angle_loss(s, t)) == pytest.approx(1 / 27, abs=1e-6)


def test_invariances():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(8, 5))
    t = rng.normal(size=(8, 6))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))  # a random orthogonal matrix
    for loss in (rkd_distance_loss, rkd_angle_loss):
        base = float(loss(s, t))
        assert base > 1e-3
        assert float(loss(s @ q, t)) == pytest.approx(base, rel=1e-5)          # rotation
        assert float(loss(3.7 * s, 0.2 * t)) == pytest.approx(base, rel=1e-5)  # scale
        perm = rng.permutation(8)
        assert float(loss(s[perm], t[perm])) == pytest.approx(base, rel=1e-5)  # the batch order
        assert float(loss(s @ q, s)) == pytest.approx(0.0, abs=1e-7)          # same relations
        assert float(loss(s[perm], t)) != pytest.approx(base, rel=1e-3)        # pairs matter
    # the raw potentials: distance-wise invariant to scale and translation, angle-wise too
    x = rng.normal(size=(6, 3))
    np.testing.assert_allclose(distance_potential(5.0 * x + 2.0).numpy(), distance_potential(x).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(angle_potential(0.3 * x - 1.0).numpy(), angle_potential(x).numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", [rkd_distance_loss, rkd_angle_loss])
def test_finite_difference_gradients(loss):
    rng = np.random.default_rng(2)
    s = rng.normal(size=(5, 3))
    t = rng.normal(size=(5, 4))
    x = tf.constant(s, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(x, tf.constant(t, tf.float64))
    g = tape.gradient(value, x).numpy()
    num = np.zeros_like(s)
    h = 1e-6
    for idx in np.ndindex(s.shape):
        d = np.zeros_like(s)
        d[idx] = h
        num[idx] = (float(loss(tf.constant(s + d), t)) - float(loss(tf.constant(s - d), t))) / (2 * h)
    assert np.max(np.abs(g)) > 1e-4
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-9)


def test_identical_samples_give_finite_gradients():
    s = tf.constant([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = tf.constant([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    with tf.GradientTape() as tape:
        tape.watch(s)
        total = rkd_distance_loss(s, t) + rkd_angle_loss(s, t)
    assert np.all(np.isfinite(tape.gradient(total, s).numpy()))


# ----------------------------------------------------------------------------- the distiller


@pytest.fixture(scope="module")
def nets():
    return make_nets(21)


def _options(**kw):
    o = {"rkd_distance_weight": 100.0, "rkd_angle_weight": 200.0, "rkd_embedding": "logits",
         "init_epoch": 0, "image_size": (16, 16)}
    o.update(kw)
    return o


def test_class_attributes_flags_and_options():
    assert RKD.name == "RKD" and RKD.grad_rule == "weighted" and RKD.default_init_epoch == 0
    assert RKD.needs_teacher and not RKD.needs_pre_relu
    flags = {f.name: f for f in RKD.flags}
    assert set(flags) == {"rkd_distance_weight", "rkd_angle_weight", "rkd_embedding", "rkd_mu"}
    assert flags["rkd_mu"].default == "authors" and set(flags["rkd_mu"].enum) == {"authors", "paper"}
    assert flags["rkd_distance_weight"].default == 100.0 and flags["rkd_angle_weight"].default == 200.0
    assert flags["rkd_embedding"].default == "logits" and set(flags["rkd_embedding"].enum) == {"logits", "pooled"}
    assert flags["rkd_angle_weight"].check(-1.0) and flags["rkd_angle_weight"].check(0.0) is None
    assert RKD.check_options(_options()) is None
    assert RKD.check_options(_options(rkd_distance_weight=0.0, rkd_angle_weight=0.0))


@pytest.mark.parametrize("kind", ["logits", "pooled"])
def test_distiller_over_tiny_networks(nets, kind):
    student, teacher = nets
    d = RKD(student, teacher, _options(rkd_embedding=kind))
    assert d.main_variables() == [] and d.tf1_variables() == {}
    images = tf.random.stateless_normal([8, 16, 16, 3], seed=[3, 4])
    t_logits, t_feats = teacher(images, training=False)
    t_sensed = Sensed(tf.stop_gradient(t_logits), [tf.stop_gradient(f) for f in t_feats])
    variables = list(student.trainable_variables) + list(teacher.trainable_variables)
    with tf.GradientTape() as tape:
        logits, feats = student(images, training=True)
        terms = d.main_losses(Sensed(logits, feats), t_sensed, None, None)
        total = tf.add_n(list(terms.values()))
    grads = dict(zip([id(v) for v in variables], tape.gradient(total, variables)))
    assert set(terms) == {"rkd_distance", "rkd_angle"}
    if kind == "logits":
        s_emb, t_emb = logits.numpy(), t_logits.numpy()
    else:
        s_emb, t_emb = feats[3].numpy().mean(axis=(1, 2)), t_feats[3].numpy().mean(axis=(1, 2))
    ref_d, ref_a = np_rkd(s_emb.astype(np.float64), t_emb.astype(np.float64))
    assert float(terms["rkd_distance"]) == pytest.approx(100.0 * ref_d, rel=1e-4) and ref_d > 0
    assert float(terms["rkd_angle"]) == pytest.approx(200.0 * ref_a, rel=1e-4) and ref_a > 0
    s_names = {id(v): n for n, v in student.tf1_variables().items()}
    for v in student.trainable_variables:
        n = s_names[id(v)]
        g = grads[id(v)]
        g = 0.0 if g is None else float(tf.norm(g))
        if kind == "pooled" and n.startswith("Student/full/"):
            assert g == 0.0, n  # the classifier is downstream of the pooled embedding
        else:
            assert g > 0.0 and np.isfinite(g), n
    for v in teacher.trainable_variables:
        assert grads[id(v)] is None, v.path


def test_a_zero_weight_drops_its_term(nets):
    student, teacher = nets
    images = tf.random.stateless_normal([8, 16, 16, 3], seed=[5, 6])
    logits, feats = student(images, training=False)
    t_logits, t_feats = teacher(images, training=False)
    d = RKD(student, teacher, _options(rkd_angle_weight=0.0))
    assert set(d.main_losses(Sensed(logits, feats), Sensed(t_logits, t_feats), None, None)) == {"rkd_distance"}
