"""Second PCA: the incremental PCA replayed from the zero state through fixture c, its explicit
``initialized`` flag, the per-batch PCA ablation and the cosine graph."""
import functools
import json

import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.incremental_pca import BatchPCA, IncrementalPCA, cosine_graph
from iepkt_tf.plane_mapping import plane_mapping
from iepkt_tf.stacked_pca import first_pca, project_student
from tests.conftest import assert_close, load_fixture

_close = functools.partial(assert_close, atol=1e-7)


def test_replay_fixture_c_from_zero_state():
    c = load_fixture("c_stacked_pca.npz")
    meta = json.loads(str(c["__meta__"]))
    channels = [s[-1] for s in meta["shapes"]]
    pcas = [IncrementalPCA(ch) for ch in channels]
    for k, pca in enumerate(pcas):
        for leaf, var in pca.tf1_variables().items():
            name = f"Distillation/EKI/Stacked_PCA{k}/Teacher_PCA/PCA_Graph/Incremental_PCA/{leaf}"
            assert tuple(var.shape) == c[name].shape
            assert not np.any(c[name]) and not np.any(var.numpy())    # zero state at t0
    for t in range(meta["steps"]):
        for k, pca in enumerate(pcas):
            p = f"t{t}/p{k}/"
            assert bool(pca.is_initialized()) == (not bool(c[p + "ipca_init"]))
            for leaf, var in pca.tf1_variables().items():
                _close(var.numpy(), c[p + f"state_before/{leaf}"], 1e-3, what=p + "state_before/" + leaf)
            u_t, v_t = first_pca(c[f"t{t}/in/teacher{k}"])
            t_plane = plane_mapping(v_t[:, :, 0])
            P, mean, V = pca(t_plane)
            _close(P, c[p + "P"], 1e-4, what=p + "P")
            _close(cosine_graph(P), c[p + "G"], 1e-4, what=p + "G")
            _close(mean, c[p + "mean"], 1e-4, what=p + "mean")
            _close(V, c[p + "V"], 1e-4, what=p + "V")
            s_plane = plane_mapping(project_student(c[f"t{t}/in/student{k}"], u_t)[:, :, 0])
            _close(tf.matmul(s_plane - mean, V), c[p + "S_proj"], 1e-4, what=p + "S_proj")
            if t == 0:
                assert not np.any(P.numpy())    # the stored state is zero at the first step
            pca.update(t_plane)
            for leaf, var in pca.tf1_variables().items():
                _close(var.numpy(), c[p + f"state_after/{leaf}"], 1e-3, what=p + "state_after/" + leaf)
                _close(var.numpy(), c[f"t{t}/after_update/Distillation/EKI/Stacked_PCA{k}/Teacher_PCA/"
                                      f"PCA_Graph/Incremental_PCA/{leaf}"], 1e-3, what=leaf)
            vn = pca.V.numpy()
            assert np.all(vn.max(0) + vn.min(0) >= 0)


def _numpy_update(x, M, S, V, initialized):
    bm = x.mean(0, keepdims=True)
    m_ = M if initialized else bm
    stacked = np.concatenate([x - bm, (S * V).T, m_ - bm], 0)
    _, s, vt = np.linalg.svd(stacked.astype(np.float64), full_matrices=False)
    v = vt.T
    v = v * np.where(v.max(0) + v.min(0) >= 0, 1.0, -1.0)
    d = V.shape[1]
    return 0.1 * M + 0.9 * bm, s[None, :d], v[:, :d]


