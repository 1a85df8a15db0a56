"""IEPDistiller (the authors' EKI) against fixtures c/d/e (a 5-step replay from the zero state) and
g (the whole module with the stored state), plus invariances, adapters and input errors."""
import functools
import json

import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.iep import IEPDistiller
from tests.conftest import assert_close, load_fixture

_close = functools.partial(assert_close, atol=1e-7)


def _inputs(f, t=None):
    pre = "in/" if t is None else f"t{t}/in/"
    n_points = len(json.loads(str(f["__meta__"]))["shapes"])
    s = [tf.constant(f[f"{pre}student{k}"]) for k in range(n_points)]
    te = [tf.constant(f[f"{pre}teacher{k}"]) for k in range(n_points)]
    noise = [tf.constant(f[f"{pre}noise_module{i}"]) for i in range(1, n_points)]
    return s, te, noise


def _distiller_for(f):
    meta = json.loads(str(f["__meta__"]))
    dist = IEPDistiller([s[-1] for s in meta["shapes"]])
    dist.load_tf1_variables({k: f[k] for k in f.files if k.startswith("Distillation/")})
    return dist


@pytest.mark.parametrize("case", ["g_eki_case1.npz", "g_eki_case2.npz"])
def test_eki_matches_fixture_g(case):
    f = load_fixture(case)
    meta = json.loads(str(f["__meta__"]))
    dist = _distiller_for(f)
    names = dist.tf1_variables()
    assert sorted(names) == sorted(meta["variables"]) and len(names) == len(meta["variables"])
    assert sorted(n for n, v in names.items() if v.trainable) == sorted(meta["trainable"])
    assert {id(v) for v in dist.module_variables()} == {id(names[n]) for n in meta["trainable"]}
    for n, v in names.items():
        assert tuple(v.shape) == f[n].shape, n
    s, t, noise = _inputs(f)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(s)
        out = dist.distill_losses(s, t, details=True)
    for j, key in enumerate(["k_alt", "k_int", "k_bb"]):
        _close(out[key], f["out/dist"][j], 1e-4, what=key)
        for k, g in enumerate(tape.gradient(out[key], s)):
            _close(g, f[f"grad/dist{j}/student{k}"], 1e-3, what=f"d{key}/dstudent{k}")
    # Per-module terms form one array, as in `python -m iepkt_tf.parity`: a small KL term alone
    # moves by more than 1e-4 of itself when the teacher's leading vectors change at float32
    # rounding (1e-4-1e-3 of att_kld between eigh, squaring and float64-exact vectors).
    modules = sorted({name.split("/")[0] for name in out["terms"]})
    for mod in modules:
        names_m = sorted(n for n in out["terms"] if n.startswith(mod + "/"))
        scale = max(abs(float(f[f"out/terms/{n}"])) for n in names_m)
        for name in names_m:
            _close(out["terms"][name], f[f"out/terms/{name}"], 0.0, atol=1e-4 * scale, what=name)
    for name, value in out["mid"].items():
        _close(value, f[f"mid/{name}"], 1e-4, what=name)

    with tf.GradientTape() as tape:
        mod = dist.module_losses(t, noise=noise, details=True)
    _close(mod["mha_loss"], f["out/MHA_loss"], 1e-4, what="MHA_loss")
    _close(mod["total"], f["out/MHA_loss_sum"], 1e-4, what="MHA_loss_sum")
    for name, value in mod["mid"].items():
        _close(value, f[f"mid/{name}"], 1e-4, what=name)
    inv = {id(v): n for n, v in names.items()}
    for v, g in zip(dist.module_variables(), tape.gradient(mod["total"], dist.module_variables())):
        key = "grad/MHA_loss_sum/" + inv[id(v)]
        if key in meta["grad_zero_in_exact_arithmetic"]:
            _close(g, f[key], 0.0, atol=1e-7, what=key)
        else:
            _close(g, f[key], 1e-3, what=key)
    after = [n for n in names if "after_update/" + n in f.files]
    assert after and all(not names[n].trainable for n in after)
    for n in after:
        _close(names[n].numpy(), f["after_update/" + n], 1e-3, what="after_update/" + n)


