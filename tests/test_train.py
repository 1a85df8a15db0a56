"""End-to-end training (train_w_distill.run) on the synthetic dataset with tiny networks.

A plain teacher run is shared by several tests (module fixture); it also provides the teacher .mat
of the IEP run. Whole file: about 1.5-2 minutes on 2 CPU cores.
"""
import glob
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf import config, trainer
from iepkt_tf.mat_io import ParamsMismatchError, assign_params, load_mat
from nets.nets_factory import get_network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 10-class synthetic task at 16x16 (stem 7x7/2, no dropout) that WRN-10-2 learns in 12 epochs to
# ~50 % (measured 50-55 % over seeds 0-2); chance is 10 %.
TEACHER = dict(Distillation="None", main_scope="Teacher", teacher_arch="WResNet-10-2",
               dataset="synthetic", synthetic_classes=10, synthetic_train_per_class=100,
               synthetic_test_per_class=20, synthetic_image_size=16, batch_size=32,
               val_batch_size=100, train_epoch=12, log_every=10, seed=0,
               precision="float32")  # the logits are compared with a fresh float32 model
ACCURACY_FLOOR = 35.0


def snapshot(variables):
    return {k: np.array(v.numpy()) for k, v in variables.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def changed(a, b):
    return sorted(k for k in a if not np.array_equal(a[k], b[k]))


def scalars(train_dir):
    """{tag: [(step, value)]} of the TensorBoard event files in ``train_dir``."""
    from tensorboard.backend.event_processing import event_accumulator

    out = {}
    for path in sorted(glob.glob(os.path.join(train_dir, "events.out.tfevents.*"))):
        acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
                continue  # the --vis_every frames (images, histograms) and the hparams
            out.setdefault(tag, []).extend(
                (e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag))
    return out


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    train_dir = str(tmp_path_factory.mktemp("teacher"))
    probe = tf.random.stateless_normal([8, 16, 16, 3], seed=[7, 7])
    seen = {}

    def hook(event, epoch, state):
        if event == "epoch_end":
            seen["logits"] = state["network"](probe, training=False)[0].numpy()
            seen["epochs"] = seen.get("epochs", 0) + 1

    result = trainer.run(config.make_config(train_dir=train_dir, **TEACHER), epoch_hook=hook)
    return dict(result=result, probe=probe, seen=seen, train_dir=train_dir)


# ------------------------------------------------------------------ (a) learning, (c) outputs

def test_plain_run_learns_the_synthetic_task(teacher_run):
    res = teacher_run["result"]
    assert not res["stopped"] and res["epochs_done"] == TEACHER["train_epoch"]
    val = res["logs"]["validation_acc"]
    assert val.shape == (TEACHER["train_epoch"],)
    assert val[-1] >= ACCURACY_FLOOR, val          # chance is 10 %
    assert val[-1] > val[0] + 10.0, val             # it learned during the run
    assert res["logs"]["training_acc"][-1] >= ACCURACY_FLOOR


def test_train_params_and_log_mat_load_into_fresh_model(teacher_run):
    res = teacher_run["result"]
    arrays = load_mat(res["train_params"])
    fresh = get_network(TEACHER["teacher_arch"], TEACHER["synthetic_classes"], "Teacher", (16, 16),
                        is_main=False)
    names = fresh.tf1_variables()
    # every TF1-named variable of the main scope (trainables and BN moving statistics), nothing else
    assert set(arrays) == set(names)
    assert any(k.endswith("moving_variance") for k in arrays)
    assert assign_params(names, arrays, scope="Teacher") == len(names)
    logits = fresh(teacher_run["probe"], training=False)[0].numpy()
    np.testing.assert_allclose(logits, teacher_run["seen"]["logits"], rtol=1e-6, atol=1e-6)
    log = load_mat(res["log"])
    assert set(log) == {"training_acc", "validation_acc"}
    for key in log:
        np.testing.assert_allclose(log[key].ravel(), res["logs"][key], rtol=1e-12)
        assert log[key].size == TEACHER["train_epoch"]
    # no temporary files are left next to the outputs
    assert not glob.glob(os.path.join(res["train_dir"], "*.tmp"))


def test_tensorboard_scalars_of_plain_run(teacher_run):
    tags = scalars(teacher_run["train_dir"])
    for tag in ("loss/total", "loss/cross_entropy", "loss/weight_decay", "accuracy/train",
                "accuracy/validation", "loss/validation", "learning_rate", "perf/sec_per_step",
                "perf/images_per_sec", "grad_norm/cross_entropy"):
        assert tag in tags, sorted(tags)
    val = sorted(tags["accuracy/validation"])
    np.testing.assert_allclose([v for _, v in val], teacher_run["result"]["logs"]["validation_acc"],
                               rtol=1e-6)
    lrs = [v for _, v in sorted(tags["learning_rate"])]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.1 * 0.2 ** 3)


