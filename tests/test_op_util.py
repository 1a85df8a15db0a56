"""op_util: TF1 Nesterov momentum, weight decay, schedules, clipping, loss scale."""
import math

import numpy as np
import pytest
import tensorflow as tf

from op_util.clipping import clip_with_norms, grad_norm
from op_util.optimizer import (DynamicLossScale, NesterovMomentum, global_norm, is_decayed,
                               module_l2_loss, norm_of_norms,
                               weight_decay_grads, weight_decay_loss)
from op_util.schedules import learning_rate, warmup


# ---------------------------------------------------------------- Nesterov momentum (TF1 semantics)

def test_nesterov_matches_tf1_apply_momentum_kernel_on_toy_problem():
    """Least squares, 6 steps: our update equals TF1's own ApplyMomentum(use_nesterov=True) kernel."""
    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=(10, 4)), tf.float32)
    b = tf.constant(rng.normal(size=(10, 1)), tf.float32)
    w0 = rng.normal(size=(4, 1)).astype(np.float32)
    bias0 = rng.normal(size=(1,)).astype(np.float32)
    ours = [tf.Variable(w0), tf.Variable(bias0)]
    ref = [tf.Variable(w0), tf.Variable(bias0)]
    ref_acc = [tf.Variable(tf.zeros_like(v)) for v in ref]
    opt = NesterovMomentum({"toy/weights": ours[0], "toy/biases": ours[1]}, momentum=0.9)

    def grads(vs):
        with tf.GradientTape() as tape:
            loss = 0.5 * tf.reduce_sum(tf.square(a @ vs[0] + vs[1] - b))
        return tape.gradient(loss, vs)

    step = tf.function(lambda lr: opt.apply(grads(ours), ours, lr))
    for i, lr in enumerate([0.1, 0.1, 0.05, 0.05, 0.01, 0.01]):
        step(tf.constant(lr * 0.1, tf.float32))
        for v, acc, g in zip(ref, ref_acc, grads(ref)):
            tf.raw_ops.ResourceApplyMomentum(var=v.handle, accum=acc.handle,
                                             lr=tf.constant(lr * 0.1, tf.float32), grad=g,
                                             momentum=tf.constant(0.9, tf.float32),
                                             use_nesterov=True)
        for v, r in zip(ours, ref):
            np.testing.assert_allclose(v.numpy(), r.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(opt.slot(ours[0]).numpy(), ref_acc[0].numpy(), rtol=1e-6)
    assert int(opt.iterations.numpy()) == 6
    # the loss went down (a sanity check that the sign of the update is right)
    l0 = 0.5 * np.sum((a.numpy() @ w0 + bias0 - b.numpy()) ** 2)
    l1 = 0.5 * np.sum((a.numpy() @ ours[0].numpy() + ours[1].numpy() - b.numpy()) ** 2)
    assert l1 < 0.5 * l0


def test_nesterov_hand_computation():
    """accum = m*accum + g; var -= lr*g + lr*m*accum, by hand for two steps."""
    v = tf.Variable([1.0, -2.0])
    opt = NesterovMomentum([v], momentum=0.9)
    opt.apply([tf.constant([0.5, 1.0])], [v], 0.1)
    # accum = [0.5, 1]; var = [1 - 0.05 - 0.045, -2 - 0.1 - 0.09]
    np.testing.assert_allclose(v.numpy(), [0.905, -2.19], rtol=1e-6)
    opt.apply([tf.constant([-1.0, 2.0])], [v], 0.2)
    # accum = [0.45 - 1, 0.9 + 2] = [-0.55, 2.9]; var -= 0.2*g + 0.2*0.9*accum
    np.testing.assert_allclose(opt.slot(v).numpy(), [-0.55, 2.9], rtol=1e-6)
    np.testing.assert_allclose(v.numpy(), [0.905 + 0.2 + 0.099, -2.19 - 0.4 - 0.522], rtol=1e-6)


def test_nesterov_skips_none_and_rejects_unknown_variables():
    v1, v2 = tf.Variable([1.0]), tf.Variable([2.0])
    opt = NesterovMomentum({"a/weights": v1, "b/weights": v2})
    opt.apply([None, tf.constant([1.0])], [v1, v2], 1.0)
    assert v1.numpy()[0] == 1.0 and opt.slot(v1).numpy()[0] == 0.0
    assert v2.numpy()[0] == pytest.approx(2.0 - 1.0 - 0.9)
    with pytest.raises(ValueError, match="not given to the optimiser"):
        opt.apply([tf.constant([1.0])], [tf.Variable([0.0])], 1.0)
    with pytest.raises(ValueError, match="2 gradients for 1 variables"):
        opt.apply([None, None], [v1], 1.0)
    with pytest.raises(ValueError, match="duplicate"):
        NesterovMomentum([tf.Variable([0.0], name="same"), tf.Variable([0.0], name="same")])


def test_nesterov_slots_checkpoint_round_trip(tmp_path):
    v = tf.Variable([1.0, 2.0])
    opt = NesterovMomentum({"net/conv0/weights": v})
    opt.apply([tf.constant([1.0, -1.0])], [v], 0.1)
    path = tf.train.Checkpoint(opt=opt).write(str(tmp_path / "ck"))
    keys = [k for k, _ in tf.train.list_variables(path)]
    assert any("Momentum" in k for k in keys), keys
    v2 = tf.Variable([0.0, 0.0])
    opt2 = NesterovMomentum({"net/conv0/weights": v2})
    tf.train.Checkpoint(opt=opt2).read(path).assert_consumed()
    np.testing.assert_array_equal(opt2.slot(v2).numpy(), opt.slot(v).numpy())
    assert int(opt2.iterations.numpy()) == 1


# ---------------------------------------------------------------- weight decay

def test_weight_decay_selection_by_name():
    names = ["Student/conv0/weights", "Student/full/weights", "Student/full/biases",
             "Student/bn0/gamma", "Student/bn0/beta", "Student/bn0/moving_mean",
             "Student/bn0/moving_variance"]
    assert [is_decayed(n) for n in names] == [True, True, False, True, True, False, False]
    vs = [tf.Variable(np.full([2], i + 1.0, np.float32)) for i in range(len(names))]
    g = weight_decay_grads(vs, names, 5e-4)
    for gi, n, v in zip(g, names, vs):
        if is_decayed(n):
            np.testing.assert_allclose(gi.numpy(), 5e-4 * v.numpy())
        else:
            assert gi is None
    # the logged loss is the authors' l2_regularizer: wd * sum(w^2) / 2 over the decayed ones
    expect = 0.5 * 5e-4 * sum(np.sum(v.numpy() ** 2) for v, n in zip(vs, names) if is_decayed(n))
    assert float(weight_decay_loss(vs, names, 5e-4)) == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ValueError, match="7 variables but 1 names"):
        weight_decay_grads(vs, names[:1], 5e-4)


