r"""Resumable experiment grids: the teacher once, then variants x sample rates x seeds.

    python -m iepkt_tf.experiments --preset tiny --out_dir runs/tiny
    python -m iepkt_tf.experiments --preset paper --out_dir runs/paper --data_dir data/cifar
    python -m iepkt_tf.experiments --summarize_only --out_dir runs/paper

Every run is an ordinary ``train_w_distill.py`` run (a subprocess in the repository root) in its own
folder: ``OUT/teacher`` (``--Distillation=None --main_scope=Teacher``) and
``OUT/<variant>/r<rate>_s<seed>``, run seed by seed (seed 0 of every rate and variant first, so an
interrupted grid already has complete rows). A variant whose ``--Distillation`` is not None gets
``--teacher_params=OUT/teacher/train_params.mat``. The flags of a run are, in this order (the last
value of a flag wins): the preset's ``common`` flags, the teacher's or the variant's flags,
``--data_dir``, ``--extra``, then ``--train_dir``, ``--sample_rate``, ``--seed`` (and
``--teacher_params``, ``--resume``) set by the runner.

Resuming: a run is finished when its folder holds ``log.mat`` with one ``validation_acc`` entry per
epoch (``init_epoch + train_epoch`` of its ``run_config.json``; NaN for the epochs its
``--val_every`` does not validate, a number for the others) and ``train_params.mat``; finished
runs are skipped, a run folder with ``ckpt/`` is continued with ``--resume``. So rerunning the same
command after a crash or a kill (or ``--max_runs``) completes the grid. A folder is skipped or
resumed only if the command recorded in its ``console.log`` computes the same thing as this grid's
(the flags that only place or report a run, ``NOT_RESULT_FLAGS``, aside): otherwise one line says
so and nothing runs, and ``--force`` retrains such runs after renaming each folder
``<folder>.replaced-<n>``. ``--extra`` is parsed with the training script's own flag definitions
before any run. A run gets SIGTERM when its runner dies (even by SIGKILL: Linux's parent-death
signal), so it stops with a checkpoint instead of training on unowned; the time of an invocation
that was killed is recovered from its ``console.log`` by the next one. A run that fails (or exits
without finishing) is reported in one line with its log; the other runs go on and the exit status is
1 at the end. Bad flags, an unwritable ``--out_dir`` and damaged files in it (``grid.json``,
``results.csv``, a run's ``run_config.json``, ``log.mat``, ``train_params.mat`` header,
``run_time.json``): one line ``experiments: error: ...`` naming the file, exit status 2, and
nothing is run or rewritten (fix or remove the file).

Presets (``PRESETS``; a plain dict each: ``common``, ``teacher``, ``variants`` (a mapping, for
cpu_table1 one read from the method registry), ``rates``, ``seeds``, ``description`` and
optionally ``family``, ``rate_flags``, ``paper`` / ``paper_note`` and ``budget``):

* ``tiny``: a synthetic 4-class task with WRN-10-1 networks, a few seconds per run (tests, smoke).
* ``paper``: CIFAR-100, WRN-40-4 teacher -> WRN-16-4 student with the authors' recipe; rates
  1/0.5/0.25/0.1, seeds 0-2, the paper's Table 1 beside ours.
* ``cpu``: the generated part-constellation task (``--dataset=synthetic_parts``), WRN-16-2 teacher
  -> WRN-10-1 student, all nine methods at rates 0.1 and 1.0, seeds 0-2 (54 runs, 3.2 h of
  run wall time on 2 cores shared with other jobs, README). ``cpu_ablation``: IEP ablations at rate 0.1 (an equal-width WRN-10-2 student, each loss
  alone, summed clipping, the signed adapter, mixed_bfloat16). Both are of the family ``cpu``:
  run them into one ``--out_dir`` and the ablation reuses the main grid's runs (presets of one
  family share their ``common`` and ``teacher`` flags; ``rate_flags`` adds flags per rate).
* ``cpu_table1``: the paper's Table 1 in its own shape on a CPU (its own family): the generated task
  at CIFAR-100's size (100 classes, 50,000 / 10,000 24x24 images), a WRN-28-1 teacher -> WRN-10-1
  student (same width), batch 128, 100 epochs at every rate, every method of the registry with its
  own initial phase, ``--precision=auto``, ``--val_every=10``; rates 0.1 and 0.25, seeds 0-2 (55
  runs). docs/table1_budget.md: how the pair and the image size were chosen.

``--dry_run`` prints the commands, then per variant its method, networks and widths, epochs and
initial phase, and the steps per epoch; for a preset with a ``budget`` (cpu_table1) also the
estimated time per run, per rate column, of the teacher and of the grid, from the benchmark JSONs
the budget names (measured beforehand with ``python -m iepkt_tf.benchmark``, not at dry-run time),
as measured and scaled to a quiet machine by the budget's load factor.

Outputs, rewritten atomically in ``OUT`` after every finished run (``summarize(out_dir)`` or
``--summarize_only`` rebuilds them from the run folders):

* ``results.csv``: ``variant,rate,seed,final_acc,best_acc,epochs,wall_s,train_dir`` per finished run
  (the teacher as variant ``teacher``; ``train_dir`` relative to ``OUT``; accuracies are the
  validation top-1 % of ``log.mat``, the last epoch and the best validated epoch).
* ``results.md``: the command(s), the teacher's accuracy, per variant and rate
  ``mean ± sd (value per seed)`` of the final accuracy (sample sd), the gain over ``None`` and,
  where the preset has them, the paper's figures beside ours.
* ``results.png``: accuracy vs sample rate per variant (mean, ±sd and the seeds), teacher dashed.

Per run folder: ``console.log`` (the run's stdout and stderr, appended as it goes, one header line
per invocation) and ``run_time.json`` (wall time summed over invocations). ``OUT/grid.json`` keeps
the preset, the commands and the planned runs for the summaries.
"""
from __future__ import annotations

import collections.abc
import csv
import ctypes
import ctypes.util
import glob
import io
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import flags

from iepkt_tf.atomic import atomic_open, check_writable
from iepkt_tf.cli import tool_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = "train_w_distill.py"
TEACHER = "teacher"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
RUN_RE = re.compile(r"^r(?P<rate>[0-9.e+-]+)_s(?P<seed>[0-9]+)$")
# Flags the runner sets itself (not allowed in --extra).
RESERVED = {"train_dir": "use --out_dir", "sample_rate": "use --rates", "seed": "use --seeds",
            "teacher_params": "it is OUT/teacher/train_params.mat",
            "resume": "unfinished runs are resumed automatically",
            "resume_new_lr": "the runner resumes a run with its own settings",
            "Distillation": "each variant of the preset sets it"}
CSV_FIELDS = ("variant", "rate", "seed", "final_acc", "best_acc", "epochs", "wall_s", "train_dir")

TINY_COMMON = ["--dataset=synthetic", "--synthetic_classes=4", "--synthetic_train_per_class=32",
               "--synthetic_test_per_class=16", "--synthetic_image_size=16", "--batch_size=8",
               "--val_batch_size=64", "--train_epoch=1", "--teacher_arch=WResNet-10-1",
               "--student_arch=WResNet-10-1", "--precision=float32", "--vis_every=0",
               "--log_every=1000"]

CPU_COMMON = ["--dataset=synthetic_parts", "--precision=float32", "--batch_size=64",
              "--val_batch_size=200", "--teacher_arch=WResNet-16-2", "--student_arch=WResNet-10-1",
              "--vis_every=0", "--log_every=100000"]
CPU_RATE_FLAGS = {0.1: ["--train_epoch=40"], 1.0: ["--train_epoch=10"]}
CPU_IEP = ["--Distillation=IEP", "--init_epoch=5"]
# Every method of iepkt_tf.distillers, in the paper's Table 1 order; an initial phase (FT, AB, MHGD,
# IEP) gets 5 epochs on the CPU (the authors: 30 / 30 / 40 / 20 before 100 main epochs).
CPU_METHODS = {"None": ["--Distillation=None"], "KD": ["--Distillation=KD"],
               "AT": ["--Distillation=AT"], "FT": ["--Distillation=FT", "--init_epoch=5"],
               "AB": ["--Distillation=AB", "--init_epoch=5"], "RKD": ["--Distillation=RKD"],
               "MHGD": ["--Distillation=MHGD", "--init_epoch=5"], "CO": ["--Distillation=CO"],
               "IEP": CPU_IEP}
