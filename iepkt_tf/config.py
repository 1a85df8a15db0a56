"""The settings of a training run: the flags of ``train_w_distill.py`` (general ones here, each
method's own in its ``iepkt_tf/distillers`` module), their validation and the resume check.

``define_flags`` puts every flag on absl's FLAGS for the script; ``make_config(**overrides)`` gives
the same settings in-process; ``resolve_config`` validates them (a one-line ``ConfigError`` naming
the flag) and fills the derived ones (architectures, ``init_epoch``, precision, jit).
"""
from __future__ import annotations

import json
import math
import os
import types

from absl import flags

from dataloader.datasets import DATASETS
from iepkt_tf.atomic import atomic_open
from iepkt_tf.distillers import METHODS
from op_util.distribute import BATCH_GRAPHS, KINDS as DISTRIBUTE_KINDS

MODEL_NAMES = ("WResNet", "ResNet")
SCOPES = ("Student", "Teacher")

# (kind, name, default, help[, enum values]) of every general flag, in --helpfull order.
FLAG_SPECS = (
    ("string", "train_dir", "IEP/CIFAR100/WResNet/IEP/",
     "Directory where checkpoints (ckpt/), TensorBoard event logs, train_params.mat and log.mat "
     "are written."),
    ("enum", "Distillation", "IEP",
     "Distillation method (iepkt_tf/distillers/): 'None' trains --main_scope's network on "
     "cross-entropy; every other method trains the student with knowledge of the teacher in "
     "--teacher_params: " + ", ".join(m for m in METHODS if m != "None") + ". A method's own "
     "flags are prefixed with its name in their help.", tuple(METHODS)),
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
     "authors' train_params.mat). Required with every --Distillation but None."),
    ("string", "data_dir", None, "Directory holding the dataset files (not used by synthetic)."),
    ("float", "sample_rate", 1.0,
     "Fraction of the training set used, class-balanced (the paper's 1.0/0.5/0.25/0.1); the test "
     "set is never subsampled."),
    ("integer", "train_epoch", 100, "Epochs of the main phase (student training)."),
    ("integer", "init_epoch", None,
     "Epochs of the initial phase of a method that has one (it trains the distillation module, "
     "or with AB the student on the boundary loss); default: the method's (IEP 20), 0 otherwise."),
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
    ("boolean", "resume_new_lr", False,
     "With --resume: continue with the --learning_rate given although the run was started with "
     "another (the schedule's later epochs scale with it); run_config.json records the change and "
     "the epoch and step it took effect. Without it a changed learning rate is refused."),
    ("integer", "stop_after", 0,
     "Stop (as if interrupted) after this many epochs of this invocation, keeping the checkpoint; "
     "continue later with --resume. 0 = run to the end."),
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
    ("integer", "val_every", 1,
     "Validate after every N-th epoch of the main phase and always after the last epoch (1 = "
     "after every epoch, the initial phase's included). With N > 1 the initial phase is not "
     "validated (the student is not trained for classification then) and log.mat's "
     "validation_acc holds NaN for the epochs not validated (one entry per epoch either way)."),
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
    ("enum", "distribute", "none",
     "Data parallelism (op_util/distribute.py): none = one device; mirrored = MirroredStrategy over "
     "the local GPUs (or --replicas logical CPU devices where there is none); multi_worker = "
     "MultiWorkerMirroredStrategy configured by TF_CONFIG (README). --batch_size is the global "
     "batch.", DISTRIBUTE_KINDS),
    ("integer", "replicas", 0,
     "--distribute mirrored: how many local GPUs (0 = all), or logical CPU devices without a GPU "
     "(0 = 2)."),
    ("boolean", "sync_bn", False,
     "--distribute: the student's batch norms use the moments of the global batch (synchronised "
     "across replicas), so a step equals the one-device step on the same global batch."),
    ("enum", "batch_graph", "global",
     "--distribute: global = every loss sees the all-gathered global batch (IEP's B x B graphs, "
     "MPNN, attention heads and PCA update as on one device); replica = each replica's losses see "
     "its own B/R images, gradients averaged (cheaper; another method for batch-level knowledge).",
     BATCH_GRAPHS),
    ("integer", "synthetic_classes", None,
     "Generated datasets: number of classes (default synthetic 10, synthetic_parts 40)."),
    ("integer", "synthetic_train_per_class", None,
     "Generated datasets: training images per class (default synthetic 200, synthetic_parts 125)."),
    ("integer", "synthetic_test_per_class", None,
     "Generated datasets: test images per class (default synthetic 50, synthetic_parts 50)."),
    ("integer", "synthetic_image_size", None, "Generated datasets: image height and width (default 32)."),
    ("integer", "synthetic_layouts", None,
     "synthetic_parts: classes per part set, told apart by the parts' arrangement alone (default "
     "2; more = a harder task on which depth matters more)."),
)


