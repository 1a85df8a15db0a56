"""MHGD baseline (Lee & Song, BMVC 2019): SVD embeddings, Align_rsv, the initial-phase estimator
loss and the main-phase graph KL against NumPy and hand-computed cases, finite-difference
gradients, invariances, and the distiller over tiny networks (variables, phases, TF1 names)."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.attention_heads import drop_head_noise
from iepkt_tf.distillers.base import Sensed
from iepkt_tf.distillers.mhgd import MHGD, align_rsv, student_embedding, teacher_embedding
from nets.nets_factory import get_network

OPTIONS = {"mhgd_num_head": 8, "mhgd_connector": "bn_relu", "mhgd_svd_grad": "authors",
           "init_epoch": 40, "image_size": (16, 16)}
SEED = tf.constant([3, 7], tf.int64)
EPS = 1e-5


def _nets(student_arch="WResNet-10-1"):
    student = get_network(student_arch, 5, "Student", (16, 16), is_main=True)
    teacher = get_network("WResNet-10-2", 5, "Teacher", (16, 16), is_main=False)
    return student, teacher


def _random_sensed(net, rng, b=8):
    """Sensed with random non-negative maps (like post-ReLU sensing points) of the net's shapes."""
    feats = [tf.constant(np.maximum(rng.normal(0.3, 1.0, (b,) + s), 0).astype(np.float32))
             for s in net.feature_shapes((16, 16))]
    return Sensed(tf.zeros([b, 5]), feats)


def _low_rank_sensed(net, rng, b=8):
    """Non-negative maps with well-separated singular values (x = sum_r 2^-r u_r v_r^T + 0.3, ReLU):
    their leading singular vectors are stable, so finite differences through the SVD are meaningful."""
    feats = []
    for h, w, c in net.feature_shapes((16, 16)):
        r = min(6, h * w, c)
        u, v = rng.normal(size=(b, h * w, r)), rng.normal(size=(b, c, r))
        x = np.einsum("bir,bjr,r->bij", u, v, 2.0 ** -np.arange(r)) + 0.3
        feats.append(tf.constant(np.maximum(x, 0).reshape(b, h, w, c).astype(np.float32)))
    return Sensed(tf.zeros([b, 5]), feats)


def _randomise_bns(layers, rng):
    """Non-trivial BN parameters and moving statistics in every BN of ``layers``."""
    for layer in layers:
        for name, var in layer.tf1_variables().items():
            c = var.shape[0]
            if name.endswith("moving_mean"):
                var.assign(rng.normal(0, 0.3, c))
            elif name.endswith("moving_variance"):
                var.assign(rng.uniform(0.5, 2.0, c))
            elif name.endswith("gamma"):
                var.assign(rng.uniform(0.5, 1.5, c))
            elif name.endswith("beta"):
                var.assign(rng.normal(0, 0.3, c))


# ---------------------------------------------------------------- NumPy reference
def _np_v(x, n):
    """Leading n right singular vectors [B, C, n] of x [B, H, W, C]."""
    b, h, w, c = x.shape
    return np.stack([np.linalg.svd(xi.reshape(h * w, c).astype(np.float64), full_matrices=False)[2][:n].T
                     for xi in x])


def _np_teacher(x):
    v = _np_v(x, 1)[:, :, 0]
    sign = np.where(v.max(1) + v.min(1) >= 0, 1.0, -1.0)
    return v * sign[:, None]


def _np_student(x, v_t, rank=4):
    b, h, w, c = x.shape
    v = _np_v(x, min(rank, h * w, c))
    cos = np.einsum("bcr,bc->br", v, v_t)
    j = np.argmax(np.abs(cos), 1)
    return np.stack([v[i, :, j[i]] * np.sign(cos[i, j[i]]) for i in range(b)])


