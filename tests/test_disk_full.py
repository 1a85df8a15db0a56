"""The environment failing a run: a full disk (or a permission error) at any write is one line naming the file,
exit code 3 (a failure of the environment, not of the input), with the partial output removed and
every earlier output intact, so that --resume finishes the run once there is room; partial outputs
of an earlier invocation are removed on the next start. The ENOSPC comes from a writer patched in
the training process itself (a real subprocess of the script). Tiny network, 16x16 synthetic
images, float32 (the flags of tests/test_run_safety.py)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from iepkt_tf.checkpoints import on_disk
from iepkt_tf.mat_io import load_mat
from tests.test_run_safety import ENV, FLAGS, PROG, REPO, assert_same_params, full  # noqa: F401

def run_script(train_dir, *extra, fail=None, ok=0):
    """``python train_w_distill.py`` (through ``-c`` when ``fail`` names a writer to break:
    ``checkpoint`` (CheckpointManager.save, leaving a partial ckpt-N_temp folder behind it), or
    ``mat`` (mat_io.save_mat, after writing half a temporary file))."""
    code = f"""
import errno, os, runpy, sys
sys.argv = ["train_w_distill.py"] + {list(FLAGS) + [f"--train_dir={train_dir}", *extra]!r}
from iepkt_tf.quiet import import_tensorflow
tf = import_tensorflow()
import iepkt_tf.mat_io as mat_io
calls = [0]
def full_disk(path):
    calls[0] += 1
    if calls[0] > {ok}:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
if {fail!r} == "checkpoint":
    save = tf.train.CheckpointManager.save
    def broken(self, checkpoint_number=None, **kw):
        temp = os.path.join(self.directory, f"ckpt-{{checkpoint_number}}_temp")
        if calls[0] + 1 > {ok}:
            os.makedirs(temp, exist_ok=True)
            open(os.path.join(temp, "part-00000"), "wb").write(b"half")
        full_disk(temp)
        return save(self, checkpoint_number, **kw)
    tf.train.CheckpointManager.save = broken
elif {fail!r} == "mat":
    save_mat = mat_io.save_mat
    def broken(path, arrays):
        full_disk(path)
        return save_mat(path, arrays)
    mat_io.save_mat = broken
runpy.run_path("train_w_distill.py", run_name="__main__")
"""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)


def one_error(res, code=3):
    assert res.returncode == code, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(PROG) and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def test_full_disk_at_a_checkpoint(tmp_path, full):  # noqa: F811
    train_dir = str(tmp_path / "run")
    res = run_script(train_dir, fail="checkpoint", ok=1)        # epoch 0's checkpoint is written
    line = one_error(res)
    assert "cannot write the checkpoint" in line and "ckpt-32" in line and "No space left on device" in line
    ckpt = os.path.join(train_dir, "ckpt")
    assert sorted(os.listdir(ckpt)) == ["checkpoint", "ckpt-16.data-00000-of-00001", "ckpt-16.index"]
    assert not os.path.exists(os.path.join(train_dir, "train_params.mat"))
    resumed = run_script(train_dir, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert_same_params(train_dir, full)


def test_full_disk_at_train_params_then_resume(tmp_path, full):  # noqa: F811
    train_dir = str(tmp_path / "run")
    res = run_script(train_dir, fail="mat")
    line = one_error(res)
    assert f"cannot write {os.path.join(train_dir, 'train_params.mat')}: No space left on device" in line
    assert not any(n.endswith(".mat") for n in os.listdir(train_dir))
    assert on_disk(os.path.join(train_dir, "ckpt"))             # the last epoch's checkpoint is kept
    resumed = run_script(train_dir, "--resume")                 # writes the outputs from it
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert_same_params(train_dir, full)
    assert load_mat(os.path.join(train_dir, "log.mat"))["validation_acc"].size == 3


def test_partial_outputs_of_an_earlier_invocation_are_removed(tmp_path):
    train_dir = tmp_path / "run"
    (train_dir / "ckpt" / "ckpt-99_temp").mkdir(parents=True)
    (train_dir / "ckpt" / "ckpt-99_temp" / "part-00000").write_bytes(b"half")
    (train_dir / ".train_params.mat.x1y2.tmp").write_bytes(b"half")
    res = run_script(str(train_dir), "--train_epoch=1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (train_dir / "ckpt" / "ckpt-99_temp").exists()
    assert not (train_dir / ".train_params.mat.x1y2.tmp").exists()
    assert np.isfinite(load_mat(str(train_dir / "train_params.mat"))["Student/full/biases"]).all()


def test_a_closed_output_pipe_stops_like_sigterm(tmp_path, full):  # noqa: F811
    """``train_w_distill.py ... | head -1``: the reader goes away, the run stops after its step with
    a checkpoint and exit code 141 (no BrokenPipeError traceback), and --resume ends exactly."""
    import signal

    train_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "train_w_distill.py", *FLAGS, f"--train_dir={train_dir}"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        while b"[3/16]" not in proc.stdout.readline():   # a few steps into the first epoch
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.stdout.close()                              # the reader is gone
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 128 + signal.SIGPIPE, err[-2000:]
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-2000:]
    assert on_disk(os.path.join(train_dir, "ckpt"))
    resumed = run_script(train_dir, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert_same_params(train_dir, full)


def test_a_tensorflow_write_error_names_the_os_reason_only():
    """TensorFlow's file errors read '{{function_node ...SaveV2...}} <path>; No space left on
    device' (seen on a full tmpfs): the one line keeps the reason, not the function node."""
    import tensorflow as tf

    from iepkt_tf.trainer import WriteError, writing

    def save():
        raise tf.errors.ResourceExhaustedError(
            None, None, "{{function_node __wrapped__SaveV2_dtypes_121_device_/job:localhost/"
            "replica:0/task:0/device:CPU:0}} /x/ckpt/ckpt-32_temp/part-00000-of-00001.data; "
            "No space left on device [Op:SaveV2]")

    with pytest.raises(WriteError) as e:
        writing("the checkpoint /x/ckpt/ckpt-32", save)
    assert str(e.value) == ("cannot write the checkpoint /x/ckpt/ckpt-32: No space left on device "
                            "[Op:SaveV2]")