def test_initialized_flag_decides_the_last_row():
    rng = np.random.default_rng(0)
    x0 = plane_mapping(tf.math.l2_normalize(rng.uniform(size=(12, 8)).astype(np.float32), 1)).numpy()
    x1 = plane_mapping(tf.math.l2_normalize(rng.uniform(size=(12, 8)).astype(np.float32), 1)).numpy()
    pca = IncrementalPCA(8)
    assert not bool(pca.initialized.numpy()) and not bool(pca.is_initialized())
    pca.update(x0)
    assert bool(pca.initialized.numpy())
    M, S, V = (v.numpy() for v in (pca.M, pca.S, pca.V))
    new = pca.compute_update(x1)            # compute_update does not write
    np.testing.assert_array_equal(pca.V.numpy(), V)
    for got, ref in zip((new["M"], new["S"], new["V"]), _numpy_update(x1, M, S, V, True)):
        _close(got, ref, 1e-4)
    # A zero state with the flag set must still use M (= 0) in the last row: the flag, not a float
    # test on S*V, decides. Compare with the "not initialised" update, which uses the batch mean.
    fresh = IncrementalPCA(8)
    fresh.initialized.assign(True)
    z = np.zeros
    flagged = fresh.compute_update(x1)
    for got, ref in zip((flagged["M"], flagged["S"], flagged["V"]),
                        _numpy_update(x1, z((1, 8)), z((1, 4)), z((8, 4)), True)):
        _close(got, ref, 1e-4)
    fresh.initialized.assign(False)
    unflagged = fresh.compute_update(x1)
    assert np.abs(flagged["S"].numpy() - unflagged["S"].numpy()).max() > 1e-3
    # A non-zero state loaded by assignment counts as initialised.
    loaded = IncrementalPCA(8)
    loaded.S.assign(S)
    assert bool(loaded.is_initialized()) and not bool(loaded.initialized.numpy())


def test_outputs_use_stored_state_and_stop_gradient():
    rng = np.random.default_rng(1)
    pca = IncrementalPCA(6)
    pca.set_state(rng.normal(size=(1, 6)), rng.uniform(size=(1, 3)), rng.normal(size=(6, 3)))
    x = tf.constant(rng.normal(size=(5, 6)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, pca.M.value, pca.V.value])     # watched, yet stop_gradient blocks them
        P, mean, V = pca(x)
        sum_p, sum_mean = tf.reduce_sum(P), tf.reduce_sum(mean)
    _close(P, (x.numpy() - pca.M.numpy()) @ pca.V.numpy(), 1e-5)
    assert tape.gradient(sum_mean, pca.M.value) is None
    assert tape.gradient(sum_p, pca.V.value) is None
    _close(tape.gradient(sum_p, x), np.tile(pca.V.numpy().sum(1), (5, 1)), 1e-5)
    with pytest.raises(ValueError, match=r"\[B,6\]"):
        pca(tf.zeros([5, 7]))


@pytest.mark.parametrize("batch", [20, 3])
def test_batch_pca(batch):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(batch, 10)).astype(np.float32)
    pca = BatchPCA(10)
    P, mean, V = pca(x)
    assert P.shape == (batch, 5) and V.shape == (10, 5) and mean.shape == (1, 10)
    _close(mean, x.mean(0, keepdims=True), 1e-5)
    _close(tf.matmul(V, V, transpose_a=True), np.eye(5), 1e-5, atol=1e-5)     # orthonormal basis
    vn = V.numpy()
    assert np.all(vn.max(0) + vn.min(0) >= 0)
    np.testing.assert_allclose(P.numpy().sum(0), 0.0, atol=1e-4)           # centred with this batch
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    k = min(5, len(s))
    _close(np.linalg.norm(P.numpy(), axis=0)[:k], s[:k], 1e-4)           # the leading directions
    assert not np.any(pca.V.numpy())                                        # call keeps no state
    pca.update(x)
    _close(pca.V.numpy(), vn, 1e-6)
    _close(pca.M.numpy(), mean, 1e-6)
    # Another batch gives another basis (no memory of the previous one).
    P2, _, V2 = pca(rng.normal(size=(batch, 10)).astype(np.float32) + 3.0)
    assert np.abs(V2.numpy() - vn).max() > 1e-2


def test_cosine_graph():
    p = np.array([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0], [-2.0, 0.0]], np.float32)
    g = cosine_graph(p).numpy()
    ref = np.array([[1, 0.6, 0, -1], [0.6, 1, 0, -0.6], [0, 0, 0, 0], [-1, -0.6, 0, 1]])
    _close(g, ref, 1e-6)
