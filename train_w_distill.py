r"""Train a network, plainly or with IEP knowledge transfer (the authors' ``train_w_distill.py``).

    python train_w_distill.py --Distillation None --main_scope Teacher --train_dir runs/teacher
    python train_w_distill.py --Distillation IEP --teacher_params runs/teacher/train_params.mat \
        --train_dir runs/iep

Same flags, defaults and outputs as the authors' script (sseung0703/IEPKT): batch 128, validation
batch 200, Nesterov momentum 0.9, learning rate 0.1 times 0.2 at 30/60/80 % of the main phase,
weight decay 5e-4, 100 epochs; with IEP an initial phase of 20 epochs trains only the distillation
module. At the end ``train_params.mat`` (every TF1-named variable of ``--main_scope``) and
``log.mat`` (``training_acc``, ``validation_acc`` per epoch) are written, TensorBoard events go to
``--train_dir`` and a checkpoint is kept per epoch (``--resume`` continues a run exactly).
Every ``--vis_every`` epochs (between epochs, never inside a training step) the interpretability
panels of a fixed test sample are logged as TensorBoard images and the parameters saved to
``vis/params_epoch_XXX.mat`` (``python -m iepkt_tf.visualize --run_dir`` makes GIFs of them); the
settings go once to TensorBoard's HParams dashboard.
``python train_w_distill.py --helpfull`` documents every flag.

Differences from the authors' loop (documented choices):
* An epoch is one pass over a fresh permutation of the training set (the order depends only on
  ``(--seed, epoch)``) with the incomplete last batch dropped; the authors carry left-over images
  into the next epoch. The schedule, the phase switch and the warm-up use this epoch index, which is
  the authors' ``floor(step * batch / N)`` whenever the batch size divides N.
* Validation runs after every epoch, also during the initial phase (where the training accuracy is
  printed as 1.00, the authors' placeholder: the student is not trained then). The authors'
  first log entry comes after the first step (or after the initial phase) and the others at the end
  of each main-phase epoch; here ``log.mat`` has exactly one entry per epoch.
* Validation keeps the incomplete last batch (the authors drop it; for CIFAR it divides evenly).
* Dropout masks and drop-head noise are drawn from stateless seeds ``(--seed, step)``.

The optimiser of IEP is not published; ``op_util`` reconstructs it from the same authors'
``Optimizer_w_MHGD`` (see op_util/clipping.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import types

from absl import app, flags, logging

from dataloader.datasets import DATASETS
from iepkt_tf.atomic import atomic_open

FLAGS = flags.FLAGS

DISTILLATIONS = ("None", "KD", "IEP")
MODEL_NAMES = ("WResNet", "ResNet")
SCOPES = ("Student", "Teacher")

# (kind, name, default, help[, enum values]) of every flag, in --helpfull order.
FLAG_SPECS = (
    ("string", "train_dir", "IEP/CIFAR100/WResNet/IEP/",
     "Directory where checkpoints (ckpt/), TensorBoard event logs, train_params.mat and log.mat "
     "are written."),
    ("enum", "Distillation", "IEP",
     "Distillation method: 'None' trains --main_scope's network on cross-entropy; 'KD' trains the "
     "student on soft logits of the teacher in --teacher_params (Hinton et al. 2015, the control); "
     "'IEP' trains the student with interpretable embedding procedure knowledge transfer from the "
     "teacher in --teacher_params.", DISTILLATIONS),
    ("enum", "dataset", "cifar100",
     "Dataset: 'synthetic' and 'synthetic_parts' are generated (no files needed); the others are read from --data_dir "
     "(see dataloader/datasets.py for the layouts).", tuple(DATASETS)),
    ("enum", "model_name", "WResNet",
     "Network family of the main network. WResNet defaults to WResNet-16-4 (Student) and "
     "WResNet-40-4 (Teacher); ResNet needs --student_arch/--teacher_arch.", MODEL_NAMES),
    ("enum", "main_scope", "Student",
     "The network being trained and saved (its TF1 scope). Train a teacher with --main_scope "
     "Teacher --Distillation None.", SCOPES),
    ("string", "student_arch", None,
     "Student architecture, e.g. WResNet-16-4, WResNet-16-2, ResNet-20 (default: WResNet-16-4 "
     "for --model_name WResNet)."),
    ("string", "teacher_arch", None,
     "Teacher architecture, e.g. WResNet-40-4, ResNet-56 (default: WResNet-40-4 for --model_name "
     "WResNet). With IEP it must match --teacher_params."),
    ("string", "teacher_params", None,
     "Teacher parameters: a .mat written by this script with --main_scope Teacher (or the "
     "authors' train_params.mat). Required with --Distillation KD and IEP."),
    ("string", "data_dir", None, "Directory holding the dataset files (not used by synthetic)."),
    ("float", "sample_rate", 1.0,
     "Fraction of the training set used, class-balanced (the paper's 1.0/0.5/0.25/0.1); the test "
     "set is never subsampled."),
    ("integer", "train_epoch", 100, "Epochs of the main phase (student training)."),
    ("integer", "init_epoch", None,
     "Epochs of the initial phase that trains only the distillation module (default 20 with "
     "IEP, 0 otherwise)."),
    ("integer", "batch_size", 128, "Training batch size."),
    ("integer", "val_batch_size", 200, "Validation batch size."),
    ("float", "learning_rate", 0.1,
     "Initial learning rate; multiplied by 0.2 at 30, 60 and 80 percent of the main phase."),
    ("float", "weight_decay", 5e-4,
     "L2 weight decay: gradient += wd * w on conv/FC weights and BN gamma/beta; the distillation "
     "module gets wd * sum(w^2) added to its loss (as in the authors' Optimizer_w_MHGD)."),
    ("integer", "seed", 0,
     "Seed of the initialisation, the data order and augmentation, dropout and drop-head noise "
     "(and of the synthetic dataset)."),
    ("boolean", "resume", False,
     "Continue from the last checkpoint in --train_dir/ckpt (to the same result as an "
     "uninterrupted run); starts from scratch if there is none."),
    ("integer", "stop_after", 0,
     "Stop (as if interrupted) after this many epochs of this invocation, keeping the checkpoint; "
     "continue later with --resume. 0 = run to the end."),
    ("integer", "mpnn_iter", 2, "Message-passing iterations of the IEP module (paper ablation 1-4)."),
    ("float", "kd_temperature", 4.0, "KD: softmax temperature T (the soft term is scaled by T^2)."),
    ("float", "kd_weight", 0.9, "KD: weight alpha of the soft term; the cross-entropy gets 1 - alpha."),
    ("boolean", "k_int", True, "Use the interim-knowledge loss K_int (MPNN read-out KL)."),
    ("boolean", "k_alt", True, "Use the alteration-knowledge loss K_alt (message L1)."),
    ("boolean", "k_bb", True, "Use the black-box (multi-head graph) loss K_BB."),
    ("enum", "pca", "ipca",
     "Second PCA of the stacked PCA: 'ipca' incremental PCA (the authors') or 'pca' plain "
     "per-batch PCA (the paper's ablation).", ("ipca", "pca")),
    ("enum", "adapter", "bn_relu",
     "IEP with a student of other widths than the teacher: the learned adapter at each such "
     "sensing point. bn_relu = 1x1 conv + BN + ReLU (non-negative like the teacher's post-ReLU "
     "map); bn = 1x1 conv + BN (signed). Beyond the authors' code (equal widths only).",
     ("bn_relu", "bn")),
    ("enum", "dist_clip", "separate",
     "IEP main phase: separate = the gradients of K_int, K_alt and K_BB are clipped one by one, per "
     "variable, to the cross-entropy gradient's norm x warm-up (our reconstruction of the "
     "unpublished Optimizer_w_IEP); summed = the gradient of their sum is clipped once (as "
     "Optimizer_w_MHGD does its one loss; one distillation backward pass instead of three).",
     ("separate", "summed")),
    ("enum", "precision", "auto",
     "Keras dtype policy. auto = mixed_float16 on GPU (with a dynamic loss scale); on CPU "
     "mixed_bfloat16 where the CPU has native bfloat16 (AVX512-BF16/AMX: 1.6-1.7x faster here, "
     "the distiller's linear algebra stays float32), else float32. float32 = the authors' "
     "arithmetic.",
     ("auto", "float32", "mixed_float16", "mixed_bfloat16")),
    ("enum", "jit", "auto",
     "XLA compilation of the steps. auto = off on CPU (XLA is slower there); on GPU on for plain "
     "training and evaluation, off for the IEP steps (eigh/SVD).", ("auto", "true", "false")),
    ("boolean", "deterministic", True,
     "Enable TensorFlow op determinism (bitwise-reproducible runs and resumes; can be slower on "
     "GPU)."),
    ("integer", "log_every", 200, "Print a progress line and write step summaries every N steps."),
    ("integer", "vis_every", 5,
     "Interpretability frames every N epochs and at the last epoch (0 = off), between epochs only: "
     "on a fixed, seeded sample of --vis_images test images the stacked-PCA embedding, graph and "
     "heat-map panels of sensing points 1-3 go to TensorBoard (images iep/point{1,2,3}/..., "
     "histograms of the first two coordinates); with IEP the student is drawn in the teacher's "
     "frame next to the MPNN estimate A^ and messages, without IEP the main network alone. Each "
     "frame keeps the previous frame's orientation. See also --vis_snapshots."),
    ("integer", "vis_images", 64,
     "Size of the fixed, seeded test-set sample drawn by --vis_every (at least 3)."),
    ("boolean", "vis_snapshots", True,
     "With --vis_every: also save each frame's parameters (main network, plus the distiller with "
     "IEP; about the size of train_params.mat) to TRAIN_DIR/vis/params_epoch_XXX.mat, for GIFs "
     "with `python -m iepkt_tf.visualize --run_dir TRAIN_DIR`."),
    ("integer", "keep_checkpoints", 2, "Number of per-epoch checkpoints kept in --train_dir/ckpt."),
    ("integer", "synthetic_classes", None,
     "Generated datasets: number of classes (default synthetic 10, synthetic_parts 40)."),
    ("integer", "synthetic_train_per_class", None,
     "Generated datasets: training images per class (default synthetic 200, synthetic_parts 125)."),
    ("integer", "synthetic_test_per_class", None,
     "Generated datasets: test images per class (default synthetic 50, synthetic_parts 50)."),
    ("integer", "synthetic_image_size", None, "Generated datasets: image height and width (default 32)."),
)
FLAG_NAMES = tuple(spec[1] for spec in FLAG_SPECS)
FLAG_DEFAULTS = {spec[1]: spec[2] for spec in FLAG_SPECS}
ENUMS = {spec[1]: tuple(spec[4]) for spec in FLAG_SPECS if spec[0] == "enum"}


def define_flags(flag_values=None):
    """Define the script's flags on ``flag_values`` (absl's global FLAGS by default). Importing
    this module defines nothing, so it never clashes with other tools' flags."""
    fv = FLAGS if flag_values is None else flag_values
    for kind, name, default, help_text, *enum in FLAG_SPECS:
        definer = getattr(flags, "DEFINE_" + kind)
        if kind == "enum":
            definer(name, default, list(enum[0]), help_text, flag_values=fv)
        else:
            definer(name, default, help_text, flag_values=fv)
    return fv


