"""First PCA (SVP.SVD_eid + EKI sign), plane mapping and the authors' KL against the fixtures
a, b, f, c, plus gradient checks against float64 finite differences."""
import json

import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.kld import kld_loss
from iepkt_tf.plane_mapping import plane_mapping
from iepkt_tf.stacked_pca import (branch_of, first_pca, leading_eigenvector, project_student,
                                  svd_eid)
from tests.conftest import assert_close, load_fixture



A = load_fixture("a_svd_eid.npz")
A_CASES = [name for name, _ in json.loads(str(A["__meta__"]))["cases"]]


@pytest.mark.parametrize("case", A_CASES)
def test_svd_eid_matches_fixture_a(case):
    x = tf.constant(A[f"{case}/x"])
    b, h, w, c = x.shape
    branch = branch_of(h * w, c)
    assert branch == str(A[f"{case}/branch"])
    modes = ["stop", "override"] if branch == "svd" else ["stop"]
    for mode in modes:
        with tf.GradientTape() as tape:
            tape.watch(x)
            s, u, v = svd_eid(x, 1, near_square_grad=mode)
            loss = tf.reduce_sum(u * A[f"{case}/gU"]) + tf.reduce_sum(v * A[f"{case}/gV"])
        dx = tape.gradient(loss, x)
        assert_close(s, A[f"{case}/s"], 1e-6, what="s")
        # The sign of a singular pair is the decomposition's choice: align per sample.
        sign = np.sign(np.sum(v.numpy() * A[f"{case}/V"], axis=(1, 2)))
        assert np.all(sign != 0)
        assert_close(u.numpy() * sign[:, None, None], A[f"{case}/U"], 1e-4, what="U")
        assert_close(v.numpy() * sign[:, None, None], A[f"{case}/V"], 1e-4, what="V")
        if branch == "svd" and mode == "stop":
            assert dx is None and bool(A[f"{case}/dx_is_none"])
            continue
        ref = A[f"{case}/dx_at_stop_gradient"] if branch == "svd" else A[f"{case}/dx"]
        assert_close(dx.numpy().reshape(b, -1) * sign[:, None], ref.reshape(b, -1), 1e-3, what="dx")


def test_branch_of_edges():
    assert branch_of(16, 16) == "svd"
    assert branch_of(24, 16) == "gram_xtx"      # HW/C = 3/2 exactly: not strictly inside
    assert branch_of(16, 24) == "gram_xxt"      # HW/C = 2/3 exactly
    assert branch_of(23, 16) == "svd"
    assert branch_of(1024, 64) == "gram_xtx" and branch_of(64, 256) == "gram_xxt"


def _numpy_loss(x, w_u, w_v):
    """Sign-invariant loss of the leading singular vectors, float64 NumPy."""
    out = 0.0
    for xb, wu, wv in zip(x, w_u, w_v):
        uu, _, vt = np.linalg.svd(xb, full_matrices=False)
        out += (wu @ uu[:, 0]) ** 2 + (wv @ vt[0]) ** 2
    return out


