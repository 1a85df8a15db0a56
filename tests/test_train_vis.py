"""Interpretability frames during training (train_w_distill --vis_every, iepkt_tf.visualize).

A one-epoch plain teacher run and a two-epoch IEP run (initial phase + main phase, interrupted
after the first epoch and resumed) on 16x16 synthetic images, both with ``--vis_every 1``; the
IEP settings are test_train.py's tiny IEP run, with the synthetic dataset's default sizes cut by
``--sample_rate`` so that ``python -m iepkt_tf.visualize`` regenerates the same test sample.
Whole file: about 50 s on 2 CPU cores (most of it the three short runs and the TensorBoard server).
"""
import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf import config, trainer
from iepkt_tf.frames import VIS_PANEL, EpochFrames, vis_due
from iepkt_tf import visualize
from iepkt_tf.mat_io import load_mat
from tests.test_tensorboard_server import serve_and_check

BASE = dict(precision="float32",  # the CLI redraws in float32 and must match the frames exactly
            dataset="synthetic", synthetic_image_size=16, sample_rate=0.08, batch_size=16,
            val_batch_size=100, log_every=5, seed=0, vis_every=1, vis_images=40)
TEACHER = dict(Distillation="None", main_scope="Teacher", teacher_arch="WResNet-10-2", train_epoch=1,
               vis_snapshots=False, **BASE)
IEP = dict(Distillation="IEP", teacher_arch="WResNet-10-2", student_arch="WResNet-10-1", init_epoch=1,
           train_epoch=1, **BASE)
POINTS = (1, 2, 3)
PANELS = ("embedding", "teacher_embedding", "graph", "heatmaps")


def read_events(logdir):
    """{tag: [(step, plugin, value ndarray, plugin content bytes)]} of the event files in ``logdir``."""
    from tensorboard.compat.proto import event_pb2

    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for rec in tf.data.TFRecordDataset(path):
            ev = event_pb2.Event.FromString(rec.numpy())
            for v in ev.summary.value:
                meta = v.metadata.plugin_data
                out.setdefault(v.tag, []).append((ev.step, meta.plugin_name, tf.make_ndarray(v.tensor),
                                                  meta.content))
    return out


