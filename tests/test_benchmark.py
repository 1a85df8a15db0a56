"""iepkt_tf.benchmark (the speed command, its FLOP counter and device defaults) and
op_util.multi_grad (per-loss gradients)."""
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf import benchmark as bm
from iepkt_tf.iep import IEPDistiller
from nets.nets_factory import get_network, parse_arch
from op_util import train_steps as ts
from op_util.multi_grad import DEFAULT_METHOD, METHODS, per_loss_gradients
from tests.conftest import FIXTURES

TINY = ["--student_arch=WResNet-10-1", "--teacher_arch=WResNet-10-1", "--batch_size=8",
        "--image_size=16", "--num_classes=10", "--steps=2", "--warmup=1"]


def wresnet_forward_flops(arch, num_classes, batch, size):
    """Independent analytic count: 2 * multiply-adds of every conv and the FC of one forward pass
    of the authors' WResNet (3x3/1 stem for 32-pixel inputs, else 7x7/2; SAME padding)."""
    _, depth, k = parse_arch(arch)
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    kernel, stride = (3, 1) if size == 32 else (7, 2)
    h = math.ceil(size / stride)
    macs = h * h * kernel * kernel * 3 * 16
    cin = 16
    for g in range(3):
        for i in range(n):
            s = (1 if g == 0 else 2) if i == 0 else 1
            h = math.ceil(h / s)
            cout = widths[g + 1]
            macs += h * h * 9 * cin * cout + h * h * 9 * cout * cout   # conv0, conv1
            if cin != cout:
                macs += h * h * cin * cout                             # 1x1 shortcut conv2
            cin = cout
    macs += cin * num_classes                                          # full
    return 2 * batch * macs


# ---------------------------------------------------------------- the command, in process

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "out.json"
    policy_before = keras.mixed_precision.global_policy().name
    lines = []
    res = bm.run(TINY + [f"--json={path}"], log=lines.append)
    assert keras.mixed_precision.global_policy().name == policy_before   # restored
    return res, path, "\n".join(lines)


def test_cli_json_has_every_part_with_positive_timings(tiny_run):
    res, path, report = tiny_run
    data = json.loads(path.read_text())
    assert [p for p in os.listdir(path.parent) if p != path.name] == []   # no temp file left
    assert set(data["parts"]) == set(bm.PARTS)
    for name, part in data["parts"].items():
        assert part["steps"] == 2 and len(part["times_s"]) == 2
        assert 0 < part["min_s"] <= part["median_s"] <= part["max_s"], name
        assert part["images_per_s"] == pytest.approx(8 / part["median_s"])
        assert part["gflop"] > 0 and part["gflop_per_s"] == pytest.approx(
            part["gflop"] / part["median_s"])
        # Only the teacher's leading-vector squaring loops (one per sensing point) are uncounted.
        gaps = part["flop_count_gaps"]
        assert gaps["unknown_shape_ops"] == 0 and gaps["unresolved_functions"] == 0, name
        assert gaps["while_loops"] == (3 if name in ("main", "init") else 0), name
        assert part["flop_count_exact"] == (gaps["while_loops"] == 0), name
        assert name in report
    med = {p: data["parts"][p]["median_s"] for p in data["parts"]}
    assert data["main_over_floor"] == pytest.approx(med["main"] / med["floor"])
    assert data["init_over_floor"] == pytest.approx(med["init"] / med["floor"])
    assert data["bare_over_floor"] == pytest.approx(med["bare"] / med["floor"])
    assert "main_over_floor" in report and "init_over_floor" in report
    assert all(v == 1 for v in data["tracing_count"].values())
    mem = data["memory"]
    assert mem["peak_rss_mb"] > 0 and mem["ru_maxrss_mb"] >= mem["rss_after_warmup_mb"] > 0
    assert len(mem["rss_mb_per_round"]) == 3


