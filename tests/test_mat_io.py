"""The authors' train_params.mat exchange: round trip, the fixture file, errors, atomic writes."""
import os

import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf import mat_io
from iepkt_tf.mat_io import ParamsMismatchError, assign_params, collect_params, load_mat, save_mat
from nets import nets_factory
from nets.wresnet import WResNet
from tests.conftest import FIXTURES, load_fixture

MAT = FIXTURES / "h_wresnet_student_train_params.mat"


def small_net(scope="Student", seed=0):
    tf.random.set_seed(seed)
    return WResNet(10, 1, 10, scope=scope).build_for((16, 16))


def randomise_bn(net, seed):
    rng = np.random.default_rng(seed)
    for k, v in net.tf1_variables().items():
        if k.endswith(("gamma", "moving_variance")):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
        elif k.endswith(("beta", "moving_mean", "biases")):
            v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))


def test_round_trip_gives_identical_logits(tmp_path):
    net = small_net(seed=1)
    randomise_bn(net, 1)
    x = tf.random.stateless_uniform([8, 16, 16, 3], seed=[1, 1])
    ref, _ = net(x)
    path = tmp_path / "train_params.mat"
    params = collect_params(net.tf1_variables(), scope="Student")
    assert len(params) == len(net.tf1_variables())
    save_mat(path, params)
    loaded = load_mat(path)
    assert set(loaded) == set(params)  # no __header__ etc.
    assert loaded["Student/bn0/gamma"].shape == (1, 64)  # loadmat's (1, C) vectors

    fresh = small_net(seed=2)
    before, _ = fresh(x)
    assert np.abs(before.numpy() - ref.numpy()).max() > 1e-3
    assert assign_params(fresh.tf1_variables(), loaded, scope="Student") == len(params)
    got, _ = fresh(x)
    np.testing.assert_array_equal(got.numpy(), ref.numpy())


def test_collect_params_scope_filter():
    s, t = small_net("Student"), small_net("Teacher")
    both = {**s.tf1_variables(), **t.tf1_variables()}
    only_s = collect_params(both, scope="Student")
    assert only_s and all(k.startswith("Student/") for k in only_s)
    assert len(collect_params(both)) == len(both)
    assert all(isinstance(v, np.ndarray) for v in only_s.values())


def test_load_fixture_mat_into_model():
    arrays = load_mat(MAT)
    h = load_fixture("h_wresnet.npz")
    arch = nets_factory.arch_from_params(arrays, "Student")
    net = nets_factory.get_network(arch, arrays["Student/full/weights"].shape[-1], "Student",
                                   h["image"].shape[1:], is_main=True)
    assert assign_params(net.tf1_variables(), arrays, scope="Student", what="--teacher_params") == len(arrays)
    for k, v in net.tf1_variables().items():
        np.testing.assert_array_equal(v.numpy(), h[k])
    logits, _ = net(h["image"])
    ref = h["out/infer/logits"]
    assert np.abs(logits.numpy() - ref).max() <= 1e-4 * np.abs(ref).max()


def test_missing_and_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_mat(tmp_path / "nope.mat", what="--teacher_params")
    assert "--teacher_params" in str(e.value) and "nope.mat" in str(e.value)
    bad = tmp_path / "garbage.mat"
    bad.write_bytes(b"this is not a mat file" * 10)
    with pytest.raises(ValueError, match="garbage.mat"):
        load_mat(bad)


def mismatch(net, arrays, **kw):
    with pytest.raises(ParamsMismatchError) as e:
        assign_params(net.tf1_variables(), arrays, **kw)
    return str(e.value)


def test_mismatch_messages_and_nothing_assigned():
    net = small_net()
    good = collect_params(net.tf1_variables())
    before = {k: v.numpy().copy() for k, v in net.tf1_variables().items()}
    other = {k: v + 1.0 for k, v in good.items()}

    missing = dict(other)
    del missing["Student/WResblock1/BasicBlock0/bn0/moving_variance"]
    msg = mismatch(net, missing, scope="Student", what="--teacher_params x.mat")
    first = msg.splitlines()[0]
    assert first.startswith("--teacher_params x.mat") and "1 missing" in first
    assert "Student/WResblock1/BasicBlock0/bn0/moving_variance" in msg

    extra = dict(other, **{"Student/extra/weights": np.zeros([3])})
    msg = mismatch(net, extra, scope="Student")
    assert "1 unexpected" in msg.splitlines()[0] and "Student/extra/weights" in msg

    shaped = dict(other)
    shaped["Student/full/weights"] = other["Student/full/weights"].T  # same size, wrong layout
    msg = mismatch(net, shaped)
    assert "1 wrongly shaped" in msg.splitlines()[0]
    assert "Student/full/weights: expected (64, 10), got (10, 64)" in msg

    for k, v in net.tf1_variables().items():  # strict: nothing was assigned
        np.testing.assert_array_equal(v.numpy(), before[k])

    # keys of another scope are ignored under scope=, counted without it
    with_teacher = dict(other, **{"Teacher/conv0/weights": np.zeros([3, 3, 3, 16])})
    assert assign_params(net.tf1_variables(), with_teacher, scope="Student") == len(good)
    assert "Teacher/conv0/weights" in mismatch(net, with_teacher)
    # non-strict: missing names are skipped, the rest assigned
    assert assign_params(net.tf1_variables(), missing, strict=False) == len(good) - 1
    np.testing.assert_allclose(net.tf1_variables()["Student/full/biases"].numpy(),
                               other["Student/full/biases"])
    # non-strict still refuses wrong shapes
    mismatch(net, shaped, strict=False)


def test_atomic_write(tmp_path, monkeypatch):
    path = tmp_path / "out" / "train_params.mat"
    save_mat(path, {"a/x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    save_mat(path, {"b/y": np.ones([4], np.float32)})  # replaces the whole file
    assert os.listdir(path.parent) == ["train_params.mat"]
    assert set(load_mat(path)) == {"b/y"}
    original = path.read_bytes()

    def broken_savemat(f, data):
        f.write(b"MATLAB 5.0 half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(mat_io.sio, "savemat", broken_savemat)
    with pytest.raises(RuntimeError, match="disk full"):
        save_mat(path, {"c/z": np.zeros([2])})
    assert path.read_bytes() == original  # the old file is untouched
    assert os.listdir(path.parent) == ["train_params.mat"]  # no temporary file left behind
    monkeypatch.undo()
    with pytest.raises(ValueError, match="_hidden"):
        save_mat(path, {"_hidden": np.zeros([1])})
