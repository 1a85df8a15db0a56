"""See the embedding procedure: stacked-PCA maps, graphs and MPNN heat-maps per sensing point.

The paper's interpretability claim (and the authors' README GIFs of a WRN-40-4 on CIFAR-10): at the
first sensing point images cluster by colour and simple edges, in the middle they spread, at the end
they group by class; the MPNN's estimated affinity matrix and messages describe how one graph turns
into the next. For a fixed, seeded sample of images this module computes, per sensing point,

* the stacked-PCA embedding (EKI lines 35-43, with the second PCA fitted on the whole sample):
  first PCA per image (:func:`~iepkt_tf.stacked_pca.first_pca`, sign-fixed), plane mapping,
  then a batch PCA across the sample (:class:`~iepkt_tf.incremental_pca.BatchPCA`): ``P [N, C/2]``;
* its cosine graph ``G = cos(P_v, P_w)`` (``inter_cosine_sim``);
* with a teacher as well: the student is projected on the teacher's ``U_T`` and the teacher's
  PCA basis (EKI lines 45-51), so both live in the teacher's frame;
* with a distiller state (``Distillation/...`` variables, incl. the incremental-PCA ``M, S, V``):
  the MPNN read-out ``A^`` and the message magnitude ``sum_c |M_vw|`` in inference mode on the
  teacher's (and the student's) incremental-PCA projections, exactly the quantities behind K_int
  and K_alt (Distillation.py lines 61-66).

Panels (:mod:`iepkt_tf.render`): ``embedding`` (thumbnails at the first two components),
``teacher_embedding`` (with a teacher), ``graph`` (strongest edges of ``G``) and ``heatmaps``
(in this order: teacher graph, student graph, A^ teacher, |M| teacher, A^ student, |M_S - M_T|;
rows in class order, then by the first component). Whatever cannot be drawn is listed in
``Panels.notes`` and printed by the CLI, never skipped silently.

CLI::

  python -m iepkt_tf.visualize --params train_params.mat --out_dir vis/  [--teacher_params T.mat]
  python -m iepkt_tf.visualize --run_dir <train_dir> --out_dir vis/      (one frame per epoch + GIFs)

Every .mat input (all snapshots of ``--run_dir`` included) is read and checked (a readable .mat,
finite numbers, a network scope) before the first picture is written; a damaged or missing input,
a damaged dataset file or an unwritable ``--out_dir`` is one line ``visualize: error: ...`` on
stderr and exit status 2. (A snapshot whose arrays do not fit the network is found when its frame
is drawn; the frames before it are complete files.)

``--run_dir`` reads epoch snapshots ``params_epoch_XXX.mat`` (or ``epoch_XXX.mat``) from
``<run_dir>/vis/`` or ``<run_dir>/``: each holds the main network's TF1 variables (the authors'
``train_params.mat`` layout) and, for an IEP run, the ``Distillation/...`` variables. Frames keep a
fixed orientation: every component's sign follows the previous frame (same images), so the
animation does not flip.

From a training loop: ``panels = make_panels(images, labels, feats, teacher_feats, distiller)``,
then ``log_iep_images(writer, step, panels)``; ``log_hparams(train_dir, hparams)`` for the HParams
dashboard.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys

import numpy as np

from iepkt_tf import render

IEP_POINTS = (1, 2, 3)   # the authors sense feats[1:4] (WResNet.py lines 205-207)
SNAPSHOT_RE = re.compile(r"^(?:params_)?epoch_(\d+)\.mat$")
DEFAULT_METRICS = ("accuracy/validation", "accuracy/train", "loss/cross_entropy")


@dataclasses.dataclass
class Embedding:
    """Stacked-PCA embedding of one sensing point: ``P [N, D]``, graph ``G [N, N]``, and the
    teacher-frame pieces needed to project another network into it."""
    P: np.ndarray
    G: np.ndarray
    U: np.ndarray      # [N, HW, 1] first-PCA left vectors
    mean: np.ndarray   # [1, C]
    V: np.ndarray      # [C, D]


@dataclasses.dataclass
class Panels:
    """Rendered panels: ``images`` {tag: uint8 [H, W, 3]}, ``coords`` {key: [N, D] stacked-PCA
    coordinates} (keys ``point{k}`` and ``point{k}/teacher``), ``notes`` (what was skipped, why)."""
    images: dict
    coords: dict
    notes: list


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------

def _np(x):
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def stacked_pca_embedding(feat):
    """EKI Teacher_PCA on a whole sample: ``feat [N, H, W, C]`` -> :class:`Embedding`; the second
    PCA is a batch PCA of all N plane-mapped rows (mean and basis of this sample)."""
    import tensorflow as tf

    from iepkt_tf.incremental_pca import BatchPCA, cosine_graph
    from iepkt_tf.plane_mapping import plane_mapping
    from iepkt_tf.stacked_pca import first_pca

    feat = tf.cast(tf.convert_to_tensor(feat), tf.float32)
    if feat.shape.rank != 4 or feat.shape[0] is None or feat.shape[0] < 2:
        raise ValueError(f"feature map must be [N>=2, H, W, C], got {feat.shape}")
    u, v = first_pca(feat)
    plane = plane_mapping(v[:, :, 0])
    pca = BatchPCA(int(feat.shape[-1]))
    p, mean, basis = pca(plane)
    return Embedding(_np(p), _np(cosine_graph(p)), _np(u), _np(mean), _np(basis))


def project_embedding(feat, frame):
    """EKI Student_PCA: ``feat`` projected on ``frame.U`` (per image), plane-mapped and projected
    with ``frame.mean, frame.V`` -> :class:`Embedding` in the frame's coordinates."""
    import tensorflow as tf

    from iepkt_tf.incremental_pca import cosine_graph
    from iepkt_tf.plane_mapping import plane_mapping
    from iepkt_tf.stacked_pca import project_student

    v_s = project_student(tf.cast(tf.convert_to_tensor(feat), tf.float32), frame.U)
    p = tf.matmul(plane_mapping(v_s[:, :, 0]) - frame.mean, frame.V)
    return Embedding(_np(p), _np(cosine_graph(p)), frame.U, frame.mean, frame.V)


