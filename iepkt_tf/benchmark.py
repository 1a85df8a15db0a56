"""Speed of the project's compiled steps: ``python -m iepkt_tf.benchmark``.

On random data, in one process, the benchmark times the steps users run (op_util.train_steps):

=========  ==================================================================================
student    student-only training (``make_main_step`` of ``--Distillation None``: forward,
           cross-entropy backward, update)
floor      teacher forward in inference mode + student training (the floor of any distillation)
main       the main-phase step of ``--Distillation`` (default IEP: teacher forward, student
           forward, four student backward passes: cross-entropy and each separately clipped
           distillation loss)
bare       (IEP) the same step code with a stand-in method (forwards, four backward passes,
           clipping, update), the three distillation losses replaced by stand-ins linear in the
           student's sensing-point maps (no PCA, MPNN or heads) -- what ``main`` costs the
           networks alone, so ``main - bare`` is the distiller's share
init       the method's initial-phase step (IEP: teacher forward, module training,
           incremental-PCA update; only for methods with an initial phase)
infer      student inference (``make_eval_step``)
=========  ==================================================================================

The parts are interleaved: every round runs one step of each part, the order rotated by one each
round, so drift (thermal, other processes) hits all parts equally. ``--warmup`` rounds (the first
traces and compiles) are discarded. Per part it prints the median and min-max seconds per step and
images/s, and the ratios ``main_over_floor`` and ``init_over_floor`` of the medians.

``--replicas N`` adds the parts ``student@N``, ``floor@N``, ``main@N`` (and ``init@N``): the same
steps on a MirroredStrategy of N replicas (op_util.distribute, ``--batch_graph global``: the
method's losses on the all-gathered batch), same global batch, timed in the same rounds; the
report adds ``main_over_floor@N`` and each part's speed-up over one device. On a CPU the N
logical devices share the same cores, so the speed-up there measures the overhead of the
replication, not a gain (README).

FLOPs are counted from the traced graph of each step (``count_flops``): 2 FLOPs per multiply-add of
every ``Conv2D``, ``Conv2DBackpropInput``, ``Conv2DBackpropFilter``, ``MatMul`` and ``BatchMatMul*``
whose result reaches the step's outputs or side effects, nested functions and ``cond`` branches
included; element-wise ops, batch norm and the eigen/singular-value decompositions are not counted.
The networks' own forward FLOPs are counted the same way, so ``gflop / student_forward_gflop`` is
the number of student-pass equivalents a part executes. GFLOP/s = counted FLOPs / median time.

Host memory: resident set size sampled after every round (``/proc/self/statm``, or psutil) and the
peak ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; ``rss_growth_mb`` is the change from the end of
warm-up to the end, ``rss_slope_mb_per_100_rounds`` the least-squares slope over the timed rounds.

Bad flags and an unwritable ``--json`` (checked before the first step) are one line
``benchmark: error: ...`` on stderr and exit status 2; ``--json`` is written atomically.

``default_precision()`` and ``default_jit()`` are the per-device defaults chosen from these
measurements, for ``--precision auto`` / ``--jit auto`` here and in train_w_distill.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

if __name__ == "__main__":  # a quiet console: TensorFlow's C++ start-up lines only with --verbosity
    from iepkt_tf.quiet import import_tensorflow
    import_tensorflow()

import keras
import tensorflow as tf
from absl import flags

from iepkt_tf.atomic import atomic_open, check_writable
from iepkt_tf.cli import parse_flags, tool_main
from iepkt_tf.distillers import METHODS
from iepkt_tf.distillers.base import Distiller
from nets.nets_factory import DEFAULT_ARCH, get_network, parse_arch
from op_util import train_steps as ts
from op_util.device import cpu_flags, cpu_has_bf16, default_jit, default_precision
from op_util.multi_grad import DEFAULT_METHOD
from op_util.optimizer import DynamicLossScale, NesterovMomentum

PARTS = ("student", "floor", "main", "bare", "init", "infer")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
JITS = ("auto", "true", "false")
GRAD_METHODS = ("auto", "separate", "pfor")


def resolve_precision(flag):
    if flag not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {flag!r}")
    return default_precision() if flag == "auto" else flag


def resolve_jit(flag, decompositions=False):
    if flag not in JITS:
        raise ValueError(f"--jit must be one of {JITS}, got {flag!r}")
    return default_jit(decompositions=decompositions) if flag == "auto" else flag == "true"


# --------------------------------------------------------------------------- FLOP counting
_CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")
_IF_OPS = ("If", "StatelessIf")
_WHILE_OPS = ("While", "StatelessWhile")
_MATMUL_OPS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
_CONV_OPS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter")


def _dims(shape):
    """Static dims of a TensorShape as ints, or None if any is unknown."""
    if shape.rank is None:
        return None
    dims = shape.as_list()
    return None if any(d is None for d in dims) else dims


def _prod(dims):
    out = 1
    for d in dims:
        out *= int(d)
    return out


def op_flops(op):
    """FLOPs of one conv/matmul op from its static shapes (2 per multiply-add); 0 for other ops;
    None when a needed shape is unknown."""
    t = op.type
    if t in _CONV_OPS:
        if t == "Conv2D":
            out, kernel = _dims(op.outputs[0].shape), _dims(op.inputs[1].shape)
        elif t == "Conv2DBackpropInput":   # (input_sizes, filter, out_backprop)
            out, kernel = _dims(op.inputs[2].shape), _dims(op.inputs[1].shape)
        else:                              # (input, filter_sizes, out_backprop) -> filter grad
            out, kernel = _dims(op.inputs[2].shape), _dims(op.outputs[0].shape)
        if out is None or kernel is None:
            return None
        kh, kw, cin, _ = kernel
        return 2 * _prod(out) * kh * kw * cin   # prod(out) = N*Ho*Wo*Cout in either layout
    if t in _MATMUL_OPS:
        out, a = _dims(op.outputs[0].shape), _dims(op.inputs[0].shape)
        if out is None or a is None:
            return None
        if t == "MatMul":
            k = a[0] if op.get_attr("transpose_a") else a[1]
        else:
            k = a[-2] if op.get_attr("adj_x") else a[-1]
        return 2 * _prod(out) * k
    return 0


def _function_graph(graph, name):
    fn = graph._get_function(name)  # noqa: SLF001 (FuncGraph has no public lookup)
    return None if fn is None else fn.graph


def _live_ops(graph):
    """Ops whose results reach the graph's outputs or side effects (what the runtime executes)."""
    stack = [t.op for t in graph.outputs] + list(getattr(graph, "control_outputs", []))
    seen = set()
    out = []
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        out.append(op)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return out


