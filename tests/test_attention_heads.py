"""Black-box (MHGD) parity with the authors' code (tests/fixtures/e_mhgd.npz) and invariances."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.attention_heads import AttentionHeads, Estimator, drop_head, est_loss, k_bb_term
from tests.conftest import assert_close, load_fixture

FWD_TOL = 1e-4     # forward values and losses, relative to max|ref| (fixtures README)
STATE_TOL = 1e-3   # state after an update

FIX = load_fixture("e_mhgd.npz")
MODULES = sorted({k.split("/")[0] for k in FIX.files if k.endswith("/heads_train_T")})


def prefix(module):
    return f"Distillation/EKI/EKI_module{module[1:]}/MHA/Attention_Knowledge/"


def build_loaded(module):
    """(AttentionHeads, Estimator) for fixture module ``m{i}``, pre-step variables loaded."""
    t_b, t_f = FIX[f"{module}/in/T_B"], FIX[f"{module}/in/T_F"]
    n_learned = FIX[f"{module}/heads_train_T"].shape[0]
    n_total = FIX[f"{module}/noise"].shape[0]
    att = AttentionHeads((t_f.shape[-1] + t_b.shape[-1]) // 2, n_learned)
    att.build(t_b.shape, t_f.shape)
    est = Estimator(t_b.shape[-1], n_total)
    est.build(t_f.shape)
    for name, var in {**att.tf1_variables(), **est.tf1_variables()}.items():
        var.assign(FIX[prefix(module) + name])
    return att, est


def module_training_step(module, att, est):
    t_b, t_f = FIX[f"{module}/in/T_B"], FIX[f"{module}/in/T_F"]
    heads = att(t_b, t_f, training=True)
    out = est(t_f, heads, FIX[f"{module}/in/extrinsic"], FIX[f"{module}/noise"], training=True)
    return heads, out, est_loss(t_b, out)


def test_fixture_has_modules():
    assert MODULES, "e_mhgd.npz holds no m{i}/heads_train_T keys"


@pytest.mark.parametrize("module", MODULES)
def test_tf1_variable_names_match_fixture(module):
    att, est = build_loaded(module)
    stored = {k[len(prefix(module)):] for k in FIX.files if k.startswith(prefix(module))}
    ours = {**att.tf1_variables(), **est.tf1_variables()}
    assert set(ours) == stored
    assert [k for k in ours if k.endswith("biases")] == ["Estimator/fc1/biases"]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("compiled", [False, True])
def test_module_training_call_and_update(module, compiled):
    att, est = build_loaded(module)
    step = tf.function(lambda: module_training_step(module, att, est)) if compiled else \
        (lambda: module_training_step(module, att, est))
    heads, out, loss = step()
    assert_close(heads, FIX[f"{module}/heads_train_T"], FWD_TOL, "heads_train_T")
    assert_close(out, FIX[f"{module}/est_out"], FWD_TOL, "est_out")
    assert_close(loss, FIX[f"{module}/est_loss"], FWD_TOL, "est_loss")
    np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=-1), 1.0, atol=1e-5)
    moving = {k: v for k, v in {**att.tf1_variables(), **est.tf1_variables()}.items()
              if "moving_" in k}
    assert len(moving) == 6
    for name, var in moving.items():
        ref = FIX["after_update/" + prefix(module) + name]
        assert not np.allclose(ref, FIX[prefix(module) + name]), f"{name}: fixture did not move"
        assert_close(var, ref, STATE_TOL, "after_update/" + name)


@pytest.mark.parametrize("module", MODULES)
def test_inference_heads_and_k_bb(module):
    att, _ = build_loaded(module)
    before = {k: v.numpy() for k, v in att.tf1_variables().items()}
    h_t = att(FIX[f"{module}/in/T_B"], FIX[f"{module}/in/T_F"], training=False)
    h_s = att(FIX[f"{module}/in/S_B"], FIX[f"{module}/in/S_F"], training=False)
    assert_close(h_t, FIX[f"{module}/heads_infer_T"], FWD_TOL, "heads_infer_T")
    assert_close(h_s, FIX[f"{module}/heads_infer_S"], FWD_TOL, "heads_infer_S")
    assert_close(k_bb_term(h_s, h_t), FIX[f"{module}/att_kld"], FWD_TOL, "att_kld")
    # Student first: the reverse direction is a different number.
    assert abs(float(k_bb_term(h_t, h_s)) - float(FIX[f"{module}/att_kld"])) > 1e-6
    for name, var in att.tf1_variables().items():
        np.testing.assert_array_equal(var.numpy(), before[name], err_msg=name)


@pytest.mark.parametrize("module", MODULES)
def test_drop_head_matches_stored_mask(module):
    g_in, noise = FIX[f"{module}/est_G_in"], FIX[f"{module}/noise"]
    dropped = drop_head(tf.constant(g_in), tf.constant(noise)).numpy()
    np.testing.assert_array_equal(dropped, FIX[f"{module}/est_G_dropped"])
    mask = FIX[f"{module}/drop_mask"]
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(dropped, g_in * mask)   # whole rows G[h,i,:] zeroed


def test_extrinsic_head_is_appended_unsoftmaxed_and_gradient_stopped():
    module = MODULES[0]
    att, est = build_loaded(module)
    t_b, t_f = FIX[f"{module}/in/T_B"], FIX[f"{module}/in/T_F"]
    heads = att(t_b, t_f, training=False)
    ext = tf.constant(FIX[f"{module}/in/extrinsic"])
    noise = -np.ones(FIX[f"{module}/noise"].shape, np.float32)
    noise[-1] = noise.shape[0]   # above the per-sample mean only for the extrinsic head
    with tf.GradientTape() as tape:
        tape.watch(ext)
        out = est(t_f, heads, ext, tf.constant(noise), training=False)
    assert tape.gradient(out, ext) is None
    # Only the extrinsic head kept: the mix is ext @ x in the last head block, unsoftmaxed.
    x = tf.nn.relu(est.bn0(est.fc0(t_f), training=False)).numpy()
    mix = np.zeros((x.shape[0], est.num_head * est.width), np.float32)
    mix[:, -est.width:] = FIX[f"{module}/in/extrinsic"] @ x
    ref = mix @ est.fc1.kernel.numpy() + est.fc1.bias.numpy()
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("module", MODULES)
def test_est_loss_gradients_and_receiver_shift_invariance(module):
    """d est_loss / d Rbn/beta is zero in exact arithmetic: a shift of the receiver adds a term
    constant along the softmax axis of every head. Sbn/beta has no such invariance."""
    att, est = build_loaded(module)
    vars_ = {**att.tf1_variables(), **est.tf1_variables()}
    trainable = {k: v for k, v in vars_.items() if "moving_" not in k}
    with tf.GradientTape() as tape:
        _, _, loss = module_training_step(module, att, est)
    grads = dict(zip(trainable, tape.gradient(loss, list(trainable.values()))))
    for name, g in grads.items():
        assert g is not None and np.all(np.isfinite(g.numpy())), name
    assert np.max(np.abs(grads["Attention/Rbn/beta"].numpy())) < 1e-6
    for name in ("Attention/Sbn/beta", "Attention/Rbn/gamma", "Attention/Rfc/weights",
                 "Estimator/fc1/biases", "Estimator/fc0/weights"):
        assert np.max(np.abs(grads[name].numpy())) > 1e-4, name


def test_est_loss_uses_unnormalised_target():
    t_b = tf.constant([[2.0, 0.0], [0.0, 1.0]])
    out = tf.constant([[1.0, 0.0], [0.6, 0.8]])
    assert float(est_loss(t_b, out)) == pytest.approx(((1 - 2.0) + (1 - 0.8)) / 2)


def test_heads_layout_head_index_fastest():
    att = AttentionHeads(D=2, num_head=3)
    t = tf.constant(np.random.RandomState(0).rand(4, 5).astype(np.float32))
    heads = att(t, t, training=False).numpy()
    s = (t.numpy() @ att.Sfc.kernel.numpy())        # BN at init statistics: y = x / sqrt(1+eps)
    r = (t.numpy() @ att.Rfc.kernel.numpy())
    s, r = s.reshape(4, 2, 3) / np.sqrt(1 + 1e-5), r.reshape(4, 2, 3) / np.sqrt(1 + 1e-5)
    np.testing.assert_allclose(heads, np.einsum("idh,jdh->hij", s, r), rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    module = MODULES[0]
    att, est = build_loaded(module)
    heads = att(FIX[f"{module}/in/T_B"], FIX[f"{module}/in/T_F"], training=False)
    with pytest.raises(ValueError, match="heads in total"):
        est(FIX[f"{module}/in/T_F"], heads, None, None, training=True)
    with pytest.raises(ValueError, match="positive"):
        AttentionHeads(0)
    noise = FIX[f"{module}/noise"]
    with pytest.raises(ValueError, match="noise must be"):
        drop_head(tf.ones([noise.shape[0], 4, 4]), noise[..., 0])