def _fd_grad(x, w_u, w_v, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (_numpy_loss(x + e, w_u, w_v) - _numpy_loss(x - e, w_u, w_v)) / (2 * h)
    return g


def _tf_grad(x, w_u, w_v, **kw):
    xt = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        _, u, v = svd_eid(xt, 1, **kw)
        loss = tf.reduce_sum(tf.square(tf.reduce_sum(u[..., 0] * w_u, 1))) + \
            tf.reduce_sum(tf.square(tf.reduce_sum(v[..., 0] * w_v, 1)))
    g = tape.gradient(loss, xt)
    return None if g is None else g.numpy().astype(np.float64)


@pytest.mark.parametrize("hw,c", [(12, 5), (4, 11)])
def test_gram_gradients_against_finite_differences(hw, c):
    """Both Gram branches, a spectrum with clear gaps: ``grad="exact"`` is the derivative; the
    authors' ``right_grad`` (C <= HW) is exactly twice it (only ``dV`` is used, so the U part of
    the loss contributes nothing)."""
    assert branch_of(hw, c) == ("gram_xtx" if c <= hw else "gram_xxt")
    rng = np.random.default_rng(3)
    x = rng.uniform(0.0, 1.0, (2, hw, c)).astype(np.float32).astype(np.float64)
    w_u = rng.normal(size=(2, hw))
    w_v = rng.normal(size=(2, c))
    fd = _fd_grad(x, w_u, w_v)
    assert_close(_tf_grad(x, w_u, w_v, grad="exact"), fd, 1e-3, what="exact vs finite differences")
    fd_v = _fd_grad(x, np.zeros_like(w_u), w_v)
    authors = _tf_grad(x, np.zeros_like(w_u), w_v, grad="authors")
    if c <= hw:
        assert_close(authors, 2.0 * fd_v, 1e-3, what="authors right_grad vs 2 x derivative")
    else:  # left_grad is not proportional to the derivative (documented in stacked_pca)
        assert np.abs(authors - fd_v).max() > 1e-2 * np.abs(fd_v).max()
    # dU is ignored by the authors' gradient.
    assert np.abs(_tf_grad(x, w_u, np.zeros_like(w_v), grad="authors")).max() == 0.0


def test_near_square_gradient_options():
    rng = np.random.default_rng(4)
    x = rng.uniform(0.0, 1.0, (2, 4, 4, 16)).astype(np.float32)
    assert branch_of(16, 16) == "svd"
    w_u, w_v = rng.normal(size=(2, 16)), rng.normal(size=(2, 16))
    assert _tf_grad(x, w_u, w_v, near_square_grad="stop") is None     # the authors: stop_gradient
    true = _tf_grad(x, w_u, w_v, near_square_grad="true")
    fd = _fd_grad(x.reshape(2, 16, 16).astype(np.float64), w_u, w_v).reshape(x.shape)
    assert_close(true, fd, 1e-3, what="TF SVD gradient vs finite differences")
    exact = _tf_grad(x, w_u, w_v, near_square_grad="override", grad="exact")
    assert_close(exact, fd, 1e-3, what="override+exact vs finite differences")
    with pytest.raises(ValueError, match="near_square_grad"):
        svd_eid(x, near_square_grad="sometimes")
    with pytest.raises(ValueError, match="grad"):
        svd_eid(x, grad="approximate")


def test_svd_eid_input_checks_and_dtype():
    x = tf.random.uniform([3, 4, 4, 8])
    s, u, v = svd_eid(tf.reshape(x, [3, 16, 8]), 2)     # [B,HW,C] is accepted
    assert s.shape == (3, 2) and u.shape == (3, 16, 2) and v.shape == (3, 8, 2)
    np.testing.assert_allclose(np.sum(s.numpy() ** 2, 1), 1.0, rtol=1e-6)
    _, u16, v16 = svd_eid(tf.cast(x, tf.bfloat16))
    assert u16.dtype == tf.bfloat16 and v16.dtype == tf.bfloat16
    with pytest.raises(ValueError, match="feature map"):
        svd_eid(tf.zeros([3, 8]))
    with pytest.raises(ValueError, match="n must be"):
        svd_eid(x, n=9)


C = load_fixture("c_stacked_pca.npz")
C_META = json.loads(str(C["__meta__"]))


@pytest.mark.parametrize("t", range(C_META["steps"]))
def test_first_pca_and_student_projection_match_fixture_c(t):
    """The sign convention is deterministic, so U_T, V_T and V_S compare without alignment."""
    for k in range(len(C_META["shapes"])):
        p = f"t{t}/p{k}/"
        u_t, v_t = first_pca(C[f"t{t}/in/teacher{k}"])
        assert_close(u_t, C[p + "U_T"], 1e-4, what=p + "U_T")
        assert_close(v_t, C[p + "V_T"], 1e-4, what=p + "V_T")
        u_f, v_f = first_pca(C[f"t{t}/in/teacher{k}"], differentiable=False)   # IEP's teacher path
        assert_close(u_f, C[p + "U_T"], 1e-4, what=p + "U_T (squaring)")
        assert_close(v_f, C[p + "V_T"], 1e-4, what=p + "V_T (squaring)")
        assert_close(plane_mapping(v_t[:, :, 0]), C[p + "T_plane"], 1e-4, what=p + "T_plane")
        assert_close(project_student(C[f"t{t}/in/student{k}"], u_t), C[p + "V_S"], 1e-4, what=p + "V_S")


def test_first_pca_sign_convention_and_invariance():
    rng = np.random.default_rng(5)
    for shape in [(4, 8, 8, 8), (4, 4, 4, 16), (4, 2, 2, 24)]:   # the three branches
        x = tf.constant(rng.normal(size=shape).astype(np.float32))
        u, v = first_pca(x)
        vn = v.numpy()[..., 0]
        assert np.all(vn.max(1) + vn.min(1) >= 0)
        # The same sign on both: u^T x v = sigma_1 > 0.
        xs = x.numpy().reshape(shape[0], -1, shape[-1])
        assert np.all(np.einsum("bh,bhc,bc->b", u.numpy()[..., 0], xs, vn) > 0)
        # x -> -x flips (u, v) -> (u, -v); the convention restores v, so u flips.
        u_neg, v_neg = first_pca(-x)
        assert_close(v_neg, v, 1e-5, what="V_T(-x)")
        assert_close(u_neg, -u, 1e-5, what="U_T(-x)")
    with pytest.raises(ValueError, match="H\\*W"):
        project_student(tf.zeros([4, 2, 2, 24]), tf.zeros([4, 16, 1]))


def _top_vectors_agree(got, ref, tol):
    cos = np.abs(np.sum(np.asarray(got)[..., 0] * np.asarray(ref)[..., 0], axis=-1))
    assert np.all(cos >= 1.0 - tol), f"min |cos| {cos.min():.9f}"


@pytest.mark.parametrize("hw,c", [(64, 8), (4, 24), (16, 16)])
def test_leading_eigenvector_matches_float64_eigh(hw, c):
    """Post-ReLU Gram matrices (IEP's teacher points) and signed ones; one all-zero sample."""
    rng = np.random.default_rng(hw + c)
    for relu in (True, False):
        x = rng.normal(size=(6, hw, c))
        x = np.maximum(x, 0) if relu else x
        x[2] = 0.0
        g = np.einsum("bij,bik->bjk", x, x) if hw >= c else np.einsum("bij,bkj->bik", x, x)
        v = leading_eigenvector(tf.constant(g, tf.float32)).numpy()
        assert v.shape == (6, g.shape[1], 1) and np.all(np.isfinite(v))
        ref = np.linalg.eigh(g)[1][..., -1:]
        keep = [i for i in range(6) if i != 2]
        _top_vectors_agree(v[keep], ref[keep], 1e-6)
    # The no-gradient first PCA gives svd_eid's vectors, zero sample included.
    x = tf.constant(np.maximum(rng.normal(size=(6, hw, c)), 0).astype(np.float32) * (np.arange(6) != 2)[:, None, None])
    u_f, v_f = first_pca(x, differentiable=False)
    u_e, v_e = first_pca(x)
    assert_close(u_f, u_e, 1e-5, what="U_T")
    assert_close(v_f, v_e, 1e-5, what="V_T")


def test_leading_eigenvector_hard_cases():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    # The top vector orthogonal to the start vector 1: the dominance test must not accept the
    # second vector (which is all the squaring sees at first).
    v1 = np.array([1, -1, 0, 0, 0, 0.0]) / np.sqrt(2)
    basis = np.linalg.qr(np.column_stack([v1, q[:, 1:]]))[0]
    g_orth = basis @ np.diag([3.0, 2.0, 1.0, 0.5, 0.2, 0.1]) @ basis.T
    # An exact tie of the two largest eigenvalues: no squaring separates them, so eigh decides.
    g_tie = q @ np.diag([2.0, 2.0, 1.0, 0.5, 0.2, 0.1]) @ q.T
    got = leading_eigenvector(tf.constant(np.stack([g_orth, g_orth]), tf.float32)).numpy()
    _top_vectors_agree(got, np.stack([basis[:, :1]] * 2), 1e-5)
    tie = tf.constant(np.stack([g_tie, g_orth]), tf.float32)
    np.testing.assert_array_equal(leading_eigenvector(tie).numpy(),
                                  tf.linalg.eigh(tie)[1][..., -1:].numpy())
    zero = leading_eigenvector(tf.zeros([2, 5, 5])).numpy()
    assert np.all(np.isfinite(zero))


B = load_fixture("b_plane_mapping.npz")


@pytest.mark.parametrize("case", sorted({k.split("/")[0] for k in B.files if k != "__meta__"}))
def test_plane_mapping_matches_fixture_b(case):
    x = B[f"{case}/x"]
    y = plane_mapping(x).numpy()
    assert_close(y, B[f"{case}/y"], 1e-4, what=case)
    np.testing.assert_allclose(y.sum(1), 0.0, atol=1e-5)
    # The authors' acos form, in float64: the identity used here is exact.
    x64 = x.astype(np.float64)
    c = np.ones([1, x.shape[1]]) / np.sqrt(x.shape[1])
    ref = (x64 + c) / np.cos(np.arccos(x64 @ c.T) / 2) ** 2 - 2 * c
    assert_close(y, ref, 1e-5, what=case + " vs acos form")


F = load_fixture("f_kld.npz")


@pytest.mark.parametrize("case", sorted({k.split("/")[0] for k in F.files if k != "__meta__"}))
def test_kld_matches_fixture_f(case):
    x, y = F[f"{case}/X"], F[f"{case}/Y"]
    assert_close(kld_loss(x, y), F[f"{case}/kld"], 1e-5, what=case)
    assert abs(float(kld_loss(x, x))) <= 1e-5 * max(1.0, abs(float(F[f"{case}/kld"])))
    # Sum over rows, not a mean: two copies stacked give twice the value.
    assert_close(kld_loss(np.stack([x, x]), np.stack([y, y])), 2 * F[f"{case}/kld"], 1e-5, what="sum")
    with pytest.raises(ValueError, match="same shape"):
        kld_loss(x, y[..., :-1])