# Settings that must not change when a run is resumed (they define the run's state and data).
RESUME_KEYS = ("Distillation", "dataset", "main_scope", "student_arch", "teacher_arch",
               "sample_rate", "batch_size", "seed", "init_epoch", "train_epoch", "mpnn_iter", "k_int", "k_alt",
               "k_bb", "pca", "adapter", "dist_clip", "kd_temperature", "kd_weight", "synthetic_classes", "synthetic_train_per_class",
               "synthetic_test_per_class", "synthetic_image_size")

# Metrics checked for non-finite values, in the order used to name the culprit.
LOSS_TERMS = ("cross_entropy", "kd", "k_int", "k_alt", "k_bb", "mpnn_kld", "est_loss", "mha_loss",
              "module_l2", "weight_decay", "module_total", "loss")


class ConfigError(ValueError):
    """A flag value is invalid or inconsistent (the message names the flag and what was expected)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; the run stopped without writing a checkpoint."""


def make_config(**overrides):
    """The flag defaults as a namespace, with ``overrides`` (for calling ``run`` in-process)."""
    unknown = sorted(set(overrides) - set(FLAG_NAMES))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {', '.join(FLAG_NAMES)}")
    values = dict(FLAG_DEFAULTS)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def config_from_flags(flag_values=FLAGS):
    return types.SimpleNamespace(**{name: getattr(flag_values, name) for name in FLAG_NAMES})


