"""What each phase of each method moves, and by how much, when every loss is zero: only weight
decay acts then, so one Nesterov step from zero momentum moves a variable by exactly
``-lr (1 + momentum) d`` with ``d`` its decay gradient (``op_util.optimizer``), and leaves it alone
where the authors leave it alone. The losses are multiplied by 0 (not replaced), so every variable
they reach still receives a (zero) gradient. Tiny networks of unequal widths, 16x16, batch 8."""
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.distillers import METHODS, build
from nets.layers import names_of
from nets.nets_factory import get_network
from op_util import train_steps as ts
from op_util.optimizer import NesterovMomentum, is_decayed, leaf_name

SIZE, CLASSES, BATCH = 16, 4, 8
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
# What the authors' code decays in each method's own variables (module docstring of base.py).
AUTHORS_FORM = {"AT": "tf2", "FT": "tf2", "AB": "tf2", "CO": "tf2", "MHGD": "mhgd", "IEP": "mhgd"}


def _setup(name):
    tf.random.set_seed(1)
    student = get_network("WResNet-10-1", CLASSES, "Student", SIZE, True)
    teacher = get_network("WResNet-10-2", CLASSES, "Teacher", SIZE, False)
    method = build(name, student, teacher, image_size=(SIZE, SIZE))
    opt = NesterovMomentum(ts.optimizer_variables(student, method), momentum=MOMENTUM)
    return student, teacher, method, opt


def _zeroed(fn):
    def wrapped(*args):
        return {k: 0.0 * v for k, v in fn(*args).items()}
    return wrapped


def _trainables(*nets_and_methods):
    out = {}
    for x in nets_and_methods:
        out.update({n: v for n, v in x.tf1_variables().items() if v.trainable})
    return out


def _check_moves(before, after, expected_grad):
    """``after == before - lr (1 + m) g`` with ``g = expected_grad[name]`` (0 where absent)."""
    for n, v0 in before.items():
        g = expected_grad.get(n)
        want = v0 if g is None else v0 - LR * (1 + MOMENTUM) * g
        np.testing.assert_allclose(after[n], want, rtol=1e-5, atol=1e-9, err_msg=n)
        if g is None:
            assert np.array_equal(after[n], v0), f"{n} moved"


def _values(named):
    return {n: v.numpy().copy() for n, v in named.items()}


def _batch():
    images = tf.random.stateless_normal([BATCH, SIZE, SIZE, 3], seed=[5, 3])
    return images, tf.constant([0, 1, 2, 3] * 2, tf.int32)


def test_each_method_declares_its_authors_form():
    for name, form in AUTHORS_FORM.items():
        assert METHODS[name].module_decay == form, name


@pytest.mark.parametrize("name", [m for m in METHODS if METHODS[m].default_init_epoch])
def test_initial_phase_decays_only_what_the_authors_decay(name):
    student, teacher, method, opt = _setup(name)
    method.init_losses = _zeroed(method.init_losses)
    own = method.tf1_variables()
    init_names = set(names_of(method.init_variables(), own))
    before = _values(_trainables(student, teacher, method))
    step = ts.make_init_step(method, student, teacher, opt, WD)
    step(*_batch(), tf.constant(LR), ts.step_seed(0, 0))
    expected = {}
    for n in init_names:
        v = before[n]
        if method.module_decay == "tf2":
            expected[n] = WD * v                      # g + v * wd on every variable it trains
        elif leaf_name(n)[:1] in ("g", "w", "b"):
            expected[n] = 2 * WD * v                  # d/dv of wd * sum(v**2), Optimizer_w_MHGD
    if method.init_trains_student:                    # AB: the student where the loss reaches it
        for n in student.tf1_variables():
            if n in before and is_decayed(n) and "/full/" not in n:
                expected[n] = WD * before[n]
    after = _values(_trainables(student, teacher, method))
    _check_moves(before, after, expected)
    if name == "AB":  # the classifier is out of the boundary loss's reach: it leaves as drawn
        assert np.array_equal(after["Student/full/weights"], before["Student/full/weights"])


@pytest.mark.parametrize("name", [m for m in METHODS if m != "None"])
def test_main_phase_decays_the_student_and_the_methods_variables(name, monkeypatch):
    student, teacher, method, opt = _setup(name)
    method.main_losses = _zeroed(method.main_losses)
    ce = ts.cross_entropy
    monkeypatch.setattr(ts, "cross_entropy", lambda logits, labels: 0.0 * ce(logits, labels))
    own = method.tf1_variables()
    main_names = set(names_of(method.main_variables(), own))
    before = _values(_trainables(student, teacher, method))
    step = ts.make_main_step(method, student, teacher, opt, WD)
    step(*_batch(), tf.constant(LR), tf.constant(1.0), ts.step_seed(0, 1))
    expected = {n: WD * before[n] for n in student.tf1_variables() if n in before and is_decayed(n)}
    for n in main_names:
        if method.module_decay == "tf2" or is_decayed(n):
            expected[n] = WD * before[n]
    _check_moves(before, _values(_trainables(student, teacher, method)), expected)