# ------------------------------------------------------------------ (b) resume

RESUME = dict(Distillation="None", student_arch="WResNet-10-1", dataset="synthetic",
              synthetic_classes=4, synthetic_train_per_class=16, synthetic_test_per_class=10,
              synthetic_image_size=32, batch_size=16, val_batch_size=40, train_epoch=2,
              log_every=2, seed=3)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """32x32 inputs, so the student's dropout (keep 0.7) is active: stateless masks must resume too."""
    full = trainer.run(config.make_config(train_dir=str(tmp_path / "full"), **RESUME))
    part = trainer.run(config.make_config(train_dir=str(tmp_path / "part"), stop_after=1, **RESUME))
    assert part["stopped"] and part["epochs_done"] == 1
    assert not os.path.exists(tmp_path / "part" / "train_params.mat")
    with pytest.raises(config.ConfigError, match="--resume"):
        trainer.run(config.make_config(train_dir=str(tmp_path / "part"), **RESUME))
    with pytest.raises(config.ConfigError, match="--batch_size"):
        trainer.run(config.make_config(train_dir=str(tmp_path / "part"), resume=True,
                                **{**RESUME, "batch_size": 8}))
    resumed = trainer.run(config.make_config(train_dir=str(tmp_path / "part"), resume=True, **RESUME))
    assert not resumed["stopped"] and resumed["epochs_done"] == 2
    a, b = load_mat(full["train_params"]), load_mat(resumed["train_params"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    la, lb = load_mat(full["log"]), load_mat(resumed["log"])
    for k in ("training_acc", "validation_acc"):
        np.testing.assert_array_equal(la[k], lb[k])
    # a different seed gives a different run (so the equality above is not vacuous)
    other = trainer.run(config.make_config(train_dir=str(tmp_path / "other"), **{**RESUME, "seed": 4}))
    c = load_mat(other["train_params"])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_mixed_float16_trains_with_loss_scale(tmp_path):
    """The dynamic loss scale path: parameters move by the cross-entropy gradient (biases have no
    weight decay) and the loss scale is checkpointed; the global policy is restored afterwards."""
    import keras

    seen = {}

    def hook(event, epoch, state):
        seen[event] = snapshot(state["network"].tf1_variables())

    res = trainer.run(config.make_config(train_dir=str(tmp_path), precision="mixed_float16", stop_after=1,
                                  **RESUME), epoch_hook=hook)
    assert keras.mixed_precision.global_policy().name == "float32"
    moved = changed(seen["start"], seen["epoch_end"])
    assert "Student/full/biases" in moved and len(moved) == len(seen["start"])
    keys = [k for k, _ in tf.train.list_variables(res["checkpoint"])]
    assert any(k.startswith("loss_scale/scale") for k in keys)


# ------------------------------------------------------------------ (d) IEP, both phases

def test_iep_phases_freeze_the_right_parts(teacher_run, tmp_path):
    cfg = dict(Distillation="IEP", teacher_arch=TEACHER["teacher_arch"], student_arch="WResNet-10-1",
               teacher_params=teacher_run["result"]["train_params"], dataset="synthetic",
               synthetic_classes=TEACHER["synthetic_classes"], synthetic_train_per_class=16,
               synthetic_test_per_class=10, synthetic_image_size=16, batch_size=16,
               val_batch_size=50, init_epoch=1, train_epoch=1, log_every=5, seed=0)
    teacher_params = load_mat(cfg["teacher_params"])
    snaps = []

    def hook(event, epoch, state):
        dist = state["distiller"].tf1_variables()
        snaps.append(dict(
            event=event, epoch=epoch,
            student=snapshot(state["network"].tf1_variables()),
            module={k: np.array(v.numpy()) for k, v in dist.items() if "/Adapter" not in k},
            adapter={k: np.array(v.numpy()) for k, v in dist.items() if "/Adapter" in k},
            teacher=snapshot(state["teacher"].tf1_variables())))

    train_dir = str(tmp_path / "iep")
    first = trainer.run(config.make_config(train_dir=train_dir, stop_after=1, **cfg), epoch_hook=hook)
    assert first["stopped"]
    second = trainer.run(config.make_config(train_dir=train_dir, resume=True, **cfg), epoch_hook=hook)
    assert [(s["event"], s["epoch"]) for s in snaps] == [("start", 0), ("epoch_end", 0),
                                                         ("start", 1), ("epoch_end", 1)]
    start, init_end, resumed, main_end = snaps
    assert start["adapter"], "student and teacher widths differ: adapters expected"

    # phase 1: only the module (and its PCA state / BN statistics) moves
    assert_same(start["student"], init_end["student"])
    assert_same(start["adapter"], init_end["adapter"])
    moved = changed(start["module"], init_end["module"])
    assert any(k.endswith("Incremental_PCA/V") for k in moved)
    assert any(k.endswith("Estimator/fc1/weights") for k in moved)
    assert any(k.endswith("Ebn/moving_mean") for k in moved)
    # the resumed run starts exactly where the checkpoint left it (distiller incl. PCA state)
    for part in ("student", "module", "adapter"):
        assert_same(init_end[part], resumed[part])
    # phase 2: the module and its state are frozen; the student and its adapters train
    assert_same(resumed["module"], main_end["module"])
    assert len(changed(resumed["student"], main_end["student"])) == len(main_end["student"])
    assert changed(resumed["adapter"], main_end["adapter"])
    # the teacher is the loaded .mat throughout
    for snap in snaps:
        for k, v in snap["teacher"].items():
            np.testing.assert_array_equal(v, teacher_params[k].reshape(v.shape))

    log = second["logs"]
    assert log["training_acc"][0] == 1.0  # the authors' placeholder for the initial phase
    tags = scalars(train_dir)
    for tag in ("loss/module_total", "loss/mpnn_kld", "loss/est_loss", "loss/cross_entropy",
                "loss/k_int", "loss/k_alt", "loss/k_bb", "grad_norm/k_int", "grad_norm/k_int_clipped",
                "warmup", "accuracy/validation"):
        assert tags.get(tag), (tag, sorted(tags))
        assert all(math.isfinite(v) for _, v in tags[tag]), tag
    for k in ("k_int", "k_alt", "k_bb"):
        raw = dict(tags["grad_norm/" + k])
        for step, v in tags["grad_norm/" + k + "_clipped"]:
            assert v <= raw[step] * (1 + 1e-5)
    assert all(v == pytest.approx(0.5) for _, v in tags["warmup"])  # first main epoch: sigmoid(0)


# ------------------------------------------------------------------ (e) errors

def test_config_errors_name_the_flag():
    with pytest.raises(config.ConfigError, match=r"--dataset.*'foo'.*synthetic"):
        config.resolve_config(config.make_config(dataset="foo", Distillation="None"))
    with pytest.raises(config.ConfigError, match="--student_arch.*WResNet-11-1"):
        config.resolve_config(config.make_config(student_arch="WResNet-11-1", Distillation="None"))
    with pytest.raises(config.ConfigError, match="--model_name"):
        config.resolve_config(config.make_config(student_arch="ResNet-20", Distillation="None"))
    with pytest.raises(config.ConfigError, match="--teacher_params is required"):
        config.resolve_config(config.make_config(dataset="synthetic"))
    with pytest.raises(config.ConfigError, match="--Distillation"):
        config.resolve_config(config.make_config(Distillation="KD"))
    with pytest.raises(config.ConfigError, match="unknown setting"):
        config.make_config(learning_rte=0.1)
    cfg = config.resolve_config(config.make_config(Distillation="None"))
    assert (cfg.student_arch, cfg.teacher_arch, cfg.init_epoch) == ("WResNet-16-4", "WResNet-40-4", 0)
    assert config.resolve_config(config.make_config(teacher_params="t.mat")).init_epoch == 20


def test_teacher_params_must_match_teacher_arch(teacher_run, tmp_path):
    base = dict(Distillation="IEP", student_arch="WResNet-10-1", dataset="synthetic",
                synthetic_classes=10, synthetic_train_per_class=2, synthetic_test_per_class=1,
                synthetic_image_size=16, batch_size=4, train_epoch=1, init_epoch=1)
    with pytest.raises(ParamsMismatchError, match="--teacher_params") as err:
        trainer.run(config.make_config(train_dir=str(tmp_path / "a"), teacher_arch="WResNet-16-2",
                                teacher_params=teacher_run["result"]["train_params"], **base))
    assert "Teacher/WResblock0/BasicBlock1/conv0/weights" in str(err.value)  # a missing block
    with pytest.raises(FileNotFoundError, match="--teacher_params"):
        trainer.run(config.make_config(train_dir=str(tmp_path / "b"), teacher_arch="WResNet-10-2",
                                teacher_params=str(tmp_path / "nope.mat"), **base))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    train_dir = str(tmp_path)
    trainer.run(config.make_config(train_dir=train_dir, stop_after=1, **RESUME))
    # --resume refuses another --learning_rate (tests/test_run_safety.py); allow it here only, to
    # make the second epoch diverge after a good checkpoint
    monkeypatch.setattr(config, "RESUME_KEYS", tuple(k for k in config.RESUME_KEYS
                                                     if k != "learning_rate"))
    ckpt_dir = os.path.join(train_dir, "ckpt")
    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(ckpt_dir, "*"))}
    with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite .* at step \d+ \(epoch 1\)") as err:
        trainer.run(config.make_config(train_dir=train_dir, resume=True,
                                **{**RESUME, "learning_rate": 1e30}))
    assert "ckpt-4" in str(err.value) and "\n" not in str(err.value)  # 4 steps per epoch
    after = {p: open(p, "rb").read() for p in glob.glob(os.path.join(ckpt_dir, "*"))}
    assert after == before
    assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-4")
    assert not os.path.exists(os.path.join(train_dir, "train_params.mat"))


