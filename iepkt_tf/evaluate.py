r"""Test-set accuracy of a trained network (a ``train_params.mat``) on any supported dataset.

    python -m iepkt_tf.evaluate --params runs/teacher/train_params.mat --arch WResNet-40-4 \
        --dataset cifar100 [--data_dir DIR] [--json result.json]

prints one line::

    WResNet-40-4 (Teacher) on cifar100 test: top-1 76.09 %  top-5 93.12 %  loss 0.9876  (10000 images)

The network is built in inference mode and loaded strictly by TF1 name (as
:mod:`iepkt_tf.export` does); the test images go through ``dataloader.pipeline.eval_dataset`` (the
authors' normalisation, no augmentation), as the training script's validation does. top-k counts an
image when fewer than k classes score strictly higher than its label (k = min(5, classes), so with
4 classes top-5 is 100 %); the loss is the mean softmax cross-entropy. ``--arch``, ``--scope`` and the
number of classes default to what the file says; the dataset must have that many classes. Generated
datasets take ``--synthetic_classes`` (default: the network's), ``--synthetic_test_per_class`` and
``--seed`` (the training run's ``--seed`` gives its test set). ``--precision`` defaults to the
one the run trained with (its ``run_config.json`` beside ``--params``), so a run trained in
bfloat16 is evaluated in bfloat16 and gives the accuracy its last epoch line printed. ``--image_size`` is passed to the
generated datasets and CUB200, and other datasets' test images are resized to it. Errors are one
line on stderr (``evaluate: error: ...``) and exit status 2.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
if __name__ == "__main__":  # a quiet console: TensorFlow's C++ start-up lines only with --verbosity
    from iepkt_tf.quiet import import_tensorflow
    import_tensorflow()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from dataloader.datasets import DATASETS, load_dataset  # noqa: E402
from dataloader.pipeline import eval_dataset  # noqa: E402
from iepkt_tf.atomic import atomic_open, check_writable  # noqa: E402
from iepkt_tf.cli import tool_main  # noqa: E402
from iepkt_tf.export import (ERRORS, build_classifier, classes_in,  # noqa: E402
                             read_params)
from iepkt_tf.mat_io import MatFileError, ParamsMismatchError, one_line  # noqa: E402

TOP_K = 5
RESIZABLE = ("synthetic", "synthetic_parts", "CUB200")  # loaders that take image_size
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def topk_counts(logits, labels, k):
    """``(top-1 hits, top-k hits)``: an image counts when fewer than k logits exceed its label's."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    own = logits[np.arange(len(labels)), labels][:, None]
    rank = np.sum(logits > own, axis=1)
    return int(np.sum(rank < 1)), int(np.sum(rank < k))