def _count_graph(graph, totals, depth=0):
    flops = 0
    for op in _live_ops(graph):
        if op.type in _CALL_OPS:
            sub = _function_graph(graph, op.get_attr("f").name)
            if sub is None:
                totals["unresolved_functions"] += 1
            else:
                flops += _count_graph(sub, totals, depth + 1)
            continue
        if op.type in _IF_OPS or op.type in _WHILE_OPS:
            if op.type in _WHILE_OPS:
                totals["while_loops"] += 1   # body counted once: the trip count is dynamic
            branches = ("then_branch", "else_branch") if op.type in _IF_OPS else ("body",)
            counts = []
            for attr in branches:
                sub = _function_graph(graph, op.get_attr(attr).name)
                if sub is None:
                    totals["unresolved_functions"] += 1
                else:
                    counts.append(_count_graph(sub, totals, depth + 1))
            flops += max(counts, default=0)   # the costlier branch (an upper bound)
            continue
        f = op_flops(op)
        if f is None:
            totals["unknown_shape_ops"] += 1
            continue
        if f:
            totals["by_type"][op.type] = totals["by_type"].get(op.type, 0) + f
        flops += f
    return flops


def count_flops(fn, *args):
    """Conv/matmul FLOPs of one call ``fn(*args)`` counted from its traced graph.

    ``fn``: a ``tf.function`` (its concrete function for ``args`` is looked up, traced if needed),
    a ConcreteFunction or a FuncGraph. Returns ``{"flops", "by_type", "unknown_shape_ops",
    "while_loops", "unresolved_functions"}``; the last three should be 0 for an exact count.
    """
    graph = fn
    if hasattr(graph, "get_concrete_function"):
        graph = graph.get_concrete_function(*args)
    graph = getattr(graph, "graph", graph)
    if not hasattr(graph, "get_operations"):
        raise ValueError(f"count_flops: expected a tf.function, ConcreteFunction or FuncGraph, got "
                         f"{type(fn).__name__}")
    totals = {"by_type": {}, "unknown_shape_ops": 0, "while_loops": 0, "unresolved_functions": 0}
    totals["flops"] = _count_graph(graph, totals)
    return totals