# The paper's Table 1 (CIFAR-100 top-1 %, WRN-40-4 -> WRN-16-4) by sample rate.
PAPER_TABLE = {"None": (76.09, 69.77, 59.28, 40.65), "AT": (76.98, 71.13, 63.07, 47.66),
               "FT": (77.14, 72.41, 63.70, 48.29), "AB": (77.29, 72.28, 66.79, 57.38),
               "RKD": (77.02, 69.57, 53.57, 23.27), "MHGD": (77.45, 73.32, 67.27, 54.58),
               "CO": (78.21, 74.33, 67.90, 40.80), "IEP": (78.37, 74.53, 69.02, 59.04)}
PAPER_RATES = (1.0, 0.5, 0.25, 0.1)


class MethodVariants(collections.abc.Mapping):
    """``{method: ["--Distillation=<method>"] + extra}`` for every method of
    ``iepkt_tf.distillers.METHODS``, in the registry's (Table 1) order, so that a new method joins
    the preset by its registry line alone. Read on first use: the registry imports TensorFlow,
    which the runner does not need for the other presets."""

    def __init__(self, extra=()):
        self._extra, self._variants = list(extra), None

    def _data(self):
        if self._variants is None:
            self._variants = {m: [f"--Distillation={m}"] + self._extra for m in method_init_epochs()}
        return self._variants

    def __getitem__(self, name):
        return self._data()[name]

    def __iter__(self):
        return iter(self._data())

    def __len__(self):
        return len(self._data())


_METHOD_INIT_EPOCHS = None


def method_init_epochs():
    """``{method: default_init_epoch}`` of ``iepkt_tf.distillers.METHODS`` (registry order; the
    registry is imported, with TensorFlow, quietly on first use)."""
    global _METHOD_INIT_EPOCHS
    if _METHOD_INIT_EPOCHS is None:
        from iepkt_tf.quiet import import_tensorflow

        import_tensorflow([])
        from iepkt_tf.distillers import METHODS

        _METHOD_INIT_EPOCHS = {name: int(cls.default_init_epoch) for name, cls in METHODS.items()}
    return dict(_METHOD_INIT_EPOCHS)


# The paper's Table 1 in its own shape on a 2-core CPU (docs/table1_budget.md): CIFAR-100's size
# (100 classes, 500 / 100 images per class), a teacher 2.8x deeper than the student at the same
# width (28 -> 10 layers; the paper: WRN-40-4 -> WRN-16-4, 2.5x), batch 128, 100 main epochs at
# every rate, each method's own initial phase. 24x24 images (the networks' 7x7/2 stem and no
# dropout, as for every input that is not 32 pixels high) and width 1 are what fit the budget;
# WRN-40-1 -> WRN-16-1 costs a third more and its teacher was no better than its student after a
# short schedule (docs/table1_budget.md).
TABLE1_COMMON = ["--dataset=synthetic_parts", "--synthetic_classes=100",
                 "--synthetic_train_per_class=500", "--synthetic_test_per_class=100",
                 "--synthetic_image_size=24", "--teacher_arch=WResNet-28-1",
                 "--student_arch=WResNet-10-1", "--batch_size=128", "--val_batch_size=200",
                 "--train_epoch=100", "--precision=auto", "--val_every=10", "--vis_every=0"]

PRESETS = {
    "tiny": {
        "description": "Smoke test: synthetic 4-class 16x16 task, WRN-10-1 teacher and student, "
                       "1 epoch (2 with IEP's initial phase).",
        "common": TINY_COMMON,
        "teacher": [],
        "variants": {"None": ["--Distillation=None"],
                     "IEP": ["--Distillation=IEP", "--init_epoch=1"]},
        "rates": [1.0, 0.5],
        "seeds": [0, 1],
    },
    "paper": {
        "description": "CIFAR-100, WRN-40-4 teacher -> WRN-16-4 student, the authors' recipe "
                       "(batch 128, 100 epochs, IEP initial phase 20 epochs); paper Table 1.",
        # Interpretability frames are off (not part of the recipe): --extra=--vis_every=5 for them.
        "common": ["--dataset=cifar100", "--model_name=WResNet", "--teacher_arch=WResNet-40-4",
                   "--student_arch=WResNet-16-4", "--batch_size=128", "--train_epoch=100",
                   "--vis_every=0"],
        "teacher": [],
        # Every method with its own defaults (initial phases: FT 30, AB 30, MHGD 40, IEP 20 epochs).
        "variants": {m: [f"--Distillation={m}"] for m in PAPER_TABLE},
        "rates": list(PAPER_RATES),
        "seeds": [0, 1, 2],
        # CIFAR-100 top-1 % of the paper's Table 1 (the IEP row is 'IEP + black-box').
        "paper": {m: dict(zip(PAPER_RATES, row)) for m, row in PAPER_TABLE.items()},
        "paper_note": "Our IEP includes the black-box term K_BB, so it is compared with the "
                      "paper's 'IEP + black-box' row; the paper's IEP without it: 78.12 / 74.22 / "
                      "68.57 / 55.89 at rates 1 / 0.5 / 0.25 / 0.1.",
    },
    # ------------------------------------------------------------------------------------------
    # CPU presets on the generated part-constellation task (dataloader/synthetic_parts.py). They
    # share the family "cpu": run both with one --out_dir and the ablation reuses the None / IEP
    # runs of the main grid. Epochs per rate (40 at rate 0.1, 10 at 1.0) keep every run within a
    # CPU budget; the authors train 100 epochs at every rate.
    "cpu": {
        "family": "cpu",
        "description": "synthetic_parts (40 classes, 5,000 / 2,000 images), WRN-16-2 teacher "
                       "(10 epochs) -> WRN-10-1 student (connectors/adapters where a method has "
                       "them), batch 64, float32; 40 epochs at rate 0.1, 10 at rate 1.0, +5 "
                       "initial-phase epochs for FT, AB, MHGD and IEP.",
        "common": CPU_COMMON,
        "teacher": ["--train_epoch=10"],
        "rate_flags": CPU_RATE_FLAGS,
        "variants": CPU_METHODS,
        "rates": [0.1, 1.0],
        "seeds": [0, 1, 2],
    },
    "cpu_ablation": {
        "family": "cpu",
        "description": "IEP ablations at rate 0.1 on the cpu preset's task and teacher: an "
                       "equal-width student, each loss alone, summed clipping, the signed "
                       "adapter, the CPU's default precision.",
        "common": CPU_COMMON,
        "teacher": ["--train_epoch=10"],
        "rate_flags": CPU_RATE_FLAGS,
        "variants": {"None": ["--Distillation=None"],
                     "IEP": CPU_IEP,
                     "None-WRN-10-2": ["--Distillation=None", "--student_arch=WResNet-10-2"],
                     "IEP-WRN-10-2": CPU_IEP + ["--student_arch=WResNet-10-2"],
                     "IEP-K_int": CPU_IEP + ["--k_alt=false", "--k_bb=false"],
                     "IEP-K_alt": CPU_IEP + ["--k_int=false", "--k_bb=false"],
                     "IEP-K_BB": CPU_IEP + ["--k_int=false", "--k_alt=false"],
                     "IEP-summed_clip": CPU_IEP + ["--dist_clip=summed"],
                     "IEP-adapter_bn": CPU_IEP + ["--adapter=bn"],
                     "None-bf16": ["--Distillation=None", "--precision=mixed_bfloat16"],
                     "IEP-bf16": CPU_IEP + ["--precision=mixed_bfloat16"]},
        "rates": [0.1],
        "seeds": [0, 1, 2],
    },
    # ------------------------------------------------------------------------------------------
    # Table 1's shape on the CPU (its own family: its task, networks and teacher are not cpu's).
    "cpu_table1": {
        "family": "cpu_table1",
        "description": "Table 1's shape on a CPU: synthetic_parts at CIFAR-100's size (100 "
                       "classes, 50,000 / 10,000 images, 24x24), WRN-28-1 teacher -> WRN-10-1 "
                       "student (same width), batch 128, 100 epochs at every rate, each method's "
                       "own initial phase (IEP 20, FT 30, AB 30, MHGD 40), --precision=auto, "
                       "validation every 10 epochs and at the last; rates 0.1 and 0.25.",
        "common": TABLE1_COMMON,
        "teacher": [],
        # Every method of iepkt_tf.distillers.METHODS with its own defaults (no --init_epoch).
        "variants": MethodVariants(),
        "rates": [0.1, 0.25],
        "seeds": [0, 1, 2],
        "paper": {m: dict(zip(PAPER_RATES, row)) for m, row in PAPER_TABLE.items()},
        "paper_note": "The paper's figures are CIFAR-100 with WRN-40-4 -> WRN-16-4; ours are the "
                      "generated task of CIFAR-100's size with WRN-28-1 -> WRN-10-1: compare the "
                      "ranking and the gains over None, not the numbers. Our IEP includes the "
                      "black-box term K_BB ('IEP + black-box' in the paper).",
        # The dry run's time estimate: the benchmark's step times of this pair (stored JSONs), the
        # per-run and per-epoch overheads of short train_w_distill.py runs, all measured while
        # other jobs loaded the CPU; and the load factor: the README's quiet benchmark of the cpu
        # pair against the same benchmark run among those measurements.
        "budget": {"bench_dir": "docs/bench/table1", "run_overhead_s": 60.0,
                   "epoch_overhead_s": 0.7,
                   "load_reference": ["docs/bench/table1/reference/IEP_cpu_pair_loaded.json",
                                      "docs/bench/replicas2_IEP.json"]},
    },
}


