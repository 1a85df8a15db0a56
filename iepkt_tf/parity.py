"""Parity of this implementation with the authors' TF1 code, number for number.

``python -m iepkt_tf.parity --fixtures DIR`` runs our code on every fixture file ``*.npz`` in
``DIR`` and compares it with the numbers the authors' code produced. The file format, every
convention and the tolerances are documented in the README that ships with the fixtures
(``tests/fixtures/README.md`` in this repository). A file is recognised by its name prefix,
checked against ``__meta__["kind"]``:

====  ===========  ============================================================================
a_    ``svd``      first PCA ``svd_eid``: s, U, V and the authors' gradient ``dx`` (per-sample sign
                   aligned with the reference, since the sign of a TF SVD is arbitrary)
b_    ``plane``    plane mapping
c_    ``pca``      teacher/student PCA path and incremental-PCA state, replayed from the zero state
                   over all stored steps (and the whole EKI step's ``dist``/``MHA_loss``/BN updates)
d_    ``mpnn``     MPNN in both BN modes, BN updates, message L1 and KL terms
e_    ``mhgd``     attention heads, estimator with the stored drop-head noise, K_BB, BN updates
f_    ``kld``      the authors' KL
g_    ``eki``      the whole distiller from the stored state: losses, intermediates, partial
                   gradients w.r.t. the student maps, gradients of the module loss w.r.t. every
                   module variable, and the state after the step's update
h_    ``wresnet``  WResNet logits, feats, losses and BN update; the companion ``.mat`` loaded
                   through ``mat_io`` as a teacher would be
i_    ``baselines`` KD, AT (both forms), FT (as the authors run it, both phases), AB (loss and
                   the authors' initial-phase step), RKD, MHGD and CO against the authors' TF2 and
                   TF1 code (:mod:`iepkt_tf.parity_baselines`)
====  ===========  ============================================================================

Shapes, variable names and settings are read from each file (keys and ``__meta__``), never
assumed. Tolerances (README "Determinism and tolerances"), as ``|ours - ref| <= tol * max|ref|``
per array (absolute when ``ref`` is all zero): forward values and losses 1e-4; state after an
update, every value computed from a state that has been updated (the incremental-PCA projections
``P``, ``G``, ``S_proj`` and the replayed EKI after the first step) and gradients 1e-3; gradients that are zero in exact arithmetic
(``__meta__["grad_zero_in_exact_arithmetic"]``) absolute 1e-7. ``diag/*`` and ``ipca_sum_SV``
are not compared, nor intermediates our API does not expose (``s_all``, ``ipca_svd_input``).

Output: one row per quantity (name, max abs err, max rel err, tolerance, PASS/FAIL), then a line
``N passed, M failed``. The exit status is 1 when a comparison fails and 2 when a fixture cannot
be read or a flag is bad (one line ``parity: error: ...`` on stderr naming the file or flag). A
fixture is unreadable when it is not an ``.npz``, ``__meta__`` is not a JSON object, an array is
non-numeric (strings only for ``branch``) or non-finite, a check cannot use its arrays, or, with a
``manifest.json`` beside the fixtures, a key is missing or has another shape or dtype than the
manifest lists. ``run_parity(dir)`` returns the rows.
"""
from __future__ import annotations

import json
import pathlib
import sys
from dataclasses import dataclass

import numpy as np
from absl import flags

from iepkt_tf.cli import tool_main

FWD_TOL = 1e-4
STATE_TOL = 1e-3
GRAD_TOL = 1e-3
ZERO_GRAD_ABS_TOL = 1e-7

# Keys whose reference is a string (README, a_svd_eid: ``branch``); every other array is numeric.
STRING_SUFFIXES = ("/branch",)
MANIFEST = "manifest.json"   # beside the fixtures: every file's keys with shape and dtype
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")   # an .npz is a zip archive (an empty one: the second)

KINDS = {"a": "svd", "b": "plane", "c": "pca", "d": "mpnn", "e": "mhgd", "f": "kld", "g": "eki",
         "h": "wresnet", "i": "baselines"}


class FixtureError(Exception):
    """A fixture file cannot be read or does not have the documented format."""


@dataclass
class Row:
    name: str
    abs_err: float
    rel_err: float
    tol: float
    mode: str          # "rel" (tol * max|ref|) or "abs"
    passed: bool
    note: str = ""

    def format(self, width=72):
        tol = f"{self.tol:.0e}{' abs' if self.mode == 'abs' else ''}"
        status = "PASS" if self.passed else "FAIL"
        note = f"  ({self.note})" if self.note else ""
        return (f"{self.name:<{width}} {self.abs_err:10.3e} {self.rel_err:10.3e} {tol:>9} "
                f"{status}{note}")


