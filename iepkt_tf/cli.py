"""The command-line boundary shared by the tools (export, evaluate, visualize, parity, experiments):
absl flags on a private FlagValues, ``--help`` from the module docstring, and every bad input as
one line ``<tool>: error: ...`` with exit status 2."""
from __future__ import annotations

import sys

from absl import flags

from iepkt_tf.mat_io import one_line


def parse_flags(prog, argv, define, doc):
    """A private FlagValues parsed from ``argv`` (flags only); None after printing --help."""
    fv = flags.FlagValues()
    define(fv)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help())
        return None
    rest = fv([prog] + list(argv))
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments {rest[1:]} (all options are --flags)")
    return fv


def tool_main(prog, argv, define, doc, run, errors, status=False):
    """Parse ``argv`` (default ``sys.argv[1:]``) and ``run(flag_values)``; an exception of
    ``errors`` (flag errors always) becomes the one-line error. Returns the exit status: 0, or
    with ``status`` what ``run`` returns."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        fv = parse_flags(prog, argv, define, doc)
        if fv is not None:
            code = run(fv)
            return code if status else 0
    except (flags.Error,) + tuple(errors) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0
