"""The training loop of ``train_w_distill.py`` (TF Model Garden's trainer, apart from the methods
and from the command line): data, networks, the method's steps, the epoch loop, checkpoints,
logging and the final ``train_params.mat`` / ``log.mat``.

``run(cfg)`` trains as configured by :mod:`iepkt_tf.config`. An epoch is one pass over a fresh
permutation of the training set (order from ``(--seed, epoch)``, incomplete last batch dropped);
the epochs of the method's initial phase come first; validation after every epoch (or every
``--val_every``-th, below); a checkpoint after every epoch and, on SIGTERM/SIGINT/SIGHUP, after the
step that was running (``--resume`` continues either exactly, see :mod:`iepkt_tf.checkpoints`).
One training at a time per ``--train_dir`` (:class:`RunLock`); every parameter and statistic is
checked finite after each epoch, before its checkpoint (:func:`check_finite`).

Differences from the authors' loop (documented choices):
* An epoch is one pass over a fresh permutation of the training set (the order depends only on
  ``(--seed, epoch)``) with the incomplete last batch dropped; the authors carry left-over images
  into the next epoch. The schedule, the phase switch and the warm-up use this epoch index, which is
  the authors' ``floor(step * batch / N)`` whenever the batch size divides N.
* Validation runs after every epoch by default, also during an initial phase (where the training
  accuracy is printed as 1.00, the authors' placeholder: the student is not trained then). The
  authors' first log entry comes after the first step (or after the initial phase) and the others
  at the end of each main-phase epoch; here ``log.mat`` has exactly one entry per epoch. With
  ``--val_every N > 1`` only every N-th main-phase epoch and the last epoch are validated (never
  an initial-phase epoch but the last); the others keep their training accuracy and a NaN
  validation accuracy in ``log.mat``, no validation scalars in TensorBoard, and an epoch line that
  names the next validated epoch. Validation changes no state, so the trained parameters do not
  depend on ``--val_every``.
* Validation keeps the incomplete last batch (the authors drop it; for CIFAR it divides evenly).
* Dropout masks and a method's noise (IEP's drop-head) are drawn from stateless seeds ``(--seed, step)``.

``--distribute`` (op_util/distribute.py): the networks, the method and the optimiser are created
on the strategy, each global batch is sliced over the replicas, the steps run on every replica,
and only the chief writes (checkpoints, ``.mat`` files, event logs, frames).

The optimiser of IEP is not published; ``op_util`` reconstructs it from the same authors'
``Optimizer_w_MHGD`` (see op_util/clipping.py).
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
import types

from iepkt_tf.config import (HPARAMS_METRICS, ConfigError, check_resume_config,
                             learning_rate_change, method_options, resolve_config, run_hparams,
                             validation_due, write_run_config)
from iepkt_tf.frames import VIS_PANEL, EpochFrames, vis_due

# Metrics that are not losses (never checked for finiteness, never listed as terms).
NOT_LOSSES = ("accuracy", "applied", "warmup", "sec_per_step")


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; the run stopped without writing a checkpoint."""


class NonFiniteParamsError(NonFiniteLossError):
    """A parameter or statistic of the network or the method became non-finite (the losses may be
    finite, e.g. an overflowed batch-norm moving variance); the run stopped without writing a
    checkpoint or a ``.mat``."""


class WriteError(RuntimeError):
    """An output could not be written (disk full, permissions, a read-only file system): a failure
    of the environment, not of the input. What was written before is intact and the partial file
    removed, so ``--resume`` continues once there is room."""


def _reason(e):
    """``No space left on device`` from an OSError or a TensorFlow error (first line)."""
    import tensorflow as tf

    if isinstance(e, tf.errors.OpError):
        # TensorFlow's file errors end "<path>; <strerror>" after a function_node prefix.
        message = " ".join(str(e.message).split())
        return message.rsplit("; ", 1)[-1][:200]
    return e.strerror or str(e)


def writing(what, fn, *args, cleanup=None):
    """``fn(*args)``, an OSError or TensorFlow error turned into one :class:`WriteError`
    ``cannot write <what>: <reason>`` after ``cleanup()`` removed the partial output."""
    import tensorflow as tf

    try:
        return fn(*args)
    except (OSError, tf.errors.OpError) as e:
        if cleanup is not None:
            cleanup()
        raise WriteError(f"cannot write {what}: {_reason(e)}") from None