def compare(name, got, ref, tol, mode="rel", scale=None):
    """One row: max abs error, max error relative to max|ref| (abs if ref is all zero).
    ``scale`` replaces max|ref| when ``ref`` is one part of a larger array."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Row(name, np.inf, np.inf, tol, mode, False, f"shape {got.shape} != {ref.shape}")
    if got.size == 0:
        return Row(name, 0.0, 0.0, tol, mode, True)
    if not np.all(np.isfinite(got)):
        return Row(name, np.inf, np.inf, tol, mode, False, "non-finite values")
    abs_err = float(np.max(np.abs(got - ref)))
    scale = float(np.max(np.abs(ref))) if scale is None else float(scale)
    rel_err = abs_err / scale if scale > 0 else abs_err
    err = rel_err if mode == "rel" else abs_err
    return Row(name, abs_err, rel_err, tol, mode, bool(err <= tol))


def compare_equal(name, got, ref):
    """Exact comparison (booleans, strings, discrete decisions)."""
    got, ref = np.asarray(got), np.asarray(ref)
    same = got.shape == ref.shape and bool(np.all(got == ref))
    err = 0.0 if same else 1.0
    note = "" if same else f"got {got.tolist() if got.size < 8 else got.shape}, " \
                           f"expected {ref.tolist() if ref.size < 8 else ref.shape}"
    return Row(name, err, err, 0.0, "abs", same, note)


def _listed(keys, limit=5):
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


class Fixture:
    """The arrays of one ``.npz`` fixture, read eagerly and checked: numeric arrays (strings only
    under :data:`STRING_SUFFIXES`), all finite, ``__meta__`` a JSON object, and, when a manifest
    entry is given, every key with the manifest's shape and dtype. A missing key is a FixtureError."""

    def __init__(self, path, manifest=None):
        self.path = pathlib.Path(path)
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise FixtureError(f"{self.path}: cannot read it ({e.strerror or e})") from None
        if magic not in ZIP_MAGIC:
            raise FixtureError(f"{self.path}: not an .npz archive (expected a zip of .npy arrays, "
                               f"the format of tests/fixtures/README.md)")
        try:
            with np.load(self.path, allow_pickle=False) as f:
                self.arrays = {k: f[k] for k in f.files}
        except Exception as e:  # BadZipFile, OSError, ValueError, zlib.error, EOFError, ...
            reason = " ".join(str(e).split())
            raise FixtureError(f"{self.path}: unreadable fixture ({type(e).__name__}: {reason})") from None
        if "__meta__" not in self.arrays:
            raise FixtureError(f"{self.path}: no __meta__ key (not a fixture in the documented format)")
        try:
            self.meta = json.loads(str(self.arrays["__meta__"]))
        except ValueError as e:
            raise FixtureError(f"{self.path}: __meta__ is not valid JSON ({e})") from None
        if not isinstance(self.meta, dict):
            raise FixtureError(f"{self.path}: __meta__ must be a JSON object, got "
                               f"{type(self.meta).__name__}")
        self.stem = self.path.stem
        self._check_arrays()
        if manifest is not None:
            self._check_manifest(manifest)

    def _check_arrays(self):
        strings, objects, nonfinite = [], [], []
        for key, a in sorted(self.arrays.items()):
            if key == "__meta__":
                continue
            if a.dtype.kind in "US":
                if not key.endswith(STRING_SUFFIXES):
                    strings.append(f"{key} ({a.dtype})")
            elif a.dtype.kind not in "biuf":
                objects.append(f"{key} ({a.dtype})")
            elif a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                nonfinite.append(key)
        if strings or objects:
            raise FixtureError(f"{self.path}: expected numeric arrays, got strings or other "
                               f"dtypes in {_listed(strings + objects)}")
        if nonfinite:
            raise FixtureError(f"{self.path}: non-finite values (NaN/Inf) in {_listed(nonfinite)}; "
                               f"fixtures hold finite numbers")

    def _check_manifest(self, entry):
        keys = entry.get("keys") if isinstance(entry, dict) else None
        if not isinstance(keys, dict):
            raise FixtureError(f"{MANIFEST}: the entry of {self.path.name} has no 'keys' object")
        missing = sorted(set(keys) - set(self.arrays))
        if missing:
            raise FixtureError(f"{self.path}: {len(missing)} key(s) listed in {MANIFEST} are "
                               f"missing: {_listed(missing)}")
        wrong = []
        for key, spec in sorted(keys.items()):
            if key == "__meta__":
                continue
            try:
                shape, dtype = tuple(int(d) for d in spec[0]), np.dtype(spec[1])
            except (TypeError, ValueError, IndexError):
                raise FixtureError(f"{MANIFEST}: {self.path.name} key {key!r} has no "
                                   f"[shape, dtype] entry, got {spec!r}") from None
            a = self.arrays[key]
            if a.shape != shape or a.dtype != dtype:
                wrong.append(f"{key} is {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}")
        if wrong:
            raise FixtureError(f"{self.path}: {len(wrong)} key(s) differ from {MANIFEST}: "
                               f"{_listed(wrong, 3)}")

    def __getitem__(self, key):
        try:
            return self.arrays[key]
        except KeyError:
            raise FixtureError(f"{self.path}: missing key {key!r}") from None

    def __contains__(self, key):
        return key in self.arrays

    def keys(self, prefix="", suffix=""):
        return sorted(k for k in self.arrays if k.startswith(prefix) and k.endswith(suffix))

    def meta_get(self, key):
        if key not in self.meta:
            raise FixtureError(f"{self.path}: __meta__ has no {key!r}")
        return self.meta[key]

    def row(self, key, got, tol, mode="rel", ref=None):
        return compare(f"{self.stem}:{key}", got, self[key] if ref is None else ref, tol, mode)

    def row_equal(self, key, got):
        return compare_equal(f"{self.stem}:{key}", got, self[key])


