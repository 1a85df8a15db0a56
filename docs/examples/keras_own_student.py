"""A functional Keras student of your own, distilled with IEP and with AT through ``fit()``.

Plain ``fit()`` (method "None") against IEP and AT on the generated part-constellation task at sample
rate 0.1 (500 training images of 40 classes), one seed, with the quick start's teacher (WRN-16-2,
8 epochs on all 5,000 images, trained here by ``trainer.run`` unless OUT/teacher holds it). The
student is a 4-layer CNN that is not one of the project's networks: ``KerasStudent`` names its
sensing points (the ReLU outputs) and, for AT's pre-activation form, the batch norms before them.
Run from the repository root::

    python docs/examples/keras_own_student.py runs/keras_own_student

It prints one line per method (test accuracy on the 2,000 test images) and a summary dict.
"""
import os
import sys
import time

import keras
import tensorflow as tf

sys.path.insert(0, os.getcwd())
from iepkt_tf import config, trainer  # noqa: E402
from iepkt_tf.keras_model import DistillationModel, KerasStudent, trainer_dataset  # noqa: E402

SEED, EPOCHS, IEP_INIT = 0, 30, 4
COMMON = dict(dataset="synthetic_parts", precision="float32", batch_size=64, val_batch_size=200,
              log_every=100000, teacher_arch="WResNet-16-2", student_arch="WResNet-10-1",
              vis_every=0)
POINTS, PRE = ["p0", "p1", "p2", "p3"], ["pre0", "pre1", "pre2", "pre3"]


def teacher_params(out):
    """The quick start's teacher: trained here unless ``out/teacher/train_params.mat`` exists."""
    path = os.path.join(out, "teacher", "train_params.mat")
    if not os.path.exists(path):
        res = trainer.run(config.make_config(Distillation="None", main_scope="Teacher",
                                             train_epoch=8, train_dir=os.path.dirname(path),
                                             **COMMON))
        if res.get("stopped"):
            raise SystemExit("the teacher's training was stopped; run the script again")
    return path


def cnn(num_classes):
    """Four conv + BN + ReLU layers at the teacher's sensing sizes on 32x32 (32, 32, 16, 8)."""
    x = inputs = keras.Input((32, 32, 3))
    for k, (width, stride) in enumerate([(16, 1), (24, 1), (48, 2), (96, 2)]):
        x = keras.layers.Conv2D(width, 3, stride, padding="same", use_bias=False, name=f"conv{k}")(x)
        x = keras.layers.BatchNormalization(name=PRE[k])(x)
        x = keras.layers.ReLU(name=POINTS[k])(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def main(out):
    tf.config.experimental.enable_op_determinism()
    cfg = config.resolve_config(config.make_config(
        Distillation="IEP", sample_rate=0.1, seed=SEED, teacher_params=teacher_params(out),
        train_dir=out, **COMMON))
    data = trainer.load_data(cfg)
    results = {}
    for method in ("None", "AT", "IEP"):
        keras.utils.set_random_seed(SEED)
        student = KerasStudent(cnn(data.num_classes), POINTS, pre_relu_layers=PRE)
        teacher = None if method == "None" else trainer.load_teacher(cfg, data.num_classes,
                                                                     data.image_size)
        options = {"init_epoch": IEP_INIT} if method == "IEP" else {}
        model = DistillationModel(student, teacher, method, seed=SEED, **options)
        batches = trainer_dataset(data.train_images, data.train_labels, 64, SEED, model)
        start = time.time()
        model.fit(batches, epochs=EPOCHS + options.get("init_epoch", 0), verbose=0)
        results[method] = model.evaluate(data.val_ds, verbose=0, return_dict=True)["accuracy"]
        print(f"{method:5s} test accuracy {100 * results[method]:.2f} %  "
              f"({time.time() - start:.0f} s)", flush=True)
    print({k: round(100 * v, 2) for k, v in results.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "keras_own_student"))
