"""Parity of the seven baselines of Table 1 (and KD) with the authors' own code, number for number.

A fixture ``i_baselines_<name>.npz`` (kind ``baselines``) holds one *case* of the kdparity harness
(the authors' code run on fixed random inputs, ``tests/fixtures/README.md``, "i_baselines"):

* ``in/<key>``: the inputs both sides share: each network's pre-ReLU BN outputs at the four
  sensing points (``t_pre<k>``, ``s_pre<k>``; the post-ReLU maps are their ReLU) with the BN's
  ``gamma``/``beta``, the logits and labels, and every parameter a method owns (``con<k>/...``
  connectors of AT/AB/CO, ``ft/...`` paraphraser and translator, ``mhgd/...`` heads, estimators
  and drop-head noise); widths, batch and classes are read from these arrays;
* ``tf2/<method>/...``: what sseung0703/Knowledge_distillation_via_TF2.0 computed (``distiller/
  Soft_logits, AT, FT, AB, RKD, CO``, FT as its code runs, AB's and FT's initial-phase closures);
* ``tf1/<method>/...``: what sseung0703/KD_methods_with_TF computed (``MHGD``, ``Attention_transfer``,
  ``RKD`` on pooled maps, ``Soft_logits``); MHGD and the paper form of AT need equal widths.

:func:`check_baselines` builds each method through ``iepkt_tf.distillers.build`` over stand-in
networks that report the file's widths, assigns the file's parameters, and compares what the train
step would differentiate (``main_losses``/``init_losses``) and its gradients with the authors'.
Tolerances: losses ``LOSS_TOL`` relative; gradients and intermediate values ``GRAD_TOL`` of the
reference's largest magnitude (a tensor whose gradient vanishes analytically, MHGD's ``Rbn/beta``,
against its group's); RKD's loss ``RKD_LOSS_TOL`` (the authors expand ``|x|^2 + |y|^2 - 2 x.y``, whose
float32 cancellation leaves their diagonal distances at up to ``3e-4`` instead of ``1e-6``); AB's
loss as the authors' closure printed it to 4 decimals, absolute ``PRINTED_TOL``
(half the last digit).
"""
from __future__ import annotations

import json
import pathlib
import sys
import types

import numpy as np
from absl import flags

from iepkt_tf.atomic import atomic_open
from iepkt_tf.cli import tool_main
from iepkt_tf.parity import FixtureError, Row, compare

LOSS_TOL = 1e-5
RKD_LOSS_TOL = 1e-4
GRAD_TOL = 1e-3
PRINTED_TOL = 5e-5 + 1e-6  # half the last printed digit, plus float32 rounding
POINTS = (1, 2, 3)
TINY = 1e-6  # a tensor below TINY x its group's scale is compared against the group's scale


class _StandIn:
    """What a method's ``__init__`` reads from a network: widths, map shapes, classes and (CO) the
    sensing BNs' parameters."""

    def __init__(self, fix, side):
        import tensorflow as tf

        self.feature_channels = [int(fix[f"in/{side}_pre{k}"].shape[-1]) for k in range(4)]
        self._shapes = [tuple(int(d) for d in fix[f"in/{side}_pre{k}"].shape[1:]) for k in range(4)]
        self.num_classes = int(fix["in/t_logits"].shape[-1])
        self._bns = [types.SimpleNamespace(gamma=tf.Variable(fix[f"in/{side}_gamma{k}"]),
                                           beta=tf.Variable(fix[f"in/{side}_beta{k}"]))
                     for k in range(4)]

    def feature_shapes(self, image_size):
        return list(self._shapes)

    def sensing_bns(self):
        return list(self._bns)


class _Case:
    """The inputs of one fixture as the train step hands them to a method."""

    def __init__(self, fix):
        import tensorflow as tf
        from iepkt_tf.distillers.base import Sensed

        self.fix, self.tf = fix, tf
        self.equal = all(fix[f"in/s_pre{k}"].shape == fix[f"in/t_pre{k}"].shape for k in range(4))
        self.image_size = tuple(int(d) for d in fix["in/s_pre0"].shape[1:3])
        pre = [tf.Variable(fix[f"in/s_pre{k}"]) for k in range(4)]
        post = [tf.Variable(np.maximum(fix[f"in/s_pre{k}"], 0)) for k in range(4)]
        self.student = Sensed(tf.Variable(fix["in/s_logits"]), post, pre)
        self.teacher = Sensed(tf.constant(fix["in/t_logits"]),
                              [tf.constant(np.maximum(fix[f"in/t_pre{k}"], 0)) for k in range(4)],
                              [tf.constant(fix[f"in/t_pre{k}"]) for k in range(4)])
        self.labels = tf.constant(fix["in/labels"])
        self.seed = tf.constant([0, 0], tf.int64)

    def build(self, name, **options):
        from iepkt_tf.distillers import build

        return build(name, _StandIn(self.fix, "s"), _StandIn(self.fix, "t"),
                     image_size=self.image_size, **options)

    def grads(self, fn, targets):
        """``(value, {name: gradient})`` of ``fn()`` (a scalar) for ``{name: variable}``."""
        tf = self.tf
        names = list(targets)
        with tf.GradientTape() as tape:
            value = fn()
        grads = tape.gradient(value, [targets[n] for n in names])
        return float(value), {n: (None if g is None else g.numpy()) for n, g in zip(names, grads)}