def _np(x):
    return np.zeros(()) if x is None else np.asarray(x)


def _assign(variables, fix, prefix, where=""):
    """Assign ``fix[prefix + name]`` to every ``{name: variable}`` (names relative to prefix)."""
    for name, var in variables.items():
        arr = fix[prefix + name]
        if tuple(arr.shape) != tuple(var.shape):
            raise FixtureError(f"{fix.path}: {prefix + name} has shape {arr.shape}, the model "
                               f"built from the file's inputs{where} expects {tuple(var.shape)}")
        var.assign(arr)


def _sample_sign(v, v_ref):
    """Per-sample sign aligning ``v`` [B,C,1] with ``v_ref`` (README, ``a_svd_eid``)."""
    s = np.sign(np.sum(np.asarray(v) * np.asarray(v_ref), axis=(1, 2)))
    return np.where(s == 0, 1.0, s).reshape(-1, 1, 1)


# ----------------------------------------------------------------------------------------- a, b, f
def check_svd(fix):
    import tensorflow as tf
    from iepkt_tf.stacked_pca import branch_of, svd_eid

    rows = []
    for case in sorted(k[:-2] for k in fix.keys(suffix="/x")):
        x = tf.constant(fix[f"{case}/x"])
        if x.shape.rank != 4:
            raise FixtureError(f"{fix.path}: {case}/x must be [B,H,W,C], got {x.shape}")
        b, h, w, c = x.shape
        rows.append(fix.row_equal(f"{case}/branch", branch_of(h * w, c)))
        g_u, g_v = fix[f"{case}/gU"], fix[f"{case}/gV"]
        with tf.GradientTape() as tape:
            tape.watch(x)
            s, u, v = svd_eid(x, 1)
            loss = tf.reduce_sum(u * g_u) + tf.reduce_sum(v * g_v)
        dx = tape.gradient(loss, x)
        sign = _sample_sign(v, fix[f"{case}/V"])
        rows.append(fix.row(f"{case}/s", s, FWD_TOL))
        rows.append(fix.row(f"{case}/U", u.numpy() * sign, FWD_TOL))
        rows.append(fix.row(f"{case}/V", v.numpy() * sign, FWD_TOL))
        no_grad = dx is None or not np.any(dx.numpy())
        rows.append(fix.row_equal(f"{case}/dx_is_none", no_grad))
        dx = np.zeros(x.shape, np.float32) if dx is None else dx.numpy()
        rows.append(fix.row(f"{case}/dx", dx * sign.reshape(-1, 1, 1, 1), GRAD_TOL))
        if f"{case}/dx_at_stop_gradient" in fix:
            # The authors' registered Svd_ gradient, which never reaches x (SVP.py line 19).
            xm = tf.reshape(x, [b, h * w, c])
            with tf.GradientTape() as tape:
                tape.watch(xm)
                _, u, v = svd_eid(xm, 1, near_square_grad="override")
                loss = tf.reduce_sum(u * g_u) + tf.reduce_sum(v * g_v)
            dxs = _np(tape.gradient(loss, xm))
            rows.append(fix.row(f"{case}/dx_at_stop_gradient", dxs * sign, GRAD_TOL))
    if not rows:
        raise FixtureError(f"{fix.path}: no '<case>/x' keys")
    return rows


def check_plane(fix):
    from iepkt_tf.plane_mapping import plane_mapping

    rows = []
    for case in sorted(k[:-2] for k in fix.keys(suffix="/x")):
        x = fix[f"{case}/x"]
        if x.ndim != 2:
            raise FixtureError(f"{fix.path}: {case}/x must be [B,D], got shape {x.shape}")
        rows.append(fix.row(f"{case}/y", plane_mapping(x), FWD_TOL))
    if not rows:
        raise FixtureError(f"{fix.path}: no '<case>/x' keys")
    return rows


def check_kld(fix):
    from iepkt_tf.kld import kld_loss

    rows = []
    for case in sorted(k[:-2] for k in fix.keys(suffix="/X")):
        x, y = fix[f"{case}/X"], fix[f"{case}/Y"]
        rows.append(fix.row(f"{case}/kld", kld_loss(x, y), FWD_TOL))
        rows.append(fix.row(f"{case}/kld_XX", kld_loss(x, x), FWD_TOL))
    if not rows:
        raise FixtureError(f"{fix.path}: no '<case>/X' keys")
    return rows


# ------------------------------------------------------------------------------------------- d, e
def _modules(fix, suffix):
    mods = sorted({k.split("/")[0] for k in fix.keys(suffix=suffix) if k.split("/")[0][1:].isdigit()},
                  key=lambda m: int(m[1:]))
    if not mods:
        raise FixtureError(f"{fix.path}: no 'm<i>/...{suffix}' keys")
    return mods


