"""A damaged latest checkpoint falls back to the previous one, SIGTERM/SIGINT/SIGHUP stop after the
current step with a checkpoint, and either way ``--resume`` reaches the uninterrupted run's
parameters bit for bit. Tiny network, 16x16 synthetic images, float32."""
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from iepkt_tf import config, trainer
from iepkt_tf.checkpoints import CheckpointError, on_disk
from iepkt_tf.mat_io import load_mat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 classes x 32 images / batch 8 = 16 steps per epoch, 3 epochs.
RUN = dict(Distillation="None", student_arch="WResNet-10-1", dataset="synthetic",
           synthetic_classes=4, synthetic_train_per_class=32, synthetic_test_per_class=5,
           synthetic_image_size=16, batch_size=8, val_batch_size=20, train_epoch=3,
           log_every=1, seed=5, precision="float32", vis_every=0, keep_checkpoints=2)
STEPS_PER_EPOCH = 16


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    res = trainer.run(config.make_config(train_dir=str(tmp_path_factory.mktemp("full")), **RUN))
    return load_mat(res["train_params"]), res["logs"]


def assert_same_result(train_dir, full):
    params, logs = full
    got = load_mat(os.path.join(train_dir, "train_params.mat"))
    assert got.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(got[k], params[k], err_msg=k)
    log = load_mat(os.path.join(train_dir, "log.mat"))
    for k in ("training_acc", "validation_acc"):
        np.testing.assert_array_equal(log[k].ravel(), logs[k].ravel())


def truncate_data(prefix):
    path = prefix + ".data-00000-of-00001"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def garble_index(prefix):
    with open(prefix + ".index", "wb") as f:
        f.write(b"this is not a checkpoint index")


def garble_state(ckpt_dir):
    with open(os.path.join(ckpt_dir, "checkpoint"), "w") as f:
        f.write("model_checkpoint_path: {{{ not a text proto")


def _two_epochs(tmp_path):
    train_dir = str(tmp_path / "run")
    res = trainer.run(config.make_config(train_dir=train_dir, stop_after=2, **RUN))
    assert res["stopped"]
    paths = on_disk(os.path.join(train_dir, "ckpt"))
    assert [os.path.basename(p) for p in paths] == [f"ckpt-{2 * STEPS_PER_EPOCH}",
                                                    f"ckpt-{STEPS_PER_EPOCH}"]
    return train_dir, paths


@pytest.mark.parametrize("damage", ["truncated_data", "garbled_index"])
def test_damaged_latest_checkpoint_falls_back_and_resumes_exactly(tmp_path, full, capsys, damage):
    train_dir, (newest, previous) = _two_epochs(tmp_path)
    (truncate_data if damage == "truncated_data" else garble_index)(newest)
    capsys.readouterr()
    res = trainer.run(config.make_config(train_dir=train_dir, resume=True, **RUN))
    out = capsys.readouterr().out
    notes = [ln for ln in out.splitlines() if ln.startswith("--resume: checkpoint")]
    assert len(notes) == 1 and newest in notes[0] and "cannot be read" in notes[0], out
    assert f"Resumed from {previous} at epoch 1" in out
    assert not res["stopped"]
    assert_same_result(train_dir, full)


def test_unparsable_state_file_hides_no_checkpoint(tmp_path, full, capsys):
    train_dir, (newest, _) = _two_epochs(tmp_path)
    ckpt_dir = os.path.join(train_dir, "ckpt")
    garble_state(ckpt_dir)
    capsys.readouterr()
    trainer.run(config.make_config(train_dir=train_dir, resume=True, **RUN))
    out = capsys.readouterr().out
    assert "checkpoint cannot be parsed; the checkpoints were found from their index files" in out
    assert f"Resumed from {newest} at epoch 2" in out
    assert_same_result(train_dir, full)


def test_no_readable_checkpoint_is_a_one_line_error(tmp_path):
    train_dir, paths = _two_epochs(tmp_path)
    for p in paths:
        truncate_data(p)
    before = {p: open(p + ".index", "rb").read() for p in paths}
    with pytest.raises(CheckpointError, match="no readable checkpoint") as err:
        trainer.run(config.make_config(train_dir=train_dir, resume=True, **RUN))
    assert "\n" not in str(err.value) and all(os.path.basename(p) in str(err.value) for p in paths)
    assert before == {p: open(p + ".index", "rb").read() for p in paths}  # nothing deleted
    cli = subprocess.run([sys.executable, "train_w_distill.py", "--resume", f"--train_dir={train_dir}",
                          *[f"--{k}={v}" for k, v in RUN.items()]],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert cli.returncode == 2, cli.stderr
    errors = [ln for ln in cli.stderr.splitlines() if ln.startswith("train_w_distill.py: error:")]
    assert len(errors) == 1 and "no readable checkpoint" in errors[0], cli.stderr
    assert "Traceback" not in cli.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_stops_after_the_step_and_resume_is_exact(tmp_path, full, sig):
    train_dir = str(tmp_path / "run")
    argv = [sys.executable, "train_w_distill.py", f"--train_dir={train_dir}",
            *[f"--{k}={v}" for k, v in RUN.items()]]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 240
        while True:  # read until step 3 of the first epoch, never longer than the deadline
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                continue
            line = proc.stdout.readline()
            lines.append(line)
            if "Epoch 000 Step 000003" in line:  # inside the first epoch
                proc.send_signal(sig)
                break
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 128 + int(sig), out
    assert f"{sig.name} received" in out and f"Stopped by {sig.name}" in out
    assert "Traceback" not in out
    (ckpt,) = on_disk(os.path.join(train_dir, "ckpt"))
    done = int(os.path.basename(ckpt).split("-")[1])
    assert 3 <= done < STEPS_PER_EPOCH, out  # stopped inside the epoch, after the running step
    assert not os.path.exists(os.path.join(train_dir, "train_params.mat"))
    res = trainer.run(config.make_config(train_dir=train_dir, resume=True, **RUN))
    assert not res["stopped"]
    assert_same_result(train_dir, full)


def _cli_error(*args):
    res = subprocess.run([sys.executable, "train_w_distill.py", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("train_w_distill.py: error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    return errors[0]


def test_damaged_run_config_and_unwritable_train_dir_are_one_line_errors(tmp_path):
    train_dir, _ = _two_epochs(tmp_path)
    config_path = os.path.join(train_dir, "run_config.json")
    with open(config_path, "w") as f:
        f.write('{"Distillation": "None", ')  # truncated while written by another program
    flags = [f"--{k}={v}" for k, v in RUN.items()]
    line = _cli_error("--resume", f"--train_dir={train_dir}", *flags)
    assert "run_config.json is not a readable run config" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = _cli_error(f"--train_dir={blocker / 'run'}", *flags)
    assert "--train_dir" in line and "cannot write there" in line