def test_module_l2_is_mhgd_penalty_including_biases():
    names = ["Distillation/EKI/m/Estimator/fc1/weights", "Distillation/EKI/m/Estimator/fc1/biases",
             "Distillation/EKI/m/Estimator/bn0/gamma", "Distillation/EKI/m/Estimator/bn0/beta",
             "Distillation/EKI/m/PCA_Graph/Incremental_PCA/M"]
    vs = [tf.Variable([1.0, 2.0]), tf.Variable([3.0]), tf.Variable([0.5]), tf.Variable([-1.0]),
          tf.Variable([7.0])]
    with tf.GradientTape() as tape:
        loss = module_l2_loss(vs, names, 5e-4)
    assert float(loss) == pytest.approx(5e-4 * (1 + 4 + 9 + 0.25 + 1), rel=1e-6)
    grads = tape.gradient(loss, vs)
    for g, v in zip(grads[:4], vs[:4]):
        np.testing.assert_allclose(g.numpy(), 2 * 5e-4 * v.numpy(), rtol=1e-6)
    assert grads[4] is None


# ---------------------------------------------------------------- schedules

def test_learning_rate_boundaries_with_init_phase():
    ie, te = 20, 100
    assert learning_rate(0, ie, te) == pytest.approx(0.1)
    assert learning_rate(19, ie, te) == pytest.approx(0.1)
    assert learning_rate(49, ie, te) == pytest.approx(0.1)
    assert learning_rate(50, ie, te) == pytest.approx(0.02)
    assert learning_rate(79, ie, te) == pytest.approx(0.02)
    assert learning_rate(80, ie, te) == pytest.approx(0.004)
    assert learning_rate(99, ie, te) == pytest.approx(0.004)
    assert learning_rate(100, ie, te) == pytest.approx(0.0008)