def _mpnn_prefix(i):
    return f"Distillation/EKI/EKI_module{i}/MPNN/MPNN/"


def _mha_prefix(i):
    return f"Distillation/EKI/EKI_module{i}/MHA/Attention_Knowledge/"


def check_mpnn(fix):
    from iepkt_tf.kld import kld_loss
    from iepkt_tf.mpnn import MPNN, message_l1

    rows = []
    for m in _modules(fix, "/train/R"):
        pre = _mpnn_prefix(int(m[1:]))
        t_b, t_f = fix[f"{m}/in/T_B"], fix[f"{m}/in/T_F"]
        d = int(fix[f"{m}/D"])
        num_iter = fix[f"{m}/train/M"].shape[-1] // d
        net = MPNN(d, num_iter=num_iter)
        net.build(t_b.shape, t_f.shape)
        variables = net.tf1_variables()
        _assign(variables, fix, pre)
        # The step: inference reuse calls and the training call all read the stored state.
        r_t, m_t, e0_t = net(t_b, t_f, training=False)
        r_s, m_s, e0_s = net(fix[f"{m}/in/S_B"], fix[f"{m}/in/S_F"], training=False)
        r, msg, e0 = net(t_b, t_f, training=True)
        for key, val in (("train/R", r), ("train/M", msg), ("train/E0", e0),
                         ("infer_T/R", r_t), ("infer_T/M", m_t), ("infer_T/E0", e0_t),
                         ("infer_S/R", r_s), ("infer_S/M", m_s), ("infer_S/E0", e0_s)):
            if f"{m}/{key}" in fix:
                rows.append(fix.row(f"{m}/{key}", val, FWD_TOL))
        rows.append(fix.row(f"{m}/train_kld", kld_loss(fix[f"{m}/train_kld_target_G"], r), FWD_TOL))
        rows.append(fix.row(f"{m}/graph_kld", kld_loss(r_t, r_s), FWD_TOL))
        rows.append(fix.row(f"{m}/msg_l1", message_l1(m_s, m_t), FWD_TOL))
        for name in sorted(k for k in variables if "moving_" in k):
            rows.append(fix.row(f"after_update/{pre}{name}", variables[name], STATE_TOL))
    return rows