def _choice(cfg, name, valid):
    value = getattr(cfg, name)
    if value not in valid:
        raise ConfigError(f"--{name}: unknown value {value!r}; valid values: {', '.join(valid)}")
    return value


def _at_least(cfg, name, low):
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"--{name} must be an integer >= {low}, got {value!r}")
    return value


def resolve_config(cfg):
    """Validate ``cfg`` and fill the derived settings (architectures, init_epoch, precision, jit)."""
    import tensorflow as tf

    from op_util.device import default_jit, default_precision

    from nets.nets_factory import DEFAULT_ARCH, parse_arch

    cfg = types.SimpleNamespace(**vars(cfg))
    missing = [n for n in FLAG_NAMES if not hasattr(cfg, n)]
    if missing:
        raise ConfigError(f"missing setting(s) {missing}; build the config with make_config()")
    for name, valid in ENUMS.items():
        _choice(cfg, name, valid)
    if not cfg.train_dir:
        raise ConfigError("--train_dir must be a directory path")
    iep = cfg.Distillation == "IEP"
    distill = cfg.Distillation != "None"
    if cfg.init_epoch is None:
        cfg.init_epoch = 20 if iep else 0
    _at_least(cfg, "init_epoch", 0)
    _at_least(cfg, "train_epoch", 0)
    if cfg.init_epoch + cfg.train_epoch < 1:
        raise ConfigError("--init_epoch + --train_epoch must be >= 1")
    _at_least(cfg, "batch_size", 2 if iep else 1)
    _at_least(cfg, "val_batch_size", 1)
    _at_least(cfg, "seed", 0)
    _at_least(cfg, "stop_after", 0)
    _at_least(cfg, "mpnn_iter", 1)
    _at_least(cfg, "log_every", 1)
    _at_least(cfg, "keep_checkpoints", 1)
    _at_least(cfg, "vis_every", 0)
    _at_least(cfg, "vis_images", 3)
    for name in ("synthetic_classes", "synthetic_train_per_class", "synthetic_test_per_class",
                 "synthetic_image_size"):
        if getattr(cfg, name) is not None:
            _at_least(cfg, name, 1 if name != "synthetic_classes" else 2)
    if not (isinstance(cfg.learning_rate, (int, float)) and cfg.learning_rate > 0
            and math.isfinite(cfg.learning_rate)):
        raise ConfigError(f"--learning_rate must be a positive number, got {cfg.learning_rate!r}")
    if not (isinstance(cfg.weight_decay, (int, float)) and cfg.weight_decay >= 0):
        raise ConfigError(f"--weight_decay must be >= 0, got {cfg.weight_decay!r}")
    if not iep and cfg.init_epoch:
        raise ConfigError("--init_epoch > 0 needs --Distillation IEP (the initial phase trains the "
                          "distillation module)")

    for scope in SCOPES:
        flag = scope.lower() + "_arch"
        arch = getattr(cfg, flag)
        if arch is None:
            if cfg.model_name != "WResNet":
                if scope == cfg.main_scope or distill:
                    raise ConfigError(f"--{flag} is required with --model_name {cfg.model_name} "
                                      f"(e.g. ResNet-20 for a student, ResNet-56 for a teacher)")
                continue
            arch = DEFAULT_ARCH[scope]
        try:
            family, _, _ = parse_arch(arch)
        except ValueError as e:
            raise ConfigError(f"--{flag}: {e}") from None
        if scope == cfg.main_scope and family != cfg.model_name:
            raise ConfigError(f"--{flag} {arch} is a {family} network but --model_name is "
                              f"{cfg.model_name}")
        setattr(cfg, flag, arch)

    if distill:
        if cfg.main_scope != "Student":
            raise ConfigError(f"--main_scope must be Student with --Distillation {cfg.Distillation} "
                              "(the teacher is loaded from --teacher_params and stays fixed)")
        if not cfg.teacher_params:
            raise ConfigError(f"--teacher_params is required with --Distillation {cfg.Distillation}: "
                              "a .mat written by a run with --main_scope Teacher (or the authors' "
                              "train_params.mat)")
    if cfg.Distillation == "KD":
        if not (isinstance(cfg.kd_temperature, (int, float)) and cfg.kd_temperature > 0):
            raise ConfigError(f"--kd_temperature must be > 0, got {cfg.kd_temperature!r}")
        if not (isinstance(cfg.kd_weight, (int, float)) and 0 <= cfg.kd_weight <= 1):
            raise ConfigError(f"--kd_weight must be in [0, 1], got {cfg.kd_weight!r}")
    if iep:
        if not (cfg.k_int or cfg.k_alt or cfg.k_bb):
            raise ConfigError("--Distillation IEP needs at least one of --k_int, --k_alt, --k_bb")

    gpu = bool(tf.config.list_physical_devices("GPU"))
    if cfg.precision == "auto":
        cfg.precision = default_precision(gpu)
    cfg.jit_plain = cfg.jit == "true" or (cfg.jit == "auto" and default_jit(gpu))
    cfg.jit_iep = cfg.jit == "true" or (cfg.jit == "auto" and default_jit(gpu, decompositions=True))
    cfg.main_arch = cfg.student_arch if cfg.main_scope == "Student" else cfg.teacher_arch
    return cfg


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