def _np_bn(x, bn, training):
    g, be = bn.gamma.numpy(), bn.beta.numpy()
    if training:
        mean, var = x.mean(axis=tuple(range(x.ndim - 1))), x.var(axis=tuple(range(x.ndim - 1)))
    else:
        mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    return (x - mean) / np.sqrt(var + EPS) * g + be


def _np_heads(att, t_b, t_f, training):
    h = att.num_head
    snd = _np_bn(t_b @ att.Sfc.kernel.numpy(), att.Sbn, training).reshape(len(t_b), -1, h)
    rcv = _np_bn(t_f @ att.Rfc.kernel.numpy(), att.Rbn, training).reshape(len(t_f), -1, h)
    return np.einsum("idh,jdh->hij", snd, rcv)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_kld(x, y):
    lx = np.log(_softmax(x))
    ly = np.log(_softmax(y))
    return float(np.sum(np.exp(lx) * (lx - ly)))


def _np_estimator(est, x_f, heads, noise):
    g = _softmax(heads) * (noise - noise.mean(0, keepdims=True) > 0)
    x = np.maximum(_np_bn(x_f @ est.fc0.kernel.numpy(), est.bn0, True), 0)
    mix = np.einsum("hij,jd->ihd", g, x).reshape(len(x_f), -1)
    out = mix @ est.fc1.kernel.numpy() + est.fc1.bias.numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _np_connect(m, feats):
    out = []
    for k in (1, 2, 3):
        x = feats[k].numpy().astype(np.float64)
        if k in m.connectors:
            conv, bn = m.connectors[k]
            x = np.maximum(_np_bn(x @ conv.kernel.numpy()[0, 0], bn, True), 0)
        out.append(x)
    return out


# ---------------------------------------------------------------- hand cases
def test_embeddings_and_alignment_hand_cases():
    # A rank-1 map x = u v^T with v = (1, 2): HW = 4, C = 2, so V_1 = (1, 2)/sqrt(5)
    # = (0.447214, 0.894427); negating x keeps it (the sign convention max + min >= 0).
    x = np.array([[1, 2], [2, 4], [0, 0], [3, 6]], np.float32).reshape(1, 4, 1, 2)
    for sign in (1.0, -1.0):
        np.testing.assert_allclose(teacher_embedding(sign * x).numpy(), [[0.447214, 0.894427]], atol=1e-5)
    # Align_rsv: columns e1, -e2, e3 against v_t = (0.6, 0.8, 0): cosines 0.6, -0.8, 0, so the
    # second column times sign(-0.8): (0, 1, 0).
    v_s = np.array([[[1, 0, 0], [0, -1, 0], [0, 0, 1]]], np.float32)
    np.testing.assert_allclose(align_rsv(v_s, np.array([[0.6, 0.8, 0.0]], np.float32)).numpy(),
                               [[0.0, 1.0, 0.0]], atol=0)
    # The student keeps 4 vectors: x = 3 u1 e1^T + u2 e2^T (HW = 6, C = 3, u1 _|_ u2 unit) has
    # V = (e1, e2, .); against v_t = -e2 the second one is taken, times sign(-1): -e2.
    u1 = np.array([1, 1, 0, 0, 0, 0], np.float32) / np.sqrt(2)
    u2 = np.array([0, 0, 1, 1, 1, 1], np.float32) / 2
    x = (3 * np.outer(u1, [1, 0, 0]) + np.outer(u2, [0, 1, 0])).reshape(1, 6, 1, 3).astype(np.float32)
    np.testing.assert_allclose(student_embedding(x, np.array([[0.0, -1.0, 0.0]], np.float32)).numpy(),
                               [[0.0, -1.0, 0.0]], atol=1e-5)


