"""WResNet parity with the authors' TF1 network (fixture h_wresnet), ResNet, and the factory."""
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.mat_io import assign_params
from nets import nets_factory
from nets.resnet import ResNet
from nets.layers import collect_tf1_variables
from nets.wresnet import BasicBlock, WResNet
from tests.conftest import assert_close as _assert_close, load_fixture

TOL = 1e-4  # |diff| <= TOL * max|ref| (fixtures README, forward values)


def assert_close(got, ref, name):
    _assert_close(got, ref, TOL, name)


def wresnet_config(names_shapes, scope):
    """(depth, widen_factor, num_classes) read from stored TF1 names and shapes."""
    blocks = {(int(g), int(i)) for k in names_shapes
              for g, i in re.findall(rf"^{scope}/WResblock(\d)/BasicBlock(\d+)/", k)}
    per_group = {g: sum(1 for gg, _ in blocks if gg == g) for g in range(3)}
    assert len(set(per_group.values())) == 1, per_group
    n = per_group[0]
    width = names_shapes[f"{scope}/WResblock2/BasicBlock0/conv0/weights"][-1] // 64
    assert names_shapes[f"{scope}/WResblock0/BasicBlock0/conv0/weights"][-1] == 16 * width
    num_classes = names_shapes[f"{scope}/full/weights"][-1]
    return 6 * n + 4, width, num_classes


@pytest.fixture(scope="module")
def h():
    f = load_fixture("h_wresnet.npz")
    return {k: f[k] for k in f.files}


def build_from_fixture(h, scope, is_main):
    shapes = {k: v.shape for k, v in h.items()}
    depth, width, classes = wresnet_config(shapes, scope)
    image_size = h["image"].shape[1:]
    net = WResNet(depth, width, classes, scope=scope,
                  keep_rate=nets_factory.keep_rate_for(image_size, is_main)).build_for(image_size)
    params = {k: v for k, v in h.items() if k.startswith(scope + "/")}
    n = assign_params(net.tf1_variables(), params, scope=scope)
    assert n == len(params) == len(net.tf1_variables())
    return net


def test_wresnet_inference_parity(h):
    student = build_from_fixture(h, "Student", is_main=True)
    teacher = build_from_fixture(h, "Teacher", is_main=False)
    assert student.keep_rate == pytest.approx(0.7) and teacher.keep_rate == 1.0
    logits, feats = student(h["image"], training=False)
    assert logits.dtype == tf.float32
    assert_close(logits, h["out/infer/logits"], "student infer logits")
    assert len(feats) == 4
    for i, x in enumerate(feats):
        assert_close(x, h[f"out/infer/feat{i}"], f"student feat{i}")
    t_logits, t_feats = teacher(h["image"], training=False)
    assert_close(t_logits, h["out/teacher/logits"], "teacher logits")
    for i, x in enumerate(t_feats):
        assert_close(x, h[f"out/infer/feat{i + 4}"], f"teacher feat{i}")
    # class loss and accuracy as train_w_distill.MODEL computes them
    labels = h["label"]
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    assert_close(np.mean(loss), h["out/infer/class_loss"], "class_loss")
    assert np.mean(np.argmax(logits, 1) == labels) == pytest.approx(float(h["out/infer/accuracy"]))


def test_wresnet_training_parity_with_masks_and_bn_update(h):
    student = build_from_fixture(h, "Student", is_main=True)
    prefix = "dropout_mask/"
    masks = {k[len(prefix):]: v for k, v in h.items() if k.startswith(prefix)}
    assert masks and set(masks) <= set(student.dropout_scopes)

    step = tf.function(lambda x, m: student(x, training=True, dropout_masks=m))
    logits, feats = step(tf.constant(h["image"]), masks)
    assert_close(logits, h["out/train/logits"], "student train logits")
    for i, x in enumerate(feats):
        assert_close(x, h[f"out/train/feat{i}"], f"student train feat{i}")
    variables = student.tf1_variables()
    prefix = "after_train_update/"
    updated = {k[len(prefix):]: v for k, v in h.items() if k.startswith(prefix)}
    assert updated and all(k.endswith(("moving_mean", "moving_variance")) for k in updated)
    for name, ref in updated.items():
        assert not np.allclose(h[name], ref), f"{name}: fixture update is a no-op"
        assert_close(variables[name].numpy(), ref, name)


def test_dropout_masks_are_used_and_random_dropout_is_active(h):
    student = build_from_fixture(h, "Student", is_main=True)
    ones = {k: np.ones_like(v) for k, v in h.items() if k.startswith("dropout_mask/")}
    ones = {k[len("dropout_mask/"):]: v for k, v in ones.items()}
    no_drop, _ = student(h["image"], training=True, dropout_masks=ones)
    assert np.abs(no_drop.numpy() - h["out/train/logits"]).max() > 1e-3
    tf.random.set_seed(1)
    a, _ = student(h["image"], training=True)
    b, _ = student(h["image"], training=True)
    assert np.abs(a.numpy() - b.numpy()).max() > 1e-4  # two random keep-masks
    with pytest.raises(ValueError, match="Student/WResblock9"):
        student(h["image"], training=True, dropout_masks={"Student/WResblock9/BasicBlock0/Dropout": ones[
            "Student/WResblock0/BasicBlock0/Dropout"]})