def _total(terms):
    import tensorflow as tf
    return tf.add_n([tf.cast(v, tf.float32) for v in terms.values()])


def _assign(var, arr, fix, key):
    arr = np.asarray(arr)
    if arr.size != int(np.prod(var.shape)):
        raise FixtureError(f"{fix.path}: {key} has shape {arr.shape}, the method built from the "
                           f"file's widths expects {tuple(var.shape)}")
    var.assign(arr.reshape(var.shape))


def _set_connectors(fix, convs, bns):
    for k, conv, bn in zip(POINTS, convs, bns):
        _assign(conv.kernel, fix[f"in/con{k}/kernel"], fix, f"in/con{k}/kernel")
        _assign(bn.gamma, fix[f"in/con{k}/bn/gamma"], fix, f"in/con{k}/bn/gamma")
        _assign(bn.beta, fix[f"in/con{k}/bn/beta"], fix, f"in/con{k}/bn/beta")


def _connector_targets(maps, convs, bns):
    out = {f"s{k}": maps[k] for k in POINTS}
    for k, conv, bn in zip(POINTS, convs, bns):
        out.update({f"con{k}/kernel": conv.kernel, f"con{k}/bn/gamma": bn.gamma,
                    f"con{k}/bn/beta": bn.beta})
    return out


def _rows(fix, ref_prefix, value, grads, loss_tol=LOSS_TOL, loss_key="loss"):
    """Rows for a loss and its gradients against ``ref_prefix + loss`` / ``grad_<name>``."""
    rows = [compare(f"{fix.stem}:{ref_prefix}{loss_key}", value, fix[ref_prefix + loss_key], loss_tol)]
    for name, g in grads.items():
        key = f"{ref_prefix}grad_{name}"
        if key in fix:
            rows.append(compare(f"{fix.stem}:{key}", _present(g, fix[key]),
                                fix[key].reshape(np.shape(_present(g, fix[key]))), GRAD_TOL))
    return rows


def _present(g, ref):
    return np.zeros(np.shape(ref)) if g is None else np.asarray(g)


# ----------------------------------------------------------------------------- the methods

def _kd(case):
    fix, s, t = case.fix, case.student, case.teacher
    rows = []
    if "tf2/KD/loss" in fix:  # Soft_logits.py: (CE + KL_T5) / 2, no T^2 (CE part 0 here)
        m = case.build("KD", kd_temperature=5.0, kd_weight=0.5, kd_t_squared=False)
        value, g = case.grads(lambda: _total(m.main_losses(s, t, case.labels, case.seed)),
                              {"logits": s.logits})
        rows += _rows(fix, "tf2/KD/", value, g)
        rows.append(compare(f"{fix.stem}:tf2/KD/ce_weight", m.ce_weight, 0.5, 0.0))
    if "tf1/KD_tf1/loss" in fix:  # Response.Soft_logits(T=4): KL_T4, weighted 0.3 by op_util
        m = case.build("KD", kd_temperature=4.0, kd_weight=0.3, kd_t_squared=False)
        value, g = case.grads(lambda: _total(m.main_losses(s, t, case.labels, case.seed)) / 0.3,
                              {"logits": s.logits})
        rows += _rows(fix, "tf1/KD_tf1/", value, g)
    return rows


def _at(case):
    fix, s, t = case.fix, case.student, case.teacher
    rows = []
    if "tf2/AT/loss" in fix:
        m = case.build("AT")
        _set_connectors(fix, m.convs, m.conv_bns)
        value, g = case.grads(lambda: _total(m.main_losses(s, t, None, case.seed)),
                              _connector_targets(s.pre_feats, m.convs, m.conv_bns))
        rows += _rows(fix, "tf2/AT/", value, g)
    if "tf1/AT_tf1/loss" in fix:
        m = case.build("AT", at_form="paper")
        value, g = case.grads(lambda: _total(m.main_losses(s, t, None, case.seed)),
                              {f"s{k}": s.feats[k] for k in POINTS})
        rows += _rows(fix, "tf1/AT_tf1/", value, g)
    return rows