def test_learning_rate_plain_and_int_truncation():
    assert learning_rate(29, 0, 100) == pytest.approx(0.1)
    assert learning_rate(30, 0, 100) == pytest.approx(0.02)
    # int(te * dp) truncates: te = 7 -> thresholds 2, 4, 5
    assert [round(learning_rate(e, 0, 7, base=1.0), 6) for e in range(7)] == \
        [1.0, 1.0, 0.2, 0.2, 0.04, 0.008, 0.008]
    with pytest.raises(ValueError, match="train_epoch"):
        learning_rate(0, 0, -1)


def test_warmup_values():
    assert warmup(20, 20) == pytest.approx(0.5)
    assert warmup(21, 20) == pytest.approx(1 / (1 + math.exp(-1)))
    assert warmup(0, 0) == pytest.approx(0.5)
    assert warmup(10, 20) == pytest.approx(1 / (1 + math.exp(10)))
    assert warmup(20 + 18, 20) < 1.0            # sigmoid(18) = 1 - 1.5e-8
    assert warmup(20 + 19, 20) == 1.0           # > 1 - 1e-8 -> exactly 1
    assert warmup(1000, 0) == 1.0 and warmup(-1000, 0) == 0.0
    vals = [warmup(e, 5) for e in range(30)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


# ---------------------------------------------------------------- clipping

def _clip(g_d, g_ce, warm, unreached="warm"):
    """One variable through the step's rule: ``clip_with_norms`` against ``||g_ce||``."""
    return clip_with_norms(g_d, None if g_ce is None else grad_norm(g_ce), warm, unreached)[0]


def test_clip_per_variable_bound_and_tf_clip_by_norm_equivalence():
    rng = np.random.default_rng(1)
    shapes = [(3, 3, 4, 8), (8,), (8, 10)]
    g_ce = [tf.constant(rng.normal(size=s) * 0.1, tf.float32) for s in shapes]
    g_d = [tf.constant(rng.normal(size=s) * sc, tf.float32) for s, sc in zip(shapes, [10, 1e-4, 1])]
    warm = 0.7
    clipped = [_clip(d, r, warm) for d, r in zip(g_d, g_ce)]
    for c, d, r in zip(clipped, g_d, g_ce):
        bound = np.linalg.norm(r.numpy()) * warm
        assert np.linalg.norm(c.numpy()) <= bound * (1 + 1e-5)
        np.testing.assert_allclose(c.numpy(), tf.clip_by_norm(d, bound).numpy(), rtol=1e-6)
        # direction preserved
        cos = np.sum(c.numpy() * d.numpy()) / np.linalg.norm(c.numpy()) / np.linalg.norm(d.numpy())
        assert cos == pytest.approx(1.0, abs=1e-5)
    # the small one (1e-4 scale) was under its bound and is unchanged (up to g * b / b rounding)
    np.testing.assert_allclose(clipped[1].numpy(), g_d[1].numpy(), rtol=1e-6)
    # the big one was clipped exactly to the bound
    assert np.linalg.norm(clipped[0].numpy()) == pytest.approx(
        np.linalg.norm(g_ce[0].numpy()) * warm, rel=1e-5)


def test_clip_none_and_zero_handling():
    g = tf.constant([3.0, 4.0])
    assert clip_with_norms(None, grad_norm(g), 1.0) == (None, None, None)
    # a variable the cross-entropy does not reach (adapter): warm-up scaled, not clipped
    np.testing.assert_allclose(_clip(g, None, 0.5).numpy(), [1.5, 2.0])
    assert _clip(g, None, 0.5, unreached="drop") is None
    # zero reference -> zero (tf.clip_by_norm would give NaN when both are zero)
    z = tf.zeros([2])
    np.testing.assert_array_equal(_clip(z, z, 1.0).numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(_clip(g, z, 1.0).numpy(), [0.0, 0.0])
    with pytest.raises(ValueError, match="unreached"):
        _clip(g, None, 1.0, unreached="bogus")
    # the norms it returns: before and after clipping
    _, norm, clipped_norm = clip_with_norms(g, tf.constant(2.0), 1.0)
    assert float(norm) == pytest.approx(5.0) and float(clipped_norm) == pytest.approx(2.0)


def test_clip_with_norms_reports_the_norms_it_used():
    """The logged norms come from the clipping's own per-variable norms (no second pass): they
    must be the norms of the gradients before and after clipping, and combine to global_norm."""
    rng = np.random.default_rng(3)
    g_d = [tf.constant(rng.normal(size=s).astype(np.float32) * m) for s, m in [((3, 3, 4, 8), 5.0),
                                                                                ((8,), 0.01)]]
    g_ce = [tf.constant(rng.normal(size=g.shape).astype(np.float32)) for g in g_d]
    outs = [clip_with_norms(d, grad_norm(c), 0.5) for d, c in zip(g_d, g_ce)]
    for (clipped, norm, clipped_norm), d, c in zip(outs, g_d, g_ce):
        np.testing.assert_allclose(norm.numpy(), np.linalg.norm(d.numpy()), rtol=1e-6)
        np.testing.assert_allclose(clipped_norm.numpy(), np.linalg.norm(clipped.numpy()), rtol=1e-5)
        assert clipped_norm.numpy() <= 0.5 * np.linalg.norm(c.numpy()) * (1 + 1e-6)
    assert np.array_equal(outs[1][0].numpy(), g_d[1].numpy())      # within the bound: unchanged
    np.testing.assert_allclose(norm_of_norms([o[2] for o in outs] + [None]).numpy(),
                               global_norm([o[0] for o in outs]).numpy(), rtol=1e-6)
    clipped, norm, clipped_norm = clip_with_norms(g_d[1], None, 0.5)   # unreached: warm-scaled
    np.testing.assert_allclose(clipped_norm.numpy(), 0.5 * norm.numpy(), rtol=1e-6)
    assert clip_with_norms(None, grad_norm(g_ce[0]), 0.5) == (None, None, None)
    assert float(norm_of_norms([None])) == 0.0


# ---------------------------------------------------------------- dynamic loss scale

def test_dynamic_loss_scale_skips_nonfinite_and_grows():
    v = tf.Variable([1.0])
    opt = NesterovMomentum([v])
    ls = DynamicLossScale(initial_scale=8.0, growth_interval=3)
    assert float(ls.scale_loss(tf.constant(2.0))) == 16.0
    np.testing.assert_allclose(ls.unscale([tf.constant([8.0])])[0].numpy(), [1.0])
    applied = ls.apply(opt, [tf.constant([np.inf])], [v], 0.1)
    assert not bool(applied) and v.numpy()[0] == 1.0 and float(ls.scale) == 4.0
    assert float(opt.slot(v).numpy()[0]) == 0.0 and int(opt.iterations.numpy()) == 0
    step = tf.function(lambda g: ls.apply(opt, [g], [v], 0.1))
    for i in range(3):
        assert bool(step(tf.constant([0.1])))
    assert float(ls.scale) == 8.0 and int(ls.good_steps.numpy()) == 0
    assert v.numpy()[0] < 1.0
    for _ in range(20):
        ls.apply(opt, [tf.constant([np.nan])], [v], 0.1)
    assert float(ls.scale) == 1.0  # never below 1


# ---------------------------------------------------------------- a compiled step, by hand

def test_plain_step_is_ce_gradient_plus_decay_with_nesterov():
    """One main-step update of ``--Distillation None`` equals the hand-made TF1 update: g = dCE/dv + wd*v on weights,
    gamma and beta (not on the FC bias), accum = g, v -= lr*g + lr*0.9*accum."""
    from nets.nets_factory import get_network
    from iepkt_tf.distillers import build
    from op_util.train_steps import make_main_step, step_seed, trainable_named

    net = get_network("WResNet-10-1", 5, "Student", (16, 16), is_main=True)  # 16x16: no dropout
    names, variables = trainable_named(net.tf1_variables())
    opt = NesterovMomentum(dict(zip(names, variables)))
    images = tf.random.stateless_normal([8, 16, 16, 3], seed=[1, 2])
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2], tf.int32)
    bias = variables[names.index("Student/full/biases")]
    bias.assign(np.linspace(-1.0, 1.0, 5).astype(np.float32))  # non-zero: decay would show
    before = [v.numpy().copy() for v in variables]
    with tf.GradientTape() as tape:
        logits, _ = net(images, training=True)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    g_ce = tape.gradient(ce, variables)  # (this pass moved only the BN moving statistics)
    wd, lr = 5e-4, 0.05
    out = make_main_step(build("None", net, None), net, None, opt, wd)(
        images, labels, tf.constant(lr), tf.constant(1.0), step_seed(0, 0))
    assert float(out["cross_entropy"]) == pytest.approx(float(ce), rel=1e-5)
    for n, v, b, g in zip(names, variables, before, g_ce):
        g = g.numpy() + (wd * b if is_decayed(n) else 0.0)
        np.testing.assert_allclose(v.numpy(), b - lr * g - lr * 0.9 * g, rtol=1e-4, atol=1e-7,
                                   err_msg=n)
    assert "Student/full/biases" in names and not is_decayed("Student/full/biases")