def remove_litter(train_dir):
    """Partial outputs of an earlier invocation that was killed or ran out of room: checkpoint
    temporaries (``ckpt/ckpt-N_temp*``) and the hidden temporaries of atomic writes
    (``.<name>.*.tmp``). Called with the run folder's lock held."""
    import glob
    import shutil

    for path in glob.glob(os.path.join(train_dir, "ckpt", "*_temp*")):
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
    for path in glob.glob(os.path.join(train_dir, ".*.tmp")):
        os.unlink(path)


def check_finite(named, where, checkpoint=None):
    """A NonFiniteParamsError naming the first variable of ``named`` (``{name: variable}``, in
    order) holding a NaN or Inf, ``where`` it was found and the last good checkpoint. One
    reduction per floating variable on its device, fetched once."""
    import numpy as np
    import tensorflow as tf

    floats = [(k, v) for k, v in named.items() if tf.as_dtype(v.dtype).is_floating]
    if not floats:
        return
    ok = tf.stack([tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))
                   for _, v in floats]).numpy()
    if not np.all(ok):
        name = floats[int(np.argmin(ok))][0]
        tail = f"stopped, last good checkpoint: {checkpoint or 'none (no epoch finished)'}"
        raise NonFiniteParamsError(f"non-finite values in {name} {where} (the training diverged; "
                                   f"try a lower --learning_rate); {tail}")


def run(cfg, epoch_hook=None):
    """Train as configured by ``cfg`` (``config.make_config(...)`` or the parsed flags).

    ``epoch_hook(event, epoch, state)`` (optional) is called with ``"start"`` before the first epoch
    of this invocation and ``"epoch_end"`` after each epoch's checkpoint; ``state`` holds
    ``network``, ``teacher``, ``distiller`` (the method's layer drawn in panels, IEP's), ``method``
    and ``optimizer``. Returns a dict with the output paths, the per-epoch logs and whether the run
    stopped early (``--stop_after``, or ``signal``: the name of the signal that stopped it).
    Raises ConfigError (also when another training holds ``--train_dir``, :class:`RunLock`),
    DatasetNotFoundError, ParamsMismatchError, CheckpointError or NonFiniteLossError (its
    subclass NonFiniteParamsError when a parameter or statistic became non-finite: checked after
    every epoch, before its checkpoint, and before ``train_params.mat``) or WriteError (a
    checkpoint, ``run_config.json`` or ``.mat`` could not be written: disk full, permissions).
    """
    import keras

    cfg = resolve_config(cfg)
    policy_before = keras.mixed_precision.global_policy().name
    det_before = _op_determinism(True) if cfg.deterministic else None
    try:
        keras.mixed_precision.set_global_policy(cfg.precision)
        return _run(cfg, epoch_hook)
    finally:
        keras.mixed_precision.set_global_policy(policy_before)
        if cfg.deterministic and det_before is False:
            _op_determinism(False)