def test_replay_c_d_e_from_zero_state():
    """Fixture c: every step is "dist with the old state, then module step + updates"; the
    fixtures d and e are its last step, so they are checked on the replayed module."""
    c = load_fixture("c_stacked_pca.npz")
    d, e = load_fixture("d_mpnn.npz"), load_fixture("e_mhgd.npz")
    meta = json.loads(str(c["__meta__"]))
    dist = _distiller_for(c)
    names = dist.tf1_variables()
    captured = json.loads(str(d["__meta__"]))["captured_step"]
    for t in range(meta["steps"]):
        s, te, noise = _inputs(c, t)
        if t == captured:   # d/e store the variables before this step: the replay must agree
            for src in (d, e):
                for n in (k for k in src.files if k.startswith("Distillation/")):
                    _close(names[n].numpy(), src[n], 1e-3, what=f"state before t{t}: {n}")
        out = dist.distill_losses(s, te, details=True)
        _close([out["k_alt"], out["k_int"], out["k_bb"]], c[f"t{t}/dist"], 1e-4, atol=1e-6,
               what=f"t{t}/dist")
        mod = dist.module_losses(te, noise=noise, details=True)
        _close(mod["mha_loss"], c[f"t{t}/MHA_loss"], 1e-4, what=f"t{t}/MHA_loss")
        for k in range(len(meta["shapes"])):
            for key in ("P", "G"):
                _close(mod["mid"][f"p{k}/{key}"], c[f"t{t}/p{k}/{key}"], 1e-4, what=f"t{t}/p{k}/{key}")
            _close(out["mid"][f"p{k}/S_proj"], c[f"t{t}/p{k}/S_proj"], 1e-4, what=f"t{t}/p{k}/S_proj")
        for n in names:
            if f"t{t}/after_update/{n}" in c.files:
                _close(names[n].numpy(), c[f"t{t}/after_update/{n}"], 1e-3, what=f"t{t} after {n}")
        if t != captured:
            continue
        for i in range(1, len(meta["shapes"])):
            m = f"m{i}/"
            _close(mod["mid"][m + "mpnn_train/R"], d[m + "train/R"], 1e-4, what="d " + m + "train/R")
            for who in ("T", "S"):
                for key in ("R", "M"):
                    _close(out["mid"][f"{m}mpnn_infer_{who}/{key}"], d[f"{m}infer_{who}/{key}"], 1e-4,
                           what=f"d {m}infer_{who}/{key}")
            _close(out["terms"][f"module{i}/msg_l1"], d[m + "msg_l1"], 1e-4, what="d msg_l1")
            _close(out["terms"][f"module{i}/graph_kld"], d[m + "graph_kld"], 1e-4, what="d graph_kld")
            _close(mod["mpnn_kld"][i - 1], d[m + "train_kld"], 1e-4, what="d train_kld")
            _close(mod["mid"][m + "extrinsic"], e[m + "in/extrinsic"], 1e-4, what="e extrinsic")
            for key in ("heads_train_T", "est_out"):
                _close(mod["mid"][m + key], e[m + key], 1e-4, what="e " + m + key)
            for key in ("heads_infer_T", "heads_infer_S"):
                _close(out["mid"][m + key], e[m + key], 1e-4, what="e " + m + key)
            _close(mod["est_loss"][i - 1], e[m + "est_loss"], 1e-4, what="e est_loss")
            # The module's terms as one array (as for fixture g): replayed from the zero state, the
            # teacher vectors differ from the authors' at float32 rounding, which moves this small
            # KL by ~1e-4 of itself.
            scale = max(abs(float(d[m + "msg_l1"])), abs(float(d[m + "graph_kld"])),
                        abs(float(e[m + "att_kld"])))
            _close(out["terms"][f"module{i}/att_kld"], e[m + "att_kld"], 0.0, atol=1e-4 * scale,
                   what="e att_kld")


