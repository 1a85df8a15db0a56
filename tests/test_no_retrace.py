"""Every compiled step traces once and then runs without retracing, Python or host round-trips.

Tiny networks (WResNet-10-1, 16x16 images, batch 8). Each step kind runs 3 times with new values
of every tensor argument (images, labels, learning rate, warm-up, seed), under float32 and under
mixed_bfloat16; its tf.function's tracing count must stay 1. The traced graphs must hold no Python
callbacks, decompositions must be the batched Gram + eigh (SVD only where the authors' near-square
branch asks for it, and in the incremental-PCA update) and run in float32 under mixed precision.
"""
import keras
import pytest
import tensorflow as tf

import copy

from iepkt_tf.benchmark import _make_floor_step
from iepkt_tf.distillers import build
from iepkt_tf.stacked_pca import branch_of
from nets.nets_factory import get_network
from op_util import train_steps as ts
from op_util.multi_grad import per_loss_gradients
from op_util.optimizer import NesterovMomentum

BATCH, SIZE, CLASSES = 8, 16, 10
PY_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
CALL_OPS = {"PartitionedCall", "StatefulPartitionedCall"}
DECOMPOSITIONS = {"SelfAdjointEigV2", "Svd"}


def all_ops(graph):
    """Every op of ``graph`` and of the functions it calls (calls, cond branches, loops)."""
    out = []
    for op in graph.get_operations():
        out.append(op)
        for attr in ("f", "then_branch", "else_branch", "body", "cond"):
            try:
                name = op.get_attr(attr).name
            except (ValueError, AttributeError):
                continue
            fn = graph._get_function(name)  # noqa: SLF001
            if fn is not None:
                out.extend(all_ops(fn.graph))
    return out


@pytest.fixture(scope="module", params=["float32", "mixed_bfloat16"])
def setup(request):
    before = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(request.param)
    try:
        tf.random.set_seed(0)
        student = get_network("WResNet-10-1", CLASSES, "Student", SIZE, True)
        teacher = get_network("WResNet-10-1", CLASSES, "Teacher", SIZE, False)
        iep = build("IEP", student, teacher)
        summed = copy.copy(iep)  # the same layer and variables under the other clip rule
        summed.clip_rule = "summed"
        plain = build("None", student, None)
        opt = NesterovMomentum(ts.optimizer_variables(student, iep))
        steps = {
            "plain": ts.make_main_step(plain, student, None, opt, 5e-4),
            "eval": ts.make_eval_step(student),
            "init": ts.make_init_step(iep, student, teacher, opt, 5e-4),
            "main": ts.make_main_step(iep, student, teacher, opt, 5e-4),
            "main_summed": ts.make_main_step(summed, student, teacher, opt, 5e-4),
            "kd": ts.make_main_step(build("KD", student, teacher), student, teacher, opt, 5e-4),
        }
        steps["floor"] = _make_floor_step(teacher, ts.make_main_step(plain, student, None, opt, 5e-4), False)
        yield {"policy": request.param, "steps": steps, "student": student, "teacher": teacher,
               "distiller": iep.layer}
    finally:
        keras.mixed_precision.set_global_policy(before)


def args_for(kind, i):
    images = tf.random.stateless_normal([BATCH, SIZE, SIZE, 3], seed=[i, 1])
    labels = tf.random.stateless_uniform([BATCH], seed=[i, 2], minval=0, maxval=CLASSES,
                                         dtype=tf.int32)
    lr = tf.constant(0.01 / (i + 1), tf.float32)
    seed = ts.step_seed(7, i)
    if kind == "eval":
        return images, labels
    if kind == "init":
        return images, labels, lr, seed
    return images, labels, lr, tf.constant(0.5 + 0.2 * i, tf.float32), seed


# init first: it gives the incremental PCA its state, as phase 1 does before phase 2.
@pytest.mark.parametrize("kind", ["init", "main", "main_summed", "plain", "kd", "floor", "eval"])
def test_step_traces_once(setup, kind):
    step = setup["steps"][kind]
    for i in range(3):
        out = step(*args_for(kind, i))
        for v in tf.nest.flatten(out):
            assert bool(tf.reduce_all(tf.math.is_finite(tf.cast(v, tf.float32)))), (kind, i)
    assert step.experimental_get_tracing_count() == 1, kind


@pytest.mark.parametrize("kind", ["init", "main", "main_summed", "plain", "kd", "floor", "eval"])
def test_step_graph_has_no_python_and_float32_decompositions(setup, kind):
    step = setup["steps"][kind]
    graph = step.get_concrete_function(*args_for(kind, 0)).graph
    ops = all_ops(graph)
    assert not [op.type for op in ops if op.type in PY_OPS], kind
    decomp = [op for op in ops if op.type in DECOMPOSITIONS]
    for op in decomp:
        assert op.get_attr("T") == tf.float32, (kind, op.name, setup["policy"])
    if kind in ("main", "main_summed", "init"):
        shapes = setup["teacher"].feature_shapes(SIZE)[1:4]
        branches = [branch_of(h * w, c) for h, w, c in shapes]
        eigh = sum(op.type == "SelfAdjointEigV2" for op in decomp)
        svd = sum(op.type == "Svd" for op in decomp)
        # one batched eigh per Gram-branch point; SVD for near-square points, and in the init
        # step the incremental-PCA update of every point.
        assert eigh == sum(b != "svd" for b in branches)
        assert svd == sum(b == "svd" for b in branches) + (len(shapes) if kind == "init" else 0)
    else:
        assert not decomp, kind
    # the step calls no nested function it would have to dispatch through Python
    assert step.experimental_get_tracing_count() == 1


def test_per_loss_gradients_in_a_step_traces_once(setup):
    """The vectorised (pfor) per-loss gradients inside a tf.function: traced once, no Python."""
    student = setup["student"]
    variables = [v for v in student.trainable_variables]

    @tf.function(reduce_retracing=True)
    def grads(images, labels, seed):
        with tf.GradientTape(persistent=True) as tape:
            logits, feats, _ = ts.forward(student, images, True, seed)
            ce = ts.cross_entropy(logits, labels)
            f1 = tf.reduce_mean(tf.square(tf.cast(feats[1], tf.float32)))
            f3 = tf.reduce_mean(tf.cast(feats[3], tf.float32))
        g = per_loss_gradients(tape, [ce, f1, f3], variables, method="pfor")
        return [tf.add_n([tf.reduce_sum(x) for x in row if x is not None]) for row in g]

    for i in range(3):
        images, labels, _, seed = args_for("init", i)
        out = grads(images, labels, seed)
        assert all(bool(tf.math.is_finite(x)) for x in out)
    assert grads.experimental_get_tracing_count() == 1
    ops = all_ops(grads.get_concrete_function(*args_for("plain", 0)[:2], ts.step_seed(7, 0)).graph)
    assert not [op.type for op in ops if op.type in PY_OPS]
    assert not [op.type for op in ops if op.type in ("While", "StatelessWhile")], \
        "pfor fell back to a while loop"