def test_cli_flop_counts_match_the_analytic_count(tiny_run):
    data = json.loads(tiny_run[1].read_text())
    fwd = wresnet_forward_flops("WResNet-10-1", 10, 8, 16)
    assert data["flops"]["student_forward_gflop"] == pytest.approx(fwd / 1e9, rel=1e-9)
    assert data["flops"]["teacher_forward_gflop"] == pytest.approx(fwd / 1e9, rel=1e-9)
    # inference is one forward pass: every conv once, the FC once
    assert data["parts"]["infer"]["gflop"] == pytest.approx(fwd / 1e9, rel=1e-9)
    p = {k: v["passes_of_student_forward"] for k, v in data["parts"].items()}
    # training = forward + input and filter gradients (the stem needs no input gradient)
    assert 2.5 < p["student"] < 3.0
    assert p["floor"] == pytest.approx(p["student"] + 1.0, rel=1e-6)   # + teacher forward
    # main: teacher + student forward, 4 backward passes (CE and 3 separately clipped losses)
    by_type = data["parts"]["main"]["gflop_by_type"]
    student_bwd = data["parts"]["student"]["gflop_by_type"]
    assert by_type["Conv2DBackpropFilter"] == pytest.approx(4 * student_bwd["Conv2DBackpropFilter"])
    assert by_type["Conv2DBackpropInput"] == pytest.approx(4 * student_bwd["Conv2DBackpropInput"])
    # bare: the same network work (4 backward passes), no distiller matmuls
    bare = data["parts"]["bare"]["gflop_by_type"]
    for op in ("Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput"):
        assert bare[op] == pytest.approx(by_type[op]), op
    assert data["parts"]["bare"]["gflop"] < data["parts"]["main"]["gflop"]


def test_cli_reports_the_settings_in_effect(tiny_run):
    data = json.loads(tiny_run[1].read_text())
    s = data["settings"]
    assert s["precision"] == bm.default_precision() and s["precision_flag"] == "auto"
    assert s["compute_dtype"] == keras.mixed_precision.Policy(s["precision"]).compute_dtype
    assert s["variable_dtype"] == "float32" and s["distiller_dtype"] == "float32"
    assert s["jit_flag"] == "auto" and set(s["jit_compile"]) == set(bm.PARTS)
    for part, jit in s["jit_compile"].items():
        assert jit is bm.default_jit(decompositions=part in ("main", "init")), part
    assert "CPU" in s["device"] or "GPU" in s["device"]
    assert s["tensorflow"] == tf.__version__ and s["keras"] == keras.__version__
    assert s["grad_method"] and s["grad_method"][0] in METHODS
    assert data["config"]["batch_size"] == 8 and data["config"]["parts"] == list(bm.PARTS)


def test_cli_parts_and_explicit_settings(tmp_path):
    res = bm.run(TINY + ["--parts=infer,student", "--precision=float32", "--jit=false"],
                 log=lambda _: None)
    assert list(res["parts"]) == ["student", "infer"]
    assert res["main_over_floor"] is None and res["init_over_floor"] is None
    assert res["settings"]["precision"] == "float32" and res["settings"]["compute_dtype"] == "float32"
    assert res["settings"]["jit_compile"] == {"student": False, "infer": False}


def test_cli_times_one_main_step_per_grad_method():
    """``--grad_method separate,pfor`` adds part ``main[pfor]``."""
    argv = TINY + ["--parts=main", "--grad_method=separate,pfor", "--precision=float32"]
    res = bm.run(argv, log=lambda _: None)
    assert list(res["parts"]) == ["main", "main[pfor]"]
    assert res["settings"]["grad_method"] == ["separate", "pfor"]
    assert res["tracing_count"] == {"main": 1, "main[pfor]": 1}
    assert res["parts"]["main[pfor]"]["median_s"] > 0


def test_cli_times_another_method():
    """``--Distillation KD``: ``all`` is student, floor, main, infer (no initial phase, no bare);
    asking for ``init`` of a method without one names the flag."""
    res = bm.run(TINY + ["--Distillation=KD", "--precision=float32"], log=lambda _: None)
    assert list(res["parts"]) == ["student", "floor", "main", "infer"]
    assert res["settings"]["distillation"] == "KD" and res["main_over_floor"] > 0
    with pytest.raises(ValueError, match="--parts init"):
        bm.run(TINY + ["--Distillation=KD", "--parts=init"], log=lambda _: None)


