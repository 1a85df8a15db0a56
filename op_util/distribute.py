"""Data parallelism on ``tf.distribute`` with the batch-level knowledge kept exact (``--distribute``).

``--batch_size`` is the global batch. Each replica trains on its contiguous slice of every global
batch (``distribute_batches``: replica ``r`` of ``R`` gets rows ``[r*B/R, (r+1)*B/R)``), and

* ``--batch_graph global`` (default): the step all-gathers the sensed outputs of both networks
  (logits, feature maps, labels) before any loss, so every loss, IEP's B x B graphs, the MPNN over
  pairs, the attention heads and the incremental-PCA update included, is computed on the global
  batch exactly as on one device; the gradient flows back through the gather (its backward pass
  sums over replicas, hence the ``1/R`` of :meth:`Replicas.scale`). Every replica then holds the
  same losses and the same summed gradient, and applies the same update.
* ``--batch_graph replica``: no gather; each replica's losses see its own slice (graphs of
  ``B/R`` images), the gradients are averaged: cheaper, and a different method for the
  batch-level knowledge (README).

Variables are created under :func:`variable_scope`: mirrored, and updated in the replica context
with ``ONLY_FIRST_REPLICA`` aggregation (the updates are identical on every replica, so the first
one's is broadcast), batch-norm moving statistics with ``MEAN`` (per-replica statistics without
``--sync_bn`` are averaged). ``--sync_bn`` makes the student's batch norms normalise with the
global batch's moments (``nets.layers.BatchNorm.synchronized``).
"""
from __future__ import annotations

import collections.abc
import contextlib
import json
import os

import tensorflow as tf

KINDS = ("none", "mirrored", "multi_worker")
BATCH_GRAPHS = ("global", "replica")
# Variables whose per-replica updates are averaged (the rest take the first replica's).
_MEAN_LEAVES = ("moving_mean", "moving_variance")
_STRATEGIES = {}


class DistributeError(ValueError):
    """The devices or the cluster cannot carry the requested ``--distribute`` setting."""