def test_graph_kld_hand_case():
    """One head, one row: G_S = (0, 0), G_T = (0, 1). tanh: (0, 0) and (0, t), t = tanh 1 = 0.761594;
    softmax(tanh G_S) = (1/2, 1/2), log softmax(tanh G_T) = (-L, t - L), L = log(1 + e^t) = 1.144760;
    KL = 1/2 (log 1/2 + L) + 1/2 (log 1/2 - t + L) = 0.225807 - 0.154991 = 0.070816."""
    from iepkt_tf.attention_heads import k_bb_term
    got = float(k_bb_term(np.zeros([1, 1, 2], np.float32), np.array([[[0.0, 1.0]]], np.float32)))
    assert got == pytest.approx(0.070816, abs=2e-6)


# ---------------------------------------------------------------- against NumPy
def test_main_loss_matches_numpy():
    student, teacher = _nets()
    m = MHGD(student, teacher, OPTIONS)
    rng = np.random.default_rng(0)
    _randomise_bns(m.attentions + [bn for _, bn in m.connectors.values()], rng)
    for att in m.attentions:  # sharper graphs: a KL far enough from 0 that its direction shows
        att.Sfc.kernel.assign(att.Sfc.kernel * 3.0)
        att.Rfc.kernel.assign(att.Rfc.kernel * 3.0)
    s_out, t_out = _random_sensed(student, rng), _random_sensed(teacher, rng)
    got = float(m.main_losses(s_out, t_out, None, SEED)["mhgd"])

    v_t = [_np_teacher(t_out.feats[k].numpy()) for k in (1, 2, 3)]
    v_s = [_np_student(x, t) for x, t in zip(_np_connect(m, s_out.feats), v_t)]
    ref = rev = 0.0
    for i, att in enumerate(m.attentions, start=1):
        g_t = _np_heads(att, v_t[i], v_t[i - 1], training=False)
        g_s = _np_heads(att, v_s[i], v_s[i - 1], training=False)
        ref += _np_kld(np.tanh(g_s), np.tanh(g_t))
        rev += _np_kld(np.tanh(g_t), np.tanh(g_s))
    # KL(S || T), the student first: the reversed KL differs by more than 3x the tolerance
    assert ref > 0.1 and abs(rev - ref) > 3e-3 * ref
    assert got == pytest.approx(ref, rel=1e-3)


def test_init_loss_matches_numpy_and_trains_only_the_module_state():
    student, teacher = _nets()
    m = MHGD(student, teacher, OPTIONS)
    rng = np.random.default_rng(1)
    t_out = _random_sensed(teacher, rng)
    before = {n: v.numpy().copy() for n, v in m.tf1_variables().items()}
    losses = m.init_losses(None, t_out, SEED)
    assert set(losses) == {"total", "mha_loss"}

    noise = [n.numpy() for n in drop_head_noise(2, 8, 8, SEED)]
    v_t = [_np_teacher(t_out.feats[k].numpy()) for k in (1, 2, 3)]
    ref = 0.0
    for i, (att, est) in enumerate(zip(m.attentions, m.estimators), start=1):
        pre = {n: v for n, v in before.items() if f"/MHA{i}/" in n}
        for n, v in {**att.tf1_variables(), **est.tf1_variables()}.items():  # NumPy reads pre-call BN
            if "moving" in n:
                v.assign(pre[f"Distillation/MHGD/MHA{i}/{n}"])
        heads = _np_heads(att, v_t[i], v_t[i - 1], training=True)
        out = _np_estimator(est, v_t[i - 1], heads, noise[i - 1])
        ref += float(np.mean(1 - np.sum(v_t[i] * out, 1)))
    assert float(losses["total"]) == pytest.approx(ref, rel=1e-4)

    # The call moved the module's BN statistics (training mode) and nothing else.
    m2 = MHGD(student, teacher, OPTIONS)
    snap = {n: v.numpy().copy() for n, v in m2.tf1_variables().items()}
    m2.init_losses(None, t_out, SEED)
    moved = {n for n, v in m2.tf1_variables().items() if not np.array_equal(v.numpy(), snap[n])}
    assert moved == {n for n in snap if "/MHA" in n and "moving" in n}
    # ... and the main phase moves only the connectors' statistics (heads on moving statistics).
    snap = {n: v.numpy().copy() for n, v in m2.tf1_variables().items()}
    m2.main_losses(_random_sensed(student, rng), t_out, None, SEED)
    moved = {n for n, v in m2.tf1_variables().items() if not np.array_equal(v.numpy(), snap[n])}
    assert moved == {n for n in snap if "/Connector" in n and "moving" in n}