class UsageError(ValueError):
    """A bad flag value (the message names the flag and what was expected)."""


class InputError(ValueError):
    """A damaged file in --out_dir (grid.json, results.csv, a run's run_config.json, log.mat,
    train_params.mat or run_time.json): the message names it and what was expected. Nothing is
    run or rewritten over it; fix or remove the file."""


# --------------------------------------------------------------------------- flags and the grid

def define_flags(fv):
    """Define the runner's flags on ``fv`` (absl FlagValues)."""
    flags.DEFINE_string("preset", None, "Grid preset: " + ", ".join(PRESETS) + ".", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Folder of the grid (run folders and results.*).",
                        flag_values=fv)
    flags.DEFINE_list("variants", None, "Comma list of the preset's variants to run (default all).",
                      flag_values=fv)
    flags.DEFINE_list("rates", None, "Comma list of sample rates in (0, 1] (default the preset's).",
                      flag_values=fv)
    flags.DEFINE_list("seeds", None, "Comma list of seeds >= 0 (default the preset's).",
                      flag_values=fv)
    flags.DEFINE_string("data_dir", None, "--data_dir passed on to every run.", flag_values=fv)
    flags.DEFINE_multi_string("extra", [], "Extra train_w_distill.py flags for every run "
                              "(comma-separated or repeated), e.g. --extra=--vis_every=0.",
                              flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "Print the commands and exit.", flag_values=fv)
    flags.DEFINE_bool("force", False, "Retrain the runs whose folder was made by another command "
                      "(other --extra, --data_dir or preset flags): each such folder is first "
                      "renamed <folder>.replaced-<n>, never deleted.", flag_values=fv)
    flags.DEFINE_integer("max_runs", 0, "Stop after this many runs of this invocation (skipped "
                         "runs do not count); 0 = all.", lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("summarize_only", False, "Only rebuild results.csv/.md/.png of --out_dir.",
                      flag_values=fv)
    flags.mark_flag_as_required("out_dir", flag_values=fv)


def check_preset(preset):
    """ValueError if ``preset`` (a dict) is malformed."""
    for key in ("description", "common", "teacher", "variants", "rates", "seeds"):
        if key not in preset:
            raise ValueError(f"missing key {key!r}")
    lists = [preset["common"], preset["teacher"], *preset["variants"].values()]
    if any(not isinstance(f, str) or not f.startswith("--") for lst in lists for f in lst):
        raise ValueError("flags must be strings '--name=value'")
    if not preset["variants"]:
        raise ValueError("no variants")
    for name in preset["variants"]:
        if not NAME_RE.match(name) or name == TEACHER:
            raise ValueError(f"variant name {name!r} is not a valid folder name (or is 'teacher')")
    parse_rates([str(r) for r in preset["rates"]])
    parse_seeds([str(s) for s in preset["seeds"]])
    unknown = set(preset.get("paper", {})) - set(preset["variants"])
    if unknown:
        raise ValueError(f"paper figures for unknown variants {sorted(unknown)}")


def parse_rates(values):
    if not values:
        raise UsageError("--rates: expected a comma list of sample rates in (0, 1], got none")
    rates = []
    for v in values:
        try:
            r = float(v)
        except ValueError:
            r = float("nan")
        if not (0.0 < r <= 1.0):
            raise UsageError(f"--rates: expected sample rates in (0, 1], got {v!r}")
        if r not in rates:
            rates.append(r)
    return rates


def parse_seeds(values):
    if not values:
        raise UsageError("--seeds: expected a comma list of integer seeds >= 0, got none")
    seeds = []
    for v in values:
        if not re.fullmatch(r"[0-9]+", v.strip()):
            raise UsageError(f"--seeds: expected integer seeds >= 0, got {v!r}")
        if int(v) not in seeds:
            seeds.append(int(v))
    return seeds


def parse_extra(values):
    extra = [f.strip() for v in values for f in v.split(",") if f.strip()]
    for f in extra:
        if not f.startswith("--"):
            raise UsageError(f"--extra: expected train_w_distill.py flags like --name=value, "
                             f"got {f!r}")
        name = f[2:].split("=", 1)[0]
        key = name if name in RESERVED else name[2:] if name.startswith("no") else name
        if key in RESERVED:
            raise UsageError(f"--extra: --{name} is set by the runner ({RESERVED[key]})")
    return extra


def _flag_name(flag):
    return flag[2:].split("=", 1)[0]


def check_extra(extra):
    """Parse ``extra`` with train_w_distill.py's own flag definitions, so that a mistyped flag or a
    bad value is one line before any run (not a failure of every run). absl's own flags
    (``--verbosity``, ...) pass by name."""
    if not extra:
        return
    from iepkt_tf.quiet import import_tensorflow

    import_tensorflow([])  # the flag definitions import the methods, hence TensorFlow
    from iepkt_tf import config  # imported here: only a grid with --extra needs it

    fv = flags.FlagValues()
    config.define_flags(fv)

    def known(name):
        base = name[2:] if name.startswith("no") else None
        return name in fv or (base in fv and isinstance(fv[base], flags.BooleanFlag))
    own = [f for f in extra if known(_flag_name(f))]
    for f in extra:
        if f not in own and _flag_name(f) not in flags.FLAGS:
            suggestions = [n for n in fv if n.lower().startswith(_flag_name(f)[:4].lower())]
            raise UsageError(f"--extra: {f} is not a flag of {TRAIN_SCRIPT}"
                             + (f" (did you mean --{suggestions[0]}?)" if suggestions else "")
                             + f"; see python {TRAIN_SCRIPT} --helpfull")
    try:
        fv([TRAIN_SCRIPT] + own)
    except (flags.Error, ValueError) as e:  # absl: ValueError for "--noflag=value"
        raise UsageError(f"--extra: {' '.join(str(e).split())}") from None


def _preset(fv):
    if fv.preset is None:
        raise UsageError(f"--preset is required: one of {', '.join(PRESETS)}")
    if fv.preset not in PRESETS:
        raise UsageError(f"--preset: unknown preset {fv.preset!r}; expected one of "
                         f"{', '.join(PRESETS)}")
    preset = PRESETS[fv.preset]
    try:
        check_preset(preset)
    except ValueError as e:
        raise UsageError(f"--preset {fv.preset}: malformed preset: {e}") from None
    return preset


def _variants(fv, preset):
    if fv.variants is None:
        return list(preset["variants"])
    names = list(dict.fromkeys(v.strip() for v in fv.variants if v.strip()))
    bad = [v for v in names if v not in preset["variants"]]
    if bad or not names:
        raise UsageError(f"--variants: unknown variant(s) {', '.join(bad) or '(none given)'}; "
                         f"preset {fv.preset} has {', '.join(preset['variants'])}")
    return names


def grid_from_flags(fv):
    """The grid of this invocation as a plain dict (UsageError names the bad flag)."""
    out = os.path.abspath(fv.out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out_dir {fv.out_dir}: exists and is not a directory")
    try:
        check_writable(out, "--out_dir", directory=True)
    except OSError as e:
        raise UsageError(str(e)) from None
    if fv.data_dir and not os.path.isdir(fv.data_dir):
        raise UsageError(f"--data_dir {fv.data_dir}: no such directory")
    if fv.summarize_only:
        return {"summarize_only": True, "out_dir": out}
    preset = _preset(fv)
    grid = {"summarize_only": False, "out_dir": out, "name": fv.preset, "preset": preset,
            "variants": _variants(fv, preset),
            "rates": parse_rates(fv.rates) if fv.rates is not None else list(preset["rates"]),
            "seeds": parse_seeds(fv.seeds) if fv.seeds is not None else list(preset["seeds"]),
            "extra": parse_extra(fv.extra), "dry_run": fv.dry_run, "max_runs": fv.max_runs,
            "force": fv.force,
            "data_dir": os.path.abspath(fv.data_dir) if fv.data_dir else None,
            "command": _command(fv)}
    check_extra(grid["extra"])
    meta = read_meta(out)
    read_csv(os.path.join(out, "results.csv"))   # damaged: an error now, not after the runs
    family = preset.get("family", fv.preset)
    if meta.get("preset") is not None and meta.get("family", meta["preset"]) != family:
        raise UsageError(f"--out_dir {fv.out_dir} holds a grid of preset {meta['preset']!r}, not "
                         f"{fv.preset!r}; choose another --out_dir")
    return grid


def _command(fv):
    """This grid's command line (without --dry_run / --max_runs)."""
    parts = ["python -m iepkt_tf.experiments", f"--preset={fv.preset}", f"--out_dir={fv.out_dir}"]
    for name in ("variants", "rates", "seeds"):
        if fv[name].value is not None:
            parts.append(f"--{name}={','.join(fv[name].value)}")
    if fv.data_dir:
        parts.append(f"--data_dir={fv.data_dir}")
    parts += [f"--extra={e}" for e in fv.extra]
    return " ".join([parts[0]] + [shlex.quote(p) for p in parts[1:]])


# --------------------------------------------------------------------------- the runs

def flag_value(flag_list, name, default=None):
    """The last value of ``--name=value`` in ``flag_list`` (``default`` if absent)."""
    value = default
    for f in flag_list:
        if f.startswith(f"--{name}="):
            value = f.split("=", 1)[1]
    return value


def rate_name(rate):
    return f"{rate:g}"


def init_epochs_of(flag_list):
    """``--init_epoch`` of a run: the flag, else its method's default (``None``: 0; the others
    read from the method registry)."""
    given = flag_value(flag_list, "init_epoch")
    if given is not None:
        return int(given)
    method = flag_value(flag_list, "Distillation", "IEP")
    return 0 if method == "None" else method_init_epochs().get(method, 0)


def run_cost(flag_list, rate):
    """Relative cost of a run: sample rate x epochs (train_w_distill.py's defaults)."""
    epochs = int(flag_value(flag_list, "train_epoch", 100)) + init_epochs_of(flag_list)
    return rate * max(1, epochs)


def validated(epoch, init_epoch, train_epoch, val_every):
    """Whether ``--val_every`` validates epoch ``epoch``: the rule of
    ``iepkt_tf.config.validation_due`` (repeated here so that reading results needs no TensorFlow;
    tests/test_experiments.py checks that they agree)."""
    if val_every <= 1 or epoch + 1 == init_epoch + train_epoch:
        return True
    return epoch >= init_epoch and (epoch - init_epoch + 1) % val_every == 0


def plan_runs(grid):
    """The teacher run, then every seed x rate x variant run: dicts ``variant, rate, seed, dir,
    flags, cost, needs_teacher``."""
    out, preset = grid["out_dir"], grid["preset"]
    tail = ([f"--data_dir={grid['data_dir']}"] if grid["data_dir"] else []) + grid["extra"]
    teacher_dir = os.path.join(out, TEACHER)
    t_flags = (preset["common"] + ["--Distillation=None", "--main_scope=Teacher"]
               + preset["teacher"] + tail + [f"--train_dir={teacher_dir}"])
    t_rate = float(flag_value(t_flags, "sample_rate", 1.0))
    runs = [dict(variant=TEACHER, rate=t_rate, seed=int(flag_value(t_flags, "seed", 0)),
                 dir=teacher_dir, flags=t_flags, cost=run_cost(t_flags, t_rate),
                 needs_teacher=False)]
    for seed in grid["seeds"]:
        for rate in grid["rates"]:
            for variant in grid["variants"]:
                run_dir = os.path.join(out, variant, f"r{rate_name(rate)}_s{seed}")
                f = (preset["common"] + preset.get("rate_flags", {}).get(rate, [])
                     + preset["variants"][variant] + tail
                     + [f"--train_dir={run_dir}", f"--sample_rate={rate}", f"--seed={seed}"])
                distill = flag_value(f, "Distillation", "IEP") != "None"
                if distill:
                    f.append(f"--teacher_params={os.path.join(teacher_dir, 'train_params.mat')}")
                runs.append(dict(variant=variant, rate=rate, seed=seed, dir=run_dir, flags=f,
                                 cost=run_cost(f, rate), needs_teacher=distill))
    return runs


def read_json_object(path, expected):
    """The JSON object in ``path``; InputError naming it (and ``expected``) if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # Unicode/JSONDecodeError: ValueErrors
        raise InputError(f"{path}: not readable JSON ({' '.join(str(e).split())}); expected "
                         f"{expected}; fix or remove it") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected {expected}, got a JSON {type(obj).__name__}; fix or "
                         f"remove it")
    return obj


def _number(obj, key, path, kind=float, default=None):
    value = obj.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")
    if not ok or (kind is int and value != int(value)):
        raise InputError(f"{path}: {key!r} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}; fix or remove the file")
    return kind(value)


def _looks_like_mat(path):
    """A cheap check of a .mat's 128-byte header (a full read of train_params.mat is the training
    script's job when it loads a teacher)."""
    with open(path, "rb") as f:
        head = f.read(128)
    return len(head) == 128 and (head.startswith(b"MATLAB") or head[:4] == b"\x89HDF")


def read_result(run_dir):
    """``{final_acc, best_acc, epochs, wall_s, config}`` of a finished run, None for a run that is
    not finished (a file missing, fewer epochs logged); InputError if one of its files is damaged.

    ``log.mat``'s ``validation_acc`` has one entry per epoch; with ``--val_every N > 1`` (read from
    ``run_config.json``) the epochs it skips hold NaN, so ``final_acc`` is the last epoch's (always
    validated) and ``best_acc`` the best of the validated epochs."""
    from iepkt_tf.mat_io import MatFileError, load_mat

    paths = [os.path.join(run_dir, n) for n in ("run_config.json", "log.mat", "train_params.mat")]
    if not all(os.path.isfile(p) for p in paths):
        return None
    cfg = read_json_object(paths[0], "the run's flags, written by train_w_distill.py")
    init, train = _number(cfg, "init_epoch", paths[0], int), _number(cfg, "train_epoch", paths[0], int)
    epochs = init + train
    val_every = _number(cfg, "val_every", paths[0], int, 1)
    _number(cfg, "sample_rate", paths[0], float, 1.0)
    _number(cfg, "seed", paths[0], int, 0)
    try:
        log = load_mat(paths[1])
    except MatFileError as e:
        raise InputError(f"{e}; fix or remove it") from None
    acc = np.asarray(log.get("validation_acc", np.zeros(0, object)))
    if "validation_acc" not in log or acc.dtype.kind not in "iuf" or acc.size and acc.ndim > 2:
        raise InputError(f"{paths[1]}: expected a numeric 'validation_acc' vector (one entry per "
                         f"epoch), got {'none' if 'validation_acc' not in log else acc.dtype}; fix "
                         f"or remove it")
    acc = acc.ravel().astype(np.float64)
    # NaN marks an epoch that --val_every did not validate; anything else must be finite.
    if np.any(np.isinf(acc)) or (val_every <= 1 and not np.all(np.isfinite(acc))):
        raise InputError(f"{paths[1]}: 'validation_acc' holds non-finite values; fix or remove it")
    if len(acc) == 0 or len(acc) != epochs:
        return None
    missing = [e for e in range(epochs) if np.isnan(acc[e]) and validated(e, init, train, val_every)]
    if missing:
        raise InputError(f"{paths[1]}: 'validation_acc' holds non-finite values at epoch(s) "
                         f"{', '.join(map(str, missing[:5]))}, which --val_every {val_every} "
                         f"validates; fix or remove it")
    if not _looks_like_mat(paths[2]):
        raise InputError(f"{paths[2]}: not a MATLAB .mat file (expected the run's parameters, "
                         f"written by train_w_distill.py); remove it to rerun the run")
    # The last epoch is always validated; the best is over the validated epochs.
    return {"final_acc": float(acc[-1]), "best_acc": float(np.nanmax(acc)), "epochs": len(acc),
            "wall_s": read_wall_time(run_dir), "config": cfg}


def read_wall_time(run_dir):
    """The run's summed wall time (``run_time.json``), None without one; InputError if damaged."""
    path = os.path.join(run_dir, "run_time.json")
    if not os.path.lexists(path):
        return None
    obj = read_json_object(path, '{"wall_s": <seconds>, "invocations": <n>}')
    return _number(obj, "wall_s", path)


def _run_time(run_dir):
    """``run_time.json`` as a dict (a damaged one counts as absent: it was checked before the run)."""
    try:
        obj = read_json_object(os.path.join(run_dir, "run_time.json"), "{}")
        return {"wall_s": _number(obj, "wall_s", run_dir, float, 0.0),
                "invocations": _number(obj, "invocations", run_dir, int, 0),
                "running_since": obj.get("running_since")}
    except InputError:
        return {"wall_s": 0.0, "invocations": 0, "running_since": None}


def begin_invocation(run_dir):
    """Mark an invocation as running (``running_since``, wall clock). An invocation still marked
    was killed with its runner: its time is recovered as the span from its start to the last
    write of its ``console.log``, so the wall time of every invocation is kept."""
    t = _run_time(run_dir)
    since = t.pop("running_since")
    if isinstance(since, (int, float)):
        try:
            last = os.path.getmtime(os.path.join(run_dir, "console.log"))
        except OSError:
            last = since
        t["wall_s"] += max(0.0, last - since)
        t["invocations"] += 1
    write_json(os.path.join(run_dir, "run_time.json"), dict(t, running_since=time.time()))


def add_wall_time(run_dir, seconds):
    """End the running invocation: add ``seconds`` to the run's ``run_time.json`` (summed over
    invocations). Called after a run whatever happened."""
    t = _run_time(run_dir)
    t.pop("running_since")
    write_json(os.path.join(run_dir, "run_time.json"),
               {"wall_s": t["wall_s"] + seconds, "invocations": t["invocations"] + 1})


def _die_with_runner():
    """``preexec_fn`` of a run: the kernel sends it SIGTERM when the runner dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so a killed runner leaves no orphan training; SIGTERM makes the
    run stop after its step with a checkpoint, and the next invocation resumes it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the run outlives a killed runner
        return
    if os.getppid() == 1:  # the runner died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def write_json(path, obj):
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


# Flags that say where a run lives and how it is driven and reported, not what it computes
# (config.HPARAMS_EXCLUDE, tested equal, plus the teacher's path and absl's verbosity).
NOT_RESULT_FLAGS = ("train_dir", "data_dir", "resume", "resume_new_lr", "stop_after", "log_every",
                    "val_every", "keep_checkpoints", "vis_every", "vis_images", "vis_snapshots", "replicas",
                    "teacher_params", "verbosity")


def _what(flag_list):
    return [f for f in flag_list if _flag_name(f) not in NOT_RESULT_FLAGS]


def recorded_flags(run_dir):
    """The flags of the last invocation in the run's ``console.log`` header lines, None without."""
    try:
        with open(os.path.join(run_dir, "console.log"), encoding="utf-8", errors="replace") as f:
            heads = [ln for ln in f if ln.startswith("# ")]
    except OSError:
        return None
    if not heads:
        return None
    try:
        argv = shlex.split(heads[-1][2 + len("YYYY-mm-dd HH:MM:SS "):])
    except ValueError:
        return None
    return argv[1:] if argv and argv[0] == TRAIN_SCRIPT else None


def other_command(run):
    """The first flag that differs between the run folder's recorded command and ``run``'s, or
    None when they agree (or the folder has no recorded command yet)."""
    old = recorded_flags(run["dir"])
    if old is None:
        return None
    a, b = _what(old), _what(run["flags"])
    if a == b:
        return None
    diff = [f for f in a if f not in b] + [f for f in b if f not in a]
    return diff[0] if diff else "the order of the flags"


def check_commands(grid, runs):
    """Folders this grid would skip or resume must have been made by the same command: else one
    line (rerun with --force, or another --out_dir); with --force they are set aside first."""
    clashes = [(r, d) for r in runs for d in [other_command(r)] if d is not None]
    if not clashes:
        return
    if not grid["force"]:
        run, diff = clashes[0]
        raise UsageError(f"{run['dir']} was made by another command ({diff} differs; {len(clashes)} "
                         f"run folder(s) in all); rerun with --force to retrain them (the folders "
                         f"are kept as <folder>.replaced-<n>) or choose another --out_dir")
    for run, _ in clashes:
        n = 1
        while os.path.lexists(f"{run['dir']}.replaced-{n}"):
            n += 1
        os.rename(run["dir"], f"{run['dir']}.replaced-{n}")


def run_argv(run, resume):
    return [sys.executable, TRAIN_SCRIPT] + run["flags"] + (["--resume"] if resume else [])


def execute(run, resume):
    """Run one train_w_distill.py subprocess (output appended to console.log); returns
    ``(exit status, wall seconds)``. The wall time is recorded even on KeyboardInterrupt."""
    os.makedirs(run["dir"], exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = run_argv(run, resume)
    t0 = time.monotonic()
    # console.log is a stream written as the run goes (not atomic), appended over invocations.
    with open(os.path.join(run["dir"], "console.log"), "a", encoding="utf-8") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv[1:])}\n")
        log.flush()
        begin_invocation(run["dir"])
        try:
            rc = subprocess.call(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=_die_with_runner)
        finally:
            add_wall_time(run["dir"], time.monotonic() - t0)
    return rc, time.monotonic() - t0


def last_line(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("# ")]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def hms(seconds):
    if seconds is None:
        return "--:--:--"
    s = int(round(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eta(done, remaining_cost):
    """Seconds left: mean wall time per unit of cost of ``done`` [(wall, cost)] x remaining cost."""
    cost = sum(c for _, c in done)
    if not done or cost <= 0:
        return None
    return sum(w for w, _ in done) / cost * remaining_cost


# --------------------------------------------------------------------------- the grid

def dry_run(grid, runs, out=print):
    """Print the commands, then the plan per variant (method, networks and widths, epochs and
    initial phases, steps per epoch) and, for a preset with a ``budget``, the estimated time."""
    out(f"# {len(runs)} runs, each in {REPO}:")
    for k, run in enumerate(runs, 1):
        state = "finished, skip" if read_result(run["dir"]) else (
            "resume" if os.path.isdir(os.path.join(run["dir"], "ckpt")) else "new")
        argv = ["python"] + run_argv(run, state == "resume")[1:]
        out(f"[{k}/{len(runs)}] {_label(run)} ({state}): {shlex.join(argv)}")
    for line in plan_lines(grid, runs):
        out(line)
    return 0


# --------------------------------------------------------------------------- plan and time estimate

# (classes, training and test images per class) of the datasets whose size the dry run knows; the
# generated sets' flags override theirs.
DATASET_SIZES = {"synthetic_parts": (40, 125, 50), "synthetic": (10, 200, 50),
                 "cifar100": (100, 500, 100), "cifar10": (10, 5000, 1000)}
DEFAULT_ARCH = {"student": "WResNet-16-4", "teacher": "WResNet-40-4"}   # --model_name WResNet


def dataset_size(flag_list):
    """``(classes, train per class, test per class)`` of a run's dataset (None if unknown)."""
    name = flag_value(flag_list, "dataset", "cifar100")
    if name not in DATASET_SIZES:
        return None
    size = DATASET_SIZES[name]
    if name.startswith("synthetic"):
        size = tuple(int(flag_value(flag_list, f, v)) for f, v in zip(
            ("synthetic_classes", "synthetic_train_per_class", "synthetic_test_per_class"), size))
    return size


def steps_per_epoch(flag_list, rate):
    """Training steps per epoch of a run (class-balanced subset of ``max(1, round(rate * n_c))``
    images per class, the last partial batch dropped), as dataloader.pipeline; None if unknown."""
    size = dataset_size(flag_list)
    if size is None:
        return None
    classes, per_class, _ = size
    keep = per_class if rate >= 1.0 else max(1, math.floor(rate * per_class + 0.5))
    return classes * keep // int(flag_value(flag_list, "batch_size", 128))


def run_plan(run):
    """What a run trains: ``method, scope, student, teacher, init, train, val_every, spe,
    validations`` (the architectures with train_w_distill.py's defaults)."""
    f = run["flags"]
    method = flag_value(f, "Distillation", "IEP")
    scope = flag_value(f, "main_scope", "Student")
    student = flag_value(f, "student_arch", DEFAULT_ARCH["student"])
    teacher = flag_value(f, "teacher_arch", DEFAULT_ARCH["teacher"])
    init, train = init_epochs_of(f), int(flag_value(f, "train_epoch", 100))
    val_every = int(flag_value(f, "val_every", 1))
    return dict(method=method, scope=scope, main=teacher if scope == "Teacher" else student,
                student=student, teacher=teacher, init=init, train=train, val_every=val_every,
                spe=steps_per_epoch(f, run["rate"]),
                validations=sum(validated(e, init, train, val_every) for e in range(init + train)))


def width(arch):
    """The width factor of ``WResNet-d-k`` (1 for any other network)."""
    m = re.fullmatch(r"WResNet-\d+-(\d+)", arch)
    return int(m.group(1)) if m else 1


def load_bench(bench_dir):
    """The benchmark JSONs (``python -m iepkt_tf.benchmark --json``) in ``bench_dir`` (relative to
    the repository): ``[(name, config, parts)]``; unreadable files are left out."""
    found = []
    for path in sorted(glob.glob(os.path.join(REPO, bench_dir, "*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            found.append((os.path.relpath(path, REPO), dict(obj["config"]), dict(obj["parts"])))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
    return found


def _bench_median(bench, run, part, **match):
    """Median over the matching benchmark files of ``part``'s median s/step (None if none)."""
    f = run["flags"]
    size = dataset_size(f)
    want = dict(batch_size=int(flag_value(f, "batch_size", 128)),
                image_size=int(flag_value(f, "synthetic_image_size", 32)),
                num_classes=size[0] if size else None, **match)
    precision = flag_value(f, "precision", "auto")
    values = [parts[part]["median_s"] for _, cfg, parts in bench
              if part in parts and all(cfg.get(k) == v for k, v in want.items())
              and precision in (cfg.get("precision_flag"), cfg.get("precision"))]
    return statistics.median(values) if values else None


def estimate_run(run, bench, budget):
    """``{seconds, main_s, init_s, val_s}`` of a run from the benchmark's step times and the
    preset's overheads, or None when the benchmark has no step of this configuration."""
    plan = run_plan(run)
    if plan["spe"] is None:
        return None
    if plan["method"] == "None":
        main_s = _bench_median(bench, run, "student", student_arch=plan["main"])
    else:
        main_s = _bench_median(bench, run, "main", distillation=plan["method"],
                               student_arch=plan["student"], teacher_arch=plan["teacher"])
    init_s = 0.0
    if plan["init"]:
        init_s = _bench_median(bench, run, "init", distillation=plan["method"],
                               student_arch=plan["student"], teacher_arch=plan["teacher"])
    infer_s = _bench_median(bench, run, "infer", student_arch=plan["main"])
    if main_s is None or init_s is None or infer_s is None:
        return None
    n_test = dataset_size(run["flags"])
    n_test = n_test[0] * n_test[2]
    val_s = infer_s * n_test / int(flag_value(run["flags"], "batch_size", 128))
    seconds = (budget.get("run_overhead_s", 0.0)
               + (plan["init"] + plan["train"]) * budget.get("epoch_overhead_s", 0.0)
               + plan["spe"] * (plan["init"] * init_s + plan["train"] * main_s)
               + plan["validations"] * val_s)
    return dict(seconds=seconds, main_s=main_s, init_s=init_s if plan["init"] else None, val_s=val_s)


def load_factor(pair):
    """How much slower the machine was when the benchmark JSONs were measured: geometric mean over
    the common parts of the median s/step in ``pair[0]`` (the reference benchmark run among them)
    over ``pair[1]`` (the same benchmark on a quiet machine); None without both files."""
    if not pair:
        return None
    try:
        loaded, quiet = ({k: v["median_s"] for k, v in load_bench_file(p)["parts"].items()}
                         for p in pair)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    common = sorted(set(loaded) & set(quiet))
    if not common:
        return None
    return math.exp(statistics.fmean(math.log(loaded[k] / quiet[k]) for k in common))


def load_bench_file(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return json.load(f)


def plan_lines(grid, runs):
    """The dry run's summary lines (all start with ``#``): per variant its method, networks and
    widths, epochs, initial phase and validation; steps per epoch by rate; with the preset's
    ``budget`` the estimated time per run, per rate column and of the whole grid."""
    lines, seen = ["#", f"# Plan of preset {grid['name']} ({len(runs)} runs):"], {}
    for run in runs:
        seen.setdefault(run["variant"], run)
    for variant, run in seen.items():
        p = run_plan(run)
        nets = (f"{p['main']} (width {width(p['main'])})" if p["method"] == "None" else
                f"{p['student']} (width {width(p['student'])}) <- teacher {p['teacher']} "
                f"(width {width(p['teacher'])})")
        init = f"initial phase {p['init']} epochs + " if p["init"] else ""
        lines.append(f"#   {variant:<10} --Distillation={p['method']:<5} {p['scope'].lower()} {nets}; "
                     f"{init}{p['train']} main epochs; {p['validations']} validation(s)")
    spe = {r["rate"]: run_plan(r)["spe"] for r in runs if r["variant"] != TEACHER}
    if spe and None not in spe.values():
        lines.append("#   steps per epoch (students): " + ", ".join(
            f"{n} at rate {rate_name(r)}" for r, n in sorted(spe.items())))
    budget = grid["preset"].get("budget")
    if not budget:
        return lines
    bench = load_bench(budget["bench_dir"])
    est = {id(r): estimate_run(r, bench, budget) for r in runs}
    missing = sorted({r["variant"] for r in runs if est[id(r)] is None})
    lines += ["#", f"# Estimated time: step medians of the benchmark JSONs in {budget['bench_dir']} "
              f"(python -m iepkt_tf.benchmark, measured on this project's 2-core CPU while other "
              f"jobs shared it), + {budget.get('run_overhead_s', 0):g} s per run (start-up, data, "
              f"tracing) + {budget.get('epoch_overhead_s', 0):g} s per epoch (checkpoint, data "
              f"pipeline); validation = inference of the test set."]
    rates = sorted({r["rate"] for r in runs if r["variant"] != TEACHER})
    lines.append("#   " + f"{'variant':<10} {'s/step main':>11} {'init':>7}  "
                 + "  ".join(f"{'rate ' + rate_name(r):>10}" for r in rates) + "  (per run)")
    for variant, run in seen.items():
        e = est[id(run)]
        if e is None:
            continue
        per_rate = {r["rate"]: est[id(r)]["seconds"] for r in runs
                    if r["variant"] == variant and est[id(r)] is not None}
        init = f"{e['init_s']:.4f}" if e["init_s"] else "-"
        cells = ([f"{hms(per_rate[r]) if r in per_rate else '-':>10}" for r in rates]
                 if variant != TEACHER else [f"{hms(e['seconds']):>10} (rate {rate_name(run['rate'])})"])
        lines.append(f"#   {variant:<10} {e['main_s']:>11.4f} {init:>7}  " + "  ".join(cells))
    total = sum(e["seconds"] for e in est.values() if e is not None)
    for rate in rates:
        column = [est[id(r)]["seconds"] for r in runs if r["variant"] != TEACHER and r["rate"] == rate
                  and est[id(r)] is not None]
        lines.append(f"#   rate {rate_name(rate)} column ({len(column)} runs): {hms(sum(column))} "
                     f"({sum(column) / 3600:.2f} h)")
    teacher = [est[id(r)]["seconds"] for r in runs if r["variant"] == TEACHER and est[id(r)]]
    if teacher:
        lines.append(f"#   teacher: {hms(teacher[0])} ({teacher[0] / 3600:.2f} h)")
    lines.append(f"#   grid ({sum(e is not None for e in est.values())} runs): {hms(total)} "
                 f"({total / 3600:.2f} h)")
    factor = load_factor(budget.get("load_reference"))
    if factor:
        columns = ", ".join(f"rate {rate_name(rate)} column " + hms(sum(
            est[id(r)]["seconds"] for r in runs if r["variant"] != TEACHER and r["rate"] == rate
            and est[id(r)] is not None) / factor) for rate in rates)
        lines.append(f"#   on a quiet machine (every figure / {factor:.2f}, the load factor of "
                     f"{budget['load_reference'][0]} over {budget['load_reference'][1]}): "
                     f"{columns}, teacher {hms(teacher[0] / factor) if teacher else '-'}, "
                     f"grid {hms(total / factor)} ({total / factor / 3600:.2f} h)")
    if missing:
        lines.append(f"#   not estimated (no benchmark of their configuration in "
                     f"{budget['bench_dir']}): {', '.join(missing)}")
    return lines


def _label(run):
    return f"{run['variant']} {rate_name(run['rate'])} {run['seed']}"


def run_grid(grid, out=print):
    """Run (or skip, or resume) every run of ``grid``; returns the exit status (1: failures)."""
    runs = plan_runs(grid)
    if grid["dry_run"]:
        return dry_run(grid, runs, out)
    check_commands(grid, runs)
    update_meta(grid, runs)
    pending = [read_result(r["dir"]) is None for r in runs]
    n, done, failures, executed = len(runs), [], [], 0
    teacher_ok = not pending[0]
    for k, run in enumerate(runs, 1):
        if not pending[k - 1]:
            res = read_result(run["dir"])
            wall = "?" if res["wall_s"] is None else f"{res['wall_s']:.1f} s"
            out(f"[{k}/{n}] {_label(run)} -> {res['final_acc']:.2f} (skipped, finished; {wall})")
            continue
        if grid["max_runs"] and executed >= grid["max_runs"]:
            out(f"stopped after {executed} run(s) (--max_runs); run the same command again to "
                "continue")
            break
        if run["needs_teacher"] and not teacher_ok:
            failures.append(f"{_label(run)}: not started, the teacher run did not finish")
            out(f"[{k}/{n}] {_label(run)} -> FAILED (not started: the teacher run did not finish)")
            continue
        ok = _run_one(run, k, n, done, runs, pending, failures, out)
        executed += 1
        teacher_ok = teacher_ok or (ok and run["variant"] == TEACHER)
        _summarize_quietly(grid["out_dir"], out)
    _summarize_quietly(grid["out_dir"], out)
    if failures:
        out(f"{len(failures)} run(s) failed:\n  " + "\n  ".join(failures))
        return 1
    return 0


def _run_one(run, k, n, done, runs, pending, failures, out):
    """Execute one run, print its start and end lines; returns whether it finished."""
    resume = os.path.isdir(os.path.join(run["dir"], "ckpt"))
    out(f"[{k}/{n}] {_label(run)}: {'resuming' if resume else 'starting'} in {run['dir']}")
    rc, wall = execute(run, resume)
    damaged = None
    try:
        res = read_result(run["dir"])
    except InputError as e:  # the run left something unreadable: a failure of this run
        res, damaged = None, str(e)
    done.append((wall, run["cost"]))
    pending[k - 1] = False
    left = eta(done, sum(r["cost"] for r, p in zip(runs, pending) if p))
    log = os.path.join(run["dir"], "console.log")
    if rc == 0 and res is not None:
        out(f"[{k}/{n}] {_label(run)} -> {res['final_acc']:.2f} ({wall:.1f} s), ETA {hms(left)}")
        return True
    why = (f"exit {rc}: {last_line(log)}" if rc else f"damaged output: {damaged}" if damaged else
           "incomplete: exited 0 without a full log.mat; run again to resume")
    failures.append(f"{_label(run)}: {why}; log: {log}")
    out(f"[{k}/{n}] {_label(run)} -> FAILED ({why}); log: {log}, ETA {hms(left)}")
    return False


def _summarize_quietly(out_dir, out):
    try:
        summarize(out_dir)
    except Exception as e:  # a plotting or IO problem must not stop a long grid
        out(f"experiments: warning: could not write the summaries in {out_dir}: "
            f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------- grid.json

def read_meta(out_dir):
    """``OUT/grid.json`` ({} without one); InputError if it is damaged (it is never rewritten
    over: it holds the grid's commands)."""
    path = os.path.join(out_dir, "grid.json")
    if not os.path.lexists(path):
        return {}
    meta = read_json_object(path, "the grid's record written by this runner")
    for key in ("commands", "variants", "planned"):
        if not isinstance(meta.get(key, []), list):
            raise InputError(f"{path}: {key!r} must be a list; fix or remove it")
    for key in ("paper", "descriptions"):
        if not isinstance(meta.get(key, {}), dict):
            raise InputError(f"{path}: {key!r} must be an object; fix or remove it")
    return meta


def _union(old, new):
    return list(dict.fromkeys(list(old) + list(new)))


def update_meta(grid, runs):
    """Merge this invocation into ``OUT/grid.json`` (preset, commands, variants, planned runs)."""
    meta = read_meta(grid["out_dir"])
    preset = grid["preset"]
    paper = {v: {rate_name(r): x for r, x in fig.items()}
             for v, fig in preset.get("paper", {}).items()}
    meta.update(preset=grid["name"], family=preset.get("family", grid["name"]),
                description=preset["description"], paper=paper,
                descriptions={**meta.get("descriptions", {}), grid["name"]: preset["description"]},
                paper_note=preset.get("paper_note", ""),
                commands=_union(meta.get("commands", []), [grid["command"]]),
                variants=_union(meta.get("variants", []), grid["variants"]),
                planned=_union(meta.get("planned", []),
                               [os.path.relpath(r["dir"], grid["out_dir"]) for r in runs]))
    write_json(os.path.join(grid["out_dir"], "grid.json"), meta)


# --------------------------------------------------------------------------- summaries

def collect_rows(out_dir):
    """One row per finished run folder, plus the rows of an existing results.csv whose folders
    are gone; teacher first, then by variant, rate (descending) and seed."""
    rows = []
    for rel in [TEACHER] + _run_folders(out_dir):
        res = read_result(os.path.join(out_dir, rel))
        if res is None:
            continue
        if rel == TEACHER:
            variant = TEACHER
            rate, seed = res["config"].get("sample_rate", 1.0), res["config"].get("seed", 0)
        else:
            variant, name = rel.split("/")
            m = RUN_RE.match(name)
            rate, seed = m["rate"], m["seed"]
        rows.append(dict(variant=variant, rate=float(rate), seed=int(seed), train_dir=rel,
                         **{k: res[k] for k in ("final_acc", "best_acc", "epochs", "wall_s")}))
    seen = {r["train_dir"] for r in rows}
    for row in read_csv(os.path.join(out_dir, "results.csv")):
        gone = not os.path.isdir(os.path.join(out_dir, row["train_dir"]))
        if row["train_dir"] not in seen and gone:
            rows.append(row)
    order = _variant_order(read_meta(out_dir), rows)
    return sorted(rows, key=lambda r: (order.index(r["variant"]), -r["rate"], r["seed"]))


def _run_folders(out_dir):
    found = []
    if not os.path.isdir(out_dir):
        return found
    for variant in sorted(os.listdir(out_dir)):
        vdir = os.path.join(out_dir, variant)
        if variant == TEACHER or not NAME_RE.match(variant) or not os.path.isdir(vdir):
            continue
        found += [f"{variant}/{n}" for n in sorted(os.listdir(vdir)) if RUN_RE.match(n)]
    return found


def _variant_order(meta, rows):
    return _union([TEACHER] + meta.get("variants", []), sorted({r["variant"] for r in rows}))


def read_csv(path):
    """The rows of an existing ``results.csv`` ([] without one); InputError if it is damaged."""
    if not os.path.lexists(path):
        return []
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or list(reader.fieldnames) != list(CSV_FIELDS):
                raise InputError(f"{path}: expected the header {','.join(CSV_FIELDS)}, got "
                                 f"{','.join(reader.fieldnames or []) or 'none'}; fix or remove it")
            for r in reader:
                try:
                    rows.append(dict(variant=r["variant"], rate=float(r["rate"]), seed=int(r["seed"]),
                                     final_acc=float(r["final_acc"]), best_acc=float(r["best_acc"]),
                                     epochs=int(r["epochs"]),
                                     wall_s=float(r["wall_s"]) if r["wall_s"] else None,
                                     train_dir=r["train_dir"]))
                except (TypeError, ValueError):  # a short row gives None fields
                    raise InputError(f"{path} line {reader.line_num}: expected "
                                     f"{','.join(CSV_FIELDS)} values, got {list(r.values())!r:.120}; "
                                     f"fix or remove it") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not a readable results.csv ({' '.join(str(e).split())}); fix or "
                         f"remove it") from None
    return rows


def csv_text(rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in rows:
        w.writerow([r["variant"], rate_name(r["rate"]), r["seed"], f"{r['final_acc']:.4f}",
                    f"{r['best_acc']:.4f}", r["epochs"],
                    "" if r["wall_s"] is None else f"{r['wall_s']:.1f}", r["train_dir"]])
    return buf.getvalue()


def mean_sd(values):
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values, digits=2):
    """``mean ± sd (v1, v2, ...)``; one value alone; ``—`` for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    m, sd = mean_sd(values)
    each = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{m:.{digits}f} ± {sd:.{digits}f} ({each})"


def group(rows):
    """``{variant: {rate: [final_acc in seed order]}}`` of the student rows."""
    table = {}
    for r in rows:
        if r["variant"] != TEACHER:
            table.setdefault(r["variant"], {}).setdefault(r["rate"], []).append(r["final_acc"])
    return table


def _table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def results_markdown(rows, meta):
    """The text of results.md for ``rows`` (see collect_rows) and ``meta`` (grid.json)."""
    table = group(rows)
    rates = sorted({r for v in table.values() for r in v}, reverse=True)
    variants = [v for v in _variant_order(meta, rows) if v in table]
    described = meta.get("descriptions") or {meta.get("preset", "?"): meta.get("description", "")}
    lines = ["# Results: preset " + " + ".join(f"`{name}`" for name in described), ""]
    for name, text in described.items():
        if text:
            lines += [f"- `{name}`: {text}" if len(described) > 1 else text, ""]
    lines += ["```"] + meta.get("commands", []) + ["```", ""]
    lines += _teacher_lines(rows)
    planned = len(meta.get("planned", [])) or len(rows)
    lines += [f"Finished runs: {len(rows)} of {planned} planned.", ""]
    if not table:
        return "\n".join(lines + ["No finished student runs yet.", ""])
    lines += ["Final validation top-1 accuracy (%) by sample rate: mean ± sd over seeds (sample "
              "sd), the value per seed in brackets (seed order).", ""]
    lines += _table(["variant"] + [f"rate {rate_name(r)}" for r in rates],
                    [[v] + [format_cell(table[v].get(r, [])) for r in rates] for v in variants])
    lines += _gain_lines(table, variants, rates) + _paper_lines(table, meta)
    return "\n".join(lines + [""])


def _teacher_lines(rows):
    t = [r for r in rows if r["variant"] == TEACHER]
    if not t:
        return ["Teacher: not finished.", ""]
    return [f"Teacher: {t[0]['final_acc']:.2f} % final validation accuracy (best "
            f"{t[0]['best_acc']:.2f} %, {t[0]['epochs']} epoch(s)).", ""]


def _gain_lines(table, variants, rates):
    if "None" not in table or len(variants) < 2:
        return []
    base = {r: mean_sd(v)[0] for r, v in table["None"].items()}
    body = [[v] + [f"{mean_sd(table[v][r])[0] - base[r]:+.2f}" if r in table[v] and r in base
                   else "—" for r in rates] for v in variants if v != "None"]
    return (["", "## Gain over None", "",
             "Mean final accuracy minus that of `None` (percentage points).", ""]
            + _table(["variant"] + [f"rate {rate_name(r)}" for r in rates], body))


def _paper_lines(table, meta):
    paper = meta.get("paper") or {}
    if not paper:
        return []
    body = []
    for v, figs in paper.items():
        for rate, fig in sorted(((float(r), x) for r, x in figs.items()), reverse=True):
            ours = table.get(v, {}).get(rate, [])
            diff = f"{mean_sd(ours)[0] - fig:+.2f}" if ours else "—"
            body.append([v, rate_name(rate), format_cell(ours), f"{fig:.2f}", diff])
    lines = ["", "## Paper", "", "The paper's top-1 % (Table 1) beside ours.", ""]
    lines += _table(["variant", "rate", "ours", "paper", "ours − paper"], body)
    return lines + (["", "Note: " + meta["paper_note"]] if meta.get("paper_note") else [])


def results_png(rows):
    """PNG bytes of accuracy vs sample rate (matplotlib, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(8.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    table = group(rows)
    rates = sorted({r for v in table.values() for r in v})
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors if len(table) > 10 else \
        matplotlib.colormaps["tab10"].colors
    for k, (variant, by_rate) in enumerate(table.items()):
        xs = sorted(by_rate)
        stats = [mean_sd(by_rate[x]) for x in xs]
        bars = ax.errorbar(xs, [m for m, _ in stats], yerr=[sd or 0.0 for _, sd in stats],
                           marker="o", capsize=3, label=variant, color=colours[k % len(colours)])
        seeds = [(x, v) for x in xs for v in by_rate[x]]
        ax.plot(*zip(*seeds), ".", color=bars[0].get_color(), alpha=0.4)
    for r in rows:
        if r["variant"] == TEACHER:
            ax.axhline(r["final_acc"], ls="--", color="gray",
                       label=f"teacher ({r['final_acc']:.2f})")
    if len(rates) > 2:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    if rates:
        ax.set_xticks(rates, [rate_name(r) for r in rates])
    ax.set_xlabel("sample rate (fraction of the training set)")
    ax.set_ylabel("final validation top-1 accuracy (%)")
    ax.set_title("mean ± sd over seeds (dots: seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def summarize(out_dir):
    """Rebuild results.csv, results.md and results.png in ``out_dir`` (atomically) from its run
    folders; returns the rows."""
    rows = collect_rows(out_dir)
    meta = read_meta(out_dir)
    for name in ("results.csv", "results.md", "results.png"):
        check_writable(os.path.join(out_dir, name), "--out_dir output")
    with atomic_open(os.path.join(out_dir, "results.csv"), "w", encoding="utf-8") as f:
        f.write(csv_text(rows))
    with atomic_open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(rows, meta))
    with atomic_open(os.path.join(out_dir, "results.png"), "wb") as f:
        f.write(results_png(rows))
    return rows


# --------------------------------------------------------------------------- command line

def _summarize_only(out_dir, flag):
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out_dir {flag}: no such directory")
    rows = summarize(out_dir)
    print(f"{len(rows)} finished run(s); wrote results.csv, results.md, results.png in {flag}")
    return 0


def run_from_flags(fv):
    """The invocation the flags ``fv`` ask for; returns the exit status. Bad flags and damaged
    files raise UsageError or InputError (nothing run or rewritten)."""
    grid = grid_from_flags(fv)
    try:
        if grid["summarize_only"]:
            return _summarize_only(grid["out_dir"], fv.out_dir)
        return run_grid(grid, out=lambda line: print(line, flush=True))
    except OSError as e:  # an output that cannot be written
        where = e.filename2 or e.filename
        raise UsageError(f"--out_dir {fv.out_dir}: cannot write {where}: {e.strerror}" if where
                         else str(e)) from None
    except KeyboardInterrupt:
        _summarize_quietly(grid["out_dir"], print)
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def main(argv=None):
    """``argv`` (flags only; default ``sys.argv[1:]``) -> exit status (module docstring)."""
    return tool_main("experiments", argv, define_flags, __doc__, run_from_flags,
                     (UsageError, InputError), status=True)


if __name__ == "__main__":
    sys.exit(main())