@pytest.mark.parametrize("argv, flag", [
    (["--parts=student,warp"], "--parts"),
    (["--student_arch=VGG-16"], "--student_arch"),
    (["--teacher_arch=WResNet-11-4"], "--teacher_arch"),
    (["--grad_method=fastest"], "--grad_method"),
    (["--precision=float64"], "precision"),
    (["--json=/nonexistent-dir/x.json"], "--json"),
])
def test_cli_bad_flags_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        bm.run(TINY + argv, log=lambda _: None)


# ---------------------------------------------------------------- the FLOP counter itself

def test_flop_counter_on_known_layers():
    x = tf.TensorSpec([4, 9, 9, 3])

    @tf.function
    def conv(x):
        w = tf.ones([5, 5, 3, 7])
        return tf.nn.conv2d(x, w, strides=2, padding="SAME")            # -> [4, 5, 5, 7]

    assert bm.count_flops(conv, x)["flops"] == 2 * 4 * 5 * 5 * 7 * 5 * 5 * 3

    @tf.function
    def mm(a, b):
        unused = tf.matmul(a, a, transpose_b=True)                      # dead: not counted
        del unused
        return tf.matmul(a, b, transpose_a=True) + 0.0                  # [6,11]: K = 5

    assert bm.count_flops(mm, tf.TensorSpec([5, 6]), tf.TensorSpec([5, 11]))["flops"] == 2 * 6 * 11 * 5

    @tf.function
    def bmm(a, b):
        return tf.matmul(a, b, adjoint_a=True)                          # [3,6,2]: K = 4

    got = bm.count_flops(bmm, tf.TensorSpec([3, 4, 6]), tf.TensorSpec([3, 4, 2]))
    assert got["flops"] == 2 * 3 * 6 * 2 * 4 and got["by_type"] == {"BatchMatMulV2": 2 * 3 * 6 * 2 * 4}


def test_flop_counter_counts_backward_nested_and_branches():
    w = tf.Variable(tf.ones([3, 3, 2, 4]))
    fwd = 2 * 2 * 8 * 8 * 4 * 3 * 3 * 2

    @tf.function
    def inner(x):
        return tf.nn.conv2d(x, w, 1, "SAME")

    @tf.function
    def train(x, flag):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = inner(x)                                                # nested function call
            loss = tf.reduce_sum(y * y)
        gx, gw = tape.gradient(loss, [x, w])
        z = tf.cond(flag, lambda: tf.matmul(tf.ones([2, 3]), tf.ones([3, 5])), lambda: tf.zeros([2, 5]))
        return gx, gw, z

    got = bm.count_flops(train, tf.TensorSpec([2, 8, 8, 2]), tf.TensorSpec([], tf.bool))
    assert got["flops"] == 3 * fwd + 2 * 2 * 5 * 3                     # fwd, dX, dW + cond branch
    assert got["unknown_shape_ops"] == 0 and got["unresolved_functions"] == 0


@pytest.mark.parametrize("arch, size", [("WResNet-16-2", 32), ("WResNet-10-1", 16)])
def test_flop_counter_matches_analytic_wresnet_forward(arch, size):
    net = get_network(arch, 10, "Student", size, False)
    fwd = bm._make_forward_fn(net)
    got = bm.count_flops(fwd, tf.TensorSpec([3, size, size, 3]))
    assert got["flops"] == wresnet_forward_flops(arch, 10, 3, size)
    assert set(got["by_type"]) == {"Conv2D", "MatMul"}


# ---------------------------------------------------------------- device defaults