def test_drop_head_noise_comes_from_the_seed():
    student, teacher = _nets()
    m = MHGD(student, teacher, OPTIONS)
    t_out = _random_sensed(teacher, np.random.default_rng(2))
    a = float(m.init_losses(None, t_out, SEED)["total"])
    b = float(m.init_losses(None, t_out, SEED)["total"])
    c = float(m.init_losses(None, t_out, SEED + 1)["total"])
    assert a == b and a != c


# ---------------------------------------------------------------- gradients
def _directional_fd(fn, x, d, h):
    return (float(fn(x + h * d)) - float(fn(x - h * d))) / (2 * h)


def test_graph_loss_gradient_matches_finite_differences():
    student, teacher = _nets()
    m = MHGD(student, teacher, OPTIONS)
    rng = np.random.default_rng(3)
    _randomise_bns(m.attentions, rng)
    for att in m.attentions:  # sharper graphs: a loss well above float32 rounding
        att.Sfc.kernel.assign(att.Sfc.kernel * 3.0)
    t_out = _random_sensed(teacher, rng)
    v_t = m.teacher_embeddings(t_out.feats)
    v_s = [tf.constant(np.asarray(v) + rng.normal(0, 0.05, v.shape).astype(np.float32)) for v in v_t]
    with tf.GradientTape() as tape:
        tape.watch(v_s)
        loss = m.graph_loss(v_s, v_t)
    grads = tape.gradient(loss, v_s)
    for k in range(3):
        d = rng.normal(size=v_s[k].shape).astype(np.float32)
        d /= np.linalg.norm(d)

        def f(x, k=k):
            return m.graph_loss([x if j == k else v_s[j] for j in range(3)], v_t)

        fd = _directional_fd(f, v_s[k], d, 1e-2)
        an = float(tf.reduce_sum(grads[k] * d))
        assert abs(an) > 1e-3
        assert an == pytest.approx(fd, rel=2e-2, abs=1e-5)


def test_exact_svd_gradient_through_the_student_maps_matches_finite_differences():
    """Equal widths (no connector): d loss / d student map with mhgd_svd_grad=exact; the published
    gradient (authors) differs from it but points the same way."""
    student, teacher = _nets("WResNet-10-2")
    rng = np.random.default_rng(4)
    t_out = _random_sensed(teacher, rng)
    s_out = _low_rank_sensed(student, rng)
    ms = {g: MHGD(student, teacher, {**OPTIONS, "mhgd_svd_grad": g}) for g in ("exact", "authors")}
    assert ms["exact"].connectors == {}
    for att_e, att_a in zip(ms["exact"].attentions, ms["authors"].attentions):
        for (n, ve), va in zip(att_e.tf1_variables().items(), att_a.tf1_variables().values()):
            ve.assign(ve * 3.0 if n.endswith("Sfc/weights") else ve)
            va.assign(ve)
    grads = {}
    for g, m in ms.items():
        feats = list(s_out.feats)
        with tf.GradientTape() as tape:
            tape.watch(feats[1:])
            loss = m.main_losses(Sensed(s_out.logits, feats), t_out, None, SEED)["mhgd"]
        grads[g] = tape.gradient(loss, feats[1:])
    for k in (1, 2, 3):  # Gram branches x^T x (64x32, 16x64 -> x x^T) and x x^T with all 4 vectors
        # O(1) entries, half random, half along the gradient (a strong signal; a wrong gradient
        # still shows, since the finite difference measures the true slope along d)
        g = grads["exact"][k - 1].numpy()
        d = (0.5 * rng.normal(size=g.shape) + g / np.sqrt(np.mean(g ** 2))).astype(np.float32)

        def f(x, k=k):
            feats = [x if j == k else s_out.feats[j] for j in range(4)]
            return ms["exact"].main_losses(Sensed(s_out.logits, feats), t_out, None, SEED)["mhgd"]

        fd = _directional_fd(f, s_out.feats[k], d, 1e-2)
        an = float(tf.reduce_sum(grads["exact"][k - 1] * d))
        assert abs(an) > 1e-3
        assert an == pytest.approx(fd, rel=5e-2, abs=2e-5)
        ga, ge = grads["authors"][k - 1].numpy().ravel(), grads["exact"][k - 1].numpy().ravel()
        assert np.dot(ga, ge) > 0 and not np.allclose(ga, ge, rtol=0.1)