def test_call_step_turns_nonfinite_values_into_one_line_errors():
    @tf.function
    def checked(x):  # like IEPDistiller, which asserts its losses are finite inside the step
        return {"loss": tf.debugging.assert_all_finite(x, "IEPDistiller: non-finite distillation loss k_alt")}

    assert trainer.call_step(checked, tf.constant(1.5), where="step 1 (epoch 0)") == {"loss": 1.5}
    with pytest.raises(trainer.NonFiniteLossError,
                       match=r"at step 3 \(epoch 0\): IEPDistiller: non-finite distillation loss k_alt \(Tensor "
                             r"had NaN values\);"
                             r" stopped, last good checkpoint: ck/ckpt-2$") as err:
        trainer.call_step(checked, tf.constant(np.nan), where="step 3 (epoch 0)", checkpoint="ck/ckpt-2")
    assert "\n" not in str(err.value)

    @tf.function
    def returned(x):
        return {"accuracy": x, "cross_entropy": tf.ones_like(x), "k_bb": x, "loss": x}

    with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite loss k_bb = inf at step 9"):
        trainer.call_step(returned, tf.constant(np.inf), where="step 9 (epoch 2)")

    @tf.function
    def other(x):
        with tf.control_dependencies([tf.debugging.assert_positive(x, message="something else")]):
            return {"loss": tf.identity(x)}

    with pytest.raises(tf.errors.InvalidArgumentError):
        trainer.call_step(other, tf.constant(-1.0), where="step 1 (epoch 0)")