def _ab(case):
    fix, s, t = case.fix, case.student, case.teacher
    if "tf2/AB/loss" not in fix:
        return []
    m = case.build("AB")
    _set_connectors(fix, m.convs, m.bns)
    terms = {}

    def loss():
        out = m.init_losses(s, t, case.seed)
        terms.update(out)
        return out["total"]
    value, g = case.grads(loss, _connector_targets(s.pre_feats, m.convs, m.bns))
    rows = _rows(fix, "tf2/AB/", value, g)
    for i, k in enumerate(POINTS):  # the authors' term{k} before the point weight 2^(k-n+1)
        rows.append(compare(f"{fix.stem}:tf2/AB/term{k}", float(terms[f"ab{k}"]) / m.point_weights[i],
                            fix[f"tf2/AB/term{k}"], LOSS_TOL))
    if "tf2/AB/closure_loss_printed" in fix:  # the authors' initialize_student step itself
        rows.append(compare(f"{fix.stem}:tf2/AB/closure_loss_printed", value,
                            fix["tf2/AB/closure_loss_printed"], PRINTED_TOL, mode="abs"))
        for k in POINTS:
            key = f"tf2/AB/closure_grad_s{k}"
            rows.append(compare(f"{fix.stem}:{key}", g[f"s{k}"], fix[key], GRAD_TOL))
    return rows


def _co(case):
    fix, s, t = case.fix, case.student, case.teacher
    if "tf2/CO/loss" not in fix:
        return []
    m = case.build("CO")
    _set_connectors(fix, m.convs, m.conv_bns)
    rows = [compare(f"{fix.stem}:tf2/CO/margin{k}", mg, fix[f"tf2/CO/margin{k}"], GRAD_TOL)
            for k, mg in zip(POINTS, m.margins())]
    value, g = case.grads(lambda: _total(m.main_losses(s, t, None, case.seed)),
                          _connector_targets(s.pre_feats, m.convs, m.conv_bns))
    return rows + _rows(fix, "tf2/CO/", value, g)


def _rkd(case):
    tf = case.tf
    from iepkt_tf.distillers.base import Sensed

    fix, s, t = case.fix, case.student, case.teacher
    rows = []
    if "tf2/RKD/loss" in fix:
        m = case.build("RKD")
        value, g = case.grads(lambda: _total(m.main_losses(s, t, None, case.seed)), {"logits": s.logits})
        rows += _rows(fix, "tf2/RKD/", value, g, loss_tol=RKD_LOSS_TOL)
    if "tf1/RKD_tf1/loss" in fix:  # Relation.RKD(fcs, fct, l=[25, 50]) on the pooled last maps
        pooled = tf.Variable(np.maximum(fix["in/s_pre3"], 0).mean(axis=(1, 2))[:, None, None, :])
        t_pooled = tf.constant(np.maximum(fix["in/t_pre3"], 0).mean(axis=(1, 2))[:, None, None, :])
        sp = Sensed(s.logits, [None, None, None, pooled])
        tp = Sensed(t.logits, [None, None, None, t_pooled])
        m = case.build("RKD", rkd_embedding="pooled", rkd_distance_weight=25.0, rkd_angle_weight=50.0)
        value, g = case.grads(lambda: _total(m.main_losses(sp, tp, None, case.seed)), {"pooled": pooled})
        rows += _rows(fix, "tf1/RKD_tf1/", value, {"pooled": g["pooled"][:, 0, 0, :]},
                      loss_tol=RKD_LOSS_TOL)
    return rows


def _set_bn(bn, fix, prefix):
    for leaf in ("gamma", "beta", "moving_mean", "moving_variance"):
        _assign(getattr(bn, leaf), fix[prefix + leaf], fix, prefix + leaf)


def _ft_paraphraser(m):
    """``{authors' name: variable}`` of the paraphraser (kdparity's ``enc/...``, ``dec/...``)."""
    out = {}
    for i in range(3):
        out[f"enc/conv{i}"] = m.encoder.convs[i].kernel
        out[f"enc/bn{i}/gamma"] = m.encoder.bns[i].gamma
        out[f"enc/bn{i}/beta"] = m.encoder.bns[i].beta
        out[f"dec/convt{i}"] = m.decoder.convts[i].kernel
    for i in range(2):
        out[f"dec/bnt{i}/gamma"] = m.decoder.bns[i].gamma
        out[f"dec/bnt{i}/beta"] = m.decoder.bns[i].beta
    if m.decoder.convts[2].bias is not None:
        out["dec/convt2_bias"] = m.decoder.convts[2].bias
    return out