def orientation(p, reference):
    """Column signs (+1/-1) that make each column of ``p`` correlate non-negatively with the same
    column of ``reference`` (same images, e.g. the previous frame); ones without a reference."""
    p = np.asarray(p)
    if reference is None:
        return np.ones(p.shape[1])
    ref = np.asarray(reference)
    if ref.shape != p.shape:
        raise ValueError(f"reference coordinates must have shape {p.shape}, got {ref.shape}")
    dots = np.sum((p - p.mean(0)) * (ref - ref.mean(0)), axis=0)
    return np.where(dots < 0, -1.0, 1.0)


def distiller_views(distiller, teacher_feats, student_feats=None):
    """The MPNN's view of a sample (Distillation.py lines 36-66, inference mode, state frozen).

    ``teacher_feats`` / ``student_feats``: the maps at the distiller's points (feats[1:4]). Returns
    ``{i: {"A_T", "M_T"[, "A_S", "M_S"]}}`` per module ``i >= 1`` (points ``i-1 -> i``): the
    read-out ``A^ [N, N]`` and messages ``[N, N, iter*D]`` on the incremental-PCA projections.
    """
    import tensorflow as tf

    from iepkt_tf.plane_mapping import plane_mapping
    from iepkt_tf.stacked_pca import first_pca, project_student

    t_p, frames = [], []
    for k, f in enumerate(teacher_feats):
        u, v = first_pca(tf.cast(f, tf.float32))
        p, mean, basis = distiller.pcas[k](plane_mapping(v[:, :, 0]))
        t_p.append(p)
        frames.append((u, mean, basis))
    s_p = None
    if student_feats is not None:
        adapted = distiller.adapt([tf.cast(f, tf.float32) for f in student_feats], training=False)
        s_p = []
        for f, (u, mean, basis) in zip(adapted, frames):
            v_s = project_student(f, u)
            s_p.append(tf.matmul(plane_mapping(v_s[:, :, 0]) - mean, basis))
    out = {}
    for i in range(1, len(t_p)):
        mpnn = distiller.mpnns[i - 1]
        r_t, m_t, _ = mpnn(t_p[i], t_p[i - 1], training=False)
        out[i] = {"A_T": _np(r_t), "M_T": _np(m_t)}
        if s_p is not None:
            r_s, m_s, _ = mpnn(s_p[i], s_p[i - 1], training=False)
            out[i].update(A_S=_np(r_s), M_S=_np(m_s))
    return out


# --------------------------------------------------------------------------------------------------
# Panels
# --------------------------------------------------------------------------------------------------

