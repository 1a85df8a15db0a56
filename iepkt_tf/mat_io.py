"""The authors' ``train_params.mat`` exchange (train_w_distill.py).

At the end of training the authors ``scipy.io.savemat`` ``{TF1 variable name: value}`` over the
trainable variables and ``BN_collection`` of the main scope (lines 186-193); a teacher is loaded by
matching variable names and reshaping each array to the variable's shape (lines 100-106), because
``loadmat`` returns 1-D vectors as ``(1, C)``.
"""
from __future__ import annotations

import os

import numpy as np
import scipy.io as sio

from iepkt_tf.atomic import atomic_open

_MAX_LISTED = 50
_LISTED = 5  # names shown per section of a one-line message


class ParamsMismatchError(ValueError):
    """A parameter file does not match the network's variables (names or shapes)."""


class MatFileError(ValueError):
    """A file is not a readable .mat file (truncated, another format)."""


def _desc(what, path=None):
    return f"{what} {path}" if what and path else str(what or path)


def load_mat(path, what=None) -> dict[str, np.ndarray]:
    """``scipy.io.loadmat`` without the ``__header__``-style entries; ``what`` (e.g. the flag name)
    prefixes error messages."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MatFileError(f"{_desc(what, path)}: is a directory, expected a .mat file (e.g. "
                           f"<train_dir>/train_params.mat)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_desc(what, path)}: no such file (expected a .mat written by "
                                f"the training script, e.g. <train_dir>/train_params.mat)")
    try:
        raw = sio.loadmat(path)
    except Exception as e:  # scipy raises several types for corrupt or non-MAT files
        reason = " ".join(str(e).split()) or type(e).__name__
        raise MatFileError(f"{_desc(what, path)}: not a readable MATLAB .mat file ({reason})") from None
    return {k: np.asarray(v) for k, v in raw.items() if not k.startswith("__")}


def check_finite(arrays, scope=None, what="--params"):
    """Raise :class:`MatFileError` unless every array under ``scope`` (all if None) is numeric
    (bool, int, float) and finite: a string, cell or struct entry, or a NaN/Inf, is a damaged file."""
    bad = []
    for name in sorted(k for k in arrays if _in_scope(k, scope)):
        a = np.asarray(arrays[name])
        if a.dtype.kind not in "biuf" or (a.dtype.kind == "f" and not np.all(np.isfinite(a))):
            bad.append(name)
    if bad:
        where = f" under {scope!r}" if scope is not None else ""
        shown = ", ".join(bad[:_LISTED]) + (", ..." if len(bad) > _LISTED else "")
        raise MatFileError(f"{what}: {len(bad)} parameter(s){where} are not finite numbers "
                           f"(NaN, Inf or non-numeric): {shown}")


def one_line(error):
    """The message of ``error`` on one line: a line ending in ``:`` opens a section, the indented
    lines after it are its items (``ParamsMismatchError``'s listings), at most 5 shown;
    sections are joined by ``; ``."""
    sections = []  # [title, items]
    for line in str(error).splitlines():
        text = line.strip()
        if not text:
            continue
        if text.endswith(":") or not sections or not line[0].isspace():
            sections.append([text.rstrip(":"), []])
        else:
            sections[-1][1].append(text)
    if not sections:
        return type(error).__name__
    parts = []
    for title, items in sections:
        shown = items[:_LISTED] + (["..."] if len(items) > _LISTED else [])
        parts.append(f"{title}: {', '.join(shown)}" if items else title)
    return "; ".join(parts)


def save_mat(path, arrays) -> None:
    """``scipy.io.savemat(path, arrays)`` written atomically: a temporary file in the same
    directory is filled, flushed and then renamed over ``path`` (never half-written)."""
    path = os.fspath(path)
    bad = [k for k in arrays if not isinstance(k, str) or not k or k[0] == "_" or k[0].isdigit()]
    if bad:
        raise ValueError(f"{path}: .mat keys must be non-empty strings not starting with '_' or a digit, got {bad}")
    data = {k: np.asarray(v) for k, v in arrays.items()}
    with atomic_open(path, "wb") as f:
        sio.savemat(f, data)


def scopes_in(arrays):
    """Top-level scopes of a parameter dict, ``Distillation`` excluded."""
    return sorted({k.split("/")[0] for k in arrays} - {"Distillation"})


def resolve_scope(arrays, scope, what="--params"):
    """``scope`` if the file has it, else the file's single network scope (ValueError otherwise)."""
    found = scopes_in(arrays)
    if scope:
        if scope not in found:
            raise ValueError(f"{what}: no variables under scope {scope!r}; the file has {found}")
        return scope
    if len(found) != 1:
        raise ValueError(f"{what}: the file holds {len(found)} network scopes {found}; pass --scope")
    return found[0]


def _in_scope(name, scope):
    return scope is None or name.split("/")[0] == scope


def collect_params(variables, scope=None) -> dict[str, np.ndarray]:
    """``{TF1 name: numpy value}`` of ``variables`` (``{TF1 name: variable}``) whose first name
    component is ``scope`` (all if None), as train_w_distill.py does with ``main_scope``."""
    return {name: np.array(v.numpy() if hasattr(v, "numpy") else v)
            for name, v in variables.items() if _in_scope(name, scope)}


def _np_dtype(v):
    dtype = v.dtype
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def _core(shape):
    return tuple(int(d) for d in shape if int(d) != 1)


def _listing(title, items):
    lines = [f"  {title} ({len(items)}):"]
    lines += [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
    return lines


def assign_params(variables, arrays, scope=None, strict=True, what="--teacher_params") -> int:
    """Assign ``arrays`` (``{TF1 name: array}``, e.g. from ``load_mat``) to ``variables``
    (``{TF1 name: variable}``); only names whose first component is ``scope`` are considered.

    An array fits a variable when their shapes agree once size-1 axes are dropped (``loadmat``'s
    ``(1, C)`` for a ``[C]`` vector); it is reshaped to the variable's shape, as the authors do. The
    authors' bare reshape would also accept e.g. a transposed kernel; this does not.

    ``strict``: any missing, unexpected or wrongly shaped name raises ``ParamsMismatchError`` and
    nothing is assigned. Otherwise missing and unexpected names are skipped (wrong shapes still
    raise). Returns the number of variables assigned.
    """
    wanted = {k: v for k, v in variables.items() if _in_scope(k, scope)}
    given = {k: np.asarray(a) for k, a in arrays.items() if _in_scope(k, scope)}
    missing = sorted(set(wanted) - set(given))
    unexpected = sorted(set(given) - set(wanted))
    shaped = sorted(k for k in set(wanted) & set(given)
                    if _core(given[k].shape) != _core(wanted[k].shape))
    if shaped or (strict and (missing or unexpected)):
        where = f" under scope {scope!r}" if scope is not None else ""
        lines = [f"{what}: parameters do not match the network{where}: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(shaped)} wrongly shaped (file has {len(given)} "
                 f"keys, network has {len(wanted)} variables)"]
        if missing:
            lines += _listing("missing (in the network, not in the file)", missing)
        if unexpected:
            lines += _listing("unexpected (in the file, not in the network)", unexpected)
        if shaped:
            lines += _listing("wrongly shaped (name: expected shape, got shape)",
                              [f"{k}: expected {tuple(int(d) for d in wanted[k].shape)}, got {given[k].shape}"
                               for k in shaped])
        raise ParamsMismatchError("\n".join(lines))
    n = 0
    for name in sorted(set(wanted) & set(given)):
        var = wanted[name]
        var.assign(given[name].reshape(tuple(int(d) for d in var.shape)).astype(_np_dtype(var)))
        n += 1
    return n