def _ft(case):
    fix, s, t = case.fix, case.student, case.teacher
    ref = "tf2/FT/as_run/"
    if ref + "loss" not in fix:
        return []
    m = case.build("FT")  # the default form: the network the authors' code runs
    for i in range(3):
        _assign(m.encoder.convs[i].kernel, fix[f"in/ft/enc/conv{i}"], fix, f"in/ft/enc/conv{i}")
        _set_bn(m.encoder.bns[i], fix, f"in/ft/enc/bn{i}/")
        _assign(m.translator.convs[i].kernel, fix[f"in/ft/tr/conv{i}"], fix, f"in/ft/tr/conv{i}")
        _set_bn(m.translator.bns[i], fix, f"in/ft/tr/bn{i}/")
        _assign(m.decoder.convts[i].kernel, fix[f"in/ft/dec/convt{i}"], fix, f"in/ft/dec/convt{i}")
    for i in range(2):
        _set_bn(m.decoder.bns[i], fix, f"in/ft/dec/bnt{i}/")
    targets = {"s3": s.feats[3]}
    for i in range(3):
        targets[f"tr/conv{i}"] = m.translator.convs[i].kernel
        targets[f"tr/bn{i}/gamma"] = m.translator.bns[i].gamma
        targets[f"tr/bn{i}/beta"] = m.translator.bns[i].beta
    value, g = case.grads(lambda: _total(m.main_losses(s, t, None, case.seed)), targets)
    rows = _rows(fix, ref, value, g)
    if ref + "recon_loss" in fix:  # the authors' auxiliary_training step, recorded
        value, g = case.grads(lambda: m.init_losses(None, t, case.seed)["total"], _ft_paraphraser(m))
        rows.append(compare(f"{fix.stem}:{ref}recon_loss", value, fix[ref + "recon_loss"], LOSS_TOL))
        for name, grad in g.items():
            key = f"{ref}recon_grad_{name}"
            if key not in fix:  # a variable the authors' paraphraser does not have
                rows.append(Row(f"{fix.stem}:{key}", np.inf, np.inf, GRAD_TOL, "rel", False,
                                "not in the authors' network"))
                continue
            rows.append(compare(f"{fix.stem}:{key}", _present(grad, fix[key]).reshape(fix[key].shape),
                                fix[key], GRAD_TOL))
    return rows


def _mhgd(case):
    import iepkt_tf.distillers.mhgd as mhgd_module

    tf = case.tf
    fix, s, t = case.fix, case.student, case.teacher
    if not case.equal or "tf1/MHGD/loss" not in fix:
        return []
    m = case.build("MHGD")
    named = m.tf1_variables()
    for name, var in named.items():
        key = "in/mhgd/" + name.split("Distillation/MHGD/", 1)[1]
        _assign(var, fix[key], fix, key)
    noise = [tf.constant(fix[k]) for k in fix.keys(prefix="in/mhgd/noise")]
    # the authors' teacher embeddings (their SVD's sign is arbitrary) and drop-head noise, fed
    v_t = [tf.constant(fix[f"tf1/MHGD/V_T{k}"][:, :, 0]) for k in POINTS]
    ours = m.teacher_embeddings(t.feats)
    rows = []
    for k, a, b in zip(POINTS, ours, v_t):
        sign = np.sign(np.sum(a.numpy() * b.numpy(), axis=1, keepdims=True))
        rows.append(compare(f"{fix.stem}:tf1/MHGD/V_T{k}~sign",
                            a.numpy() * np.where(sign == 0, 1, sign), b.numpy(), GRAD_TOL))
    m.teacher_embeddings = lambda feats: list(v_t)
    original = mhgd_module.drop_head_noise
    mhgd_module.drop_head_noise = lambda *args: list(noise)
    try:
        value, g = case.grads(lambda: _total(m.main_losses(s, t, case.labels, case.seed)),
                              {f"s{k}": s.feats[k] for k in POINTS})
        rows += _rows(fix, "tf1/MHGD/", value, g)
        for k, v in zip(POINTS, m.student_embeddings(s.feats, v_t)):
            rows.append(compare(f"{fix.stem}:tf1/MHGD/V_S{k}", v, fix[f"tf1/MHGD/V_S{k}"][:, :, 0], GRAD_TOL))
        variables = {n: v for n, v in named.items() if f"tf1/MHGD/grad_mha/{n}" in fix}
        value, g = case.grads(lambda: m.init_losses(None, t, case.seed)["total"], variables)
    finally:
        mhgd_module.drop_head_noise = original
    rows.append(compare(f"{fix.stem}:tf1/MHGD/mha_loss", value, fix["tf1/MHGD/mha_loss"], LOSS_TOL))
    scale = max(float(np.max(np.abs(fix[f"tf1/MHGD/grad_mha/{n}"]))) for n in variables)
    for n in variables:
        ref = fix[f"tf1/MHGD/grad_mha/{n}"]
        small = float(np.max(np.abs(ref))) < TINY * scale
        rows.append(compare(f"{fix.stem}:tf1/MHGD/grad_mha/{n}", _present(g[n], ref), ref, GRAD_TOL,
                            scale=scale if small else None))
    return rows


