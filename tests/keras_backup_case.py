"""The run ``tests/test_keras_backup.py`` kills and resumes: ``DistillationModel.fit`` of IEP (one
initial + two main epochs, tiny) with ``keras.callbacks.BackupAndRestore(BACKUP_DIR)``; prints
``STEP <epoch> <batch>`` after every step and, at the end, writes the whole training state
(student, method, optimiser, global step) to OUT.npz.

    python tests/keras_backup_case.py OUT.npz BACKUP_DIR
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dataloader.datasets import load_dataset  # noqa: E402
from iepkt_tf.keras_model import DistillationModel, trainer_dataset  # noqa: E402
from nets.nets_factory import get_network  # noqa: E402

SIZE, CLASSES, BATCH, SEED = 16, 4, 8, 5


class Announce(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        print(f"STEP {self.epoch} {batch}", flush=True)


def main(out, backup_dir):
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(SEED)
    data = load_dataset("synthetic", seed=SEED, num_classes=CLASSES, train_per_class=8,
                        test_per_class=2, image_size=SIZE)
    student = get_network("WResNet-10-1", CLASSES, "Student", SIZE, is_main=True)
    teacher = get_network("WResNet-10-2", CLASSES, "Teacher", SIZE, is_main=False)
    model = DistillationModel(student, teacher, "IEP", init_epoch=1, seed=SEED, learning_rate=0.05)
    ds = trainer_dataset(data.train_images, data.train_labels, BATCH, SEED, model)
    model.fit(ds, epochs=3, verbose=0,
              callbacks=[keras.callbacks.BackupAndRestore(backup_dir), Announce()])
    np.savez(out, **{n: v.numpy() for n, v in model.state_variables().items()})
    print("DONE", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
