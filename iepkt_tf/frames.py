"""The interpretability frames of a training run (``--vis_every``), drawn between epochs only."""
from __future__ import annotations

import os
import time

from iepkt_tf.atomic import atomic_open

# Geometry of the TensorBoard frames (the visualize CLI's --size and --thumb, so that the CLI on
# the snapshots redraws exactly these frames).
VIS_PANEL = dict(size=512, thumb=24)


def vis_due(cfg, epoch, total_epoch):
    """Whether epoch ``epoch`` (0-based) ends with an interpretability frame (``--vis_every``)."""
    return cfg.vis_every > 0 and ((epoch + 1) % cfg.vis_every == 0 or epoch + 1 == total_epoch)


class EpochFrames:
    """The interpretability frames of a run (``--vis_every``), drawn between epochs only.

    A fixed, seeded sample of ``--vis_images`` test images (:func:`iepkt_tf.visualize.fixed_sample`);
    per frame the main network's sensing maps, :func:`~iepkt_tf.visualize.make_panels` (teacher
    maps computed once: the teacher is fixed; the distiller in inference mode, its state untouched)
    with the previous frame as ``reference``, :func:`~iepkt_tf.visualize.log_iep_images` at step
    ``epoch`` and, with ``--vis_snapshots``, :func:`~iepkt_tf.visualize.save_snapshot`. The last
    frame's coordinates are kept in ``vis/frame_coords.npz`` so a resumed run keeps the orientation.
    """

    def __init__(self, cfg, images, labels, network, teacher=None, distiller=None, start_epoch=0):
        import numpy as np

        from iepkt_tf.visualize import fixed_sample, run_features

        idx = fixed_sample(labels, cfg.vis_images, cfg.seed)
        self.images, self.labels = np.asarray(images)[idx], np.asarray(labels)[idx]
        self.network, self.distiller = network, distiller
        self.batch, self.seed = cfg.val_batch_size, cfg.seed
        self.snapshots, self.train_dir = cfg.vis_snapshots, cfg.train_dir
        self.coords_path = os.path.join(cfg.train_dir, "vis", "frame_coords.npz")
        self.teacher_feats = None if teacher is None else run_features(teacher, self.images, self.batch)
        self.reference = self._load_reference(start_epoch)
        self.notes = set()

    def _load_reference(self, before_epoch):
        """The last frame written before ``before_epoch`` (same sample), or None."""
        import numpy as np

        from iepkt_tf.visualize import Panels

        if not os.path.isfile(self.coords_path):
            return None
        with np.load(self.coords_path, allow_pickle=False) as z:
            epoch = int(z["epoch"])
            coords = {k: z[k] for k in z.files if k != "epoch"}
        if epoch >= before_epoch or any(c.shape[0] != len(self.labels) for c in coords.values()):
            return None
        return Panels({}, coords, [])

    def _save_coords(self, epoch, coords):
        import numpy as np

        with atomic_open(self.coords_path, "wb") as f:
            np.savez(f, epoch=np.int64(epoch), **coords)

    def __call__(self, writer, epoch):
        """Draw and log the frame of epoch ``epoch``; returns ``(panels, snapshot path or None)``."""
        from iepkt_tf.visualize import log_iep_images, make_panels, run_features, save_snapshot

        t0 = time.perf_counter()
        feats = run_features(self.network, self.images, self.batch)
        panels = make_panels(self.images, self.labels, feats, self.teacher_feats, self.distiller,
                             reference=self.reference, seed=self.seed, caption=f"EPOCH {epoch:03d}",
                             **VIS_PANEL)
        log_iep_images(writer, epoch, panels)
        self._save_coords(epoch, panels.coords)
        path = save_snapshot(self.train_dir, epoch, self.network, self.distiller) if self.snapshots else None
        self.reference = panels
        print(f"Epoch {epoch:03d} frame: {len(panels.images)} panels of {len(self.labels)} test images "
              f"-> TensorBoard iep/*" + (f", {path}" if path else "")
              + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
        for note in panels.notes:
            if note not in self.notes:
                self.notes.add(note)
                print(f"  note: {note}", flush=True)
        return panels, path