def check_mhgd(fix):
    import tensorflow as tf
    from iepkt_tf.attention_heads import AttentionHeads, Estimator, drop_head, est_loss, k_bb_term

    rows = []
    for m in _modules(fix, "/heads_train_T"):
        pre = _mha_prefix(int(m[1:]))
        t_b, t_f = fix[f"{m}/in/T_B"], fix[f"{m}/in/T_F"]
        noise = fix[f"{m}/noise"]
        n_learned = fix[f"{m}/heads_train_T"].shape[0]
        att = AttentionHeads((t_f.shape[-1] + t_b.shape[-1]) // 2, n_learned)
        att.build(t_b.shape, t_f.shape)
        est = Estimator(t_b.shape[-1], noise.shape[0])
        est.build(t_f.shape)
        variables = {**att.tf1_variables(), **est.tf1_variables()}
        _assign(variables, fix, pre)
        m_t_infer = fix[f"{m}/in/M_T_infer"]
        num_iter = m_t_infer.shape[-1] // t_b.shape[-1]
        extrinsic = tf.reduce_mean(m_t_infer, -1) * num_iter        # Distillation.py line 69
        rows.append(fix.row(f"{m}/in/extrinsic", extrinsic, FWD_TOL))
        h_t = att(t_b, t_f, training=False)
        h_s = att(fix[f"{m}/in/S_B"], fix[f"{m}/in/S_F"], training=False)
        heads = att(t_b, t_f, training=True)
        out = est(t_f, heads, fix[f"{m}/in/extrinsic"], noise, training=True)
        rows.append(fix.row(f"{m}/heads_train_T", heads, FWD_TOL))
        rows.append(fix.row(f"{m}/heads_infer_T", h_t, FWD_TOL))
        rows.append(fix.row(f"{m}/heads_infer_S", h_s, FWD_TOL))
        keep = drop_head(tf.ones(noise.shape), noise).numpy() > 0
        rows.append(fix.row_equal(f"{m}/drop_mask", keep))
        rows.append(fix.row(f"{m}/est_G_dropped", drop_head(fix[f"{m}/est_G_in"], noise), FWD_TOL))
        rows.append(fix.row(f"{m}/est_out", out, FWD_TOL))
        rows.append(fix.row(f"{m}/est_loss", est_loss(t_b, out), FWD_TOL))
        rows.append(fix.row(f"{m}/att_kld", k_bb_term(h_s, h_t), FWD_TOL))
        for name in sorted(k for k in variables if "moving_" in k):
            rows.append(fix.row(f"after_update/{pre}{name}", variables[name], STATE_TOL))
    return rows


# ---------------------------------------------------------------------------------------------- c
def _points(fix, step_prefix):
    pts = sorted(int(k[len(step_prefix) + len("in/teacher"):])
                 for k in fix.keys(prefix=step_prefix + "in/teacher"))
    if not pts:
        raise FixtureError(f"{fix.path}: no '{step_prefix}in/teacher<k>' keys")
    return pts


def _ipca_prefix(k):
    return f"Distillation/EKI/Stacked_PCA{k}/Teacher_PCA/PCA_Graph/Incremental_PCA/"


def check_stacked_pca(fix):
    import tensorflow as tf
    from iepkt_tf.incremental_pca import IncrementalPCA, cosine_graph
    from iepkt_tf.plane_mapping import plane_mapping
    from iepkt_tf.stacked_pca import first_pca, project_student, sign_of, svd_eid

    steps = sorted({k.split("/")[0] for k in fix.keys(prefix="t") if k.split("/")[0][1:].isdigit()},
                   key=lambda t: int(t[1:]))
    if not steps:
        raise FixtureError(f"{fix.path}: no 't<step>/...' keys")
    points = _points(fix, f"{steps[0]}/")
    ipcas = {}
    for k in points:
        c = fix[f"{steps[0]}/in/teacher{k}"].shape[-1]
        ipcas[k] = IncrementalPCA(c)
        # Bare assignment (not set_state): the stored zero state means "no update yet".
        _assign(ipcas[k].tf1_variables(), fix, _ipca_prefix(k))
    rows = []
    for t in steps:
        # What reads the incremental-PCA state is, after the first update, as exact as the state.
        dep_tol = FWD_TOL if t == steps[0] else STATE_TOL
        for k in points:
            p, ipca = f"{t}/p{k}/", ipcas[k]
            teacher = fix[f"{t}/in/teacher{k}"]
            s_raw, u_raw, v_raw = svd_eid(teacher, 1)
            sign = _sample_sign(v_raw, fix[p + "V_T_raw"])
            rows.append(fix.row(p + "svd_s", s_raw, FWD_TOL))
            rows.append(fix.row(p + "U_T_raw", u_raw.numpy() * sign, FWD_TOL))
            rows.append(fix.row(p + "V_T_raw", v_raw.numpy() * sign, FWD_TOL))
            u_t, v_t = first_pca(teacher)
            # The convention's sign for the reference's raw vector: ours times the alignment.
            rows.append(fix.row_equal(p + "sign", sign_of(v_raw, axis=1).numpy() * sign))
            rows.append(fix.row(p + "U_T", u_t, FWD_TOL))
            rows.append(fix.row(p + "V_T", v_t, FWD_TOL))
            t_plane = plane_mapping(v_t[:, :, 0])
            rows.append(fix.row(p + "T_plane", t_plane, FWD_TOL))
            for name, var in ipca.tf1_variables().items():
                rows.append(fix.row(p + f"state_before/{name}", var, STATE_TOL))
            rows.append(fix.row_equal(p + "ipca_init", not bool(ipca.is_initialized())))
            rows.append(fix.row(p + "ipca_batch_mean",
                                tf.reduce_mean(t_plane, 0, keepdims=True), FWD_TOL))
            proj, mean, basis = ipca(t_plane)
            rows.append(fix.row(p + "P", proj, dep_tol))
            rows.append(fix.row(p + "G", cosine_graph(proj), dep_tol))
            rows.append(fix.row(p + "mean", mean, STATE_TOL))
            rows.append(fix.row(p + "V", basis, STATE_TOL))
            v_s = project_student(fix[f"{t}/in/student{k}"], u_t)
            s_plane = plane_mapping(v_s[:, :, 0])
            rows.append(fix.row(p + "V_S", v_s, FWD_TOL))
            rows.append(fix.row(p + "S_plane", s_plane, FWD_TOL))
            rows.append(fix.row(p + "S_proj", ipca(s_plane)[0], dep_tol))
            # The step's update, from what the forward pass saw.
            new = ipca.compute_update(t_plane)
            for name in ("M", "S", "V"):
                rows.append(fix.row(p + f"state_after/{name}", new[name], STATE_TOL))
            ipca.assign_state(new)
    rows += _eki_replay(fix, steps, points)
    return rows


# ---------------------------------------------------------------------------------------------- g
AUTHORS_NUM_ITER = 2   # Distillation.py line 57; used only when a file does not imply another


def _noise(fix, prefix):
    """The stored drop-head noise ``<prefix>noise_module<i>`` in module order."""
    keys = fix.keys(prefix=f"{prefix}noise_module")
    return [fix[k] for k in sorted(keys, key=lambda k: int(k.rsplit("noise_module", 1)[1]))]


def _distiller(fix, prefix, num_iter):
    """An IEPDistiller sized from the file's inputs under ``prefix`` (``in/`` or ``t0/in/``),
    with every stored ``Distillation/...`` variable loaded."""
    from iepkt_tf.iep import IEPDistiller

    points = _points(fix, prefix[:-len("in/")])
    t_chans = [fix[f"{prefix}teacher{k}"].shape[-1] for k in points]
    s_chans = [fix[f"{prefix}student{k}"].shape[-1] for k in points]
    noise = _noise(fix, prefix)
    if len(noise) != len(points) - 1:
        raise FixtureError(f"{fix.path}: expected {len(points) - 1} '{prefix}noise_module<i>' keys, "
                           f"found {len(noise)}")
    dist = IEPDistiller(t_chans, s_chans, mpnn_iter=num_iter, num_head=noise[0].shape[0])
    names = dist.tf1_variables()
    stored = fix.meta.get("variables")
    if isinstance(stored, list) and sorted(stored) != sorted(names):
        raise FixtureError(f"{fix.path}: __meta__['variables'] lists {len(stored)} variables, the "
                           f"distiller built from the file's inputs has {len(names)} (first difference: "
                           f"{sorted(set(stored) ^ set(names))[:1]})")
    dist.load_tf1_variables({n: fix[n] for n in names})
    return dist, points, noise


def _eki_step(fix, dist, points, noise, prefix, out_prefix, grads=False, fwd_tol=FWD_TOL):
    """One EKI step as the fixtures define it: the distillation forward and the module forward
    read the stored state, then the module step's updates are written. Returns rows."""
    import tensorflow as tf

    students = [tf.constant(fix[f"{prefix}student{k}"]) for k in points]
    teachers = [tf.constant(fix[f"{prefix}teacher{k}"]) for k in points]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(students)
        d = dist.distill_losses(students, teachers, details=True)
    trainable = {}
    if grads:
        names = dist.tf1_variables()
        for key in fix.keys(prefix="grad/MHA_loss_sum/"):
            name = key[len("grad/MHA_loss_sum/"):]
            if name not in names:
                raise FixtureError(f"{fix.path}: {key} names no variable of the distiller")
            trainable[name] = names[name]
    with tf.GradientTape() as mtape:
        m = dist.module_losses(teachers, noise=noise, training=True, update_state=True, details=True)

    rows = []
    dist_terms = [d["k_alt"], d["k_int"], d["k_bb"]]   # the `dist` collection order (README, g)
    rows.append(fix.row(f"{out_prefix}dist", tf.stack(dist_terms), fwd_tol))
    rows.append(fix.row(f"{out_prefix}MHA_loss", m["mha_loss"], fwd_tol))
    if f"{out_prefix}MHA_loss_sum" in fix:
        rows.append(fix.row(f"{out_prefix}MHA_loss_sum", m["total"], fwd_tol))
    terms = dict(d["terms"])
    for i in range(1, len(points)):
        terms[f"module{i}/mpnn_train_kld"] = m["mpnn_kld"][i - 1]
        terms[f"module{i}/est_loss"] = m["est_loss"][i - 1]
    mid = {**m["mid"], **d["mid"]}
    # The per-module terms of one module form one array (README: tolerances per array): a small
    # KL sum alone carries float32 summation noise far above 1e-4 of itself (case1's stored
    # att_kld of module 1 is 7e-4 away from the float64 KL of its own stored heads).
    for i in range(1, len(points)):
        keys = fix.keys(prefix=f"{out_prefix}terms/module{i}/")
        scale = max([float(np.max(np.abs(fix[k]))) for k in keys] + [0.0])
        for key in keys:
            name = key[len(f"{out_prefix}terms/"):]
            rows.append(compare(f"{fix.stem}:{key}", terms[name], fix[key], fwd_tol, scale=scale)
                        if name in terms else
                        Row(f"{fix.stem}:{key}", np.inf, np.inf, fwd_tol, "rel", False, "not produced"))
    for key in fix.keys(prefix="mid/") if out_prefix == "out/" else []:
        name = key[len("mid/"):]
        rows.append(fix.row(key, mid[name], fwd_tol) if name in mid else
                    Row(f"{fix.stem}:{key}", np.inf, np.inf, fwd_tol, "rel", False, "not produced"))
    if grads:
        for j, loss in enumerate(dist_terms):
            keys = [f"grad/dist{j}/student{k}" for k in points]
            if not all(k in fix for k in keys):
                continue
            for key, g, x in zip(keys, tape.gradient(loss, students), students):
                rows.append(fix.row(key, np.zeros(x.shape) if g is None else g, GRAD_TOL))
        zero = set(fix.meta.get("grad_zero_in_exact_arithmetic", []))
        none = set(fix.meta.get("grad_none", []))
        g_mod = mtape.gradient(m["total"], list(trainable.values()))
        for (name, var), g in zip(trainable.items(), g_mod):
            key = f"grad/MHA_loss_sum/{name}"
            g = np.zeros(var.shape) if g is None else g
            if key in zero or key in none:
                rows.append(fix.row(key, g, ZERO_GRAD_ABS_TOL, mode="abs"))
            else:
                rows.append(fix.row(key, g, GRAD_TOL))
    del tape
    names = dist.tf1_variables()
    for key in fix.keys(prefix=f"{out_prefix}after_update/"):
        name = key[len(f"{out_prefix}after_update/"):]
        if name not in names:
            raise FixtureError(f"{fix.path}: {key} names no variable of the distiller")
        rows.append(fix.row(key, names[name], STATE_TOL))
    return rows


def _eki_replay(fix, steps, points):
    """``c``: the whole EKI replayed from the stored pre-``t0`` state over every step."""
    num_iter = int(fix.meta.get("num_iter", AUTHORS_NUM_ITER))
    dist, _, _ = _distiller(fix, f"{steps[0]}/in/", num_iter)
    rows = []
    for t in steps:  # after the first step every value reads an updated state
        rows += _eki_step(fix, dist, points, _noise(fix, f"{t}/in/"), f"{t}/in/", f"{t}/",
                          fwd_tol=FWD_TOL if t == steps[0] else STATE_TOL)
    return rows


def check_eki(fix):
    m_keys = fix.keys(prefix="mid/m1/mpnn_infer_T/M")
    if m_keys and "in/teacher1" in fix:
        num_iter = fix[m_keys[0]].shape[-1] // (fix["in/teacher1"].shape[-1] // 2)
    else:
        num_iter = int(fix.meta.get("num_iter", AUTHORS_NUM_ITER))
    dist, points, noise = _distiller(fix, "in/", num_iter)
    return _eki_step(fix, dist, points, noise, "in/", "out/", grads=True)


# ---------------------------------------------------------------------------------------------- h
def _arch(fix, key):
    spec = str(fix.meta_get(key))
    try:
        depth, width = (int(v) for v in spec.split("x"))
    except ValueError:
        raise FixtureError(f"{fix.path}: __meta__[{key!r}] must be '<depth>x<width>', got {spec!r}") from None
    return depth, width


def _mat_path(fix):
    argv = fix.meta.get("argv", [])
    if "--mat-out" in argv and argv.index("--mat-out") + 1 < len(argv):
        return fix.path.parent / pathlib.Path(argv[argv.index("--mat-out") + 1]).name
    return None


def check_wresnet(fix):
    import tensorflow as tf
    from iepkt_tf.mat_io import ParamsMismatchError, assign_params, check_finite, load_mat
    from nets.nets_factory import keep_rate_for
    from nets.wresnet import WResNet

    image, label = fix["image"], fix["label"]
    classes = int(fix.meta_get("classes"))
    hw = image.shape[1:3]

    def build(scope, key, is_main):
        depth, width = _arch(fix, key)
        net = WResNet(depth, width, classes, scope=scope, keep_rate=keep_rate_for(hw, is_main))
        net.build_for(hw)
        return net

    def load(net, arrays, what):
        try:
            assign_params(net.tf1_variables(), arrays, scope=net.scope, what=what)
        except ParamsMismatchError as e:
            raise FixtureError(" ".join(str(e).split())) from None

    student = build("Student", "student", True)
    teacher = build("Teacher", "teacher", False)
    load(student, {k: fix[k] for k in fix.keys(prefix="Student/")}, str(fix.path))
    load(teacher, {k: fix[k] for k in fix.keys(prefix="Teacher/")}, str(fix.path))

    def losses(logits):
        onehot = tf.one_hot(label, classes)
        loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(onehot, logits))
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), label),
                                     tf.float32))
        return loss, acc

    rows = []
    logits, feats = student(image, training=False)
    t_logits, t_feats = teacher(image, training=False)
    rows.append(fix.row("out/infer/logits", logits, FWD_TOL))
    rows.append(fix.row("out/teacher/logits", t_logits, FWD_TOL))
    loss, acc = losses(logits)
    rows.append(fix.row("out/infer/class_loss", loss, FWD_TOL))
    rows.append(fix.row("out/infer/accuracy", acc, FWD_TOL))
    for j, f in enumerate(list(feats) + list(t_feats)):
        if f"out/infer/feat{j}" in fix:
            rows.append(fix.row(f"out/infer/feat{j}", f, FWD_TOL))

    mat = _mat_path(fix)
    if mat is not None:
        try:
            arrays = load_mat(mat, what=f"{fix.path} companion")
            check_finite(arrays, "Student", what=f"{fix.path} companion {mat}")
        except (OSError, ValueError) as e:
            raise FixtureError(" ".join(str(e).split())) from None
        twin = build("Student", "student", True)
        load(twin, arrays, str(mat))
        rows.append(compare(f"{mat.stem}:out/infer/logits", twin(image, training=False)[0],
                            fix["out/infer/logits"], FWD_TOL))

    masks = {k[len("dropout_mask/"):]: fix[k] for k in fix.keys(prefix="dropout_mask/")}
    logits, feats = student(image, training=True, dropout_masks=masks)
    rows.append(fix.row("out/train/logits", logits, FWD_TOL))
    loss, acc = losses(logits)
    rows.append(fix.row("out/train/class_loss", loss, FWD_TOL))
    rows.append(fix.row("out/train/accuracy", acc, FWD_TOL))
    for j, f in enumerate(feats):
        if f"out/train/feat{j}" in fix:
            rows.append(fix.row(f"out/train/feat{j}", f, FWD_TOL))
    variables = student.tf1_variables()
    for key in fix.keys(prefix="after_train_update/"):
        name = key[len("after_train_update/"):]
        if name not in variables:
            raise FixtureError(f"{fix.path}: {key} names no variable of the student")
        rows.append(fix.row(key, variables[name], STATE_TOL))
    return rows


