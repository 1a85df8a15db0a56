"""A run folder has one owner (a second training on it is refused, a SIGKILLed run's lock does not
block --resume), a diverged network never ends "Finished", the script's flag errors are one line
with exit 2, and --resume refuses a changed learning rate or weight decay. Tiny network, 16x16
synthetic images, float32 (the flags of tests/test_resume_faults.py)."""
import json
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf import config, trainer
from iepkt_tf.checkpoints import on_disk
from iepkt_tf.mat_io import load_mat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 classes x 32 images / batch 8 = 16 steps per epoch, 3 epochs.
RUN = dict(Distillation="None", student_arch="WResNet-10-1", dataset="synthetic",
           synthetic_classes=4, synthetic_train_per_class=32, synthetic_test_per_class=5,
           synthetic_image_size=16, batch_size=8, val_batch_size=20, train_epoch=3,
           log_every=1, seed=5, precision="float32", vis_every=0, keep_checkpoints=2)
FLAGS = [f"--{k}={v}" for k, v in RUN.items()]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
PROG = "train_w_distill.py: error:"


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    res = trainer.run(config.make_config(train_dir=str(tmp_path_factory.mktemp("full")), **RUN))
    return load_mat(res["train_params"])


def assert_same_params(train_dir, params):
    got = load_mat(os.path.join(train_dir, "train_params.mat"))
    assert got.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(got[k], params[k], err_msg=k)