def _adapted_student(distiller, feats):
    """``{k: map}`` of the student maps the distiller adapts (widths unlike the teacher's): the
    adapter output (1x1 conv + BN, + ReLU by default) in inference mode, as its MPNN sees the student; by sensing point."""
    import tensorflow as tf

    points = getattr(distiller, "adapter_points", [])
    if not points or max(IEP_POINTS) >= len(feats):
        return {}
    out = distiller.adapt([tf.cast(feats[k], tf.float32) for k in IEP_POINTS], training=False)
    return {IEP_POINTS[j]: _np(out[j]) for j in points}


def _joint_extent(*coord_sets):
    allc = np.concatenate([c[:, :2] for c in coord_sets if c is not None], 0)
    lo, hi = allc.min(0), allc.max(0)
    return ((lo[0], hi[0]), (lo[1], hi[1]))


def make_panels(images, labels, feats, teacher_feats=None, distiller=None, points=IEP_POINTS, *,
                reference=None, size=768, thumb=24, top_k=3, heat_size=256, seed=0, caption=""):
    """Render the panels of one sample at the sensing points ``points`` (indices into ``feats``).

    Args:
      images: uint8 ``[N, h, w, 3]`` (thumbnails, unnormalised); labels: ``[N]`` ints.
      feats: the main network's feature list (``model(x)[1]``: 4 maps, arrays or tensors).
      teacher_feats: the teacher's list, optional: the main network is then the student and is
        drawn in the teacher's frame (equal channels; else its own frame, with a note).
      distiller: an :class:`~iepkt_tf.iep.IEPDistiller` with a loaded/trained state, optional; it
        reads the teacher (or, without one, the main network as teacher) at ``IEP_POINTS``. With a
        teacher, student maps of another width pass through its adapters first (as in training),
        so they are drawn in the teacher's frame too.
      reference: the previous frame's :class:`Panels` (keeps component signs stable).
      caption: text appended to every panel title (e.g. ``"EPOCH 012"``).

    Returns :class:`Panels` with tags ``point{k}/embedding``, ``point{k}/teacher_embedding`` (with
    a teacher), ``point{k}/graph`` and ``point{k}/heatmaps``.
    """
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    n = images.shape[0]
    if images.ndim != 4 or images.dtype != np.uint8 or labels.shape[0] != n:
        raise ValueError(f"images must be uint8 [N, h, w, 3] with one label each, got "
                         f"{images.dtype} {images.shape} and {labels.shape[0]} labels")
    if n < 3:
        raise ValueError(f"need at least 3 images to draw an embedding, got {n}")
    feats = list(feats)
    points = [int(k) for k in points]
    bad = [k for k in points if not 0 <= k < len(feats)]
    if bad:
        raise ValueError(f"points {bad} out of range: the network has {len(feats)} sensing points")
    if teacher_feats is not None and len(teacher_feats) != len(feats):
        raise ValueError(f"teacher_feats has {len(teacher_feats)} maps, the network {len(feats)}")
    notes, out_images, coords = [], {}, {}
    cap = f" {caption}" if caption else ""

    views, adapted = {}, {}
    if distiller is not None:
        src = teacher_feats if teacher_feats is not None else feats
        if max(IEP_POINTS) >= len(src):
            notes.append(f"MPNN panels skipped: the distiller reads feats{list(IEP_POINTS)}, the "
                         f"network has {len(src)} sensing points")
        else:
            views = distiller_views(distiller, [src[k] for k in IEP_POINTS],
                                    [feats[k] for k in IEP_POINTS] if teacher_feats is not None else None)
            adapted = _adapted_student(distiller, feats) if teacher_feats is not None else {}
    else:
        notes.append("MPNN panels (A^, messages) skipped: no distiller state given")

    for k in points:
        key = f"point{k}"
        ref = None if reference is None else reference.coords
        if teacher_feats is not None:
            t_emb = stacked_pca_embedding(teacher_feats[k])
            flip = orientation(t_emb.P, None if ref is None else ref.get(f"{key}/teacher"))
            t_emb = dataclasses.replace(t_emb, P=t_emb.P * flip, V=t_emb.V * flip)
            s_feat = adapted.get(k, feats[k])
            if k in adapted:
                notes.append(f"{key}: student map {tuple(feats[k].shape[1:])} drawn through the "
                             f"distiller's adapter (1x1 conv + BN{' + ReLU' if distiller.adapter == 'bn_relu' else ''}, "
                             f"inference mode) to the teacher's "
                             f"{int(s_feat.shape[-1])} channels")
            if int(s_feat.shape[-1]) == int(teacher_feats[k].shape[-1]) and \
                    tuple(s_feat.shape[1:3]) == tuple(teacher_feats[k].shape[1:3]):
                m_emb = project_embedding(s_feat, t_emb)
                frame_note = "teacher frame"
            else:
                m_emb = stacked_pca_embedding(s_feat)
                m_emb = dataclasses.replace(m_emb, P=m_emb.P * orientation(
                    m_emb.P, None if ref is None else ref.get(key)))
                frame_note = "own frame"
                notes.append(f"{key}: student map {tuple(s_feat.shape[1:])} differs from the teacher's "
                             f"{tuple(teacher_feats[k].shape[1:])}; student drawn in its own PCA frame")
            coords[f"{key}/teacher"] = t_emb.P
        else:
            t_emb = None
            m_emb = stacked_pca_embedding(feats[k])
            m_emb = dataclasses.replace(m_emb, P=m_emb.P * orientation(
                m_emb.P, None if ref is None else ref.get(key)))
            frame_note = None
        coords[key] = m_emb.P
        if m_emb.P.shape[1] < 2:
            notes.append(f"{key}: fewer than 2 components, embedding panels skipped")
            continue
        extent = _joint_extent(m_emb.P, t_emb.P if t_emb is not None and frame_note == "teacher frame"
                               else None)
        who = "STUDENT" if t_emb is not None else "POINT"
        title = f"{who} P{k}{cap}"
        out_images[f"{key}/embedding"], _ = render.embedding_panel(
            m_emb.P[:, :2], images, labels, size=size, thumb=thumb, seed=seed, extent=extent, title=title)
        if t_emb is not None:
            t_extent = extent if frame_note == "teacher frame" else None
            out_images[f"{key}/teacher_embedding"], _ = render.embedding_panel(
                t_emb.P[:, :2], images, labels, size=size, thumb=thumb, seed=seed, extent=t_extent,
                title=f"TEACHER P{k}{cap}")
        out_images[f"{key}/graph"], _ = render.graph_panel(
            m_emb.P[:, :2], m_emb.G, labels, top_k=top_k, size=size, extent=extent,
            title=f"GRAPH P{k}{cap}")

        mats, titles = [], []
        if t_emb is not None:
            mats += [t_emb.G, m_emb.G]
            titles += ["TEACHER G", "STUDENT G"]
        else:
            mats.append(m_emb.G)
            titles.append("GRAPH G")
        module = IEP_POINTS.index(k) if k in IEP_POINTS else 0
        if views and module >= 1:
            v = views[module]
            mats += [v["A_T"], np.abs(v["M_T"]).sum(-1)]
            titles += ["A^ T", "|M| T"]
            if "A_S" in v:
                mats += [v["A_S"], np.abs(v["M_S"] - v["M_T"]).sum(-1)]
                titles += ["A^ S", "|MS-MT|"]
        elif views:
            notes.append(f"{key}: MPNN panels skipped (no MPNN module ends at this sensing point; "
                         f"modules link feats{list(IEP_POINTS)} pairwise)")
        first = (t_emb.P if t_emb is not None else m_emb.P)[:, 0]
        order = np.lexsort((first, labels))
        out_images[f"{key}/heatmaps"], _ = render.heatmap_panel(
            mats, titles, order, labels, size=heat_size)
    return Panels(out_images, coords, notes)