def check_baselines(fix):
    """``i_``: the baselines against the authors' TF2/TF1 code (:mod:`iepkt_tf.parity_baselines`;
    imported here, not at the top, because that module builds on this one's Fixture rows)."""
    from iepkt_tf.parity_baselines import check_baselines as check

    return check(fix)


CHECKS = {"svd": check_svd, "plane": check_plane, "pca": check_stacked_pca, "mpnn": check_mpnn,
          "mhgd": check_mhgd, "kld": check_kld, "eki": check_eki, "wresnet": check_wresnet,
          "baselines": check_baselines}


def kind_of(path):
    """The fixture kind from the file name prefix (``a_`` ... ``h_``)."""
    name = pathlib.Path(path).name
    prefix = name.split("_", 1)[0]
    if "_" not in name or prefix not in KINDS:
        raise FixtureError(f"{path}: unknown fixture name (expected a prefix among "
                           f"{', '.join(p + '_' for p in sorted(KINDS))})")
    return KINDS[prefix]


def run_file(path, manifest=None):
    """Rows for one fixture file; FixtureError if it is unreadable or not in the documented format.
    ``manifest``: the file's entry of ``manifest.json`` (keys, shapes, dtypes), checked if given."""
    import tensorflow as tf

    kind = kind_of(path)
    fix = Fixture(path, manifest)
    if fix.meta.get("kind", kind) != kind:
        raise FixtureError(f"{path}: name says kind {kind!r} but __meta__ says {fix.meta.get('kind')!r}")
    try:
        return CHECKS[kind](fix)
    except FixtureError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, tf.errors.OpError) as e:
        # Arrays of shapes or types the check cannot use (the message says which operation).
        reason = e.message if isinstance(e, tf.errors.OpError) else str(e)
        raise FixtureError(f"{path}: cannot run the {kind!r} check ({type(e).__name__}: "
                           f"{' '.join(reason.split())[:300]})") from None


