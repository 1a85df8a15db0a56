"""The IEP main step's clipping rules (``--dist_clip``) and adapters (``--adapter``), against
gradients taken by hand. Tiny networks, 16x16 images (no dropout), batch 8."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.distillers.iep import IEP
from iepkt_tf.iep import IEPDistiller
from nets.nets_factory import get_network
from op_util import train_steps as ts
from op_util.clipping import grad_norm
from op_util.optimizer import NesterovMomentum

SIZE, CLASSES = 16, 5


def _setup(student_arch="WResNet-10-1", **kw):
    tf.random.set_seed(0)
    student = get_network(student_arch, CLASSES, "Student", SIZE, True)
    teacher = get_network("WResNet-10-1", CLASSES, "Teacher", SIZE, False)
    dist = IEPDistiller(teacher.feature_channels[1:4], student.feature_channels[1:4], **kw)
    images = tf.random.stateless_normal([8, SIZE, SIZE, 3], seed=[5, 6])
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2], tf.int32)
    feats = [tf.stop_gradient(f) for f in teacher(images, training=False)[1][1:4]]
    for _ in range(2):
        dist.module_losses(feats)  # a non-zero PCA state
    return student, teacher, dist, images, labels


def _run_step(student, teacher, dist, images, labels, clip, warm=0.5):
    method = IEP.over(dist, clip)
    opt = NesterovMomentum(ts.optimizer_variables(student, method))
    step = ts.make_main_step(method, student, teacher, opt, 5e-4)
    return step(images, labels, tf.constant(0.1), tf.constant(warm), ts.step_seed(0, 0))


def _snapshot(student, dist):
    return {n: v.numpy().copy() for n, v in {**student.tf1_variables(), **dist.tf1_variables()}.items()}


def _restore(student, dist, snap):
    for n, v in {**student.tf1_variables(), **dist.tf1_variables()}.items():
        v.assign(snap[n])


def test_one_term_summed_equals_separate():
    student, teacher, dist, images, labels = _setup(use_k_alt=False, use_k_bb=False)
    start = _snapshot(student, dist)
    a = _run_step(student, teacher, dist, images, labels, "separate")
    after_a = _snapshot(student, dist)
    _restore(student, dist, start)
    b = _run_step(student, teacher, dist, images, labels, "summed")
    after_b = _snapshot(student, dist)
    assert float(a["grad_norm/k_int"]) == pytest.approx(float(b["grad_norm/distill"]), rel=1e-6)
    assert any(not np.array_equal(start[n], after_a[n]) for n in start)
    for n in start:
        np.testing.assert_allclose(after_b[n], after_a[n], rtol=1e-6, atol=1e-8, err_msg=n)


def test_summed_clips_the_gradient_of_the_sum_per_variable():
    student, teacher, dist, images, labels = _setup()
    variables = [v for v in student.tf1_variables().values() if v.trainable]
    t_feats = [tf.stop_gradient(f) for f in teacher(images, training=False)[1][1:4]]
    start = _snapshot(student, dist)
    with tf.GradientTape(persistent=True) as tape:
        logits, s_feats = student(images, training=True)
        ce = ts.cross_entropy(logits, labels)
        losses = dist.distill_losses(s_feats[1:4], t_feats)
        total = losses["k_int"] + losses["k_alt"] + losses["k_bb"]
    g_ce, g_d = tape.gradient(ce, variables), tape.gradient(total, variables)
    _restore(student, dist, start)  # the forward above moved the BN statistics
    warm = 0.5
    out = _run_step(student, teacher, dist, images, labels, "summed", warm)
    reached = [(c, d) for c, d in zip(g_ce, g_d) if d is not None]  # not the FC after point 3
    assert 0 < len(reached) < len(variables)
    norms = np.array([float(grad_norm(d)) for _, d in reached])
    bounds = np.array([float(grad_norm(c)) * warm for c, _ in reached])
    assert float(out["grad_norm/distill"]) == pytest.approx(np.sqrt(np.sum(norms ** 2)), rel=1e-4)
    expected = np.sqrt(np.sum(np.minimum(norms, bounds) ** 2))
    assert float(out["grad_norm/distill_clipped"]) == pytest.approx(expected, rel=1e-4)
    assert np.any(norms > bounds) and np.any(norms < bounds)  # both branches of the clip occur
    assert "grad_norm/k_int" not in out and float(out["k_bb"]) == pytest.approx(float(losses["k_bb"]), rel=1e-4)
    with pytest.raises(ValueError, match="dist_clip must be"):
        _run_step(student, teacher, dist, images, labels, "both")


@pytest.mark.parametrize("adapter", ["bn_relu", "bn"])
def test_adapter_output_lives_where_the_teacher_map_does(adapter):
    """bn_relu: the adapted student map is non-negative like the teacher's post-ReLU map; bn is
    signed (zero mean per channel in training mode)."""
    dist = IEPDistiller([16, 32, 64], student_channels=[8, 16, 32], adapter=adapter)
    rng = np.random.default_rng(0)
    s = [tf.constant(np.maximum(rng.normal(size=(8, h, h, c)), 0).astype(np.float32))
         for h, c in ((8, 8), (4, 16), (2, 32))]
    out = dist.adapt(s, training=True)
    for k, x in enumerate(out):
        x = x.numpy()
        assert x.shape[-1] == [16, 32, 64][k]
        if adapter == "bn_relu":
            assert x.min() >= 0 and (x > 0).mean() > 0.3
        else:
            assert x.min() < 0 and np.abs(x.mean(axis=(0, 1, 2))).max() < 1e-4
    with pytest.raises(ValueError, match="adapter must be"):
        IEPDistiller([16, 32], student_channels=[8, 16], adapter="relu6")