# ---------------------------------------------------------------- invariances
def test_loss_is_zero_for_the_teachers_maps_and_invariant_to_per_sample_scale():
    student, teacher = _nets("WResNet-10-2")
    m = MHGD(student, teacher, OPTIONS)
    rng = np.random.default_rng(5)
    _randomise_bns(m.attentions, rng)
    t_out, s_out = _random_sensed(teacher, rng), _random_sensed(student, rng)
    assert float(m.main_losses(t_out, t_out, None, SEED)["mhgd"]) == pytest.approx(0.0, abs=1e-5)
    base = float(m.main_losses(s_out, t_out, None, SEED)["mhgd"])
    assert base > 1e-3
    scale = tf.constant(rng.uniform(0.2, 5.0, (8, 1, 1, 1)).astype(np.float32))
    scaled = Sensed(s_out.logits, [f * scale for f in s_out.feats])
    assert float(m.main_losses(scaled, t_out, None, SEED)["mhgd"]) == pytest.approx(base, rel=1e-3)
    t_scaled = Sensed(t_out.logits, [f * scale for f in t_out.feats])
    assert float(m.main_losses(s_out, t_scaled, None, SEED)["mhgd"]) == pytest.approx(base, rel=1e-3)


def test_student_embedding_is_unit_and_aligned():
    rng = np.random.default_rng(6)
    x = np.maximum(rng.normal(0.3, 1, (8, 4, 4, 24)), 0).astype(np.float32)
    v_t = _np_teacher(np.maximum(rng.normal(0.3, 1, (8, 4, 4, 24)), 0))
    v = student_embedding(x, v_t.astype(np.float32)).numpy()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v, _np_student(x, v_t), atol=1e-4)
    assert np.all(np.sum(v * v_t, 1) > 0)