def test_one_tf_function_step_matches_eager():
    """Phase-2 losses with gradients, then a phase-1 step, in one tf.function (fixture g_case1)."""
    f = load_fixture("g_eki_case1.npz")
    dist = _distiller_for(f)
    s, t, noise = _inputs(f)

    @tf.function
    def step(s, t, noise):
        with tf.GradientTape() as tape:
            tape.watch(s)
            out = dist.distill_losses(s, t)
        grads = tape.gradient(out["k_int"], s)
        with tf.GradientTape() as tape:
            mod = dist.module_losses(t, noise=noise)
        return out, grads, mod, tape.gradient(mod["total"], dist.module_variables())

    out, grads, mod, mgrads = step(s, t, noise)
    _close([out["k_alt"], out["k_int"], out["k_bb"]], f["out/dist"], 1e-4)
    for k, g in enumerate(grads):
        _close(g, f[f"grad/dist1/student{k}"], 1e-3)
    _close(mod["mha_loss"], f["out/MHA_loss"], 1e-4)
    assert all(np.all(np.isfinite(g.numpy())) for g in mgrads)
    names = dist.tf1_variables()
    for n in names:
        if "after_update/" + n in f.files:
            _close(names[n].numpy(), f["after_update/" + n], 1e-3, what=n)


def _random_setup(teacher_channels=(8, 16, 16), student_channels=None, batch=8, seed=0, **kw):
    rng = np.random.default_rng(seed)
    sizes = [8, 4, 4]
    t = [tf.constant(np.maximum(rng.normal(size=(batch, h, h, c)), 0).astype(np.float32))
         for h, c in zip(sizes, teacher_channels)]
    sc = student_channels or teacher_channels
    s = [tf.constant(np.maximum(rng.normal(size=(batch, h, h, c)), 0).astype(np.float32))
         for h, c in zip(sizes, sc)]
    dist = IEPDistiller(list(teacher_channels), student_channels=student_channels, **kw)
    for _ in range(2):   # a non-zero PCA state and BN statistics
        dist.module_losses(t)
    return dist, s, t


def test_batch_permutation():
    """Graphs permute with the batch; every loss is invariant (the module step as well, given the
    permuted drop-head noise)."""
    dist, s, t = _random_setup()
    perm = np.random.default_rng(1).permutation(8)
    sp = [tf.gather(x, perm) for x in s]
    tp = [tf.gather(x, perm) for x in t]
    a = dist.distill_losses(s, t, details=True)
    b = dist.distill_losses(sp, tp, details=True)
    # k_bb is a KL of nearly equal tanh'd head maps: reordering the batch's float32 sums alone
    # moves it by up to 1.2e-4 of itself (measured over 5 permutations, with eigh and with the
    # squaring path alike); a batch-order bug moves it by O(1).
    for key, tol in (("k_alt", 1e-4), ("k_int", 1e-4), ("k_bb", 5e-4)):
        assert float(a[key]) > 0
        _close(b[key], a[key], tol, what=key)
    for key, value in a["mid"].items():
        if key.endswith("/R") or "heads" in key:
            ref = np.take(np.take(value.numpy(), perm, axis=-2), perm, axis=-1)
        elif key.endswith("/M"):
            ref = value.numpy()[perm][:, perm]
        else:
            ref = value.numpy()[perm]
        _close(b["mid"][key], ref, 1e-4, atol=1e-6, what=key)
    noise = [tf.random.normal([8, 8, 1]) for _ in range(2)]
    m_a = dist.module_losses(t, noise=noise, update_state=False)
    m_b = dist.module_losses(tp, noise=[tf.gather(n, perm, axis=1) for n in noise], update_state=False)
    _close(m_b["mha_loss"], m_a["mha_loss"], 1e-4, what="MHA_loss")


def test_update_state_switch_and_phase_separation():
    dist, s, t = _random_setup()
    names = dist.tf1_variables()
    before = {n: v.numpy().copy() for n, v in names.items()}
    dist.module_losses(t, update_state=False)
    dist.distill_losses(s, t)                   # phase 2 never touches the module or its state
    for n, v in names.items():
        np.testing.assert_array_equal(v.numpy(), before[n], err_msg=n)
    dist.module_losses(t)
    changed = {n for n, v in names.items() if not np.array_equal(v.numpy(), before[n])}
    assert changed == {n for n, v in names.items() if not v.trainable}


