"""iepkt_tf.export and iepkt_tf.evaluate on a seeded random WResNet-10-1 (4 classes, 16x16 images).

Every export reloads to the Keras model's outputs on a fixed uint8 batch of 8: SavedModel equals the
traced serving function bit for bit (and the eager model within 1e-6 of max|logit|), ``.keras``
equals the eager model exactly, TFLite float is within 1e-5 of max|logit| (measured 5e-7) and
TFLite dynamic-range within 5 % of max|logit| with at least 7 of 8 argmaxes agreeing (measured
1.4 %, 8 of 8). evaluate's top-1 and loss equal an independent computation. Damaged inputs give one
error line and exit status 2, and nothing is written. Each format is converted once (module
fixture); the CLI runs in a subprocess only for the damage cases and one evaluate. About a minute
on 2 busy cores.
"""
import json
import os
import re
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from dataloader.datasets import load_dataset
from dataloader.preprocessing import normalize
from iepkt_tf import evaluate, export
from iepkt_tf.mat_io import assign_params, collect_params, load_mat, save_mat
from nets.nets_factory import get_network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH, CLASSES, SIZE = "WResNet-10-1", 4, 16
TFLITE_FLOAT_TOL = 1e-5      # of max|logit|
TFLITE_DYNAMIC_TOL = 0.05    # of max|logit|
TFLITE_DYNAMIC_AGREE = 7     # of 8 argmaxes


