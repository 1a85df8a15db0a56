r"""Train a network, plainly or with knowledge distillation (the authors' ``train_w_distill.py``).

    python train_w_distill.py --Distillation None --main_scope Teacher --train_dir runs/teacher
    python train_w_distill.py --Distillation IEP --teacher_params runs/teacher/train_params.mat \
        --train_dir runs/iep

Same flags, defaults and outputs as the authors' script (sseung0703/IEPKT): batch 128, validation
batch 200, Nesterov momentum 0.9, learning rate 0.1 times 0.2 at 30/60/80 % of the main phase,
weight decay 5e-4, 100 epochs; a method with an initial phase (IEP: 20 epochs that train only the
distillation module) runs it first. At the end ``train_params.mat`` (every TF1-named variable of
``--main_scope``) and ``log.mat`` (``training_acc``, ``validation_acc`` per epoch) are written,
TensorBoard events go to ``--train_dir`` and a checkpoint is kept per epoch (``--resume``
continues a run exactly; SIGTERM/SIGINT/SIGHUP/SIGPIPE stop after the current step with a checkpoint;
one training at a time per ``--train_dir``).
``python train_w_distill.py --helpfull`` documents every flag, each method's own included.

The flags live in :mod:`iepkt_tf.config`, the methods in :mod:`iepkt_tf.distillers`, the loop in
:mod:`iepkt_tf.trainer` (its docstring lists where it differs from the authors' loop).
"""
from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS


class ClosableStdout:
    """``sys.stdout`` that a closed reader (``| head``) turns into ``/dev/null`` instead of a
    BrokenPipeError: the SIGPIPE that comes with it stops the run like SIGTERM (a checkpoint,
    exit code 141, ``--resume`` continues exactly)."""

    def __init__(self, stream):
        self.stream = stream

    def _closed(self):
        self.stream = open(os.devnull, "w", encoding="utf-8")

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._closed()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv):
    if len(argv) > 1:
        print(f"train_w_distill.py: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    sys.stdout = ClosableStdout(sys.stdout)
    if not FLAGS["verbosity"].present:  # absl's INFO lines (one per checkpoint) only on request
        logging.set_verbosity(logging.WARNING)
    from dataloader.datasets import DatasetNotFoundError
    from iepkt_tf.checkpoints import CheckpointError
    from iepkt_tf.config import ConfigError, config_from_flags
    from iepkt_tf.mat_io import MatFileError, ParamsMismatchError, one_line
    from iepkt_tf.trainer import NonFiniteLossError, WriteError, run

    try:
        result = run(config_from_flags())
    except (ConfigError, ParamsMismatchError, MatFileError, CheckpointError,
            DatasetNotFoundError, FileNotFoundError) as e:  # DatasetError is a DatasetNotFoundError
        print(f"train_w_distill.py: error: {one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"train_w_distill.py: error: {e}", file=sys.stderr)
        return 1
    except WriteError as e:  # the environment (disk full, permissions), not the input: exit 3
        print(f"train_w_distill.py: error: {e}", file=sys.stderr)
        return 3
    if result.get("signal"):
        return 128 + int(getattr(signal, result["signal"]))  # the shell's: 143, 130, 129
    return 0


HELP = ("h", "?", "help", "helpshort", "helpfull")  # as -NAME or --NAME


def parse_flags(argv):
    """absl's flag parsing with the project's command-line boundary (``iepkt_tf.cli``): a bad flag,
    value or ``--flagfile`` is one line ``train_w_distill.py: error: ...`` with exit status 2 (absl
    prints two lines and exits 1); ``--help`` lists the script's flags and ``--helpfull`` every
    flag (absl's included), both with exit status 0."""
    from iepkt_tf import config
    from iepkt_tf.mat_io import one_line

    asked = [a.lstrip("-") for a in argv[1:] if a.startswith("-") and a.lstrip("-") in HELP]
    if asked:
        text = (FLAGS.get_help() if "helpfull" in asked else
                FLAGS.module_help(config) + "\n\nTry --helpfull to get a list of all flags.")
        print(__doc__.strip() + "\n\nflags:\n" + text)
        sys.exit(0)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        message = one_line(e)
        if isinstance(e, flags.CantOpenFlagFileError):  # "ERROR:: Unable to open flagfile: ..."
            message = "--flagfile: " + message.split("ERROR::", 1)[-1].strip()
        print(f"train_w_distill.py: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from iepkt_tf.quiet import import_tensorflow

    import_tensorflow()  # before anything else imports it: no C++ start-up lines unless --verbosity
    from iepkt_tf.config import define_flags

    define_flags()
    app.run(main, flags_parser=parse_flags)
