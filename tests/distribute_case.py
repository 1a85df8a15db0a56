"""One step of a method on 2 logical CPU replicas against the same step on one device.

Run as a script by tests/test_distribute.py (logical devices must be made before TensorFlow
starts, so not inside the pytest process): ``python tests/distribute_case.py CASE...`` with CASE
``<method>:<phase>[:replica|:overflow]`` (phase ``init`` or ``main``; ``replica``: ``--batch_graph
replica``; ``overflow``: mixed_float16 with a loss scale of 1e30, so every step is skipped)
prints one JSON line per case with the largest
relative difference of every compared quantity (absolute below 1 for metrics, below 0.01 for
arrays): the step's metrics, the updated variables of
student and method (each replica's copy), the optimiser's Momentum slots (after the first step
from zero, the applied gradient) and the method's state (IEP's PCA states, batch-norm statistics).
Two steps are taken, so the second reads state the first wrote.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from iepkt_tf.distillers import build  # noqa: E402
from nets.layers import synchronize_batch_norm  # noqa: E402
from nets.nets_factory import get_network  # noqa: E402
from op_util import distribute  # noqa: E402
from op_util import train_steps as ts  # noqa: E402
from op_util.optimizer import DynamicLossScale, NesterovMomentum  # noqa: E402

SIZE, CLASSES, BATCH, LR = 16, 4, 8, 0.01  # RKD's first gradients are ~10^3: a tame step


def batches():
    out = []
    for i in range(2):
        images = tf.random.stateless_normal([BATCH, SIZE, SIZE, 3], seed=[i, 3])
        labels = tf.constant([0, 1, 2, 3, 3, 2, 1, 0], tf.int32)
        out.append((images, labels))
    return out


def build_all(name, strategy, values=None):
    """Student, teacher, method and optimiser (created for ``strategy``), with ``values`` copied in."""
    with distribute.variable_scope(strategy):
        tf.random.set_seed(1)
        student = get_network("WResNet-10-1", CLASSES, "Student", SIZE, True)
        teacher = get_network("WResNet-10-2", CLASSES, "Teacher", SIZE, False)
        method = build(name, student, teacher, image_size=(SIZE, SIZE))
        opt = NesterovMomentum(ts.optimizer_variables(student, method))
    synchronize_batch_norm(student)
    named = every_variable(student, teacher, method, opt)
    if values is not None:
        for k, v in named.items():
            v.assign(values[k])
    return student, teacher, method, opt, named


def every_variable(student, teacher, method, opt):
    named = {"s/" + k: v for k, v in student.tf1_variables().items()}
    named.update({"t/" + k: v for k, v in teacher.tf1_variables().items()})
    named.update({"m/" + k: v for k, v in method.state_variables().items()})
    named.update({"m/" + k: v for k, v in method.tf1_variables().items()})
    named.update({"o/" + k: v for k, v in opt.slots.items()})
    return named


def copies(v):
    """Each replica's copy of a (mirrored) variable as numpy."""
    return [np.asarray(c.numpy()) for c in getattr(v, "values", (v,))]


def rel(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.dtype == bool or ref.size == 0:
        return float(np.any(got != ref))
    return float(np.max(np.abs(got - ref)) / max(1e-2, float(np.max(np.abs(ref)))))


def make_step(phase, method, student, teacher, opt, replicas, loss_scale=None):
    kw = dict(replicas=replicas, loss_scale=loss_scale)
    if phase == "init":
        fn = ts.make_init_step(method, student, teacher, opt, 5e-4, **kw)
        return lambda b, s: fn(b[0], b[1], tf.constant(LR), ts.step_seed(0, s))
    fn = ts.make_main_step(method, student, teacher, opt, 5e-4, **kw)
    return lambda b, s: fn(b[0], b[1], tf.constant(LR), tf.constant(1.0), ts.step_seed(0, s))


def run_case(case):
    name, phase, batch_graph = (case + ":global").split(":")[:3]
    overflow = batch_graph == "overflow"  # mixed_float16 with a loss scale that overflows
    if overflow:
        keras.mixed_precision.set_global_policy("mixed_float16")
        batch_graph = "global"
    data = batches()
    student, teacher, method, opt, named = build_all(name, None)
    scales = [DynamicLossScale(1e30) if overflow else None]
    if phase == "main" and method.default_init_epoch:  # the main phase reads what init wrote
        warm_up = make_step("init", method, student, teacher, opt, None)
        for i, b in enumerate(data):
            warm_up(b, 10 + i)
    start = {k: v.numpy() for k, v in named.items()}
    step = make_step(phase, method, student, teacher, opt, None, scales[0])
    ref_metrics = [{k: float(v) for k, v in step(b, i).items()} for i, b in enumerate(data)]
    ref = {k: v.numpy() for k, v in named.items()}

    strategy = distribute.make_strategy("mirrored", 2)
    d_student, d_teacher, d_method, d_opt, d_named = build_all(name, strategy, start)
    replicas = distribute.Replicas(strategy, batch_graph)
    with distribute.variable_scope(strategy):
        scales.append(DynamicLossScale(1e30) if overflow else None)
    d_step = make_step(phase, d_method, d_student, d_teacher, d_opt, replicas, scales[1])
    stacked = (tf.stack([b[0] for b in data]), tf.stack([b[1] for b in data]))
    sliced = list(iter(distribute.distribute_batches(
        strategy, lambda: tf.data.Dataset.from_tensor_slices(stacked), BATCH)))
    got_metrics = [{k: float(v) for k, v in d_step(b, i).items()} for i, b in enumerate(sliced)]

    out = {"case": case, "batch_graph": batch_graph, "metrics": 0.0, "variables": 0.0,
           "slots": 0.0, "state": 0.0, "replicas_equal": True, "moved": 0}
    for g, r in zip(got_metrics, ref_metrics):
        for k in r:
            err = abs(g[k] - r[k]) / max(1.0, abs(r[k]))  # small KLs: an absolute error
            if err > out["metrics"]:
                out["metrics"], out["worst_metric"] = err, [k, g[k], r[k]]
    for k, v in d_named.items():
        parts = copies(v)
        out["replicas_equal"] &= all(np.array_equal(parts[0], p) for p in parts[1:])
        kind = "slots" if k.startswith("o/") else "variables" if v.trainable else "state"
        out[kind] = max(out[kind], max(rel(p, ref[k]) for p in parts))
        out["moved"] += int(not np.array_equal(ref[k], start[k]))
        out["trained"] = out.get("trained", 0) + int(v.trainable and any(
            not np.array_equal(p, start[k]) for p in parts + [ref[k]]))
    if overflow:
        out["loss_scales"] = [float(ls.scale.numpy()) for ls in scales]
        keras.mixed_precision.set_global_policy("float32")
    return out


if __name__ == "__main__":
    for case in sys.argv[1:]:
        print(json.dumps(run_case(case)), flush=True)