def run(cfg, epoch_hook=None):
    """Train as configured by ``cfg`` (``make_config(...)`` or the parsed flags).

    ``epoch_hook(event, epoch, state)`` (optional) is called with ``"start"`` before the first epoch
    of this invocation and ``"epoch_end"`` after each epoch's checkpoint; ``state`` holds
    ``network``, ``teacher``, ``distiller`` and ``optimizer``. Returns a dict with the output paths,
    the per-epoch logs and whether the run stopped early (``--stop_after``).
    Raises ConfigError, DatasetNotFoundError, ParamsMismatchError or NonFiniteLossError.
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


def _check_resume_config(cfg, path):
    current = {k: getattr(cfg, k) for k in RESUME_KEYS}
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        diff = [f"--{k} {saved.get(k)!r} -> {current[k]!r}" for k in RESUME_KEYS
                if k in saved and saved[k] != current[k]]
        if diff:
            raise ConfigError(f"--resume: settings differ from the run in {os.path.dirname(path)}: "
                              + "; ".join(diff))


def _write_json(path, data):
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def _load_teacher(cfg, num_classes, image_size):
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


def tracked_by_name(named):
    """A checkpointable ``{TF1 name: variable}``: checkpoints keyed by the authors' names,
    independent of how the Keras objects nest their layers (a Keras 3 model does not expose layers
    kept in nested lists to tf.train.Checkpoint, so checkpointing the model object would silently
    miss e.g. the blocks' batch-norm statistics)."""
    import tensorflow as tf

    module = tf.Module(name="named_variables")
    module.variables_by_name = dict(named)
    return module


def distiller_state(distiller):
    """Every variable of the distiller: its TF1 names plus the state the authors do not name
    (the incremental PCAs' ``initialized`` flags), under their Keras paths."""
    named = dict(distiller.tf1_variables())
    known = {id(v) for v in named.values()}
    for v in distiller.variables:
        if id(v) not in known:
            named[v.path] = v
    return named


def _named_trainables(network, distiller):
    named = {n: v for n, v in network.tf1_variables().items() if v.trainable}
    if distiller is not None:
        by_id = {id(v): n for n, v in distiller.tf1_variables().items()}
        for v in list(distiller.module_variables()) + list(distiller.adapter_variables()):
            named[by_id[id(v)]] = v
    return named


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
    bad = [k for k in LOSS_TERMS if k in values and not math.isfinite(values[k])]
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


# Settings shown in TensorBoard's HParams dashboard: all but where/how the run is stored and reported.
HPARAMS_EXCLUDE = ("train_dir", "data_dir", "resume", "stop_after", "log_every", "keep_checkpoints",
                   "vis_every", "vis_images", "vis_snapshots")
# The scalar tags (all written by the loop below) the dashboard lists next to them.
HPARAMS_METRICS = ("accuracy/validation", "accuracy/train", "loss/validation", "loss/total")
# Geometry of the TensorBoard frames (the visualize CLI's --size and --thumb, so that the CLI on
# the snapshots redraws exactly these frames).
VIS_PANEL = dict(size=512, thumb=24)


def run_hparams(cfg):
    """The resolved settings logged once per run to the HParams dashboard."""
    return {k: getattr(cfg, k) for k in FLAG_NAMES + ("main_arch",) if k not in HPARAMS_EXCLUDE}


def vis_due(cfg, epoch, total_epoch):
    """Whether epoch ``epoch`` (0-based) ends with an interpretability frame (``--vis_every``)."""
    return cfg.vis_every > 0 and ((epoch + 1) % cfg.vis_every == 0 or epoch + 1 == total_epoch)


class EpochFrames:
    """The interpretability frames of a run (``--vis_every``), drawn between epochs only.

    A fixed, seeded sample of ``--vis_images`` test images (:func:`iepkt_tf.visualize.fixed_sample`);
    per frame the main network's sensing maps, :func:`~iepkt_tf.visualize.make_panels` (teacher
    maps computed once: the teacher is fixed; the distiller in inference mode, its state untouched)
    with the previous frame as ``reference``, :func:`~iepkt_tf.visualize.log_iep_images` at step
    ``epoch`` and, with ``--vis_snapshots``, :func:`~iepkt_tf.visualize.save_snapshot`. The last
    frame's coordinates are kept in ``vis/frame_coords.npz`` so a resumed run keeps the orientation.
    """

    def __init__(self, cfg, images, labels, network, teacher=None, distiller=None, start_epoch=0):
        import numpy as np

        from iepkt_tf.visualize import fixed_sample, run_features

        idx = fixed_sample(labels, cfg.vis_images, cfg.seed)
        self.images, self.labels = np.asarray(images)[idx], np.asarray(labels)[idx]
        self.network, self.distiller = network, distiller
        self.batch, self.seed = cfg.val_batch_size, cfg.seed
        self.snapshots, self.train_dir = cfg.vis_snapshots, cfg.train_dir
        self.coords_path = os.path.join(cfg.train_dir, "vis", "frame_coords.npz")
        self.teacher_feats = None if teacher is None else run_features(teacher, self.images, self.batch)
        self.reference = self._load_reference(start_epoch)
        self.notes = set()

    def _load_reference(self, before_epoch):
        """The last frame written before ``before_epoch`` (same sample), or None."""
        import numpy as np

        from iepkt_tf.visualize import Panels

        if not os.path.isfile(self.coords_path):
            return None
        with np.load(self.coords_path, allow_pickle=False) as z:
            epoch = int(z["epoch"])
            coords = {k: z[k] for k in z.files if k != "epoch"}
        if epoch >= before_epoch or any(c.shape[0] != len(self.labels) for c in coords.values()):
            return None
        return Panels({}, coords, [])

    def _save_coords(self, epoch, coords):
        import numpy as np

        with atomic_open(self.coords_path, "wb") as f:
            np.savez(f, epoch=np.int64(epoch), **coords)

    def __call__(self, writer, epoch):
        """Draw and log the frame of epoch ``epoch``; returns ``(panels, snapshot path or None)``."""
        from iepkt_tf.visualize import log_iep_images, make_panels, run_features, save_snapshot

        t0 = time.perf_counter()
        feats = run_features(self.network, self.images, self.batch)
        panels = make_panels(self.images, self.labels, feats, self.teacher_feats, self.distiller,
                             reference=self.reference, seed=self.seed, caption=f"EPOCH {epoch:03d}",
                             **VIS_PANEL)
        log_iep_images(writer, epoch, panels)
        self._save_coords(epoch, panels.coords)
        path = save_snapshot(self.train_dir, epoch, self.network, self.distiller) if self.snapshots else None
        self.reference = panels
        print(f"Epoch {epoch:03d} frame: {len(panels.images)} panels of {len(self.labels)} test images "
              f"-> TensorBoard iep/*" + (f", {path}" if path else "")
              + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
        for note in panels.notes:
            if note not in self.notes:
                self.notes.add(note)
                print(f"  note: {note}", flush=True)
        return panels, path


def _run(cfg, epoch_hook):
    import keras
    import numpy as np
    import tensorflow as tf

    from dataloader.datasets import load_dataset
    from dataloader.pipeline import eval_dataset, steps_per_epoch, subsample, train_dataset
    from iepkt_tf.mat_io import collect_params, save_mat
    from nets.nets_factory import get_network
    from op_util.optimizer import DynamicLossScale, NesterovMomentum
    from op_util.schedules import learning_rate, warmup
    from op_util.train_steps import (make_eval_step, make_iep_init_step, make_iep_main_step,
                                     make_kd_step, make_plain_step, step_seed)

    iep = cfg.Distillation == "IEP"
    train_dir = cfg.train_dir
    os.makedirs(train_dir, exist_ok=True)
    ckpt_dir = os.path.join(train_dir, "ckpt")
    config_path = os.path.join(train_dir, "run_config.json")
    previous = tf.train.latest_checkpoint(ckpt_dir)
    if previous and not cfg.resume:
        raise ConfigError(f"--train_dir {train_dir} already holds a run ({previous}); pass --resume "
                          f"to continue it or choose another --train_dir")
    if previous:
        _check_resume_config(cfg, config_path)
    keras.utils.set_random_seed(cfg.seed)

    # ---- data
    kwargs = {}
    if cfg.dataset.startswith("synthetic"):
        kwargs = dict(num_classes=cfg.synthetic_classes, train_per_class=cfg.synthetic_train_per_class,
                      test_per_class=cfg.synthetic_test_per_class, image_size=cfg.synthetic_image_size)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, **kwargs)
    try:
        idx = subsample(data.train_labels, cfg.sample_rate, cfg.seed)
        n_train = len(idx)
        spe = steps_per_epoch(n_train, cfg.batch_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    train_images = tf.constant(data.train_images[idx])
    train_labels = tf.constant(np.asarray(data.train_labels)[idx].astype(np.int32))
    image_size = tuple(int(d) for d in data.train_images.shape[1:3])
    val_ds = eval_dataset(data.test_images, np.asarray(data.test_labels).astype(np.int32),
                          cfg.val_batch_size)
    n_val = int(len(data.test_labels))

    # ---- networks, distiller, optimiser
    try:
        network = get_network(cfg.main_arch, data.num_classes, cfg.main_scope, image_size,
                              is_main=True)
    except ValueError as e:
        raise ConfigError(f"--{cfg.main_scope.lower()}_arch {cfg.main_arch}: {e}") from None
    teacher = distiller = None
    if cfg.Distillation != "None":
        teacher = _load_teacher(cfg, data.num_classes, image_size)
    if iep:
        from iepkt_tf.iep import IEPDistiller

        try:
            distiller = IEPDistiller(teacher.feature_channels[1:4], network.feature_channels[1:4],
                                     mpnn_iter=cfg.mpnn_iter,
                                     pca={"ipca": "ipca", "pca": "batch"}[cfg.pca],
                                     use_k_int=cfg.k_int, use_k_alt=cfg.k_alt, use_k_bb=cfg.k_bb,
                                     adapter=cfg.adapter)
        except ValueError as e:
            raise ConfigError(f"--student_arch {cfg.student_arch} / --teacher_arch "
                              f"{cfg.teacher_arch}: {e}") from None
    optimizer = NesterovMomentum(_named_trainables(network, distiller), momentum=0.9)
    loss_scale = DynamicLossScale() if cfg.precision == "mixed_float16" else None
    total_epoch = cfg.init_epoch + cfg.train_epoch

    if iep:
        init_step = make_iep_init_step(teacher, distiller, optimizer, wd_module=cfg.weight_decay,
                                       loss_scale=loss_scale, jit_compile=cfg.jit_iep)
        main_step = make_iep_main_step(network, teacher, distiller, optimizer, cfg.weight_decay,
                                       loss_scale=loss_scale, jit_compile=cfg.jit_iep,
                                       clip=cfg.dist_clip)
    elif cfg.Distillation == "KD":
        init_step = None
        main_step = make_kd_step(network, teacher, optimizer, cfg.weight_decay,
                                 temperature=float(cfg.kd_temperature), alpha=float(cfg.kd_weight),
                                 loss_scale=loss_scale, jit_compile=cfg.jit_plain)
    else:
        init_step = None
        main_step = make_plain_step(network, optimizer, cfg.weight_decay, loss_scale=loss_scale,
                                    jit_compile=cfg.jit_plain)
    eval_step = make_eval_step(network, jit_compile=cfg.jit_plain)

    # ---- checkpoint / resume
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    logs_var = tf.Variable(tf.zeros([total_epoch, 2]), trainable=False, name="logs")
    tracked = dict(network=tracked_by_name(network.tf1_variables()), optimizer=optimizer,
                   epoch=epoch_var, logs=logs_var)
    if distiller is not None:
        tracked["distiller"] = tracked_by_name(distiller_state(distiller))
    if loss_scale is not None:
        tracked["loss_scale"] = loss_scale
    checkpoint = tf.train.Checkpoint(**tracked)
    manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=cfg.keep_checkpoints)
    start_epoch = 0
    resumed = bool(manager.latest_checkpoint)
    if resumed:
        # Every variable must come back; the loss scale only if the run had one (the precision
        # may differ between the interrupted and the resumed run, e.g. GPU -> CPU).
        saved = {k.split("/")[0] for k, _ in tf.train.list_variables(manager.latest_checkpoint)}
        restore = tf.train.Checkpoint(**{k: v for k, v in tracked.items()
                                         if k != "loss_scale" or k in saved})
        restore.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        start_epoch = int(epoch_var.numpy())
        print(f"Resumed from {manager.latest_checkpoint} at epoch {start_epoch}", flush=True)
    else:
        if cfg.resume:
            print(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch", flush=True)
        _write_json(config_path, {k: getattr(cfg, k) for k in FLAG_NAMES + ("main_arch",)})

    state = dict(network=network, teacher=teacher, distiller=distiller, optimizer=optimizer)
    if epoch_hook is not None:
        epoch_hook("start", start_epoch, state)

    frames = None
    if cfg.vis_every > 0 and start_epoch < total_epoch:
        frames = EpochFrames(cfg, data.test_images, np.asarray(data.test_labels), network, teacher,
                             distiller, start_epoch)
    writer = tf.summary.create_file_writer(train_dir)
    if not resumed:
        from iepkt_tf.visualize import log_hparams
        log_hparams(writer, run_hparams(cfg), metrics=HPARAMS_METRICS)
    logs = logs_var.numpy()
    epochs_run = 0
    traced = set()  # phases whose step function has run once (the first call traces/compiles)
    try:
        for epoch in range(start_epoch, total_epoch):
            phase = "init" if epoch < cfg.init_epoch else "main"
            lr = learning_rate(epoch, cfg.init_epoch, cfg.train_epoch, base=cfg.learning_rate)
            warm = warmup(epoch, cfg.init_epoch)
            lr_t, warm_t = tf.constant(lr, tf.float32), tf.constant(warm, tf.float32)
            window, accs = [], []
            for i, (images, labels) in enumerate(train_dataset(train_images, train_labels,
                                                               cfg.batch_size, cfg.seed, epoch)):
                step = epoch * spe + i
                seed = step_seed(cfg.seed, step)
                t0 = time.perf_counter()
                if phase == "init":
                    args = (init_step, images, labels, lr_t, seed)
                elif iep:
                    args = (main_step, images, labels, lr_t, warm_t, seed)
                else:
                    args = (main_step, images, labels, lr_t, seed)
                values = call_step(*args, where=f"step {step + 1} (epoch {epoch})",
                                   checkpoint=manager.latest_checkpoint)
                dt = time.perf_counter() - t0
                if "accuracy" in values:
                    accs.append(values["accuracy"])
                values["sec_per_step"] = dt
                if phase in traced:  # leave the tracing/compiling first call out of the timings
                    window.append(values)
                traced.add(phase)
                if (step + 1) % cfg.log_every == 0 and window:
                    mean = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
                    sps = mean.pop("sec_per_step")
                    ips = cfg.batch_size / sps if sps > 0 else float("nan")
                    terms = "  ".join(f"{k} {mean[k]:.4f}" for k in LOSS_TERMS[:-1] if k in mean)
                    print(f"Epoch {epoch:03d} Step {step + 1:06d} [{i + 1}/{spe}] {phase}: loss = "
                          f"{mean['loss']:.4f} ({terms})  lr {lr:.3g}  {sps:.3f} sec/step  "
                          f"{ips:.1f} images/s", flush=True)
                    with writer.as_default(step=step + 1):
                        for k, v in mean.items():
                            if k != "applied":
                                tf.summary.scalar(_tag(k, phase), v)
                        tf.summary.scalar("learning_rate", lr)
                        tf.summary.scalar("perf/sec_per_step", sps)
                        tf.summary.scalar("perf/images_per_sec", ips)
                        if loss_scale is not None:
                            tf.summary.scalar("loss_scale", float(loss_scale.scale.numpy()))
                    window = []

            correct = loss_sum = 0.0
            for images, labels in val_ds:
                c, s = eval_step(images, labels)
                correct += float(c)
                loss_sum += float(s)
            val_acc = 100.0 * correct / max(1, n_val)
            train_acc = 100.0 * float(np.mean(accs)) if (phase == "main" and accs) else 1.0
            step_now = (epoch + 1) * spe
            print(f"Epoch {epoch:03d} Step {step_now:06d} - train_Accuracy : {train_acc:.2f}%  "
                  f"val_Accuracy : {val_acc:.2f}%", flush=True)
            with writer.as_default(step=epoch):
                tf.summary.scalar("accuracy/train", train_acc)
                tf.summary.scalar("accuracy/validation", val_acc)
                tf.summary.scalar("loss/validation", loss_sum / max(1, n_val))
            writer.flush()
            logs[epoch] = (train_acc, val_acc)
            logs_var.assign(logs)
            epoch_var.assign(epoch + 1)
            manager.save(checkpoint_number=epoch + 1)
            epochs_run += 1
            if frames is not None and vis_due(cfg, epoch, total_epoch):
                frames(writer, epoch)
            if epoch_hook is not None:
                epoch_hook("epoch_end", epoch, state)
            if cfg.stop_after and epochs_run >= cfg.stop_after and epoch + 1 < total_epoch:
                print(f"Stopped after {epochs_run} epoch(s) (--stop_after); continue with --resume "
                      f"(checkpoint {manager.latest_checkpoint})", flush=True)
                return {"stopped": True, "train_dir": train_dir, "checkpoint": manager.latest_checkpoint,
                        "epochs_done": epoch + 1, "logs": {"training_acc": logs[:epoch + 1, 0].copy(),
                                                           "validation_acc": logs[:epoch + 1, 1].copy()}}
    finally:
        writer.close()

    params_path = os.path.join(train_dir, "train_params.mat")
    log_path = os.path.join(train_dir, "log.mat")
    save_mat(params_path, collect_params(network.tf1_variables(), scope=cfg.main_scope))
    done = int(epoch_var.numpy())
    log = {"training_acc": logs[:done, 0].astype(np.float64),
           "validation_acc": logs[:done, 1].astype(np.float64)}
    save_mat(log_path, log)
    print("Finished training!", flush=True)
    print(f"TensorBoard logs: {train_dir} (tensorboard --logdir {train_dir})", flush=True)
    print(f"Parameters: {params_path}", flush=True)
    print(f"Accuracy log: {log_path}", flush=True)
    print(f"Checkpoints: {ckpt_dir}", flush=True)
    if cfg.vis_every > 0 and cfg.vis_snapshots:
        print(f"Frames: {os.path.join(train_dir, 'vis')} (GIFs: python -m iepkt_tf.visualize --run_dir "
              f"{train_dir} --out_dir OUT --dataset {cfg.dataset} --split test --num_images "
              f"{cfg.vis_images} --seed {cfg.seed} --size {VIS_PANEL['size']} --thumb {VIS_PANEL['thumb']}"
              + (f" --data_dir {cfg.data_dir}" if cfg.data_dir else "")
              + (f" --image_size {cfg.synthetic_image_size}" if cfg.synthetic_image_size else "")
              + (f" --teacher_params {cfg.teacher_params} --mpnn_iter {cfg.mpnn_iter} --adapter {cfg.adapter}"
                 if iep else "")
              + ")", flush=True)
    return {"stopped": False, "train_dir": train_dir, "train_params": params_path, "log": log_path,
            "checkpoint": manager.latest_checkpoint, "epochs_done": done, "logs": log}


def main(argv):
    if len(argv) > 1:
        print(f"train_w_distill.py: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    if not FLAGS["verbosity"].present:  # absl's INFO lines (one per checkpoint) only on request
        logging.set_verbosity(logging.WARNING)
    from dataloader.datasets import DatasetNotFoundError
    from iepkt_tf.mat_io import MatFileError, ParamsMismatchError

    try:
        run(config_from_flags())
    except (ConfigError, ParamsMismatchError, MatFileError) as e:
        print(f"train_w_distill.py: error: {e}", file=sys.stderr)
        return 2
    except (DatasetNotFoundError, FileNotFoundError) as e:
        print(f"train_w_distill.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"train_w_distill.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    app.run(main)