# ---------------------------------------------------------------- the distiller
def test_distiller_phases_variables_and_names():
    student, teacher = _nets()
    m = MHGD(student, teacher, OPTIONS)
    assert (MHGD.name, MHGD.grad_rule, MHGD.default_init_epoch, MHGD.init_trains_student,
            MHGD.needs_pre_relu) == ("MHGD", "clip", 40, False, False)
    assert all(f.name.startswith("mhgd_") for f in MHGD.flags)
    assert m.clip_groups(("mhgd",)) == {"mhgd": ("mhgd",)}
    names = m.tf1_variables()
    assert all(n.startswith("Distillation/MHGD/") for n in names)
    heads = {f"Distillation/MHGD/MHA{i}/{p}" for i in (1, 2) for p in
             [f"Attention/{l}/weights" for l in ("Sfc", "Rfc")]
             + [f"Attention/{l}/{s}" for l in ("Sbn", "Rbn")
                for s in ("gamma", "beta", "moving_mean", "moving_variance")]
             + ["Estimator/fc0/weights", "Estimator/fc1/weights", "Estimator/fc1/biases"]
             + [f"Estimator/bn0/{s}" for s in ("gamma", "beta", "moving_mean", "moving_variance")]}
    conns = {f"Distillation/MHGD/Connector{k}/{p}" for k in (1, 2, 3) for p in
             ("conv/weights", "bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance")}
    assert set(names) == heads | conns
    # shapes: D_l = teacher channels (32, 64, 128); heads width (D_l + D_{l-1})//2 * 8
    assert tuple(names["Distillation/MHGD/MHA1/Attention/Sfc/weights"].shape) == (64, 48 * 8)
    assert tuple(names["Distillation/MHGD/MHA2/Attention/Rfc/weights"].shape) == (64, 96 * 8)
    assert tuple(names["Distillation/MHGD/MHA2/Estimator/fc1/weights"].shape[1:]) == (128,)
    assert tuple(names["Distillation/MHGD/Connector3/conv/weights"].shape) == (1, 1, 64, 128)
    init_ids = {id(v) for v in m.init_variables()}
    main_ids = {id(v) for v in m.main_variables()}
    assert init_ids == {id(names[n]) for n in heads if names[n].trainable}
    assert main_ids == {id(names[n]) for n in conns if names[n].trainable}
    # Never the names of IEP's module over the same networks.
    from iepkt_tf.iep import IEPDistiller
    iep = IEPDistiller(teacher.feature_channels[1:], student.feature_channels[1:])
    assert not set(names) & set(iep.tf1_variables())

    images = tf.random.stateless_normal([8, 16, 16, 3], seed=[1, 2])
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2])
    s_named = {n: v for n, v in student.tf1_variables().items() if v.trainable}
    t_vars = [v for v in teacher.tf1_variables().values() if v.trainable]
    everything = list(s_named.values()) + m.init_variables() + m.main_variables() + t_vars

    def nonzero(g):
        return g is not None and float(tf.reduce_max(tf.abs(g))) > 0

    # initial phase: the teacher alone (its Sensed not stopped here: MHGD must not reach it)
    with tf.GradientTape() as tape:
        t_out = Sensed(*teacher(images, training=False))
        losses = m.init_losses(None, t_out, SEED)
    assert np.isfinite(float(losses["total"])) and float(losses["total"]) > 0
    grads = dict(zip(map(id, everything), tape.gradient(losses["total"], everything)))
    assert all(nonzero(grads[i]) for i in init_ids)
    assert all(grads[id(v)] is None for v in list(s_named.values()) + m.main_variables() + t_vars)

    # main phase
    with tf.GradientTape() as tape:
        t_out = Sensed(*teacher(images, training=False))
        s_out = Sensed(*student(images, training=True))
        losses = m.main_losses(s_out, t_out, labels, SEED)
    assert set(losses) == {"mhgd"} and np.isfinite(float(losses["mhgd"])) and float(losses["mhgd"]) > 0
    grads = dict(zip(map(id, everything), tape.gradient(losses["mhgd"], everything)))
    for n, v in s_named.items():
        if n.startswith("Student/full/"):
            assert grads[id(v)] is None, n
        else:
            assert nonzero(grads[id(v)]), n
    assert all(nonzero(grads[i]) for i in main_ids)
    assert all(grads[id(v)] is None for v in t_vars)
    # (the heads are read in the main phase but are not main_variables: the builder never updates them)
    assert not init_ids & main_ids


def test_bn_connector_option_and_bad_options():
    student, teacher = _nets()
    m = MHGD(student, teacher, {**OPTIONS, "mhgd_connector": "bn"})
    rng = np.random.default_rng(7)
    x = _random_sensed(student, rng)
    assert float(tf.reduce_min(m.connect(x.feats)[0])) < 0  # signed, no ReLU
    with pytest.raises(ValueError, match="mhgd_connector"):
        MHGD(student, teacher, {**OPTIONS, "mhgd_connector": "relu"})
    with pytest.raises(ValueError, match="mhgd_num_head"):
        MHGD(student, teacher, {**OPTIONS, "mhgd_num_head": 1})