def start(*args):
    """The training script in its own process group (so a failing test can end all of it)."""
    return subprocess.Popen([sys.executable, "train_w_distill.py", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def read_until(proc, marker, lines, seconds=240):
    """Read ``proc``'s output into ``lines`` until a line holds ``marker`` (within a deadline)."""
    deadline = time.monotonic() + seconds
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            lines.append(line)
            if marker in line:
                return


def finish(proc, lines, seconds=240):
    try:
        rest, _ = proc.communicate(timeout=seconds)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return "".join(lines) + rest


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, "train_w_distill.py", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(res, code=2):
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith(PROG)]
    assert res.returncode == code and len(errors) == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "FATAL" not in res.stderr, res.stderr
    return errors[0]


def folder_state(d, lock=True):
    """``{path: (bytes, mtime)}`` of every file under ``d`` (without the lock file unless ``lock``:
    every run that takes the lock writes its owner there)."""
    state = {}
    for root, _, files in os.walk(d):
        for name in files:
            if name == ".lock" and not lock:
                continue
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                state[p] = (f.read(), os.stat(p).st_mtime_ns)
    return state


# ------------------------------------------------------------------ 1. one owner per run folder
def test_second_training_on_a_busy_folder_is_refused_and_the_first_is_undisturbed(tmp_path, full):
    train_dir = str(tmp_path / "run")
    first = start(f"--train_dir={train_dir}", *FLAGS)
    lines = []
    try:
        read_until(first, "Epoch 000 Step 000003", lines)  # training: it holds the lock
        first.send_signal(signal.SIGSTOP)  # hold it still while the second one tries
        try:
            before = folder_state(train_dir)
            second = cli(f"--train_dir={train_dir}", *FLAGS)
            resumed = cli(f"--train_dir={train_dir}", "--resume", *FLAGS)
            after = folder_state(train_dir)
        finally:
            first.send_signal(signal.SIGCONT)
    finally:
        out = finish(first, lines)
    for res in (second, resumed):
        line = one_line_error(res)
        assert "is in use by another training" in line and f"pid {first.pid} " in line, line
        assert "--train_dir" in line and ".lock" in line
    assert after == before  # the refused runs changed no file of the folder
    assert first.returncode == 0 and "Finished training!" in out, out
    assert_same_params(train_dir, full)
    with open(os.path.join(train_dir, ".lock")) as f:
        assert json.load(f)["pid"] == first.pid
    # released on exit: the folder can be resumed (here: already finished) in this process
    trainer.run(config.make_config(train_dir=train_dir, resume=True, **RUN))


def test_lock_refuses_in_process_and_is_released_after_a_run(tmp_path):
    train_dir = str(tmp_path / "run")
    os.makedirs(train_dir)
    lock = trainer.RunLock(train_dir)
    try:
        with pytest.raises(config.ConfigError,
                           match=rf"in use by another training \(pid {os.getpid()} on "):
            trainer.run(config.make_config(train_dir=train_dir, **RUN))
        assert os.listdir(train_dir) == [".lock"]
    finally:
        lock.release()
    trainer.RunLock(train_dir).release()  # free again


def test_a_sigkilled_run_does_not_block_resume(tmp_path, full):
    train_dir = str(tmp_path / "run")
    proc = start(f"--train_dir={train_dir}", *FLAGS)
    lines = []
    try:
        read_until(proc, "Epoch 001 Step 000018", lines)  # after the first epoch's checkpoint
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        out = finish(proc, lines)
    assert proc.returncode == -signal.SIGKILL, out
    with open(os.path.join(train_dir, ".lock")) as f:
        assert json.load(f)["pid"] == proc.pid  # the dead owner's lock file is still there
    res = trainer.run(config.make_config(train_dir=train_dir, resume=True, **RUN))
    assert not res["stopped"] and res["epochs_done"] == 3
    assert_same_params(train_dir, full)


# ------------------------------------------------------------------ 2. divergence is caught
def test_diverged_parameters_stop_the_run_without_mat(tmp_path):
    """--learning_rate 1000 on this task: every loss stays finite (about 1e24) but batch-norm moving
    variances overflow to Inf in the first epoch (measured: before the check, the run ended
    "Finished" with exit 0 and Inf in train_params.mat)."""
    train_dir = str(tmp_path / "run")
    res = cli(f"--train_dir={train_dir}", "--learning_rate=1000", *FLAGS)
    line = one_line_error(res, code=1)
    assert "Finished" not in res.stdout and "non-finite loss" not in line, res.stdout
    assert "non-finite values in Student/" in line and "after epoch 0" in line, line
    assert "last good checkpoint: none (no epoch finished)" in line
    assert not os.path.exists(os.path.join(train_dir, "train_params.mat"))
    assert not os.path.exists(os.path.join(train_dir, "log.mat"))
    assert on_disk(os.path.join(train_dir, "ckpt")) == []  # no checkpoint of the broken network


def test_check_finite_names_the_first_bad_variable():
    named = {"a/ok": tf.Variable([1.0, 2.0]), "count": tf.Variable(3, dtype=tf.int64),
             "b/moving_variance": tf.Variable([1.0, np.inf]), "c/weights": tf.Variable([np.nan])}
    with pytest.raises(trainer.NonFiniteParamsError,
                       match=r"^non-finite values in b/moving_variance after epoch 4 .*; stopped, "
                             r"last good checkpoint: ck/ckpt-8$"):
        trainer.check_finite(named, "after epoch 4", "ck/ckpt-8")
    assert issubclass(trainer.NonFiniteParamsError, trainer.NonFiniteLossError)
    named["b/moving_variance"].assign([1.0, 2.0])
    named["c/weights"].assign([0.0])
    trainer.check_finite(named, "after epoch 4")  # all finite: no error


def test_nonfinite_state_after_an_epoch_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A statistic made non-finite by a test-only route (the epoch hook of the first epoch) is
    caught after the next epoch, before its checkpoint and any .mat."""
    train_dir = str(tmp_path / "run")

    def poison(event, epoch, state):
        if event == "epoch_end" and epoch == 0:
            v = state["network"].tf1_variables()["Student/bn0/moving_variance"]
            v.assign(tf.fill(v.shape, np.inf))

    ckpt_dir = os.path.join(train_dir, "ckpt")
    with pytest.raises(trainer.NonFiniteParamsError,
                       match=r"non-finite values in Student/bn0/moving_variance after epoch 1 .*"
                             r"last good checkpoint: .*ckpt-16$"):
        trainer.run(config.make_config(train_dir=train_dir, **RUN), epoch_hook=poison)
    assert sorted(os.listdir(ckpt_dir)) == ["checkpoint", "ckpt-16.data-00000-of-00001",
                                            "ckpt-16.index"]
    assert not os.path.exists(os.path.join(train_dir, "train_params.mat"))


# ------------------------------------------------------------- 3. flag errors: one line, exit 2
@pytest.mark.parametrize("args, expected", [
    (["--Distillation=iep"], "flag --Distillation=iep: value should be one of <None|KD|"),
    (["--batch_size=abc"], "flag --batch_size=abc: invalid literal for int()"),
    (["--Distilation=KD"], "Unknown command line flag 'Distilation'. Did you mean: Distillation ?"),
    (["--flagfile=no/such.cfg"], "--flagfile: Unable to open flagfile: [Errno 2] No such file or "
                                 "directory: 'no/such.cfg'"),
])
def test_flag_errors_are_one_line_exit_2(tmp_path, args, expected):
    res = cli(f"--train_dir={tmp_path / 'run'}", *args)
    line = one_line_error(res)
    assert expected in line, line
    assert not os.path.exists(tmp_path / "run")


# Values that parse but broke later with a traceback (found by trying them, one by one).
@pytest.mark.parametrize("overrides, expected", [
    (dict(seed=2 ** 40), "--seed must be an integer in [0, 4294967295], got 1099511627776"),
    (dict(synthetic_image_size=4), "--synthetic_image_size must be an integer >= 8, got 4"),
    (dict(synthetic_image_size=100000), "--synthetic_image_size must be an integer in [8, 1024]"),
    (dict(synthetic_classes=10 ** 8), "GiB of images; at most 16 GiB"),
    (dict(dataset="synthetic_parts", synthetic_classes=70000),
     "--synthetic_classes 70000: synthetic_parts has at most 68440 classes"),
    (dict(train_epoch=10 ** 11), "--train_epoch must be an integer in [0, 100000]"),
    (dict(init_epoch=10 ** 6, Distillation="IEP"), "--init_epoch must be an integer in [0, 100000]"),
])
def test_values_that_parse_but_cannot_run_are_refused_up_front(overrides, expected):
    with pytest.raises(config.ConfigError) as e:
        config.resolve_config(config.make_config(**{**RUN, "train_dir": "unused", **overrides}))
    assert expected in str(e.value)


def test_tf_config_index_and_a_deeply_nested_run_config_are_one_line(tmp_path):
    """A TF_CONFIG task index outside its cluster, and a run_config.json nested deeper than
    Python's JSON decoder recurses, were tracebacks."""
    env = {**ENV, "TF_CONFIG": json.dumps({"cluster": {"worker": ["localhost:1"]},
                                           "task": {"type": "worker", "index": 3}})}
    res = subprocess.run([sys.executable, "train_w_distill.py", f"--train_dir={tmp_path / 'w'}",
                          "--distribute=multi_worker", *FLAGS], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert one_line_error(res).endswith("TF_CONFIG: task 'worker' index 3 is not one of the "
                                        "cluster's 1 'worker' entries (0..0)")
    train_dir = str(tmp_path / "run")
    assert trainer.run(config.make_config(train_dir=train_dir, stop_after=1, **RUN))["stopped"]
    with open(os.path.join(train_dir, "run_config.json"), "w") as f:
        f.write('{"seed": ' + "[" * 100000 + "]" * 100000 + "}")
    before = folder_state(train_dir, lock=False)
    line = one_line_error(cli(f"--train_dir={train_dir}", "--resume", *FLAGS))
    assert "run_config.json is not a readable run config" in line and "recursion" in line, line
    assert folder_state(train_dir, lock=False) == before


def test_help_lists_the_script_flags_and_exits_0():
    res = cli("--help")
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    for name in config.FLAG_NAMES:
        assert f"--{name}" in res.stdout or f"--[no]{name}" in res.stdout, name
    assert "--helpfull" in res.stdout and "Train a network" in res.stdout


# ------------------------------------------------------------- 4. resume refuses changed settings
def test_resume_refuses_another_learning_rate_or_weight_decay(tmp_path):
    train_dir = str(tmp_path / "run")
    res = trainer.run(config.make_config(train_dir=train_dir, stop_after=1, **RUN))
    assert res["stopped"]
    before = folder_state(train_dir, lock=False)
    with pytest.raises(config.ConfigError,
                       match=r"--resume: settings differ .*--learning_rate 0\.1 -> 0\.05 "
                             r"\(a new learning rate needs --resume_new_lr\)$"):
        trainer.run(config.make_config(train_dir=train_dir, resume=True, learning_rate=0.05, **RUN))
    with pytest.raises(config.ConfigError,
                       match=r"--learning_rate 0\.1 -> 0\.2; --weight_decay 0\.0005 -> 0\.0 \(a new"):
        trainer.run(config.make_config(train_dir=train_dir, resume=True, learning_rate=0.2,
                                       weight_decay=0.0, **RUN))
    line = one_line_error(cli(f"--train_dir={train_dir}", "--resume", "--weight_decay=1e-4",
                              *FLAGS))
    assert "settings differ" in line and "--weight_decay 0.0005 -> 0.0001" in line, line
    assert folder_state(train_dir, lock=False) == before
    assert line.endswith("--weight_decay 0.0005 -> 0.0001"), line  # no --resume_new_lr hint
    assert {"learning_rate", "weight_decay", "train_epoch", "init_epoch"} <= set(config.RESUME_KEYS)
    assert {spec[1] for spec in config.METHOD_FLAG_SPECS} <= set(config.RESUME_KEYS)


def test_resume_new_lr_continues_with_the_new_rate_and_records_it(tmp_path):
    """A learning-rate change is a legitimate use: refused without --resume_new_lr (with a hint),
    applied from the checkpoint on with it (the progress lines show the new base's schedule: with 3
    epochs, epoch 1 runs at base x 0.04, epoch 2 at base x 0.008), and recorded in run_config.json; the
    run then resumes at its new rate without the flag and refuses the old one."""
    train_dir = str(tmp_path / "run")
    assert trainer.run(config.make_config(train_dir=train_dir, stop_after=1, **RUN))["stopped"]
    before = folder_state(train_dir, lock=False)
    flags = [f for f in FLAGS if not f.startswith("--learning_rate")]
    line = one_line_error(cli(f"--train_dir={train_dir}", "--resume", "--learning_rate=0.05",
                              *flags))
    assert line.endswith("--learning_rate 0.1 -> 0.05 (a new learning rate needs --resume_new_lr)")
    assert folder_state(train_dir, lock=False) == before
    assert "only with --resume" in one_line_error(
        cli(f"--train_dir={tmp_path / 'other'}", "--resume_new_lr", *flags))

    res = cli(f"--train_dir={train_dir}", "--resume", "--resume_new_lr", "--learning_rate=0.05",
              "--stop_after=1", *flags)
    assert res.returncode == 0, res.stderr
    assert "--resume_new_lr: learning rate 0.1 -> 0.05 from epoch 1, step 0" in res.stdout
    lrs = {ln.split(" lr ")[1].split()[0] for ln in res.stdout.splitlines() if " lr " in ln}
    assert lrs == {"0.002"}, res.stdout         # 0.05 x 0.04, not the old run's 0.004
    with open(os.path.join(train_dir, "run_config.json")) as f:
        saved = json.load(f)
    assert saved["learning_rate"] == 0.05
    assert saved["changes"] == [{"setting": "learning_rate", "from": 0.1, "to": 0.05,
                                 "epoch": 1, "step": 0}]
    line = one_line_error(cli(f"--train_dir={train_dir}", "--resume", *flags))  # lr 0.1 again
    assert "--learning_rate 0.05 -> 0.1" in line, line
    res = cli(f"--train_dir={train_dir}", "--resume", "--learning_rate=0.05", *flags)
    assert res.returncode == 0 and "Finished" in res.stdout, res.stderr
    lrs = {ln.split(" lr ")[1].split()[0] for ln in res.stdout.splitlines() if " lr " in ln}
    assert lrs == {"0.0004"}, res.stdout        # 0.05 x 0.008
    with open(os.path.join(train_dir, "run_config.json")) as f:
        assert json.load(f)["changes"] == saved["changes"]