def evaluate_params(arrays, arch, scope, dataset, batch_size=200, what="--params", precision="float32"):
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``arrays`` (``{TF1 name: array}``) under
    ``scope`` on the test split of ``dataset`` (a :class:`dataloader.datasets.Dataset`), the network
    computing in ``precision`` (a Keras dtype policy)."""
    num_classes = classes_in(arrays, scope, what)
    if num_classes != dataset.num_classes:
        raise ValueError(f"{what}: the network has {num_classes} classes, dataset {dataset.name} "
                         f"has {dataset.num_classes}")
    shape = dataset.test_images.shape[1:]
    model = build_classifier(arrays, scope, arch, num_classes, shape[:2], what, precision)
    spec = tf.TensorSpec([None, *shape], tf.float32)
    logits_of = tf.function(lambda x: tf.cast(model.net(x, training=False)[0], tf.float32),
                            input_signature=[spec])
    k = min(TOP_K, num_classes)
    top1 = topk = n = 0
    loss = 0.0
    for images, labels in eval_dataset(dataset.test_images, dataset.test_labels, batch_size):
        logits = logits_of(images)
        xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        hits1, hitsk = topk_counts(logits.numpy(), labels.numpy(), k)
        top1, topk, n = top1 + hits1, topk + hitsk, n + int(labels.shape[0])
        loss += float(np.sum(xent.numpy(), dtype=np.float64))
    if n == 0:
        raise ValueError(f"dataset {dataset.name} has no test images")
    return {"arch": model.arch, "scope": scope, "dataset": dataset.name, "split": "test",
            "precision": precision,
            "top1": 100.0 * top1 / n, "top5": 100.0 * topk / n, "top_k": k, "loss": loss / n,
            "num_images": n}


def format_result(r):
    precision = "" if r.get("precision", "float32") == "float32" else f", {r['precision']}"
    return (f"{r['arch']} ({r['scope']}) on {r['dataset']} test: top-1 {r['top1']:.2f} %  "
            f"top-5 {r['top5']:.2f} %  loss {r['loss']:.4f}  ({r['num_images']} images{precision})")


def run_precision(params, flag):
    """The dtype policy to evaluate in: ``flag``, or with ``run`` the precision the run trained
    with (``run_config.json`` beside ``params``; float32 for a file from elsewhere)."""
    if flag != "run":
        return flag
    path = os.path.join(os.path.dirname(os.path.abspath(params)), "run_config.json")
    if not os.path.isfile(path):
        return "float32"
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable run config ({one_line(e)}); pass --precision") from None
    precision = saved.get("precision", "float32") if isinstance(saved, dict) else None
    if precision not in PRECISIONS:
        raise ValueError(f"{path}: 'precision' is {precision!r}, expected one of {', '.join(PRECISIONS)}; "
                         f"pass --precision")
    return precision


def resize(images, size):
    """uint8 images resized (bilinear, antialiased) to ``size`` x ``size``."""
    if images.shape[1:3] == (size, size):
        return images
    out = tf.image.resize(images, [size, size], antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8).numpy()


def load_test_set(fv, num_classes):
    """The dataset the flags name, with generated ones sized by the --synthetic_* flags."""
    kwargs = {}
    if fv.dataset.startswith("synthetic"):
        kwargs = {"num_classes": fv.synthetic_classes or num_classes, "train_per_class": 1,
                  "test_per_class": fv.synthetic_test_per_class}
    if fv.image_size and fv.dataset in RESIZABLE:
        kwargs["image_size"] = fv.image_size
    data = load_dataset(fv.dataset, fv.data_dir, seed=fv.seed, **kwargs)
    if fv.image_size and fv.dataset not in RESIZABLE:  # the training split is not needed
        empty = np.zeros((0, fv.image_size, fv.image_size, 3), np.uint8)
        data = dataclasses.replace(data, train_images=empty, train_labels=np.zeros(0, np.int32),
                                   test_images=resize(data.test_images, fv.image_size))
    return data


def define_flags(fv):
    """The evaluate flags on ``fv`` (absl FlagValues)."""
    flags.DEFINE_string("params", None, "The .mat to evaluate (e.g. <train_dir>/train_params.mat).",
                        flag_values=fv)
    flags.DEFINE_string("arch", None, "Network, e.g. WResNet-16-4 (default: read from the file).",
                        flag_values=fv)
    flags.DEFINE_enum("dataset", None, list(DATASETS), "Dataset whose test split is evaluated.",
                      flag_values=fv)
    flags.DEFINE_string("data_dir", None, "Directory holding the dataset files (not used by synthetic).",
                        flag_values=fv)
    flags.DEFINE_string("scope", None, "TF1 scope of the network in the file, Student or Teacher "
                        "(default: the only one).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 200, "Test images per forward pass.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("image_size", 0, "Image size (0: the dataset's own).", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("synthetic_classes", None, "Generated datasets: number of classes "
                         "(default: the network's).", lower_bound=2, flag_values=fv)
    flags.DEFINE_integer("synthetic_test_per_class", 50, "Generated datasets: test images per class.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the synthetic dataset (the training run's --seed).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_enum("precision", "run", ["run"] + list(PRECISIONS),
                      "Dtype policy of the network: run = the one the run trained with (its "
                      "run_config.json beside --params; float32 for a file from elsewhere), so the "
                      "accuracy is the one the run's last epoch line printed.", flag_values=fv)
    flags.DEFINE_string("json", None, "Also write the result to this JSON file (atomically).", flag_values=fv)
    flags.mark_flags_as_required(["params", "dataset"], flag_values=fv)


def run(fv, log=print):
    """Evaluate as the flags ``fv`` say; returns the result dict (also written to --json)."""
    if fv.json:
        check_writable(fv.json, "--json")
    what = f"--params {fv.params}"
    arrays, scope = read_params(fv.params, fv.scope)
    data = load_test_set(fv, classes_in(arrays, scope, what))
    precision = run_precision(fv.params, fv.precision)
    result = evaluate_params(arrays, fv.arch, scope, data, fv.batch_size, what, precision)
    result["params"] = fv.params
    log(format_result(result))
    if fv.json:
        with atomic_open(fv.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


def main(argv=None):
    return tool_main("evaluate", argv, define_flags, __doc__, run, (MatFileError, ParamsMismatchError) + ERRORS)


if __name__ == "__main__":
    sys.exit(main())