def _method_specs():
    """The methods' own flags as specs, each once, with the method(s) declaring it."""
    specs, owners = {}, {}
    for mname, method in METHODS.items():
        for f in method.flags:
            spec = (f.kind, f.name, f.default, f.help) + ((tuple(f.enum),) if f.kind == "enum" else ())
            if f.name in specs and specs[f.name] != spec:
                raise RuntimeError(f"flag --{f.name} is declared differently by {owners[f.name]} and {mname}")
            specs[f.name] = spec
            owners.setdefault(f.name, []).append(mname)
    return tuple(specs.values()), {k: tuple(v) for k, v in owners.items()}


METHOD_FLAG_SPECS, FLAG_OWNERS = _method_specs()
ALL_SPECS = FLAG_SPECS + METHOD_FLAG_SPECS
FLAG_NAMES = tuple(spec[1] for spec in ALL_SPECS)
FLAG_DEFAULTS = {spec[1]: spec[2] for spec in ALL_SPECS}
ENUMS = {spec[1]: tuple(spec[4]) for spec in ALL_SPECS if spec[0] == "enum"}

# Settings that must not change when a run is resumed: everything that defines the run's state,
# data or result (the schedule follows from learning_rate, init_epoch and train_epoch; every
# method flag). Not in the list: where and how it is stored or reported (train_dir, data_dir,
# log/val/vis/keep settings) and the device settings (precision, jit, deterministic, distribute,
# replicas, sync_bn, batch_graph), which a run may change when it moves to another machine (a
# mirrored --sync_bn run continues on one device, tests/test_distribute.py).
RESUME_KEYS = (("Distillation", "dataset", "main_scope", "student_arch", "teacher_arch",
                "sample_rate", "batch_size", "seed", "init_epoch", "train_epoch",
                "learning_rate", "weight_decay",
                "synthetic_classes", "synthetic_train_per_class", "synthetic_test_per_class",
                "synthetic_image_size", "synthetic_layouts")
               + tuple(spec[1] for spec in METHOD_FLAG_SPECS))


class ConfigError(ValueError):
    """A flag value is invalid or inconsistent (the message names the flag and what was expected)."""


def define_specs(specs, flag_values):
    """Define absl flags from ``(kind, name, default, help[, enum])`` specs on ``flag_values``."""
    for kind, name, default, help_text, *enum in specs:
        definer = getattr(flags, "DEFINE_" + kind)
        if kind == "enum":
            definer(name, default, list(enum[0]), help_text, flag_values=flag_values)
        else:
            definer(name, default, help_text, flag_values=flag_values)
    return flag_values


def define_flags(flag_values=None):
    """Define the script's flags on ``flag_values`` (absl's global FLAGS by default). Importing
    this module defines nothing, so it never clashes with other tools' flags."""
    return define_specs(ALL_SPECS, flags.FLAGS if flag_values is None else flag_values)


def make_config(**overrides):
    """The flag defaults as a namespace, with ``overrides`` (for calling ``run`` in-process)."""
    unknown = sorted(set(overrides) - set(FLAG_NAMES))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {', '.join(FLAG_NAMES)}")
    values = dict(FLAG_DEFAULTS)
    values.update(overrides)
    cfg = types.SimpleNamespace(**values)
    cfg.given = tuple(sorted(overrides))
    return cfg


def config_from_flags(flag_values=None):
    fv = flags.FLAGS if flag_values is None else flag_values
    cfg = types.SimpleNamespace(**{name: getattr(fv, name) for name in FLAG_NAMES})
    cfg.given = tuple(name for name in FLAG_NAMES if fv[name].present)
    return cfg


def method_options(cfg):
    """``{flag: value}`` of the chosen method's own flags, plus ``init_epoch``."""
    method = METHODS[cfg.Distillation]
    options = {f.name: getattr(cfg, f.name) for f in method.flags}
    options["init_epoch"] = cfg.init_epoch
    return options


def _check_method_flags(cfg, method):
    """A flag of another method is an error; each of this method's flags passes its check."""
    for name in getattr(cfg, "given", ()):
        owners = FLAG_OWNERS.get(name)
        if owners and method.name not in owners:
            raise ConfigError(f"--{name} is a flag of --Distillation {'/'.join(owners)}, not of "
                              f"{method.name}")
    for f in method.flags:
        value = getattr(cfg, f.name)
        problem = f.check(value) if f.check is not None else None
        if problem:
            raise ConfigError(f"--{f.name} {problem}, got {value!r}")
    problem = method.check_options({f.name: getattr(cfg, f.name) for f in method.flags})
    if problem:
        raise ConfigError(problem)


