"""Interpretability panels (iepkt_tf.render, iepkt_tf.visualize): geometry, ordering, GIF/PNG
round trips, TensorBoard summaries and the CLI end to end on tiny networks (16x16 synthetic images)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf import render, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 40


def _thumbs(n, side=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3)).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# render
# --------------------------------------------------------------------------------------------------

def test_embedding_panel_draws_each_thumbnail_at_its_centre():
    rng = np.random.default_rng(1)
    coords = rng.normal(size=(N, 2))
    labels = rng.integers(0, 5, N)
    thumbs = _thumbs(N)
    thumb, frame = 20, 2                       # inner 16 = the images' size: drawn unresized
    img, centres = render.embedding_panel(coords, thumbs, labels, size=320, thumb=thumb, frame=frame)
    assert img.shape == (320, 320, 3) and img.dtype == np.uint8
    assert centres.shape == (N, 2)
    half = thumb // 2
    for i, (r, c) in enumerate(centres):
        r0, c0 = r - half, c - half
        np.testing.assert_array_equal(img[r0 + frame:r0 + thumb - frame, c0 + frame:c0 + thumb - frame],
                                      thumbs[i])
        np.testing.assert_array_equal(img[r0, c0:c0 + thumb], np.broadcast_to(
            render.PALETTE[labels[i]], (thumb, 3)))
    # snapped to a grid without overlap, and still where the embedding put them: x -> column,
    # y -> row upwards, order preserved (rank correlation) and small displacements.
    d = np.abs(centres[:, None, :] - centres[None, :, :]).max(-1)
    assert d[~np.eye(N, dtype=bool)].min() >= thumb
    target = render.scale_coords(coords, 320, half + 2)

    def rank(x):
        return np.argsort(np.argsort(x))
    assert np.corrcoef(rank(centres[:, 1]), rank(coords[:, 0]))[0, 1] > 0.9
    assert np.corrcoef(rank(centres[:, 0]), rank(-coords[:, 1]))[0, 1] > 0.9
    assert np.median(np.linalg.norm(centres - target, axis=1)) < thumb


def test_embedding_panel_without_snap_uses_exact_positions_and_handles_ties():
    coords = np.zeros((N, 2))                  # everything at one point
    labels = np.arange(N) % 3
    thumbs = _thumbs(N, seed=2)
    img, centres = render.embedding_panel(coords, thumbs, labels, size=200, thumb=20, snap=False)
    assert np.all(centres == centres[0])       # all at the centre of the canvas
    assert abs(centres[0, 0] - 100) <= 1 and abs(centres[0, 1] - 100) <= 1
    # the last one drawn (seeded shuffle) is on top
    last = np.random.default_rng(0).permutation(N)[-1]
    r, c = centres[0] - 10
    np.testing.assert_array_equal(img[r + 2:r + 18, c + 2:c + 18], thumbs[last])
    # with snapping every thumbnail stays visible
    _, snapped = render.embedding_panel(coords, thumbs, labels, size=200, thumb=20)
    assert len({tuple(c) for c in snapped}) == N
    with pytest.raises(ValueError, match="coords"):
        render.embedding_panel(np.zeros((N, 3)), thumbs, labels)
    with pytest.raises(ValueError, match="labels"):
        render.embedding_panel(coords, thumbs, labels[:-1])


def test_graph_panel_draws_the_top_k_edges_only():
    coords = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])   # A B / C D (y up)
    aff = np.zeros((4, 4))
    aff[0, 1] = aff[1, 0] = 0.9                # A-B
    aff[2, 3] = aff[3, 2] = 0.8                # C-D
    edges, strength = render.top_k_edges(aff, 1)
    assert edges.tolist() == [[0, 1], [2, 3]] and np.allclose(strength, [0.9, 0.8])
    labels = np.array([0, 0, 1, 2])
    img, centres = render.graph_panel(coords, aff, labels, top_k=1, size=101, margin=10)
    mid = lambda i, j: tuple(np.round((centres[i] + centres[j]) / 2).astype(int))  # noqa: E731
    bg = np.array(render.BACKGROUND)
    # same-class edge A-B in the class colour, cross-class C-D grey, no edge A-C or B-C
    np.testing.assert_allclose(img[mid(0, 1)], render.PALETTE[0], atol=2)
    cd = img[mid(2, 3)].astype(int)                 # weakest edge: faint (alpha 0.15) grey
    assert cd[0] == cd[1] == cd[2] and 200 < cd[0] < render.BACKGROUND[0] - 10
    np.testing.assert_array_equal(img[mid(0, 2)], bg)
    np.testing.assert_array_equal(img[mid(1, 2)], bg)
    # points drawn in their class colours
    for i in range(4):
        np.testing.assert_array_equal(img[tuple(np.round(centres[i]).astype(int))], render.PALETTE[labels[i]])


def test_heatmap_panel_orders_rows_by_class():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, N)
    same = (labels[:, None] == labels[None, :]).astype(float)
    order = np.argsort(labels, kind="stable")
    size = 80
    img, boxes = render.heatmap_panel([same, -same], ["SAME", "NEG"], order, labels, size=size)
    assert len(boxes) == 2
    top, left = boxes[0]
    region = img[top:top + size, left:left + size]
    pix = np.arange(size) * N // size
    np.testing.assert_array_equal(region, render.colorize(same[order][:, order])[pix][:, pix])
    # class order gives contiguous blocks: along any row the colour changes at most twice
    changes = (np.any(region[:, 1:] != region[:, :-1], -1)).sum(1)
    assert changes.max() <= 2
    # the un-ordered sample is scattered
    raw, raw_boxes = render.heatmap_panel([same], None, None, labels, size=size)
    t0, l0 = raw_boxes[0]
    r = raw[t0:t0 + size, l0:l0 + size]
    assert (np.any(r[:, 1:] != r[:, :-1], -1)).sum(1).max() > 4
    # second map: same ordering, reversed colour scale
    t2, l2 = boxes[1]
    np.testing.assert_array_equal(img[t2:t2 + size, l2:l2 + size], render.colorize(-same[order][:, order])[pix][:, pix])
    # the class strip above the map shows the ordered labels' colours
    sorted_labels = labels[order]
    ticks = {int(np.ceil(b * size / N)) - 1 for b in np.nonzero(sorted_labels[1:] != sorted_labels[:-1])[0] + 1}
    cols = np.array([p for p in range(size) if p not in ticks])
    assert len(ticks) == 3
    np.testing.assert_array_equal(img[top - 4, left + cols], render.PALETTE[sorted_labels[pix[cols]]])
    np.testing.assert_array_equal(img[top - 4, left + np.array(sorted(ticks))], np.full((3, 3), 20))
    with pytest.raises(ValueError, match="permutation"):
        render.heatmap_panel([same], None, np.zeros(N, int))


def test_gif_round_trip_and_atomic_write(tmp_path):
    rng = np.random.default_rng(4)
    few = render.PALETTE[rng.integers(0, 7, (3, 21, 33))]          # <= 256 colours: lossless
    path = tmp_path / "few.gif"
    render.write_gif(path, few, duration_ms=120)
    dec = tf.io.decode_gif(tf.io.read_file(str(path))).numpy()
    assert dec.shape == few.shape
    np.testing.assert_array_equal(dec, few)
    many = rng.integers(0, 256, (4, 64, 80, 3)).astype(np.uint8)   # median-cut palette, LZW resets
    render.write_gif(path, many)
    dec = tf.io.decode_gif(tf.io.read_file(str(path))).numpy()
    assert dec.shape == many.shape
    assert np.abs(dec.astype(int) - many).mean() < 24
    assert sorted(os.listdir(tmp_path)) == ["few.gif"]               # replaced whole, no temp left
    with pytest.raises(ValueError, match="frames"):
        render.write_gif(tmp_path / "bad.gif", many[..., :2])
    assert not (tmp_path / "bad.gif").exists()


def test_write_png_round_trip(tmp_path):
    img = _thumbs(1, 24)[0]
    render.write_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(tf.io.decode_png(tf.io.read_file(str(tmp_path / "a.png"))).numpy(), img)
    assert os.listdir(tmp_path) == ["a.png"]


def test_bitmap_font_draws_legible_distinct_glyphs():
    img = np.zeros((20, 200, 3), np.uint8)
    render.draw_text(img, "A^ 0", 2, 2, color=(255, 255, 255), scale=2)
    h, w = 7 * 2, 6 * 2 * 4 - 2  # 5x7 glyphs at scale 2, one column apart: 14 x 46 pixels
    on = img[..., 0] > 0
    assert on[2:16, 2:2 + w].sum() == on.sum() > 0                  # confined to its box
    glyphs = {k: v.tobytes() for k, v in render.FONT.items()}
    assert len(set(glyphs.values())) == len(glyphs)                 # no two glyphs alike


# --------------------------------------------------------------------------------------------------
# visualize: embeddings and panels on a tiny network
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """A WRN-10-1 trained for a few steps on 16x16 synthetic images, a WRN-16-1 teacher, and a
    distiller whose incremental-PCA state has seen the teacher."""
    import keras

    from dataloader.datasets import load_dataset
    from dataloader.preprocessing import normalize
    from iepkt_tf.iep import IEPDistiller
    from nets.nets_factory import get_network

    keras.utils.set_random_seed(0)
    ds = load_dataset("synthetic", None, 0, num_classes=4, train_per_class=10, test_per_class=2,
                      image_size=16)
    images, labels = ds.train_images, ds.train_labels
    student = get_network("WResNet-10-1", ds.num_classes, "Student", 16, True)
    teacher = get_network("WResNet-16-1", ds.num_classes, "Teacher", 16, False)
    opt = keras.optimizers.SGD(0.05, momentum=0.9)
    rng = np.random.default_rng(0)
    for _ in range(30):
        idx = rng.choice(len(labels), 8, replace=False)
        with tf.GradientTape() as tape:
            logits, _ = student(normalize(images[idx]), training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels[idx], logits))
        grads = tape.gradient(loss, student.trainable_variables)
        opt.apply_gradients(zip(grads, student.trainable_variables))
    t_feats = visualize.run_features(teacher, images, batch_size=16)
    s_feats = visualize.run_features(student, images, batch_size=16)
    distiller = IEPDistiller([t_feats[k].shape[-1] for k in visualize.IEP_POINTS])
    for s in range(0, 40, 8):
        distiller.module_losses([tf.constant(t_feats[k][s:s + 8]) for k in visualize.IEP_POINTS])
    return dict(images=images, labels=labels, student=student, teacher=teacher, t_feats=t_feats,
                s_feats=s_feats, distiller=distiller, num_classes=ds.num_classes)


def test_stacked_pca_embedding_matches_the_method(tiny):
    from iepkt_tf.plane_mapping import plane_mapping
    from iepkt_tf.stacked_pca import first_pca

    feat = tiny["s_feats"][2]
    emb = visualize.stacked_pca_embedding(feat)
    c = feat.shape[-1]
    assert emb.P.shape == (N, c // 2) and emb.G.shape == (N, N)
    # P is the centred plane-mapped sample in an orthonormal basis of its top principal directions
    _, v = first_pca(feat)
    x = plane_mapping(v[:, :, 0]).numpy()
    xc = x - x.mean(0)
    np.testing.assert_allclose(emb.P, xc @ emb.V, atol=1e-5)
    np.testing.assert_allclose(emb.V.T @ emb.V, np.eye(c // 2), atol=1e-5)
    var = (emb.P ** 2).sum(0)
    assert np.all(np.diff(var) <= 1e-4 * var[0])                   # decreasing variance
    top = np.linalg.svd(xc, compute_uv=False)[:c // 2] ** 2
    np.testing.assert_allclose(var, top, rtol=1e-3, atol=1e-5)
    pn = emb.P / np.linalg.norm(emb.P, axis=1, keepdims=True)
    np.testing.assert_allclose(emb.G, pn @ pn.T, atol=1e-5)
    # a projection onto its own frame gives the same coordinates (the student path, EKI l. 45-51)
    np.testing.assert_allclose(visualize.project_embedding(feat, emb).P, emb.P, atol=1e-4)


def test_make_panels_two_points_differ_and_last_point_groups_classes(tiny):
    panels = visualize.make_panels(tiny["images"], tiny["labels"], tiny["s_feats"], points=(1, 3),
                                   size=256, thumb=20, heat_size=64)
    assert set(panels.images) == {f"point{k}/{p}" for k in (1, 3) for p in ("embedding", "graph", "heatmaps")}
    for tag, img in panels.images.items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.std() > 5, tag
    assert panels.images["point1/embedding"].shape == (256, 256, 3)
    assert panels.coords["point1"].shape == (N, tiny["s_feats"][1].shape[-1] // 2)
    assert panels.coords["point3"].shape == (N, tiny["s_feats"][3].shape[-1] // 2)
    assert not np.array_equal(panels.images["point1/embedding"], panels.images["point3/embedding"])
    assert not np.array_equal(panels.images["point1/graph"], panels.images["point3/graph"])
    assert any("no distiller" in n for n in panels.notes)
    # the paper's reading: after some training, images group by class at the last point much more
    # than at the first (mean same-class minus different-class similarity of the graph G)
    same = tiny["labels"][:, None] == tiny["labels"][None, :]
    off = ~np.eye(N, dtype=bool)

    def grouping(k):
        g = visualize.stacked_pca_embedding(tiny["s_feats"][k]).G
        return g[same & off].mean() - g[~same].mean()
    assert grouping(3) > 0.4 and grouping(3) > grouping(1) + 0.15


def test_orientation_follows_the_reference_frame(tiny):
    kw = dict(points=(2,), size=128, thumb=12, heat_size=40)
    first = visualize.make_panels(tiny["images"], tiny["labels"], tiny["s_feats"], **kw)
    flipped = visualize.Panels({}, {k: -v for k, v in first.coords.items()}, [])
    again = visualize.make_panels(tiny["images"], tiny["labels"], tiny["s_feats"], reference=flipped, **kw)
    np.testing.assert_allclose(again.coords["point2"], -first.coords["point2"], atol=1e-6)
    assert not np.array_equal(again.images["point2/embedding"], first.images["point2/embedding"])
    same = visualize.make_panels(tiny["images"], tiny["labels"], tiny["s_feats"], reference=first, **kw)
    np.testing.assert_array_equal(same.images["point2/embedding"], first.images["point2/embedding"])


def test_distiller_panels_use_the_distillers_own_quantities(tiny):
    d, t, s = tiny["distiller"], tiny["t_feats"], tiny["s_feats"]
    pts = visualize.IEP_POINTS
    views = visualize.distiller_views(d, [t[k] for k in pts], [s[k] for k in pts])
    ref = d.distill_losses([tf.constant(s[k]) for k in pts], [tf.constant(t[k]) for k in pts],
                           training_adapter=False, details=True)["mid"]
    assert sorted(views) == [1, 2]
    for i in (1, 2):
        for ours, theirs in (("A_T", "mpnn_infer_T/R"), ("M_T", "mpnn_infer_T/M"),
                             ("A_S", "mpnn_infer_S/R"), ("M_S", "mpnn_infer_S/M")):
            np.testing.assert_allclose(views[i][ours], ref[f"m{i}/{theirs}"].numpy(), rtol=1e-5, atol=1e-5)
    panels = visualize.make_panels(tiny["images"], tiny["labels"], s, t, d, size=128, thumb=12, heat_size=32)
    assert {"point1/teacher_embedding", "point3/teacher_embedding"} <= set(panels.images)
    widths = {k: panels.images[f"point{k}/heatmaps"].shape[1] for k in pts}
    six, _ = render.heatmap_panel([np.zeros((N, N))] * 6, size=32)
    two, _ = render.heatmap_panel([np.zeros((N, N))] * 2, size=32)
    assert widths == {1: two.shape[1], 2: six.shape[1], 3: six.shape[1]}
    assert any(n.startswith("point1: MPNN panels skipped") for n in panels.notes)
    # student drawn in the teacher's frame: teacher basis, student projection
    t_emb = visualize.stacked_pca_embedding(t[2])
    flip = visualize.orientation(t_emb.P, None)
    np.testing.assert_allclose(panels.coords["point2/teacher"], t_emb.P * flip, atol=1e-5)
    proj = visualize.project_embedding(s[2], t_emb)
    np.testing.assert_allclose(panels.coords["point2"], proj.P, atol=1e-4)


def _read_events(logdir):
    """{tag: [(step, plugin, value ndarray)]} from the event files directly in ``logdir``."""
    from tensorboard.compat.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(logdir)):
        if not name.startswith("events.out.tfevents"):
            continue
        for rec in tf.data.TFRecordDataset(os.path.join(logdir, name)):
            ev = event_pb2.Event.FromString(rec.numpy())
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append(
                    (ev.step, v.metadata.plugin_data.plugin_name, tf.make_ndarray(v.tensor)))
    return out


def test_tensorboard_summaries(tiny, tmp_path):
    panels = visualize.make_panels(tiny["images"], tiny["labels"], tiny["s_feats"], points=(3,),
                                   size=96, thumb=12, heat_size=32)
    visualize.log_iep_images(str(tmp_path), 7, panels)
    clean = visualize.log_hparams(str(tmp_path / "hp"), {"lr": 0.1, "arch": "WResNet-16-4",
                                                         "k_int": True, "epochs": 3, "rate": None})
    assert clean == {"lr": 0.1, "arch": "WResNet-16-4", "k_int": True, "epochs": 3, "rate": "None"}
    events = _read_events(str(tmp_path))
    assert set(events) == {"iep/point3/embedding", "iep/point3/graph", "iep/point3/heatmaps",
                           "iep/point3/pc1", "iep/point3/pc2"}
    step, plugin, value = events["iep/point3/heatmaps"][0]
    assert (step, plugin) == (7, "images")
    np.testing.assert_array_equal(tf.io.decode_png(value[2]).numpy(), panels.images["point3/heatmaps"])
    step, plugin, value = events["iep/point3/pc1"][0]
    assert plugin == "histograms" and value[:, 2].sum() == N
    p1 = panels.coords["point3"][:, 0]
    assert np.isclose(value[0, 0], p1.min(), atol=1e-5) and np.isclose(value[-1, 1], p1.max(), atol=1e-5)
    hp_events = _read_events(str(tmp_path / "hp"))
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hp_events)
    with pytest.raises(ValueError, match="hparams"):
        visualize.log_hparams(str(tmp_path), {})


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def _save(model, path):
    from iepkt_tf.mat_io import collect_params, save_mat

    save_mat(str(path), collect_params(model.tf1_variables()))


def _cfg(tmp_path, **kw):
    base = dict(dataset="synthetic", image_size=16, num_images=N, size=128, thumb=12, batch_size=20,
                out_dir=str(tmp_path / "out"))
    base.update(kw)
    return visualize.config(**base)


def test_cli_single_network_and_errors(tiny, tmp_path):
    _save(tiny["student"], tmp_path / "train_params.mat")
    logs = []
    files = visualize.visualize(_cfg(tmp_path, params=str(tmp_path / "train_params.mat"), points="all"),
                                log=logs.append)
    names = sorted(os.path.basename(f) for f in files)
    assert names == sorted(f"point{k}_{p}.png" for k in range(4) for p in ("embedding", "graph", "heatmaps"))
    img = tf.io.decode_png(tf.io.read_file(files[0])).numpy()
    assert img.shape[2] == 3 and img.std() > 5
    assert any("no distiller state" in line for line in logs)          # skipped panel is reported
    with pytest.raises(ValueError, match="exactly one of --params"):
        visualize.visualize(_cfg(tmp_path, params="x.mat", run_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="scope 'Teacher'"):
        visualize.visualize(_cfg(tmp_path, params=str(tmp_path / "train_params.mat"), scope="Teacher"))
    with pytest.raises(FileNotFoundError, match="no epoch snapshots"):
        visualize.visualize(_cfg(tmp_path, run_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="--params"):
        visualize.visualize(_cfg(tmp_path, params=str(tmp_path / "missing.mat")))
    with pytest.raises(ValueError, match="--points"):
        visualize.visualize(_cfg(tmp_path, params=str(tmp_path / "train_params.mat"), points="a,b"))
    with pytest.raises(ValueError, match="unknown option"):
        visualize.config(nmu_images=3)


def test_cli_run_dir_frames_and_gifs(tiny, tmp_path):
    _save(tiny["teacher"], tmp_path / "teacher.mat")
    run = tmp_path / "run"
    student = tiny["student"]
    saved = [v.numpy() for v in student.trainable_variables]
    try:
        for epoch in (0, 1, 2):
            path = visualize.save_snapshot(run, epoch, student, tiny["distiller"])
            assert path == visualize.snapshot_path(run, epoch) == str(run / "vis" / f"params_epoch_{epoch:03d}.mat")
            for v in student.trainable_variables:             # a different student every epoch
                v.assign(v * 0.9)
    finally:
        for v, s in zip(student.trainable_variables, saved):
            v.assign(s)
    assert [e for e, _ in visualize.find_snapshots(str(run))] == [0, 1, 2]
    files = visualize.visualize(_cfg(tmp_path, run_dir=str(tmp_path / "run"),
                                     teacher_params=str(tmp_path / "teacher.mat"), points="2,3",
                                     gifs=["embedding", "heatmaps"]), log=lambda s: None)
    gifs = sorted(f for f in files if f.endswith(".gif"))
    assert [os.path.basename(g) for g in gifs] == ["point2_embedding.gif", "point2_heatmaps.gif",
                                                   "point3_embedding.gif", "point3_heatmaps.gif"]
    for g in gifs:
        frames = tf.io.decode_gif(tf.io.read_file(g)).numpy()
        assert frames.shape[0] == 3
        assert not np.array_equal(frames[0], frames[-1])                   # the student moved
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["epoch_000", "epoch_001", "epoch_002"] + [os.path.basename(g) for g in gifs])
    heat = tf.io.decode_png(tf.io.read_file(str(tmp_path / "out" / "epoch_001" / "point3_heatmaps.png"))).numpy()
    six, _ = render.heatmap_panel([np.zeros((N, N))] * 6)                  # G_T, G_S, A^T, |M|, A^S, |dM|
    assert heat.shape == six.shape


def test_cli_subprocess(tiny, tmp_path):
    _save(tiny["teacher"], tmp_path / "t.mat")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "iepkt_tf.visualize", "--params", str(tmp_path / "t.mat"),
           "--out_dir", str(tmp_path / "o"), "--image_size", "16", "--num_images", "24", "--points", "3",
           "--size", "96", "--thumb", "12"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "o")) == ["point3_embedding.png", "point3_graph.png",
                                                 "point3_heatmaps.png"]
    assert "note: MPNN panels" in res.stdout
    bad = subprocess.run(cmd[:5] + ["--out_dir", str(tmp_path / "o"), "--scope", "Student"],
                         capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("visualize: error: --params ") and "no variables under scope 'Student'" in last