def fixture_files(directory):
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        why = "it is a file" if directory.exists() else "no such path"
        raise FixtureError(f"--fixtures {directory}: not a directory ({why}); expected a directory "
                           f"of fixture files (*.npz)")
    files = sorted(directory.glob("*.npz"))
    if not files:
        raise FixtureError(f"--fixtures {directory}: no fixture files (*.npz)")
    return files


def read_manifest(directory):
    """``manifest.json`` of ``directory`` (``{file name: {"keys": {key: [shape, dtype]}}}``), or
    None without one; FixtureError if it is damaged."""
    path = pathlib.Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # Unicode/JSONDecodeError: ValueErrors
        raise FixtureError(f"{path}: not a readable JSON manifest ({' '.join(str(e).split())})") from None
    if not isinstance(manifest, dict):
        raise FixtureError(f"{path}: expected a JSON object {{file name: entry}}, got "
                           f"{type(manifest).__name__}")
    return manifest


def run_parity(directory, errors=None):
    """Rows for every fixture in ``directory``. An unreadable fixture raises FixtureError, or, if
    ``errors`` is a list, is appended to it as a one-line message and skipped."""
    rows = []
    files = fixture_files(directory)
    manifest = read_manifest(directory) or {}
    for path in files:
        try:
            rows += run_file(path, manifest.get(path.name))
        except FixtureError as e:
            if errors is None:
                raise
            errors.append(str(e))
    return rows