def test_wresnet_names_equal_in_out_path_and_large_input_stem():
    # width 1: the first block keeps 16 channels (equalInOut path, no conv2 shortcut)
    net = WResNet(10, 1, 10, scope="Teacher").build_for((16, 16))
    names = net.tf1_variables()
    assert "Teacher/WResblock0/BasicBlock0/conv2/weights" not in names
    assert "Teacher/WResblock1/BasicBlock0/conv2/weights" in names
    assert tuple(names["Teacher/conv0/weights"].shape) == (7, 7, 3, 16)  # not 32 high: 7x7/2
    assert tuple(names["Teacher/full/biases"].shape) == (10,)
    assert not np.any(names["Teacher/full/biases"].numpy())  # zero-initialised bias
    assert sum(k.endswith("moving_mean") for k in names) == 3 * 2 + 1
    assert len(names) == len(net.trainable_variables) + len(net.non_trainable_variables)
    x = tf.random.stateless_uniform([8, 16, 16, 3], seed=[1, 2])
    logits, feats = net(x)
    assert logits.shape == (8, 10)
    assert [tuple(f.shape[1:]) for f in feats] == net.feature_shapes((16, 16)) == \
        [(8, 8, 16), (8, 8, 16), (4, 4, 32), (2, 2, 64)]
    assert [f.shape[-1] for f in feats] == net.feature_channels
    # equalInOut: feats[0] is BN+ReLU(stem) and is non-negative
    assert np.all(feats[0].numpy() >= 0)


def test_basic_block_equal_in_out_reference():
    """equalInOut (width unchanged): residual reads BN+ReLU(x), the shortcut is the raw x."""
    block = BasicBlock(16, 16, 1, keep_rate=1.0)
    x = tf.random.stateless_normal([8, 16, 16, 16], seed=[9, 9])
    block(x)
    layers = collect_tf1_variables(block.tf1_layers())
    assert "conv2/weights" not in layers
    rng = np.random.default_rng(1)
    for k, v in layers.items():
        if k.endswith(("gamma", "moving_variance")):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
        elif k.endswith(("beta", "moving_mean")):
            v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
    y, entry = block(x, training=False)

    def bn(t, s):
        g, b, m, v = (layers[f"{s}/{n}"] for n in ("gamma", "beta", "moving_mean", "moving_variance"))
        return (t - m) / tf.sqrt(v + 1e-5) * g + b

    ref_entry = tf.nn.relu(bn(x, "bn"))
    out = tf.nn.relu(bn(tf.nn.conv2d(ref_entry, layers["conv0/weights"], 1, "SAME"), "bn0"))
    ref = x + tf.nn.conv2d(out, layers["conv1/weights"], 1, "SAME")
    assert_close(entry, ref_entry, "entry")
    assert_close(y, ref, "block output")


def test_wresnet_32_stem_depth_errors_and_unbuilt():
    net = WResNet(16, 2, 5, scope="Student")
    with pytest.raises(RuntimeError, match="build_for"):
        net.tf1_variables()
    net.build_for(32)
    assert tuple(net.tf1_variables()["Student/conv0/weights"].shape) == (3, 3, 3, 16)
    assert "Student/WResblock2/BasicBlock1/conv1/weights" in net.tf1_variables()
    assert net.feature_channels == [16, 32, 64, 128]
    with pytest.raises(ValueError, match="32-pixel-high"):
        net(tf.zeros([1, 16, 16, 3]))
    with pytest.raises(ValueError, match="6n\\+4"):
        WResNet(15, 4, 10)