def _op_determinism(enable):
    """Turn TF op determinism on/off; returns the previous state (None if unknown)."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    before = getattr(tf_config, "is_op_determinism_enabled", lambda: None)()
    if enable:
        tf.config.experimental.enable_op_determinism()
    elif hasattr(tf_config, "disable_op_determinism"):
        tf_config.disable_op_determinism()
    return before


# ---------------------------------------------------------------------------------- setting up
def load_data(cfg):
    """The (subsampled) training set as tensors, the validation dataset and their sizes."""
    import numpy as np
    import tensorflow as tf

    from dataloader.datasets import load_dataset
    from dataloader.pipeline import eval_dataset, steps_per_epoch, subsample

    kwargs = {}
    if cfg.dataset.startswith("synthetic"):
        kwargs = dict(num_classes=cfg.synthetic_classes, train_per_class=cfg.synthetic_train_per_class,
                      test_per_class=cfg.synthetic_test_per_class, image_size=cfg.synthetic_image_size,
                      layouts=cfg.synthetic_layouts)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, **kwargs)
    try:
        idx = subsample(data.train_labels, cfg.sample_rate, cfg.seed)
        spe = steps_per_epoch(len(idx), cfg.batch_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    test_labels = np.asarray(data.test_labels)
    return types.SimpleNamespace(
        num_classes=data.num_classes, spe=spe, n_val=int(len(test_labels)),
        image_size=tuple(int(d) for d in data.train_images.shape[1:3]),
        train_images=tf.constant(data.train_images[idx]),
        train_labels=tf.constant(np.asarray(data.train_labels)[idx].astype(np.int32)),
        val_ds=eval_dataset(data.test_images, test_labels.astype(np.int32), cfg.val_batch_size),
        test_images=data.test_images, test_labels=test_labels)


def load_teacher(cfg, num_classes, image_size):
    """The teacher of ``--teacher_arch`` with ``--teacher_params`` assigned; refused before
    training when its parameters are non-finite or do not fit the architecture."""
    import numpy as np

    from iepkt_tf.mat_io import assign_params, load_mat
    from nets.nets_factory import get_network

    teacher = get_network(cfg.teacher_arch, num_classes, "Teacher", image_size, is_main=False)
    arrays = load_mat(cfg.teacher_params, what="--teacher_params")
    scopes = sorted({k.split("/")[0] for k in arrays})
    if "Teacher" not in scopes:
        raise ConfigError(f"--teacher_params {cfg.teacher_params}: no parameters under scope "
                          f"'Teacher' (found scopes {scopes}); train the teacher with "
                          f"--main_scope Teacher")
    bad = sorted(k for k, v in arrays.items() if k.startswith("Teacher/")
                 and np.issubdtype(v.dtype, np.number) and not np.all(np.isfinite(v)))
    if bad:
        raise ConfigError(f"--teacher_params {cfg.teacher_params}: non-finite values in {len(bad)} "
                          f"parameter(s), e.g. {bad[0]}; a teacher that cannot teach")
    n = assign_params(teacher.tf1_variables(), arrays, scope="Teacher", strict=True,
                      what=f"--teacher_params {cfg.teacher_params} (--teacher_arch {cfg.teacher_arch})")
    print(f"{n} Teacher params assigned", flush=True)
    return teacher


def build_models(cfg, data):
    """``(network, teacher or None, method)`` for ``cfg``."""
    from iepkt_tf.distillers import METHODS
    from nets.nets_factory import get_network

    try:
        network = get_network(cfg.main_arch, data.num_classes, cfg.main_scope, data.image_size,
                              is_main=True)
    except ValueError as e:
        raise ConfigError(f"--{cfg.main_scope.lower()}_arch {cfg.main_arch}: {e}") from None
    cls = METHODS[cfg.Distillation]
    teacher = load_teacher(cfg, data.num_classes, data.image_size) if cls.needs_teacher else None
    options = dict(method_options(cfg), image_size=data.image_size)
    try:
        method = cls(network, teacher, options)
    except ValueError as e:
        raise ConfigError(f"--Distillation {cfg.Distillation} with --student_arch {cfg.student_arch} / "
                          f"--teacher_arch {cfg.teacher_arch}: {e}") from None
    return network, teacher, method


def make_steps(cfg, method, network, teacher, optimizer, loss_scale, replicas=None):
    """``{"init": step or None, "main": step, "eval": step}`` (each compiled once); the training
    steps run on ``replicas`` (``op_util.distribute.Replicas``) when given."""
    from op_util.train_steps import make_eval_step, make_init_step, make_main_step

    jit = cfg.jit_iep if method.grad_rule == "clip" or cfg.init_epoch else cfg.jit_plain
    init = None
    if cfg.init_epoch:
        init = make_init_step(method, network, teacher, optimizer, cfg.weight_decay,
                              loss_scale=loss_scale, jit_compile=jit, replicas=replicas)
    main = make_main_step(method, network, teacher, optimizer, cfg.weight_decay,
                          loss_scale=loss_scale, jit_compile=jit, replicas=replicas)
    return {"init": init, "main": main, "eval": make_eval_step(network, jit_compile=cfg.jit_plain)}


# ---------------------------------------------------------------------------------- stopping
class StopSignals:
    """SIGTERM/SIGINT/SIGHUP (a closed terminal or ssh session)/SIGPIPE (the reader of the output
    went away, e.g. ``| head``) during training set ``self.name``; the loop stops after the current
    step with a checkpoint. A second signal of the same kind ends the process at once (the
    behaviour the process had before). Installed only in the main thread."""

    SIGNALS = tuple(n for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGPIPE") if hasattr(signal, n))

    def __init__(self):
        self.name, self._before = None, {}

    def _handle(self, signum, frame):
        del frame
        sig = signal.Signals(signum)
        if self.name is not None:
            signal.signal(signum, self._before.get(sig.name, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.name = sig.name
        print(f"{sig.name} received: stopping after the current step (a checkpoint is written; "
              f"continue with --resume)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                self._before[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def __exit__(self, *exc):
        for name, handler in self._before.items():
            signal.signal(getattr(signal, name), handler)
        return False


# ---------------------------------------------------------------------------------- one step
def loss_terms(values):
    """The loss metrics of a step, culprit order: every term, then the totals."""
    keys = [k for k in values if k not in NOT_LOSSES and not k.startswith("grad_norm")]
    return sorted(keys, key=lambda k: (k in ("module_total", "loss"), k == "loss"))


def call_step(step_fn, *args, where, checkpoint=None):
    """Run one compiled step and return its metrics as floats; a non-finite loss (returned, or
    caught by a ``tf.debugging`` finiteness check inside the step, as IEPDistiller does) becomes a
    one-line NonFiniteLossError naming the term, ``where`` it happened and the last checkpoint."""
    import tensorflow as tf

    tail = f"stopped, last good checkpoint: {checkpoint or 'none (no epoch finished)'}"
    try:
        values = {k: float(v.numpy()) for k, v in step_fn(*args).items()}
    except tf.errors.InvalidArgumentError as e:
        text = str(getattr(e, "message", e))
        # CheckNumerics reports "<message> : Tensor had NaN values" (after a graph traceback)
        hits = [ln.strip() for ln in text.splitlines() if "Tensor had" in ln]
        if not hits:
            raise
        what = hits[0].split(" : Tensor had")[0] + " (" + hits[0].split(" : ")[-1] + ")"
        raise NonFiniteLossError(f"non-finite value at {where}: {what}; {tail}") from None
    bad = [k for k in loss_terms(values) if not math.isfinite(values[k])]
    if bad:
        raise NonFiniteLossError(f"non-finite loss {bad[0]} = {values[bad[0]]} at {where}; {tail}")
    return values


def _tag(key, phase):
    if key == "loss":
        return "loss/total"
    if key == "grad_norm":
        return "grad_norm/module" if phase == "init" else "grad_norm/cross_entropy"
    if key == "accuracy":
        return "accuracy/train_batch"
    if key == "warmup" or key.startswith("grad_norm/"):
        return key
    return "loss/" + key


def log_window(run, window, phase, epoch, i, step, lr):
    """The progress line and step summaries of the steps in ``window`` (means)."""
    import numpy as np
    import tensorflow as tf

    cfg = run.cfg
    mean = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
    sps = mean.pop("sec_per_step")
    ips = cfg.batch_size / sps if sps > 0 else float("nan")
    terms = "  ".join(f"{k} {mean[k]:.4f}" for k in loss_terms(mean) if k != "loss")
    print(f"Epoch {epoch:03d} Step {step + 1:06d} [{i + 1}/{run.data.spe}] {phase}: loss = "
          f"{mean['loss']:.4f} ({terms})  lr {lr:.3g}  {sps:.3f} sec/step  "
          f"{ips:.1f} images/s", flush=True)
    with run.writer.as_default(step=step + 1):
        for k, v in mean.items():
            if k != "applied":
                tf.summary.scalar(_tag(k, phase), v)
        tf.summary.scalar("learning_rate", lr)
        tf.summary.scalar("perf/sec_per_step", sps)
        tf.summary.scalar("perf/images_per_sec", ips)
        if run.loss_scale is not None:
            tf.summary.scalar("loss_scale", float(run.loss_scale.scale.numpy()))


# ---------------------------------------------------------------------------------- the loop
def make_strategy(cfg):
    """``(strategy or None, Replicas or None, is_chief)`` of ``--distribute`` (a ConfigError naming
    the flag when the devices, TF_CONFIG or --batch_size cannot carry it)."""
    from op_util import distribute

    try:
        strategy = distribute.make_strategy(cfg.distribute, cfg.replicas)
        if strategy is None:
            return None, None, True
        if cfg.batch_size % strategy.num_replicas_in_sync:
            raise distribute.DistributeError(
                f"--batch_size {cfg.batch_size} must be divisible by the "
                f"{strategy.num_replicas_in_sync} replicas of --distribute {cfg.distribute}")
    except distribute.DistributeError as e:
        raise ConfigError(str(e)) from None
    print(f"--distribute {cfg.distribute}: {strategy.num_replicas_in_sync} replicas, global batch "
          f"{cfg.batch_size}, --batch_graph {cfg.batch_graph}, --sync_bn {cfg.sync_bn}", flush=True)
    return strategy, distribute.Replicas(strategy, cfg.batch_graph), distribute.is_chief(strategy)


def _build(run):
    """Networks, method, optimiser, loss scale and steps of ``run`` (on its strategy)."""
    from nets.layers import synchronize_batch_norm
    from op_util.distribute import variable_scope
    from op_util.optimizer import DynamicLossScale, NesterovMomentum
    from op_util.train_steps import optimizer_variables

    cfg = run.cfg
    with variable_scope(run.strategy):
        run.network, run.teacher, run.method = build_models(cfg, run.data)
        run.optimizer = NesterovMomentum(optimizer_variables(run.network, run.method), momentum=0.9)
        run.loss_scale = DynamicLossScale() if cfg.precision == "mixed_float16" else None
    if cfg.sync_bn:
        synchronize_batch_norm(run.network)
    run.steps = make_steps(cfg, run.method, run.network, run.teacher, run.optimizer, run.loss_scale,
                           run.replicas)


def _run(cfg, epoch_hook):
    strategy, replicas, chief = make_strategy(cfg)  # before any op: it may make logical devices
    lock = None
    if chief:
        _make_train_dir(cfg.train_dir)
        lock = RunLock(cfg.train_dir)  # before anything is written in the folder
        remove_litter(cfg.train_dir)
    try:
        return _run_locked(cfg, epoch_hook, strategy, replicas, chief)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg, epoch_hook, strategy, replicas, chief):
    import keras
    import tensorflow as tf

    from iepkt_tf.checkpoints import on_disk
    from op_util.distribute import barrier

    ckpt_dir = os.path.join(cfg.train_dir, "ckpt")
    config_path = os.path.join(cfg.train_dir, "run_config.json")
    previous = on_disk(ckpt_dir)
    if previous and not cfg.resume:
        raise ConfigError(f"--train_dir {cfg.train_dir} already holds a run ({previous[0]}); pass "
                          f"--resume to continue it or choose another --train_dir")
    saved = check_resume_config(cfg, config_path) if previous else {}
    keras.utils.set_random_seed(cfg.seed)

    run = types.SimpleNamespace(cfg=cfg, ckpt_dir=ckpt_dir, data=load_data(cfg), strategy=strategy,
                                replicas=replicas, chief=chief)
    _build(run)
    run.total_epoch = cfg.init_epoch + cfg.train_epoch
    start = _checkpointing(run, config_path)
    if run.resumed and cfg.resume_new_lr and chief:
        _record_lr_change(cfg, config_path, saved, start)

    state = dict(network=run.network, teacher=run.teacher, distiller=run.method.panel_layer(),
                 method=run.method, optimizer=run.optimizer)
    if epoch_hook is not None:
        epoch_hook("start", start[0], state)
    run.frames = None
    if cfg.vis_every > 0 and start[0] < run.total_epoch and chief:
        run.frames = EpochFrames(cfg, run.data.test_images, run.data.test_labels, run.network,
                                 run.teacher, run.method.panel_layer(), start[0])
    run.writer = tf.summary.create_file_writer(cfg.train_dir) if chief else tf.summary.create_noop_writer()
    if not run.resumed and chief:
        from iepkt_tf.visualize import log_hparams
        log_hparams(run.writer, run_hparams(cfg), metrics=HPARAMS_METRICS)
    try:
        with StopSignals() as stop:
            stopped = _epochs(run, start, stop, epoch_hook, state)
    finally:
        run.writer.close()
    result = stopped if stopped is not None else _finish(run)
    barrier(run.strategy)
    return result


class RunLock:
    """One training per ``--train_dir``: an exclusive ``fcntl.flock`` on ``train_dir/.lock`` (the
    kernel releases it when the process ends, however it ends, so a killed run never blocks the
    next ``--resume``). The file holds the owner's ``{"pid", "host", "started"}`` for the message
    of a second run, which is refused with a ConfigError before it writes anything."""

    NAME = ".lock"

    def __init__(self, train_dir):
        import fcntl
        import json
        import socket

        self.path = os.path.join(train_dir, self.NAME)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"--train_dir {train_dir}: cannot create the lock file {self.path} "
                              f"({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise ConfigError(f"--train_dir {train_dir} is in use by another training ({holder}; "
                              f"lock {self.path}); wait for it to end or choose another "
                              f"--train_dir") from None
        self.fd = fd
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode() + b"\n", 0)

    def release(self):
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _lock_holder(fd):
    """``pid N on HOST since TIME`` from a lock file's JSON (its owner may not have written it
    yet)."""
    import json

    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        return f"pid {int(owner['pid'])} on {owner['host']} since {owner['started']}"
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return "pid unknown: the owner is starting"


def _make_train_dir(train_dir):
    """Create ``--train_dir`` (a ConfigError naming it when it cannot be written)."""
    from iepkt_tf.atomic import check_writable

    try:
        check_writable(train_dir, "--train_dir", directory=True)
        os.makedirs(train_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(str(e) if str(e).startswith("--train_dir") else
                          f"--train_dir {train_dir}: cannot write there ({e.strerror or e})") from None


def _checkpointing(run, config_path):
    """Create the checkpoint of ``run`` and restore the newest readable one (``--resume``);
    returns ``(epoch, batches done in it)`` to start from."""
    import tensorflow as tf

    from iepkt_tf.checkpoints import restore_newest_readable, tracked_by_name

    cfg = run.cfg
    run.epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    run.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    run.accs_var = tf.Variable(tf.zeros([run.data.spe], tf.float64), trainable=False, name="accs")
    run.logs_var = tf.Variable(tf.zeros([run.total_epoch, 2]), trainable=False, name="logs")
    tracked = dict(network=tracked_by_name(run.network.tf1_variables()), optimizer=run.optimizer,
                   epoch=run.epoch_var, step=run.step_var, accs=run.accs_var, logs=run.logs_var)
    if run.method.state_variables():
        tracked["distiller"] = tracked_by_name(run.method.state_variables())
    if run.loss_scale is not None:
        tracked["loss_scale"] = run.loss_scale
    run.checkpoint = tf.train.Checkpoint(**tracked)
    run.manager = tf.train.CheckpointManager(run.checkpoint, run.ckpt_dir,
                                             max_to_keep=cfg.keep_checkpoints)
    path = restore_newest_readable(tracked, run.ckpt_dir, note=lambda s: print(s, flush=True))
    run.resumed = path is not None
    run.last_checkpoint = path
    if run.resumed:
        epoch, step = int(run.epoch_var.numpy()), int(run.step_var.numpy())
        where = f"epoch {epoch}" + (f", batch {step}" if step else "")
        print(f"Resumed from {path} at {where}", flush=True)
        return epoch, step
    if cfg.resume:
        print(f"--resume: no checkpoint in {run.ckpt_dir}, starting from scratch", flush=True)
    if run.chief:
        writing(config_path, write_run_config, config_path, cfg)
    return 0, 0


def _record_lr_change(cfg, config_path, saved, start):
    """--resume_new_lr: run_config.json takes the new learning rate and lists the change."""
    change = learning_rate_change(saved, cfg, *start)
    if change is None:
        return
    print(f"--resume_new_lr: learning rate {change['from']} -> {change['to']} from epoch "
          f"{change['epoch']}, step {change['step']} (recorded in {config_path})", flush=True)
    changes = list(saved.get("changes", [])) + [change]
    writing(config_path, write_run_config, config_path, cfg, changes)


def _save(run, epoch, step_in_epoch, accs):
    import numpy as np

    spe = run.data.spe
    done = epoch * spe + step_in_epoch
    full = np.zeros([spe], np.float64)
    full[:len(accs)] = accs
    run.accs_var.assign(full)
    run.epoch_var.assign(epoch if step_in_epoch < spe else epoch + 1)
    run.step_var.assign(step_in_epoch if step_in_epoch < spe else 0)
    if run.chief:  # the other workers hold the same state and write nothing
        target = os.path.join(run.ckpt_dir, f"ckpt-{done}")
        run.last_checkpoint = writing(f"the checkpoint {target}", run.manager.save, done,
                                      cleanup=lambda: remove_litter(os.path.dirname(run.ckpt_dir)))
    return run.last_checkpoint


def _epochs(run, start, stop, epoch_hook, state):
    """Run the epochs from ``start``; returns the early-stop result, or None at the end."""
    from op_util.schedules import learning_rate, warmup

    cfg = run.cfg
    logs = run.logs_var.numpy()
    run.traced, epochs_run = set(), 0
    first_epoch, first_batch = start
    accs = list(run.accs_var.numpy()[:first_batch])
    for epoch in range(first_epoch, run.total_epoch):
        lr = learning_rate(epoch, cfg.init_epoch, cfg.train_epoch, base=cfg.learning_rate)
        if epoch < cfg.init_epoch and run.method.init_learning_rate is not None:
            lr = float(run.method.init_learning_rate)
        warm = warmup(epoch, cfg.init_epoch)
        begin = first_batch if epoch == first_epoch else 0
        if epoch == cfg.init_epoch > 0 and begin == 0 and run.method.init_trains_student:
            _reset_student_momentum(run)
        accs = accs if epoch == first_epoch else []
        if _train_epoch(run, epoch, begin, accs, lr, warm, stop):
            _check_state(run, f"at step {epoch * run.data.spe + run.batches_done} (epoch {epoch})")
            path = _save(run, epoch, run.batches_done, accs)
            return _stopped(run, epoch, logs, path, signal_name=stop.name)
        train_acc, val_acc = _validate(run, epoch, accs)
        logs[epoch] = (train_acc, val_acc)   # val_acc is NaN when --val_every skips the epoch
        run.logs_var.assign(logs)
        _check_state(run, f"after epoch {epoch}")  # before the checkpoint and any .mat
        _save(run, epoch, run.data.spe, [])
        epochs_run += 1
        if run.frames is not None and vis_due(cfg, epoch, run.total_epoch):
            run.frames(run.writer, epoch)
        if epoch_hook is not None:
            epoch_hook("epoch_end", epoch, state)
        last = epoch + 1 == run.total_epoch
        if stop.name is not None and not last:
            return _stopped(run, epoch + 1, logs, run.last_checkpoint, signal_name=stop.name)
        if cfg.stop_after and epochs_run >= cfg.stop_after and not last:
            print(f"Stopped after {epochs_run} epoch(s) (--stop_after); continue with --resume "
                  f"(checkpoint {run.last_checkpoint})", flush=True)
            return _stopped(run, epoch + 1, logs, run.last_checkpoint)
    return None


def _check_state(run, where):
    """Every variable of the network (BN statistics included), of the method and the optimiser's
    momentum (all a checkpoint holds) is finite."""
    named = dict(run.network.tf1_variables())
    named.update(run.method.state_variables())
    named.update(getattr(run.optimizer, "slots", {}))
    check_finite(named, where, run.last_checkpoint)


def _reset_student_momentum(run):
    """The main phase starts from zero momentum for the student trained in the initial phase
    (the authors train the phases with separate optimisers)."""
    import tensorflow as tf

    for v in run.network.tf1_variables().values():
        if v.trainable:
            slot = run.optimizer.slot(v)
            slot.assign(tf.zeros_like(slot))


def _stopped(run, epochs_done, logs, path, signal_name=None):
    if signal_name is not None:
        print(f"Stopped by {signal_name}; continue with --resume (checkpoint {path})", flush=True)
    return {"stopped": True, "signal": signal_name, "train_dir": run.cfg.train_dir,
            "checkpoint": path, "epochs_done": epochs_done,
            "logs": {"training_acc": logs[:epochs_done, 0].copy(),
                     "validation_acc": logs[:epochs_done, 1].copy()}}


def _train_epoch(run, epoch, begin, accs, lr, warm, stop):
    """The steps of one epoch from batch ``begin``; appends each batch accuracy to ``accs``.
    Returns True when a signal asked to stop (after the step that was running)."""
    import tensorflow as tf

    from dataloader.pipeline import train_dataset
    from op_util.train_steps import step_seed

    cfg, spe = run.cfg, run.data.spe
    phase = "init" if epoch < cfg.init_epoch else "main"
    lr_t, warm_t = tf.constant(lr, tf.float32), tf.constant(warm, tf.float32)
    run.batches_done = begin
    window = []
    from op_util.distribute import distribute_batches

    batches = distribute_batches(run.strategy, lambda: train_dataset(
        run.data.train_images, run.data.train_labels, cfg.batch_size, cfg.seed, epoch,
        start_batch=begin), cfg.batch_size)
    for i, (images, labels) in enumerate(batches, start=begin):
        step = epoch * spe + i
        seed = step_seed(cfg.seed, step)
        t0 = time.perf_counter()
        if phase == "init":
            args = (run.steps["init"], images, labels, lr_t, seed)
        else:
            args = (run.steps["main"], images, labels, lr_t, warm_t, seed)
        values = call_step(*args, where=f"step {step + 1} (epoch {epoch})",
                           checkpoint=run.last_checkpoint)
        values["sec_per_step"] = time.perf_counter() - t0
        if "accuracy" in values and phase == "main":
            accs.append(values["accuracy"])
        run.batches_done = i + 1
        if phase in run.traced:  # leave the tracing/compiling first call out of the timings
            window.append(values)
        run.traced.add(phase)
        if (step + 1) % cfg.log_every == 0 and window:
            log_window(run, window, phase, epoch, i, step, lr)
            window = []
        if stop.name is not None and i + 1 < spe:
            return True
    return False


def next_validation(cfg, epoch, total_epoch):
    """The first epoch after ``epoch`` that ``--val_every`` validates (None if there is none)."""
    return next((e for e in range(epoch + 1, total_epoch)
                 if validation_due(e, cfg.init_epoch, cfg.train_epoch, cfg.val_every)), None)


def _validate(run, epoch, accs):
    """Training accuracy of epoch ``epoch`` and, when ``--val_every`` asks for it, the validation
    accuracy and loss after it (NaN when skipped); prints and logs the epoch line."""
    import numpy as np
    import tensorflow as tf

    cfg = run.cfg
    main = epoch >= cfg.init_epoch
    train_acc = 100.0 * float(np.mean(accs)) if (main and accs) else 1.0
    head = (f"Epoch {epoch:03d} Step {(epoch + 1) * run.data.spe:06d} - train_Accuracy : "
            f"{train_acc:.2f}%  val_Accuracy : ")
    if not validation_due(epoch, cfg.init_epoch, cfg.train_epoch, cfg.val_every):
        after = next_validation(cfg, epoch, run.total_epoch)
        print(head + f"not run (--val_every {cfg.val_every}: next after epoch {after:03d})",
              flush=True)
        with run.writer.as_default(step=epoch):
            tf.summary.scalar("accuracy/train", train_acc)
        return train_acc, float("nan")
    correct = loss_sum = 0.0
    for images, labels in run.data.val_ds:
        c, s = run.steps["eval"](images, labels)
        correct += float(c)
        loss_sum += float(s)
    n_val = max(1, run.data.n_val)
    val_acc = 100.0 * correct / n_val
    print(head + f"{val_acc:.2f}%", flush=True)
    with run.writer.as_default(step=epoch):
        tf.summary.scalar("accuracy/train", train_acc)
        tf.summary.scalar("accuracy/validation", val_acc)
        tf.summary.scalar("loss/validation", loss_sum / n_val)
    run.writer.flush()
    return train_acc, val_acc


def _finish(run):
    """Write ``train_params.mat`` and ``log.mat`` and print where everything is."""
    import numpy as np

    from iepkt_tf.mat_io import collect_params, save_mat

    cfg = run.cfg
    params_path = os.path.join(cfg.train_dir, "train_params.mat")
    log_path = os.path.join(cfg.train_dir, "log.mat")
    logs = run.logs_var.numpy()
    done = int(run.epoch_var.numpy())
    log = {"training_acc": logs[:done, 0].astype(np.float64),
           "validation_acc": logs[:done, 1].astype(np.float64)}
    if not run.chief:
        print("Finished training (this worker writes nothing; the chief writes the outputs)", flush=True)
        return {"stopped": False, "train_dir": cfg.train_dir, "chief": False, "epochs_done": done,
                "logs": log}
    _check_state(run, "before writing train_params.mat")
    writing(params_path, save_mat, params_path,
            collect_params(run.network.tf1_variables(), scope=cfg.main_scope))
    writing(log_path, save_mat, log_path, log)
    print("Finished training!", flush=True)
    print(f"TensorBoard logs: {cfg.train_dir} (tensorboard --logdir {cfg.train_dir})", flush=True)
    print(f"Parameters: {params_path}", flush=True)
    print(f"Accuracy log: {log_path}", flush=True)
    print(f"Checkpoints: {run.ckpt_dir}", flush=True)
    if cfg.vis_every > 0 and cfg.vis_snapshots:
        print(frames_command(cfg, run.method.draws_panels), flush=True)
    return {"stopped": False, "train_dir": cfg.train_dir, "train_params": params_path, "log": log_path,
            "checkpoint": run.last_checkpoint, "epochs_done": done, "logs": log}


def frames_command(cfg, with_distiller):
    """The line telling the user how to make GIFs of the run's frames."""
    return (f"Frames: {os.path.join(cfg.train_dir, 'vis')} (GIFs: python -m iepkt_tf.visualize "
            f"--run_dir {cfg.train_dir} --out_dir OUT --dataset {cfg.dataset} --split test "
            f"--num_images {cfg.vis_images} --seed {cfg.seed} --size {VIS_PANEL['size']} "
            f"--thumb {VIS_PANEL['thumb']}"
            + (f" --data_dir {cfg.data_dir}" if cfg.data_dir else "")
            + (f" --image_size {cfg.synthetic_image_size}" if cfg.synthetic_image_size else "")
            + (f" --teacher_params {cfg.teacher_params} --mpnn_iter {cfg.mpnn_iter} --adapter {cfg.adapter}"
               if with_distiller else "")
            + ")")