# --------------------------------------------------------------------------- host memory
def rss_bytes():
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil
            return int(psutil.Process().memory_info().rss)
        except ImportError:
            return 0


def peak_rss_bytes():
    """``ru_maxrss`` of this process (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _slope(ys):
    n = len(ys)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2.0, sum(ys) / n
    den = sum((i - xm) ** 2 for i in range(n))
    return sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / den


# --------------------------------------------------------------------------- the parts
def _parse_parts(parts, distillation="IEP"):
    """The canonical list of parts; ``all`` leaves out ``init`` for a method without an initial
    phase and ``bare`` (IEP's stand-in) for other methods than IEP."""
    if isinstance(parts, str):
        parts = [p for p in parts.split(",")]
    parts = [p.strip() for p in parts if p.strip()]
    if not parts or parts == ["all"]:
        method = METHODS[distillation]
        return [p for p in PARTS if not (p == "init" and not method.default_init_epoch)
                and not (p == "bare" and distillation != "IEP")]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"--parts: unknown part(s) {bad}; expected a comma list of {list(PARTS)} "
                         "or 'all'")
    return [p for p in PARTS if p in parts]   # canonical order, duplicates dropped


def _parse_grad_methods(methods):
    methods = [m.strip() for m in methods if m.strip()] or ["auto"]
    bad = [m for m in methods if m not in GRAD_METHODS]
    if bad:
        raise ValueError(f"--grad_method: unknown method(s) {bad}; expected a comma list of "
                         f"{list(GRAD_METHODS)}")
    return list(dict.fromkeys(methods))


def _make_floor_step(teacher, plain_step, jit_compile):
    """Teacher forward (inference) + the real student training step, as one ``tf.function``."""
    def step(images, labels, lr, warm, seed):
        t_logits, _ = teacher(images, training=False)
        out = dict(plain_step(images, labels, lr, warm, seed))
        out["teacher_logits_sum"] = tf.reduce_sum(t_logits)   # keeps the teacher pass alive
        return out

    return tf.function(step, reduce_retracing=True, jit_compile=bool(jit_compile))


class _FreeMethod(Distiller):
    """Part ``bare``: an IEP-shaped method (clip rule, three terms clipped one by one) with
    ``k_alt, k_int, k_bb = sum_l mean(S_l) * (k + 1) * mean(T_l)`` over the sensing points 1-3:
    each still takes its own backward pass through the student, but no PCA, MPNN or heads."""
    name = "bare"
    grad_rule = "clip"

    def main_losses(self, student, teacher, labels, seed):
        s = [tf.reduce_mean(tf.cast(f, tf.float32)) for f in student.feats[1:4]]
        t = [tf.reduce_mean(tf.cast(f, tf.float32)) for f in teacher.feats[1:4]]
        return {k: tf.add_n([a * (i + 1.0) * b for a, b in zip(s, t)])
                for i, k in enumerate(("k_alt", "k_int", "k_bb"))}

    def clip_groups(self, terms):
        return {k: (k,) for k in terms}


class _FloorMethod(Distiller):
    """Part ``floor@N``: the floor on replicas -- the teacher's forward (its logits enter the
    step's outputs through a zero term) and the student's cross-entropy training."""
    name = "floor"

    def main_losses(self, student, teacher, labels, seed):
        return {"teacher_logits": 0.0 * tf.reduce_sum(tf.cast(teacher.logits, tf.float32))}