def _cli(*args, timeout=120, env=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run([sys.executable, os.path.join(REPO, "train_w_distill.py"), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def test_cli_help_and_errors(tmp_path):
    out = _cli("--helpfull")  # every flag, absl's included; exit status 0
    assert out.returncode == 0, out.stderr
    for name in config.FLAG_NAMES:
        assert f"--{name}" in out.stdout or f"--[no]{name}" in out.stdout, name
    bad = _cli("--dataset", "foo", "--train_dir", str(tmp_path))
    assert bad.returncode != 0
    assert "--dataset" in bad.stderr and "synthetic" in bad.stderr
    missing = _cli("--Distillation", "IEP", "--dataset", "synthetic", "--train_dir", str(tmp_path))
    assert missing.returncode == 2
    lines = [ln for ln in missing.stderr.splitlines() if ln.startswith("train_w_distill.py: error")]
    assert len(lines) == 1 and "--teacher_params" in lines[0], missing.stderr


def _one_line_error(res):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("train_w_distill.py: error")]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["truncated", "garbage", "non_finite"])
def test_damaged_teacher_params_are_one_line_errors(teacher_run, tmp_path, kind):
    """A --teacher_params that is cut short, not a .mat, or holds NaN: exit 2 with one line, before
    training starts (no train_dir content)."""
    from iepkt_tf.mat_io import save_mat

    src = teacher_run["result"]["train_params"]
    bad = tmp_path / "teacher.mat"
    if kind == "truncated":
        data = open(src, "rb").read()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        bad.write_bytes(b"this is not a MATLAB file\n" * 10)
    else:
        arrays = load_mat(src)
        key = sorted(k for k in arrays if k.endswith("/weights"))[0]
        arrays[key] = np.full_like(arrays[key], np.nan)
        save_mat(str(bad), arrays)
    out = tmp_path / "run"
    res = _cli("--Distillation", "KD", "--dataset", "synthetic", "--synthetic_image_size", "16",
               "--teacher_arch", TEACHER["teacher_arch"], "--student_arch", "WResNet-10-1",
               "--teacher_params", str(bad), "--train_dir", str(out), "--precision", "float32")
    line = _one_line_error(res)
    assert "--teacher_params" in line and str(bad) in line
    assert ("non-finite" in line) if kind == "non_finite" else ("not a readable" in line)
    assert not (out / "ckpt").exists()


def test_console_has_no_absl_info_lines(tmp_path):
    """absl's Python INFO lines (one per checkpoint: 'Sharding callback duration') and TensorFlow's
    C++ start-up lines (oneDNN, CUDA stubs, cuInit: printed whatever TF_CPP_MIN_LOG_LEVEL says)
    are off unless --verbosity asks for them: the console holds the project's lines only."""
    args = ("--Distillation", "None", "--main_scope", "Student", "--student_arch", "WResNet-10-1",
            "--dataset", "synthetic", "--synthetic_classes", "2", "--synthetic_train_per_class", "8",
            "--synthetic_test_per_class", "2", "--synthetic_image_size", "16", "--batch_size", "8",
            "--train_epoch", "1", "--vis_every", "0", "--precision", "float32")
    info = re.compile(r"^I\d{4} [\d:. ]+\d+ \S+\.py:\d+\]", re.M)
    native = re.compile(r"^[IWE]\d{4} [\d:.]+\s+\d+ \S+\.cc:\d+\]", re.M)
    env = {"TF_CPP_MIN_LOG_LEVEL": "0"}  # even so
    quiet = _cli(*args, "--train_dir", str(tmp_path / "quiet"), env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "Finished training!" in quiet.stdout
    assert not info.findall(quiet.stdout + quiet.stderr), quiet.stderr
    assert quiet.stderr.strip() == "", quiet.stderr
    project = re.compile(r"^(Epoch \d{3} |Finished training!|TensorBoard logs:|Parameters:|"
                         r"Accuracy log:|Checkpoints:)")
    assert all(project.match(ln) for ln in quiet.stdout.splitlines() if ln.strip()), quiet.stdout
    loud = _cli(*args, "--train_dir", str(tmp_path / "loud"), "--verbosity", "0", env=env)
    assert info.findall(loud.stdout + loud.stderr), "the check above would not see absl INFO lines"
    assert native.findall(loud.stderr), "the check above would not see TensorFlow's C++ lines"


# ------------------------------------------------------------------ (f) --val_every

def test_val_every_skips_validation_without_changing_training(tmp_path, capsys):
    """--val_every 2 over 5 epochs validates epochs 1, 3 and 4 (the last): log.mat keeps one row
    per epoch with NaN for the others, TensorBoard has validation scalars on the validated epochs
    only, the epoch line says when the next validation comes, and the parameters are bitwise those
    of --val_every 1 (validation changes no state). Stopped after the (skipped) epoch 0 and resumed,
    the run ends bitwise as the uninterrupted one."""
    cfg = {**RESUME, "train_epoch": 5}
    every = trainer.run(config.make_config(train_dir=str(tmp_path / "every"), **cfg))
    capsys.readouterr()
    full = trainer.run(config.make_config(train_dir=str(tmp_path / "full"), val_every=2, **cfg))
    console = capsys.readouterr().out
    assert "val_Accuracy : not run (--val_every 2: next after epoch 001)" in console
    assert "val_Accuracy : not run (--val_every 2: next after epoch 003)" in console
    log = load_mat(full["log"])
    val, val1 = log["validation_acc"].ravel(), load_mat(every["log"])["validation_acc"].ravel()
    assert val.shape == (5,)
    assert np.isnan(val[[0, 2]]).all() and np.isfinite(val[[1, 3, 4]]).all()
    np.testing.assert_array_equal(val[[1, 3, 4]], val1[[1, 3, 4]])
    np.testing.assert_array_equal(log["training_acc"], load_mat(every["log"])["training_acc"])
    a, b = load_mat(every["train_params"]), load_mat(full["train_params"])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    tags = scalars(str(tmp_path / "full"))
    assert sorted(s for s, _ in tags["accuracy/validation"]) == [1, 3, 4]
    assert sorted(s for s, _ in tags["loss/validation"]) == [1, 3, 4]
    assert sorted(s for s, _ in tags["accuracy/train"]) == [0, 1, 2, 3, 4]

    part_dir = str(tmp_path / "part")
    part = trainer.run(config.make_config(train_dir=part_dir, val_every=2, stop_after=1, **cfg))
    assert part["stopped"] and np.isnan(part["logs"]["validation_acc"]).all()
    resumed = trainer.run(config.make_config(train_dir=part_dir, val_every=2, resume=True, **cfg))
    c = load_mat(resumed["train_params"])
    assert all(np.array_equal(b[k], c[k]) for k in b)
    lc = load_mat(resumed["log"])
    for k in ("training_acc", "validation_acc"):
        np.testing.assert_array_equal(log[k], lc[k])   # NaN in the same places


def test_validation_due_rule():
    due = lambda init, train, k: [e for e in range(init + train)  # noqa: E731
                                  if config.validation_due(e, init, train, k)]
    assert due(0, 5, 1) == [0, 1, 2, 3, 4]
    assert due(2, 3, 1) == [0, 1, 2, 3, 4]            # the default validates the initial phase too
    assert due(0, 100, 10) == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]
    assert due(20, 100, 10) == [29, 39, 49, 59, 69, 79, 89, 99, 109, 119]  # IEP: none in the init phase
    assert due(0, 5, 2) == [1, 3, 4]                  # the last epoch always
    assert due(3, 0, 5) == [2]                        # an initial phase alone: its last epoch
    with pytest.raises(config.ConfigError, match="--val_every"):
        config.resolve_config(config.make_config(Distillation="None", val_every=0))
