"""A quiet console: TensorFlow's C++ start-up lines are dropped unless ``--verbosity`` is given.

TF 2.21 prints its start-up lines (oneDNN, CUDA stubs, CPU features, cuInit) through absl's C++
logging before that logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` does not silence them.
:func:`import_tensorflow` imports TensorFlow and lists its devices (which prints the cuInit line)
with the process's stderr (file descriptor 2) sent to a temporary file, then restores stderr and
writes back every line that is not one of those start-up lines, so an error TensorFlow prints while
loading still reaches the user.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile

# glog-style lines of TensorFlow's C++ logging ("I0000 00:00:...", "W...", "E..." + source file),
# absl's pre-initialisation banner and the CPU-feature continuation line.
NOISE = re.compile(r"^([IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] .*"
                   r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                   r"|To enable the following instructions: .* in other operations, rebuild TensorFlow .*)$")


def verbose_requested(argv=None):
    """Whether the command line asks for absl's/TensorFlow's log lines (``--verbosity``, ``-v``)."""
    argv = sys.argv[1:] if argv is None else argv
    return any(a.startswith(("--verbosity", "-v=")) or a == "-v" for a in argv)


def import_tensorflow(argv=None):
    """``import tensorflow`` (and list the devices) without the C++ start-up lines, unless
    ``--verbosity`` is on the command line; returns the module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if verbose_requested(argv):
        import tensorflow as tf
        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [ln for ln in capture.read().decode("utf-8", "replace").splitlines()
                    if ln.strip() and not NOISE.match(ln)]
    for line in kept:
        print(line, file=sys.stderr)
    return tf
