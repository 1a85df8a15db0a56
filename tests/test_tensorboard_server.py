"""A real TensorBoard server serves the training run's tags (scalars, images, histograms, hparams).

The run directory is written here with tf.summary (the tags the training loop logs), unless the
environment variable ``IEPKT_TB_LOGDIR`` names a real training run directory: then that directory
is served and checked for the same tags. The server listens on 127.0.0.1 only, on a port the OS
picks (``--port 0``, read back from its start-up line), and is stopped by the test.
"""
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import tensorflow as tf

SCALAR_TAGS = ("loss/cross_entropy", "loss/k_int", "loss/k_alt", "loss/k_bb", "loss/module_total",
               "accuracy/train", "accuracy/validation", "learning_rate")
IMAGE_TAGS = ("iep/point1/embedding", "iep/point3/heatmaps")
HIST_TAGS = ("iep/point1/pc1",)
HPARAMS = {"Distillation": "IEP", "learning_rate": 0.1, "batch_size": 128, "k_int": True}
START_TIMEOUT = 60.0
POLL_TIMEOUT = 60.0


def write_run(logdir):
    """A small run in the training loop's layout: scalars every step, panel images, hparams."""
    from iepkt_tf import visualize

    rng = np.random.default_rng(0)
    writer = tf.summary.create_file_writer(os.path.join(logdir, "train"))
    with writer.as_default():
        for step in range(3):
            for i, tag in enumerate(SCALAR_TAGS):
                tf.summary.scalar(tag, 1.0 / (step + 1) + i, step=step)
    writer.flush()
    images = {tag.split("/", 1)[1]: rng.integers(0, 256, (12, 20, 3)).astype(np.uint8) for tag in IMAGE_TAGS}
    panels = visualize.Panels(images, {"point1": rng.normal(size=(16, 4))}, [])
    visualize.log_iep_images(writer, 2, panels)
    visualize.log_hparams(os.path.join(logdir, "train"), HPARAMS)
    return images


def _reader(stream, lines):
    for line in iter(stream.readline, ""):
        lines.put(line)


def _get(url, data=None):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def _poll_json(url, ok, deadline, data=None):
    """GET (or POST ``data``) ``url`` until ``ok(json)``; the last answer otherwise."""
    last = None
    while time.monotonic() < deadline:
        try:
            last = json.loads(_get(url, data))
            if ok(last):
                return last
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    return last


def serve_and_check(logdir, images=None, scalar_tags=SCALAR_TAGS, image_tags=IMAGE_TAGS,
                    hist_tags=HIST_TAGS, hparams=(), metrics=()):
    """Start ``tensorboard`` on ``logdir``, assert every expected tag is served, stop it.

    ``images``: the panels :func:`write_run` logged (their pixels are checked too). ``hparams`` /
    ``metrics``: names the HParams dashboard must list (with ``images``: those of write_run)."""
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
           "--port", "0", "--load_fast=false", "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    try:
        base, seen, deadline = None, [], time.monotonic() + START_TIMEOUT
        while base is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                assert proc.poll() is None, "tensorboard exited early:\n" + "".join(seen[-20:])
                continue
            seen.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if m:
                base = m.group(1)
        assert base, "tensorboard did not report its address within %ds:\n%s" % (START_TIMEOUT, "".join(seen[-20:]))
        deadline = time.monotonic() + POLL_TIMEOUT

        def has(tags):
            return lambda js: all(any(t in run_tags for run_tags in js.values()) for t in tags)
        scalars = _poll_json(base + "/data/plugin/scalars/tags", has(scalar_tags), deadline)
        assert has(scalar_tags)(scalars), scalars
        img_tags = _poll_json(base + "/data/plugin/images/tags", has(image_tags), deadline)
        assert has(image_tags)(img_tags), img_tags
        hist = _poll_json(base + "/data/plugin/histograms/tags", has(hist_tags), deadline)
        assert has(hist_tags)(hist), hist
        # our own run: exactly the names logged; a real run: whatever the training script logged
        want = set(HPARAMS) if images is not None else set(hparams)

        def served(js):
            return {h["name"] for h in js.get("hparamInfos", ())} >= want and \
                {m["name"]["tag"] for m in js.get("metricInfos", ())} >= set(metrics)
        exp = _poll_json(base + "/data/plugin/hparams/experiment",
                         lambda js: bool(js.get("hparamInfos")) and served(js),
                         deadline, data=json.dumps({"experimentName": ""}).encode())
        assert exp and exp.get("hparamInfos") and served(exp), exp

        tag = "loss/k_int" if "loss/k_int" in scalar_tags else scalar_tags[0]
        run = next(r for r, tags in scalars.items() if tag in tags)
        values = json.loads(_get(base + "/data/plugin/scalars/scalars?" + urllib.parse.urlencode(
            {"run": run, "tag": tag})))
        assert len(values) >= 1 and all(np.isfinite(v[2]) for v in values)
        if images is not None:
            assert [v[1] for v in values] == [0, 1, 2]
            np.testing.assert_allclose([v[2] for v in values], [1.0 + 1, 0.5 + 1, 1 / 3 + 1], rtol=1e-6)
            for tag in IMAGE_TAGS:
                run = next(r for r, tags in img_tags.items() if tag in tags)
                listing = json.loads(_get(base + "/data/plugin/images/images?" + urllib.parse.urlencode(
                    {"run": run, "tag": tag})))
                assert [e["step"] for e in listing] == [2]
                png = _get(base + "/data/plugin/images/individualImage?" + listing[0]["query"])
                np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), images[tag.split("/", 1)[1]])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    assert proc.returncode is not None


def test_tensorboard_serves_the_training_tags(tmp_path):
    logdir = os.environ.get("IEPKT_TB_LOGDIR")
    images = None
    if not logdir:
        logdir = str(tmp_path / "run")
        images = write_run(logdir)
    serve_and_check(logdir, images)