def log_iep_images(writer, step, panels, prefix="iep"):
    """Write ``panels`` to TensorBoard: one image summary per panel (``{prefix}/{tag}``) and
    histograms of the first two stacked-PCA coordinates (``{prefix}/{key}/pc1``, ``pc2``).
    ``writer``: a ``tf.summary`` writer or a log directory."""
    import tensorflow as tf

    if isinstance(writer, (str, os.PathLike)):
        writer = tf.summary.create_file_writer(os.fspath(writer))
    with writer.as_default():
        for tag, image in sorted(panels.images.items()):
            tf.summary.image(f"{prefix}/{tag}", np.asarray(image)[None], step=int(step))
        for key, p in sorted(panels.coords.items()):
            for c in range(min(2, p.shape[1])):
                tf.summary.histogram(f"{prefix}/{key}/pc{c + 1}", p[:, c], step=int(step))
    writer.flush()


def log_hparams(writer_dir, hparams, metrics=DEFAULT_METRICS):
    """Record a run's hyper-parameters for TensorBoard's HParams dashboard (hparams plugin API).

    Values that are not bool/int/float/str (e.g. None, tuples) are logged as their ``str``;
    ``metrics`` are the scalar tags the dashboard shows next to them. ``writer_dir``: a log
    directory or a ``tf.summary`` writer (e.g. the training loop's own).
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    if not isinstance(hparams, dict) or not hparams:
        raise ValueError("hparams must be a non-empty dict {name: value}")
    clean = {}
    for k, v in hparams.items():
        if isinstance(v, np.generic):
            v = v.item()
        clean[str(k)] = v if isinstance(v, (bool, int, float, str)) else str(v)
    writer = writer_dir if hasattr(writer_dir, "as_default") else \
        tf.summary.create_file_writer(os.fspath(writer_dir))
    with writer.as_default():
        hp.hparams_config(hparams=[hp.HParam(k, hp.Discrete([v])) for k, v in clean.items()],
                          metrics=[hp.Metric(m) for m in metrics])
        hp.hparams(clean)
    writer.flush()
    return clean


# --------------------------------------------------------------------------------------------------
# Networks, samples, snapshots
# --------------------------------------------------------------------------------------------------

def fixed_sample(labels, num, seed=0):
    """Sorted indices of a seeded sample of ``num`` items (all if fewer): the same images in
    every frame."""
    n = len(labels)
    if num <= 0:
        raise ValueError(f"--num_images must be positive, got {num}")
    if num >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, num, replace=False))


def run_features(model, images, batch_size=100):
    """The network's 4 sensing maps (inference mode) for uint8 ``images``, normalised as in
    training (:func:`dataloader.preprocessing.normalize`); numpy float32 arrays."""
    from dataloader.preprocessing import normalize

    outs = None
    for s in range(0, len(images), batch_size):
        _, feats = model(normalize(images[s:s + batch_size]), training=False)
        chunk = [_np(f).astype(np.float32) for f in feats]
        outs = [[c] for c in chunk] if outs is None else [o + [c] for o, c in zip(outs, chunk)]
    return [np.concatenate(o, 0) for o in outs]


def build_network(arrays, scope, arch, num_classes, image_shape, what):
    """Build ``arch`` (inferred from ``arrays`` when empty) under ``scope`` and load ``arrays``."""
    from iepkt_tf.mat_io import assign_params
    from nets.nets_factory import arch_from_params, get_network

    if not arch:
        try:
            arch = arch_from_params(arrays, scope)
        except ValueError as e:
            raise ValueError(f"{what}: cannot infer the architecture ({e}); pass the arch flag") from None
    full = arrays.get(f"{scope}/full/weights")
    if full is not None and full.ndim == 2:
        num_classes = int(full.shape[-1])
    model = get_network(arch, num_classes, scope, image_shape[:2], is_main=False)
    assign_params(model.tf1_variables(), arrays, scope=scope, strict=True, what=what)
    return model


def build_distiller(arrays, teacher_channels, student_channels, mpnn_iter, what, adapter="bn_relu"):
    """An :class:`~iepkt_tf.iep.IEPDistiller` loaded from the ``Distillation/...`` entries of
    ``arrays`` (PCA kind and head count read from the names and shapes)."""
    from iepkt_tf.iep import IEPDistiller

    dist = {k: v for k, v in arrays.items() if k.startswith("Distillation/")}
    pca = "batch" if any("/Batch_PCA/" in k for k in dist) else "ipca"
    num_head = 8
    sfc = [v for k, v in dist.items() if k.endswith("EKI_module1/MHA/Attention_Knowledge/Attention/Sfc/weights")]
    if sfc:
        d_prime = (teacher_channels[0] // 2 + teacher_channels[1] // 2) // 2
        num_head = int(sfc[0].shape[-1]) // max(1, d_prime) + 1
    distiller = IEPDistiller(teacher_channels, student_channels, mpnn_iter=mpnn_iter,
                             num_head=num_head, pca=pca, adapter=adapter)
    try:
        distiller.load_tf1_variables(dist, strict=True)
    except ValueError as e:
        raise ValueError(f"{what}: distiller state does not match the networks: {e}") from None
    return distiller


def snapshot_path(train_dir, epoch):
    """``<train_dir>/vis/params_epoch_XXX.mat``: where :func:`save_snapshot` writes epoch ``epoch``."""
    return os.path.join(os.fspath(train_dir), "vis", f"params_epoch_{int(epoch):03d}.mat")


def save_snapshot(train_dir, epoch, network, distiller=None):
    """Write the epoch snapshot the ``--run_dir`` mode reads: the network's TF1 variables (the
    authors' ``train_params.mat`` layout) plus, for IEP, the distiller's ``Distillation/...``
    variables (incl. the incremental-PCA ``M, S, V``), atomically. Returns the path."""
    from iepkt_tf.mat_io import collect_params, save_mat

    arrays = collect_params(network.tf1_variables())
    if distiller is not None:
        arrays.update(collect_params(distiller.tf1_variables()))
    path = snapshot_path(train_dir, epoch)
    save_mat(path, arrays)
    return path


def find_snapshots(run_dir):
    """``[(epoch, path)]`` sorted by epoch: ``params_epoch_XXX.mat`` / ``epoch_XXX.mat`` in
    ``run_dir/vis`` and ``run_dir``."""
    found = {}
    for d in (os.path.join(run_dir, "vis"), run_dir):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            m = SNAPSHOT_RE.match(name)
            if m:
                found.setdefault(int(m.group(1)), os.path.join(d, name))
    return sorted(found.items())


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

# name: (kind, default, help); the absl flags and :func:`config` share this table.
FLAGS_SPEC = {
    "params": ("string", None, "the network to draw: a .mat in the authors' train_params.mat layout "
               "(may also hold the Distillation/... state of an IEP run)"),
    "arch": ("string", "", "architecture of --params, e.g. WResNet-40-4 (default: read from the file)"),
    "scope": ("string", "", "scope of --params (Student|Teacher; default: the file's only scope)"),
    "teacher_params": ("string", None, "optional teacher .mat: the network of --params is then the "
                       "student, drawn in the teacher's stacked-PCA frame"),
    "teacher_arch": ("string", "", "architecture of --teacher_params (default: read from the file)"),
    "distiller_params": ("string", None, "optional .mat with the Distillation/... variables (default: "
                         "taken from --params or the epoch snapshot when present)"),
    "mpnn_iter": ("integer", 2, "MPNN iterations the distiller was trained with"),
    "adapter": ("string", "bn_relu", "adapter kind the distiller was trained with (train_w_distill "
                "--adapter; only for students of other widths than the teacher): bn_relu|bn"),
    "dataset": ("string", "synthetic", "dataset whose images are embedded (see dataloader.datasets)"),
    "data_dir": ("string", None, "directory holding the dataset files"),
    "split": ("enum", "train", "which split the sample is drawn from (train|test)"),
    "num_images": ("integer", 300, "size of the fixed, seeded image sample"),
    "seed": ("integer", 0, "seed of the image sample (and of the synthetic dataset)"),
    "image_size": ("integer", 0, "resize images to this size (0: the dataset's own size)"),
    "out_dir": ("string", None, "where PNGs (and GIFs) are written"),
    "run_dir": ("string", None, "training directory with epoch snapshots (vis/params_epoch_XXX.mat): "
                "one frame per epoch and a GIF per sensing point and panel"),
    "points": ("string", "1,2,3", "sensing points to draw: indices into feats (IEP uses 1,2,3) or 'all'"),
    "size": ("integer", 768, "side of the embedding and graph panels in pixels"),
    "thumb": ("integer", 24, "thumbnail side in pixels (with a 2-pixel class-colour frame)"),
    "top_k": ("integer", 3, "graph panel: edges to each image's top_k most similar images"),
    "batch_size": ("integer", 100, "images per forward pass"),
    "gif_ms": ("integer", 500, "GIF frame duration in milliseconds"),
    "gifs": ("list", ["embedding", "graph", "heatmaps"], "panels animated with --run_dir "
             "(embedding, teacher_embedding, graph, heatmaps)"),
}
SPLITS = ("train", "test")


def config(**overrides):
    """A flags-like namespace with the CLI defaults and ``overrides`` (for in-process use)."""
    import types

    unknown = sorted(set(overrides) - set(FLAGS_SPEC))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; expected among {sorted(FLAGS_SPEC)}")
    values = {k: (list(v[1]) if isinstance(v[1], list) else v[1]) for k, v in FLAGS_SPEC.items()}
    values.update(overrides)
    return types.SimpleNamespace(**values)


def _define_flags(fv=None):
    """Define the CLI flags on ``fv`` (absl FlagValues; default the global FLAGS); returns it."""
    from absl import flags

    fv = flags.FLAGS if fv is None else fv
    for name, (kind, default, doc) in FLAGS_SPEC.items():
        if kind == "enum":
            flags.DEFINE_enum(name, default, list(SPLITS), doc, flag_values=fv)
        else:
            getattr(flags, f"DEFINE_{kind}")(name, default, doc, flag_values=fv)
    return fv


def _load_sample(cfg):
    from dataloader.datasets import load_dataset

    kwargs = {}
    if cfg.image_size and cfg.dataset in ("synthetic", "synthetic_parts", "CUB200"):
        kwargs["image_size"] = cfg.image_size
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.seed, **kwargs)
    images = ds.train_images if cfg.split == "train" else ds.test_images
    labels = ds.train_labels if cfg.split == "train" else ds.test_labels
    idx = fixed_sample(labels, cfg.num_images, cfg.seed)
    images, labels = images[idx], labels[idx]
    if cfg.image_size and images.shape[1:3] != (cfg.image_size, cfg.image_size):
        import tensorflow as tf
        images = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
            images, [cfg.image_size, cfg.image_size], antialias=True)), 0, 255), tf.uint8).numpy()
    return images, labels, ds.num_classes


def _parse_points(text):
    if text.strip().lower() == "all":
        return [0, 1, 2, 3]
    try:
        pts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--points must be comma-separated integers or 'all', got {text!r}") from None
    if not pts:
        raise ValueError("--points is empty")
    return pts


def _write_panels(panels, out_dir, listing):
    for tag, image in sorted(panels.images.items()):
        path = os.path.join(out_dir, tag.replace("/", "_") + ".png")
        render.write_png(path, image)
        listing.append(path)


def _pad_to(frames):
    h = max(f.shape[0] for f in frames)
    w = max(f.shape[1] for f in frames)
    out = np.empty((len(frames), h, w, 3), np.uint8)
    out[:] = render.BACKGROUND
    for i, f in enumerate(frames):
        out[i, :f.shape[0], :f.shape[1]] = f
    return out


def _read_params(path, what):
    """The arrays of a parameter .mat (:func:`~iepkt_tf.mat_io.load_mat`), every one checked to be
    a finite number (a damaged file is an error here, not a garbage picture)."""
    from iepkt_tf.mat_io import check_finite, load_mat

    arrays = load_mat(path, what=what)
    check_finite(arrays, None, f"{what} {path}")
    return arrays


def _snapshot_what(epoch, path):
    return "--params" if epoch is None else "--run_dir snapshot"


def visualize(cfg, log=print):
    """Run the CLI with a flags-like object ``cfg``; returns the list of written files.

    Every input file is read and checked before the first output is written, so a damaged
    snapshot (or flag) leaves ``--out_dir`` as it was."""
    from iepkt_tf.atomic import check_writable
    from iepkt_tf.mat_io import resolve_scope, scopes_in

    if not cfg.out_dir:
        raise ValueError("--out_dir is required")
    if cfg.split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {cfg.split!r}")
    for name in ("num_images", "size", "thumb", "batch_size"):
        if int(getattr(cfg, name)) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if bool(cfg.params) == bool(cfg.run_dir):
        raise ValueError("pass exactly one of --params (one network) or --run_dir (epoch snapshots)")
    points = _parse_points(cfg.points)
    unknown_gifs = sorted(set(cfg.gifs) - {"embedding", "teacher_embedding", "graph", "heatmaps"})
    if unknown_gifs:
        raise ValueError(f"--gifs: unknown panel(s) {unknown_gifs}; expected among embedding, "
                         f"teacher_embedding, graph, heatmaps")
    if cfg.run_dir:
        if not os.path.isdir(cfg.run_dir):
            raise FileNotFoundError(f"--run_dir {cfg.run_dir}: no such directory")
        snaps = find_snapshots(cfg.run_dir)
        if not snaps:
            raise FileNotFoundError(f"--run_dir {cfg.run_dir}: no epoch snapshots (expected "
                                    f"vis/params_epoch_XXX.mat or epoch_XXX.mat)")
    else:
        snaps = [(None, cfg.params)]
    check_writable(cfg.out_dir, "--out_dir", directory=True)
    for epoch, path in snaps:   # all snapshots readable before any frame is drawn
        what = _snapshot_what(epoch, path)
        resolve_scope(_read_params(path, what), cfg.scope, f"{what} {path}")
    extra_dist = _read_params(cfg.distiller_params, "--distiller_params") if cfg.distiller_params else {}
    if cfg.distiller_params:
        extra_dist = {k: v for k, v in extra_dist.items() if k.startswith("Distillation/")}
        if not extra_dist:
            raise ValueError(f"--distiller_params {cfg.distiller_params}: no Distillation/... "
                             f"variables in the file (expected the state of an IEP run)")
    t_arrays = _read_params(cfg.teacher_params, "--teacher_params") if cfg.teacher_params else None

    images, labels, num_classes = _load_sample(cfg)
    teacher_feats = None
    if cfg.teacher_params:
        what = f"--teacher_params {cfg.teacher_params}"
        teacher = build_network(t_arrays, resolve_scope(t_arrays, "Teacher" if "Teacher" in
                                                        scopes_in(t_arrays) else "", what),
                                cfg.teacher_arch, num_classes, images.shape[1:], what)
        teacher_feats = run_features(teacher, images, cfg.batch_size)

    listing, frames, notes, prev, model, model_key = [], {}, {}, None, None, None
    for epoch, path in snaps:
        arrays = _read_params(path, _snapshot_what(epoch, path))
        what = f"{_snapshot_what(epoch, path)} {path}"
        scope = resolve_scope(arrays, cfg.scope, what)
        arch_key = (scope, cfg.arch or None)
        if model is None or model_key != arch_key:
            model = build_network(arrays, scope, cfg.arch, num_classes, images.shape[1:], what)
            model_key = arch_key
        else:
            from iepkt_tf.mat_io import assign_params
            assign_params(model.tf1_variables(), arrays, scope=scope, strict=True, what=what)
        feats = run_features(model, images, cfg.batch_size)
        dist_arrays = dict(extra_dist) or {k: v for k, v in arrays.items() if k.startswith("Distillation/")}
        distiller = None
        if dist_arrays and teacher_feats is None and scope != "Teacher":
            notes.setdefault(f"the distiller reads teacher features; pass --teacher_params to draw "
                             f"its MPNN panels for the {scope} network", []).append(epoch)
            dist_arrays = {}
        if dist_arrays:
            src = teacher_feats if teacher_feats is not None else feats
            t_ch = [int(src[k].shape[-1]) for k in IEP_POINTS]
            s_ch = [int(feats[k].shape[-1]) for k in IEP_POINTS] if teacher_feats is not None else None
            distiller = build_distiller(dist_arrays, t_ch, s_ch, cfg.mpnn_iter,
                                        f"--distiller_params {cfg.distiller_params}" if cfg.distiller_params else what,
                                        adapter=getattr(cfg, "adapter", "bn_relu"))
        caption = "" if epoch is None else f"EPOCH {epoch:03d}"
        panels = make_panels(images, labels, feats, teacher_feats, distiller, points, reference=prev,
                             size=cfg.size, thumb=cfg.thumb, top_k=cfg.top_k, seed=cfg.seed,
                             caption=caption)
        if distiller is None:
            panels.notes.append("(pass --distiller_params, or a .mat holding Distillation/... "
                                "variables, to draw the MPNN estimate and messages)")
        prev = panels
        out = cfg.out_dir if epoch is None else os.path.join(cfg.out_dir, f"epoch_{epoch:03d}")
        _write_panels(panels, out, listing)
        for note in panels.notes:
            notes.setdefault(note, []).append(epoch)
        if epoch is not None:
            for tag in panels.images:
                if tag.split("/", 1)[1] in cfg.gifs:
                    frames.setdefault(tag, []).append(os.path.join(out, tag.replace("/", "_") + ".png"))
    if frames:
        import tensorflow as tf
        for tag, paths in sorted(frames.items()):
            stack = _pad_to([tf.io.decode_png(tf.io.read_file(p), channels=3).numpy() for p in paths])
            path = os.path.join(cfg.out_dir, tag.replace("/", "_") + ".gif")
            render.write_gif(path, stack, cfg.gif_ms)
            listing.append(path)
    for path in listing:
        log(f"wrote {path}")
    for note, epochs in notes.items():
        when = "" if epochs == [None] else f" (epochs {', '.join(str(e) for e in epochs)})"
        log(f"note{when}: {note}")
    log(f"{len(listing)} files in {cfg.out_dir}")
    return listing


def main(argv=None):
    """The command line: ``argv`` (flags only; default ``sys.argv[1:]``) -> exit status. Bad
    flags and damaged or missing inputs are one line ``visualize: error: ...`` on stderr and exit
    status 2."""
    import tensorflow as tf

    from iepkt_tf.cli import tool_main

    return tool_main("visualize", argv, _define_flags, __doc__, visualize,
                     (ValueError, OSError, tf.errors.OpError))


if __name__ == "__main__":
    from iepkt_tf.quiet import import_tensorflow

    import_tensorflow()  # TensorFlow's C++ start-up lines only with --verbosity
    sys.exit(main())