def replica_parts(cfg, images, labels, lr, warm, seed_of):
    """Parts ``student@N``, ``floor@N``, ``main@N`` and ``init@N`` (those of ``cfg["parts"]``):
    the same steps on a MirroredStrategy of ``cfg["replicas"]`` devices (``--batch_graph
    global``), fresh networks, the same global batch sliced over the replicas. Returns
    ``(steps, init step or None)``."""
    from iepkt_tf.distillers import build
    from op_util import distribute

    n, parts = cfg["replicas"], cfg["parts"]
    strategy = distribute.make_strategy("mirrored", n)
    replicas = distribute.Replicas(strategy)
    size, ncls, wd = cfg["image_size"], cfg["num_classes"], 5e-4
    with distribute.variable_scope(strategy):
        student = get_network(cfg["student_arch"], ncls, "Student", size, True)
        teacher = get_network(cfg["teacher_arch"], ncls, "Teacher", size, False)
        method = build(cfg["distillation"], student, teacher, image_size=(size, size))
        plain, floor = build("None", student, None), _FloorMethod(student, teacher, {})
        optimizer = NesterovMomentum(ts.optimizer_variables(student, method), momentum=0.9)
    batch = next(iter(distribute.distribute_batches(
        strategy, lambda: tf.data.Dataset.from_tensors((images, labels)), cfg["batch_size"])))
    kw = dict(jit_compile=cfg["jit_compile"]["iep"], replicas=replicas)

    def train_args(r):
        return batch + (lr, warm, seed_of(r))

    steps = {}
    for part, m in (("student", plain), ("floor", floor), ("main", method)):
        if part in parts:
            steps[f"{part}@{n}"] = (ts.make_main_step(m, student, teacher if m is not plain else None,
                                                      optimizer, wd, **kw), train_args)
    init = None
    if method.default_init_epoch and ("init" in parts or "main" in parts):
        init = ts.make_init_step(method, student, teacher, optimizer, wd, **kw)
        if "init" in parts:
            steps[f"init@{n}"] = (init, lambda r: batch + (lr, seed_of(r)))
    return steps, (lambda: init(*batch, lr, seed_of(-1))) if init is not None else None


def _make_forward_fn(model):
    @tf.function
    def forward(images):
        logits, _ = model(images, training=False)
        return logits

    return forward


def _effective_grad_method(method):
    """What the main step really does for ``--grad_method method``."""
    return DEFAULT_METHOD if method == "auto" else method


def build_parts(cfg):
    """Networks, optimiser and the compiled step of every part in ``cfg["parts"]``.

    Returns ``(steps, context)``: ``steps[part] = (tf.function, args_of_round(r))`` and
    ``context`` the networks, the method, the initial-phase step and the random batch.
    """
    from iepkt_tf.distillers import build

    parts = cfg["parts"]
    jit, jit_iep = cfg["jit_compile"]["plain"], cfg["jit_compile"]["iep"]
    b, size, ncls = cfg["batch_size"], cfg["image_size"], cfg["num_classes"]
    student = get_network(cfg["student_arch"], ncls, "Student", size, True)
    need_method = any(p in parts for p in ("main", "init"))
    need_teacher = any(p in parts for p in ("floor", "main", "bare", "init"))
    teacher = get_network(cfg["teacher_arch"], ncls, "Teacher", size, False) if need_teacher else None
    plain = build("None", student, None)
    method = build(cfg["distillation"], student, teacher, image_size=(size, size)) if need_method else plain
    if need_method and "init" in parts and not method.default_init_epoch:
        raise ValueError(f"--parts init: --Distillation {cfg['distillation']} has no initial phase")
    optimizer = NesterovMomentum(ts.optimizer_variables(student, method), momentum=0.9)
    loss_scale = DynamicLossScale() if cfg["precision"] == "mixed_float16" else None
    wd = 5e-4
    kw = dict(loss_scale=loss_scale)

    images = tf.random.stateless_normal([b, size, size, 3], seed=[cfg["seed"], 1])
    labels = tf.random.stateless_uniform([b], seed=[cfg["seed"], 2], minval=0, maxval=ncls,
                                         dtype=tf.int32)
    lr = tf.constant(cfg["learning_rate"], tf.float32)
    warm = tf.constant(1.0, tf.float32)

    def seed_of(r):
        return ts.step_seed(cfg["seed"], r)

    def train_args(r):
        return images, labels, lr, warm, seed_of(r)

    steps = {}
    if "student" in parts:
        steps["student"] = (ts.make_main_step(plain, student, None, optimizer, wd, jit_compile=jit, **kw),
                            train_args)
    if "floor" in parts:
        inner = ts.make_main_step(plain, student, None, optimizer, wd, jit_compile=jit, **kw)
        steps["floor"] = (_make_floor_step(teacher, inner, jit), train_args)
    init = None
    if need_method and method.default_init_epoch:
        init = ts.make_init_step(method, student, teacher, optimizer, wd, jit_compile=jit_iep, **kw)
    if "main" in parts:
        # The first --grad_method is part "main"; every further one adds "main[<method>]".
        for i, grad_method in enumerate(cfg["grad_method"]):
            fn = ts.make_main_step(method, student, teacher, optimizer, wd, jit_compile=jit_iep,
                                   grad_method=grad_method, **kw)
            steps["main" if i == 0 else f"main[{grad_method}]"] = (fn, train_args)
    if "bare" in parts:
        fn = ts.make_main_step(_FreeMethod(student, teacher, {}), student, teacher, optimizer, wd,
                               jit_compile=jit_iep, grad_method="separate", **kw)
        steps["bare"] = (fn, train_args)
    if "init" in parts:
        steps["init"] = (init, lambda r: (images, labels, lr, seed_of(r)))
    if "infer" in parts:
        fn = ts.make_eval_step(student, jit_compile=jit)
        steps["infer"] = (fn, lambda r: (images, labels))
    init_replicas = None
    if cfg.get("replicas", 1) > 1:
        more, init_replicas = replica_parts(cfg, images, labels, lr, warm, seed_of)
        steps.update(more)
    layer = method.panel_layer()
    models = {"student": student, "teacher": teacher, "method": method, "init_step": init,
              "init_replicas": init_replicas,
              "distiller": layer, "images": images, "labels": labels, "lr": lr, "seed_of": seed_of}
    return steps, models