def by_plugin(events, plugin):
    return {t: [e for e in evs if e[1] == plugin] for t, evs in events.items()
            if any(e[1] == plugin for e in evs)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis_runs")
    teacher = trainer.run(config.make_config(train_dir=str(root / "teacher"), **TEACHER))
    iep = dict(IEP, teacher_params=teacher["train_params"])
    train_dir = str(root / "iep")
    first = trainer.run(config.make_config(train_dir=train_dir, stop_after=1, **iep))
    assert first["stopped"]
    resumed = trainer.run(config.make_config(train_dir=train_dir, resume=True, **iep))
    plain = trainer.run(config.make_config(train_dir=str(root / "novis"), **dict(iep, vis_every=0)))
    return dict(root=root, teacher=teacher, iep=resumed, novis=plain, iep_cfg=iep,
                events=read_events(train_dir))


def test_iep_frames_in_tensorboard(runs):
    images = by_plugin(runs["events"], "images")
    want = {f"iep/point{k}/{p}" for k in POINTS for p in PANELS}
    assert set(images) == want
    for tag in want:
        assert [e[0] for e in images[tag]] == [0, 1], tag          # one frame per epoch
        for _, _, value, _ in images[tag]:
            img = tf.io.decode_png(value[2]).numpy()
            assert img.ndim == 3 and img.std() > 5, tag
    # the MPNN panels (A^, messages) join the graphs at points 2 and 3: 6 heat-maps, at point 1: 2
    widths = {k: tf.io.decode_png(images[f"iep/point{k}/heatmaps"][0][2][2]).shape[1] for k in POINTS}
    assert widths[2] == widths[3] > 2 * widths[1]
    hists = by_plugin(runs["events"], "histograms")
    assert set(hists) == {f"iep/point{k}{t}/pc{c}" for k in POINTS for t in ("", "/teacher") for c in (1, 2)}
    for tag, evs in hists.items():
        assert [e[0] for e in evs] == [0, 1], tag
        assert all(e[2][:, 2].sum() == BASE["vis_images"] for e in evs), tag
    # the teacher is fixed: its coordinates are the same in every frame (orientation kept)
    t = hists["iep/point2/teacher/pc1"]
    np.testing.assert_array_equal(t[0][2], t[1][2])


def test_hparams_logged_once_with_the_run_settings(runs):
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = runs["events"]
    starts = events["_hparams_/session_start_info"]
    assert len(starts) == 1                                           # not again on --resume
    info = plugin_data_pb2.HParamsPluginData.FromString(starts[0][3]).session_start_info
    hp = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    assert hp["Distillation"] == "IEP" and hp["student_arch"] == "WResNet-10-1"
    assert hp["teacher_arch"] == "WResNet-10-2" and hp["k_int"] is True
    assert hp["init_epoch"] == 1 and hp["mpnn_iter"] == 2 and hp["learning_rate"] == pytest.approx(0.1)
    assert set(hp) == set(config.run_hparams(config.resolve_config(config.make_config(**runs["iep_cfg"]))))
    assert not set(hp) & set(config.HPARAMS_EXCLUDE)
    exp = plugin_data_pb2.HParamsPluginData.FromString(events["_hparams_/experiment"][0][3]).experiment
    metrics = [m.name.tag for m in exp.metric_infos]
    assert metrics == list(config.HPARAMS_METRICS)
    scalars = by_plugin(events, "scalars")
    assert set(metrics) <= set(scalars)                               # the dashboard finds them
    final = sorted(scalars["accuracy/validation"], key=lambda e: e[0])[-1][2]
    assert float(final) == pytest.approx(runs["iep"]["logs"]["validation_acc"][-1], rel=1e-6)


def test_snapshots_per_epoch_and_training_unchanged(runs):
    train_dir = runs["iep"]["train_dir"]
    snaps = visualize.find_snapshots(train_dir)
    assert [e for e, _ in snaps] == [0, 1]
    assert not glob.glob(os.path.join(train_dir, "vis", "*tmp*"))
    final = load_mat(runs["iep"]["train_params"])
    s0, s1 = (load_mat(p) for _, p in snaps)
    student = {k for k in s1 if k.startswith("Student/")}
    assert student == set(final)
    for k in student:
        np.testing.assert_array_equal(s1[k], final[k], err_msg=k)
    assert any(not np.array_equal(s0[k], s1[k]) for k in student)      # the main phase moved it
    assert any(k.endswith("Incremental_PCA/V") for k in s0)
    assert any("Adapter" in k for k in s0) and not any(k.startswith("Teacher/") for k in s0)
    # frames run between epochs only: the same run without them ends bit-identically
    plain = load_mat(runs["novis"]["train_params"])
    for k in final:
        np.testing.assert_array_equal(final[k], plain[k], err_msg=k)
    np.testing.assert_array_equal(runs["iep"]["logs"]["validation_acc"],
                                  runs["novis"]["logs"]["validation_acc"])
    assert not os.path.exists(os.path.join(runs["novis"]["train_dir"], "vis"))
    assert not by_plugin(read_events(runs["novis"]["train_dir"]), "images")


def test_plain_run_frames_without_distiller(runs):
    events = read_events(runs["teacher"]["train_dir"])
    assert set(by_plugin(events, "images")) == {f"iep/point{k}/{p}" for k in POINTS
                                                for p in ("embedding", "graph", "heatmaps")}
    assert set(by_plugin(events, "histograms")) == {f"iep/point{k}/pc{c}" for k in POINTS for c in (1, 2)}
    assert visualize.find_snapshots(runs["teacher"]["train_dir"]) == []   # --novis_snapshots
    info = events["_hparams_/session_start_info"]
    assert len(info) == 1


def test_visualize_run_dir_reproduces_the_frames(runs, tmp_path):
    """The CLI on the run's snapshots (same sample, panel size and seed) draws exactly the frames
    TensorBoard received, and animates them: one GIF per sensing point, one frame per snapshot
    (only the embedding is animated here: GIF encoding is the slow part)."""
    train_dir, out = runs["iep"]["train_dir"], str(tmp_path / "gifs")
    cfg = visualize.config(run_dir=train_dir, out_dir=out, dataset="synthetic", split="test",
                           num_images=BASE["vis_images"], seed=BASE["seed"],
                           image_size=BASE["synthetic_image_size"], size=VIS_PANEL["size"],
                           thumb=VIS_PANEL["thumb"], teacher_params=runs["iep_cfg"]["teacher_params"],
                           mpnn_iter=2, gifs=["embedding"])
    files = visualize.visualize(cfg, log=lambda s: None)
    n_snaps = len(visualize.find_snapshots(train_dir))
    gifs = sorted(os.path.basename(f) for f in files if f.endswith(".gif"))
    assert gifs == [f"point{k}_embedding.gif" for k in POINTS]
    for name in gifs:
        frames = tf.io.decode_gif(tf.io.read_file(os.path.join(out, name))).numpy()
        assert frames.shape[0] == n_snaps == 2, name
    images = by_plugin(runs["events"], "images")
    for tag, evs in images.items():
        for step, _, value, _ in evs:
            png = os.path.join(out, f"epoch_{step:03d}", tag.split("/", 1)[1].replace("/", "_") + ".png")
            np.testing.assert_array_equal(tf.io.decode_png(tf.io.read_file(png)).numpy(),
                                          tf.io.decode_png(value[2]).numpy(), err_msg=f"{tag} {step}")


def test_resumed_frames_keep_the_saved_orientation(runs, tmp_path):
    """EpochFrames continues from vis/frame_coords.npz (frames before the resume epoch only)."""
    from dataloader.datasets import load_dataset
    from iepkt_tf.mat_io import assign_params
    from nets.nets_factory import get_network

    cfg = config.resolve_config(config.make_config(train_dir=str(tmp_path), **TEACHER))
    data = load_dataset("synthetic", None, 0, image_size=16)
    net = get_network("WResNet-10-2", data.num_classes, "Teacher", (16, 16), is_main=False)
    assign_params(net.tf1_variables(), load_mat(runs["teacher"]["train_params"]), scope="Teacher")
    writer = tf.summary.create_file_writer(str(tmp_path))
    first, _ = EpochFrames(cfg, data.test_images, data.test_labels, net)(writer, 0)
    path = os.path.join(str(tmp_path), "vis", "frame_coords.npz")
    with np.load(path) as z:
        assert int(z["epoch"]) == 0
        flipped = {k: -z[k] for k in z.files if k != "epoch"}
    np.savez(path, epoch=0, **flipped)                      # a previous frame with the other signs
    again, _ = EpochFrames(cfg, data.test_images, data.test_labels, net, start_epoch=1)(writer, 1)
    for k in first.coords:
        np.testing.assert_array_equal(again.coords[k], -first.coords[k], err_msg=k)
    # a saved frame from the resume epoch or later is not a previous frame: ignored
    fresh = EpochFrames(cfg, data.test_images, data.test_labels, net, start_epoch=1)
    assert fresh.reference is None
    writer.close()


def test_vis_flags_are_checked():
    with pytest.raises(config.ConfigError, match="--vis_every"):
        config.resolve_config(config.make_config(Distillation="None", vis_every=-1))
    with pytest.raises(config.ConfigError, match="--vis_images"):
        config.resolve_config(config.make_config(Distillation="None", vis_images=2))
    cfg = config.make_config(Distillation="None", vis_every=3)
    assert [e for e in range(8) if vis_due(cfg, e, 8)] == [2, 5, 7]   # and the last epoch
    assert not any(vis_due(config.make_config(vis_every=0), e, 8) for e in range(8))


def test_tensorboard_serves_the_run(runs):
    """A real TensorBoard server on the IEP run: every loss term the run logged, the accuracies,
    the learning rate, the frames, the coordinate histograms and the HParams dashboard."""
    events = runs["events"]
    scalars = sorted(by_plugin(events, "scalars"))
    losses = [t for t in scalars if t.startswith("loss/")]
    assert {"loss/k_int", "loss/k_alt", "loss/k_bb", "loss/module_total", "loss/cross_entropy"} <= set(losses)
    serve_and_check(runs["iep"]["train_dir"],
                    scalar_tags=tuple(losses) + ("accuracy/train", "accuracy/validation", "learning_rate"),
                    image_tags=tuple(sorted(by_plugin(events, "images"))),
                    hist_tags=tuple(sorted(by_plugin(events, "histograms"))),
                    hparams=tuple(config.run_hparams(config.resolve_config(config.make_config(**runs["iep_cfg"])))),
                    metrics=config.HPARAMS_METRICS)
