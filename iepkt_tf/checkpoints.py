"""Checkpoints of a training run: what is saved, and the restore that falls back.

A checkpoint holds the main network, the optimiser, the distiller's state (all keyed by the
authors' TF1 names, :func:`tracked_by_name`), the loop position (``epoch``, ``step``: batches done
in that epoch, non-zero only for a checkpoint written on SIGTERM/SIGINT inside an epoch), the
batch accuracies of the unfinished epoch and the per-epoch logs. Files are ``ckpt/ckpt-<global
step>``; TensorFlow writes them to temporary names and renames, and keeps ``--keep_checkpoints``.

:func:`restore_newest_readable` tries the checkpoints from the newest down: one that cannot be read
(truncated, wrong format, wrong variables) is named in a one-line note and the next older one is
used; when none can be read it raises :class:`CheckpointError`.
"""
from __future__ import annotations

import os
import re

import tensorflow as tf

_CKPT = re.compile(r"^ckpt-(\d+)\.index$")


class CheckpointError(ValueError):
    """No checkpoint of a run can be read (the message names the directory and each failure)."""


def tracked_by_name(named):
    """A checkpointable ``{TF1 name: variable}``: checkpoints keyed by the authors' names,
    independent of how the Keras objects nest their layers (a Keras 3 model does not expose layers
    kept in nested lists to tf.train.Checkpoint, so checkpointing the model object would silently
    miss e.g. the blocks' batch-norm statistics)."""
    module = tf.Module(name="named_variables")
    module.variables_by_name = dict(named)
    return module


def on_disk(ckpt_dir):
    """Checkpoint prefixes in ``ckpt_dir``, newest (highest number) first, found from their index
    files (so a damaged ``checkpoint`` state file hides none)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), os.path.join(ckpt_dir, m.group(0)[:-len(".index")]))
             for m in map(_CKPT.match, os.listdir(ckpt_dir)) if m]
    return [path for _, path in sorted(found, reverse=True)]


def _restore(tracked, path):
    """Restore every object of ``tracked`` from ``path``; the loss scale only if the run had one
    (the precision may differ between the interrupted and the resumed run, e.g. GPU -> CPU)."""
    saved = {k.split("/")[0] for k, _ in tf.train.list_variables(path)}
    restore = tf.train.Checkpoint(**{k: v for k, v in tracked.items()
                                     if k != "loss_scale" or k in saved})
    restore.restore(path).assert_existing_objects_matched()


def _reason(err):
    text = str(getattr(err, "message", err)).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def restore_newest_readable(tracked, ckpt_dir, note=print):
    """Restore the newest readable checkpoint of ``ckpt_dir`` into ``tracked``; returns its path,
    or None when the directory holds none. Each unreadable one gets a ``note`` line, and so does a
    ``checkpoint`` state file TensorFlow cannot parse (it is rewritten at the next save)."""
    paths = on_disk(ckpt_dir)
    state = os.path.join(ckpt_dir, "checkpoint")
    if paths and os.path.isfile(state) and tf.train.get_checkpoint_state(ckpt_dir) is None:
        note(f"--resume: {state} cannot be parsed; the checkpoints were found from their index files")
    failures = []
    for path in paths:
        try:
            _restore(tracked, path)
        except (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError) as err:
            failures.append(f"{os.path.basename(path)}: {_reason(err)}")
            note(f"--resume: checkpoint {path} cannot be read ({_reason(err)}); trying the previous one")
            continue
        return path
    if failures:
        raise CheckpointError(f"--resume: no readable checkpoint in {ckpt_dir} ({'; '.join(failures)}); "
                              f"start a new run in another --train_dir")
    return None