def _fetch(out):
    """Wait for a step: read every output to the host (the step is synchronous on CPU anyway)."""
    vals = [v for v in tf.nest.flatten(out) if v is not None]
    for v in vals:
        v.numpy()
    return vals[0].device if vals else ""


def _stats(times, batch, flops):
    med = statistics.median(times)
    out = {"median_s": med, "min_s": min(times), "max_s": max(times), "mean_s": statistics.fmean(times),
           "images_per_s": batch / med, "steps": len(times), "times_s": times}
    if flops is not None:
        out["gflop"] = flops["flops"] / 1e9
        out["gflop_per_s"] = flops["flops"] / 1e9 / med
        out["gflop_by_type"] = {k: v / 1e9 for k, v in sorted(flops["by_type"].items())}
        out["flop_count_exact"] = not (flops["unknown_shape_ops"] or flops["while_loops"]
                                       or flops["unresolved_functions"])
        out["flop_count_gaps"] = {k: int(flops[k]) for k in
                                  ("unknown_shape_ops", "while_loops", "unresolved_functions")}
    return out


def run_benchmark(cfg, log=print):
    """Build, warm up and time the parts of ``cfg`` (see ``config_from_flags``); returns the result
    dict that ``--json`` writes."""
    if cfg.get("replicas", 1) > 1:  # logical CPU devices exist only if made before the first op
        from op_util.distribute import local_devices
        local_devices(cfg["replicas"])
    policy_before = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(cfg["precision"])
    try:
        steps, models = build_parts(cfg)
        student = models["student"]
        if models["init_step"] is not None:
            # Give the incremental PCA a state before the main step reads it (as after phase 1).
            _fetch(models["init_step"](models["images"], models["labels"], models["lr"],
                                       models["seed_of"](-1)))
        if models["init_replicas"] is not None:
            _fetch(models["init_replicas"]())
        names = list(steps)
        times = {p: [] for p in names}
        rss = []
        device = ""
        rounds = cfg["warmup"] + cfg["steps"]
        t_start = time.perf_counter()
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for p in order:
                fn, args = steps[p]
                a = args(r)
                t0 = time.perf_counter()
                device = _fetch(fn(*a)) or device
                dt = time.perf_counter() - t0
                if r >= cfg["warmup"]:
                    times[p].append(dt)
            rss.append(rss_bytes())
            if cfg["verbose"] and (r + 1) % max(1, rounds // 10) == 0:
                log(f"  round {r + 1}/{rounds}  {time.perf_counter() - t_start:.1f} s")
        wall = time.perf_counter() - t_start

        flops = {p: None if "@" in p else count_flops(steps[p][0], *steps[p][1](0)) for p in names}
        tracing = {p: int(steps[p][0].experimental_get_tracing_count()) for p in names}
        size = cfg["image_size"]
        fwd = {"student_forward_gflop": count_flops(
            _make_forward_fn(student), tf.TensorSpec([cfg["batch_size"], size, size, 3]))["flops"] / 1e9}
        if models["teacher"] is not None:
            fwd["teacher_forward_gflop"] = count_flops(
                _make_forward_fn(models["teacher"]),
                tf.TensorSpec([cfg["batch_size"], size, size, 3]))["flops"] / 1e9
        policy = keras.mixed_precision.global_policy()
        settings = {
            "precision": policy.name, "precision_flag": cfg["precision_flag"],
            "compute_dtype": student.dtype_policy.compute_dtype,
            "variable_dtype": student.dtype_policy.variable_dtype,
            "distiller_dtype": (models["distiller"].compute_dtype
                                if models["distiller"] is not None else None),
            "jit_compile": {p: cfg["jit_compile"]["iep" if p.startswith(("main", "bare", "init"))
                                              else "plain"] for p in names},
            "jit_flag": cfg["jit_flag"],
            "grad_method": [_effective_grad_method(m) for m in cfg["grad_method"]],
            "distillation": cfg["distillation"],
            "loss_scale": cfg["precision"] == "mixed_float16",
            "device": device, "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "cpu_bf16": cpu_has_bf16(), "cpu_amx": bool(cpu_flags() & {"amx_bf16", "amx_tile"}),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version(),
        }
    finally:
        keras.mixed_precision.set_global_policy(policy_before)

    result = {"config": {k: v for k, v in cfg.items() if k not in ("verbose",)},
              "settings": settings, "parts": {}, "flops": fwd, "wall_s": wall,
              "tracing_count": tracing}
    for p in names:
        result["parts"][p] = _stats(times[p], cfg["batch_size"], flops[p])
        result["parts"][p]["passes_of_student_forward"] = (
            None if flops[p] is None else flops[p]["flops"] / 1e9 / fwd["student_forward_gflop"])
    med = {p: result["parts"][p]["median_s"] for p in names}
    result["main_over_floor"] = med["main"] / med["floor"] if {"main", "floor"} <= set(med) else None
    result["init_over_floor"] = med["init"] / med["floor"] if {"init", "floor"} <= set(med) else None
    result["bare_over_floor"] = med["bare"] / med["floor"] if {"bare", "floor"} <= set(med) else None
    n = cfg.get("replicas", 1)
    if n > 1:
        at = {p: f"{p}@{n}" for p in ("main", "floor", "init")}
        result[f"main_over_floor@{n}"] = (med[at["main"]] / med[at["floor"]]
                                          if {at["main"], at["floor"]} <= set(med) else None)
        result["replica_speedup"] = {p: med[p] / med[f"{p}@{n}"] for p in names
                                     if f"{p}@{n}" in med}
    timed = rss[cfg["warmup"]:] or rss
    mb = 1024.0 * 1024.0
    result["memory"] = {
        "peak_rss_mb": max(rss) / mb, "ru_maxrss_mb": peak_rss_bytes() / mb,
        "rss_after_warmup_mb": timed[0] / mb, "rss_end_mb": timed[-1] / mb,
        "rss_growth_mb": (timed[-1] - timed[0]) / mb,
        "rss_slope_mb_per_100_rounds": _slope([x / mb for x in timed]) * 100.0,
        "rss_mb_per_round": [round(x / mb, 2) for x in rss],
    }
    return result


# --------------------------------------------------------------------------- report
def format_report(res):
    lines = []
    s = res["settings"]
    c = res["config"]
    lines.append(f"{c['student_arch']} <- {c['teacher_arch']}, batch {c['batch_size']}, "
                 f"{c['image_size']}x{c['image_size']}, {c['num_classes']} classes, "
                 f"{c['steps']} timed rounds after {c['warmup']} warm-up")
    jit = set(s["jit_compile"].values())
    jit = jit.pop() if len(jit) == 1 else s["jit_compile"]
    lines.append(f"policy {s['precision']} (compute {s['compute_dtype']}, distiller "
                 f"{s['distiller_dtype']}), jit_compile={jit}, device {s['device']}, "
                 f"grad_method {s['grad_method']}, TF {s['tensorflow']}, Keras {s['keras']}")
    w = max(8, *(len(p) for p in res["parts"]))
    lines.append(f"{'part':<{w}} {'median s':>9} {'min-max s':>17} {'images/s':>9} {'GFLOP':>9} "
                 f"{'GFLOP/s':>8} {'passes':>7}")
    partial = False
    for p, r in res["parts"].items():
        mark = " " if r.get("flop_count_exact", True) else "*"
        partial = partial or mark == "*"
        lines.append(f"{p:<{w}} {r['median_s']:9.4f} {r['min_s']:8.4f}-{r['max_s']:<8.4f} "
                     f"{r['images_per_s']:9.1f} {r.get('gflop', float('nan')):8.2f}{mark} "
                     f"{r.get('gflop_per_s', float('nan')):8.1f} "
                     f"{r['passes_of_student_forward'] or float('nan'):7.2f}")
    if partial:
        lines.append("* lower bound: while-loop bodies are counted once (the teacher's leading-vector "
                     "squarings, a few per point), and ops with shapes known only at run time "
                     "(e.g. pfor's reshapes) not at all")
    n = c.get("replicas", 1)
    for key in ("main_over_floor", "init_over_floor", "bare_over_floor", f"main_over_floor@{n}"):
        if res.get(key) is not None:
            lines.append(f"{key} = {res[key]:.3f}")
    if res.get("replica_speedup"):
        lines.append(f"{n} replicas (part@{n}) over 1 device, seconds per step of the same global "
                     f"batch: " + ", ".join(f"{p} {v:.2f}x" for p, v in res["replica_speedup"].items()))
    m = res["memory"]
    lines.append(f"host memory: peak RSS {m['peak_rss_mb']:.0f} MB (ru_maxrss {m['ru_maxrss_mb']:.0f} "
                 f"MB), after warm-up {m['rss_after_warmup_mb']:.0f} MB, end {m['rss_end_mb']:.0f} MB, "
                 f"growth {m['rss_growth_mb']:+.1f} MB, slope "
                 f"{m['rss_slope_mb_per_100_rounds']:+.2f} MB/100 rounds")
    lines.append("tracing count per part: " + ", ".join(f"{k}={v}" for k, v in
                                                        res["tracing_count"].items()))
    return "\n".join(lines)


def write_json_atomic(path, obj):
    """Write ``obj`` as JSON to ``path`` atomically (iepkt_tf.atomic)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- command line
def define_flags(flag_values):
    """Define the benchmark's flags on ``flag_values`` (absl FlagValues)."""
    fv = flag_values
    flags.DEFINE_string("student_arch", DEFAULT_ARCH["Student"],
                        "Student network, e.g. WResNet-16-4, ResNet-20.", flag_values=fv)
    flags.DEFINE_string("teacher_arch", DEFAULT_ARCH["Teacher"],
                        "Teacher network, e.g. WResNet-40-4, ResNet-56.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 128, "Images per step.", lower_bound=2, flag_values=fv)
    flags.DEFINE_integer("image_size", 32, "Square input size (32: 3x3 stem; else 7x7/2 stem).",
                         lower_bound=8, flag_values=fv)
    flags.DEFINE_integer("num_classes", 100, "Number of classes.", lower_bound=2, flag_values=fv)
    flags.DEFINE_integer("steps", 10, "Timed rounds (one step of every part per round).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "Untimed rounds first (tracing, first-run allocation).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_enum("jit", "auto", JITS, "XLA jit_compile of the steps; auto = default_jit() "
                      "(off on CPU; on GPU on for the steps without eigh/SVD).",
                      flag_values=fv)
    flags.DEFINE_enum("precision", "auto", PRECISIONS,
                      "Keras global policy; auto = default_precision() (mixed_float16 on GPU, "
                      "mixed_bfloat16 on a CPU with native bfloat16, else float32).", flag_values=fv)
    flags.DEFINE_list("grad_method", ["auto"],
                      "Per-loss gradients of the main step (op_util.multi_grad): one of "
                      f"{', '.join(GRAD_METHODS)}, if the main step takes the argument. A comma "
                      "list times one main step per method, the extra ones as parts "
                      "'main[<method>]'.", flag_values=fv)
    flags.DEFINE_enum("Distillation", "IEP", [m for m in METHODS if m != "None"],
                      "The method whose steps parts main and init time (init only for a method "
                      "with an initial phase); student/floor/infer do not depend on it.",
                      flag_values=fv)
    flags.DEFINE_list("parts", ["all"], "Comma list of parts to time: " + ", ".join(PARTS) +
                      " (or all).", flag_values=fv)
    flags.DEFINE_string("json", None, "Write the results to this JSON file (atomically).",
                        flag_values=fv)
    flags.DEFINE_float("learning_rate", 0.01, "Learning rate of the timed updates (random labels: "
                       "kept small so 200+ steps stay finite).", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the random data and of every step.", flag_values=fv)
    flags.DEFINE_bool("verbose", False, "Print progress every 10% of the rounds.", flag_values=fv)
    flags.DEFINE_integer("replicas", 1, "With N > 1 also time parts student, floor, main and init "
                         "on a MirroredStrategy of N replicas (local GPUs, else N logical CPU "
                         "devices) as 'part@N', same global batch; --batch_size must divide by N.",
                         lower_bound=1, flag_values=fv)


def config_from_flags(fv):
    for flag in ("student_arch", "teacher_arch"):
        try:
            parse_arch(fv[flag].value)
        except ValueError as e:
            raise ValueError(f"--{flag}: {e}") from None
    precision = resolve_precision(fv.precision)
    return {"student_arch": fv.student_arch, "teacher_arch": fv.teacher_arch,
            "batch_size": fv.batch_size, "image_size": fv.image_size, "num_classes": fv.num_classes,
            "steps": fv.steps, "warmup": fv.warmup, "jit_flag": fv.jit,
            "jit_compile": {"plain": resolve_jit(fv.jit), "iep": resolve_jit(fv.jit, True)},
            "precision_flag": fv.precision,
            "precision": precision,
            "distillation": fv.Distillation,
            "parts": _parse_parts(fv.parts, fv.Distillation), "grad_method": _parse_grad_methods(fv.grad_method),
            "json": fv.json, "learning_rate": fv.learning_rate,
            "seed": fv.seed, "verbose": fv.verbose, "replicas": _check_replicas(fv)}


def _check_replicas(fv):
    if fv.batch_size % fv.replicas:
        raise ValueError(f"--batch_size {fv.batch_size} must be divisible by --replicas {fv.replicas}")
    return fv.replicas


def run(argv, log=print):
    """Parse ``argv`` (flags only, no program name) into a private FlagValues, run the benchmark,
    print the report and write ``--json``. Returns the result dict."""
    try:
        fv = parse_flags("benchmark", argv, define_flags, __doc__)
    except flags.Error as e:
        raise ValueError(str(e)) from None
    return None if fv is None else _run_config(config_from_flags(fv), log)


def _run_config(cfg, log):
    if cfg["json"]:   # checked before the (long) run, not after it
        check_writable(cfg["json"], "--json")
        directory = os.path.dirname(os.path.abspath(cfg["json"]))
        if not os.path.isdir(directory):
            raise ValueError(f"--json {cfg['json']}: directory {directory} does not exist")
    res = run_benchmark(cfg, log=log)
    log(format_report(res))
    if cfg["json"]:
        write_json_atomic(cfg["json"], res)
        log(f"wrote {cfg['json']}")
    return res


def compare_table(paths):
    """A markdown table of the methods' costs from ``--json`` results: per file the method, the
    floor and main medians, main/floor and the main step's images/s (``--compare A.json ...``)."""
    lines = ["| --Distillation | floor s/step | main s/step | main / floor | main images/s |",
             "|---|---|---|---|---|"]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                res = json.load(f)
            parts, method = res["parts"], res["settings"]["distillation"]
            floor, main_ = parts["floor"], parts["main"]
            lines.append(f"| {method} | {floor['median_s']:.3f} | {main_['median_s']:.3f} | "
                         f"{main_['median_s'] / floor['median_s']:.2f} | {main_['images_per_s']:.0f} |")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise ValueError(f"--compare {path}: not a benchmark --json result with parts floor and "
                             f"main ({type(e).__name__}: {e})") from None
    return "\n".join(lines)


def main(argv=None):
    """The command line: ``argv`` (flags only; default ``sys.argv[1:]``) -> exit status. Bad flags
    and unwritable outputs are one line ``benchmark: error: ...`` on stderr and exit status 2.
    ``--compare A.json B.json ...`` prints :func:`compare_table` of earlier ``--json`` results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--compare"]:
        try:
            print(compare_table(argv[1:]))
        except ValueError as e:
            print(f"benchmark: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        return 0
    return tool_main("benchmark", argv, define_flags, __doc__,
                     lambda fv: _run_config(config_from_flags(fv), print), (ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