def define_flags(fv):
    """The parity flags on ``fv`` (absl FlagValues)."""
    flags.DEFINE_string("fixtures", None, "Directory of fixture files in the format of "
                        "tests/fixtures/README.md.", flag_values=fv)
    flags.DEFINE_bool("failures_only", False, "Print only the failing rows.", flag_values=fv)
    flags.mark_flag_as_required("fixtures", flag_values=fv)


def report(fv):
    """Print the rows of ``--fixtures`` and the final line; returns the exit status."""
    errors = []
    rows = run_parity(fv.fixtures, errors)
    width = max([len(r.name) for r in rows] + [8])
    print(f"{'quantity':<{width}} {'max abs':>10} {'max rel':>10} {'tol':>9} status")
    for r in rows:
        if not (fv.failures_only and r.passed):
            print(r.format(width))
    for e in errors:
        print(f"parity: error: {e}", file=sys.stderr)
    failed = sum(not r.passed for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    if errors:
        return 2
    return 1 if failed else 0


def main(argv=None):
    """``argv`` (flags only; default ``sys.argv[1:]``) -> exit status (module docstring)."""
    return tool_main("parity", argv, define_flags, __doc__, report, (FixtureError,), status=True)


if __name__ == "__main__":
    from iepkt_tf.quiet import import_tensorflow

    import_tensorflow()  # TensorFlow's C++ start-up lines only with --verbosity
    sys.exit(main())
