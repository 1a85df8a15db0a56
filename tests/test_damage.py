"""Damaged inputs of every command-line tool: one error line, exit status 2, nothing lost.

For each tool (parity, visualize, benchmark, experiments, export, evaluate) and each class of damage
that applies to what it reads or writes -- a truncated file, a file of another format (text, a PNG
under the expected name, an empty file), arrays of the wrong shape or dtype inside a valid file,
NaN/Inf values, a missing file or directory, an output location that cannot be written -- the
damaged file is generated in ``tmp_path`` and the tool must

* exit with status 2,
* print, as the last non-empty line of stderr, ``<tool>: error: ...`` naming the file or flag,
* print no traceback, and
* leave every output that existed before unchanged (and write no new one).

The dataset loaders (every on-disk layout of ``dataloader/datasets.py``) must raise
``DatasetError`` (a ``DatasetNotFoundError`` and a ``ValueError``, which the training script and the
tools report as one line) naming the damaged file.

Most cases call the tools' ``main(argv)`` in-process (it returns the exit status); one subprocess per
TensorFlow tool (``python -m iepkt_tf.<tool>``, about 5 s each for the import) proves the
no-traceback property end to end. experiments imports no TensorFlow, so all its cases are cheap
subprocesses.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import scipy.io as sio

from tests.conftest import FIXTURES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
ARCH, CLASSES, SIZE = "WResNet-10-1", 4, 16
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"


# ----------------------------------------------------------------------------- helpers

def last_line(text):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def check_error(rc, err, tool, *names):
    """Exit status 2, no traceback, the last stderr line ``<tool>: error: ...`` naming ``names``."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    line = last_line(err)
    assert line.startswith(f"{tool}: error: "), err
    for name in names:
        assert str(name) in line, (name, line)
    return line