def _choice(cfg, name, valid):
    value = getattr(cfg, name)
    if value not in valid:
        raise ConfigError(f"--{name}: unknown value {value!r}; valid values: {', '.join(valid)}")
    return value


def _at_least(cfg, name, low, high=None):
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"--{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"--{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


# Upper bounds of values that parse but cannot run (found by trying: numpy's legacy seeding stops at
# 2**32 - 1, the per-epoch log is one tensor of init_epoch + train_epoch rows, the generators draw
# every image in memory and the part-set deck has 34,220 sets per layout).
MAX_SEED = 2 ** 32 - 1
MAX_EPOCHS = 100_000
MAX_IMAGE_SIZE = 1024
MAX_SYNTHETIC_BYTES = 16 * 2 ** 30


def _check_synthetic(cfg):
    """The generated datasets' flags: each in range, and the images they draw fit in memory."""
    low = {"synthetic_classes": 2, "synthetic_image_size": 8}
    for name in ("synthetic_classes", "synthetic_train_per_class", "synthetic_test_per_class",
                 "synthetic_image_size"):
        if getattr(cfg, name) is not None:
            _at_least(cfg, name, low.get(name, 1), MAX_IMAGE_SIZE if "size" in name else None)
    if cfg.synthetic_layouts is not None:
        if cfg.dataset != "synthetic_parts":
            raise ConfigError(f"--synthetic_layouts applies only to --dataset synthetic_parts, "
                              f"got --dataset {cfg.dataset}")
        _at_least(cfg, "synthetic_layouts", 1)
    if not cfg.dataset.startswith("synthetic"):
        return
    from dataloader.synthetic_parts import max_classes

    parts = cfg.dataset == "synthetic_parts"
    classes = cfg.synthetic_classes or (40 if parts else 10)
    if parts and classes > max_classes(cfg.synthetic_layouts or 2):
        raise ConfigError(f"--synthetic_classes {classes}: synthetic_parts has at most "
                          f"{max_classes(cfg.synthetic_layouts or 2)} classes with "
                          f"--synthetic_layouts {cfg.synthetic_layouts or 2}")
    per_class = ((cfg.synthetic_train_per_class or (125 if parts else 200))
                 + (cfg.synthetic_test_per_class or 50))
    size = cfg.synthetic_image_size or 32
    gib = classes * per_class * size * size * 3 * 4 / 2 ** 30  # float32 while drawn
    if gib > MAX_SYNTHETIC_BYTES / 2 ** 30:
        raise ConfigError(f"--synthetic_classes x images per class x --synthetic_image_size^2 "
                          f"would draw {gib:.0f} GiB of images; at most "
                          f"{MAX_SYNTHETIC_BYTES // 2 ** 30} GiB")


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
    method = METHODS[cfg.Distillation]
    _check_method_flags(cfg, method)
    distill = method.needs_teacher
    if cfg.init_epoch is None:
        cfg.init_epoch = method.default_init_epoch
    _at_least(cfg, "init_epoch", 0, MAX_EPOCHS)
    _at_least(cfg, "train_epoch", 0, MAX_EPOCHS)
    if cfg.init_epoch + cfg.train_epoch < 1:
        raise ConfigError("--init_epoch + --train_epoch must be >= 1")
    _at_least(cfg, "batch_size", 2 if distill else 1)
    _at_least(cfg, "val_batch_size", 1)
    _at_least(cfg, "seed", 0, MAX_SEED)
    _at_least(cfg, "stop_after", 0)
    _at_least(cfg, "log_every", 1)
    _at_least(cfg, "val_every", 1)
    _at_least(cfg, "keep_checkpoints", 1)
    _at_least(cfg, "vis_every", 0)
    _at_least(cfg, "vis_images", 3)
    _at_least(cfg, "replicas", 0)
    if cfg.distribute == "none":
        given = [n for n in ("replicas", "sync_bn", "batch_graph") if n in getattr(cfg, "given", ())]
        if given:
            raise ConfigError(f"--{given[0]} needs --distribute mirrored or multi_worker")
    _check_synthetic(cfg)
    if not (isinstance(cfg.learning_rate, (int, float)) and cfg.learning_rate > 0
            and math.isfinite(cfg.learning_rate)):
        raise ConfigError(f"--learning_rate must be a positive number, got {cfg.learning_rate!r}")
    if cfg.resume_new_lr and not cfg.resume:
        raise ConfigError("--resume_new_lr applies only with --resume (it continues a run with a "
                          "changed --learning_rate)")
    if not (isinstance(cfg.weight_decay, (int, float)) and cfg.weight_decay >= 0):
        raise ConfigError(f"--weight_decay must be >= 0, got {cfg.weight_decay!r}")
    if cfg.init_epoch and not method.default_init_epoch:
        with_init = ", ".join(n for n, m in METHODS.items() if m.default_init_epoch)
        raise ConfigError(f"--init_epoch > 0: --Distillation {cfg.Distillation} has no initial phase "
                          f"(methods with one: {with_init})")

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

    gpu = bool(tf.config.list_physical_devices("GPU"))
    if cfg.precision == "auto":
        cfg.precision = default_precision(gpu)
    cfg.jit_plain = cfg.jit == "true" or (cfg.jit == "auto" and default_jit(gpu))
    cfg.jit_iep = cfg.jit == "true" or (cfg.jit == "auto" and default_jit(gpu, decompositions=True))
    cfg.main_arch = cfg.student_arch if cfg.main_scope == "Student" else cfg.teacher_arch
    return cfg


def validation_due(epoch, init_epoch, train_epoch, val_every):
    """Whether epoch ``epoch`` (0-based, initial phase first) ends with a validation under
    ``--val_every``: every epoch when it is 1; else the main-phase epochs ``init_epoch + k*N - 1``
    and always the last epoch (never an initial-phase epoch, unless it is the last). The
    experiment runner keeps a TensorFlow-free copy (``iepkt_tf.experiments.validated``, tested
    equal) to read finished logs."""
    last = epoch + 1 == init_epoch + train_epoch
    if val_every <= 1 or last:
        return True
    return epoch >= init_epoch and (epoch - init_epoch + 1) % val_every == 0


def read_run_config(path):
    """The settings saved in a run's ``run_config.json`` (a ConfigError if it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"--resume: {path} is not a readable run config (expected the JSON this "
                          f"script writes): {e}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} holds {type(saved).__name__}, expected a JSON object of settings")
    return saved


def check_resume_config(cfg, path):
    """The saved settings at ``path`` ({} if none); a ConfigError when ``cfg`` differs from them
    in a RESUME_KEYS setting (the learning rate may differ with ``--resume_new_lr``)."""
    current = {k: getattr(cfg, k) for k in RESUME_KEYS}
    if not os.path.isfile(path):
        return {}
    saved = read_run_config(path)
    allowed = ("learning_rate",) if cfg.resume_new_lr else ()
    diff = [f"--{k} {saved.get(k)!r} -> {current[k]!r}" for k in RESUME_KEYS
            if k in saved and saved[k] != current[k] and k not in allowed]
    if diff:
        hint = (" (a new learning rate needs --resume_new_lr)"
                if any(d.startswith("--learning_rate ") for d in diff) else "")
        raise ConfigError(f"--resume: settings differ from the run in {os.path.dirname(path)}: "
                          + "; ".join(diff) + hint)
    return saved


def learning_rate_change(saved, cfg, epoch, step):
    """The ``changes`` entry of run_config.json for a learning rate changed on resume (or None)."""
    if "learning_rate" not in saved or saved["learning_rate"] == cfg.learning_rate:
        return None
    return {"setting": "learning_rate", "from": saved["learning_rate"], "to": cfg.learning_rate,
            "epoch": int(epoch), "step": int(step)}


def write_run_config(path, cfg, changes=()):
    """run_config.json: every setting, and the ``changes`` made on resume (``--resume_new_lr``)."""
    settings = {k: getattr(cfg, k) for k in FLAG_NAMES + ("main_arch",)}
    if changes:
        settings["changes"] = list(changes)
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1, sort_keys=True)


# Settings shown in TensorBoard's HParams dashboard: all but where/how the run is stored and reported.
HPARAMS_EXCLUDE = ("train_dir", "data_dir", "resume", "resume_new_lr", "stop_after", "log_every",
                   "val_every", "keep_checkpoints", "vis_every", "vis_images", "vis_snapshots", "replicas")
# The scalar tags (all written by the loop below) the dashboard lists next to them.
HPARAMS_METRICS = ("accuracy/validation", "accuracy/train", "loss/validation", "loss/total")
def run_hparams(cfg):
    """The resolved settings logged once per run to the HParams dashboard."""
    return {k: getattr(cfg, k) for k in FLAG_NAMES + ("main_arch",) if k not in HPARAMS_EXCLUDE}