METHOD_CHECKS = {"KD": _kd, "AT": _at, "FT": _ft, "AB": _ab, "RKD": _rkd, "MHGD": _mhgd, "CO": _co}


def check_baselines(fix):
    """Rows for every method whose reference outputs the fixture holds."""
    for k in range(4):
        for side in ("s", "t"):
            if fix[f"in/{side}_pre{k}"].ndim != 4:
                raise FixtureError(f"{fix.path}: in/{side}_pre{k} must be a [B, H, W, C] map")
    case = _Case(fix)
    rows = []
    for check in METHOD_CHECKS.values():
        rows += check(case)
    if not rows:
        raise FixtureError(f"{fix.path}: no tf2/... or tf1/... reference outputs")
    return rows


# ----------------------------------------------------------------------------- making fixtures

def make_fixture(case, tf2, tf1, meta):
    """The arrays of one ``i_baselines`` fixture from one kdparity case: ``in/`` the case,
    ``tf2/`` and ``tf1/`` every numeric output of the authors' two codes."""
    out = {"__meta__": np.array(json.dumps(dict(meta, kind="baselines"), sort_keys=True))}
    for prefix, arrays in (("in/", case), ("tf2/", tf2), ("tf1/", tf1)):
        for key, a in arrays.items():
            a = np.asarray(a)
            if a.dtype.kind in "biuf":
                out[prefix + key] = a
    return out


def make_fixtures(work, out_dir, names=None):
    """Write ``i_baselines_<name>.npz`` in ``out_dir`` for every ``case_<name>.npz`` of a kdparity
    ``--work`` directory with its ``tf2_<name>.npz`` and ``tf1_<name>.npz``; returns the paths."""
    work, out_dir = pathlib.Path(work), pathlib.Path(out_dir)
    cases = sorted(work.glob("case_*.npz"))
    if not cases:
        raise FixtureError(f"--kdparity_work {work}: no case_*.npz (run kdparity's run_all.py "
                           f"or its three sides first)")
    written = []
    for path in cases:
        name = path.stem[len("case_"):]
        if names and name not in names:
            continue
        sides = [work / f"{side}_{name}.npz" for side in ("tf2", "tf1")]
        missing = [str(p) for p in sides if not p.exists()]
        if missing:
            raise FixtureError(f"{path}: no {' or '.join(missing)} beside it")
        arrays = [dict(np.load(p, allow_pickle=False)) for p in [path] + sides]
        meta = {"case": name, "made_by": "kdparity (tf2_authors.py, tf1_authors.py) + "
                "python -m iepkt_tf.parity_baselines"}
        target = out_dir / f"i_baselines_{name}.npz"
        with atomic_open(target) as f:
            np.savez_compressed(f, **make_fixture(*arrays, meta))
        written.append(target)
    return written


def define_flags(fv):
    flags.DEFINE_string("kdparity_work", None, "A kdparity --work directory holding case_<name>.npz, "
                        "tf2_<name>.npz and tf1_<name>.npz.", flag_values=fv)
    flags.DEFINE_string("out", None, "Directory to write i_baselines_<name>.npz into.", flag_values=fv)
    flags.DEFINE_list("cases", [], "Only these case names (default: every case).", flag_values=fv)
    flags.mark_flag_as_required("kdparity_work", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)


def _run(fv):
    for path in make_fixtures(fv.kdparity_work, fv.out, fv.cases):
        print(path)


def main(argv=None):
    """``python -m iepkt_tf.parity_baselines --kdparity_work W --out DIR``: fixtures from kdparity."""
    return tool_main("parity_baselines", argv, define_flags, __doc__, _run, (FixtureError, OSError))


if __name__ == "__main__":
    sys.exit(main())
