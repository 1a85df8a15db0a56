"""MPNN parity with the authors' code (tests/fixtures/d_mpnn.npz) and its structural properties."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.kld import kld_loss
from iepkt_tf.mpnn import MPNN, message_l1
from tests.conftest import assert_close, load_fixture

FWD_TOL = 1e-4     # forward values and losses, relative to max|ref| (fixtures README)
STATE_TOL = 1e-3   # state after an update

FIX = load_fixture("d_mpnn.npz")
MODULES = sorted(k.split("/")[0] for k in FIX.files if k.endswith("/D") and k.count("/") == 1)


def prefix(module):
    return f"Distillation/EKI/EKI_module{module[1:]}/MPNN/MPNN/"


def build_loaded(module, num_iter=2):
    """An MPNN for fixture module ``m{i}`` with the stored pre-step variables loaded."""
    D = int(FIX[f"{module}/D"])
    net = MPNN(D, num_iter=num_iter)
    net.build(FIX[f"{module}/in/T_B"].shape, FIX[f"{module}/in/T_F"].shape)
    for name, var in net.tf1_variables().items():
        var.assign(FIX[prefix(module) + name])
    return net


def inputs(module, who="T"):
    return FIX[f"{module}/in/{who}_B"], FIX[f"{module}/in/{who}_F"]


def test_fixture_has_modules():
    assert MODULES, "d_mpnn.npz holds no m{i}/D keys"


@pytest.mark.parametrize("module", MODULES)
def test_tf1_variable_names_match_fixture(module):
    net = build_loaded(module)
    stored = {k[len(prefix(module)):] for k in FIX.files if k.startswith(prefix(module))}
    assert set(net.tf1_variables()) == stored
    for name, var in net.tf1_variables().items():
        assert tuple(var.shape) == FIX[prefix(module) + name].shape, name


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("compiled", [False, True])
def test_training_call_and_update(module, compiled):
    net = build_loaded(module)
    x_b, x_f = inputs(module)
    call = tf.function(lambda b, f: net(b, f, training=True)) if compiled else \
        (lambda b, f: net(b, f, training=True))
    R, M, E0 = call(tf.constant(x_b), tf.constant(x_f))
    assert_close(R, FIX[f"{module}/train/R"], FWD_TOL, "train/R")
    assert_close(M, FIX[f"{module}/train/M"], FWD_TOL, "train/M")
    assert_close(E0, FIX[f"{module}/train/E0"], FWD_TOL, "train/E0")
    # Moving statistics after the step: Ebn unbiased, Mbn/Gbn from iteration 0 only, biased.
    moving = {k: v for k, v in net.tf1_variables().items() if "moving_" in k}
    assert len(moving) == 6
    for name, var in moving.items():
        ref = FIX["after_update/" + prefix(module) + name]
        assert not np.allclose(ref, FIX[prefix(module) + name]), f"{name}: fixture did not move"
        assert_close(var, ref, STATE_TOL, "after_update/" + name)
    # The update does not feed back into a training call: the same inputs give the same outputs.
    R2, M2, _ = call(tf.constant(x_b), tf.constant(x_f))
    np.testing.assert_array_equal(R2.numpy(), R.numpy())
    np.testing.assert_array_equal(M2.numpy(), M.numpy())


@pytest.mark.parametrize("module", MODULES)
def test_inference_calls_and_losses(module):
    net = build_loaded(module)
    before = {k: v.numpy() for k, v in net.tf1_variables().items()}
    R_T, M_T, E0_T = net(*inputs(module, "T"), training=False)
    R_S, M_S, E0_S = net(*inputs(module, "S"), training=False)
    for who, (R, M, E0) in {"T": (R_T, M_T, E0_T), "S": (R_S, M_S, E0_S)}.items():
        assert_close(R, FIX[f"{module}/infer_{who}/R"], FWD_TOL, f"infer_{who}/R")
        assert_close(M, FIX[f"{module}/infer_{who}/M"], FWD_TOL, f"infer_{who}/M")
        assert_close(E0, FIX[f"{module}/infer_{who}/E0"], FWD_TOL, f"infer_{who}/E0")
    for name, var in net.tf1_variables().items():   # inference never updates
        np.testing.assert_array_equal(var.numpy(), before[name], err_msg=name)
    assert_close(message_l1(M_S, M_T), FIX[f"{module}/msg_l1"], FWD_TOL, "msg_l1")
    assert_close(kld_loss(R_T, R_S), FIX[f"{module}/graph_kld"], FWD_TOL, "graph_kld")
    R_train, _, _ = net(*inputs(module, "T"), training=True)
    assert_close(kld_loss(FIX[f"{module}/train_kld_target_G"], R_train),
                 FIX[f"{module}/train_kld"], FWD_TOL, "train_kld")


def test_message_l1_definition():
    m_s = tf.constant([[[1.0, -2.0], [0.0, 0.0]], [[0.5, 0.5], [3.0, 1.0]]])
    m_t = tf.zeros_like(m_s)
    # per pair sum_c |diff|: 3, 0, 1, 4 -> mean 2
    assert float(message_l1(m_s, m_t)) == pytest.approx(2.0)


@pytest.mark.parametrize("training", [True, False])
def test_batch_permutation_permutes_graph_and_messages(training):
    module = MODULES[0]
    x_b, x_f = inputs(module)
    perm = np.random.RandomState(3).permutation(x_b.shape[0])
    net = build_loaded(module)
    R, M, E0 = net(x_b, x_f, training=training)
    net = build_loaded(module)   # same starting statistics for the permuted call
    Rp, Mp, E0p = net(x_b[perm], x_f[perm], training=training)
    ix = np.ix_(perm, perm)
    np.testing.assert_allclose(Rp.numpy(), R.numpy()[ix], rtol=0, atol=1e-5)
    np.testing.assert_allclose(Mp.numpy(), M.numpy()[ix], rtol=0, atol=1e-5)
    np.testing.assert_allclose(E0p.numpy(), E0.numpy()[ix], rtol=0, atol=1e-5)
    # A graph: symmetric edges start symmetric and stay symmetric (H is antisymmetric but only
    # enters the message through the FC, so R need not be symmetric; E0 must be).
    np.testing.assert_allclose(E0.numpy(), np.swapaxes(E0.numpy(), 0, 1), atol=1e-6)


@pytest.mark.parametrize("num_iter", [1, 3])
@pytest.mark.parametrize("training", [True, False])
def test_num_iter_ablation(num_iter, training):
    """Weights are shared across iterations, so the first k message blocks do not depend on how
    many iterations follow: num_iter=1 (3) reproduces the first 1 (2) blocks of num_iter=2."""
    module = MODULES[0]
    D = int(FIX[f"{module}/D"])
    x_b, x_f = inputs(module)
    B = x_b.shape[0]
    R2, M2, _ = build_loaded(module, 2)(x_b, x_f, training=training)
    R, M, E0 = build_loaded(module, num_iter)(x_b, x_f, training=training)
    assert R.shape == (B, B) and E0.shape == (B, B, D)
    assert M.shape == (B, B, num_iter * D)
    k = min(num_iter, 2) * D
    np.testing.assert_allclose(M.numpy()[..., :k], M2.numpy()[..., :k], rtol=0, atol=1e-5)
    # R is the channel mean of E0 plus all messages.
    expect = np.mean(E0.numpy() + M.numpy().reshape(B, B, num_iter, D).sum(2), -1)
    np.testing.assert_allclose(R.numpy(), expect, rtol=0, atol=1e-5)
    assert not np.allclose(R.numpy(), R2.numpy(), atol=1e-4)


def test_gradients_reach_inputs_and_weights():
    module = MODULES[0]
    net = build_loaded(module)
    x_b, x_f = (tf.constant(a) for a in inputs(module, "S"))
    with tf.GradientTape() as tape:
        tape.watch([x_b, x_f])
        R, M, _ = net(x_b, x_f, training=True)
        loss = kld_loss(FIX[f"{module}/train_kld_target_G"], R) + tf.reduce_mean(M)
    grads = tape.gradient(loss, [x_b, x_f] + net.trainable_variables)
    assert len(net.trainable_variables) == 9  # 3 FC weights + 3 x (gamma, beta)
    for g in grads:
        assert g is not None and np.all(np.isfinite(g.numpy()))
        assert np.max(np.abs(g.numpy())) > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_iter"):
        MPNN(8, num_iter=0)
    with pytest.raises(ValueError, match="D must be"):
        MPNN(0)
    net = MPNN(4)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        net(tf.zeros([2, 3, 4]), tf.zeros([2, 3, 4]))