def randomise(variables, seed=0):
    """Every variable from a seeded numpy draw (He-scaled kernels, BN statistics away from 0/1)."""
    rng = np.random.default_rng(seed)
    for name in sorted(variables):
        v, shape = variables[name], tuple(variables[name].shape)
        leaf = name.rsplit("/", 1)[1]
        if leaf == "weights":
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif leaf in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0, 0.2, shape)
        v.assign(value.astype(np.float32))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The .mat, the reference model, a fixed uint8 batch and one export per format (via main())."""
    root = tmp_path_factory.mktemp("export")
    net = get_network(ARCH, CLASSES, "Student", SIZE, is_main=False)
    randomise(net.tf1_variables())
    params = str(root / "train_params.mat")
    save_mat(params, collect_params(net.tf1_variables()))
    arrays, scope = export.read_params(params)
    model = export.build_classifier(arrays, scope, image_size=SIZE)
    images = np.random.default_rng(1).integers(0, 256, (8, SIZE, SIZE, 3)).astype(np.uint8)
    paths = {"savedmodel": str(root / "sm"), "keras": str(root / "m.keras"),
             "tflite": str(root / "m.tflite"), "dynamic": str(root / "q.tflite")}
    base = ["--params", params, "--image_size", str(SIZE)]
    assert export.main(base + ["--out", paths["savedmodel"], "--arch", ARCH]) == 0
    assert export.main(base + ["--out", paths["keras"], "--scope", "Student"]) == 0
    assert export.main(base + ["--out", paths["tflite"], "--format", "tflite"]) == 0
    assert export.main(base + ["--out", paths["dynamic"], "--quantize", "dynamic",
                               "--num_classes", str(CLASSES)]) == 0
    return {"root": root, "params": params, "arrays": arrays, "model": model, "net": net,
            "images": images, "paths": paths}


def reference(work):
    return {k: v.numpy() for k, v in work["model"](work["images"]).items()}


def assert_probabilities(out):
    probs = np.asarray(out["probabilities"], np.float64)
    assert probs.shape == (8, CLASSES) and np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def tflite_run(path, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    return runner(images=images)


def test_classifier_is_the_network_behind_the_normalisation(work):
    ref = reference(work)
    logits, _ = work["net"](normalize(work["images"]), training=False)
    np.testing.assert_array_equal(ref["logits"], logits.numpy())
    as_float = work["model"](work["images"].astype(np.float32))["logits"].numpy()
    np.testing.assert_array_equal(as_float, ref["logits"])
    assert_probabilities(ref)
    assert (work["model"].arch, work["model"].num_classes, work["model"].scope) == (ARCH, CLASSES, "Student")


def test_classifier_computes_in_float32_under_a_mixed_policy(work):
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = export.build_classifier(work["arrays"], "Student", image_size=SIZE)
    finally:
        keras.config.set_dtype_policy(policy)
    images = work["images"].astype(np.float32) + 0.25  # not representable in bfloat16
    np.testing.assert_array_equal(model(images)["logits"].numpy(),
                                  work["model"](images)["logits"].numpy())


def test_savedmodel_reloads_to_the_same_logits(work):
    ref = reference(work)
    loaded = tf.saved_model.load(work["paths"]["savedmodel"])
    assert set(loaded.signatures) == {"serving_default", "serving_float"}
    served = loaded.signatures["serving_default"](images=tf.constant(work["images"]))
    out = {k: v.numpy() for k, v in served.items()}
    traced = export.serving_function(work["model"], tf.uint8)(work["images"])
    np.testing.assert_array_equal(out["logits"], traced["logits"].numpy())
    scale = np.abs(ref["logits"]).max()
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=0, atol=1e-6 * scale)
    as_float = loaded.signatures["serving_float"](images=tf.constant(work["images"].astype(np.float32)))
    np.testing.assert_array_equal(as_float["logits"].numpy(), out["logits"])
    assert_probabilities(out)


def test_keras_file_reloads_exactly(work):
    ref = reference(work)
    loaded = keras.models.load_model(work["paths"]["keras"])
    assert isinstance(loaded, export.Classifier) and loaded.arch == ARCH
    out = {k: v.numpy() for k, v in loaded(work["images"]).items()}
    np.testing.assert_array_equal(out["logits"], ref["logits"])
    fresh = export.Classifier(ARCH, CLASSES, "Student", SIZE)  # random weights: a real reload differs
    assert not np.array_equal(fresh(work["images"])["logits"].numpy(), ref["logits"])
    assert_probabilities(out)


def test_tflite_float_close(work):
    ref = reference(work)
    out = tflite_run(work["paths"]["tflite"], work["images"])
    scale = np.abs(ref["logits"]).max()
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=0, atol=TFLITE_FLOAT_TOL * scale)
    assert_probabilities(out)


def test_tflite_dynamic_range_close(work):
    ref = reference(work)
    out = tflite_run(work["paths"]["dynamic"], work["images"])
    err = np.abs(out["logits"] - ref["logits"]).max() / np.abs(ref["logits"]).max()
    agree = int(np.sum(out["logits"].argmax(1) == ref["logits"].argmax(1)))
    assert err <= TFLITE_DYNAMIC_TOL and agree >= TFLITE_DYNAMIC_AGREE, (err, agree)
    assert os.path.getsize(work["paths"]["dynamic"]) < 0.5 * os.path.getsize(work["paths"]["tflite"])
    assert_probabilities(out)


def test_overwrite_replaces_atomically(work, tmp_path):
    out = str(tmp_path / "sm")
    args = ["--params", work["params"], "--image_size", str(SIZE), "--out", out]
    assert export.main(args) == 0
    with open(os.path.join(out, "stale.txt"), "w") as f:
        f.write("old")
    assert export.main(args + ["--overwrite"]) == 0
    assert "stale.txt" not in os.listdir(out) and "saved_model.pb" in os.listdir(out)
    assert os.listdir(tmp_path) == ["sm"]  # no temporary left beside it


def _tree(path):
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


@pytest.mark.parametrize("kind", ["run_folder", "plain_dir", "file_for_savedmodel"])
def test_overwrite_never_replaces_what_is_not_an_export(work, tmp_path, kind):
    """``export --out <a run folder> --overwrite`` used to delete the run (ckpt/, log.mat and the
    very train_params.mat being exported)."""
    run = tmp_path / "run"
    run.mkdir()
    params = str(run / "train_params.mat")
    with open(work["params"], "rb") as src, open(params, "wb") as dst:
        dst.write(src.read())
    if kind == "run_folder":
        (run / "ckpt").mkdir()
        (run / "ckpt" / "ckpt-1.index").write_bytes(b"ckpt")
        (run / "log.mat").write_bytes(b"log")
        out = str(run)
    elif kind == "plain_dir":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep")
        out = str(tmp_path / "mine")
    else:
        (tmp_path / "model").write_text("keep")
        out = str(tmp_path / "model")
    before = _tree(tmp_path)
    res = cli("export", ["--params", params, "--image_size", str(SIZE), "--out", out, "--overwrite"])
    line = assert_one_error(res, "export")
    assert "not an export" in line or "not a SavedModel" in line, line
    assert _tree(tmp_path) == before


def test_an_extension_export_does_not_write_is_refused(work, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert export.main(["--params", work["params"], "--image_size", str(SIZE), "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not .onnx" in err[0], err
    assert not os.path.exists(out)
    assert export.main(["--params", work["params"], "--image_size", str(SIZE), "--out", out,
                        "--format", "savedmodel"]) == 0  # asked for explicitly: a SavedModel
    assert "saved_model.pb" in os.listdir(out)


def test_one_line_of_a_listing():
    error = ValueError("head (2 keys):\n  missing (7):\n" + "".join(f"    n{i}\n" for i in range(7)))
    assert export.one_line(error) == "head (2 keys); missing (7): n0, n1, n2, n3, n4, ..."


def test_topk_counts_ties_and_ranks():
    logits = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 2.0], [0.0, 1.0, 2.0]])
    assert evaluate.topk_counts(logits, np.array([0, 1, 0]), 2) == (2, 2)


def independent_metrics(work, data):
    net = get_network(ARCH, CLASSES, "Student", SIZE, is_main=False)
    assign_params(net.tf1_variables(), load_mat(work["params"]), scope="Student")
    logits = net(normalize(data.test_images), training=False)[0].numpy().astype(np.float64)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    labels = data.test_labels
    top1 = 100.0 * np.mean(logits.argmax(1) == labels)
    return top1, float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def test_evaluate_params_matches_an_independent_computation(work):
    data = load_dataset("synthetic", seed=0, num_classes=CLASSES, train_per_class=1,
                        test_per_class=6, image_size=SIZE)
    result = evaluate.evaluate_params(work["arrays"], None, "Student", data, batch_size=8)
    top1, loss = independent_metrics(work, data)
    assert result["num_images"] == 24 and result["top1"] == top1
    assert result["top5"] == 100.0 >= result["top1"]
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


def cli(tool, args):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1",
               TF_NUM_INTEROP_THREADS="1")
    return subprocess.run([sys.executable, "-m", f"iepkt_tf.{tool}"] + args, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_evaluate_cli_line_and_json(work, tmp_path):
    out = str(tmp_path / "r.json")
    res = cli("evaluate", ["--params", work["params"], "--dataset", "synthetic", "--image_size", str(SIZE),
                           "--synthetic_test_per_class", "6", "--batch_size", "8", "--json", out])
    assert res.returncode == 0, res.stderr
    data = load_dataset("synthetic", seed=0, num_classes=CLASSES, train_per_class=1,
                        test_per_class=6, image_size=SIZE)
    top1, _ = independent_metrics(work, data)
    line = re.compile(r"^WResNet-10-1 \(Student\) on synthetic test: top-1 (\d+\.\d\d) %  "
                      r"top-5 100\.00 %  loss \d+\.\d{4}  \(24 images\)$")
    match = line.match(res.stdout.strip())
    assert match and float(match.group(1)) == round(top1, 2), res.stdout
    with open(out) as f:
        saved = json.load(f)
    assert saved["top1"] == top1 and saved["top5"] == 100.0 and saved["num_images"] == 24


def damaged_inputs(work, tmp_path):
    """{case: (params path, extra args)} for the damage cases."""
    with open(work["params"], "rb") as f:
        blob = f.read()
    truncated = tmp_path / "truncated.mat"
    truncated.write_bytes(blob[: len(blob) // 2])
    text = tmp_path / "notes.mat"
    text.write_text("these are not parameters\n")
    arrays = dict(work["arrays"])
    arrays["Student/full/weights"] = np.full_like(arrays["Student/full/weights"], np.nan)
    nan = str(tmp_path / "nan.mat")
    save_mat(nan, arrays)
    return {"truncated": (str(truncated), []), "text": (str(text), []), "nan": (nan, []),
            "wrong_arch": (work["params"], ["--arch", "WResNet-16-1"]),
            "missing": (str(tmp_path / "absent.mat"), [])}


def assert_one_error(res, tool):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(f"{tool}: error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


EXPORT_CASES = ("truncated", "text", "nan", "wrong_arch", "missing", "existing_out")
EXPECT = {"truncated": "not a readable", "text": "not a readable", "nan": "not finite",
          "wrong_arch": "do not match", "missing": "no such file", "existing_out": "--overwrite"}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_damage_is_one_line(work, tmp_path, case):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = str(out_dir / "m.tflite")
    if case == "existing_out":
        params, extra = work["params"], []
        with open(out, "w") as f:
            f.write("keep")
    else:
        params, extra = damaged_inputs(work, tmp_path)[case]
    res = cli("export", ["--params", params, "--out", out, "--image_size", str(SIZE)] + extra)
    assert EXPECT[case] in assert_one_error(res, "export")
    if case == "existing_out":
        assert open(out).read() == "keep" and os.listdir(out_dir) == ["m.tflite"]
    else:
        assert os.listdir(out_dir) == []


@pytest.mark.parametrize("case", ("missing_dataset", "truncated", "wrong_arch"))
def test_evaluate_damage_is_one_line(work, tmp_path, case):
    out = str(tmp_path / "r.json")
    args = ["--dataset", "synthetic", "--image_size", str(SIZE), "--synthetic_test_per_class", "2"]
    if case == "missing_dataset":
        params, extra = work["params"], []
        empty = tmp_path / "no_data"
        empty.mkdir()
        args = ["--dataset", "cifar10", "--data_dir", str(empty)]
    else:
        params, extra = damaged_inputs(work, tmp_path)[case]
    res = cli("evaluate", ["--params", params, "--json", out] + args + extra)
    line = assert_one_error(res, "evaluate")
    assert {"missing_dataset": "not found", "truncated": "not a readable",
            "wrong_arch": "do not match"}[case] in line
    assert not os.path.exists(out)


@pytest.mark.parametrize("args,expect", [
    (["--out", "{file}/m.tflite"], "not a writable directory"),  # out dir under a regular file
    (["--out", "{dir}/sm", "--quantize", "dynamic"], "--format tflite only"),
    (["--out", "{dir}/m.tflite", "--format", "keras"], "ending in .keras"),
    (["--out", "{dir}/m.keras", "--format", "tflite"], "ending in .tflite"),
    (["--out", "{dir}/sm", "--image_size", "0"], "image_size"),
    (["--out", "{dir}/sm", "--format", "onnx"], "format"),
    (["--out", "{dir}/sm", "--bogus", "1"], "bogus"),
    (["--out", "{dir}/sm", "--scope", "Teacher"], "no variables under scope"),
])
def test_export_bad_flags_in_process(work, tmp_path, capsys, args, expect):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a.format(file=blocker, dir=tmp_path / "out") for a in args]
    assert export.main(["--params", work["params"]] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export: error:") and expect in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_several_scopes_need_scope(work, tmp_path, capsys):
    both = dict(work["arrays"])
    both.update({"Teacher" + k[len("Student"):]: v for k, v in work["arrays"].items()})
    path = str(tmp_path / "both.mat")
    save_mat(path, both)
    assert evaluate.main(["--params", path, "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --scope" in err[0], err


def test_evaluate_uses_the_precision_the_run_trained_with(tmp_path, capsys):
    """A run trained in bfloat16 is evaluated in bfloat16 by default and gives the accuracy of its
    last validation (which float32 need not reproduce); a file without run_config.json: float32."""
    from iepkt_tf import config, trainer

    run_dir = tmp_path / "run"
    common = dict(dataset="synthetic", synthetic_classes=CLASSES, synthetic_train_per_class=16,
                  synthetic_test_per_class=25, synthetic_image_size=SIZE, seed=3)
    trainer.run(config.make_config(Distillation="None", main_scope="Teacher", teacher_arch=ARCH,
                                   batch_size=8, val_batch_size=200, train_epoch=2, vis_every=0,
                                   precision="mixed_bfloat16", train_dir=str(run_dir), **common))
    final = float(load_mat(str(run_dir / "log.mat"))["validation_acc"].ravel()[-1])
    args = ["--params", str(run_dir / "train_params.mat"), "--dataset", "synthetic",
            "--image_size", str(SIZE), "--synthetic_test_per_class", "25", "--seed", "3"]
    assert evaluate.main(args + ["--json", str(tmp_path / "bf16.json")]) == 0
    bf16 = json.load(open(tmp_path / "bf16.json"))
    assert bf16["precision"] == "mixed_bfloat16" and "mixed_bfloat16" in capsys.readouterr().out
    assert bf16["top1"] == pytest.approx(final, abs=1e-6)
    assert evaluate.main(args + ["--precision", "float32", "--json", str(tmp_path / "f32.json")]) == 0
    assert json.load(open(tmp_path / "f32.json"))["precision"] == "float32"
    (run_dir / "run_config.json").write_text("[1, 2")
    assert evaluate.main(args) == 2
    assert "run_config.json" in capsys.readouterr().err
    (run_dir / "run_config.json").unlink()
    assert evaluate.run_precision(args[1], "run") == "float32"