def test_default_precision_and_jit_by_device():
    assert bm.default_precision(gpu=True) == "mixed_float16"
    assert bm.default_precision(gpu=False, cpu_features={"avx512f", "avx512_bf16"}) == "mixed_bfloat16"
    assert bm.default_precision(gpu=False, cpu_features={"amx_tile", "amx_bf16"}) == "mixed_bfloat16"
    assert bm.default_precision(gpu=False, cpu_features={"avx2", "avx512f"}) == "float32"
    assert bm.default_jit(gpu=False) is False
    assert bm.default_jit(gpu=False, decompositions=True) is False
    assert bm.default_jit(gpu=True) is True
    assert bm.default_jit(gpu=True, decompositions=True) is False
    assert bm.resolve_precision("float32") == "float32"
    assert bm.resolve_precision("auto") == bm.default_precision()
    assert bm.resolve_jit("true", decompositions=True) is True
    assert bm.resolve_jit("auto", decompositions=True) is bm.default_jit(decompositions=True)
    with pytest.raises(ValueError, match="--jit"):
        bm.resolve_jit("maybe")
    with pytest.raises(ValueError, match="--precision"):
        bm.resolve_precision("fp8")


def test_default_precision_keeps_the_float32_parts_parity():
    """Under the chosen default policy the distiller still matches the authors' numbers (whole EKI
    step: losses, intermediates, gradients, state update) at the fixture tolerances."""
    from iepkt_tf import parity

    before = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(bm.default_precision())
    try:
        rows = parity.run_file(FIXTURES / "g_eki_case1.npz")
    finally:
        keras.mixed_precision.set_global_policy(before)
    assert len(rows) > 50
    failed = [r.format() for r in rows if not r.passed]
    assert not failed, failed


# ---------------------------------------------------------------- op_util.multi_grad

@pytest.fixture(scope="module")
def iep_losses_setup():
    """Tiny student, teacher and distiller with an initialised PCA state (float32)."""
    tf.random.set_seed(1)
    student = get_network("WResNet-10-1", 10, "Student", 16, True)
    teacher = get_network("WResNet-10-1", 10, "Teacher", 16, False)
    dist = IEPDistiller(teacher.feature_channels[1:4], student.feature_channels[1:4])
    images = tf.random.stateless_normal([8, 16, 16, 3], seed=[3, 4])
    labels = tf.constant([0, 1, 2, 3, 4, 5, 6, 7])
    dist.module_losses(teacher(images, training=False)[1][1:4])
    variables = [v for n, v in student.tf1_variables().items() if v.trainable]

    def losses():
        _, t_feats = teacher(images, training=False)
        logits, s_feats, _ = ts.forward(student, images, True, tf.constant([5, 6], tf.int64))
        d = dist.distill_losses(s_feats[1:4], [tf.stop_gradient(f) for f in t_feats[1:4]])
        return [ts.cross_entropy(logits, labels), d["k_int"], d["k_alt"], d["k_bb"]]

    return losses, variables


def _assert_same_grads(got, ref):
    assert len(got) == len(ref)
    for k, (row, ref_row) in enumerate(zip(got, ref)):
        assert [g is None for g in row] == [g is None for g in ref_row], k
        for g, r in zip(row, ref_row):
            if r is not None:
                scale = float(tf.reduce_max(tf.abs(r))) or 1.0
                np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=0, atol=1e-4 * scale)


def test_per_loss_gradients_equal_separate_tape_gradients(iep_losses_setup):
    """CE and the three IEP losses of a tiny student: every method gives tape.gradient's numbers
    and its None structure."""
    losses_fn, variables = iep_losses_setup

    @tf.function
    def all_methods():
        with tf.GradientTape(persistent=True) as tape:
            losses = losses_fn()
        ref = [tape.gradient(loss, variables) for loss in losses]
        return {m: per_loss_gradients(tape, losses, variables, method=m)
                for m in ("pfor", "separate", "auto")}, ref

    got, ref = all_methods()
    for method in ("pfor", "separate", "auto"):
        _assert_same_grads(got[method], ref)
    got = got["pfor"]
    # the distillation losses do not reach the classifier: None like tape.gradient
    full = [i for i, v in enumerate(variables) if "full" in v.path]
    assert full and all(got[k][i] is None for k in (1, 2, 3) for i in full)
    assert all(got[0][i] is not None for i in full)
    # every loss reaches the first convolution with a non-zero gradient
    assert all(float(tf.reduce_max(tf.abs(got[k][0]))) > 0 for k in range(4))