def _cpu_devices(count):
    """``count`` logical CPU devices (configured now if TensorFlow has not started yet)."""
    physical = tf.config.list_physical_devices("CPU")[0]
    if tf.config.get_logical_device_configuration(physical) is None:
        try:  # listing logical devices would start TensorFlow: configure first
            tf.config.set_logical_device_configuration(
                physical, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:
            pass  # TensorFlow has started: only the devices it has
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < count:
        raise DistributeError(
            f"--replicas {count}: this process has {len(cpus)} CPU device(s) and TensorFlow has "
            f"started, so no more can be made (logical devices are set before the first op)")
    return [d.name for d in cpus[:count]]


def local_devices(replicas):
    """The devices of this process's replicas: every local GPU (``replicas`` 0) or the first
    ``replicas`` of them; without a GPU, ``replicas`` logical CPU devices (0 means 2)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if replicas > len(gpus):
            raise DistributeError(f"--replicas {replicas}: only {len(gpus)} GPU(s) here")
        return [f"/gpu:{i}" for i in range(replicas or len(gpus))]
    return _cpu_devices(replicas or 2)


def make_strategy(kind, replicas=0):
    """``None`` for ``none``, else the strategy of ``kind``. ``multi_worker`` reads ``TF_CONFIG``
    and uses every local GPU of each worker, or its CPU (one replica per worker)."""
    if kind not in KINDS:
        raise DistributeError(f"--distribute must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "none":
        return None
    key = (kind, tuple(local_devices(replicas)) if kind == "mirrored" else os.environ.get("TF_CONFIG"))
    if key not in _STRATEGIES:  # one per process: a second one over the same devices clashes in
        if kind == "mirrored":  # the collectives' instance keys
            _STRATEGIES[key] = tf.distribute.MirroredStrategy(list(key[1]))
        else:
            _tf_config()
            _STRATEGIES[key] = tf.distribute.MultiWorkerMirroredStrategy()
    return _STRATEGIES[key]


def _tf_config():
    """The parsed ``TF_CONFIG`` of a multi-worker run (a DistributeError naming what is wrong)."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise DistributeError("--distribute multi_worker needs TF_CONFIG (JSON with 'cluster' and "
                              "'task'; README 'Several GPUs and machines')")
    try:
        cfg = json.loads(text)
        workers = cfg["cluster"]["worker"]
        task = cfg["task"]
        task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise DistributeError(f"TF_CONFIG: expected {{'cluster': {{'worker': [...]}}, 'task': "
                              f"{{'type': ..., 'index': ...}}}}, got {text[:120]!r} ({e})") from None
    if not isinstance(workers, list) or not workers:
        raise DistributeError("TF_CONFIG: cluster.worker must be a non-empty list of host:port")
    jobs = cfg["cluster"].get(task["type"]) if isinstance(cfg["cluster"], dict) else None
    if not isinstance(jobs, list) or not 0 <= int(task["index"]) < len(jobs):
        size = len(jobs) if isinstance(jobs, list) else 0
        raise DistributeError(f"TF_CONFIG: task {task['type']!r} index {task['index']} is not one "
                              f"of the cluster's {size} {task['type']!r} entries (0..{size - 1})")
    return cfg


def is_chief(strategy):
    """True for the process that writes (always without a strategy or with ``mirrored``): the
    ``chief`` task, else worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def _creator(next_creator, **kwargs):
    if kwargs.get("aggregation") in (None, tf.VariableAggregation.NONE):
        leaf = (kwargs.get("name") or "").split("/")[-1].split(":")[0]
        kwargs["aggregation"] = (tf.VariableAggregation.MEAN if leaf in _MEAN_LEAVES
                                 else tf.VariableAggregation.ONLY_FIRST_REPLICA)
    return next_creator(**kwargs)


@contextlib.contextmanager
def variable_scope(strategy):
    """Create variables for ``strategy`` (a no-op for ``None``): mirrored, with the aggregations
    of the module docstring so the step can assign them in the replica context."""
    if strategy is None:
        yield
        return
    with strategy.scope(), tf.variable_creator_scope(_creator):
        yield


def distribute_batches(strategy, make_dataset, batch_size):
    """Per-replica slices of the global batches of ``make_dataset()`` (itself for ``None``).

    Every input pipeline (one per worker) builds the same global stream and keeps its replicas'
    rows, split into per-replica batches in replica order (tf.data hands consecutive elements of a
    worker's dataset to its replicas in turn)."""
    if strategy is None:
        return make_dataset()
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise DistributeError(f"--batch_size {batch_size} must be divisible by the {replicas} replicas")
    per = batch_size // replicas

    def fn(context):
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def split(images, labels):
            def mine(x):
                x = tf.reshape(x, tf.concat([[replicas, per], tf.shape(x)[1:]], 0))
                return x[first:first + local]
            return mine(images), mine(labels)

        return make_dataset().map(split).unbatch()

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return strategy.distribute_datasets_from_function(fn, options)


class _Gathered(collections.abc.Sequence):
    """A list of per-replica maps whose entry ``i`` is ``gather(items[i])``, made on first read
    (every replica reads in the same order, so their collectives pair up)."""

    def __init__(self, items, gather):
        self._items, self._gather, self._done = list(items), gather, {}

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        if i not in self._done:
            self._done[i] = self._gather(self._items[i])
        return self._done[i]


class Replicas:
    """What a step needs to know of the replicas it runs on (one device: ``Replicas()``).

    ``gather`` / ``gather_sensed``: the global batch (``--batch_graph global``) or the local one;
    ``scale``: the per-replica share of a loss before differentiation; ``sum``: the all-reduced
    gradients; ``slice_rows``: this replica's rows of a tensor drawn for the global batch;
    ``compile(fn)``: the ``tf.function`` that runs ``fn`` on every replica and reduces its metrics.
    """

    def __init__(self, strategy=None, batch_graph="global"):
        if batch_graph not in BATCH_GRAPHS:
            raise DistributeError(f"--batch_graph must be one of {', '.join(BATCH_GRAPHS)}, got {batch_graph!r}")
        self.strategy = strategy
        self.count = 1 if strategy is None else int(strategy.num_replicas_in_sync)
        self.global_graph = batch_graph == "global"

    @property
    def distributed(self):
        return self.strategy is not None

    def gather(self, x):
        if x is None or not (self.distributed and self.global_graph):
            return x
        wide = x.dtype == tf.bfloat16  # CPU collectives have no bfloat16 kernel
        out = tf.distribute.get_replica_context().all_gather(tf.cast(x, tf.float32) if wide else x,
                                                              axis=0)
        out = tf.cast(out, x.dtype) if wide else out
        if x.shape.rank is not None and x.shape[0] is not None:
            out.set_shape([x.shape[0] * self.count] + x.shape.as_list()[1:])
        return out

    def gather_sensed(self, sensed):
        """The logits gathered; each feature map gathered when the method first reads it
        (a collective is never pruned from the graph, so unread maps must not be gathered)."""
        if sensed is None or not (self.distributed and self.global_graph):
            return sensed
        many = lambda xs: None if xs is None else _Gathered(xs, self.gather)
        return sensed._replace(logits=self.gather(sensed.logits), feats=many(sensed.feats),
                               pre_feats=many(sensed.pre_feats))

    def scale(self, loss):
        return loss if not self.distributed else loss * (1.0 / self.count)

    def sum(self, grads):
        if not self.distributed:
            return grads
        present = [i for i, g in enumerate(grads) if g is not None]
        reduced = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
        out = list(grads)
        for i, g in zip(present, reduced):
            out[i] = g
        return out

    def replica_id(self):
        return tf.distribute.get_replica_context().replica_id_in_sync_group

    def slice_rows(self, x):
        """Rows ``[r*b, (r+1)*b)`` of ``x`` (``[count*b, ...]``) on replica ``r``."""
        if not self.distributed:
            return x
        b = x.shape[0] // self.count
        return x[self.replica_id() * b:(self.replica_id() + 1) * b]

    def compile(self, fn, jit_compile=False):
        if not self.distributed:
            return tf.function(fn, reduce_retracing=True, jit_compile=bool(jit_compile))
        inner = tf.function(fn, jit_compile=True) if jit_compile else fn
        strategy = self.strategy
        devices = strategy.extended.worker_devices

        def placed(*args):
            """MultiWorkerMirroredStrategy leaves a lone local replica's ops (and its inputs)
            unplaced, and a collective on them then has no destination device."""
            rid = int(tf.get_static_value(self.replica_id()))
            with tf.device(devices[rid % len(devices)]):
                return inner(*tf.nest.map_structure(tf.identity, args))

        def step(*args):
            out = strategy.run(placed, args=args)
            return {k: _reduce(strategy, v) for k, v in out.items()}

        return tf.function(step, reduce_retracing=True)


def barrier(strategy):
    """Wait until every replica (every worker) gets here: a worker that ends first would take the
    cluster's coordination service (the chief's) or a peer with it."""
    if strategy is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        ones = strategy.run(tf.function(lambda: tf.constant(1.0)))
        strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None).numpy()


def _reduce(strategy, value):
    """A metric over replicas: the mean of a float (losses equal on every replica stay equal),
    the first replica's of anything else."""
    first = strategy.experimental_local_results(value)[0]
    if first.dtype.is_floating:
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
    return first