def test_adapter_for_other_student_widths():
    dist, s, t = _random_setup(teacher_channels=(8, 16, 16), student_channels=[4, 16, 8])
    names = dist.tf1_variables()
    adapter = sorted(n for n in names if n.startswith("Distillation/Adapter"))
    assert adapter == sorted(f"Distillation/Adapter{k}/{leaf}" for k in (0, 2) for leaf in
                             ("conv/weights", "bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance"))
    assert len(names) - len(adapter) == 73
    assert names["Distillation/Adapter0/conv/weights"].shape == (1, 1, 4, 8)
    module_ids = {id(v) for v in dist.module_variables()}
    assert module_ids.isdisjoint(id(v) for v in dist.adapter_variables())
    assert len(dist.adapter_variables()) == 6
    moving = names["Distillation/Adapter2/bn/moving_mean"]
    m0 = moving.numpy().copy()
    with tf.GradientTape() as tape:
        tape.watch(s)
        out = dist.distill_losses(s, t, training_adapter=True)
        total = out["k_alt"] + out["k_int"] + out["k_bb"]
    grads = tape.gradient(total, s + dist.adapter_variables())
    assert np.isfinite(float(total))
    for g in grads:
        assert g is not None and np.all(np.isfinite(g.numpy())) and np.abs(g.numpy()).max() > 0
    assert not np.array_equal(moving.numpy(), m0)           # adapter BN trains with the student
    m1 = moving.numpy().copy()
    dist.distill_losses(s, t, training_adapter=False)
    np.testing.assert_array_equal(moving.numpy(), m1)
    with pytest.raises(ValueError, match="student feature map 0"):
        dist.distill_losses([t[0]] + s[1:], t)


def test_options_switches_and_ablations():
    dist, s, t = _random_setup(use_k_bb=False)
    out = dist.distill_losses(s, t)
    assert set(out) == {"k_alt", "k_int"}
    full = IEPDistiller([8, 16, 16])
    full.load_tf1_variables({n: v.numpy() for n, v in dist.tf1_variables().items()})
    ref = full.distill_losses(s, t)
    _close(out["k_int"], ref["k_int"], 1e-6)
    assert set(IEPDistiller([8, 16, 16], use_k_int=False, use_k_alt=False).distill_losses(s, t)) == {"k_bb"}

    batch_pca, s, t = _random_setup(pca="batch", mpnn_iter=3, seed=2)
    names = batch_pca.tf1_variables()
    assert any("/PCA_Graph/Batch_PCA/V" in n for n in names)
    out = batch_pca.distill_losses(s, t, details=True)
    assert out["mid"]["m1/mpnn_infer_T/M"].shape == (8, 8, 3 * 8)
    assert all(np.isfinite(float(v)) and float(v) > 0 for k, v in out.items() if k.startswith("k_"))
    # Per-batch PCA: the first step already has a non-zero embedding.
    fresh = IEPDistiller([8, 16, 16], pca="batch")
    assert np.abs(fresh.module_losses(t, details=True)["mid"]["p1/P"].numpy()).max() > 0

    for bad, match in [(dict(teacher_channels=[8]), "at least 2"),
                       (dict(teacher_channels=[8, 16], student_channels=[8]), "one entry"),
                       (dict(teacher_channels=[8, 16], pca="kernel"), "pca must be"),
                       (dict(teacher_channels=[8, 16], num_head=1), "num_head")]:
        with pytest.raises(ValueError, match=match):
            IEPDistiller(**bad)


def test_bad_inputs_raise_clear_errors():
    dist, s, t = _random_setup()
    one = [x[:1] for x in t]
    with pytest.raises(ValueError, match="batch size must be >= 2"):
        dist.module_losses(one)
    with pytest.raises(ValueError, match="batch size must be >= 2"):
        dist.distill_losses([x[:1] for x in s], one)
    with pytest.raises(ValueError, match="expected 3 teacher feature maps"):
        dist.module_losses(t[:2])
    with pytest.raises(ValueError, match="noise"):
        dist.module_losses(t, noise=[tf.zeros([8, 8, 1])])
    # NaN in a feature map: an error naming the map, never a silent NaN loss.
    bad = t[1].numpy().copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite values in teacher feature map 1"):
        dist.module_losses([t[0], tf.constant(bad), t[2]])
    bad_s = s[2].numpy().copy()
    bad_s[0, 1, 1, 1] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite values in student feature map 2"):
        dist.distill_losses([s[0], s[1], tf.constant(bad_s)], t)

    @tf.function
    def in_graph(x):
        return dist.distill_losses(x, t)["k_int"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        in_graph([s[0], s[1], tf.constant(bad_s)])
    with pytest.raises(ValueError, match="missing"):
        dist.load_tf1_variables({})