def test_per_loss_gradients_eager_and_callable():
    """A small conv + batch-norm + dense model, three losses, one variable unreached by two."""
    from nets.layers import BatchNorm, Conv2D, Dense

    tf.random.set_seed(2)
    conv, bn, head, side = Conv2D(4, 3, name="c"), BatchNorm(name="b"), Dense(3, name="d"), \
        Dense(2, name="s")
    x = tf.random.stateless_normal([5, 6, 6, 2], seed=[1, 2])
    h = bn(conv(x), training=False)
    head(tf.reduce_mean(h, [1, 2]))
    side(tf.reduce_mean(h, [1, 2]))
    variables = conv.trainable_weights + bn.trainable_weights + head.trainable_weights \
        + side.trainable_weights

    def losses_fn():
        h = tf.nn.relu(bn(conv(x), training=True, update=False))
        pooled = tf.reduce_mean(h, [1, 2])
        return [tf.reduce_sum(tf.square(head(pooled))), tf.reduce_mean(h ** 3),
                tf.reduce_sum(tf.nn.softplus(side(pooled)))]

    with tf.GradientTape(persistent=True) as tape:
        losses = losses_fn()
    ref = [tape.gradient(loss, variables) for loss in losses]
    got = per_loss_gradients(tape, losses, variables, method="pfor")        # eager: zeros, not None
    for row, ref_row in zip(got, ref):
        for g, r in zip(row, ref_row):
            r = tf.zeros_like(g) if r is None else r
            np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)
    for method in ("pfor", "separate"):
        got = tf.function(lambda m=method: per_loss_gradients(losses_fn, None, variables, m))()
        _assert_same_grads(got, ref)
        assert [g is None for g in got[1]] == [False, False, False, True, True]


def test_per_loss_gradients_bad_input():
    v = tf.Variable([1.0, 2.0])
    with tf.GradientTape(persistent=True) as tape:
        a = tf.reduce_sum(v * v)
        vec = v * 3.0
    assert DEFAULT_METHOD in METHODS
    with pytest.raises(ValueError, match="method"):
        per_loss_gradients(tape, [a], [v], method="fast")
    with pytest.raises(ValueError, match="scalar"):
        per_loss_gradients(tape, [a, vec], [v])
    with pytest.raises(ValueError, match="non-empty"):
        per_loss_gradients(tape, [], [v])
    with pytest.raises(ValueError, match="variables"):
        per_loss_gradients(tape, [a], [])
    with pytest.raises(ValueError, match="losses must be None"):
        per_loss_gradients(lambda: [a], [a], [v])
    with pytest.raises(ValueError, match="GradientTape or a callable"):
        per_loss_gradients(3, [a], [v])


def test_compare_table_of_json_results(tmp_path, capsys):
    """``--compare`` tabulates earlier --json results (one row per method); a file that is not
    one is a one-line error naming it."""
    paths = []
    for method, floor, main in (("KD", 0.2, 0.25), ("IEP", 0.2, 0.5)):
        path = tmp_path / f"{method}.json"
        path.write_text(json.dumps({"settings": {"distillation": method}, "parts": {
            "floor": {"median_s": floor, "images_per_s": 64 / floor},
            "main": {"median_s": main, "images_per_s": 64 / main}}}))
        paths.append(str(path))
    assert bm.main(["--compare", *paths]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| KD | 0.200 | 0.250 | 1.25 | 256 |" and out[3] == "| IEP | 0.200 | 0.500 | 2.50 | 128 |"
    (tmp_path / "bad.json").write_text("{")
    assert bm.main(["--compare", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0] and err[0].startswith("benchmark: error:")
