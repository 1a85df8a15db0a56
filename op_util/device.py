"""Per-device defaults of precision and XLA, chosen from measurements (iepkt_tf.benchmark), shared
by train_w_distill.py (``--precision auto``, ``--jit auto``) and the benchmark."""
from __future__ import annotations

import tensorflow as tf


def cpu_flags():
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16(cpu_features=None):
    """True when the CPU computes bfloat16 natively (AVX512-BF16 dot products or AMX tiles)."""
    cpu_features = cpu_flags() if cpu_features is None else set(cpu_features)
    return bool(cpu_features & {"avx512_bf16", "amx_bf16"})


def _has_gpu():
    return bool(tf.config.list_physical_devices("GPU"))


def default_jit(gpu=None, decompositions=False):
    """XLA default for a step (``decompositions``: the step runs eigh/SVD, i.e. the IEP steps).

    CPU: off. Measured here (``--jit true`` vs ``false``, float32, batch 32): student training
    4.8x, the IEP initial step 6.3x and inference 1.1x slower under XLA; eigh alone 25-150x
    and SVD 400x+ slower. GPU (not measured, no GPU here): on for the plain steps, off for steps
    with decompositions, which XLA compiles to slow loops.
    """
    if gpu is None:
        gpu = _has_gpu()
    return bool(gpu) and not decompositions


def default_precision(gpu=None, cpu_features=None):
    """Keras global policy for ``--precision auto``.

    GPU (not measured here): ``mixed_float16`` with the loss scale of op_util.optimizer. CPU:
    ``mixed_bfloat16`` where the CPU has native bfloat16 (``avx512_bf16`` or ``amx_bf16``): on the
    project's AVX512-BF16 CPU (no AMX) every part was faster than float32 (WRN-40-4 -> WRN-16-4,
    batch 128: student 1.65x, floor 1.71x, IEP main 1.60x, IEP init 1.67x, inference 1.95x). The
    distiller's linear algebra stays float32 under it, so the distiller's parity with the authors'
    numbers holds (tests/test_benchmark.py); the networks themselves then compute in bfloat16
    (logits within ~0.5 % of float32), so ``--precision float32`` is the choice for the authors'
    exact arithmetic. Other CPUs: ``float32`` (oneDNN would emulate bfloat16, not measured).
    """
    if gpu is None:
        gpu = _has_gpu()
    if gpu:
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_has_bf16(cpu_features) else "float32"