def cli(tool, args, timeout=300):
    res = subprocess.run([sys.executable, "-m", f"iepkt_tf.{tool}"] + [str(a) for a in args],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    return res.returncode, res.stderr


def in_process(capsys, main, args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def tree(root):
    """``{relative path: bytes}`` of every file under ``root`` (directories as None)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def unwritable_dir(tmp_path):
    """A directory path that nothing can be written into. ``chmod 0o500`` for a normal user; root
    ignores file modes, so there it is a path below a regular file."""
    if os.geteuid() != 0:
        d = tmp_path / "readonly"
        d.mkdir()
        d.chmod(0o500)
        return d / "out"
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file, not a directory\n")
    return blocker / "out"


# ----------------------------------------------------------------------------- .mat damage

MAT_DAMAGE = {   # kind: what the error line says
    "truncated": "not a readable MATLAB .mat file",
    "text": "not a readable MATLAB .mat file",
    "png": "not a readable MATLAB .mat file",
    "empty": "not a readable MATLAB .mat file",
    "nan": "not finite numbers",
    "inf": "not finite numbers",
    "wrong_dtype": "not finite numbers",
    "wrong_shape": "do not match",
    "missing": "no such file",
    "directory": "is a directory",
}


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    """A valid train_params.mat of a WResNet-10-1 (4 classes, 16x16 images) and its arrays."""
    from iepkt_tf.mat_io import collect_params, save_mat
    from nets.nets_factory import get_network

    net = get_network(ARCH, CLASSES, "Student", SIZE, is_main=False)
    arrays = collect_params(net.tf1_variables())
    path = tmp_path_factory.mktemp("params") / "train_params.mat"
    save_mat(path, arrays)
    return {"path": path, "arrays": arrays}


def damaged_mat(kind, params, tmp_path):
    """A damaged copy of the parameter file (generated here; scipy.io.savemat for the valid .mat
    files whose arrays are wrong)."""
    path = tmp_path / f"{kind}.mat"
    arrays = dict(params["arrays"])
    if kind == "truncated":
        blob = params["path"].read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "text":
        path.write_text("these are not parameters\n")
    elif kind == "png":
        path.write_bytes(PNG)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind in ("nan", "inf", "wrong_dtype", "wrong_shape"):
        value = {"nan": np.full((64, CLASSES), np.nan, np.float32),
                 "inf": np.full((64, CLASSES), np.inf, np.float32),
                 "wrong_dtype": np.array(["not a number"]),
                 "wrong_shape": np.zeros((3, 3), np.float32)}[kind]
        arrays["Student/full/weights"] = value
        sio.savemat(path, arrays)
    elif kind == "directory":
        path.mkdir()
    else:
        assert kind == "missing"
    return path


# ----------------------------------------------------------------------------- dataset layouts

def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _rows(n):
    return np.random.default_rng(0).integers(0, 256, (n, 3072), dtype=np.uint8)


def cifar10_tree(root):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for b in range(1, 6):
        _pickle(d / f"data_batch_{b}", {b"data": _rows(2), b"labels": [1, 2]})
    _pickle(d / "test_batch", {b"data": _rows(2), b"labels": [3, 4]})
    _pickle(d / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    return d


def cifar100_tree(root):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    _pickle(d / "train", {b"data": _rows(3), b"fine_labels": [0, 50, 99]})
    _pickle(d / "test", {b"data": _rows(2), b"fine_labels": [1, 2]})
    _pickle(d / "meta", {b"fine_label_names": [b"c%d" % i for i in range(100)]})
    return d


def cifar10_archive(root):
    src = cifar10_tree(root / "src")
    root.joinpath("data").mkdir()
    with tarfile.open(root / "data" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src, "cifar-10-batches-py")
    return root / "data" / "cifar-10-python.tar.gz"


def _jpeg(h=8, w=8):
    import tensorflow as tf
    return tf.io.encode_jpeg(tf.fill([h, w, 3], tf.constant(90, tf.uint8))).numpy()


def tiny_tree(root):
    r = root / "tiny-imagenet-200"
    for w in ("n01", "n02"):
        (r / "train" / w / "images").mkdir(parents=True)
        (r / "train" / w / "images" / f"{w}_0.JPEG").write_bytes(_jpeg(64, 64))
    (r / "val" / "images").mkdir(parents=True)
    (r / "val" / "images" / "val_0.JPEG").write_bytes(_jpeg(64, 64))
    (r / "wnids.txt").write_text("n01\nn02\n")
    (r / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")
    return r


def cub_tree(root):
    r = root / "CUB_200_2011"
    (r / "images" / "001.A").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (r / "images" / "001.A" / name).write_bytes(_jpeg(20, 12))
    (r / "images.txt").write_text("1 001.A/a.jpg\n2 001.A/b.jpg\n")
    (r / "train_test_split.txt").write_text("1 1\n2 0\n")
    (r / "image_class_labels.txt").write_text("1 1\n2 1\n")
    (r / "classes.txt").write_text("1 001.A\n")
    return r


def _truncate(path, keep=0.5, at_most=None):
    blob = path.read_bytes()
    n = max(1, int(len(blob) * keep))
    path.write_bytes(blob[: n if at_most is None else min(n, at_most)])


# case: (dataset, build(tmp) -> layout root, damage(root) -> damaged file, expected message part)
DATASET_DAMAGE = {
    "cifar10/truncated_batch": ("cifar10", cifar10_tree,
                                lambda d: (_truncate(d / "data_batch_1"), d / "data_batch_1")[1],
                                "cannot read CIFAR pickle"),
    "cifar10/text_batch": ("cifar10", cifar10_tree,
                           lambda d: ((d / "data_batch_2").write_text("hello\n"), d / "data_batch_2")[1],
                           "cannot read CIFAR pickle"),
    "cifar10/png_batch": ("cifar10", cifar10_tree,
                          lambda d: ((d / "test_batch").write_bytes(PNG), d / "test_batch")[1],
                          "cannot read CIFAR pickle"),
    "cifar10/empty_batch": ("cifar10", cifar10_tree,
                            lambda d: ((d / "test_batch").write_bytes(b""), d / "test_batch")[1],
                            "cannot read CIFAR pickle"),
    "cifar10/wrong_shape": ("cifar10", cifar10_tree,
                            lambda d: (_pickle(d / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8),
                                                                     b"labels": [0, 1]}), d / "data_batch_3")[1],
                            "[N, 3072]"),
    "cifar10/wrong_dtype": ("cifar10", cifar10_tree,
                            lambda d: (_pickle(d / "data_batch_3", {b"data": _rows(2).astype(np.float64),
                                                                     b"labels": [0, 1]}), d / "data_batch_3")[1],
                            "uint8"),
    "cifar10/nan_labels": ("cifar10", cifar10_tree,
                           lambda d: (_pickle(d / "data_batch_4", {b"data": _rows(2), b"labels": [np.nan, 1.0]}),
                                      d / "data_batch_4")[1],
                           "integer class ids"),
    "cifar10/labels_out_of_range": ("cifar10", cifar10_tree,
                                    lambda d: (_pickle(d / "test_batch", {b"data": _rows(2), b"labels": [1, 10]}),
                                               d / "test_batch")[1],
                                    "must lie in [0, 10)"),
    "cifar10/labels_wrong_length": ("cifar10", cifar10_tree,
                                    lambda d: (_pickle(d / "test_batch", {b"data": _rows(2), b"labels": [1]}),
                                               d / "test_batch")[1],
                                    "one entry per image"),
    "cifar10/not_a_dict": ("cifar10", cifar10_tree,
                           lambda d: (_pickle(d / "data_batch_5", [1, 2, 3]), d / "data_batch_5")[1],
                           "expected a dict"),
    "cifar10/damaged_meta": ("cifar10", cifar10_tree,
                             lambda d: (_truncate(d / "batches.meta", 0.3), d / "batches.meta")[1],
                             "cannot read CIFAR pickle"),
    "cifar10/meta_wrong_names": ("cifar10", cifar10_tree,
                                 lambda d: (_pickle(d / "batches.meta", {b"label_names": [b"x"]}),
                                            d / "batches.meta")[1],
                                 "10 class names"),
    "cifar10/missing_batch": ("cifar10", cifar10_tree,
                              lambda d: ((d / "data_batch_3").unlink(), d)[1], "lacks data_batch_3"),
    "cifar100/truncated_train": ("cifar100", cifar100_tree,
                                 lambda d: (_truncate(d / "train"), d / "train")[1],
                                 "cannot read CIFAR pickle"),
    "cifar100/labels_out_of_range": ("cifar100", cifar100_tree,
                                     lambda d: (_pickle(d / "test", {b"data": _rows(2), b"fine_labels": [0, 100]}),
                                                d / "test")[1],
                                     "must lie in [0, 100)"),
    "cifar10_archive/truncated": ("cifar10", cifar10_archive,
                                  lambda a: (_truncate(a, 0.4), a)[1], "not a readable .tar.gz"),
    "cifar10_archive/text": ("cifar10", cifar10_archive,
                             lambda a: (a.write_text("not an archive\n"), a)[1], "not a readable .tar.gz"),
    "cifar10_archive/png": ("cifar10", cifar10_archive,
                            lambda a: (a.write_bytes(PNG), a)[1], "not a readable .tar.gz"),
    "TinyImageNet/truncated_jpeg": ("TinyImageNet", tiny_tree,
                                    lambda r: (_truncate(r / "train/n02/images/n02_0.JPEG", 0.5, at_most=50),
                                               r / "train/n02/images/n02_0.JPEG")[1],
                                    "not a readable image"),
    "TinyImageNet/text_as_jpeg": ("TinyImageNet", tiny_tree,
                                  lambda r: ((r / "val/images/val_0.JPEG").write_text("text"),
                                             r / "val/images/val_0.JPEG")[1],
                                  "not a readable image"),
    "TinyImageNet/png_as_wnids": ("TinyImageNet", tiny_tree,
                                  lambda r: ((r / "wnids.txt").write_bytes(PNG + b"\xff\xfe"), r / "wnids.txt")[1],
                                  "not a text file"),
    "TinyImageNet/empty_wnids": ("TinyImageNet", tiny_tree,
                                 lambda r: ((r / "wnids.txt").write_text("\n"), r / "wnids.txt")[1],
                                 "distinct wnids"),
    "TinyImageNet/short_annotation": ("TinyImageNet", tiny_tree,
                                      lambda r: ((r / "val/val_annotations.txt").write_text("val_0.JPEG\n"),
                                                 r / "val/val_annotations.txt")[1],
                                      "line 1"),
    "TinyImageNet/unknown_wnid": ("TinyImageNet", tiny_tree,
                                  lambda r: ((r / "val/val_annotations.txt").write_text("val_0.JPEG n99\n"),
                                             r / "val/val_annotations.txt")[1],
                                  "not in wnids.txt"),
    "TinyImageNet/missing_image": ("TinyImageNet", tiny_tree,
                                   lambda r: ((r / "val/images/val_0.JPEG").unlink(),
                                              r / "val/images/val_0.JPEG")[1],
                                   "image file missing"),
    "TinyImageNet/missing_folder": ("TinyImageNet", tiny_tree,
                                    lambda r: (shutil.rmtree(r / "train/n01"), r / "train/n01")[1],
                                    "missing"),
    "CUB200/short_row": ("CUB200", cub_tree,
                         lambda r: ((r / "images.txt").write_text("1 001.A/a.jpg\n2\n"), r / "images.txt")[1],
                         "line 2"),
    "CUB200/class_zero": ("CUB200", cub_tree,
                          lambda r: ((r / "image_class_labels.txt").write_text("1 0\n2 1\n"),
                                     r / "image_class_labels.txt")[1],
                          "class id >= 1"),
    "CUB200/text_class": ("CUB200", cub_tree,
                          lambda r: ((r / "image_class_labels.txt").write_text("1 one\n2 1\n"),
                                     r / "image_class_labels.txt")[1],
                          "class id >= 1"),
    "CUB200/bad_split": ("CUB200", cub_tree,
                         lambda r: ((r / "train_test_split.txt").write_text("1 1\n2 7\n"),
                                    r / "train_test_split.txt")[1],
                         "0|1"),
    "CUB200/missing_id": ("CUB200", cub_tree,
                          lambda r: ((r / "train_test_split.txt").write_text("1 1\n"), r / "images.txt")[1],
                          "is missing from"),
    "CUB200/binary_table": ("CUB200", cub_tree,
                            lambda r: ((r / "classes.txt").write_bytes(b"\x00\x00\x00"), r / "classes.txt")[1],
                            "line 1"),
    "CUB200/png_as_jpeg": ("CUB200", cub_tree,
                           lambda r: ((r / "images/001.A/b.jpg").write_bytes(PNG),
                                      r / "images/001.A/b.jpg")[1],
                           "not a readable image"),
}


def damaged_dataset(case, tmp_path):
    """``(dataset name, --data_dir, damaged path, expected message part)`` of a DATASET_DAMAGE case."""
    name, build, damage, expect = DATASET_DAMAGE[case]
    layout = build(tmp_path / "data")
    damaged = damage(layout)
    return name, layout.parent, damaged, expect


@pytest.mark.parametrize("case", sorted(DATASET_DAMAGE))
def test_damaged_dataset_files_raise_dataset_error(case, tmp_path):
    from dataloader.datasets import DatasetError, DatasetNotFoundError, load_dataset

    name, data_dir, damaged, expect = damaged_dataset(case, tmp_path)
    kwargs = {"image_size": 16} if name == "CUB200" else {}
    with pytest.raises(DatasetNotFoundError) as err:   # what the training script reports
        load_dataset(name, str(data_dir), **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and expect in msg and str(damaged) in msg, msg
    if "missing" not in case:
        assert isinstance(err.value, DatasetError) and isinstance(err.value, ValueError)


def test_undamaged_layouts_load(tmp_path):
    """The generators above make valid layouts (so each damage case tests only its damage)."""
    from dataloader.datasets import load_dataset

    for name, build in (("cifar10", cifar10_tree), ("cifar100", cifar100_tree),
                        ("TinyImageNet", tiny_tree), ("CUB200", cub_tree)):
        root = tmp_path / name
        build(root)
        kwargs = {"image_size": 16} if name == "CUB200" else {}
        assert load_dataset(name, str(root), **kwargs).train_images.shape[0] >= 1
    archive = cifar10_archive(tmp_path / "archive")
    assert load_dataset("cifar10", str(archive.parent)).num_classes == 10


# ----------------------------------------------------------------------------- mat_io, atomic

@pytest.mark.parametrize("kind", ["truncated", "text", "png", "empty", "directory", "missing"])
def test_load_mat_names_the_file(kind, params, tmp_path):
    from iepkt_tf.mat_io import load_mat

    path = damaged_mat(kind, params, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=MAT_DAMAGE[kind]) as err:
        load_mat(path, what="--params")
    assert str(err.value).startswith(f"--params {path}: ")


def test_check_writable(tmp_path):
    from iepkt_tf.atomic import check_writable

    check_writable(tmp_path / "new" / "deeper" / "r.json", "--json")       # created on write
    check_writable(tmp_path / "out", "--out_dir", directory=True)
    with pytest.raises(OSError, match="--json .*is a directory"):
        check_writable(tmp_path, "--json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="--out_dir .*not a directory"):
        check_writable(tmp_path / "file", "--out_dir", directory=True)
    with pytest.raises(OSError, match="--json"):
        check_writable(unwritable_dir(tmp_path) / "r.json", "--json")


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("kind", sorted(MAT_DAMAGE))
def test_export_damaged_params(kind, params, tmp_path, capsys):
    from iepkt_tf import export

    out = tmp_path / "out" / "m.tflite"
    out.parent.mkdir()
    out.write_bytes(b"the user's previous export")
    path = damaged_mat(kind, params, tmp_path)
    rc, err = in_process(capsys, export.main, ["--params", path, "--out", out, "--overwrite",
                                               "--image_size", SIZE])
    check_error(rc, err, "export", "--params", path, MAT_DAMAGE[kind])
    assert tree(out.parent) == {"m.tflite": b"the user's previous export"}


def test_export_unwritable_out(params, tmp_path, capsys):
    from iepkt_tf import export

    out = unwritable_dir(tmp_path) / "m.tflite"
    rc, err = in_process(capsys, export.main, ["--params", params["path"], "--out", out])
    check_error(rc, err, "export", "--out")


def test_export_subprocess(params, tmp_path):
    path = damaged_mat("truncated", params, tmp_path)
    rc, err = cli("export", ["--params", path, "--out", tmp_path / "m.keras"])
    check_error(rc, err, "export", path, "not a readable")
    assert not (tmp_path / "m.keras").exists()


# ----------------------------------------------------------------------------- evaluate

EVAL_SYNTHETIC = ["--dataset", "synthetic", "--image_size", SIZE, "--synthetic_test_per_class", 2]


@pytest.mark.parametrize("kind", sorted(MAT_DAMAGE))
def test_evaluate_damaged_params(kind, params, tmp_path, capsys):
    from iepkt_tf import evaluate

    out = tmp_path / "r.json"
    out.write_text('{"top1": 76.09}\n')
    path = damaged_mat(kind, params, tmp_path)
    rc, err = in_process(capsys, evaluate.main, ["--params", path, "--json", out] + EVAL_SYNTHETIC)
    check_error(rc, err, "evaluate", "--params", path, MAT_DAMAGE[kind])
    assert out.read_text() == '{"top1": 76.09}\n'


@pytest.mark.parametrize("case", ["cifar10/truncated_batch", "cifar10/wrong_shape",
                                  "cifar10/nan_labels", "cifar10_archive/truncated",
                                  "TinyImageNet/truncated_jpeg", "CUB200/short_row"])
def test_evaluate_damaged_dataset(case, params, tmp_path, capsys):
    from iepkt_tf import evaluate

    name, data_dir, damaged, expect = damaged_dataset(case, tmp_path)
    out = tmp_path / "r.json"
    out.write_text("{}\n")
    args = ["--params", params["path"], "--dataset", name, "--data_dir", data_dir, "--json", out]
    rc, err = in_process(capsys, evaluate.main, args + (["--image_size", SIZE] if name == "CUB200" else []))
    check_error(rc, err, "evaluate", damaged, expect)
    assert out.read_text() == "{}\n"


@pytest.mark.parametrize("case", ["json_dir_unwritable", "json_is_a_directory", "data_dir_missing"])
def test_evaluate_bad_locations(case, params, tmp_path, capsys):
    from iepkt_tf import evaluate

    args = ["--params", params["path"]] + EVAL_SYNTHETIC
    flag = {"json_dir_unwritable": "--json", "json_is_a_directory": "--json",
            "data_dir_missing": "--data_dir"}[case]
    if case == "json_dir_unwritable":
        args += ["--json", unwritable_dir(tmp_path) / "r.json"]
    elif case == "json_is_a_directory":
        (tmp_path / "r.json").mkdir()
        args += ["--json", tmp_path / "r.json"]
    else:
        args = ["--params", params["path"], "--dataset", "cifar10", "--data_dir", tmp_path / "absent"]
    rc, err = in_process(capsys, evaluate.main, args)
    check_error(rc, err, "evaluate", flag)


def test_evaluate_subprocess(params, tmp_path):
    name, data_dir, damaged, expect = damaged_dataset("cifar10/png_batch", tmp_path)
    rc, err = cli("evaluate", ["--params", params["path"], "--dataset", name, "--data_dir", data_dir])
    check_error(rc, err, "evaluate", damaged, expect)


# ----------------------------------------------------------------------------- visualize

def _vis_args(out_dir, **kw):
    args = {"dataset": "synthetic", "image_size": SIZE, "num_images": 8, "size": 64, "thumb": 8,
            "batch_size": 8, "points": "3", "out_dir": out_dir}
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def _old_output(tmp_path):
    out = tmp_path / "vis_out"
    out.mkdir()
    (out / "point3_graph.png").write_bytes(b"the user's previous picture")
    return out


# Every damage through --params; the other .mat flags share its reader, so fewer kinds there.
VIS_MAT_CASES = [("params", k) for k in sorted(MAT_DAMAGE)] + [
    (flag, k) for flag in ("teacher_params", "distiller_params")
    for k in ("truncated", "text", "nan", "inf", "wrong_dtype", "missing", "directory")]


@pytest.mark.parametrize("flag,kind", VIS_MAT_CASES)
def test_visualize_damaged_params(flag, kind, params, tmp_path, capsys):
    from iepkt_tf import visualize

    out = _old_output(tmp_path)
    before = tree(out)
    path = damaged_mat(kind, params, tmp_path)
    files = {"params": params["path"], flag: path}
    rc, err = in_process(capsys, visualize.main, _vis_args(out, **files))
    check_error(rc, err, "visualize", f"--{flag}", path, MAT_DAMAGE[kind])
    assert tree(out) == before


def test_visualize_distiller_params_without_distiller(params, tmp_path, capsys):
    from iepkt_tf import visualize

    rc, err = in_process(capsys, visualize.main, _vis_args(
        tmp_path / "o", params=params["path"], distiller_params=params["path"]))
    check_error(rc, err, "visualize", "--distiller_params", params["path"], "no Distillation/")


@pytest.mark.parametrize("kind", ["truncated", "nan", "wrong_dtype"])
def test_visualize_damaged_snapshot_writes_nothing(kind, params, tmp_path, capsys):
    """A damaged epoch snapshot after a good one: nothing is drawn (all are read first)."""
    from iepkt_tf import visualize

    run = tmp_path / "run"
    (run / "vis").mkdir(parents=True)
    shutil.copy(params["path"], run / "vis" / "params_epoch_000.mat")
    bad = run / "vis" / "params_epoch_001.mat"
    shutil.copy(damaged_mat(kind, params, tmp_path), bad)
    out = _old_output(tmp_path)
    before = tree(out)
    rc, err = in_process(capsys, visualize.main, _vis_args(out, run_dir=run))
    check_error(rc, err, "visualize", "--run_dir", bad, MAT_DAMAGE[kind])
    assert tree(out) == before


@pytest.mark.parametrize("case", ["out_dir_unwritable", "out_dir_is_a_file", "run_dir_missing",
                                  "run_dir_empty", "data_dir_missing", "damaged_dataset"])
def test_visualize_bad_locations(case, params, tmp_path, capsys):
    from iepkt_tf import visualize

    out = tmp_path / "o"
    kw, names = {"params": params["path"]}, []
    if case == "out_dir_unwritable":
        out, names = unwritable_dir(tmp_path), ["--out_dir"]
    elif case == "out_dir_is_a_file":
        out.write_text("x")
        names = ["--out_dir", out]
    elif case == "run_dir_missing":
        kw, names = {"run_dir": tmp_path / "absent"}, ["--run_dir", "no such directory"]
    elif case == "run_dir_empty":
        (tmp_path / "run").mkdir()
        kw, names = {"run_dir": tmp_path / "run"}, ["--run_dir", "no epoch snapshots"]
    elif case == "data_dir_missing":
        kw.update(dataset="cifar10", data_dir=tmp_path / "absent")
        names = ["--data_dir", tmp_path / "absent"]
    else:
        name, data_dir, damaged, expect = damaged_dataset("cifar10/wrong_dtype", tmp_path)
        kw.update(dataset=name, data_dir=data_dir)
        names = [damaged, expect]
    rc, err = in_process(capsys, visualize.main, _vis_args(out, **kw))
    check_error(rc, err, "visualize", *names)
    if case == "out_dir_is_a_file":
        assert out.read_text() == "x"


def test_visualize_subprocess_and_bad_flag(params, tmp_path, capsys):
    from iepkt_tf import visualize

    rc, err = in_process(capsys, visualize.main, _vis_args(tmp_path / "o", params=params["path"],
                                                           num_images="many"))
    check_error(rc, err, "visualize", "num_images")
    path = damaged_mat("png", params, tmp_path)
    rc, err = cli("visualize", _vis_args(tmp_path / "o", params=path))
    check_error(rc, err, "visualize", "--params", path, "not a readable")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- parity

def _fixture_arrays(name):
    with np.load(FIXTURES / name) as f:
        return {k: f[k] for k in f.files}


def _manifest_entry(name):
    with open(FIXTURES / "manifest.json", encoding="utf-8") as f:
        return {name: json.load(f)[name]}


def damaged_fixture(kind, d):
    """A fixture directory ``d`` holding one damaged fixture; returns (damaged path, message part)."""
    d.mkdir()
    kld = d / "f_kld.npz"
    if kind in ("truncated", "text", "png", "empty"):
        blob = (FIXTURES / "f_kld.npz").read_bytes()
        kld.write_bytes({"truncated": blob[: len(blob) // 2], "text": b"hello\n", "png": PNG,
                         "empty": b""}[kind])
        return kld, "f_kld.npz"
    arrays = _fixture_arrays("f_kld.npz")
    if kind == "wrong_shape_manifest":
        arrays["c0/X"] = np.zeros((3,), np.float32)
        (d / "manifest.json").write_text(json.dumps(_manifest_entry("f_kld.npz")))
        expect = "differ from manifest.json"
    elif kind == "wrong_shape":
        arrays = _fixture_arrays("b_plane_mapping.npz")
        arrays["D8_gauss/x"] = np.zeros((2, 3, 4), np.float32)
        kld = d / "b_plane_mapping.npz"
        expect = "must be [B,D]"
    elif kind == "wrong_shape_mismatch":
        arrays["c1/Y"] = np.ones((5, 5), np.float32)
        expect = "cannot run the 'kld' check"
    elif kind == "wrong_dtype":
        arrays["c0/X"] = np.array(["a", "b"])
        expect = "expected numeric arrays"
    elif kind == "nan":
        arrays["c0/X"] = np.full((8, 8), np.nan, np.float32)
        expect = "non-finite"
    elif kind == "inf":
        arrays["c2/kld"] = np.float32(np.inf)
        expect = "non-finite"
    elif kind == "meta_not_object":
        arrays["__meta__"] = np.array("[1, 2]")
        expect = "__meta__ must be a JSON object"
    elif kind == "meta_truncated":
        arrays["__meta__"] = np.array('{"kind": "kl')
        expect = "__meta__ is not valid JSON"
    elif kind == "manifest_truncated":
        (d / "manifest.json").write_text('{"f_kld.npz": {"keys"')
        expect, kld = "not a readable JSON manifest", d / "manifest.json"
    else:
        raise AssertionError(kind)
    np.savez(d / kld.name if kld.suffix == ".npz" else d / "f_kld.npz", **arrays)
    return kld, expect


PARITY_DAMAGE = ("truncated", "text", "png", "empty", "wrong_shape", "wrong_shape_manifest",
                 "wrong_shape_mismatch", "wrong_dtype", "nan", "inf", "meta_not_object",
                 "meta_truncated", "manifest_truncated")


@pytest.mark.parametrize("kind", PARITY_DAMAGE)
def test_parity_damaged_fixture(kind, tmp_path, capsys):
    from iepkt_tf import parity

    d = tmp_path / "fixtures"
    path, expect = damaged_fixture(kind, d)
    before = tree(d)
    rc, err = in_process(capsys, parity.main, ["--fixtures", d])
    check_error(rc, err, "parity", path, expect)
    assert tree(d) == before


@pytest.mark.parametrize("case", ["missing_dir", "a_file", "no_fixtures"])
def test_parity_bad_directory(case, tmp_path, capsys):
    from iepkt_tf import parity

    d = {"missing_dir": tmp_path / "absent", "a_file": FIXTURES / "README.md",
         "no_fixtures": tmp_path}[case]
    rc, err = in_process(capsys, parity.main, ["--fixtures", d])
    check_error(rc, err, "parity", d)


def test_parity_damaged_companion_mat(tmp_path, capsys):
    """h_wresnet's companion .mat (a teacher-style parameter file) with NaN weights."""
    from iepkt_tf import parity

    d = tmp_path / "fixtures"
    d.mkdir()
    shutil.copy(FIXTURES / "h_wresnet.npz", d)
    arrays = {k: v for k, v in sio.loadmat(FIXTURES / "h_wresnet_student_train_params.mat").items()
              if not k.startswith("__")}
    arrays["Student/full/weights"] = np.full_like(arrays["Student/full/weights"], np.nan)
    mat = d / "h_wresnet_student_train_params.mat"
    sio.savemat(mat, arrays)
    rc, err = in_process(capsys, parity.main, ["--fixtures", d])
    check_error(rc, err, "parity", mat, "not finite")


def test_parity_subprocess(tmp_path):
    path, expect = damaged_fixture("meta_not_object", tmp_path / "fixtures")
    rc, err = cli("parity", ["--fixtures", tmp_path / "fixtures"])
    check_error(rc, err, "parity", path, expect)


# ----------------------------------------------------------------------------- benchmark

@pytest.mark.parametrize("case", ["json_dir_unwritable", "json_is_a_directory", "json_dir_missing",
                                  "bad_value", "unknown_part", "unknown_arch", "unknown_flag"])
def test_benchmark_bad_flags_keep_the_json(case, tmp_path, capsys):
    from iepkt_tf import benchmark

    old = tmp_path / "bench.json"
    old.write_text('{"previous": true}\n')
    args, flag = ["--json", old], "--json"
    if case == "json_dir_unwritable":
        args = ["--json", unwritable_dir(tmp_path) / "b.json"]
    elif case == "json_is_a_directory":
        (tmp_path / "b.json").mkdir()
        args = ["--json", tmp_path / "b.json"]
    elif case == "json_dir_missing":
        args = ["--json", tmp_path / "absent" / "b.json"]
    elif case == "bad_value":
        args, flag = args + ["--batch_size", "1"], "--batch_size"
    elif case == "unknown_part":
        args, flag = args + ["--parts", "student,bogus"], "--parts"
    elif case == "unknown_arch":
        args, flag = args + ["--student_arch", "VGG-1"], "--student_arch"
    else:
        args, flag = args + ["--bogus", "1"], "bogus"
    rc, err = in_process(capsys, benchmark.main, args)
    check_error(rc, err, "benchmark", flag)
    assert old.read_text() == '{"previous": true}\n'


def test_benchmark_subprocess(tmp_path):
    out = unwritable_dir(tmp_path) / "b.json"
    rc, err = cli("benchmark", ["--json", out, "--steps", 1, "--warmup", 1])
    check_error(rc, err, "benchmark", "--json")


# ----------------------------------------------------------------------------- experiments

def _finished_run(run, acc=(50.0, 60.0)):
    run.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps(
        {"init_epoch": 0, "train_epoch": len(acc), "sample_rate": 1.0, "seed": 0}))
    sio.savemat(run / "log.mat", {"validation_acc": np.array(acc)})
    sio.savemat(run / "train_params.mat", {"Student/full/biases": np.zeros(4)})
    (run / "run_time.json").write_text('{"wall_s": 12.5, "invocations": 1}\n')


def _grid_dir(tmp_path):
    """An --out_dir with a finished teacher and one finished student run (tiny preset names)."""
    out = tmp_path / "grid"
    _finished_run(out / "teacher")
    _finished_run(out / "None" / "r1_s0")
    return out


def _write_log(path, value):
    sio.savemat(path, {"validation_acc": value})


RUN = "None/r1_s0"
EXPERIMENT_DAMAGE = {   # case: (damage(out) -> damaged path, message part)
    "grid_truncated": (lambda o: (o / "grid.json").write_text('{"preset": "ti') and o / "grid.json",
                       "not readable JSON"),
    "grid_not_object": (lambda o: (o / "grid.json").write_text("[1, 2]") and o / "grid.json",
                        "got a JSON list"),
    "grid_wrong_type": (lambda o: (o / "grid.json").write_text('{"commands": "x"}') and o / "grid.json",
                        "must be a list"),
    "csv_wrong_header": (lambda o: (o / "results.csv").write_text("variant,rate\nx,1\n") and o / "results.csv",
                         "expected the header"),
    "csv_png": (lambda o: (o / "results.csv").write_bytes(PNG) and o / "results.csv",
                "not a readable results.csv"),
    "csv_bad_row": (lambda o: (o / "results.csv").write_text(
        "variant,rate,seed,final_acc,best_acc,epochs,wall_s,train_dir\nNone,1,0,abc,1,1,,gone\n")
        and o / "results.csv", "line 2"),
    "config_truncated": (lambda o: (o / RUN / "run_config.json").write_text('{"init_ep')
                         and o / RUN / "run_config.json", "not readable JSON"),
    "config_not_object": (lambda o: (o / RUN / "run_config.json").write_text("[0]")
                          and o / RUN / "run_config.json", "got a JSON list"),
    "config_wrong_type": (lambda o: (o / RUN / "run_config.json").write_text(
        '{"init_epoch": "zero", "train_epoch": 2}') and o / RUN / "run_config.json", "'init_epoch'"),
    "log_truncated": (lambda o: (_truncate(o / RUN / "log.mat", 0.3), o / RUN / "log.mat")[1],
                      "not a readable MATLAB .mat file"),
    "log_text": (lambda o: (o / RUN / "log.mat").write_text("hello") and o / RUN / "log.mat",
                 "not a readable MATLAB .mat file"),
    "log_wrong_dtype": (lambda o: (_write_log(o / RUN / "log.mat", np.array(["ab", "cd"])),
                                   o / RUN / "log.mat")[1], "numeric 'validation_acc'"),
    "log_nan": (lambda o: (_write_log(o / RUN / "log.mat", np.array([np.nan, 1.0])),
                           o / RUN / "log.mat")[1], "non-finite"),
    "log_no_key": (lambda o: (sio.savemat(o / RUN / "log.mat", {"loss": np.zeros(2)}),
                              o / RUN / "log.mat")[1], "numeric 'validation_acc'"),
    "params_text": (lambda o: (o / RUN / "train_params.mat").write_text("weights?")
                    and o / RUN / "train_params.mat", "not a MATLAB .mat file"),
    "run_time_truncated": (lambda o: (o / RUN / "run_time.json").write_text('{"wall')
                           and o / RUN / "run_time.json", "not readable JSON"),
}
GRID_ARGS = ["--preset=tiny", "--dry_run", "--variants=None", "--rates=1", "--seeds=0"]
# Every case with --summarize_only; a grid invocation (--dry_run) reads the same files through the
# same readers, so a few there (one per file).
EXPERIMENT_CASES = [(c, "summarize_only") for c in sorted(EXPERIMENT_DAMAGE)] + [
    (c, "grid") for c in ("grid_truncated", "csv_bad_row", "config_truncated", "log_nan",
                          "params_text", "run_time_truncated")]


def _experiments(args):
    res = subprocess.run([sys.executable, "-m", "iepkt_tf.experiments"] + [str(a) for a in args],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    return res.returncode, res.stderr


@pytest.mark.parametrize("case,mode", EXPERIMENT_CASES)
def test_experiments_damaged_out_dir(case, mode, tmp_path):
    out = _grid_dir(tmp_path)
    (out / "results.md").write_text("the user's previous summary\n")
    damage, expect = EXPERIMENT_DAMAGE[case]
    damaged = damage(out)
    before = tree(out)
    args = [f"--out_dir={out}"] + (["--summarize_only"] if mode == "summarize_only" else GRID_ARGS)
    rc, err = _experiments(args)
    check_error(rc, err, "experiments", damaged, expect)
    assert tree(out) == before


@pytest.mark.parametrize("case", ["out_dir_unwritable", "out_dir_missing", "data_dir_missing",
                                  "summary_is_a_directory"])
def test_experiments_bad_locations(case, tmp_path):
    out = _grid_dir(tmp_path)
    if case == "out_dir_unwritable":
        args, names = [f"--out_dir={unwritable_dir(tmp_path)}", "--preset=tiny", "--max_runs=1"], ["--out_dir"]
    elif case == "out_dir_missing":
        args, names = [f"--out_dir={tmp_path / 'absent'}", "--summarize_only"], ["--out_dir", "no such directory"]
    elif case == "data_dir_missing":
        args, names = [f"--out_dir={out}", f"--data_dir={tmp_path / 'absent'}"] + GRID_ARGS, ["--data_dir"]
    else:
        (out / "results.png").mkdir()
        args, names = [f"--out_dir={out}", "--summarize_only"], [out / "results.png", "is a directory"]
    before = tree(out)
    rc, err = _experiments(args)
    check_error(rc, err, "experiments", *names)
    assert tree(out) == before