def test_resnet_forward_names_and_reference():
    net = ResNet(8, 10, scope="Student").build_for((16, 16))
    names = net.tf1_variables()
    assert "Student/Resblock0/BasicBlock0/conv2/weights" not in names  # 16 -> 16, stride 1
    for g in (1, 2):
        for leaf in ("conv2/weights", "bn2/gamma", "bn2/moving_variance"):
            assert f"Student/Resblock{g}/BasicBlock0/{leaf}" in names
    # give BN non-trivial statistics, then check against a plain re-computation in inference mode
    rng = np.random.default_rng(0)
    for k, v in names.items():
        if k.endswith(("gamma", "moving_variance")):
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
        elif k.endswith(("beta", "moving_mean", "biases")):
            v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
    x = tf.random.stateless_uniform([8, 16, 16, 3], seed=[3, 4])
    logits, feats = net(x)

    def conv(t, scope, stride):
        return tf.nn.conv2d(t, names[scope + "/weights"], stride, "SAME")

    def bn(t, scope):
        g, b, m, v = (names[f"{scope}/{n}"] for n in ("gamma", "beta", "moving_mean", "moving_variance"))
        return (t - m) / tf.sqrt(v + 1e-5) * g + b

    y = tf.nn.relu(bn(conv(x, "Student/conv0", 2), "Student/bn0"))  # 16 high: 7x7/2 stem
    ref_feats = [y]
    for g, stride in enumerate((1, 2, 2)):
        s = f"Student/Resblock{g}/BasicBlock0"
        out = tf.nn.relu(bn(conv(y, s + "/conv0", stride), s + "/bn0"))
        out = bn(conv(out, s + "/conv1", 1), s + "/bn1")
        short = bn(conv(y, s + "/conv2", stride), s + "/bn2") if g else y
        y = tf.nn.relu(short + out)
        ref_feats.append(y)
    ref_logits = tf.reduce_mean(y, [1, 2]) @ names["Student/full/weights"] + names["Student/full/biases"]
    assert_close(logits, ref_logits, "resnet logits")
    for i, (a, b) in enumerate(zip(feats, ref_feats)):
        assert_close(a, b, f"resnet feat{i}")
    assert [tuple(f.shape[1:]) for f in feats] == net.feature_shapes((16, 16))
    assert net.feature_channels == [16, 16, 32, 64]
    with pytest.raises(ValueError, match="no dropout"):
        net(x, training=True, dropout_masks={"a": np.ones([1], bool)})


def test_resnet_depth_blocks():
    net = nets_factory.get_network("ResNet-20", 10, "Student", (32, 32, 3), is_main=True)
    names = net.tf1_variables()
    assert {int(i) for k in names for i in re.findall(r"Resblock2/BasicBlock(\d+)/", k)} == {0, 1, 2}
    assert tuple(names["Student/conv0/weights"].shape) == (3, 3, 3, 16)
    assert net.keep_rate == 1.0
    assert nets_factory.arch_from_params({k: v.numpy() for k, v in names.items()}, "Student") == "ResNet-20"
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet(21, 10)


def test_factory_parse_and_errors():
    assert nets_factory.parse_arch("WResNet-40-4") == ("WResNet", 40, 4)
    assert nets_factory.parse_arch("WResNet-16-2") == ("WResNet", 16, 2)
    assert nets_factory.parse_arch("ResNet-56") == ("ResNet", 56, 1)
    assert nets_factory.DEFAULT_ARCH == {"Student": "WResNet-16-4", "Teacher": "WResNet-40-4"}
    assert set(nets_factory.networks_map) == {"WResNet", "ResNet"}
    for bad in ("VGG-16", "WResNet-16", "wresnet-16-4", "WResNet-15-4", "ResNet-21", "ResNet-56-2", 7):
        with pytest.raises(ValueError) as e:
            nets_factory.parse_arch(bad)
        assert "WResNet-<depth>-<width>" in str(e.value) and "ResNet-<depth>" in str(e.value)
        assert str(bad) in str(e.value)


def test_factory_keep_rate_rules_and_arch_from_params(h):
    assert nets_factory.keep_rate_for(32, True) == 0.7
    assert nets_factory.keep_rate_for((32, 32, 3), False) == 1.0  # frozen teacher never drops
    assert nets_factory.keep_rate_for((64, 64), True) == 1.0
    main = nets_factory.get_network("WResNet-10-1", 7, "Student", (16, 16), is_main=True)
    assert main.keep_rate == 1.0 and isinstance(main, WResNet)
    assert tuple(main.tf1_variables()["Student/conv0/weights"].shape) == (7, 7, 3, 16)
    main32 = nets_factory.get_network("WResNet-10-1", 7, "Student", 32, is_main=True)
    teacher32 = nets_factory.get_network("WResNet-10-1", 7, "Teacher", 32, is_main=False)
    assert main32.keep_rate == pytest.approx(0.7) and teacher32.keep_rate == 1.0
    x = tf.random.stateless_uniform([4, 32, 32, 3], seed=[5, 6])
    a, _ = teacher32(x, training=True)
    b, _ = teacher32(x, training=True)
    np.testing.assert_array_equal(a.numpy(), b.numpy())  # keep_rate 1: no random draw
    # architecture strings read back from stored parameters
    for scope in ("Student", "Teacher"):
        d, w, _ = wresnet_config({k: v.shape for k, v in h.items()}, scope)
        assert nets_factory.arch_from_params(h, scope) == f"WResNet-{d}-{w}"
    with pytest.raises(ValueError, match="no parameters under scope"):
        nets_factory.arch_from_params(h, "Distillation")


def test_mixed_precision_logits_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        net = WResNet(10, 1, 10, scope="Student", keep_rate=0.7).build_for(32)
        x = tf.random.stateless_uniform([4, 32, 32, 3], seed=[7, 8])
        logits, feats = net(x, training=True)
        assert logits.dtype == tf.float32
        assert feats[1].dtype == tf.bfloat16
        assert all(v.dtype == "float32" for v in net.tf1_variables().values())
        assert np.all(np.isfinite(logits.numpy()))
    finally:
        keras.mixed_precision.set_global_policy("float32")
