"""Every ``--Distillation`` method on the one interface: registry and flags, one compiled step of
each phase through the one builder (what moves and what must not), and a whole tiny training run
through ``trainer.run`` for each method. Tiny networks of unequal widths, 16x16, batch 8."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf import config, trainer
from iepkt_tf.distillers import METHODS, build
from iepkt_tf.distillers.base import Distiller
from iepkt_tf.mat_io import collect_params, save_mat
from nets.nets_factory import get_network
from op_util import train_steps as ts
from op_util.optimizer import NesterovMomentum

SIZE, CLASSES, BATCH = 16, 4, 8
DISTILLING = [m for m in METHODS if m != "None"]


def test_registry_and_flags():
    assert list(METHODS)[:2] == ["None", "KD"] and {"AT", "FT", "AB", "RKD", "MHGD", "CO", "IEP"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert issubclass(cls, Distiller) and cls.name == name
        assert cls.grad_rule in ("weighted", "clip")
        for f in cls.flags:
            assert f.name in config.FLAG_NAMES and f.help.startswith(name), (name, f.name)  # --helpfull groups them
    # each method's own flags belong to it alone
    assert all(len(owners) == 1 for owners in config.FLAG_OWNERS.values())


@pytest.mark.parametrize("method, flag, value", [("IEP", "at_beta", 10.0), ("KD", "mpnn_iter", 3),
                                                  ("None", "kd_weight", 0.5), ("AT", "co_weight", 1.0)])
def test_a_flag_of_another_method_is_a_one_line_error(method, flag, value):
    with pytest.raises(config.ConfigError, match=rf"^--{flag} is a flag of --Distillation \w+, not of {method}$"):
        config.resolve_config(config.make_config(Distillation=method, teacher_params="t.mat",
                                                 **{flag: value}))


@pytest.mark.parametrize("flag, value", [("kd_temperature", 0.0), ("kd_weight", 1.5), ("at_beta", -1.0),
                                         ("ft_beta", -2.0), ("ab_margin", -1.0), ("co_weight", -1.0)])
def test_a_bad_method_flag_value_names_the_flag(flag, value):
    (method,) = config.FLAG_OWNERS[flag]
    with pytest.raises(config.ConfigError, match=rf"^--{flag} must"):
        config.resolve_config(config.make_config(Distillation=method, teacher_params="t.mat",
                                                 **{flag: value}))


def _nets():
    tf.random.set_seed(1)
    student = get_network("WResNet-10-1", CLASSES, "Student", SIZE, True)
    teacher = get_network("WResNet-10-2", CLASSES, "Teacher", SIZE, False)
    return student, teacher


def _batch(i):
    images = tf.random.stateless_normal([BATCH, SIZE, SIZE, 3], seed=[i, 3])
    labels = tf.constant([0, 1, 2, 3] * 2, tf.int32)
    return images, labels


def _values(named):
    return {n: v.numpy().copy() for n, v in named.items()}


@pytest.mark.parametrize("name", DISTILLING)
def test_one_step_of_each_phase_moves_exactly_what_it_trains(name):
    student, teacher = _nets()
    method = build(name, student, teacher, image_size=(SIZE, SIZE))
    opt = NesterovMomentum(ts.optimizer_variables(student, method))
    t_before = _values(teacher.tf1_variables())
    own = method.tf1_variables()
    init_names = set(_names(method.init_variables(), own))
    main_names = set(_names(method.main_variables(), own))
    if method.default_init_epoch:
        s0, d0 = _values(student.tf1_variables()), _values(own)
        init = ts.make_init_step(method, student, teacher, opt, 5e-4)
        for i in range(2):  # IEP's first step reads a zero PCA state: some gradients are 0 then
            out = init(*_batch(10 + i), tf.constant(0.01), ts.step_seed(0, i))
        assert all(np.isfinite(float(v)) for v in out.values()), out
        s1, d1 = _values(student.tf1_variables()), _values(own)
        moved = {n for n in d0 if not np.array_equal(d0[n], d1[n])}
        assert len(moved & init_names) >= 0.5 * len(init_names), (name, init_names - moved)
        assert not (moved - init_names - _state_names(own)), (name, moved - init_names)
        s_moved = {n for n in s0 if not np.array_equal(s0[n], s1[n])}
        assert bool(s_moved) == method.init_trains_student, name
    s0, d0 = _values(student.tf1_variables()), _values(own)
    step = ts.make_main_step(method, student, teacher, opt, 5e-4)
    for i in range(2):
        out = step(*_batch(i + 1), tf.constant(0.01), tf.constant(0.5), ts.step_seed(0, i + 1))
    assert step.experimental_get_tracing_count() == 1
    assert all(np.isfinite(float(v)) for v in out.values()), out
    terms = [k for k in out if k not in ("loss", "cross_entropy", "weight_decay", "accuracy", "applied",
                                         "warmup") and not k.startswith("grad_norm")]
    assert bool(terms) == (name != "AB"), (name, terms)  # AB's main phase is cross-entropy alone
    s1, d1 = _values(student.tf1_variables()), _values(own)
    assert any(not np.array_equal(s0[n], s1[n]) for n in s0 if n.endswith("/weights"))
    moved = {n for n in d0 if not np.array_equal(d0[n], d1[n])}
    assert main_names <= moved, (name, main_names - moved)
    assert not (moved - main_names - _state_names(own)), (name, moved - main_names)
    for n, v in teacher.tf1_variables().items():  # the teacher never moves, statistics included
        np.testing.assert_array_equal(v.numpy(), t_before[n], err_msg=n)


def _names(variables, named):
    by_id = {id(v): n for n, v in named.items()}
    return [by_id[id(v)] for v in variables]


def _state_names(own):
    """Non-trainable state a phase may update (BN moving statistics, PCA state)."""
    return {n for n, v in own.items() if not v.trainable}


@pytest.fixture(scope="module")
def teacher_mat(tmp_path_factory):
    _, teacher = _nets()
    path = str(tmp_path_factory.mktemp("teacher") / "train_params.mat")
    save_mat(path, collect_params(teacher.tf1_variables(), scope="Teacher"))
    return path


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_end_to_end(name, teacher_mat, tmp_path):
    cfg = dict(Distillation=name, student_arch="WResNet-10-1", dataset="synthetic",
               synthetic_classes=CLASSES, synthetic_train_per_class=8, synthetic_test_per_class=2,
               synthetic_image_size=SIZE, batch_size=BATCH, val_batch_size=8, train_epoch=1,
               vis_every=0, precision="float32", log_every=1, train_dir=str(tmp_path))
    if name != "None":
        cfg.update(teacher_arch="WResNet-10-2", teacher_params=teacher_mat)
    if METHODS[name].default_init_epoch:
        cfg["init_epoch"] = 1
    res = trainer.run(config.make_config(**cfg))
    assert not res["stopped"] and res["epochs_done"] == 1 + int("init_epoch" in cfg)
    assert np.all(np.isfinite(res["logs"]["validation_acc"]))
