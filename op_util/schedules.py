"""Learning-rate schedule and distillation warm-up of the authors' training script.

``learning_rate`` mirrors ``train_w_distill.learning_rate_scheduler`` (IEPKT): the base rate is
multiplied by ``decay_rate`` once the epoch counter reaches ``init_epoch + int(train_epoch * dp)``
for each decay point ``dp``. ``warmup`` is KD_methods_with_TF ``op_util.sigmoid(epoch - init_epoch,
0)``, the factor that scales the distillation-gradient clip bound in ``Optimizer_w_MHGD``.

``epoch`` is the authors' epoch counter ``floor(global_step * batch_size / N)``; the training loop
passes the index of the current pass over the data, which is the same number when the batch size
divides N and otherwise differs from it only during the last step of a pass (see train_w_distill).
Both functions return Python floats; the loop feeds them to the compiled steps as float32 tensors.
"""
from __future__ import annotations

import math


def learning_rate(epoch, init_epoch, train_epoch, base=0.1, decay_points=(0.3, 0.6, 0.8),
                  decay_rate=0.2):
    """Step schedule: ``base * decay_rate ** #{dp : epoch >= init_epoch + int(train_epoch*dp)}``.

    During the initial (module-training) phase ``epoch < init_epoch`` the rate is ``base``.
    """
    if train_epoch < 0 or init_epoch < 0:
        raise ValueError(f"learning_rate: init_epoch and train_epoch must be >= 0, "
                         f"got init_epoch={init_epoch}, train_epoch={train_epoch}")
    lr = float(base)
    for dp in decay_points:
        if epoch >= init_epoch + int(train_epoch * dp):
            lr *= decay_rate
    return lr


def warmup(epoch, init_epoch):
    """``sigmoid(epoch - init_epoch)``, snapped to 1.0 once it exceeds ``1 - 1e-8``.

    KD_methods_with_TF ``op_util.sigmoid(x, k=0, d=1)``: 0.5 in the first epoch of the main phase,
    0.73 in the second, ... and exactly 1.0 from epoch ``init_epoch + 19`` on.
    """
    x = float(epoch) - float(init_epoch)
    if x < -700.0:  # exp overflow guard; the value is 0 to float precision
        return 0.0
    s = 1.0 / (1.0 + math.exp(-x))
    return 1.0 if s > 1.0 - 1e-8 else s
